"""Rectified SpaAttn: block-sparse self-attention for video DiTs, rectified by an estimate of the
full attention map (IPAR block estimate + GAPR pooled compensation).

Model-agnostic: it works on ``[B, H, N, D]`` tensors whose last ``num_text_tokens`` tokens are text
(HunyuanVideo appends text after the video tokens) and whose first ``N - num_text_tokens`` tokens
are video tokens in raster order ``(frame, height, width)``.

Algorithm (see DESIGN.md, "Rectified SpaAttn"):

1. Video tokens are optionally reordered into compact 3D tiles (``grid`` given, ``reorder=True``),
   grouped in blocks and mean-pooled (padding excluded): ``q̄_I``, ``k̄_J``, ``v̄_J``, counts ``n_J``.
2. IPAR estimate per query block ``I``: with ``s_IJ = q̄_I·k̄_J/√d`` and text logits
   ``s_It = q̄_I·k_t/√d`` (text keys are isolated, never pooled; padded text excluded),
   ``P_IJ = n_J e^{s_IJ} / (Σ_J' n_J' e^{s_IJ'} + Σ_t e^{s_It})``.
3. Critical blocks: top-k key blocks per query block by ``P_IJ`` (optionally also until a
   cumulative mass threshold, the text mass counted first). Text keys are always kept; text
   queries run dense over every valid key.
4. GAPR: a dropped block is compensated only when its gain ``|q̄_I·k̄_J|`` beats its pooling error
   ``|a_I·k̄_J| + |q̄_I·b_J|`` (``a_I``, ``b_J``: mean absolute deviation of the block's queries /
   keys, d-vectors; the common factor ``n_I n_J`` cancels). A block whose pooling is exact
   (error 0) is always compensated.
5. Output of a video query ``i`` in block ``I``:

   - ``form="exact"``: one softmax over a mixed-resolution key set — the selected full key blocks,
     the text keys and, per compensated block ``J``, one pooled key with logit
     ``q_i·k̄_J/√d + log n_J`` and value ``v̄_J``. Computed as three partial attentions over
     disjoint key sets merged exactly through their log-sum-exps (:func:`merge_attention`), so
     nothing of size N x N is ever built: block-sparse over the video keys, a small dense term
     over the text keys, and an ``[N, N/block]`` term over the pooled keys.
     On the CPU gather backend (no corrections, one pooled key per block, no padded video key) the
     three key sets go through one kernel pass instead (:func:`gather_exact_attention`): q/k/v are
     reordered and padded once, all pooled statistics come from one set of sums, and the pooled /
     text / isolated keys ride along with the gathered key blocks as extra keys with a per-block bias.
   - ``form="paper"``: ``O_i = R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J`` with
     ``R_I = 1 − Σ_{J comp} P_IJ`` (mass conserved); ``SparseAttn`` covers selected + text keys.
   - ``form="none"``: plain block-sparse attention with the same selection (the baseline).

Multi-resolution options (our additions, on by default; ``selection="pooled", isolated_keys=0`` gives
the paper's estimate and pooled keys back):

- ``selection="subblock"``: the IPAR estimate computed between sub-blocks of ``block_size //
  pool_splits`` tokens and aggregated per block (:func:`subblock_estimate`), which sees peaky mass
  that one pooled key hides.
- ``isolated_keys``: the keys farthest from their block's mean (sinks, outliers) are isolated like
  text keys: attended exactly where their block is dropped, excluded from the pooled keys.
- ``compensation_splits``: several sub-block pooled keys per compensated block (exact form).

Optional corrections of the pooled (compensated) terms, off by default:

- ``variance_correction``: for keys ``k = k̄_J + δ`` of block ``J`` with per-dimension variance
  ``σ²_J`` (diagonal), ``E_j[e^{q·k_j/√d}] = e^{q·k̄_J/√d} E[e^{q·δ/√d}]
  ≈ e^{q·k̄_J/√d + ½ Σ_d q_d² σ²_{J,d} / d}`` (second-order cumulant expansion; exact for Gaussian
  keys with independent dimensions). The pooled logit gets ``+ ½ (q²)·σ²_J / d`` — with the
  query's own ``q_i`` in the exact form (an extra ``[N, N/block]`` matmul) and ``q̄_I`` in the
  block-level estimate of the paper form. Selection keeps the plain IPAR estimate.
- ``value_tilt``: to first order in ``δ``, ``Σ_j e^{q·k_j/√d} v_j ≈ n_J e^{q·k̄_J/√d}
  (v̄_J + C_J q/√d)`` with ``C_J = mean_j (v_j − v̄_J)(k_j − k̄_J)ᵀ`` (the value-key covariance of
  the block, D x D); the normaliser has no first-order term since ``Σ_j δ_j = 0``. The pooled value
  becomes ``v̄_J + C_J q̄_I/√d`` per (query block, key block) pair, costing
  ``(N/block)²·D²`` — about ``D / (2·block²·(1−sparsity))`` of the sparse attention itself.

Padding: ``key_padding_mask`` (True = real) may mark any token. Padded text keys go through the
dense text term, which masks them. Video key blocks with no valid token are never selected or
compensated; a partially padded video key block is handled exactly by appending one bias column to
q (1) and k (0 or −3e4) for the block-sparse call, so padded keys get a logit of about −3e4·scale
and weight exactly 0 (rare: Wan / HunyuanVideo never pad video tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._checks import check_block_size, check_key_padding_mask, check_qkv, check_sparsity
from .backends import log_once, resolve_backend
from .block_sparse import block_sparse_attention
from .blocks import (
    default_tile,
    inverse_permutation,
    keep_count,
    num_blocks,
    pad_to_blocks,
    pool_abs_deviation,
    pool_blocks,
    select_topk_blocks,
    tile_permutation,
)
from .workspace import Workspace

FORMS = ("exact", "paper", "none")
SELECTIONS = ("pooled", "subblock")
_CHUNK_BYTES = 256 << 20  # working-set bound for the chunked dense/pooled terms
_PAD_LOGIT = -3.0e4  # bias given to padded video keys (finite in every supported dtype)


@dataclass
class BlockStatistics:
    """Pooled per-block quantities of the (reordered) video tokens, all fp32."""

    pooled_q: torch.Tensor
    """``[B, H, nb, D]`` mean query of each block (padding excluded)."""
    pooled_k: torch.Tensor
    """``[B, H, nb, D]`` mean key of each block."""
    pooled_v: torch.Tensor
    """``[B, H, nb, D]`` mean value of each block."""
    key_counts: torch.Tensor
    """``[B, nb]`` valid keys per block (``n_J``)."""
    query_deviation: torch.Tensor
    """``[B, H, nb, D]`` mean ``|q_i − q̄_I|`` (``a_I``)."""
    key_deviation: torch.Tensor
    """``[B, H, nb, D]`` mean ``|k_j − k̄_J|`` (``b_J``)."""
    key_variance: torch.Tensor | None = None
    """``[B, H, nb, D]`` per-dimension key variance (variance correction only)."""
    value_key_covariance: torch.Tensor | None = None
    """``[B, H, nb, D, D]`` ``mean (v − v̄)(k − k̄)ᵀ`` (value tilt only)."""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_arguments(
    q, k, v, sparsity, block_size, num_text_tokens, key_padding_mask, grid, form, mass_threshold
):
    check_qkv(q, k, v)
    if q.shape != k.shape:
        raise ValueError(
            f"rectified_sparse_attention is self-attention: q {tuple(q.shape)} and k {tuple(k.shape)} "
            "must have the same shape"
        )
    check_sparsity(sparsity)
    check_block_size(block_size)
    check_key_padding_mask(key_padding_mask, k)
    n = q.shape[2]
    if (
        isinstance(num_text_tokens, bool)
        or not isinstance(num_text_tokens, int)
        or not 0 <= num_text_tokens < n
    ):
        raise ValueError(
            f"num_text_tokens={num_text_tokens!r} is out of range; allowed: integers in [0, {n})"
        )
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 3
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
        ):
            raise ValueError(f"grid={grid!r} must be three positive ints (frames, height, width)")
        if math.prod(grid) != n - num_text_tokens:
            raise ValueError(
                f"grid={tuple(grid)} holds {math.prod(grid)} tokens but there are "
                f"{n - num_text_tokens} video tokens (N - num_text_tokens); they must match"
            )
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not allowed; allowed: {', '.join(map(repr, FORMS))}")
    if mass_threshold is not None and (
        isinstance(mass_threshold, bool)
        or not isinstance(mass_threshold, (int, float))
        or not 0.0 < mass_threshold <= 1.0
    ):
        raise ValueError(f"mass_threshold={mass_threshold!r} is out of range; allowed: None or 0 < x <= 1")


def _check_resolution(selection, pool_splits, isolated_keys, compensation_splits, block_size):
    if selection not in SELECTIONS:
        raise ValueError(
            f"selection={selection!r} is not allowed; allowed: {', '.join(map(repr, SELECTIONS))}"
        )
    for name, value in (("pool_splits", pool_splits), ("compensation_splits", compensation_splits)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < 1
            or value & (value - 1)
            or value > block_size
        ):
            raise ValueError(
                f"{name}={value!r} is not allowed; allowed: a power of two in [1, block_size={block_size}]"
            )
    if (
        isinstance(isolated_keys, bool)
        or not isinstance(isolated_keys, (int, float))
        or not 0 <= isolated_keys
    ):
        raise ValueError(f"isolated_keys={isolated_keys!r} is out of range; allowed: a number >= 0")


# ---------------------------------------------------------------------------------------------
# Building blocks: statistics, estimate, selection, compensation, partial attentions, merging
# ---------------------------------------------------------------------------------------------


def _blocked(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, H, nb, block, D]`` fp32, zero-padded (and zero where not valid)."""
    b, h, n, d = x.shape
    xf = x.float()
    if valid is not None:
        xf = xf * valid[:, None, :, None]
    xf = pad_to_blocks(xf, block_size)
    return xf.view(b, h, -1, block_size, d)


def block_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    *,
    with_variance: bool = False,
    with_covariance: bool = False,
) -> BlockStatistics:
    """Pooled queries/keys/values, counts and deviations of each block of video tokens ``[B, H, N, D]``."""
    pooled_q, _ = pool_blocks(q, block_size, key_valid)
    pooled_k, key_counts = pool_blocks(k, block_size, key_valid)
    pooled_v, _ = pool_blocks(v, block_size, key_valid)
    stats = BlockStatistics(
        pooled_q=pooled_q,
        pooled_k=pooled_k,
        pooled_v=pooled_v,
        key_counts=key_counts,
        query_deviation=pool_abs_deviation(q, pooled_q, block_size, key_valid),
        key_deviation=pool_abs_deviation(k, pooled_k, block_size, key_valid),
    )
    if with_variance or with_covariance:
        denom = key_counts.clamp_min(1.0)[:, None, :, None]
        kb = _blocked(k, block_size, key_valid)  # [B, H, nb, bs, D]
        if with_variance:
            stats.key_variance = (kb.square().sum(3) / denom - pooled_k.square()).clamp_min(0.0)
        if with_covariance:
            vb = _blocked(v, block_size, key_valid)
            second = torch.einsum("bhjtd,bhjte->bhjde", vb, kb) / denom[..., None]
            stats.value_key_covariance = second - pooled_v[..., :, None] * pooled_k[..., None, :]
    return stats


def _log_counts(counts: torch.Tensor) -> torch.Tensor:
    """``log n_J`` as ``[B, 1, 1, nb]`` (``-inf`` for empty blocks)."""
    return torch.log(counts)[:, None, None, :]


def block_logits(stats: BlockStatistics, scale: float, *, variance_correction: bool = False) -> torch.Tensor:
    """Pooled block logits ``s_IJ + log n_J`` ``[B, H, nqb, nkb]`` (``-inf`` for empty key blocks)."""
    logits = torch.matmul(stats.pooled_q, stats.pooled_k.transpose(-1, -2)) * scale
    if variance_correction:
        logits = logits + 0.5 * scale**2 * torch.matmul(
            stats.pooled_q.square(), stats.key_variance.transpose(-1, -2)
        )
    return logits + _log_counts(stats.key_counts)


def text_logits(
    pooled_q: torch.Tensor, text_k: torch.Tensor, text_valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Logits of pooled queries against the isolated text keys ``[B, H, nqb, T]`` (padded: ``-inf``)."""
    logits = torch.matmul(pooled_q, text_k.float().transpose(-1, -2)) * scale
    if text_valid is not None:
        logits = logits.masked_fill(~text_valid[:, None, None, :], float("-inf"))
    return logits


def ipar_estimate(
    video_logits: torch.Tensor, text_logits_: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPAR: estimated attention mass of each video key block ``P_IJ`` ``[B, H, nqb, nkb]`` and of the
    text keys together ``[B, H, nqb]``, normalised over both."""
    norm = torch.logsumexp(torch.cat([video_logits, text_logits_], dim=-1), dim=-1, keepdim=True)
    probs = torch.exp(video_logits - norm)
    text_mass = (
        torch.exp(text_logits_ - norm).sum(-1) if text_logits_.shape[-1] else torch.zeros_like(norm[..., 0])
    )
    return probs, text_mass


def critical_blocks(
    probs: torch.Tensor,
    text_mass: torch.Tensor,
    valid: torch.Tensor,
    sparsity: float,
    mass_threshold: float | None = None,
) -> torch.Tensor:
    """Top-k key blocks per query block by estimated mass, plus (optionally) blocks until the
    cumulative mass — text first — reaches ``mass_threshold``. Bool ``[B, H, nqb, nkb]``."""
    keep = select_topk_blocks(probs, keep_count(sparsity, probs.shape[-1]), valid)
    if mass_threshold is not None:
        sorted_p, order = probs.masked_fill(~valid, 0.0).sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p + text_mass[..., None]
        keep |= torch.zeros_like(keep).scatter_(-1, order, before < mass_threshold) & valid
    return keep


def gapr_compensated(stats: BlockStatistics, dropped: torch.Tensor) -> torch.Tensor:
    """GAPR: dropped blocks whose pooled-logit gain beats their pooling error. Bool ``[B, H, nqb, nkb]``."""
    gain = torch.matmul(stats.pooled_q, stats.pooled_k.transpose(-1, -2)).abs()
    error = torch.matmul(stats.query_deviation, stats.pooled_k.transpose(-1, -2)).abs()
    error = error + torch.matmul(stats.pooled_q, stats.key_deviation.transpose(-1, -2)).abs()
    reliable = (gain > error) | (error <= 0)
    return dropped & reliable


def _pool_subblocks(
    x: torch.Tensor, sub: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of ``sub`` tokens (any ``sub >= 1``), padding excluded: fp32 ``[B, H, ns, D]``
    and valid counts ``[B, ns]``."""
    b, n = x.shape[0], x.shape[2]
    ones = torch.ones(b, n, device=x.device) if valid is None else valid.float()
    counts = _blocked(ones[:, None, :, None], sub).sum((1, 3, 4))  # [B, ns]
    pooled = _blocked(x, sub, valid).sum(3) / counts.clamp_min(1.0)[:, None, :, None]
    return pooled, counts


def subblock_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    splits: int,
    key_valid: torch.Tensor | None,
    text_logits_fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-resolution IPAR: the estimate of :func:`ipar_estimate` computed between query and key
    sub-blocks of ``block_size // splits`` tokens (each query sub-block normalised on its own), then
    summed over the key sub-blocks of each key block and averaged over the query sub-blocks of each
    query block (weighted by valid tokens). Sees peaky mass that one pooled key per block hides;
    cost ``(N·splits/block)²·D``. Returns ``P_IJ`` ``[B, H, nqb, nkb]`` and the text mass ``[B, H, nqb]``;
    equals the pooled estimate when q and k are constant inside each block.

    ``text_logits_fn(pooled_q)`` gives the text logits of pooled queries ``[B, H, n, T]``.
    """
    sub = block_size // splits
    pooled_q, counts = _pool_subblocks(q, sub, key_valid)  # [B, H, ns, D], [B, ns]
    pooled_k, _ = _pool_subblocks(k, sub, key_valid)
    return _subblock_block_mass(
        pooled_q, pooled_k, counts, num_blocks(q.shape[2], block_size), splits, text_logits_fn
    )


def _subblock_block_mass(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    counts: torch.Tensor,
    nb: int,
    splits: int,
    text_logits_fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-level estimate of :func:`subblock_estimate` from pooled sub-blocks ``[B, H, ns, D]``
    and their valid counts ``[B, ns]``."""
    b, h = pooled_q.shape[:2]
    logits = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * (1.0 / math.sqrt(pooled_q.shape[-1]))
    probs, text_mass = ipar_estimate(logits + _log_counts(counts), text_logits_fn(pooled_q))
    pad = nb * splits - counts.shape[-1]
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad)).view(b, h, nb, splits, nb, splits).sum(-1)
    weights = torch.nn.functional.pad(counts, (0, pad)).view(b, 1, nb, splits)
    total = weights.sum(-1).clamp_min(1.0)
    block_probs = (probs * weights[..., None]).sum(3) / total[..., None]
    block_text = (torch.nn.functional.pad(text_mass, (0, pad)).view(b, h, nb, splits) * weights).sum(
        -1
    ) / total
    return block_probs, block_text


def isolated_outlier_keys(
    k: torch.Tensor, pooled_k: torch.Tensor, block_size: int, count: int, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """Indices ``[B, H, count]`` of the video keys farthest from their block's pooled key
    (``‖k_j − k̄_J‖``, padding never chosen): outliers such as attention sinks, which a pooled key
    misrepresents. They are isolated like the text keys: attended exactly, never pooled."""
    n = k.shape[2]
    deviation = (k.float() - pooled_k.repeat_interleave(block_size, dim=2)[:, :, :n]).norm(dim=-1)
    if key_valid is not None:
        deviation = deviation.masked_fill(~key_valid[:, None, :], float("-inf"))
    return deviation.topk(count, dim=-1).indices


def compensation_statistics(
    k: torch.Tensor,
    v: torch.Tensor,
    stats: BlockStatistics,
    block_size: int,
    splits: int,
    key_valid: torch.Tensor | None,
    isolated: torch.Tensor | None,
    *,
    with_variance: bool = False,
    with_covariance: bool = False,
) -> BlockStatistics:
    """Pooled keys/values used to compensate dropped blocks in the exact form: ``splits`` sub-block
    keys per block (weights ``n_sub``, multi-resolution compensation) and the isolated keys
    (``isolated`` ``[B, H, r]`` indices, or None) excluded from the pools. ``pooled_k``, ``pooled_v``,
    ``key_counts`` (now per head, ``[B, H, nb·splits]``) and the optional corrections are at the
    sub-block resolution; the query-side fields are those of ``stats``."""
    b, h, n, d = k.shape
    sub = block_size // splits
    valid = torch.ones(b, h, n, dtype=torch.bool, device=k.device)
    if key_valid is not None:
        valid &= key_valid[:, None, :]
    if isolated is not None:
        valid.scatter_(-1, isolated, False)
    weight = valid.float()[..., None]
    kb = _blocked(k.float() * weight, sub)  # [B, H, ns, sub, D]
    vb = _blocked(v.float() * weight, sub)
    counts = _blocked(weight, sub).sum((3, 4))  # [B, H, ns]
    denom = counts.clamp_min(1.0)[..., None]
    pooled_k, pooled_v = kb.sum(3) / denom, vb.sum(3) / denom
    comp = BlockStatistics(
        pooled_q=stats.pooled_q,
        pooled_k=pooled_k,
        pooled_v=pooled_v,
        key_counts=counts,
        query_deviation=stats.query_deviation,
        key_deviation=stats.key_deviation,
    )
    if with_variance:
        comp.key_variance = (kb.square().sum(3) / denom - pooled_k.square()).clamp_min(0.0)
    if with_covariance:
        second = torch.einsum("bhjtd,bhjte->bhjde", vb, kb) / denom[..., None]
        comp.value_key_covariance = second - pooled_v[..., :, None] * pooled_k[..., None, :]
    return comp


def with_isolated_keys(
    comp: BlockStatistics,
    comp_mask: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    isolated: torch.Tensor,
    critical: torch.Tensor,
    block_size: int,
) -> tuple[BlockStatistics, torch.Tensor]:
    """Append the isolated keys ``[B, H, r]`` to the compensation key set as keys of weight 1 with their
    own values, visible to a query block only where their key block was not selected (a selected block
    already holds them exactly). Returns the extended statistics and mask ``[B, H, nqb, nsub + r]``."""
    d = k.shape[-1]
    gather = isolated[..., None].expand(-1, -1, -1, d)
    iso_k, iso_v = torch.gather(k.float(), 2, gather), torch.gather(v.float(), 2, gather)
    owner = (isolated // block_size)[:, :, None, :].expand(-1, -1, critical.shape[2], -1)
    visible = ~torch.gather(critical, -1, owner)  # [B, H, nqb, r]
    zeros = torch.zeros_like(iso_k)
    extended = BlockStatistics(
        pooled_q=comp.pooled_q,
        pooled_k=torch.cat([comp.pooled_k, iso_k], dim=2),
        pooled_v=torch.cat([comp.pooled_v, iso_v], dim=2),
        key_counts=torch.cat([comp.key_counts, torch.ones_like(isolated, dtype=torch.float32)], dim=-1),
        query_deviation=comp.query_deviation,
        key_deviation=comp.key_deviation,
    )
    if comp.key_variance is not None:
        extended.key_variance = torch.cat([comp.key_variance, zeros], dim=2)
    if comp.value_key_covariance is not None:
        extended.value_key_covariance = torch.cat(
            [comp.value_key_covariance, zeros[..., None].expand(-1, -1, -1, -1, d)], dim=2
        )
    return extended, torch.cat([comp_mask, visible], dim=-1)


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from each set's ``(out, lse)``.

    ``out`` ``[..., D]`` (any float dtype), ``lse`` ``[...]`` natural log (``-inf`` for no keys).
    Returns fp32 ``(out, lse)``; rows with no key in any part give 0 and ``-inf``.
    """
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = None
    for part_out, part_lse in parts:
        term = part_out.float() * torch.exp(part_lse - finite_lse)[..., None]
        out = term if out is None else out + term
    return out, lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in fp32 chunked over queries (for the short text axis): ``(out, lse)``.

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``, key_valid bool ``[B, Nk]`` or None. Nk may be 0.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    if nk == 0:
        return out, lse
    kf, vf = k.float(), v.float()
    chunk = max(1, _CHUNK_BYTES // max(1, 4 * b * h * nk))
    for start in range(0, nq, chunk):
        rows = slice(start, min(nq, start + chunk))
        scores = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(
            scores - torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))[..., None]
        )
        out[:, :, rows] = torch.matmul(probs, vf)
        lse[:, :, rows] = row_lse
    return out, lse


def pooled_key_attention(
    q: torch.Tensor,
    stats: BlockStatistics,
    compensated: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    variance_correction: bool = False,
    value_tilt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each video query over the pooled keys of its block's compensated key blocks.

    Key ``J`` has logit ``q_i·k̄_J·scale + log n_J`` (``+ ½ scale² (q_i²)·σ²_J`` with the variance
    correction) and value ``v̄_J`` (``+ scale·C_J q̄_I`` with the value tilt). Returns fp32
    ``(out [B, H, N, D], lse [B, H, N])``; cost ``N·nkb·D`` (chunked over query blocks).
    """
    b, h, n, d = q.shape
    q_blocks = _blocked(q, block_size)  # [B, H, nqb, bs, D]
    nqb, nkb = q_blocks.shape[2], stats.pooled_k.shape[2]
    counts = stats.key_counts  # [B, nkb] or per head [B, H, nkb]
    log_counts = torch.log(counts if counts.ndim == 3 else counts[:, None])[:, :, None, None, :]
    out = torch.zeros_like(q_blocks)
    lse = torch.full(q_blocks.shape[:-1], float("-inf"), device=q.device)
    per_block = 4 * b * h * block_size * nkb * (3 + (d if value_tilt else 0))
    chunk = max(1, _CHUNK_BYTES // per_block)
    for start in range(0, nqb, chunk):
        qb = slice(start, min(nqb, start + chunk))
        q_chunk = q_blocks[:, :, qb]  # [B, H, c, bs, D]
        logits = torch.einsum("bhitd,bhjd->bhitj", q_chunk, stats.pooled_k) * scale + log_counts
        if variance_correction:
            logits = logits + 0.5 * scale**2 * torch.einsum(
                "bhitd,bhjd->bhitj", q_chunk.square(), stats.key_variance
            )
        logits = logits.masked_fill(~compensated[:, :, qb, None, :], float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(
            logits - torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))[..., None]
        )
        out[:, :, qb] = torch.einsum("bhitj,bhjd->bhitd", probs, stats.pooled_v)
        if value_tilt:
            tilt = (
                torch.einsum("bhjde,bhie->bhijd", stats.value_key_covariance, stats.pooled_q[:, :, qb])
                * scale
            )
            out[:, :, qb] += torch.einsum("bhitj,bhijd->bhitd", probs, tilt)
        lse[:, :, qb] = row_lse
    return out.view(b, h, -1, d)[:, :, :n], lse.view(b, h, -1)[:, :, :n]


def paper_rectification(
    sparse_out: torch.Tensor,
    probs: torch.Tensor,
    stats: BlockStatistics,
    compensated: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    value_tilt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper form ``R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J``; returns fp32 output ``[B, H, N, D]`` and
    the retained mass ``R_I`` ``[B, H, nqb]`` (``R_I + Σ_{J comp} P_IJ = 1``)."""
    comp_probs = probs * compensated
    retained = 1.0 - comp_probs.sum(-1)
    pooled_term = torch.matmul(comp_probs, stats.pooled_v)  # [B, H, nqb, D]
    if value_tilt:
        tilt = torch.einsum("bhjde,bhie->bhijd", stats.value_key_covariance, stats.pooled_q) * scale
        pooled_term = pooled_term + torch.einsum("bhij,bhijd->bhid", comp_probs, tilt)
    n = sparse_out.shape[2]
    rows = lambda x: x.repeat_interleave(block_size, dim=2)[:, :, :n]  # noqa: E731
    return rows(retained)[..., None] * sparse_out.float() + rows(pooled_term), retained


def video_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of video queries over the selected video key blocks, padded keys
    excluded exactly (bias column, see the module docstring). Returns ``(out, lse)``."""
    if key_valid is not None and not bool(key_valid.all()):
        bias = torch.where(key_valid, 0.0, _PAD_LOGIT).to(k.dtype)[:, None, :, None].expand(*k.shape[:3], 1)
        q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
        k = torch.cat([k, bias], dim=-1)
        v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
        if resolve_backend(backend, q.device) == "triton":
            log_once(
                "fastgen: rectified attention with padded video keys uses the flex backend (odd head_dim)"
            )
            backend = "flex"
        out, lse = block_sparse_attention(
            q, k, v, block_mask, block_size, return_lse=True, scale=scale, backend=backend
        )
        return out[..., :-1], lse
    return block_sparse_attention(
        q, k, v, block_mask, block_size, return_lse=True, scale=scale, backend=backend
    )


def fused_exact_applies(q: torch.Tensor, key_valid: torch.Tensor | None, backend: str | None) -> bool:
    """True when the exact form runs as one Triton pass: the block-sparse backend resolves to
    ``"triton"``, the head dim is one the kernel supports and no video key is padded."""
    if q.shape[-1] not in (16, 32, 64, 128) or resolve_backend(backend, q.device) != "triton":
        return False
    return key_valid is None or bool(key_valid.all())


def fused_exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    text_valid: torch.Tensor | None,
    stats: BlockStatistics,
    critical: torch.Tensor,
    compensated: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    variance_correction: bool = False,
    value_tilt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact form of the video queries ``(out [B, H, N, D] in q's dtype, lse [B, H, N])`` in one Triton pass
    (``fastgen.kernels.rectified_exact_attention_triton``): the same softmax as merging
    :func:`video_sparse_attention`, the text term and :func:`pooled_key_attention`.
    The value tilt materialises ``[B, H, nqb, nkb, D]`` pooled values."""
    from fastgen.kernels import block_mask_to_indices, rectified_exact_attention_triton

    batch = q.shape[0]
    indices, counts = block_mask_to_indices(critical.expand(batch, -1, -1, -1))
    pooled_indices, pooled_counts = block_mask_to_indices(compensated.expand(batch, -1, -1, -1))
    pooled_v = stats.pooled_v
    if value_tilt:
        tilt = torch.einsum("bhjde,bhie->bhijd", stats.value_key_covariance, stats.pooled_q) * scale
        pooled_v = pooled_v[:, :, None] + tilt
    return rectified_exact_attention_triton(
        q,
        k,
        v,
        indices,
        counts,
        stats.pooled_k,
        pooled_v,
        pooled_indices,
        pooled_counts,
        torch.log(stats.key_counts),
        block_size,
        scale,
        pooled_key_variance=stats.key_variance if variance_correction else None,
        text_k=text_k,
        text_v=text_v,
        text_valid=text_valid,
    )


def _padded_video(
    x: torch.Tensor, token_index: torch.Tensor, n_video: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Video tokens of ``x`` ``[B, H, N, D]`` in the order ``token_index`` (length a block multiple,
    positions past ``n_video`` are padding), as one contiguous gather (into ``out`` when given);
    padding rows are zero."""
    out = (
        torch.index_select(x, 2, token_index, out=out) if out is not None else x.index_select(2, token_index)
    )
    out[:, :, n_video:] = 0
    return out


def _scratch(
    workspace: Workspace | None, name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor | None:
    """``workspace``'s buffer ``name`` for a tensor of ``shape`` like ``like`` (None without a workspace)."""
    return None if workspace is None else workspace.empty(name, shape, like.dtype, like.device)


def _centred_statistics(
    x: torch.Tensor, pooled: torch.Tensor, last: int, deviation: bool, distance: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per block of ``x`` ``[B, H, nb*bs, D]`` (zero-padded after the ``last`` valid tokens of the
    last block): the mean ``|x_i − x̄|`` ``[B, H, nb, D]`` and the distances ``‖x_i − x̄‖``
    ``[B, H, nb, bs]`` (padding: 0), a few heads at a time so the centred values stay in cache."""
    b, h, nb, d = pooled.shape
    bs = x.shape[2] // nb
    blocks = x.view(b * h, nb, bs, d)
    means = pooled.reshape(b * h, nb, 1, d)
    counts = torch.full((nb, 1), float(bs), device=x.device)
    counts[-1] = last
    mean_abs = torch.empty(b * h, nb, d, device=x.device) if deviation else None
    norms = torch.empty(b * h, nb, bs, device=x.device) if distance else None
    step = max(1, (8 << 20) // (nb * bs * d * 4))
    centred = torch.empty(min(step, b * h), nb, bs, d, device=x.device)
    for start in range(0, b * h, step):
        rows = slice(start, min(b * h, start + step))
        c = torch.sub(blocks[rows], means[rows], out=centred[: rows.stop - start])
        c[:, -1, last:] = 0
        if distance:
            torch.linalg.vector_norm(c, dim=-1, out=norms[rows])
        if deviation:
            torch.sum(c.abs_(), dim=2, out=mean_abs[rows])
    if deviation:
        mean_abs = mean_abs.div_(counts).view(b, h, nb, d)
    return mean_abs, norms


def gather_exact_applies(
    q: torch.Tensor,
    video_valid: torch.Tensor | None,
    backend: str | None,
    form: str,
    compensation_splits: int,
    variance_correction: bool,
    value_tilt: bool,
) -> bool:
    """True when the CPU one-pass path serves the call: the block-sparse backend resolves to
    ``"gather"``, the form is ``"exact"`` or ``"none"`` without the pooled-term corrections or
    multi-resolution compensation, no video key is padded and no gradient is needed."""
    if form not in ("exact", "none") or variance_correction or value_tilt or compensation_splits != 1:
        return False
    if torch.is_grad_enabled() and q.requires_grad:  # the one-pass path is forward-only
        return False
    if resolve_backend(backend, q.device) != "gather":
        return False
    return video_valid is None or bool(video_valid.all())


def gather_exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_video: int,
    perm: torch.Tensor | None,
    text_valid: torch.Tensor | None,
    *,
    sparsity: float,
    block_size: int,
    scale: float,
    form: str,
    mass_threshold: float | None,
    selection: str,
    pool_splits: int,
    isolated_keys: float,
    gapr: bool,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video-query output of the exact (or ``"none"``) form in one gather-kernel pass (CPU).

    The video tokens of q/k/v ``[B, H, N, D]`` are reordered (``perm``) and padded to a block multiple
    by one gather each; all pooled statistics come from one set of block / sub-block sums; the text
    keys, the compensated pooled keys (logit ``+ log n_J``) and the visible isolated keys join the
    selected key blocks as extra keys of the same softmax (:func:`gather_block_sparse_attention`), so
    no partial attention is merged. Same result as the general path up to round-off.

    The reordered copies of q/k/v live in ``workspace`` when one is given. The output has q's memory
    layout: a ``[B, N, H, D]`` buffer seen as ``[B, H, N, D]`` when q is such a view (what attention
    processors pass), so the caller's transpose back is free.

    Returns ``(out [B, H, N, D] in q's dtype with the video rows written (text rows left for the
    caller), critical, dropped, compensated, valid_blocks)``.
    """
    from .gather import extended_key_buffer, gather_block_sparse_attention

    b, h, _, d = q.shape
    bs = block_size
    nb = num_blocks(n_video, bs)
    n_pad = nb * bs
    device = q.device
    rectify = form != "none"
    count = min(n_video, round(isolated_keys * nb)) if rectify and isolated_keys > 0 else 0
    kt, vt = k[:, :, n_video:], v[:, :, n_video:]
    n_text = kt.shape[2]
    n_extra = n_text + (nb + count if rectify else 0)  # text, pooled and isolated keys
    order = torch.arange(n_video, device=device) if perm is None else perm
    token_index = torch.cat([order, order.new_zeros(n_pad - n_video)])
    qp = _padded_video(q, token_index, n_video, _scratch(workspace, "q", (b, h, n_pad, d), q))
    if n_extra:  # k/v and their extra keys share one buffer (no copy in the gather)
        (kp, extra_k), (vp, extra_v) = (
            extended_key_buffer(b, h, n_pad, n_extra, d, bs, k.dtype, device, workspace, name)
            for name in ("k", "v")
        )
        extra_k[:, :, n_extra:] = 0
        extra_v[:, :, n_extra:] = 0
        extra_k[:, :, :n_text] = kt
        extra_v[:, :, :n_text] = vt
    else:
        kp = _scratch(workspace, "k", (b, h, n_pad, d), k)
        vp = _scratch(workspace, "v", (b, h, n_pad, d), v)
    kp, vp = _padded_video(k, token_index, n_video, kp), _padded_video(v, token_index, n_video, vp)

    # one set of sums: sub-blocks (selection) -> blocks (pooled q/k/v)
    splits = pool_splits if selection == "subblock" and pool_splits > 1 else 1
    sub = bs // splits
    positions = torch.arange(nb * splits, device=device) * sub
    sub_counts = (n_video - positions).clamp(0, sub).float()  # [nb*splits]
    block_counts = sub_counts.view(nb, splits).sum(-1)  # [nb]
    q_sub = qp.view(b, h, nb * splits, sub, d).sum(3, dtype=torch.float32)
    k_sub = kp.view(b, h, nb * splits, sub, d).sum(3, dtype=torch.float32)
    denom = block_counts.clamp_min(1.0)[:, None]
    pooled_q = q_sub.view(b, h, nb, splits, d).sum(3) / denom
    k_sums = k_sub.view(b, h, nb, splits, d).sum(3)
    pooled_k = k_sums / denom
    key_counts = block_counts.expand(b, nb)
    text_part_logits = text_logits(pooled_q, kt, text_valid, scale)
    valid_blocks = (key_counts > 0)[:, None, None, :]
    if splits > 1:
        ns = num_blocks(n_video, sub)
        sub_denom = sub_counts.clamp_min(1.0)[:, None]
        probs, text_mass = _subblock_block_mass(
            (q_sub / sub_denom)[:, :, :ns],
            (k_sub / sub_denom)[:, :, :ns],
            sub_counts[:ns].expand(b, ns),
            nb,
            splits,
            lambda pq: text_logits(pq, kt, text_valid, scale),
        )
    else:
        logits = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale + _log_counts(key_counts)
        probs, text_mass = ipar_estimate(logits, text_part_logits)
    critical = critical_blocks(probs, text_mass, valid_blocks, sparsity, mass_threshold)
    dropped = valid_blocks & ~critical
    compensated = torch.zeros_like(dropped)

    extra_bias = []
    if n_text:
        bias = torch.zeros(b, 1, 1, n_text, device=device)
        if text_valid is not None:
            bias = bias.masked_fill(~text_valid[:, None, None, :], float("-inf"))
        extra_bias.append(bias)
    if rectify:
        last = n_video - (nb - 1) * bs  # valid tokens of the last block
        key_deviation = query_deviation = None
        if gapr or count:
            key_deviation, distance = _centred_statistics(kp, pooled_k, last, gapr, count > 0)
            if count:
                distance = distance.view(b, h, n_pad)
                distance[:, :, n_video:] = float("-inf")
                isolated = distance.topk(count, dim=-1).indices  # [B, H, r]
        if gapr:
            query_deviation, _ = _centred_statistics(qp, pooled_q, last, True, False)
            stats = BlockStatistics(
                pooled_q, pooled_k, pooled_k, key_counts, query_deviation, key_deviation
            )  # pooled_v is not used by GAPR
            compensated = gapr_compensated(stats, dropped)
        else:
            compensated = dropped
        v_sums = vp.view(b, h, nb, bs, d).sum(3, dtype=torch.float32)
        comp_counts = block_counts.expand(b, h, nb)
        if count:  # isolated keys leave their block's pool and become keys of their own
            owner = isolated // bs  # [B, H, r]
            gather_rows = isolated[..., None].expand(-1, -1, -1, d)
            iso_k = torch.gather(kp, 2, gather_rows)
            iso_v = torch.gather(vp, 2, gather_rows)
            k_sums = k_sums.scatter_add(2, owner[..., None].expand(-1, -1, -1, d), -iso_k.float())
            v_sums = v_sums.scatter_add(2, owner[..., None].expand(-1, -1, -1, d), -iso_v.float())
            comp_counts = comp_counts.scatter_add(2, owner, -torch.ones_like(owner, dtype=torch.float32))
        comp_denom = comp_counts.clamp_min(1.0)[..., None]
        torch.div(k_sums, comp_denom, out=extra_k[:, :, n_text : n_text + nb])
        torch.div(v_sums, comp_denom, out=extra_v[:, :, n_text : n_text + nb])
        log_counts = torch.log(comp_counts)[:, :, None, :]  # -inf for empty pools
        extra_bias.append(log_counts.masked_fill(~compensated, float("-inf")))
        if count:
            owner_rows = owner[:, :, None, :].expand(-1, -1, nb, -1)
            visible = ~torch.gather(critical.expand(b, -1, -1, -1), -1, owner_rows)  # [B, H, nqb, r]
            extra_k[:, :, n_text + nb : n_extra] = iso_k
            extra_v[:, :, n_text + nb : n_extra] = iso_v
            extra_bias.append(torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf")))
    extras = {}
    if n_extra:
        extras = dict(
            extra_k=extra_k,
            extra_v=extra_v,
            extra_bias=torch.cat([x.expand(b, h, nb, -1) for x in extra_bias], dim=-1),
        )
    # the kernel writes each query row straight to its raster position in the full output, laid out
    # like q: [B, H, N, D], or [B, N, H, D] when q is that buffer transposed
    n = q.shape[2]
    out = torch.empty(b * h * n + 1, d, dtype=q.dtype, device=device)  # last row: sink for padding
    tokens_major = q.stride(1) == d and q.stride(2) == h * d
    batch = torch.arange(b, device=device)[:, None, None]
    head = torch.arange(h, device=device)[None, :, None]
    if tokens_major:
        rows = (batch * n + token_index) * h + head
    else:
        rows = (batch * h + head) * n + token_index
    rows[:, :, n_video:] = b * h * n
    gather_block_sparse_attention(
        qp, kp, vp, critical, bs, scale, kv_length=n_video, scatter_out=(out, rows.view(-1)), **extras
    )
    out = out[:-1].view(b, n, h, d).transpose(1, 2) if tokens_major else out[:-1].view(b, h, n, d)
    return out, critical, dropped, compensated, valid_blocks


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def rectified_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    block_size: int = 128,
    num_text_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    grid: tuple[int, int, int] | None = None,
    return_stats: bool = False,
    form: str = "exact",
    mass_threshold: float | None = None,
    variance_correction: bool = False,
    value_tilt: bool = False,
    reorder: bool = True,
    backend: str | None = None,
    selection: str = "subblock",
    pool_splits: int = 4,
    isolated_keys: float = 1.0,
    compensation_splits: int = 1,
    gapr: bool = True,
    workspace: Workspace | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Rectified block-sparse self-attention on ``[B, H, N, D]`` (video tokens first, then text).

    Args:
        q, k, v: ``[B, H, N, D]``; the last ``num_text_tokens`` tokens are text.
        sparsity: fraction of video key blocks dropped per video query block, in [0, 1).
        block_size: tokens per block (power of two >= 16).
        num_text_tokens: trailing text tokens, in [0, N); their keys are always kept and their
            queries attend densely.
        key_padding_mask: optional bool ``[B, N]``, True for real tokens (e.g. padded text = False).
        grid: ``(frames, height, width)`` of the video tokens (product ``N - num_text_tokens``);
            with ``reorder`` it groups video tokens into compact 3D tiles before blocking.
        return_stats: also return a dict with ``density``, ``compensated_fraction``,
            ``head_density`` ``[H]`` and ``block_mask`` (bool ``[B, H, nqb, nkb]``, video blocks in
            the reordered order).
        form: ``"exact"``, ``"paper"`` or ``"none"`` (see the module docstring).
        mass_threshold: also keep blocks until this estimated cumulative mass (None: top-k only).
        variance_correction: second-order key-variance correction of pooled logits.
        value_tilt: first-order value-key covariance correction of pooled values.
        reorder: reorder video tokens into 3D tiles when ``grid`` is given.
        backend: block-sparse backend (see :func:`block_sparse_attention`).
        selection: estimate that picks the critical blocks: ``"pooled"`` (the paper's IPAR, one
            pooled query/key per block) or ``"subblock"`` (:func:`subblock_estimate`).
        pool_splits: sub-blocks per block of the ``"subblock"`` estimate (power of two <= block_size).
        isolated_keys: exact form only: outlier keys isolated per key block on average
            (:func:`isolated_outlier_keys`; 0 disables); they are attended exactly wherever their
            block is dropped and excluded from the pooled keys.
        compensation_splits: exact form only: pooled keys per compensated block (sub-blocks of
            ``block_size // compensation_splits`` tokens, power of two <= block_size).
        gapr: compensate only the dropped blocks that pass GAPR (:func:`gapr_compensated`);
            False compensates every dropped block.
        workspace: a :class:`~fastgen.attention.Workspace` for the internal copies of q/k/v, kept by
            a caller that runs the same shape repeatedly (CPU one-pass path; ignored elsewhere).

    Returns:
        ``out`` ``[B, H, N, D]`` in q's dtype (with q's memory layout on the CPU one-pass path: a
        transposed ``[B, N, H, D]`` q gives an output of that layout), and the stats dict when
        ``return_stats``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 4 * 16 * 16 + 20, 64)
        >>> out = rectified_sparse_attention(q, k, v, sparsity=0.8, block_size=64,
        ...                                  num_text_tokens=20, grid=(4, 16, 16))
    """
    _check_arguments(
        q, k, v, sparsity, block_size, num_text_tokens, key_padding_mask, grid, form, mass_threshold
    )
    _check_resolution(selection, pool_splits, isolated_keys, compensation_splits, block_size)
    n, d = q.shape[2], q.shape[3]
    n_video = n - num_text_tokens
    scale = 1.0 / math.sqrt(d)

    qv, kv, vv = q[:, :, :n_video], k[:, :, :n_video], v[:, :, :n_video]
    kt, vt = k[:, :, n_video:], v[:, :, n_video:]
    video_valid = None if key_padding_mask is None else key_padding_mask[:, :n_video]
    text_valid = None if key_padding_mask is None else key_padding_mask[:, n_video:]
    perm = None
    if grid is not None and reorder:
        perm = tile_permutation(tuple(grid), default_tile(block_size), device=q.device)
    if gather_exact_applies(
        q, video_valid, backend, form, compensation_splits, variance_correction, value_tilt
    ):
        video_out, critical, dropped, compensated, valid_blocks = gather_exact_attention(
            q,
            k,
            v,
            n_video,
            perm,
            text_valid,
            sparsity=sparsity,
            block_size=block_size,
            scale=scale,
            form=form,
            mass_threshold=mass_threshold,
            selection=selection,
            pool_splits=pool_splits,
            isolated_keys=isolated_keys,
            gapr=gapr,
            workspace=workspace,
        )
        return _finish(
            q,
            k,
            v,
            video_out,
            key_padding_mask,
            num_text_tokens,
            scale,
            return_stats,
            (critical, dropped, compensated, valid_blocks),
        )
    if perm is not None:
        qv, kv, vv = qv[:, :, perm], kv[:, :, perm], vv[:, :, perm]
        video_valid = None if video_valid is None else video_valid[:, perm]

    rectify = form != "none"
    stats = block_statistics(
        qv,
        kv,
        vv,
        block_size,
        video_valid,
        with_variance=rectify and variance_correction,
        with_covariance=rectify and value_tilt,
    )
    valid_blocks = (stats.key_counts > 0)[:, None, None, :]  # [B, 1, 1, nkb]
    text_part_logits = text_logits(stats.pooled_q, kt, text_valid, scale)
    if selection == "subblock" and pool_splits > 1:
        probs, text_mass = subblock_estimate(
            qv, kv, block_size, pool_splits, video_valid, lambda pq: text_logits(pq, kt, text_valid, scale)
        )
    else:
        probs, text_mass = ipar_estimate(block_logits(stats, scale), text_part_logits)
    critical = critical_blocks(probs, text_mass, valid_blocks, sparsity, mass_threshold)
    dropped = valid_blocks & ~critical
    compensated = gapr_compensated(stats, dropped) if gapr else dropped
    if not rectify:
        compensated = torch.zeros_like(dropped)

    isolated = None
    if form == "exact" and isolated_keys > 0:
        count = round(isolated_keys * valid_blocks.shape[-1])
        if video_valid is not None:
            count = min(count, int(video_valid.sum(-1).min()))
        if count > 0:
            isolated = isolated_outlier_keys(kv, stats.pooled_k, block_size, count, video_valid)
    multi_resolution = isolated is not None or compensation_splits > 1
    fused_exact = (
        form == "exact" and compensation_splits == 1 and fused_exact_applies(qv, video_valid, backend)
    )
    if not fused_exact:
        sparse = video_sparse_attention(qv, kv, vv, critical, block_size, scale, video_valid, backend)
        text_part = attention_with_lse(qv, kt, vt, text_valid, scale)
    if fused_exact:  # one Triton pass over the selected, text and pooled keys
        comp_stats = stats
        if isolated is not None:  # pools without the isolated keys; those are merged below by LSE
            comp_stats = compensation_statistics(
                kv,
                vv,
                stats,
                block_size,
                1,
                video_valid,
                isolated,
                with_variance=variance_correction,
                with_covariance=value_tilt,
            )
        video_out, video_lse = fused_exact_attention(
            qv,
            kv,
            vv,
            kt,
            vt,
            text_valid,
            comp_stats,
            critical,
            compensated,
            block_size,
            scale,
            variance_correction=variance_correction,
            value_tilt=value_tilt,
        )
        if isolated is not None:
            r = isolated.shape[-1]
            iso_stats, iso_mask = with_isolated_keys(
                comp_stats, compensated, kv, vv, isolated, critical, block_size
            )
            iso_stats.pooled_k, iso_stats.pooled_v = (
                iso_stats.pooled_k[:, :, -r:],
                iso_stats.pooled_v[:, :, -r:],
            )
            iso_stats.key_counts = iso_stats.key_counts[..., -r:]
            iso_stats.key_variance = (
                None if iso_stats.key_variance is None else iso_stats.key_variance[:, :, -r:]
            )
            if iso_stats.value_key_covariance is not None:
                iso_stats.value_key_covariance = iso_stats.value_key_covariance[:, :, -r:]
            isolated_part = pooled_key_attention(
                qv,
                iso_stats,
                iso_mask[..., -r:],
                block_size,
                scale,
                variance_correction=variance_correction,
                value_tilt=value_tilt,
            )
            video_out, _ = merge_attention([(video_out.float(), video_lse), isolated_part])
    elif form == "exact":
        comp_stats, comp_mask = stats, compensated
        if multi_resolution:
            comp_stats = compensation_statistics(
                kv,
                vv,
                stats,
                block_size,
                compensation_splits,
                video_valid,
                isolated,
                with_variance=variance_correction,
                with_covariance=value_tilt,
            )
            comp_mask = compensated.repeat_interleave(compensation_splits, dim=-1)
            comp_mask = comp_mask[..., : comp_stats.pooled_k.shape[2]]
            if isolated is not None:
                comp_stats, comp_mask = with_isolated_keys(
                    comp_stats, comp_mask, kv, vv, isolated, critical, block_size
                )
        pooled = pooled_key_attention(
            qv,
            comp_stats,
            comp_mask,
            block_size,
            scale,
            variance_correction=variance_correction,
            value_tilt=value_tilt,
        )
        video_out, _ = merge_attention([sparse, text_part, pooled])
    elif form == "paper":
        sparse_out, _ = merge_attention([sparse, text_part])
        if variance_correction:
            probs, _ = ipar_estimate(block_logits(stats, scale, variance_correction=True), text_part_logits)
        video_out, _ = paper_rectification(
            sparse_out, probs, stats, compensated, block_size, scale, value_tilt=value_tilt
        )
    else:
        video_out, _ = merge_attention([sparse, text_part])

    if perm is not None:
        video_out = video_out[:, :, inverse_permutation(perm)]
    return _finish(
        q,
        k,
        v,
        video_out,
        key_padding_mask,
        num_text_tokens,
        scale,
        return_stats,
        (critical, dropped, compensated, valid_blocks),
    )


def text_query_attention(
    q_text: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Dense attention of the text queries ``[B, H, T, D]`` over every valid key (``[B, N]`` bool or
    None) through SDPA, whose fused kernels never hold the ``T x N`` scores; a row without any
    valid key gives 0. Output in q's dtype."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q_text, k, v, attn_mask=mask, scale=scale)
    if key_valid is not None:
        empty = ~key_valid.any(-1)  # [B]
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def _finish(q, k, v, video_out, key_padding_mask, num_text_tokens, scale, return_stats, masks):
    """Add the text queries' dense output to the video output (or write it into ``video_out`` when
    that already spans all N tokens); add the stats when asked."""
    n = q.shape[2]
    if video_out.shape[2] == n and video_out.dtype == q.dtype:
        out = video_out
        if num_text_tokens:
            out[:, :, n - num_text_tokens :] = text_query_attention(
                q[:, :, n - num_text_tokens :], k, v, key_padding_mask, scale
            )
    else:
        outputs = [video_out.to(q.dtype)]
        if num_text_tokens:
            outputs.append(
                text_query_attention(q[:, :, n - num_text_tokens :], k, v, key_padding_mask, scale).to(
                    q.dtype
                )
            )
        out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    if not return_stats:
        return out
    return out, _summary(*masks, num_text_tokens)


def _summary(critical, dropped, compensated, valid_blocks, num_text_tokens) -> dict:
    """Density / compensation statistics over the video (query block, key block) tiles."""
    valid = valid_blocks.expand_as(critical)
    n_dropped = int(dropped.sum())
    per_head_valid = valid.sum(dim=(0, 2, 3)).clamp_min(1)
    return {
        "density": float(critical.sum()) / max(1, int(valid.sum())),
        "compensated_fraction": float(compensated.sum()) / n_dropped if n_dropped else 0.0,
        "head_density": critical.sum(dim=(0, 2, 3)).float() / per_head_valid,
        "block_mask": critical,
        "compensated_mask": compensated,
        "num_text_tokens": num_text_tokens,
    }
