"""Plain helpers for tests (importable as ``tests.helpers`` or ``helpers``)."""

from __future__ import annotations

import torch


def rel_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``rmse(actual - expected) / rmse(expected)`` in fp64 (the plain rmse when expected is all 0)."""
    a, e = actual.double(), expected.double()
    denom = e.pow(2).mean().sqrt().item()
    num = (a - e).pow(2).mean().sqrt().item()
    return num / denom if denom > 0 else num


def token_mask_from_blocks(block_mask: torch.Tensor, nq: int, nk: int, block_size: int) -> torch.Tensor:
    """Expand a block mask ``[B, H, nqb, nkb]`` to a token mask ``[B, H, nq, nk]``."""
    m = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return m[..., :nq, :nk]


def masked_reference(q, k, v, token_mask, scale=None):
    """Dense fp32 attention with a boolean token mask; rows with no key give 0 and lse -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(-1e30))
    return (p @ v.float()).to(q.dtype), lse
