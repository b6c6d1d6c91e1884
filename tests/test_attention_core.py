"""The attention core: dense reference, block utilities, block_sparse_attention on every CPU backend."""

from __future__ import annotations

import logging

import pytest
import torch

from fastgen.attention import backends as backends_mod
from fastgen.attention import (
    block_mask_to_indices,
    block_sparse_attention,
    block_token_counts,
    default_tile,
    dense_attention,
    inverse_permutation,
    keep_count,
    pool_blocks,
    select_cumulative_mass,
    select_topk_blocks,
    tile_permutation,
)
from tests.helpers import masked_reference, rel_rmse, token_mask_from_blocks

CPU_BACKENDS = ["torch", "gather", "flex"]


def qkv(b, h, nq, nk, d, dtype=torch.float32):
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
        torch.randn(b, h, nk, d, dtype=dtype),
    )


# ---------------------------------------------------------------- dense reference


def test_dense_matches_sdpa_and_lse():
    q, k, v = qkv(2, 3, 37, 53, 32)
    out, lse = dense_attention(q, k, v, return_lse=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_rmse(out, expected) < 1e-5
    s = (q @ k.transpose(-1, -2)) / 32**0.5
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)


def test_dense_key_padding_mask_ignores_padded_keys():
    q, k, v = qkv(2, 2, 20, 30, 16)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, 25:] = False
    out = dense_attention(q, k, v, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 25:] = 1e3  # garbage in padded keys must not matter
    v2[1, :, 25:] = 1e3
    assert torch.allclose(out, dense_attention(q, k2, v2, key_padding_mask=kpm), atol=1e-6)
    alone = dense_attention(q[1:], k[1:, :, :25], v[1:, :, :25])
    assert torch.allclose(out[1:], alone, atol=1e-6)


# ---------------------------------------------------------------- block utilities


def test_pool_blocks_partial_last_block_and_padding():
    x = torch.randn(2, 3, 100, 8)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, 90:] = False
    pooled, counts = pool_blocks(x, 32, valid)
    assert pooled.shape == (2, 3, 4, 8)
    assert counts[0].tolist() == [32, 32, 32, 4]
    assert counts[1].tolist() == [32, 32, 26, 0]
    assert torch.allclose(pooled[0, :, 3], x[0, :, 96:].mean(1), atol=1e-6)
    assert torch.allclose(pooled[1, :, 2], x[1, :, 64:90].mean(1), atol=1e-6)
    assert torch.all(pooled[1, :, 3] == 0)
    assert block_token_counts(100, 32).tolist() == [32, 32, 32, 4]


def test_keep_count_and_topk():
    assert keep_count(0.0, 10) == 10
    assert keep_count(0.85, 110) == 17
    assert keep_count(0.999, 10) == 1
    scores = torch.tensor([[[0.1, 0.5, 0.2, 0.9]]])
    assert select_topk_blocks(scores, 2).tolist() == [[[False, True, False, True]]]
    valid = torch.tensor([True, False, True, True])
    assert select_topk_blocks(scores, 2, valid).tolist() == [[[False, False, True, True]]]


def test_cumulative_mass_selects_fewest_blocks():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert select_cumulative_mass(probs, 0.7).tolist() == [[True, True, False, False]]
    assert select_cumulative_mass(probs, 0.8).tolist() == [[True, True, False, False]]
    assert select_cumulative_mass(probs, 0.81).tolist() == [[True, True, True, False]]
    assert select_cumulative_mass(probs, 0.1).tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match="threshold"):
        select_cumulative_mass(probs, 0.0)


@pytest.mark.parametrize("grid", [(3, 10, 13), (1, 8, 8), (5, 7, 9)])
def test_tile_permutation_is_exact_and_compact(grid):
    t, h, w = grid
    tile = default_tile(128)
    assert tile == (2, 8, 8)
    perm = tile_permutation(grid, tile)
    assert sorted(perm.tolist()) == list(range(t * h * w))
    x = torch.randn(1, 2, t * h * w, 4)
    assert torch.equal(x[:, :, perm][:, :, inverse_permutation(perm)], x)
    # the first tile holds the top-left-front corner tokens
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    first = coords.view(-1, 3)[perm[: min(tile[0], t) * min(tile[1], h) * min(tile[2], w)]]
    assert first[:, 0].max() < tile[0] and first[:, 1].max() < tile[1] and first[:, 2].max() < tile[2]


def test_default_tile_sizes():
    for bs in (16, 32, 64, 128, 256):
        tf, th, tw = default_tile(bs)
        assert tf * th * tw == bs
    assert default_tile(64) == (1, 8, 8)


def test_block_mask_to_indices():
    m = torch.tensor([[[[False, True, False, True], [False, False, False, False]]]])
    idx, cnt = block_mask_to_indices(m)
    assert cnt.tolist() == [[[2, 0]]]
    assert idx[0, 0, 0, :2].tolist() == [1, 3]


# ---------------------------------------------------------------- block_sparse_attention


def random_block_mask(b, h, nqb, nkb, p=0.5, empty_row=True):
    m = torch.rand(b, h, nqb, nkb) < p
    m[..., 0] |= ~m.any(-1)  # mostly non-empty rows
    if empty_row:
        m[0, 0, min(1, nqb - 1)] = False
    return m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "b,h,nq,nk,d,bs",
    [(1, 1, 64, 64, 16, 16), (2, 3, 100, 100, 32, 32), (2, 2, 77, 130, 64, 32), (1, 2, 150, 90, 128, 64)],
)
def test_block_sparse_matches_reference_fp32(cpu_engine, backend, b, h, nq, nk, d, bs):
    q, k, v = qkv(b, h, nq, nk, d)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    m = random_block_mask(b, h, nqb, nkb)
    out, lse = block_sparse_attention(q, k, v, m, bs, return_lse=True, backend=backend)
    ref, ref_lse = masked_reference(q, k, v, token_mask_from_blocks(m, nq, nk, bs))
    assert rel_rmse(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4)
    empty = ~finite
    assert torch.all(lse[empty] == float("-inf")) and torch.all(
        out.transpose(2, 3)[..., :][empty[:, :, None, :].expand(-1, -1, d, -1)] == 0
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_mask_equals_dense(cpu_engine, backend):
    q, k, v = qkv(2, 2, 100, 100, 32)
    m = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    assert rel_rmse(block_sparse_attention(q, k, v, m, 32, backend=backend), dense_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "gather"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_sparse_low_precision(backend, dtype):
    q, k, v = qkv(2, 2, 96, 96, 64, dtype=dtype)
    m = random_block_mask(2, 2, 3, 3, empty_row=False)
    out = block_sparse_attention(q, k, v, m, 32, backend=backend)
    assert out.dtype == dtype
    ref, _ = masked_reference(q.float(), k.float(), v.float(), token_mask_from_blocks(m, 96, 96, 32))
    assert rel_rmse(out, ref) < 1e-2


def test_block_mask_broadcasts_over_batch():
    q, k, v = qkv(2, 2, 64, 64, 16)
    m = random_block_mask(1, 2, 4, 4, empty_row=False)
    out = block_sparse_attention(q, k, v, m, 16, backend="gather")
    ref = block_sparse_attention(q, k, v, m.expand(2, -1, -1, -1), 16, backend="torch")
    assert rel_rmse(out, ref) < 1e-5


def test_unavailable_backend_falls_back_with_a_log_line(caplog, monkeypatch):
    # CPU tensors outside the Triton interpreter: the triton engine cannot serve the call, on any
    # machine (with or without CUDA), so the request falls back to the CPU engine and says why
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(1, 1, 40, 40, 16)
    m = torch.tensor([[[[True, False, True], [False, True, False], [True, True, True]]]])
    assert backends_mod.resolve_backend("triton", q.device, dtype=q.dtype, head_dim=16) == "gather"
    with caplog.at_level(logging.WARNING, logger="fastgen.attention.backends"):
        out = block_sparse_attention(q, k, v, m, 16, backend="triton")
        block_sparse_attention(q, k, v, m, 16, backend="triton")
    lines = [
        r.message for r in caplog.records if "attention backend 'triton' cannot serve this call" in r.message
    ]
    assert len(lines) == 1, caplog.text  # logged once, not per call
    assert "using 'gather'" in lines[0]
    assert "CUDA" in lines[0] or "not installed" in lines[0]  # the reason is named
    ref, _ = masked_reference(q, k, v, token_mask_from_blocks(m, 40, 40, 16))
    assert rel_rmse(out, ref) < 1e-5


def test_native_cpu_kernel_build_failure_falls_back_with_a_log_line(monkeypatch, caplog, tmp_path):
    from fastgen.kernels import cpu_attn

    monkeypatch.setattr(cpu_attn, "_SOURCE", tmp_path / "missing.cpp")
    cpu_attn._build.cache_clear()
    try:
        assert "missing" in cpu_attn.cpu_kernel_unavailable()
        q, k, v = qkv(2, 2, 70, 70, 16)
        m = random_block_mask(2, 2, 5, 5, empty_row=False)
        with caplog.at_level(logging.WARNING, logger="fastgen.attention.backends"):
            out = block_sparse_attention(q, k, v, m, 16, backend="gather")
        assert any("native CPU block-sparse kernel unavailable" in r.message for r in caplog.records)
        ref, _ = masked_reference(q, k, v, token_mask_from_blocks(m, 70, 70, 16))
        assert rel_rmse(out, ref) < 1e-5
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_attn.block_sparse_attention_cpu(
                q[0], k[0], v[0], m.new_zeros(2, 1).long(), m.new_ones(2).long(), 1.0
            )
    finally:
        cpu_attn._build.cache_clear()  # the next call loads the real library again


def _interpret():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m, 32), "q must have shape"),
        (lambda q, k, v, m: (q, k.double(), v, m, 32), "k.dtype"),
        (lambda q, k, v, m: (q, k, v[:, :, :10], m, 32), "k and v must have the same shape"),
        (lambda q, k, v, m: (q, k[:, :1], v[:, :1], m, 32), "must agree in batch, heads"),
        (lambda q, k, v, m: (q, k.half(), v.half(), m, 32), "share one dtype"),
        (lambda q, k, v, m: (q, k, v, m.float(), 32), "block_mask must be a bool"),
        (lambda q, k, v, m: (q, k, v, m[..., :1], 32), "block_mask has shape"),
        (lambda q, k, v, m: (q, k, v, m, 48), "block_size=48"),
        (lambda q, k, v, m: (q, k, v, m, 8), "block_size=8"),
        (lambda q, k, v, m: (q[:, :, :0], k, v, m, 32), "empty sequence"),
    ],
)
def test_bad_input_names_the_parameter(mutate, match):
    q, k, v = qkv(1, 2, 64, 64, 16)
    m = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*mutate(q, k, v, m))


def test_bad_backend_and_padding_mask():
    q, k, v = qkv(1, 1, 32, 32, 16)
    with pytest.raises(ValueError, match="backend='nope'"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, backend="nope")
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        dense_attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(1.0, 4)


# ---------------------------------------------------------------- gather: extra keys, padded k/v, scatter


def _extra_reference(q, k, v, m, bs, kv_length, extra_k, extra_v, extra_bias):
    """Dense fp32 softmax over the selected keys (before ``kv_length``) plus the extra keys with bias."""
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    token_mask = token_mask_from_blocks(m, nq, nk, bs).clone()
    token_mask[..., kv_length:] = False
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    p_extra = extra_bias.shape[-1]
    e = (q.float() @ extra_k[:, :, :p_extra].float().transpose(-1, -2)) * scale
    e = e + extra_bias.repeat_interleave(bs, dim=2)[:, :, :nq]
    s = torch.cat([s, e], dim=-1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(-1e30))
    out = p @ torch.cat([v.float(), extra_v[:, :, :p_extra].float()], dim=2)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b,h,n,kv_length,d,bs,p_extra", [(1, 2, 64, 50, 16, 16, 7), (2, 3, 96, 96, 32, 32, 40)]
)
def test_gather_extra_keys_and_padded_kv(cpu_engine, dtype, b, h, n, kv_length, d, bs, p_extra):
    from fastgen.attention.gather import extended_key_buffer, gather_block_sparse_attention

    q, k, v = qkv(b, h, n, n, d, dtype=dtype)
    nb = n // bs
    m = random_block_mask(b, h, nb, nb, empty_row=True)
    extra_bias = torch.randn(b, h, nb, p_extra)
    extra_bias[..., ::3] = float("-inf")
    extra_bias[0, 0, 1] = float("-inf")  # with the empty row above: a query block with no key at all
    # joined buffer (no copy) and separate tensors (copied) must agree
    (kj, ek), (vj, ev) = (extended_key_buffer(b, h, n, p_extra, d, bs, dtype, q.device) for _ in range(2))
    kj.copy_(k), vj.copy_(v)
    ek.normal_(), ev.normal_()
    ref, ref_lse = _extra_reference(q, k, v, m, bs, kv_length, ek, ev, extra_bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for keys, values, ek_, ev_ in [
        (kj, vj, ek, ev),
        (k, v, ek[:, :, :p_extra].clone(), ev[:, :, :p_extra].clone()),
    ]:
        out, lse = gather_block_sparse_attention(
            q,
            keys,
            values,
            m,
            bs,
            d**-0.5,
            kv_length=kv_length,
            extra_k=ek_,
            extra_v=ev_,
            extra_bias=extra_bias,
        )
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_rmse(out, ref) < tol
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4 if dtype == torch.float32 else 5e-2)
        assert torch.all(out[0, 0, bs : 2 * bs] == 0)


def test_gather_scatter_out_writes_rows_in_place(cpu_engine):
    from fastgen.attention.gather import gather_block_sparse_attention

    b, h, n, d, bs = 2, 2, 80, 16, 32  # partial last query block: its padding rows go to a sink row
    q, k, v = qkv(b, h, n, n, d)
    m = random_block_mask(b, h, 3, 3)
    perm = torch.randperm(n)
    padded = torch.cat([perm, perm.new_zeros(3 * bs - n)])  # permuted, padded to whole blocks
    qp, kp, vp = q[:, :, padded], k[:, :, padded], v[:, :, padded]
    dest = torch.full((b * h * n + 1, d), float("nan"))
    rows = torch.arange(b * h)[:, None] * n + padded[None, :]
    rows[:, n:] = b * h * n
    out, lse = gather_block_sparse_attention(
        qp, kp, vp, m, bs, d**-0.5, kv_length=n, scatter_out=(dest, rows.view(-1))
    )
    assert lse is None and out is dest
    expected = block_sparse_attention(qp[:, :, :n], kp[:, :, :n], vp[:, :, :n], m, bs, backend="torch")
    assert rel_rmse(dest[:-1].view(b, h, n, d)[:, :, perm], expected) < 1e-5


def test_gather_with_gradients_uses_the_reference_with_a_log_line(caplog):
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 70, 70, 16))
    m = random_block_mask(1, 2, 5, 5, empty_row=False)
    with caplog.at_level(logging.WARNING, logger="fastgen.attention.backends"):
        out = block_sparse_attention(q, k, v, m, 16, backend="gather")
    assert any("forward-only" in r.message for r in caplog.records)
    out.sum().backward()
    ref_q = q.detach().clone().requires_grad_()
    ref, _ = masked_reference(ref_q, k.detach(), v.detach(), token_mask_from_blocks(m, 70, 70, 16))
    ref.sum().backward()
    assert q.grad is not None and rel_rmse(q.grad, ref_q.grad) < 1e-4
