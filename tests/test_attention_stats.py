"""``fastgen.attention_stats(model)``: one interface for every method, the LM methods included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastgen.pipelines.tiny_lm import build_tiny_llada

import fastgen
from fastgen import SparseDConfig, WindowDiffusionConfig
from fastgen.processors import transformers_lm

GEN = dict(gen_length=32, steps=8, block_length=32, progress=False, generator=0)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_llada(device="cpu", dtype=torch.float32)


def test_sparsed_rows_come_through_the_shared_interface(pipe):
    fastgen.apply_sparse_attention(pipe.model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    fastgen.record_attention_stats(pipe.model, "summary")  # statistics are opt-in
    try:
        pipe(prompt="hello there", **GEN)
        rows = fastgen.attention_stats(pipe.model)
        own = transformers_lm.stats(pipe.model)
        assert rows and len(rows) == len(own)
        assert [r["layer"] for r in rows] == [r["layer"] for r in own]
        assert all(r["method"] == "sparsed" for r in rows)
        assert [r["density"] for r in rows] == [r["density"] for r in own]
        assert all(r["density"] < 1.0 for r in rows)  # the pattern dropped blocks
        assert all("block_mask" not in r for r in rows)  # masks are opt-in
        with fastgen.recording_attention_stats(pipe.model, "masks"):
            assert all(r["block_mask"].dtype == torch.bool for r in fastgen.attention_stats(pipe.model))
        fastgen.record_attention_stats(pipe.model, "off")
        assert fastgen.attention_stats(pipe.model) == []
    finally:
        fastgen.remove_sparse_attention(pipe.model)
    assert fastgen.attention_stats(pipe.model) == []


def test_window_diffusion_rows_match_its_trace(pipe):
    wd = WindowDiffusionConfig(window=16, active=4, refresh_cycle=4)
    # the recorder is created at the generation: it takes the level asked for on the model
    with fastgen.recording_attention_stats(pipe.model, "summary"):
        out = pipe(prompt="hello there", acceleration=[wd], **GEN)
    rows = fastgen.attention_stats(pipe.model)
    assert rows and all(r["method"] == "window_diffusion" for r in rows)
    total = out.sequences.shape[1]
    scores = sum(t["queries"] * t["keys"] for t in out.window_trace)
    expected = scores / (len(out.window_trace) * total**2)
    assert rows[0]["density"] == pytest.approx(expected)
    assert 0.0 < rows[0]["density"] < 1.0 and rows[0]["steps"] == len(out.window_trace)
    assert len({r["layer"] for r in rows}) == pipe.model.config.num_hidden_layers


# ------------------------------------------------------------------ statistics are opt-in (issue 22)


@pytest.fixture
def fresh_lm():
    return build_tiny_llada(device="cpu", dtype=torch.float32)


def _rectified_wan(batch=1, grid=(3, 6, 7)):
    """The tiny Wan transformer with Rectified SpaAttn on both layers and one input of ``grid`` latent
    frames x height x width (1x1x1 patches: 126 tokens by default, 8 blocks of 16 with a partial last)."""
    from fastgen.pipelines.tiny_video import build_tiny_wan

    from fastgen import RectifiedSpaAttnConfig

    model = build_tiny_wan(num_layers=2).transformer
    config = RectifiedSpaAttnConfig(
        sparsity=0.6, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=64
    )
    fastgen.apply_sparse_attention(model, config)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(batch, 16, *grid, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 12, 32, generator=g),
        return_dict=False,
    )
    return model, inputs


def test_rectified_records_nothing_by_default():
    model, inputs = _rectified_wan(batch=2)
    with torch.no_grad():
        off = model(**inputs)[0]
    assert fastgen.attention_stats(model) == []
    processors = {id(p): p for p in model.attn_processors.values() if hasattr(p, "_last")}.values()
    assert processors and all(p.record_stats == "off" for p in processors)
    assert all(row is None for p in processors for row in p._last.values())  # nothing kept on the side
    with fastgen.recording_attention_stats(model, "summary"), torch.no_grad():
        on = model(**inputs)[0]
    rows = fastgen.attention_stats(model)  # the same call ran sparse: it reports when asked
    assert [r["layer"] for r in rows] == [0, 1] and all(0 < r["density"] < 1 for r in rows)
    assert torch.equal(on, off)  # recording changes nothing in the output
    assert all(p.record_stats == "off" for p in processors)  # restored after the block


def test_rectified_density_equals_the_recorded_block_mask():
    """The row's density is the fraction of True tiles of the block mask it reports, counted here over
    the tiles of the call: 126 tokens in blocks of 16 -> 8 x 8 tiles per head."""
    model, inputs = _rectified_wan(batch=1)
    with fastgen.recording_attention_stats(model, "masks"), torch.no_grad():
        model(**inputs)
    rows = fastgen.attention_stats(model)
    assert len(rows) == 2
    for row in rows:
        mask = row["block_mask"]
        assert mask.dtype == torch.bool and tuple(mask.shape) == (2, 8, 8)  # heads, query / key blocks
        tiles = 2 * 8 * 8
        assert row["density"] == pytest.approx(int(mask.sum()) / tiles, abs=1e-6)
        assert 0 < row["density"] < 1


def test_light_forcing_records_nothing_by_default():
    from fastgen.pipelines.tiny_video import build_tiny_causal_wan

    from fastgen import LightForcingConfig
    from fastgen.processors import light_forcing_wan

    pipe = build_tiny_causal_wan(num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    config = LightForcingConfig(
        sparsity=0.6, sparsity_base=0.8, block_size=16, keep_frames=2, keep_sink=1, keep_near=1
    )
    fastgen.apply_sparse_attention(pipe.transformer, config)
    call = dict(prompt="a kite", height=64, width=64, num_frames=21, output_type="np")

    def run():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(0)).frames[0]

    off = run()
    assert fastgen.attention_stats(pipe.transformer) == [] and light_forcing_wan.stats(pipe.transformer) == []
    with fastgen.recording_attention_stats(pipe.transformer, "summary"):
        on = run()
    rows = light_forcing_wan.stats(pipe.transformer)
    assert {r["chunk"] for r in rows} == {0, 1}
    assert any(r["density"] < 1 for r in rows if r["chunk"] == 1)  # the same run was sparse
    assert len(fastgen.attention_stats(pipe.transformer)) == 2  # last chunk of each layer
    assert np.array_equal(on, off)


def test_sparsed_records_nothing_by_default(fresh_lm):
    fastgen.apply_sparse_attention(fresh_lm.model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    fresh_lm(prompt="hello there", **GEN)
    assert fastgen.attention_stats(fresh_lm.model) == []
    rows = transformers_lm.stats(fresh_lm.model)  # the method's own patterns: it did run sparse
    assert rows and all(r["density"] < 1 for r in rows)
    # opting in before apply works too: the state created at apply takes the model's level
    fastgen.remove_sparse_attention(fresh_lm.model)
    fastgen.record_attention_stats(fresh_lm.model, "masks")
    fastgen.apply_sparse_attention(fresh_lm.model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    out = fresh_lm(prompt="hello there", **GEN)
    rows = fastgen.attention_stats(fresh_lm.model)
    assert [r["layer"] for r in rows] == [0, 1]
    n = out.sequences.shape[1]
    blocks = -(-n // 16)  # a partial last block when n is not a multiple of 16
    for row in rows:
        mask = row["block_mask"]
        assert tuple(mask.shape) == (4, blocks, blocks)  # heads, query / key blocks
        assert row["density"] == pytest.approx(int(mask.sum()) / (4 * blocks * blocks), abs=1e-6)
    fastgen.remove_sparse_attention(fresh_lm.model)


def test_window_diffusion_records_nothing_by_default(fresh_lm):
    wd = WindowDiffusionConfig(window=16, active=4, refresh_cycle=4)
    out = fresh_lm(prompt="hello there", acceleration=[wd], **GEN)
    assert out.window_trace  # it ran pruned steps
    assert fastgen.attention_stats(fresh_lm.model) == []
    with fastgen.recording_attention_stats(fresh_lm.model, "summary"):
        fresh_lm(prompt="hello there", acceleration=[wd], **GEN)
    rows = fastgen.attention_stats(fresh_lm.model)
    assert rows and all(0 < r["density"] < 1 for r in rows)  # readable after the block
    fresh_lm(prompt="hello there", acceleration=[wd], **GEN)  # outside the block: off again
    assert fastgen.attention_stats(fresh_lm.model) == []


def test_a_level_asked_before_apply_holds_for_the_processors_installed_later():
    from fastgen.pipelines.tiny_video import build_tiny_causal_wan, build_tiny_wan

    from fastgen import LightForcingConfig, RectifiedSpaAttnConfig
    from fastgen.processors import light_forcing_wan

    wan = build_tiny_wan(num_layers=2).transformer
    fastgen.record_attention_stats(wan, "summary")
    fastgen.apply_sparse_attention(wan, RectifiedSpaAttnConfig(dense_layers=0))
    procs = [p for p in wan.attn_processors.values() if hasattr(p, "layer_stats")]
    assert len(procs) == 2 and all(p.record_stats == "summary" for p in procs)
    fastgen.record_attention_stats(wan, "off")
    fastgen.apply_sparse_attention(wan, RectifiedSpaAttnConfig(dense_layers=0))  # new processors
    procs = [p for p in wan.attn_processors.values() if hasattr(p, "layer_stats")]
    assert len(procs) == 2 and all(p.record_stats == "off" for p in procs)

    causal = build_tiny_causal_wan(num_layers=2).transformer
    fastgen.record_attention_stats(causal, "masks")
    fastgen.apply_sparse_attention(causal, LightForcingConfig())
    procs = light_forcing_wan.processors(causal)
    assert len(procs) == 2 and all(p.record_stats == "masks" for p in procs)
