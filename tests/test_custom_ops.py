"""The kernels as ``torch.library`` custom ops (``torch.ops.fastgen.*``): schema, fake (meta)
implementation and eager kernel agree (``torch.library.opcheck``), and the public wrappers go
through the ops. The Triton ops run under ``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import fastgen.kernels  # noqa: F401 - registers the ops
from fastgen.attention.blocks import block_mask_to_indices

# opcheck's test_aot_dispatch_* need autograd formulas; the ops are forward-only (the backends never
# route inputs that need grad to them), so the schema / fake / faketensor checks are the ones run.
_CHECKS = ("test_schema", "test_faketensor")


def _plan(b, h, nq, nk, bs, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < density
    mask[..., 0] = True
    return block_mask_to_indices(mask)


def _triton_or_skip():
    from fastgen.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")


def test_block_sparse_triton_op():
    _triton_or_skip()
    q, k, v = (torch.randn(2, 2, 40, 32) for _ in range(3))
    idx, counts = _plan(2, 2, 40, 40, 16)
    torch.library.opcheck(
        torch.ops.fastgen.block_sparse_attention_triton, (q, k, v, idx, counts, 16, 0.2), test_utils=_CHECKS
    )


def test_rectified_triton_op():
    _triton_or_skip()
    b, h, n, d, bs = 1, 2, 40, 16, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    idx, counts = _plan(b, h, n, n, bs)
    nkb = counts.shape[-1]
    pooled_k, pooled_v = torch.randn(b, h, nkb, d), torch.randn(b, h, nkb, d)
    pidx, pcounts = _plan(b, h, n, n, bs, seed=1)
    log_counts = torch.log(torch.full((b, nkb), float(bs)))
    text_k, text_v = torch.randn(b, h, 5, d), torch.randn(b, h, 5, d)
    args = (
        q,
        k,
        v,
        idx,
        counts,
        pooled_k,
        pooled_v,
        pidx,
        pcounts,
        log_counts,
        bs,
        0.25,
        text_k,
        text_v,
        None,
    )
    torch.library.opcheck(torch.ops.fastgen.rectified_exact_attention_triton, args, test_utils=_CHECKS)


@pytest.mark.parametrize("need_lse", [True, False])
def test_block_sparse_cpu_op(need_lse):
    from fastgen.kernels.cpu_attn import cpu_kernel_unavailable

    why = cpu_kernel_unavailable()
    assert why is None, f"the native CPU kernel must build on the test machine: {why}"
    q, k, v = (torch.randn(6, 16, 32) for _ in range(3))  # 6 query / key blocks of 16
    idx = torch.tensor([[0, 2], [1, 0], [2, 3], [5, 4], [4, 0], [3, 1]], dtype=torch.int32)
    counts = torch.tensor([2, 1, 2, 2, 1, 2], dtype=torch.int32)
    args = (q, k, v, idx, counts, 16, None, None, 0.2, need_lse, None, None, None)
    torch.library.opcheck(torch.ops.fastgen.block_sparse_cpu, args, test_utils=_CHECKS)
    out, lse = torch.ops.fastgen.block_sparse_cpu(*args)
    assert lse.shape == ((6, 16) if need_lse else (0,))
    # against plain PyTorch: query block r attends to its counts[r] listed key blocks
    for r in range(6):
        keys = torch.cat([k[int(j)] for j in idx[r, : counts[r]]])
        values = torch.cat([v[int(j)] for j in idx[r, : counts[r]]])
        expected = torch.softmax(q[r] @ keys.T * 0.2, -1) @ values
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-5)


def test_block_mass_cpu_op():
    from fastgen.kernels.cpu_attn import block_mass_cpu

    b, h, nqb, nkb, bs, d = 1, 2, 3, 3, 16, 32
    q = torch.randn(b * h * nqb, bs, d)
    k = torch.randn(b * h * nkb, bs, d)
    args = (q, k, nqb, nkb, b * h * nqb, None, None, 0.2)
    torch.library.opcheck(torch.ops.fastgen.block_mass_cpu, args, test_utils=_CHECKS)
    mass = block_mass_cpu(q, k, nqb, nkb, 0.2)
    probs = torch.softmax(q.view(b * h, nqb * bs, d) @ k.view(b * h, nkb * bs, d).transpose(1, 2) * 0.2, -1)
    expected = probs.view(b * h, nqb, bs, nkb, bs).sum((2, 4)).reshape(-1, nkb)
    torch.testing.assert_close(mass, expected, rtol=1e-4, atol=1e-4)
