"""Light Forcing: Chunk-Aware Growth values, HSA against a loop statement of the rules, the sparse
attention against a dense masked reference, pooled-statistics reuse, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.attention.light_forcing import (
    chunk_sparsities,
    hsa_block_mask,
    light_forcing_attention,
)
from fastgen.attention.light_forcing_naive import naive_light_forcing_attention
from fastgen.configs import LightForcingConfig
from tests.helpers import rel_rmse

# ------------------------------------------------------------------------------ Chunk-Aware Growth


def test_cag_values_of_the_paper():
    got = chunk_sparsities(21, 3, 0.88, 0.98)
    assert [round(s, 4) for s in got] == [0.0, 0.8270, 0.8551, 0.8718, 0.8832, 0.8917, 0.8982]
    # beta in closed form: s_1 = s_base - beta / sqrt(6)
    assert round((0.98 - got[1]) * math.sqrt(6), 4) == 0.3748


@pytest.mark.parametrize("local", [None, 12, 9])
def test_cag_keeps_the_attended_budget(local):
    frames, k, target, base = 24, 3, 0.85, 0.95
    got = chunk_sparsities(frames, k, target, base, local_attn_frames=local)
    assert len(got) == frames // k and got[0] == 0.0
    f = [k * (i + 1) for i in range(1, frames // k)]
    kv = [x if local is None else min(x, local) for x in f]
    spent = sum((1 - s) * n for s, n in zip(got[1:], kv))
    assert spent == pytest.approx(sum((1 - target) * n for n in kv), rel=1e-12)
    assert all(a < b for a, b in zip(got[1:], got[2:]))  # sparsity grows with the chunk index


def test_cag_single_chunk_and_bad_input():
    assert chunk_sparsities(3, 3, 0.8, 0.9) == [0.0]
    with pytest.raises(ValueError, match="num_frames=20 is not a whole number of chunks"):
        chunk_sparsities(20, 3, 0.88, 0.98)
    with pytest.raises(ValueError, match="local_attn_frames=2 is smaller than a chunk"):
        chunk_sparsities(21, 3, 0.88, 0.98, local_attn_frames=2)
    with pytest.raises(ValueError, match="sparsity_base=0.8 must be >= sparsity=0.88"):
        chunk_sparsities(21, 3, 0.88, 0.8)
    with pytest.raises(ValueError, match="sparsity=1.0 is out of range"):
        chunk_sparsities(21, 3, 1.0, 0.98)


# ------------------------------------------------------------------------------ HSA, loop reference


def loop_hsa(q, k, *, sparsity, block_size, frame_tokens, keep_frames, keep_sink, keep_near):
    """The rules of Hierarchical Sparse Attention, one (batch, head, query block) at a time."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nqb, nkb = -(-nq // block_size), -(-nk // block_size)
    past = (nk - nq) // frame_tokens
    mask = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    if past == 0:
        return mask | True
    keep = max(1, min(nkb, int((1.0 - sparsity) * nkb)))

    def block_tokens(j, n):
        return range(j * block_size, min(n, (j + 1) * block_size))

    def frames_of_block(j):
        return {t // frame_tokens for t in block_tokens(j, nk)}

    for bi in range(b):
        for hi in range(h):
            qd, kd = q[bi, hi].double(), k[bi, hi].double()
            key_means = [kd[list(block_tokens(j, nk))].mean(0) for j in range(nkb)]
            for i in range(nqb):
                q_mean = qd[list(block_tokens(i, nq))].mean(0)
                score = {j: float(q_mean @ key_means[j]) for j in range(nkb)}
                if past <= keep_frames:
                    candidates = set(range(nkb))
                else:
                    middle = list(range(keep_sink, past - keep_near))
                    frame_score = {
                        f: float(q_mean @ kd[f * frame_tokens : (f + 1) * frame_tokens].mean(0))
                        for f in middle
                    }
                    best = sorted(middle, key=lambda f: -frame_score[f])[
                        : keep_frames - keep_sink - keep_near
                    ]
                    kept_frames = set(range(keep_sink)) | set(range(past - keep_near, past)) | set(best)
                    kept_frames |= set(range(past, nk // frame_tokens))  # the current chunk
                    candidates = {j for j in range(nkb) if frames_of_block(j) & kept_frames}
                for j in sorted(candidates, key=lambda j: -score[j])[:keep]:
                    mask[bi, hi, i, j] = True
    return mask


def structured_qk(b, h, chunk_frames, past_frames, frame_tokens, d, dtype=torch.float32, seed=0):
    """Keys with a per-frame offset (so frames differ in relevance) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    frames = past_frames + chunk_frames
    offsets = torch.randn(b, h, frames, 1, d, generator=gen) * 1.5
    k = (offsets + torch.randn(b, h, frames, frame_tokens, d, generator=gen)).reshape(b, h, -1, d)
    q = torch.randn(b, h, chunk_frames * frame_tokens, d, generator=gen) + offsets[:, :, -1:, 0]
    return q.to(dtype), k.to(dtype)


HSA_CASES = [
    # (past frames, frame_tokens, block_size, keep_frames, keep_sink, keep_near, sparsity)
    pytest.param(0, 40, 16, 6, 1, 2, 0.8, id="no-history-dense"),
    pytest.param(4, 40, 16, 6, 1, 2, 0.8, id="one-stage-unaligned"),
    pytest.param(6, 32, 16, 6, 1, 2, 0.7, id="one-stage-at-keep_frames"),
    pytest.param(9, 40, 16, 6, 1, 2, 0.8, id="hierarchical-unaligned"),
    pytest.param(9, 32, 16, 6, 1, 2, 0.85, id="hierarchical-aligned"),
    pytest.param(10, 24, 16, 3, 1, 1, 0.6, id="hierarchical-long-config"),
    pytest.param(8, 48, 32, 3, 1, 2, 0.9, id="hierarchical-no-middle"),
    pytest.param(8, 20, 16, 4, 0, 0, 0.75, id="hierarchical-no-sink-no-near"),
]


@pytest.mark.parametrize(("past", "ft", "bs", "kf", "ks", "kn", "s"), HSA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hsa_matches_the_rules(past, ft, bs, kf, ks, kn, s, dtype):
    q, k = structured_qk(2, 3, 3, past, ft, 16, dtype=dtype, seed=past + ft)
    args = dict(sparsity=s, block_size=bs, frame_tokens=ft, keep_frames=kf, keep_sink=ks, keep_near=kn)
    got = hsa_block_mask(q, k, **args)
    expected = loop_hsa(q, k, **args)
    assert got.shape == expected.shape == (2, 3, -(-q.shape[2] // bs), -(-k.shape[2] // bs))
    assert torch.equal(got, expected)
    if past:
        keep = max(1, int((1 - s) * got.shape[-1]))
        assert (got.sum(-1) <= keep).all() and (got.sum(-1) >= 1).all()


def test_hsa_current_chunk_is_a_candidate_not_forced():
    # past keys aligned with the queries, chunk keys orthogonal to them: the chunk is not kept
    q, k = structured_qk(1, 1, 3, 9, 32, 16, seed=3)
    k[:, :, -3 * 32 :] = -10 * q.mean(2, keepdim=True)
    mask = hsa_block_mask(
        q, k, sparsity=0.8, block_size=16, frame_tokens=32, keep_frames=6, keep_sink=1, keep_near=2
    )
    chunk_blocks = mask[..., -6:]
    assert not chunk_blocks.any()


def test_hsa_bad_input():
    q, k = structured_qk(1, 1, 3, 4, 32, 16)
    base = dict(sparsity=0.8, block_size=16, frame_tokens=32, keep_frames=6, keep_sink=1, keep_near=2)
    with pytest.raises(ValueError, match=r"keep_sink \+ keep_near = 4 \+ 3 = 7 must be <= keep_frames=6"):
        hsa_block_mask(q, k, **{**base, "keep_sink": 4, "keep_near": 3})
    with pytest.raises(ValueError, match="frame_tokens=30 does not divide"):
        hsa_block_mask(q, k, **{**base, "frame_tokens": 30})
    with pytest.raises(ValueError, match="fewer than q's"):
        hsa_block_mask(k, q, **base)
    with pytest.raises(ValueError, match="block_size=24 is not allowed"):
        hsa_block_mask(q, k, **{**base, "block_size": 24})
    with pytest.raises(
        ValueError, match="LightForcingConfig.keep_sink \\+ keep_near = 7 must be <= keep_frames=6"
    ):
        LightForcingConfig(keep_sink=4, keep_near=3)


# ------------------------------------------------------------------------------ attention


def _lf(q, k, v, **kwargs):
    args = dict(sparsity=0.75, block_size=16, frame_tokens=40, keep_frames=4, keep_sink=1, keep_near=1)
    args.update(kwargs)
    return light_forcing_attention(q, k, v, **args)


@pytest.mark.parametrize("past", [0, 3, 7])
@pytest.mark.parametrize("rectify", [False, True])
def test_attention_matches_reference_cpu(cpu_engine, past, rectify):
    q, k = structured_qk(2, 2, 3, past, 40, 32, seed=past)
    v = torch.randn_like(k)
    out, info = _lf(q, k, v, rectify=rectify)
    expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
    assert rel_rmse(out, expected) < 1e-5
    assert info["regime"] == ("dense" if past == 0 else "one_stage" if past <= 4 else "hierarchical")
    if rectify and past:
        assert info["compensated"].any() and not (info["compensated"] & info["block_mask"]).any()


@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.slow)])
def test_attention_matches_reference_bf16_and_other_backends(backend):
    q, k = structured_qk(1, 2, 3, 7, 40, 32, dtype=torch.bfloat16, seed=1)
    v = torch.randn_like(k)
    for rectify in (False, True):
        out, info = _lf(q, k, v, rectify=rectify, backend=backend)
        assert out.dtype == torch.bfloat16
        expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
        assert rel_rmse(out, expected) < 2e-2


def test_attention_triton_interpreter():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    q, k = structured_qk(1, 1, 3, 5, 16, 16, seed=2)
    v = torch.randn_like(k)
    for rectify in (False, True):
        out, info = _lf(q, k, v, rectify=rectify, frame_tokens=16, keep_frames=3, backend="triton")
        expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
        assert rel_rmse(out, expected) < 1e-4


def test_rectification_is_exact_on_block_constant_inputs():
    # q and k constant inside each block: every dropped block passes GAPR and its pooled key is exact
    b, h, d, bs, ft = 1, 2, 16, 16, 32
    frames, chunk = 10, 3
    kb = torch.randn(b, h, frames * ft // bs, 1, d)
    k = kb.expand(-1, -1, -1, bs, -1).reshape(b, h, -1, d)
    qb = torch.randn(b, h, chunk * ft // bs, 1, d)
    q = qb.expand(-1, -1, -1, bs, -1).reshape(b, h, -1, d)
    v = torch.randn_like(k)
    out, info = light_forcing_attention(
        q,
        k,
        v,
        sparsity=0.9,
        block_size=bs,
        frame_tokens=ft,
        keep_frames=4,
        keep_sink=1,
        keep_near=1,
        rectify=True,
    )
    assert info["regime"] == "hierarchical"
    assert torch.equal(info["compensated"], ~info["block_mask"])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_rmse(out, dense) < 1e-5


def test_pooled_statistics_are_reused():
    q, k = structured_qk(1, 2, 3, 8, 40, 32, seed=5)
    v = torch.randn_like(k)
    out, info = _lf(q, k, v, rectify=True)
    past = info["past"]
    assert past.tokens == 8 * 40
    # the cached past is what is read at the next step: corrupting the cache's past keys and values
    # does not change the selection nor the pooled keys, only the exact attention to those keys
    k2 = k.clone()
    v2 = v.clone()
    k2[:, :, : 8 * 40] += torch.randn_like(k2[:, :, : 8 * 40])
    _, info_cached = _lf(q, k2, v2, rectify=True, pooled=past)
    _, info_fresh = _lf(q, k2, v2, rectify=True)
    # blocks partly in the past (320 tokens = 20 blocks of 16: none straddles) come from the cache
    assert torch.equal(info_cached["block_mask"], info["block_mask"])
    assert not torch.equal(info_fresh["block_mask"], info["block_mask"])
    # reuse gives bit-identical results when the cache did not change
    out_again, info_again = _lf(q, k, v, rectify=True, pooled=past)
    assert torch.equal(out_again, out) and torch.equal(info_again["block_mask"], info["block_mask"])


def test_pooled_statistics_extend_to_the_next_chunk():
    # frames of 40 tokens, blocks of 16: the past of chunk c ends inside a block; its cached
    # statistics, extended with chunk c, serve chunk c + 1 like a fresh pooling
    q, k = structured_qk(2, 1, 3, 10, 40, 32, seed=6)
    v = torch.randn_like(k)
    first = 7 * 40
    _, info_c = _lf(
        k[:, :, first : first + 3 * 40], k[:, :, : first + 3 * 40], v[:, :, : first + 3 * 40], rectify=True
    )
    out_cached, info_cached = _lf(q, k, v, rectify=True, pooled=info_c["past"])
    out_fresh, info_fresh = _lf(q, k, v, rectify=True)
    assert torch.equal(info_cached["block_mask"], info_fresh["block_mask"])
    assert torch.equal(info_cached["compensated"], info_fresh["compensated"])
    assert rel_rmse(out_cached, out_fresh) < 1e-6
    for name in ("block_keys", "frame_keys", "block_values", "block_key_deviation"):
        assert torch.allclose(
            getattr(info_cached["past"], name), getattr(info_fresh["past"], name), atol=1e-6
        )
