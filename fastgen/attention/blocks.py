"""Block utilities shared by the sparse methods: pooling, token counts, block selection, 3D tiling.

Tokens are grouped in consecutive blocks of ``block_size``; the last block may be partial. Padded
tokens (``key_padding_mask`` False) are excluded from pooled means and counts.
"""

from __future__ import annotations

import math

import torch

from fastgen.kernels import block_mask_to_indices  # noqa: F401 - plain torch, shared with the kernels

from ._checks import check_block_size, check_sparsity


def num_blocks(n: int, block_size: int) -> int:
    """Number of blocks covering ``n`` tokens (the last one may be partial)."""
    return -(-n // block_size)


def pad_to_blocks(x: torch.Tensor, block_size: int, dim: int = 2) -> torch.Tensor:
    """``x`` zero-padded along ``dim`` to a multiple of ``block_size`` (``x`` itself when it already is)."""
    pad = num_blocks(x.shape[dim], block_size) * block_size - x.shape[dim]
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def block_token_counts(
    n: int, block_size: int, valid_mask: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Valid tokens per block.

    Returns ``[nb]`` (float32) without a mask, ``[B, nb]`` with a bool ``valid_mask`` ``[B, n]``.

    Example:
        >>> import torch
        >>> from fastgen.attention import block_token_counts
        >>> block_token_counts(300, 128)
        tensor([128., 128.,  44.])
        >>> block_token_counts(300, 128, torch.arange(300)[None] < 250)  # 50 padded tokens at the end
        tensor([[128., 122.,   0.]])
    """
    check_block_size(block_size)
    if valid_mask is None:
        counts = torch.full((num_blocks(n, block_size),), float(block_size), device=device)
        counts[-1] = n - (counts.numel() - 1) * block_size
        return counts
    padded = pad_to_blocks(valid_mask.float(), block_size, dim=1)
    return padded.view(valid_mask.shape[0], -1, block_size).sum(-1)


def pool_blocks(
    x: torch.Tensor, block_size: int, valid_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block of tokens, padding excluded.

    Args:
        x: ``[B, H, N, D]``.
        valid_mask: optional bool ``[B, N]`` (True = real token).

    Returns:
        ``pooled`` ``[B, H, nb, D]`` in fp32 (blocks with no valid token pool to 0) and ``counts``
        ``[B, nb]`` fp32 (valid tokens per block).

    Example:
        >>> import torch
        >>> from fastgen.attention import pool_blocks
        >>> x = torch.ones(1, 1, 20, 4)
        >>> x[:, :, 16:] = 3.0  # the second block (4 tokens) holds 3s
        >>> pooled, counts = pool_blocks(x, 16)
        >>> pooled[0, 0, :, 0].tolist(), counts.tolist()
        ([1.0, 3.0], [[16.0, 4.0]])
    """
    check_block_size(block_size)
    b, h, n, d = x.shape
    xf = x.float()
    if valid_mask is None:
        counts = block_token_counts(n, block_size, device=x.device).expand(b, -1)
    else:
        xf = xf * valid_mask[:, None, :, None]
        counts = block_token_counts(n, block_size, valid_mask)
    sums = pad_to_blocks(xf, block_size, dim=2).view(b, h, -1, block_size, d).sum(3)
    pooled = sums / counts.clamp_min(1.0)[:, None, :, None]
    return pooled, counts


def pool_abs_deviation(
    x: torch.Tensor, pooled: torch.Tensor, block_size: int, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block mean of ``|x_i - mean|`` (a d-vector per block), padding excluded: ``[B, H, nb, D]`` fp32."""
    b, h, n, d = x.shape
    nb = pooled.shape[2]
    centred = (x.float().view(b, h, n, d) - pooled.repeat_interleave(block_size, dim=2)[:, :, :n]).abs()
    if valid_mask is None:
        counts = block_token_counts(n, block_size, device=x.device).expand(b, -1)
    else:
        centred = centred * valid_mask[:, None, :, None]
        counts = block_token_counts(n, block_size, valid_mask)
    sums = pad_to_blocks(centred, block_size, dim=2).view(b, h, nb, block_size, d).sum(3)
    return sums / counts.clamp_min(1.0)[:, None, :, None]


def keep_count(sparsity: float, n_blocks: int) -> int:
    """Number of key blocks kept per query block for a given sparsity (at least one).

    Example:
        >>> from fastgen.attention import keep_count
        >>> keep_count(0.8, 10), keep_count(0.85, 10), keep_count(0.99, 10)
        (2, 2, 1)
    """
    check_sparsity(sparsity)
    return max(1, min(n_blocks, math.ceil((1.0 - float(sparsity)) * n_blocks - 1e-9)))


def select_topk_blocks(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` highest-scoring key blocks per query block.

    Args:
        scores: ``[..., nq, nk]`` block scores (higher = more important).
        k: blocks kept per row (clamped to ``[1, nk]``).
        valid: optional bool broadcastable to ``scores``; invalid blocks are never selected.

    Example:
        >>> import torch
        >>> from fastgen.attention import select_topk_blocks
        >>> select_topk_blocks(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), k=2)
        tensor([[False,  True,  True, False]])
    """
    nk = scores.shape[-1]
    k = max(1, min(int(k), nk))
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    idx = s.topk(k, dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    if valid is not None:
        mask &= valid
    return mask


def select_cumulative_mass(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the fewest key blocks per row whose probability mass reaches ``threshold``.

    ``probs`` ``[..., nq, nk]`` are non-negative and sum to at most 1 per row. At least one block is kept.

    Example:
        >>> import torch
        >>> from fastgen.attention import select_cumulative_mass
        >>> select_cumulative_mass(torch.tensor([[0.5, 0.1, 0.3, 0.1]]), threshold=0.7)  # 0.5 + 0.3
        tensor([[ True, False,  True, False]])
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} is out of range; allowed: 0 < threshold <= 1")
    sorted_p, order = probs.float().sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the blocks ranked strictly higher
    keep_sorted = before < threshold
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def default_tile(block_size: int) -> tuple[int, int, int]:
    """A compact (frames, height, width) tile holding ``block_size`` tokens, e.g. 128 -> (2, 8, 8).

    Example:
        >>> from fastgen.attention import default_tile
        >>> default_tile(128), default_tile(64)
        ((2, 8, 8), (1, 8, 8))
    """
    check_block_size(block_size)
    e = block_size.bit_length() - 1
    ew = min(3, -(-e // 2))
    eh = min(3, e - ew)
    return 1 << (e - ew - eh), 1 << eh, 1 << ew


def tile_permutation(
    grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Permutation that lists raster-order (t, h, w) tokens tile by tile, ``perm[new] = old``.

    Tiles at the grid's far edges may be partial; the result is always a permutation of
    ``range(t*h*w)``. Use ``x[..., perm, :]`` to reorder and :func:`inverse_permutation` to undo.

    Example:
        >>> from fastgen.attention import tile_permutation
        >>> tile_permutation((1, 4, 4), (1, 2, 2)).tolist()  # a 4 x 4 frame in 2 x 2 tiles
        [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    """
    t, h, w = grid
    tf, th, tw = tile
    if min(t, h, w) < 1 or min(tf, th, tw) < 1:
        raise ValueError(f"grid={grid} and tile={tile} must be positive")
    idx = torch.arange(t * h * w, device=device).view(t, h, w)
    ti = torch.arange(t, device=device) // tf
    hi = torch.arange(h, device=device) // th
    wi = torch.arange(w, device=device) // tw
    # sort key: (tile_t, tile_h, tile_w, t, h, w) -> lexicographic via a stable multi-key sort
    key = ((ti[:, None, None] * (h // th + 1) + hi[None, :, None]) * (w // tw + 1) + wi[None, None, :]) * (
        t * h * w
    ) + idx
    return key.flatten().argsort()


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a permutation: ``x[perm][inverse_permutation(perm)] == x``.

    Example:
        >>> import torch
        >>> from fastgen.attention import inverse_permutation
        >>> perm = torch.tensor([2, 0, 1])
        >>> inverse_permutation(perm)
        tensor([1, 2, 0])
        >>> torch.tensor([10, 20, 30])[perm][inverse_permutation(perm)]
        tensor([10, 20, 30])
    """
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def tables_to_mask(indices: torch.Tensor, counts: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Bool block mask ``[..., nqb, nkb]`` from an index table ``[..., nqb, width]`` and its counts
    ``[..., nqb]`` (unused slots scatter into a sink column that is cut off)."""
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    target = torch.where(used, indices.long(), num_key_blocks)
    mask = torch.zeros(*indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, target, True)[..., :-1]


def gapr_compensated(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    query_deviation: torch.Tensor,
    key_deviation: torch.Tensor,
    dropped: torch.Tensor,
) -> torch.Tensor:
    """GAPR (Rectified SpaAttn; Light Forcing reuses it): the ``dropped`` blocks whose pooled-logit gain
    ``|q̄·k̄|`` beats the pooling error ``|a·k̄| + |q̄·b|`` (``a``, ``b``: the blocks' mean absolute
    deviations from their pooled query / key). Pooled tensors ``[B, H, nqb | nkb, D]``; bool like ``dropped``
    ``[B, H, nqb, nkb]``."""
    k_bar = pooled_k.transpose(-1, -2)
    gain = torch.matmul(pooled_q, k_bar).abs()
    error = torch.matmul(query_deviation, k_bar).abs()
    error = error + torch.matmul(pooled_q, key_deviation.transpose(-1, -2)).abs()
    return dropped & ((gain > error) | (error <= 0))
