"""SparseD (sparse attention for diffusion language models): head-specific block patterns.

SparseD runs the first denoising steps densely; at the last dense step it measures, per layer, head
and batch row, how much attention each (query block, key block) tile receives, keeps the most
important key blocks per query block, and reuses that fixed pattern for every later step.

This module is model-agnostic and works on SDPA-layout tensors ``[B, H, N, D]``:

- :func:`sparsed_block_importance` - mean attention probability per tile, streamed over query
  blocks so no ``N x N`` map is ever held.
- :func:`sparsed_select` - top ``select`` fraction of key blocks per query block, with separate
  budgets for prompt keys and generated-region keys.
- :func:`compute_sparsed_pattern` - both of the above, returning a :class:`SparseDPattern`.
- :func:`sparsed_attention` - block-sparse attention under a pattern that honours a key padding
  mask exactly (partially padded key blocks are handled by an LSE merge).
- :func:`save_patterns` / :func:`load_patterns` - patterns to and from safetensors, for inspection.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch

from fastgen._validation import check_int, check_int_in, check_number

from ._checks import check_block_mask, check_block_size, check_key_padding_mask, check_qkv
from .backends import default_scale
from .blocks import block_token_counts, num_blocks, pad_to_blocks
from .execute import execute_plan
from .gather import native_kernel_serves
from .plan import SelectionPlan

# score elements one streamed chunk may span (query rows x keys x batch x heads)
_STREAM_ELEMENTS = 64 << 20


@dataclass
class SparseDPattern:
    """A fixed SparseD block pattern of one attention layer."""

    block_mask: torch.Tensor
    """bool ``[B, H, nqb, nkb]``: True where the query block attends to the key block."""
    block_size: int
    """Tokens per block."""
    num_tokens: int
    """Sequence length the pattern was computed for (query and key length)."""
    max_blocks: int | None = None
    """An upper bound of the key blocks any query block selects (:func:`selected_blocks_bound`, from the
    config): the index-table width of every later call, so those calls read nothing back from the
    device."""

    @property
    def density(self) -> float:
        """Fraction of all (query block, key block) tiles that are computed."""
        return float(self.block_mask.float().mean().item()) if self.block_mask.numel() else 0.0

    def matches(self, batch: int, heads: int, num_tokens: int) -> bool:
        """Whether the pattern applies to an attention call of this batch, head count and length."""
        b, h = self.block_mask.shape[:2]
        return b == batch and h == heads and self.num_tokens == num_tokens

    def max_blocks_for(self, num_tokens: int) -> int | None:
        """Index-table width of :meth:`for_length` ``(num_tokens)``: :attr:`max_blocks` at the pattern's
        own length; at another length every block, since tiles the pattern never saw run densely."""
        if num_tokens == self.num_tokens:
            return self.max_blocks
        return num_blocks(num_tokens, self.block_size)

    def for_length(self, num_tokens: int) -> torch.Tensor:
        """The block mask ``[B, H, nb, nb]`` for a self-attention over positions ``[0, num_tokens)``.

        Blocks are addressed by position from 0, so a pattern computed on a prefix of another length
        still says which tiles matter where both sequences have the same tokens (Window-Diffusion's
        Dream rules run refresh prefixes whose length grows every phase). A tile keeps the pattern's
        decision when its query block and its key block hold only positions the pattern step saw;
        every other tile (a block that was partial or absent at the pattern step) is computed densely,
        since there is no importance to select it by. ``num_tokens == self.num_tokens``: the pattern.
        """
        check_int("num_tokens", num_tokens, 1)
        if num_tokens == self.num_tokens:
            return self.block_mask
        bs, seen_tokens = self.block_size, self.num_tokens
        nb, nb_seen = num_blocks(num_tokens, bs), num_blocks(seen_tokens, bs)
        device = self.block_mask.device
        ends = torch.clamp((torch.arange(nb, device=device) + 1) * bs, max=num_tokens)
        seen = (torch.arange(nb, device=device) < nb_seen) & (
            (ends <= seen_tokens) | (num_tokens <= seen_tokens)
        )  # [nb]: the block's positions are a subset of the pattern step's block
        b, h = self.block_mask.shape[:2]
        mask = torch.ones(b, h, nb, nb, dtype=torch.bool, device=device)
        keep = min(nb, nb_seen)
        mask[:, :, :keep, :keep] = self.block_mask[:, :, :keep, :keep]
        return mask | ~(seen[:, None] & seen[None, :])


def _check_select(select: float) -> None:
    check_number("select", select, 0.0, 1.0, low_open=True)


def _query_chunk_blocks(batch: int, heads: int, num_keys: int, block_size: int) -> int:
    """Query blocks per streamed chunk so that one chunk of fp32 scores stays within the budget."""
    per_block = max(1, batch * heads * block_size * num_keys)
    return max(1, _STREAM_ELEMENTS // per_block)


def sparsed_block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    query_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention probability per (query block, key block) tile, streamed over query blocks.

    The softmax runs over all valid keys of each query (padded keys get probability 0). For a tile
    ``(I, J)`` the importance is the attention mass of the valid queries of ``I`` on block ``J``
    divided by ``(valid queries in I) * block_size``: for a full tile that is the mean probability
    of the tile; for a partially padded key block it ranks by the mass the block holds.

    The mass of query ``i`` on key block ``J`` is ``sum_j p_ij [j in J]``: attention with a one-hot
    block-indicator matrix as values. It is computed that way, with the fused SDPA kernel, so the
    cost is one attention pass (no ``N x N`` map; query blocks are also processed in chunks).

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``.
        block_size: tokens per block (power of two >= 16); the last block may be partial.
        key_padding_mask: optional bool ``[B, Nk]``, True for real keys.
        scale: softmax scale (default ``1/sqrt(D)``).
        query_padding_mask: optional bool ``[B, Nq]``, True for real queries; padded query rows are
            left out of the means.

    Returns:
        ``[B, H, ceil(Nq/block_size), ceil(Nk/block_size)]`` fp32; tiles with no valid query or key are 0.
    """
    check_qkv(q, k, k)
    check_block_size(block_size)
    check_key_padding_mask(key_padding_mask, k)
    if query_padding_mask is not None:
        check_key_padding_mask(query_padding_mask, q)  # same rules: bool [B, Nq]
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    nq = q.shape[2]
    if native_kernel_serves(q, k):
        mass = _native_block_mass(q, k, block_size, key_padding_mask, query_padding_mask, scale)
    else:
        mass = _indicator_block_mass(q, k, block_size, key_padding_mask, query_padding_mask, scale)
    query_counts = block_token_counts(nq, block_size, query_padding_mask, device=q.device)
    denom = query_counts[None, None, :, None] if query_counts.dim() == 1 else query_counts[:, None, :, None]
    return mass / (denom.clamp_min(1.0) * block_size)


def _native_block_mass(q, k, block_size, key_padding_mask, query_padding_mask, scale) -> torch.Tensor:
    """``[B, H, nqb, nkb]`` attention mass of the valid queries of each block, by the native CPU kernel."""
    from fastgen.kernels.cpu_attn import block_mass_cpu

    b, h, nq, d = q.shape
    nk = k.shape[2]
    nqb, nkb = num_blocks(nq, block_size), num_blocks(nk, block_size)
    key_valid = pad_to_blocks(
        torch.ones(1, nk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu(),
        block_size,
        1,
    )
    key_bias = None
    if key_padding_mask is not None or nk % block_size:  # padded keys, the tail of a partial block
        key_bias = torch.zeros(key_valid.shape).masked_fill_(~key_valid, float("-inf"))
    q_weight = None
    if query_padding_mask is not None or nq % block_size:
        rows = torch.ones(1, nq) if query_padding_mask is None else query_padding_mask.float()
        q_weight = pad_to_blocks(rows, block_size, 1)[:, None, :].expand(b, h, -1).reshape(-1)
    mass = block_mass_cpu(
        pad_to_blocks(q, block_size).reshape(b * h * nqb, block_size, d),
        pad_to_blocks(k, block_size).reshape(b * h * nkb, block_size, d),
        nqb,
        nkb,
        scale,
        key_bias=key_bias,
        q_weight=q_weight,
    )
    return mass.view(b, h, nqb, nkb)


def _indicator_block_mass(q, k, block_size, key_padding_mask, query_padding_mask, scale) -> torch.Tensor:
    """``[B, H, nqb, nkb]`` attention mass of the valid queries of each block, by SDPA with one-hot
    block indicators as values (``D`` key blocks per pass)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    nqb, nkb = num_blocks(nq, block_size), num_blocks(nk, block_size)
    key_bias = None
    if key_padding_mask is not None:
        key_bias = torch.zeros(b, 1, 1, nk, dtype=q.dtype, device=q.device)
        key_bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    key_block = torch.arange(nk, device=q.device) // block_size
    mass = torch.zeros(b, h, nqb * block_size, nkb, dtype=torch.float32, device=q.device)
    chunk = _query_chunk_blocks(b, h, nk, block_size) * block_size
    for first_col in range(0, nkb, d):  # d key blocks per pass: the indicator fills the value width
        width = min(d, nkb - first_col)
        indicator = torch.nn.functional.one_hot((key_block - first_col).clamp(-1, d) + 1, d + 2)[:, 1 : d + 1]
        indicator = indicator.to(q.dtype).expand(b, h, nk, d)  # [B, H, Nk, D]
        for first in range(0, nq, chunk):
            rows = slice(first, min(nq, first + chunk))
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, rows], k, indicator, attn_mask=key_bias, scale=scale
            )  # [B, H, n, D]: mass of each query on `width` key blocks
            mass[:, :, rows, first_col : first_col + width] = out[..., :width].float()
    mass = mass.nan_to_num_(0.0)  # rows without a valid key
    if query_padding_mask is not None:
        mass[:, :, :nq].mul_(query_padding_mask[:, None, :, None])
    return mass.view(b, h, nqb, block_size, nkb).sum(3)


def key_block_validity(key_padding_mask: torch.Tensor | None, num_tokens: int, block_size: int, batch: int):
    """Valid keys per key block ``[B, nkb]`` (fp32) and whether each block has any valid key (bool)."""
    counts = block_token_counts(num_tokens, block_size, key_padding_mask)
    if counts.dim() == 1:
        counts = counts.expand(batch, -1)
    return counts, counts > 0


def prompt_block_mask(
    prompt_end: int | torch.Tensor, num_tokens: int, block_size: int, batch: int, device=None
) -> torch.Tensor:
    """Bool ``[B, nkb]``: True for key blocks that start before ``prompt_end`` (the prompt region).

    ``prompt_end`` is the index of the first generated token in the (padded) sequence, an int for
    every row or a ``[B]`` integer tensor. A block straddling the boundary counts as prompt.
    """
    starts = torch.arange(num_blocks(num_tokens, block_size), device=device) * block_size
    if isinstance(prompt_end, torch.Tensor):
        if prompt_end.dim() != 1 or prompt_end.shape[0] != batch:
            raise ValueError(f"prompt_end has shape {tuple(prompt_end.shape)}; expected ({batch},)")
        return starts[None, :] < prompt_end.to(starts.device)[:, None]
    check_int_in("prompt_end", prompt_end, 0, num_tokens)
    return (starts < prompt_end)[None, :].expand(batch, -1)


def sparsed_select(
    importance: torch.Tensor,
    select: float,
    *,
    key_valid_blocks: torch.Tensor | None = None,
    prompt_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the top ``select`` fraction of key blocks per query block (SparseD's selection).

    Prompt key blocks and generated-region key blocks have separate budgets: each region keeps
    ``ceil(select * its valid blocks)`` blocks (at least one when it has any), ranked by importance.
    Invalid (fully padded) key blocks are never kept.

    Args:
        importance: ``[B, H, nqb, nkb]`` tile scores (higher = more important).
        select: fraction of key blocks kept, in (0, 1]; 1 keeps every valid block.
        key_valid_blocks: optional bool ``[B, nkb]``, False for key blocks with no valid key.
        prompt_blocks: optional bool ``[B, nkb]``, True for prompt blocks; None = one budget for all.

    Returns:
        bool block mask ``[B, H, nqb, nkb]``.
    """
    _check_select(select)
    if importance.dim() != 4:
        raise ValueError(f"importance must be [batch, heads, nqb, nkb], got shape {tuple(importance.shape)}")
    b, _, _, nkb = importance.shape
    valid = (
        torch.ones(b, nkb, dtype=torch.bool, device=importance.device)
        if key_valid_blocks is None
        else key_valid_blocks.to(importance.device, torch.bool)
    )
    for name, mask in (("key_valid_blocks", key_valid_blocks), ("prompt_blocks", prompt_blocks)):
        if mask is not None and tuple(mask.shape) != (b, nkb):
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected ({b}, {nkb})")
    if prompt_blocks is None:
        regions = [valid]
    else:
        prompt = prompt_blocks.to(importance.device, torch.bool)
        regions = [valid & prompt, valid & ~prompt]
    scores = importance.float()
    keep = torch.zeros_like(scores, dtype=torch.bool)
    positions = torch.arange(nkb, device=importance.device).expand_as(scores)
    for region in regions:
        in_region = region[:, None, None, :]  # [B, 1, 1, nkb]
        available = region.sum(-1)  # [B]
        budget = torch.ceil(available.float() * float(select) - 1e-6).clamp_min(1).long()
        budget = torch.where(available > 0, budget, torch.zeros_like(budget))
        order = scores.masked_fill(~in_region, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        keep |= (rank < budget[:, None, None, None]) & in_region
    return keep


def compute_sparsed_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    select: float,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    prompt_end: int | torch.Tensor | None = None,
    scale: float | None = None,
) -> SparseDPattern:
    """Importance and selection in one call: the pattern a layer reuses after the dense warm-up.

    q and k are ``[B, H, N, D]`` of the same length (self-attention); ``key_padding_mask`` bool
    ``[B, N]`` marks real tokens (also used for the queries); ``prompt_end`` splits prompt and
    generated keys for the separate budgets (None = one budget).
    """
    _check_select(select)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"SparseD patterns need self-attention: q has {q.shape[2]} tokens, k has {k.shape[2]}"
        )
    n, b = k.shape[2], k.shape[0]
    importance = sparsed_block_importance(
        q, k, block_size, key_padding_mask, scale, query_padding_mask=key_padding_mask
    )
    _, valid_blocks = key_block_validity(key_padding_mask, n, block_size, b)
    prompt = None
    if prompt_end is not None:
        prompt = prompt_block_mask(prompt_end, n, block_size, b, device=q.device)
    mask = sparsed_select(
        importance, select, key_valid_blocks=valid_blocks.to(q.device), prompt_blocks=prompt
    )
    widest = selected_blocks_bound(select, mask.shape[-1], two_budgets=prompt is not None)
    return SparseDPattern(block_mask=mask, block_size=block_size, num_tokens=n, max_blocks=widest)


def selected_blocks_bound(select: float, num_key_blocks: int, two_budgets: bool) -> int:
    """Most key blocks :func:`sparsed_select` can keep for one query block, from the config alone
    (no read of the mask: no host synchronisation, nothing data-dependent under ``torch.compile``).

    One budget keeps ``ceil(select * valid) <= ceil(select * nkb)`` blocks (at least one); with the
    prompt / generated split, ``ceil(select * p) + ceil(select * g) <= ceil(select * nkb) + 1``.
    """
    _check_select(select)
    one = max(1, math.ceil(num_key_blocks * float(select) - 1e-6))
    return min(num_key_blocks, one + 1 if two_budgets else one)


def sparsed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    max_count: int | None = None,
    padded_keys: bool | None = None,
) -> torch.Tensor:
    """Block-sparse attention under a SparseD pattern, exact with respect to key padding.

    The pattern becomes a :class:`~fastgen.attention.plan.SelectionPlan` (fully padded key blocks
    dropped; padded keys inside a selected block excluded through the plan's ``key_valid``) run by
    :func:`~fastgen.attention.execute.execute_plan` on any engine. With every valid block selected
    this equals dense attention with the key padding mask.

    Args:
        q, k, v: ``[B, H, N, D]`` (q may differ in length from k/v).
        block_mask: bool ``[B or 1, H, ceil(Nq/block_size), ceil(Nk/block_size)]``.
        block_size: tokens per block.
        key_padding_mask: optional bool ``[B, Nk]``, True for real keys.
        scale: softmax scale (default ``1/sqrt(D)``).
        backend: block-sparse backend name (None = automatic).
        max_count: an upper bound of the blocks any query block selects
            (:attr:`SparseDPattern.max_blocks`); None reads it back from the device.
        padded_keys: whether ``key_padding_mask`` pads any key; None reads it from the mask.
            Given both, the call makes no host synchronisation.

    Returns:
        ``[B, H, Nq, D]`` in q's dtype. Query rows whose blocks select no valid key give 0.
    """
    check_qkv(q, k, v)
    check_block_size(block_size)
    check_block_mask(block_mask, q, k, block_size)
    check_key_padding_mask(key_padding_mask, k)
    b, nk = q.shape[0], k.shape[2]
    key_valid = None
    if key_padding_mask is not None and padded_keys is None:
        padded_keys = not bool(key_padding_mask.all())
    if key_padding_mask is not None and padded_keys:
        counts, _ = key_block_validity(key_padding_mask, nk, block_size, b)
        block_mask = block_mask & (counts > 0)[:, None, None, :]  # fully padded blocks: never attended
        key_valid = key_padding_mask
    plan = SelectionPlan.from_block_mask(
        block_mask, block_size, q.shape[2], nk, batch=b, max_count=max_count, key_valid=key_valid
    )
    return execute_plan(q, k, v, plan, backend=backend, scale=scale)


def save_patterns(path: str | os.PathLike, patterns: dict, block_size: int | None = None) -> None:
    """Write per-layer block masks to a safetensors file (atomically), for inspection.

    ``patterns`` maps layer index -> bool block mask ``[B, H, nqb, nkb]`` or :class:`SparseDPattern`.
    Tensors are stored as ``layer.<i>.block_mask``; the block size goes into the metadata.
    """
    from safetensors.torch import save_file

    tensors, metadata = {}, {}
    for layer, pattern in patterns.items():
        if isinstance(pattern, SparseDPattern):
            metadata.setdefault("block_size", str(pattern.block_size))
            pattern = pattern.block_mask
        if not isinstance(pattern, torch.Tensor) or pattern.dtype != torch.bool:
            raise ValueError(f"patterns[{layer!r}] must be a bool tensor or SparseDPattern")
        tensors[f"layer.{int(layer)}.block_mask"] = pattern.detach().cpu().contiguous()
    if block_size is not None:
        metadata["block_size"] = str(int(block_size))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata or None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_patterns(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Read the block masks written by :func:`save_patterns`: layer index -> bool ``[B, H, nqb, nkb]``."""
    from safetensors.torch import load_file

    tensors = load_file(os.fspath(path))
    patterns = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layer" or parts[2] != "block_mask":
            raise ValueError(f"{path}: unexpected tensor {name!r}; expected 'layer.<i>.block_mask'")
        patterns[int(parts[1])] = tensor.to(torch.bool)
    return dict(sorted(patterns.items()))


def dense_step_count(skip: float, total_steps: int) -> int:
    """Number of dense warm-up steps: ``round(skip * total_steps)``, at least 1 (the pattern is computed
    at the last dense step), at most ``total_steps``."""
    check_int("total_steps", total_steps, 1)
    check_number("skip", skip, 0.0, 1.0)
    return min(total_steps, max(1, math.floor(skip * total_steps + 0.5)))


__all__ = [
    "SparseDPattern",
    "compute_sparsed_pattern",
    "dense_step_count",
    "key_block_validity",
    "load_patterns",
    "prompt_block_mask",
    "save_patterns",
    "sparsed_attention",
    "sparsed_block_importance",
    "sparsed_select",
]
