"""Causal (Self-Forcing) Wan: KV-cached chunk attention against one full block-causal forward (the oracle),
clean removal, the attention interface Light Forcing overrides, bad input."""

from __future__ import annotations

import pytest
import torch

from fastgen.processors.causal_wan import (
    CausalWanSelfAttnProcessor,
    causal_generation,
    get_causal_state,
    install_causal_processors,
    remove_causal_processors,
)
from tests.helpers import rel_rmse

FRAME_HW = (6, 10)  # latent height, width -> 3 x 5 = 15 tokens per frame after the 2x2 patch
FRAME_TOKENS = 15
CHANNELS = 4
TEXT_DIM = 16


def tiny_wan(layers: int = 2, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(3)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=48,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()
    return model.to(dtype)


def sees(query_frame: int, key_frame: int, k: int, window: int | None, sinks: int) -> bool:
    """The oracle's rule, from the issue: a token of a chunk ending at frame e sees every frame f < e
    (block causal); with local_attn_frames=W, sink_frames=S only f < S or f >= e - (W - S)."""
    end = (query_frame // k + 1) * k
    if key_frame >= end:
        return False
    if window is None:
        return True
    return key_frame < sinks or key_frame >= end - (window - sinks)


def oracle_mask(frames: int, k: int, window: int | None, sinks: int) -> torch.Tensor:
    """Token-level bool mask [N, N] (True = attend) over ``frames`` frames of FRAME_TOKENS tokens."""
    frame_of = torch.arange(frames * FRAME_TOKENS) // FRAME_TOKENS
    allowed = torch.tensor([[sees(q, f, k, window, sinks) for f in range(frames)] for q in range(frames)])
    return allowed[frame_of][:, frame_of]


class MaskedWanProcessor:
    """diffusers' own WanAttnProcessor with a fixed attention mask (the oracle's self-attention)."""

    def __init__(self, mask: torch.Tensor) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def full_forward(model, latents, timesteps_per_frame, text, mask):
    """One forward of a plain Wan over all frames with per-token timesteps and the oracle's mask."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    procs = {name: WanAttnProcessor() for name in model.attn_processors}
    for i in range(len(model.blocks)):
        procs[f"blocks.{i}.attn1.processor"] = MaskedWanProcessor(mask)
    saved = dict(model.attn_processors)
    model.set_attn_processor(procs)
    try:
        b = latents.shape[0]
        per_token = timesteps_per_frame.repeat_interleave(FRAME_TOKENS)[None].expand(b, -1)
        with torch.no_grad():
            return model(latents, per_token, text, return_dict=False)[0]
    finally:
        model.set_attn_processor(saved)


def forward(model, x, t, text):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), float(t)), text, return_dict=False)[0]


def run_chunks(model, clean, noisy, text, k, steps, window=None, sinks=0, **options):
    """Drive a causal session like the pipeline: per chunk ``steps`` denoising forwards on ``noisy`` inputs,
    then the context pass on ``clean``. Returns {(chunk, step): prediction}."""
    b, _, frames = clean.shape[:3]
    preds = {}
    with causal_generation(
        model,
        batch_size=b,
        num_frames=frames,
        frame_tokens=FRAME_TOKENS,
        frames_per_chunk=k,
        local_attn_frames=window,
        sink_frames=sinks,
        **options,
    ) as session:
        for c in range(frames // k):
            session.begin_chunk(c)
            chunk = slice(c * k, (c + 1) * k)
            for s, t in enumerate(steps):
                session.begin_step(s, t)
                preds[c, s] = forward(model, noisy[s][:, :, chunk], t, text)
            session.begin_step(len(steps), 0.0, context=True)
            forward(model, clean[:, :, chunk], 0.0, text)
    return preds


def check_oracle(model, *, batch, frames, k, window=None, sinks=0, tol=1e-4, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    shape = (batch, CHANNELS, frames, *FRAME_HW)
    clean = torch.randn(shape, generator=g).to(dtype)
    steps = [1000.0, 700.0]
    noisy = [torch.randn(shape, generator=g).to(dtype) for _ in steps]
    text = torch.randn(batch, 7, TEXT_DIM, generator=g).to(dtype)
    preds = run_chunks(model, clean, noisy, text, k, steps, window, sinks)
    assert get_causal_state(model) is None  # installed for the session only
    for c in range(frames // k):
        end = (c + 1) * k
        mask = oracle_mask(end, k, window, sinks)
        for s, t in enumerate(steps):
            latents = torch.cat([clean[:, :, : c * k], noisy[s][:, :, c * k : end]], dim=2)
            per_frame = torch.tensor([0.0] * (c * k) + [t] * k)
            want = full_forward(model, latents, per_frame, text, mask)[:, :, c * k : end]
            err = rel_rmse(preds[c, s].float(), want.float())
            assert err < tol, f"chunk {c} step {s}: relative error {err:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_chunks_match_block_causal_full_forward(batch):
    check_oracle(tiny_wan(), batch=batch, frames=6, k=2)


def test_chunks_of_three_frames():
    check_oracle(tiny_wan(layers=1), batch=1, frames=9, k=3)


@pytest.mark.parametrize(("window", "sinks"), [(4, 1), (5, 0), (6, 2)])
def test_rolling_window_with_sinks_matches_oracle(window, sinks):
    check_oracle(tiny_wan(), batch=2, frames=10, k=2, window=window, sinks=sinks)


def test_bf16_close_to_oracle():
    check_oracle(
        tiny_wan(layers=1, dtype=torch.bfloat16), batch=2, frames=6, k=2, tol=3e-2, dtype=torch.bfloat16
    )


def test_window_relative_rope_positions():
    """``rope_positions="window"``: keys cached without RoPE, rotated by their index in the window. With one
    layer the K/V of a frame depend on that frame alone, so chunk c's prediction equals a full forward over
    the attended frames laid side by side (renumbered 0..n-1), restricted to the chunk."""
    model = tiny_wan(layers=1)
    g = torch.Generator().manual_seed(8)
    frames, k, window, sinks = 10, 2, 5, 1
    shape = (2, CHANNELS, frames, *FRAME_HW)
    clean, noisy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    text = torch.randn(2, 7, TEXT_DIM, generator=g)
    preds = run_chunks(model, clean, [noisy], text, k, [900.0], window, sinks, rope_positions="window")
    for c in range(frames // k):
        end = (c + 1) * k
        past = [f for f in range(c * k) if sees(c * k, f, k, window, sinks)]
        latents = torch.cat([clean[:, :, past], noisy[:, :, c * k : end]], dim=2)
        per_frame = torch.tensor([0.0] * len(past) + [900.0] * k)
        n = latents.shape[2] * FRAME_TOKENS
        want = full_forward(model, latents, per_frame, text, torch.ones(n, n, dtype=torch.bool))[:, :, -k:]
        assert rel_rmse(preds[c, 0], want) < 1e-4, c
    # without eviction window positions are the absolute ones
    absolute = run_chunks(model, clean, [noisy], text, k, [900.0])
    relative = run_chunks(model, clean, [noisy], text, k, [900.0], rope_positions="window")
    assert all(rel_rmse(relative[key], absolute[key]) < 1e-5 for key in absolute)
    with pytest.raises(ValueError, match="rope_positions='relative' is not allowed"):
        run_chunks(model, clean, [noisy], text, k, [900.0], rope_positions="relative")


def test_oracle_mask_is_not_trivial():
    """The oracle's mask differs from full attention and from plain block causality where it should."""
    full = oracle_mask(8, 2, None, 0)
    windowed = oracle_mask(8, 2, 4, 1)
    t = FRAME_TOKENS
    assert full[0, 2 * t] == 0 and full[2 * t, 0] == 1 and full[2 * t, 3 * t] == 1  # chunk-causal
    assert windowed[7 * t, 0] == 1 and windowed[7 * t, 4 * t] == 0 and windowed[7 * t, 5 * t] == 1


def test_removal_restores_dense_noncausal_output():
    model = tiny_wan()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, CHANNELS, 4, *FRAME_HW, generator=g)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    before = forward(model, x, 500.0, text)
    originals = dict(model.attn_processors)
    state = install_causal_processors(model)
    assert state.session is None
    idle = forward(model, x, 500.0, text)  # installed, no generation: plain Wan math
    remove_causal_processors(model)
    after = forward(model, x, 500.0, text)
    assert torch.equal(before, after)
    assert rel_rmse(idle, before) < 1e-5
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert model.rope._diffusers_hook.get_hook("fastgen_causal_wan_rope") is None


def test_cache_allocated_once_at_final_size():
    model = tiny_wan(layers=1)
    g = torch.Generator().manual_seed(0)
    frames, k = 6, 2
    clean = torch.randn(1, CHANNELS, frames, *FRAME_HW, generator=g)
    text = torch.randn(1, 5, TEXT_DIM, generator=g)
    pointers = []
    with causal_generation(
        model, batch_size=1, num_frames=frames, frame_tokens=FRAME_TOKENS, frames_per_chunk=k
    ) as s:
        for c in range(frames // k):
            s.begin_chunk(c)
            s.begin_step(0, 1000.0)
            forward(model, clean[:, :, c * k : (c + 1) * k], 1000.0, text)
            cache = s.caches[0, 0]
            pointers.append((cache.keys.data_ptr(), tuple(cache.keys.shape)))
            s.begin_step(1, 0.0, context=True)
            forward(model, clean[:, :, c * k : (c + 1) * k], 0.0, text)
    assert len(set(pointers)) == 1
    assert pointers[0][1] == (1, 2, frames * FRAME_TOKENS, 24)


def test_chunk_attention_override_sees_interface():
    """A subclass overriding chunk_attention receives [B,H,N,D] q/k/v and the chunk metadata."""
    seen = []

    class Recording(CausalWanSelfAttnProcessor):
        def chunk_attention(self, query, key, value, info):
            seen.append((tuple(query.shape), tuple(key.shape), info))
            return super().chunk_attention(query, key, value, info)

    model = tiny_wan(layers=1)
    install_causal_processors(model, self_attention=lambda layer, state: Recording(layer, state))
    g = torch.Generator().manual_seed(0)
    frames, k = 8, 2
    clean = torch.randn(2, CHANNELS, frames, *FRAME_HW, generator=g)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    run_chunks(model, clean, [clean], text, k, [900.0], window=5, sinks=1)
    assert get_causal_state(model) is not None  # the user's processors stay installed
    remove_causal_processors(model)
    last = [info for _, _, info in seen if info.chunk_index == 3 and not info.context_pass][0]
    q_shape, k_shape, _ = seen[-1]
    assert q_shape == (2, 2, k * FRAME_TOKENS, 24)
    assert last.key_frames == (0, 4, 5, 6, 7)  # e=8: f < 1 or f >= 8 - 4
    assert (last.cached_frames, last.sink_frames, last.current_frames) == (3, 1, 2)
    assert last.query_frames == (6, 7) and last.frame_tokens == FRAME_TOKENS and last.num_chunks == 4
    context = [info for _, _, info in seen if info.context_pass]
    assert len(context) == 4 and all(i.step_index == 1 for i in context)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_frames": 7, "frames_per_chunk": 3}, "not a whole number of chunks"),
        ({"num_frames": 9, "frames_per_chunk": 3, "local_attn_frames": 2}, "smaller than a chunk"),
        ({"num_frames": 9, "frames_per_chunk": 3, "local_attn_frames": 4, "sink_frames": 4}, "sink_frames=4"),
        (
            {"num_frames": 9, "frames_per_chunk": 3, "local_attn_frames": 4, "sink_frames": 2},
            "fewer than a chunk",
        ),
    ],
)
def test_bad_chunking(options, match):
    model = tiny_wan(layers=1)
    with pytest.raises(ValueError, match=match):
        with causal_generation(model, batch_size=1, frame_tokens=FRAME_TOKENS, **options):
            pass
    assert get_causal_state(model) is None


def test_not_a_wan_is_rejected():
    with pytest.raises(ValueError, match="transformer=Linear"):
        install_causal_processors(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- the pipeline


def tiny_pipe(layers: int = 2, **components):
    from fastgen.pipelines import CausalWanPipeline

    return CausalWanPipeline(transformer=tiny_wan(layers=layers), **components)


class Recorder:
    """Forward hook that records every transformer call of the pipeline (inputs and prediction)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        x, t, text = args[:3]
        self.calls.append((x.clone(), t.clone(), text.clone(), output[0].clone()))


PIPE_FRAMES = 4 * (6 - 1) + 1  # 6 latent frames = 3 chunks of 2
PIPE_HW = (8 * FRAME_HW[0], 8 * FRAME_HW[1])


def pipe_inputs(batch=2, seed=11):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, CHANNELS, 6, *FRAME_HW, generator=g)
    text = torch.randn(batch, 5, TEXT_DIM, generator=g)
    negative = torch.randn(batch, 5, TEXT_DIM, generator=g)
    return latents, text, negative


def run_pipe(pipe, latents, text, seed=7, **kw):
    pipe.set_progress_bar_config(disable=True)
    options = dict(
        prompt_embeds=text,
        num_frames=PIPE_FRAMES,
        height=PIPE_HW[0],
        width=PIPE_HW[1],
        num_frames_per_chunk=2,
        denoising_timesteps=[1000.0, 800.0, 500.0],
        latents=latents,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        output_type="latent",
    )
    options.update(kw)
    return pipe(**options).frames


@pytest.mark.parametrize(
    ("guidance", "window", "sinks"),
    [(1.0, None, 0), (3.0, None, 0), (1.0, 4, 1)],
    ids=["plain", "cfg", "window"],
)
def test_pipeline_predictions_match_oracle_and_noise_order(guidance, window, sinks):
    """Checked from outside the processors: every recorded prediction equals the block-causal full
    forward over [clean earlier frames, chunk input]; re-noising follows the stated generator order."""
    pipe = tiny_pipe(layers=1)
    latents, text, negative = pipe_inputs()
    rec = Recorder(pipe.transformer)
    out = run_pipe(
        pipe,
        latents,
        text,
        guidance_scale=guidance,
        negative_prompt_embeds=negative,
        local_attn_frames=window,
        sink_frames=sinks,
    )
    rec.handle.remove()
    steps, k, chunks = [1000.0, 800.0, 500.0], 2, 3
    branches = 2 if guidance > 1 else 1
    # no context pass after the last chunk
    assert len(rec.calls) == branches * (chunks * (len(steps) + 1) - 1)
    facts = pipe.last_generation
    assert facts["forwards"] == len(rec.calls) and facts["frame_tokens"] == FRAME_TOKENS
    capacity = 6 if window is None else window
    assert facts["cache_frames"] == capacity
    # K and V, fp32, batch 2, 2 heads x 24, one layer, per CFG branch
    assert facts["cache_bytes"] == branches * 2 * 4 * 2 * 2 * 24 * capacity * FRAME_TOKENS
    g = torch.Generator().manual_seed(7)
    calls = iter(rec.calls)
    for c in range(chunks):
        end = (c + 1) * k
        mask = oracle_mask(end, k, window, sinks)
        x = latents[:, :, c * k : end]
        for s, t in enumerate(steps):
            preds = []
            for b in range(branches):
                x_in, stamp, emb, pred = next(calls)
                assert torch.equal(x_in, x) and torch.all(stamp == t)
                assert torch.equal(emb, text if b == 0 else negative)
                per_frame = torch.tensor([0.0] * (c * k) + [t] * k)
                full = torch.cat([out[:, :, : c * k], x_in], dim=2)
                want = full_forward(pipe.transformer, full, per_frame, emb, mask)[:, :, c * k :]
                assert rel_rmse(pred, want) < 1e-4, (c, s, b)
                preds.append(pred)
            flow = preds[0] if branches == 1 else preds[1] + guidance * (preds[0] - preds[1])
            x0 = x - t / 1000 * flow
            if s + 1 < len(steps):
                noise = torch.randn(x.shape, generator=g, dtype=torch.float32)
                x = (1 - steps[s + 1] / 1000) * x0 + steps[s + 1] / 1000 * noise
            else:
                x = x0
        assert rel_rmse(out[:, :, c * k : end], x) < 1e-6
        if c + 1 < chunks:
            for _ in range(branches):
                x_in, stamp, _, _ = next(calls)
                assert torch.equal(x_in, out[:, :, c * k : end]) and torch.all(stamp == 0)


def test_pipeline_reproducible_and_batch_rows_independent():
    pipe = tiny_pipe(layers=1)
    latents, text, _ = pipe_inputs()
    a = run_pipe(pipe, latents, text)
    b = run_pipe(pipe, latents, text)
    assert torch.equal(a, b)
    # without re-noising (one step) row 1 of a batch of 2 equals the same row alone
    pair = run_pipe(pipe, latents, text, denoising_timesteps=[1000.0])
    one = run_pipe(pipe, latents[1:], text[1:], denoising_timesteps=[1000.0])
    assert rel_rmse(one, pair[1:]) < 1e-5
    other = run_pipe(pipe, latents, text, seed=8)
    assert rel_rmse(other, a) > 1e-3  # the re-noising generator matters


def test_pipeline_without_latents_draws_initial_noise_first():
    pipe = tiny_pipe(layers=1)
    _, text, _ = pipe_inputs(batch=1)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn((1, CHANNELS, 6, *FRAME_HW), generator=g, dtype=torch.float32)
    # the generator continues after the initial noise: passing it explicitly must give the same result
    want = run_pipe(pipe, latents, text, seed=None, generator=g)
    got = run_pipe(pipe, None, text, seed=None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_callback_on_chunk_end_streams():
    pipe = tiny_pipe(layers=1)
    latents, text, _ = pipe_inputs(batch=1)
    seen = []
    out = run_pipe(pipe, latents, text, callback_on_chunk_end=lambda p, c, x: seen.append((p, c, x.clone())))
    assert [c for _, c, _ in seen] == [0, 1, 2] and all(p is pipe for p, _, _ in seen)
    for c, (_, _, x) in enumerate(seen):
        assert torch.equal(x, out[:, :, : 2 * (c + 1)])


def test_pipeline_marks_steps_explicitly_for_a_step_tracker():
    """Timesteps go back up at every chunk: the tracker must not see a new generation each time, and its
    step is the pipeline's (denoising step within the chunk, then the context pass)."""
    from fastgen.tracking import register_step_tracker, remove_step_tracker

    pipe = tiny_pipe(layers=1)
    tracker = register_step_tracker(pipe.transformer)
    resets, steps = [], []
    tracker.add_reset_listener(lambda: resets.append(1))
    handle = pipe.transformer.blocks[0].register_forward_pre_hook(lambda *_: steps.append(tracker.step))
    latents, text, _ = pipe_inputs(batch=1)
    run_pipe(pipe, latents, text)
    handle.remove()
    assert len(resets) == 2  # start and end of the generation, none per chunk
    assert steps == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert tracker.explicit is False
    remove_step_tracker(pipe.transformer)


def test_both_geometries_frames_map_onto_tokens():
    """480x832 -> 1560 tokens per latent frame, 512x768 -> 1536; keys of chunk 1 are 2 chunks of frames."""
    from fastgen.pipelines import CausalWanPipeline

    seen = []

    class Recording(CausalWanSelfAttnProcessor):
        def chunk_attention(self, query, key, value, info):
            seen.append((key.shape[2], info))
            return super().chunk_attention(query, key, value, info)

    for (h, w), tokens in (((480, 832), 1560), ((512, 768), 1536)):
        seen.clear()
        model = tiny_wan(layers=1)
        install_causal_processors(model, self_attention=lambda layer, state: Recording(layer, state))
        pipe = CausalWanPipeline(transformer=model)
        pipe.set_progress_bar_config(disable=True)
        text = torch.randn(1, 3, TEXT_DIM)
        pipe(
            prompt_embeds=text,
            num_frames=21,
            height=h,
            width=w,
            num_frames_per_chunk=3,
            denoising_timesteps=[1000.0],
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        assert {info.frame_tokens for _, info in seen} == {tokens}
        assert seen[-1][0] == 6 * tokens and seen[0][0] == 3 * tokens


def test_only_transformer_needed_with_embeds_and_latent_output():
    pipe = tiny_pipe(layers=1)
    assert pipe.vae is None and pipe.text_encoder is None and pipe.tokenizer is None
    latents, text, _ = pipe_inputs(batch=1)
    assert run_pipe(pipe, latents, text).shape == latents.shape
    with pytest.raises(ValueError, match="output_type='np' needs the pipeline's vae"):
        run_pipe(pipe, latents, text, output_type="np")
    with pytest.raises(ValueError, match="tokenizer and text_encoder"):
        run_pipe(pipe, latents, None, prompt="a cat")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_frames": 22}, r"num_frames=22 is not allowed.*allowed with num_frames_per_chunk=2: 5, 13"),
        ({"num_frames": 17}, r"5 latent frames, not a whole number of chunks.*allowed: num_frames in 5, 13"),
        ({"local_attn_frames": 1}, "local_attn_frames=1 is smaller than a chunk"),
        (
            {"local_attn_frames": 3, "sink_frames": 3},
            "sink_frames=3 must be smaller than local_attn_frames=3",
        ),
        ({"height": 40}, "height=40 is not allowed"),
        ({"output_type": "mp4"}, "output_type='mp4' is not allowed"),
        ({"guidance_scale": 0.5}, "guidance_scale=0.5"),
        ({"denoising_timesteps": [1200.0]}, "denoising_timesteps"),
        ({"generator": [None]}, "generator=list is not allowed"),
    ],
)
def test_pipeline_bad_input(options, match):
    pipe = tiny_pipe(layers=1)
    _, text, _ = pipe_inputs(batch=1)
    with pytest.raises(ValueError, match=match):
        run_pipe(pipe, None, text, **options)
    assert get_causal_state(pipe.transformer) is None


def test_pipeline_rejects_wrong_latents_and_non_wan():
    from fastgen.pipelines import CausalWanPipeline

    pipe = tiny_pipe(layers=1)
    latents, text, _ = pipe_inputs(batch=1)
    with pytest.raises(ValueError, match="latents of shape"):
        run_pipe(pipe, latents[:, :, :4], text)
    with pytest.raises(ValueError, match="transformer=Linear is not supported"):
        CausalWanPipeline(transformer=torch.nn.Linear(2, 2))(prompt_embeds=text, output_type="latent")


def test_from_pretrained_of_a_saved_wan_folder(tmp_path):
    """A diffusers Wan 2.1 T2V folder (here a tiny WanPipeline saved with save_pretrained) loads as is."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from fastgen.pipelines.tiny_video import build_tiny_wan

    from fastgen.pipelines import CausalWanPipeline

    build_tiny_wan(num_layers=1).save_pretrained(tmp_path)
    pipe = CausalWanPipeline.from_pretrained(tmp_path)
    assert type(pipe) is CausalWanPipeline and isinstance(pipe.transformer, WanTransformer3DModel)
    assert pipe.vae is not None and pipe.text_encoder is not None and pipe.tokenizer is not None
    reference = WanPipeline.from_pretrained(tmp_path)
    assert torch.equal(reference.transformer.proj_out.weight, pipe.transformer.proj_out.weight)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        prompt="a kite",
        num_frames=9,
        height=32,
        width=32,
        output_type="np",
        denoising_timesteps=[1000.0, 500.0],
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 9, 32, 32, 3) and video.min() >= 0 and video.max() <= 1


def test_cli_generate_preset_and_runner(tmp_path, capsys):
    """``fastgen generate --preset tiny-causal-wan --method dense`` and the shared video runner."""
    from fastgen.pipelines.causal_video_runner import denoising_timesteps
    from fastgen.pipelines.video_runner import generate_video, load_video_pipeline

    from fastgen.cli import main

    assert denoising_timesteps(4) == pytest.approx([1000.0, 937.5, 833.333333, 625.0])
    out = tmp_path / "causal.mp4"
    size = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "2"]
    assert (
        main(["generate", "--preset", "tiny-causal-wan", *size, "--prompt", "a kite", "--out", str(out)]) == 0
    )
    assert out.exists() and "9 frames 32x32" in capsys.readouterr().out
    pipe = load_video_pipeline(preset="tiny-causal-wan")
    result = generate_video(pipe, prompt="a kite", method="dense", frames=9, height=32, width=32, steps=1)
    assert result["frames"].shape == (9, 32, 32, 3) and result["config"] == {"method": "dense"}
    with pytest.raises(ValueError, match="not allowed for a causal Wan"):
        generate_video(pipe, prompt="a kite", method="rectified", frames=9, height=32, width=32)


def test_batch_with_the_causal_preset(tmp_path):
    """``fastgen batch prompts.txt --preset tiny-causal-wan`` (method defaults to dense for the causal model)."""
    import json

    from fastgen.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a kite\na boat\n")
    out = tmp_path / "out"
    size = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "1"]
    assert main(["batch", str(prompts), "--preset", "tiny-causal-wan", *size, "--out-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"] and {r["method"] for r in records} == {"dense"}
    assert all((out / r["output"]).exists() for r in records)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_prompt_kv_computed_once_per_generation_and_branch(guidance):
    pipe = tiny_pipe(layers=1)
    latents, text, negative = pipe_inputs(batch=1)
    attn = pipe.transformer.blocks[0].attn2
    counts = {"k": 0, "v": 0, "q": 0}
    handles = [
        getattr(attn, f"to_{name}").register_forward_hook(
            lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)
        )
        for name in counts
    ]
    run_pipe(pipe, latents, text, guidance_scale=guidance, negative_prompt_embeds=negative)
    for h in handles:
        h.remove()
    branches = 2 if guidance > 1 else 1
    assert counts["k"] == counts["v"] == branches
    assert counts["q"] == pipe.last_generation["forwards"] == branches * 11
