"""Rectified SpaAttn processors on diffusers' WanTransformer3DModel: exactness, step tracking, restore, fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

import fastgen
from fastgen import RectifiedSpaAttnConfig, SparseDConfig, apply_sparse_attention, remove_sparse_attention
from fastgen.api import apply_to_pipeline, remove_from_pipeline
from fastgen.processors import wan
from fastgen.processors.wan import WanRectifiedProcessor, grid_from_rotary
from fastgen.tracking import (
    StepTracker,
    get_step_tracker,
    register_step_tracker,
    reset_step_tracking,
)

GRID = (3, 6, 11)  # latent frames, height/2, width/2 -> 198 tokens (not a multiple of the block)


def tiny_wan(head_dim: int = 32, layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()


def inputs(batch: int = 2, timestep: float = 900.0):
    g = torch.Generator().manual_seed(2)
    f, h, w = GRID
    x = torch.randn(batch, 4, f, 2 * h, 2 * w, generator=g)
    text = torch.randn(batch, 7, 16, generator=g)
    return x, torch.full((batch,), timestep), text


def run(model, x, t, text):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def cfg(**kw):
    base = {"sparsity": 0.5, "block_size": 16, "dense_layers": 0, "warmup_steps": 0, "min_tokens": 32}
    base.update(kw)
    return RectifiedSpaAttnConfig(**base)


def test_sparsity_zero_matches_dense_batch2():
    model = tiny_wan()
    x, t, text = inputs(batch=2)
    ref = run(model, x, t, text)
    apply_sparse_attention(model, cfg(sparsity=0.0))
    with fastgen.recording_attention_stats(model, "masks"):  # masks are kept only when asked
        out = run(model, x, t, text)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    rows = wan.stats(model)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["density"] == 1.0 for r in rows)
    mask = rows[0]["block_mask"]
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    assert mask.shape == (2, 13, 13)  # [H, ceil(198/16), ceil(198/16)]


def test_sparse_runs_and_remove_restores_exactly():
    model = tiny_wan()
    x, t, text = inputs()
    originals = dict(model.attn_processors)
    ref = run(model, x, t, text)
    apply_sparse_attention(model, cfg(sparsity=0.75))
    assert isinstance(model.blocks[1].attn1.processor, WanRectifiedProcessor)
    assert model.blocks[1].attn2.processor is originals["blocks.1.attn2.processor"]  # cross-attn untouched
    out = run(model, x, t, text)
    assert not torch.equal(out, ref)
    assert all(r["density"] < 1.0 for r in wan.stats(model))
    assert get_step_tracker(model) is not None
    remove_sparse_attention(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert get_step_tracker(model) is None
    assert torch.equal(run(model, x, t, text), ref)


def test_all_dense_processor_matches_diffusers_exactly():
    model = tiny_wan()
    x, t, text = inputs()
    ref = run(model, x, t, text)
    model.set_attn_processor(WanRectifiedProcessor(cfg(dense_layers=99)))  # on attn1 and attn2
    assert torch.equal(run(model, x, t, text), ref)


def test_set_by_hand_layers_and_steps_without_tracker(caplog):
    model = tiny_wan()
    x, t, text = inputs()
    ref = run(model, x, t, text)
    proc = WanRectifiedProcessor(cfg(sparsity=0.0, warmup_steps=1))
    model.set_attn_processor(proc)
    fastgen.record_attention_stats(model, "summary")  # statistics are opt-in
    with caplog.at_level(logging.INFO, logger="fastgen"):
        run(model, x, t, text)  # forward 0: warm-up, dense
    assert proc.layer_stats() == []
    assert "no step tracker" in caplog.text
    out = run(model, x, t, text)  # forward 1: sparse
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert [r["layer"] for r in proc.layer_stats()] == [0, 1]
    reset_step_tracking(model)  # new generation: warm-up again
    assert proc.layer_stats() == []
    run(model, x, t, text)
    assert proc.layer_stats() == []


def test_set_by_hand_uses_registered_tracker():
    model = tiny_wan()
    proc = WanRectifiedProcessor(cfg(warmup_steps=1))
    model.set_attn_processor(proc)
    fastgen.record_attention_stats(model, "summary")  # statistics are opt-in
    tracker = register_step_tracker(model)
    x, t, text = inputs(batch=1)
    run(model, x, t, text)
    run(model, x, t, text)  # CFG second call, same timestep: still step 0 (dense)
    assert tracker.step == 0 and proc.layer_stats() == []
    run(model, x, torch.full((1,), 800.0), text)
    assert tracker.step == 1 and len(proc.layer_stats()) == 2
    assert tracker.grid == GRID


def test_step_tracking_cfg_two_calls_and_batched():
    model = tiny_wan(layers=1)
    apply_sparse_attention(model, cfg(warmup_steps=2))
    fastgen.record_attention_stats(model, "summary")  # statistics are opt-in
    tracker = get_step_tracker(model)
    x, _, text = inputs(batch=1)
    x2, text2 = torch.cat([x, x]), torch.cat([text, text])
    for i, ts in enumerate([999.0, 750.0, 500.0]):
        run(model, x, torch.full((1,), ts), text)  # cond
        run(model, x, torch.full((1,), ts), text)  # uncond
        assert tracker.step == i
    assert wan.stats(model) != []  # step 2 >= warmup_steps
    generation = tracker.generation
    for i, ts in enumerate([999.0, 500.0]):  # timestep back up: new generation, batched CFG
        run(model, x2, torch.full((2,), ts), text2)
        assert tracker.step == i
        if i == 0:
            assert wan.stats(model) == []  # state reset with the new generation
    assert tracker.generation == generation + 1


def test_step_tracker_unit():
    tracker = StepTracker()
    resets = []
    tracker.add_reset_listener(lambda: resets.append(1))
    for ts in [1000, 1000, 900, 900, 800]:
        tracker.observe(ts)
    assert tracker.step == 2 and tracker.calls == 5
    tracker.observe(1000)
    assert tracker.step == 0 and tracker.generation == 1 and resets == [1]
    tracker.reset()
    assert tracker.step == -1 and tracker.generation == 2


def test_fallback_unsupported_head_dim_logs(caplog):
    model = tiny_wan(head_dim=12)
    x, t, text = inputs()
    ref = run(model, x, t, text)
    apply_sparse_attention(model, cfg())
    with caplog.at_level(logging.INFO, logger="fastgen"):
        out = run(model, x, t, text)
    assert "head_dim=12" in caplog.text
    assert torch.allclose(out, ref, atol=1e-6)
    assert wan.stats(model) == []


def test_fallback_short_sequence_logs(caplog):
    model = tiny_wan()
    x, t, text = inputs()
    apply_sparse_attention(model, cfg(min_tokens=1000))
    with caplog.at_level(logging.INFO, logger="fastgen"):
        run(model, x, t, text)
    assert "shorter than min_tokens=1000" in caplog.text
    assert caplog.text.count("shorter than min_tokens") == 2  # once per layer processor, not per call
    run(model, x, t, text)
    assert caplog.text.count("shorter than min_tokens") == 2


def test_bad_config_errors():
    model = tiny_wan(layers=1)
    with pytest.raises(ValueError, match="no adapter supports"):
        apply_sparse_attention(model, SparseDConfig())
    with pytest.raises(ValueError, match="RectifiedSpaAttnConfig"):
        wan.apply(model, SparseDConfig())
    with pytest.raises(ValueError, match="sparsity"):
        RectifiedSpaAttnConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        wan.apply(torch.nn.Linear(2, 2), cfg())


def test_grid_from_rotary():
    model = tiny_wan()
    x, _, _ = inputs(batch=1)
    cos, _ = model.rope(x)
    assert grid_from_rotary(cos, 32) == GRID
    assert grid_from_rotary(cos[:, :66], 32) == (1, 6, 11)


def test_apply_to_pipeline_shares_tracker_between_two_transformers():
    class Pipe:
        pass

    pipe = Pipe()
    pipe.transformer, pipe.transformer_2 = tiny_wan(layers=1), tiny_wan(layers=1)
    apply_to_pipeline(pipe, cfg(warmup_steps=1))
    fastgen.record_attention_stats(pipe.transformer_2, "summary")  # statistics are opt-in
    tracker = get_step_tracker(pipe.transformer)
    assert get_step_tracker(pipe.transformer_2) is tracker
    x, _, text = inputs(batch=1)
    run(pipe.transformer, x, torch.full((1,), 900.0), text)
    run(pipe.transformer_2, x, torch.full((1,), 400.0), text)  # low-noise expert continues the count
    assert tracker.step == 1 and wan.stats(pipe.transformer_2) != []
    remove_from_pipeline(pipe)
    assert get_step_tracker(pipe.transformer) is None and get_step_tracker(pipe.transformer_2) is None
    assert not isinstance(pipe.transformer.blocks[0].attn1.processor, WanRectifiedProcessor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_diffusers_arithmetic(dtype):
    from fastgen.processors.wan import apply_wan_rotary

    x = torch.randn(2, 30, 3, 16).to(dtype)
    angles = torch.rand(1, 30, 1, 8) * 6
    cos = torch.cos(angles).repeat_interleave(2, -1)
    sin = torch.sin(angles).repeat_interleave(2, -1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    expected = torch.empty_like(x, dtype=torch.float32)
    expected[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    expected[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    out = apply_wan_rotary(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.allclose(
        out.float(), expected.to(dtype).float(), atol=1e-6 if dtype == torch.float32 else 1e-2
    )


@pytest.mark.parametrize("norm_kind", ["rms", "rms_no_weight", "identity"])
def test_norm_rope_in_place_equals_norm_then_rotary(monkeypatch, norm_kind):
    """The processor's in-place QK-norm + RoPE (a few tokens at a time) gives bit for bit what
    diffusers' module followed by :func:`apply_wan_rotary` gives, and works in x's own memory."""
    from fastgen.processors.wan import apply_wan_rotary, norm_rope

    monkeypatch.setattr(wan, "_CHUNK_BYTES", 3 * 2 * 96 * 4)  # 3 tokens of a batch of 2 per run
    heads, d, n = 3, 32, 25
    norm = {
        "rms": torch.nn.RMSNorm(heads * d, eps=1e-6),
        "rms_no_weight": torch.nn.RMSNorm(heads * d, elementwise_affine=False),
        "identity": torch.nn.Identity(),
    }[norm_kind]
    for p in norm.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, n, heads * d)
    angles = torch.rand(1, n, 1, d // 2) * 6
    cos, sin = torch.cos(angles).repeat_interleave(2, -1), torch.sin(angles).repeat_interleave(2, -1)
    with torch.no_grad():
        expected = apply_wan_rotary(norm(x).unflatten(2, (heads, -1)), cos, sin)
        owned = x.clone()
        out = norm_rope(norm, owned, heads, (cos, sin))
    assert torch.equal(out, expected)
    assert out.data_ptr() == owned.data_ptr()  # in place
    with torch.no_grad():
        assert torch.equal(norm_rope(norm, x.clone(), heads, None), norm(x).unflatten(2, (heads, -1)))


def test_norm_rope_with_gradients_or_bf16_uses_the_plain_composition():
    from fastgen.processors.wan import apply_wan_rotary, norm_rope

    heads, d, n = 2, 16, 9
    norm = torch.nn.RMSNorm(heads * d)
    cos, sin = torch.ones(1, n, 1, d), torch.zeros(1, n, 1, d)
    x = torch.randn(1, n, heads * d, requires_grad=True)
    out = norm_rope(norm, x * 1.0, heads, (cos, sin))
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    xb = torch.randn(1, n, heads * d).bfloat16()
    with torch.no_grad():
        outb = norm_rope(norm.bfloat16(), xb.clone(), heads, (cos, sin))
        expected = apply_wan_rotary(norm(xb).unflatten(2, (heads, -1)), cos, sin)
    assert outb.dtype == torch.bfloat16 and torch.equal(outb, expected)


def test_processor_workspace_lives_for_one_forward_call():
    """All layers share one workspace; it holds the one-pass path's q/k/v copies while a forward
    call runs (layer 1 finds layer 0's buffers) and is freed when the call returns, by reset and
    on removal (hand-set processors without a tracker)."""
    model = tiny_wan()
    x, t, text = inputs(batch=1)
    apply_sparse_attention(model, cfg())
    proc = model.blocks[0].attn1.processor
    assert model.blocks[1].attn1.processor.workspace is proc.workspace  # one set for all layers
    seen = []
    hook = model.blocks[1].attn1.register_forward_pre_hook(
        lambda *_: seen.append({n: b.data_ptr() for n, b in proc.workspace._buffers.items()})
    )
    run(model, x, t, text)
    hook.remove()
    assert set(seen[0]) == {"q", "k", "v"}  # kept from layer 0 for layer 1
    assert proc.workspace.nbytes == 0  # freed when the forward call returned
    remove_sparse_attention(model)

    by_hand = WanRectifiedProcessor(cfg())  # no tracker: kept until reset or removal
    model.set_attn_processor(by_hand)
    run(model, x, t, text)
    assert by_hand.workspace.nbytes > 0
    by_hand.reset()
    assert by_hand.workspace.nbytes == 0


def test_statistics_levels_off_summary_masks():
    """Statistics are read through ``fastgen.attention_stats``: opt-in (nothing by default, see
    ``test_statistics_are_off_by_default``), a summary when asked (no masks held), masks only when asked,
    nothing at all with ``"off"``."""
    model = tiny_wan()
    x, t, text = inputs()
    apply_sparse_attention(model, cfg(sparsity=0.75))
    fastgen.record_attention_stats(model, "summary")
    run(model, x, t, text)
    rows = fastgen.attention_stats(model)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["block_mask"] is None and 0 < r["density"] < 1 for r in rows)
    assert all(r["keys_per_query"] > 0 for r in rows)
    procs = {id(p): p for p in model.attn_processors.values() if isinstance(p, WanRectifiedProcessor)}
    assert all(
        not any(torch.is_tensor(v) and v.dim() > 1 for v in p._last[layer].values())
        for p in procs.values()
        for layer in p._last
        if p._last[layer] is not None
    )
    with fastgen.recording_attention_stats(model, "masks"):
        run(model, x, t, text)
    assert all(r["block_mask"] is not None for r in fastgen.attention_stats(model))
    assert all(p.record_stats == "summary" for p in procs.values())  # restored after the block
    fastgen.record_attention_stats(model, "off")
    for p in procs.values():
        p.reset()
    run(model, x, t, text)
    assert fastgen.attention_stats(model) == []
    with pytest.raises(ValueError, match="level"):
        fastgen.record_attention_stats(model, "all")
