"""Rectified SpaAttn's selection: block statistics, the IPAR estimate, critical blocks, GAPR and
the compensation keys, written into one :class:`~fastgen.attention.plan.SelectionPlan` that an
engine executes (:func:`~fastgen.attention.execute.execute_plan`).

Model-agnostic: it works on ``[B, H, N, D]`` tensors whose last ``num_text_tokens`` tokens are text
(HunyuanVideo appends text after the video tokens) and whose first ``N - num_text_tokens`` tokens
are video tokens in raster order ``(frame, height, width)``.

Algorithm (DESIGN.md, "Rectified SpaAttn"; the plain-PyTorch ground truth is
:mod:`fastgen.attention.rectified_naive`):

1. Video tokens are reordered into compact 3D tiles (``grid`` given, ``reorder``) and padded to a
   block multiple by one gather per tensor (in the input dtype). One pass of sums gives the pooled
   ``q̄_I``, ``k̄_J``, ``v̄_J`` and counts ``n_J`` (fp32 accumulation); one centred pass gives the
   deviations GAPR needs and the key distances the isolated keys need.
2. IPAR estimate per query block ``I``: ``P_IJ = n_J e^{s_IJ} / (Σ_J' n_J' e^{s_IJ'} + Σ_t e^{s_It})``
   with pooled logits ``s_IJ`` and text logits ``s_It`` (text keys are never pooled; padded text is
   excluded). ``selection="subblock"`` computes it between sub-blocks of ``block_size / pool_splits``
   tokens and sums it per block, which sees peaky mass one pooled key per block hides.
3. Critical blocks: ``selection="pooled"``/``"subblock"``: the top ``keep_count(sparsity)`` blocks
   (plus, with ``mass_threshold``, blocks until the cumulative mass, text first, reaches it).
   ``selection="paper"``: the authors' rule, ``max(#(cumulative mass <= 0.3) + 1, int((1 - sparsity)
   * blocks))`` blocks with the text mass ranked in the same sort, plus every key block with a
   token 3D-adjacent (26-neighbourhood) to a token of the query block and, among the blocks
   holding first-frame tokens, all pairs (the Wan processor's ``first_frame_blocks``).
4. GAPR: a dropped block is compensated only where ``|q̄_I·k̄_J| > |a_I·k̄_J| + |q̄_I·b_J|``
   (``a``/``b`` mean absolute deviations; error 0 = exact pooling, always compensated).
5. The plan: selected blocks, then extra keys: the text keys (weight 1), one pooled key per
   compensated block (log-weight ``log n_J``, value ``v̄_J``; ``form="exact"``), and the isolated
   outlier keys (the keys farthest from their block mean, weight 1, seen where their block is not
   selected and excluded from its pool; ``isolated_keys`` per key block). Text queries run dense.

Forms: ``"exact"`` is one softmax over that mixed-resolution key set; ``"paper"`` is the authors'
``O_i = R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J`` (``SparseAttn`` over the selected and text keys,
``R_I = 1 − Σ_{J comp} P_IJ``); ``"none"`` is plain block-sparse attention with the same selection
(plus isolated keys if asked). The variance correction, value tilt and sub-block compensation keys of
earlier versions are gone: the fidelity bench measured no gain from them (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from ._checks import check_key_padding_mask, check_qkv
from .blocks import (
    default_tile,
    gapr_compensated,
    inverse_permutation,
    keep_count,
    num_blocks,
    tile_permutation,
)
from .execute import execute_plan
from .gather import extended_key_buffer
from .plan import SelectionPlan
from .workspace import Workspace


@dataclass
class BlockStatistics:
    """Per-block quantities of the reordered, block-padded video tokens (fp32)."""

    pooled_q: torch.Tensor
    """``[B, H, nb, D]`` mean query of each block (padding excluded)."""
    pooled_k: torch.Tensor
    """``[B, H, nb, D]`` mean key."""
    key_sums: torch.Tensor
    """``[B, H, nb, D]`` sum of the keys (pools without isolated keys start from it)."""
    value_sums: torch.Tensor
    """``[B, H, nb, D]`` sum of the values."""
    counts: torch.Tensor
    """``[B, nb]`` valid tokens per block (``n_J``)."""
    sub_q: torch.Tensor | None = None
    """``[B, H, nb*splits, D]`` mean query of each sub-block (sub-block estimate only)."""
    sub_k: torch.Tensor | None = None
    """``[B, H, nb*splits, D]`` mean key of each sub-block."""
    sub_counts: torch.Tensor | None = None
    """``[B, nb*splits]`` valid tokens per sub-block."""
    query_deviation: torch.Tensor | None = None
    """``[B, H, nb, D]`` mean ``|q_i − q̄_I|`` (``a_I``, GAPR)."""
    key_deviation: torch.Tensor | None = None
    """``[B, H, nb, D]`` mean ``|k_j − k̄_J|`` (``b_J``, GAPR)."""
    key_distance: torch.Tensor | None = None
    """``[B, H, nb*bs]`` ``‖k_j − k̄_J‖`` (``-inf`` for padding; isolated keys)."""

    @property
    def pooled_v(self) -> torch.Tensor:
        """``[B, H, nb, D]`` mean value of each block."""
        return self.value_sums / self.counts.clamp_min(1.0)[:, None, :, None]


# ---------------------------------------------------------------------------------------------
# Layout: reorder + pad once
# ---------------------------------------------------------------------------------------------


def video_token_index(n_video: int, grid, block_size: int, reorder: bool, device) -> torch.Tensor:
    """Source position of each reordered, block-padded video token ``[ceil(n/bs)*bs]`` (padding
    positions point at token 0 and are zeroed after the gather)."""
    n_pad = num_blocks(n_video, block_size) * block_size
    if grid is not None and reorder:
        order = tile_permutation(tuple(grid), default_tile(block_size), device=device)
    else:
        order = torch.arange(n_video, device=device)
    return torch.cat([order, order.new_zeros(n_pad - n_video)])


def _gather_video(x, token_index, n_video, out=None):
    """Video tokens of ``x`` in the order ``token_index`` (into ``out`` when given); padding rows 0."""
    out = (
        torch.index_select(x, 2, token_index, out=out) if out is not None else x.index_select(2, token_index)
    )
    out[:, :, n_video:] = 0
    return out


# ---------------------------------------------------------------------------------------------
# Statistics (one pass of sums, one centred pass)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()  # feeds only discrete choices (GAPR, isolated keys): no gradient needed
def _centred(x, means, weight, deviation: bool, distance: bool, masked: bool, length: int):
    """Per block of ``x`` ``[B, H, nb*bs, D]``: mean ``|x − x̄|`` ``[B, H, nb, D]`` and ``‖x − x̄‖``
    ``[B, H, nb*bs]``, padding (``weight`` ``[B, nb*bs]`` = 0) excluded; a few heads at a time so the
    centred values stay in cache. Without ``masked`` the padding is only the tail after the first
    ``length`` tokens (zeroed instead of multiplied by the weights)."""
    b, h, nb, d = means.shape
    bs = x.shape[2] // nb
    blocks = x.view(b * h, nb, bs, d)
    w = weight.view(b, 1, nb, bs, 1).expand(b, h, nb, bs, 1).reshape(b * h, nb, bs, 1)
    flat_means = means.reshape(b * h, nb, 1, d)
    mean_abs = torch.empty(b * h, nb, d, device=x.device) if deviation else None
    norms = torch.empty(b * h, nb, bs, device=x.device) if distance else None
    step = max(1, (8 << 20) // (nb * bs * d * 4))
    last = length - (nb - 1) * bs  # valid tokens of the last block
    centred = torch.empty(min(step, b * h), nb, bs, d, device=x.device)
    for start in range(0, b * h, step):
        rows = slice(start, min(b * h, start + step))
        c = torch.sub(blocks[rows], flat_means[rows], out=centred[: rows.stop - start])
        if masked:
            c.mul_(w[rows])
        else:
            c[:, -1, last:] = 0
        if distance:
            norms[rows] = torch.linalg.vector_norm(c, dim=-1)
        if deviation:
            mean_abs[rows] = c.abs_().sum(2)
    if deviation:
        counts = weight.view(b, 1, nb, bs).sum(-1).clamp_min(1.0)  # [B, 1, nb]
        mean_abs = mean_abs.view(b, h, nb, d) / counts[..., None]
    if distance:
        norms = norms.view(b, h, nb * bs).masked_fill(weight[:, None] == 0, float("-inf"))
    return mean_abs, norms


def block_statistics(
    qp: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    block_size: int,
    weight: torch.Tensor,
    *,
    splits: int = 1,
    deviations: bool = True,
    distances: bool = False,
    masked: bool = False,
    length: int | None = None,
) -> BlockStatistics:
    """Statistics of reordered, block-padded video q/k/v ``[B, H, nb*bs, D]`` with token weights
    ``weight`` ``[B, nb*bs]`` (1 = real token, 0 = padding). The rows past the last video token
    are zero; ``masked`` says that ``weight`` also marks padded tokens inside the sequence (their
    rows are then excluded from the sums by a weighted copy). ``length``: video tokens before the
    padding tail (default: all)."""
    b, h, n_pad, d = qp.shape
    nb, sub = n_pad // block_size, block_size // splits
    length = n_pad if length is None else length

    def sums(x):  # [B, H, nb*splits, D] fp32, accumulated without an fp32 copy of x
        if masked:
            x = x * weight[:, None, :, None].to(x.dtype)
        return x.view(b, h, nb * splits, sub, d).sum(3, dtype=torch.float32)

    q_sub, k_sub = sums(qp), sums(kp)
    v_sums = sums(vp).view(b, h, nb, splits, d).sum(3)
    sub_counts = weight.view(b, nb * splits, sub).sum(-1)  # [B, nb*splits]
    counts = sub_counts.view(b, nb, splits).sum(-1)
    denom = counts.clamp_min(1.0)[:, None, :, None]
    k_sums = k_sub.view(b, h, nb, splits, d).sum(3)
    stats = BlockStatistics(
        pooled_q=q_sub.view(b, h, nb, splits, d).sum(3) / denom,
        pooled_k=k_sums / denom,
        key_sums=k_sums,
        value_sums=v_sums,
        counts=counts,
    )
    if splits > 1:
        sub_denom = sub_counts.clamp_min(1.0)[:, None, :, None]
        stats.sub_q, stats.sub_k, stats.sub_counts = q_sub / sub_denom, k_sub / sub_denom, sub_counts
    if deviations or distances:
        stats.key_deviation, stats.key_distance = _centred(
            kp, stats.pooled_k, weight, deviations, distances, masked, length
        )
    if deviations:
        stats.query_deviation, _ = _centred(qp, stats.pooled_q, weight, True, False, masked, length)
    return stats


# ---------------------------------------------------------------------------------------------
# Estimate and selection
# ---------------------------------------------------------------------------------------------


def text_logits(pooled_q, text_k, text_valid, scale) -> torch.Tensor:
    """Logits of pooled queries against the text keys ``[B, H, n, T]`` (padded text: ``-inf``)."""
    logits = torch.matmul(pooled_q, text_k.float().transpose(-1, -2)) * scale
    if text_valid is not None:
        logits = logits.masked_fill(~text_valid[:, None, None, :], float("-inf"))
    return logits


def ipar_estimate(video_logits, text_logits_) -> tuple[torch.Tensor, torch.Tensor]:
    """IPAR: estimated mass of each video key block ``[B, H, nq, nkb]`` and of the text keys
    together ``[B, H, nq]``, normalised over both (logits include ``log n_J``)."""
    norm = torch.logsumexp(torch.cat([video_logits, text_logits_], dim=-1), dim=-1, keepdim=True)
    text_mass = torch.exp(text_logits_ - norm).sum(-1)
    return torch.exp(video_logits - norm), text_mass


def _log_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.log(counts)[:, None, None, :]  # [B, 1, 1, n] (-inf for empty blocks)


def block_mass(stats: BlockStatistics, text_k, text_valid, scale, splits: int):
    """``P_IJ`` ``[B, H, nqb, nkb]`` and the text mass ``[B, H, nqb]``: pooled IPAR (``splits == 1``)
    or the sub-block estimate (sub-block masses summed per key block, averaged over the query
    sub-blocks of each query block weighted by their valid tokens)."""
    if splits == 1:
        logits = torch.matmul(stats.pooled_q, stats.pooled_k.transpose(-1, -2)) * scale
        return ipar_estimate(
            logits + _log_counts(stats.counts), text_logits(stats.pooled_q, text_k, text_valid, scale)
        )
    b, h, ns, _ = stats.sub_q.shape
    nb = ns // splits
    logits = torch.matmul(stats.sub_q, stats.sub_k.transpose(-1, -2)) * scale + _log_counts(stats.sub_counts)
    probs, text_mass = ipar_estimate(logits, text_logits(stats.sub_q, text_k, text_valid, scale))
    probs = probs.view(b, h, nb, splits, nb, splits).sum(-1)  # [B, H, nb, splits, nb]
    weights = stats.sub_counts.view(b, 1, nb, splits)
    total = weights.sum(-1).clamp_min(1.0)
    block_probs = (probs * weights[..., None]).sum(3) / total[..., None]
    block_text = (text_mass.view(b, h, nb, splits) * weights).sum(-1) / total
    return block_probs, block_text


def critical_blocks(probs, text_mass, valid, sparsity: float, mass_threshold: float | None) -> torch.Tensor:
    """Top-k key blocks per query block by estimated mass, plus (optionally) blocks until the
    cumulative mass — text first — reaches ``mass_threshold``. Bool ``[B, H, nqb, nkb]``."""
    k = keep_count(sparsity, probs.shape[-1])
    p = probs.masked_fill(~valid, -1.0)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(k, dim=-1).indices, True)
    if mass_threshold is not None:
        sorted_p, order = probs.masked_fill(~valid, 0.0).sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p + text_mass[..., None]
        keep |= torch.zeros_like(keep).scatter_(-1, order, before < mass_threshold)
    return keep & valid


def paper_critical_blocks(
    probs,
    text_mass,
    valid,
    sparsity: float,
    threshold: float,
    neighbours: torch.Tensor | None,
    has_text: bool,
) -> torch.Tensor:
    """The authors' selection: per query block ``max(#(cumulative mass <= threshold) + 1,
    int((1 - sparsity) * nkb))`` blocks in descending mass, the text mass ranked in the same sort
    (as one entry, when there is text; it counts in the block budget like the authors' text
    blocks), then the ``neighbours`` mask ``[nqb, nkb]`` (3D-adjacent and first-frame
    blocks) added. Bool ``[B, H, nqb, nkb]``."""
    nkb = probs.shape[-1]
    ranked = probs.masked_fill(~valid, 0.0)
    if has_text:  # the text keys are one more entry of the ranking
        ranked = torch.cat([ranked, text_mass[..., None]], dim=-1)
    entries = ranked.shape[-1]
    sorted_p, order = ranked.sort(dim=-1, descending=True)
    needed = (sorted_p.cumsum(-1) <= threshold).sum(-1, keepdim=True) + 1
    needed = needed.clamp_min(max(1, int((1.0 - sparsity) * entries)))
    rank = torch.arange(entries, device=probs.device)
    keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, order, rank < needed)[..., :nkb]
    if neighbours is not None:
        keep |= neighbours
    return keep & valid


def block_neighbours(
    grid, token_index: torch.Tensor, n_video: int, block_size: int, first_frame: bool = True
) -> torch.Tensor:
    """Bool ``[nb, nb]``: key block ``J`` neighbours query block ``I`` when a token of ``J`` lies in
    the 26-neighbourhood of a token of ``I`` (itself included); with ``first_frame``, every pair of
    blocks holding first-frame tokens too."""
    t, h, w = grid
    nb = num_blocks(n_video, block_size)
    device = token_index.device
    block_of = torch.empty(n_video, dtype=torch.long, device=device)
    block_of[token_index[:n_video]] = torch.arange(n_video, device=device) // block_size
    cube = block_of.view(t, h, w)
    pairs = torch.zeros(nb, nb, dtype=torch.bool, device=device)

    def window(size: int, offset: int) -> tuple[slice, slice]:  # positions x and x + offset in range
        return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size + min(0, offset))

    for dt in (-1, 0, 1):
        for dh in (-1, 0, 1):
            for dw in (-1, 0, 1):
                (st, tt), (sh, th), (sw, tw) = window(t, dt), window(h, dh), window(w, dw)
                pairs[cube[st, sh, sw].reshape(-1), cube[tt, th, tw].reshape(-1)] = True
    if first_frame:  # no torch.unique: its output size is data-dependent (a host read, a graph break)
        in_first = torch.zeros(nb, dtype=torch.bool, device=device)
        in_first[cube[0].reshape(-1)] = True
        pairs |= in_first[:, None] & in_first[None, :]
    return pairs


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class RectifiedSelection:
    """What the selection decided, before it is written as a plan (all device tensors)."""

    critical: torch.Tensor
    """bool ``[B, H, nqb, nkb]`` selected key blocks."""
    compensated: torch.Tensor
    """bool ``[B, H, nqb, nkb]`` dropped blocks that get a pooled key (exact / paper forms)."""
    valid: torch.Tensor
    """bool ``[B, 1, 1, nkb]`` key blocks with at least one valid token."""
    probs: torch.Tensor
    """``[B, H, nqb, nkb]`` the estimated block mass ``P_IJ``."""
    isolated: torch.Tensor | None
    """int64 ``[B, H, r]`` positions (reordered) of the isolated keys, or None."""


def select_blocks(
    stats, text_k, text_valid, scale, config: RectifiedSpaAttnConfig, neighbours, splits, n_isolated
):
    """Critical blocks, GAPR compensation and isolated keys of one call (:class:`RectifiedSelection`)."""
    probs, text_mass = block_mass(stats, text_k, text_valid, scale, splits)
    valid = (stats.counts > 0)[:, None, None, :]
    if config.selection == "paper":
        threshold = 0.3 if config.mass_threshold is None else config.mass_threshold
        critical = paper_critical_blocks(
            probs, text_mass, valid, config.sparsity, threshold, neighbours, text_k.shape[2] > 0
        )
    else:
        critical = critical_blocks(probs, text_mass, valid, config.sparsity, config.mass_threshold)
    dropped = valid & ~critical
    if config.form == "none":
        compensated = torch.zeros_like(dropped)
    else:
        compensated = (
            gapr_compensated(
                stats.pooled_q, stats.pooled_k, stats.query_deviation, stats.key_deviation, dropped
            )
            if config.gapr
            else dropped
        )
    isolated = None
    if n_isolated > 0:
        isolated = stats.key_distance.topk(n_isolated, dim=-1).indices
    return RectifiedSelection(critical, compensated, valid, probs, isolated)


def extra_keys(kp, vp, text_k, text_v, text_valid, stats, sel: RectifiedSelection, form, block_size):
    """The extra keys of one call's plan as lists of parts ``(keys, values, log_weights, visible)``:
    the text keys (weight 1, padded: absent), in the exact form one pooled key per compensated block
    (log-weight ``log n_J``), and the isolated keys (weight 1, seen where their block is not
    selected; removed from their block's pool)."""
    b, h, n_pad, d = kp.shape
    nb = stats.counts.shape[-1]
    device = kp.device
    n_text = text_k.shape[2]
    keys, values, log_weights, visible = [], [], [], []
    if n_text:
        keys.append(text_k)
        values.append(text_v)
        weight = torch.zeros(b, 1, n_text, device=device)
        if text_valid is not None:
            weight = weight.masked_fill(~text_valid[:, None, :], float("-inf"))
        log_weights.append(weight.expand(b, h, n_text))
        visible.append(torch.ones(1, 1, 1, n_text, dtype=torch.bool, device=device).expand(b, h, nb, n_text))
    pool_counts = stats.counts[:, None, :].expand(b, h, nb)
    k_sums, v_sums = stats.key_sums, stats.value_sums
    iso_k = iso_v = None
    if sel.isolated is not None:  # isolated keys leave their block's pool and become keys of their own
        owner = sel.isolated // block_size  # [B, H, r]
        rows = sel.isolated[..., None].expand(-1, -1, -1, d)
        iso_k, iso_v = torch.gather(kp, 2, rows), torch.gather(vp, 2, rows)
        idx = owner[..., None].expand(-1, -1, -1, d)
        k_sums = k_sums.scatter_add(2, idx, -iso_k.float())
        v_sums = v_sums.scatter_add(2, idx, -iso_v.float())
        pool_counts = pool_counts.scatter_add(2, owner, -torch.ones_like(owner, dtype=torch.float32))
    if form == "exact":
        denom = pool_counts.clamp_min(1.0)[..., None]
        keys.append(k_sums / denom)
        values.append(v_sums / denom)
        log_weights.append(torch.log(pool_counts))  # -inf for an empty pool
        visible.append(sel.compensated.expand(b, h, -1, -1))
    if iso_k is not None:
        owner_rows = (sel.isolated // block_size)[:, :, None, :].expand(-1, -1, nb, -1)
        keys.append(iso_k)
        values.append(iso_v)
        log_weights.append(torch.zeros(iso_k.shape[:3], device=device))
        visible.append(~torch.gather(sel.critical.expand(b, -1, -1, -1), -1, owner_rows))
    return keys, values, log_weights, visible


def _extras_into(keys, values, dtype, kp_extra, vp_extra):
    """Write the extra keys/values into the buffers after k/v (``kp_extra`` given; rows past the
    last extra key zeroed) or concatenate them (in ``dtype``)."""
    if not keys:
        return None, None
    p = sum(x.shape[2] for x in keys)
    if kp_extra is None:
        return torch.cat([x.to(dtype) for x in keys], 2), torch.cat([x.to(dtype) for x in values], 2)
    start = 0
    for key, value in zip(keys, values):
        end = start + key.shape[2]
        kp_extra[:, :, start:end] = key
        vp_extra[:, :, start:end] = value
        start = end
    kp_extra[:, :, p:] = 0
    vp_extra[:, :, p:] = 0
    return kp_extra, vp_extra


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@dataclass
class RectifiedCall:
    """One call's selection, ready to execute: the reordered, block-padded video q/k/v, the plan
    over them, and what the selection decided (:func:`plan_rectified`)."""

    qp: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    plan: SelectionPlan
    selection: RectifiedSelection
    stats: BlockStatistics
    token_index: torch.Tensor
    """Source position of each reordered video token (then padding)."""
    scale: float


def plan_rectified(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: RectifiedSpaAttnConfig,
    *,
    num_text_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    grid: tuple[int, int, int] | None = None,
    workspace: Workspace | None = None,
    padded_video_keys: bool | None = None,
) -> RectifiedCall:
    """Everything of :func:`rectified_attention` before the attention pass: reorder + pad, block
    statistics, selection, and the plan (what a benchmark times as "selection")."""
    _check_arguments(q, k, v, num_text_tokens, key_padding_mask, grid)
    if not isinstance(config, RectifiedSpaAttnConfig):
        raise ValueError(f"config must be a RectifiedSpaAttnConfig, got {type(config).__name__}")
    b, h, n, d = q.shape
    bs = config.block_size
    n_video = n - num_text_tokens
    nb = num_blocks(n_video, bs)
    n_pad = nb * bs
    scale = 1.0 / math.sqrt(d)
    device = q.device
    video_valid = None if key_padding_mask is None else key_padding_mask[:, :n_video]
    text_valid = None if key_padding_mask is None else key_padding_mask[:, n_video:]
    kt, vt = k[:, :, n_video:], v[:, :, n_video:]
    token_index = video_token_index(n_video, grid, bs, config.reorder, device)

    # the reordered copies (in the input dtype) and, right after k/v, room for the extra keys
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    space = None if grad else workspace
    if video_valid is None:
        padded_video = False
    elif padded_video_keys is None:  # read from the mask: a host sync the caller can spare
        padded_video = not bool(video_valid.all())  # rare: padded video keys
    else:
        padded_video = bool(padded_video_keys)
    fewest_keys = int(video_valid.sum(-1).min()) if padded_video else n_video
    n_isolated = min(round(config.resolved_isolated_keys * nb), fewest_keys)
    n_extra = num_text_tokens + (nb if config.form == "exact" else 0) + n_isolated
    if grad:
        qp = _gather_video(q, token_index, n_video)
        kp = _gather_video(k, token_index, n_video)
        vp = _gather_video(v, token_index, n_video)
        kp_extra = vp_extra = None
    else:
        qp = _gather_video(q, token_index, n_video, _scratch(space, "q", (b, h, n_pad, d), q))
        (kp, kp_extra), (vp, vp_extra) = (
            extended_key_buffer(b, h, n_pad, n_extra, d, bs, k.dtype, device, space, name)
            for name in ("k", "v")
        )
        kp, vp = _gather_video(k, token_index, n_video, kp), _gather_video(v, token_index, n_video, vp)

    weight = torch.zeros(b, n_pad, device=device)
    weight[:, :n_video] = 1.0 if video_valid is None else video_valid[:, token_index[:n_video]].float()
    key_valid = weight > 0 if padded_video else None
    splits = config.pool_splits if config.selection == "subblock" else 1
    stats = block_statistics(
        qp,
        kp,
        vp,
        bs,
        weight,
        splits=splits,
        deviations=config.form != "none" and config.gapr,
        distances=config.resolved_isolated_keys > 0,
        masked=key_valid is not None,
        length=n_video,
    )
    neighbours = None
    if config.selection == "paper" and grid is not None:
        neighbours = block_neighbours(tuple(grid), token_index, n_video, bs)
    sel = select_blocks(stats, kt, text_valid, scale, config, neighbours, splits, n_isolated)

    keys, values, log_weights, visible = extra_keys(kp, vp, kt, vt, text_valid, stats, sel, config.form, bs)
    extra_k, extra_v = _extras_into(keys, values, k.dtype, kp_extra, vp_extra)
    top_k = config.selection != "paper" and config.mass_threshold is None  # rows hold <= keep_count
    # the table width: keep_count bounds a top-k selection; otherwise the widest row, read back (a
    # host sync) in eager mode, all key blocks (no read) under torch.compile
    width = keep_count(config.sparsity, nb) if top_k else (nb if torch.compiler.is_compiling() else None)
    plan = SelectionPlan.from_block_mask(
        sel.critical.expand(b, -1, -1, -1),
        bs,
        n_pad,
        n_video if key_valid is None else n_pad,
        max_count=width,
        extra_k=extra_k,
        extra_v=extra_v,
        extra_log_weight=torch.cat(log_weights, -1) if log_weights else None,
        extra_visible=torch.cat(visible, -1) if visible else None,
        key_valid=key_valid,
    )
    return RectifiedCall(qp, kp, vp, plan, sel, stats, token_index, scale)


def rectified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: RectifiedSpaAttnConfig,
    *,
    num_text_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    grid: tuple[int, int, int] | None = None,
    return_stats: bool = False,
    backend: str | None = None,
    workspace: Workspace | None = None,
    padded_video_keys: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Rectified block-sparse self-attention on ``[B, H, N, D]`` (video tokens first, then text),
    with the method's settings in ``config`` (its ``dense_layers``/``warmup_steps``/``min_tokens``
    belong to the processors and are not read here). See :func:`rectified_sparse_attention`.

    ``padded_video_keys``: whether ``key_padding_mask`` marks any video key as padding; None reads
    it from the mask (one host sync), False/True is the caller's knowledge (HunyuanVideo's mask
    only ever pads text)."""
    call = plan_rectified(
        q,
        k,
        v,
        config,
        num_text_tokens=num_text_tokens,
        key_padding_mask=key_padding_mask,
        grid=grid,
        workspace=workspace,
        padded_video_keys=padded_video_keys,
    )
    video_out = execute_plan(call.qp, call.kp, call.vp, call.plan, backend=backend, scale=call.scale)
    if config.form == "paper":
        video_out = paper_rectification(
            video_out, call.selection.probs, call.stats, call.selection.compensated, config.block_size
        )
    n_video = q.shape[2] - num_text_tokens
    out = _assemble(q, k, v, video_out, call.token_index, n_video, key_padding_mask, call.scale)
    if not return_stats:
        return out
    return out, _summary(call.selection, call.plan, num_text_tokens)


def paper_rectification(sparse_out, probs, stats: BlockStatistics, compensated, block_size) -> torch.Tensor:
    """Paper form ``R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J`` on block-padded rows (fp32 out, q dtype)."""
    comp = probs * compensated
    retained = 1.0 - comp.sum(-1)  # [B, H, nqb]
    pooled_term = torch.matmul(comp, stats.pooled_v)  # [B, H, nqb, D]
    b, h, n_pad, d = sparse_out.shape
    blocks = (
        sparse_out.float().view(b, h, -1, block_size, d) * retained[..., None, None]
        + pooled_term[:, :, :, None]
    )
    return blocks.view(b, h, n_pad, d).to(sparse_out.dtype)


def text_query_attention(q_text, k, v, key_valid, scale) -> torch.Tensor:
    """Dense attention of the text queries ``[B, H, T, D]`` over every valid key through SDPA (never
    holds the ``T x N`` scores); a row without any valid key gives 0. Output in q's dtype."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q_text, k, v, attn_mask=mask, scale=scale)
    if key_valid is not None:
        out = out.masked_fill(~key_valid.any(-1)[:, None, None, None], 0.0)
    return out


def _assemble(q, k, v, video_out, token_index, n_video, key_padding_mask, scale):
    """Output in q's memory layout: video rows un-permuted, text rows by dense attention."""
    b, h, n, d = q.shape
    tokens_major = q.stride(1) == d and q.stride(2) == h * d
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device).transpose(1, 2) if tokens_major else None
    inverse = inverse_permutation(token_index[:n_video]) if n_video else token_index[:0]
    video = video_out.index_select(2, inverse)
    if n == n_video:
        if out is None:
            return video
        out.copy_(video)
        return out
    text = text_query_attention(q[:, :, n_video:], k, v, key_padding_mask, scale).to(q.dtype)
    if out is None:
        return torch.cat([video, text], dim=2)
    out[:, :, :n_video] = video
    out[:, :, n_video:] = text
    return out


def _summary(sel: RectifiedSelection, plan: SelectionPlan, num_text_tokens: int) -> dict:
    """Statistics of one call, as device tensors (no host sync): density over the valid video
    tiles, compensated fraction of the dropped ones, per-head density, keys per query (the extra
    keys counted) and the masks."""
    valid = sel.valid.expand_as(sel.critical)
    dropped = valid & ~sel.critical
    n_valid = valid.sum(dtype=torch.float32).clamp_min(1.0)
    return {
        "density": sel.critical.sum(dtype=torch.float32) / n_valid,
        "compensated_fraction": sel.compensated.sum(dtype=torch.float32)
        / dropped.sum(dtype=torch.float32).clamp_min(1.0),
        "head_density": sel.critical.sum(dim=(0, 2, 3), dtype=torch.float32)
        / valid.sum(dim=(0, 2, 3)).clamp_min(1),
        "keys_per_query": plan.keys_per_query(),
        "block_mask": sel.critical,
        "compensated_mask": sel.compensated,
        "num_text_tokens": num_text_tokens,
    }


def _scratch(workspace, name, shape, like):
    return None if workspace is None else workspace.empty(name, shape, like.dtype, like.device)


def _check_arguments(q, k, v, num_text_tokens, key_padding_mask, grid):
    check_qkv(q, k, v)
    if q.shape != k.shape:
        raise ValueError(
            f"rectified_sparse_attention is self-attention: q {tuple(q.shape)} and k {tuple(k.shape)} "
            "must have the same shape"
        )
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
    backend: str | None = None,
    workspace: Workspace | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Rectified block-sparse self-attention on ``[B, H, N, D]`` (video tokens first, then text).

    A thin wrapper: builds a :class:`~fastgen.RectifiedSpaAttnConfig` from ``sparsity``,
    ``block_size`` and ``options`` (its fields: ``form``, ``selection``, ``pool_splits``,
    ``isolated_keys``, ``mass_threshold``, ``gapr``, ``reorder``; validated there) and calls
    :func:`rectified_attention`.

    Args:
        q, k, v: ``[B, H, N, D]``; the last ``num_text_tokens`` tokens are text.
        sparsity: fraction of video key blocks dropped per video query block, in [0, 1).
        block_size: tokens per block (power of two >= 16).
        num_text_tokens: trailing text tokens, in [0, N); their keys are always kept and their
            queries attend densely.
        key_padding_mask: optional bool ``[B, N]``, True for real tokens (e.g. padded text = False).
        grid: ``(frames, height, width)`` of the video tokens (product ``N - num_text_tokens``);
            with ``reorder`` it groups video tokens into compact 3D tiles before blocking.
        return_stats: also return a dict of device tensors: ``density``, ``compensated_fraction``,
            ``head_density`` ``[H]``, ``keys_per_query`` (extra keys counted), ``block_mask`` and
            ``compensated_mask`` (bool ``[B, H, nqb, nkb]``, video blocks in the reordered order).
        backend: engine (see :func:`~fastgen.attention.execute.execute_plan`).
        workspace: a :class:`~fastgen.attention.Workspace` for the reordered copies of q/k/v.

    Returns:
        ``out`` ``[B, H, N, D]`` in q's dtype and memory layout (a transposed ``[B, N, H, D]`` q
        gives an output of that layout), and the stats dict when ``return_stats``.

    Example:
        >>> import torch
        >>> from fastgen.attention import rectified_sparse_attention
        >>> q, k, v = torch.randn(3, 1, 2, 4 * 16 * 16 + 20, 64).unbind(0)  # 1024 video + 20 text tokens
        >>> out, stats = rectified_sparse_attention(q, k, v, sparsity=0.8, block_size=64,
        ...                                         num_text_tokens=20, grid=(4, 16, 16), return_stats=True)
        >>> out.shape
        torch.Size([1, 2, 1044, 64])
        >>> 0.15 < float(stats["density"]) < 0.35  # about 1 - sparsity of the video key blocks computed
        True
    """
    unknown = sorted(set(options) - set(_OP_OPTIONS))
    if unknown:
        raise ValueError(
            f"rectified_sparse_attention got unknown option(s) {unknown}; allowed: {sorted(_OP_OPTIONS)}"
        )
    config = RectifiedSpaAttnConfig(sparsity=sparsity, block_size=block_size, **options)
    return rectified_attention(
        q,
        k,
        v,
        config,
        num_text_tokens=num_text_tokens,
        key_padding_mask=key_padding_mask,
        grid=grid,
        return_stats=return_stats,
        backend=backend,
        workspace=workspace,
    )


_OP_OPTIONS = ("form", "selection", "pool_splits", "isolated_keys", "mass_threshold", "gapr", "reorder")


__all__ = [
    "BlockStatistics",
    "RectifiedSelection",
    "block_mass",
    "block_neighbours",
    "block_statistics",
    "critical_blocks",
    "gapr_compensated",
    "paper_critical_blocks",
    "plan_rectified",
    "rectified_attention",
    "rectified_sparse_attention",
]
