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


def run_chunks(model, clean, noisy, text, k, steps, window=None, sinks=0):
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
