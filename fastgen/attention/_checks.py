"""Argument checks shared by the attention ops: every error names the parameter, the value and what is allowed."""

from __future__ import annotations

import torch

from fastgen._validation import check_block_size as _check_block_size
from fastgen._validation import check_number

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate q/k/v in SDPA layout ``[B, H, N, D]`` (q may have a different length than k/v)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; allowed: float16, bfloat16, float32")
        if t.shape[2] == 0:
            raise ValueError(f"{name} has an empty sequence (tokens=0); at least one token is required")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim "
            "(only the token count may differ)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_block_size(block_size: int) -> None:
    """block_size must be a power of two >= 16."""
    _check_block_size("block_size", block_size)


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    """Sparsity is the fraction of key blocks dropped: [0, 1)."""
    check_number(name, sparsity, 0.0, 1.0, high_open=True)


def check_key_padding_mask(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> None:
    """A key padding mask is bool ``[B, Nk]``, True where the key is a real token."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor [batch, kv_tokens] (True = keep), got "
            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}"
        )
    expected = (k.shape[0], k.shape[2])
    if tuple(key_padding_mask.shape) != expected:
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected {expected}")
    if key_padding_mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but k is on {k.device}")


def check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """A block mask is bool ``[B, H, ceil(Nq/block), ceil(Nk/block)]``."""
    nqb = -(-q.shape[2] // block_size)
    nkb = -(-k.shape[2] // block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be a bool tensor, got {getattr(block_mask, 'dtype', type(block_mask).__name__)}"
        )
    expected = (q.shape[0], q.shape[1], nqb, nkb)
    if block_mask.dim() != 4 or tuple(block_mask.shape) not in (expected, (1, q.shape[1], nqb, nkb)):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; expected {expected} "
            f"([batch, heads, ceil(Nq/{block_size}), ceil(Nk/{block_size})])"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")
