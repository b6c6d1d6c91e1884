"""Block-sparse attention: each query block attends only to the key blocks its mask selects."""

from __future__ import annotations

import torch

from ._checks import check_block_mask, check_block_size, check_qkv
from .execute import execute_plan
from .plan import SelectionPlan


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int = 128,
    return_lse: bool = False,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to selected (query block, key block) tiles.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``; the last block may be partial.
        block_mask: bool ``[B, H, ceil(Nq/block_size), ceil(Nk/block_size)]`` (batch may be 1 to
            broadcast), True where the query block attends to the key block.
        block_size: tokens per block, a power of two >= 16.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Nq]`` (fp32).
        scale: softmax scale (default ``1/sqrt(D)``).
        backend: ``"triton"``, ``"flex"``, ``"gather"``, ``"torch"`` or None/``"auto"``.

    Returns:
        ``out`` ``[B, H, Nq, D]`` in q's dtype (and ``lse``). Query blocks with nothing selected give 0.

    Example:
        >>> import torch
        >>> from fastgen.attention import block_sparse_attention, dense_attention
        >>> q = k = v = torch.randn(1, 2, 300, 64)  # 3 blocks of 128, the last one partial
        >>> mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
        >>> out = block_sparse_attention(q, k, v, mask, block_size=128)  # every tile: dense attention
        >>> torch.allclose(out, dense_attention(q, k, v), atol=1e-5)
        True
        >>> diagonal = torch.eye(3, dtype=torch.bool).expand(1, 2, 3, 3)  # each block sees itself only
        >>> out = block_sparse_attention(q, k, v, diagonal, block_size=128)
        >>> first = slice(0, 128)
        >>> torch.allclose(out[:, :, first], dense_attention(q[:, :, first], k[:, :, first], v[:, :, first]), atol=1e-5)
        True
    """
    check_qkv(q, k, v)
    check_block_size(block_size)
    check_block_mask(block_mask, q, k, block_size)
    plan = SelectionPlan.from_block_mask(block_mask, block_size, q.shape[2], k.shape[2], batch=q.shape[0])
    return execute_plan(q, k, v, plan, backend=backend, scale=scale, return_lse=return_lse)
