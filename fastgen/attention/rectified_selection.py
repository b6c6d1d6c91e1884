"""Rectified SpaAttn's selection (:mod:`fastgen.attention.rectified` describes the method): the video
tokens' layout (3D tiles, block padding), the per-block statistics, the IPAR estimate of each key
block's attention mass, the critical blocks (top-k, cumulative mass or the authors' rule with 3D
neighbours), and GAPR's choice of the dropped blocks to compensate, gathered in one
:class:`RectifiedSelection`. Model-agnostic; plain PyTorch on ``[B, H, N, D]`` tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from .blocks import (
    default_tile,
    gapr_compensated,
    keep_count,
    num_blocks,
    tile_permutation,
)


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


def gather_video(x, token_index, n_video, out=None):
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
