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

The code follows these steps: :mod:`~fastgen.attention.rectified_selection` (layout, statistics,
IPAR, critical blocks, GAPR: steps 1-4), :mod:`~fastgen.attention.rectified_compensation` (the extra
keys of step 5 and the paper form's rectification), and this module, the public one: the plan
(:func:`plan_rectified`), the entry points and the assembly of the output. It re-exports the names of
the other two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from ._checks import check_key_padding_mask, check_qkv
from .blocks import gapr_compensated, inverse_permutation, keep_count, num_blocks
from .execute import execute_plan
from .gather import extended_key_buffer
from .plan import SelectionPlan
from .rectified_compensation import extra_keys, paper_rectification, place_extra_keys
from .rectified_selection import (
    BlockStatistics,
    RectifiedSelection,
    block_mass,
    block_neighbours,
    block_statistics,
    critical_blocks,
    gather_video,
    ipar_estimate,
    paper_critical_blocks,
    select_blocks,
    text_logits,
    video_token_index,
)
from .workspace import Workspace

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
    scale = 1.0 / math.sqrt(d)
    video_valid = None if key_padding_mask is None else key_padding_mask[:, :n_video]
    text_valid = None if key_padding_mask is None else key_padding_mask[:, n_video:]
    kt, vt = k[:, :, n_video:], v[:, :, n_video:]
    token_index = video_token_index(n_video, grid, bs, config.reorder, q.device)
    padded_video = _has_padded_video(video_valid, padded_video_keys)
    fewest_keys = int(video_valid.sum(-1).min()) if padded_video else n_video
    n_isolated = min(round(config.resolved_isolated_keys * nb), fewest_keys)
    n_extra = num_text_tokens + (nb if config.form == "exact" else 0) + n_isolated
    qp, (kp, kp_extra), (vp, vp_extra) = _reordered_copies(
        q, k, v, token_index, n_video, n_extra, bs, workspace
    )

    weight = torch.zeros(b, nb * bs, device=q.device)
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
    extra_k, extra_v = place_extra_keys(keys, values, k.dtype, kp_extra, vp_extra)
    plan = SelectionPlan.from_block_mask(
        sel.critical.expand(b, -1, -1, -1),
        bs,
        nb * bs,
        n_video if key_valid is None else nb * bs,
        max_count=_table_width(config, nb),
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


def _has_padded_video(video_valid, padded_video_keys) -> bool:
    """Whether any video key is padding: the caller's ``padded_video_keys`` when given, else read
    from the mask (a host sync the caller can spare; padded video keys are rare)."""
    if video_valid is None:
        return False
    if padded_video_keys is None:
        return not bool(video_valid.all())
    return bool(padded_video_keys)


def _reordered_copies(q, k, v, token_index, n_video, n_extra, block_size, workspace):
    """The reordered, block-padded video q/k/v (in the input dtype) as ``qp, (kp, kp_extra),
    (vp, vp_extra)``: without autograd k/v sit in buffers with room for ``n_extra`` extra keys
    right after them (``kp_extra``/``vp_extra`` views of that room, from ``workspace`` when given);
    under autograd plain copies (no workspace, extras None)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        qp, kp, vp = (gather_video(x, token_index, n_video) for x in (q, k, v))
        return qp, (kp, None), (vp, None)
    b, h, _, d = q.shape
    n_pad = token_index.shape[0]
    qp = gather_video(q, token_index, n_video, _scratch(workspace, "q", (b, h, n_pad, d), q))
    kv = []
    for x, name in ((k, "k"), (v, "v")):  # both in k's dtype, like the extra keys they hold
        buffer, extra = extended_key_buffer(
            b, h, n_pad, n_extra, d, block_size, k.dtype, q.device, workspace, name
        )
        kv.append((gather_video(x, token_index, n_video, buffer), extra))
    return qp, kv[0], kv[1]


def _table_width(config: RectifiedSpaAttnConfig, nb: int) -> int | None:
    """The plan's index-table width: ``keep_count`` bounds a top-k selection; otherwise the widest
    row, read back (a host sync, None) in eager mode, all key blocks (no read) under torch.compile."""
    if config.selection != "paper" and config.mass_threshold is None:  # rows hold <= keep_count
        return keep_count(config.sparsity, nb)
    return nb if torch.compiler.is_compiling() else None


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


# the selection and compensation steps live in rectified_selection / rectified_compensation; this
# module, the one the docs name, re-exports them
__all__ = [
    "BlockStatistics",
    "RectifiedCall",
    "RectifiedSelection",
    "block_mass",
    "block_neighbours",
    "block_statistics",
    "critical_blocks",
    "extra_keys",
    "gapr_compensated",
    "ipar_estimate",
    "paper_critical_blocks",
    "paper_rectification",
    "plan_rectified",
    "rectified_attention",
    "rectified_sparse_attention",
    "select_blocks",
    "text_logits",
    "text_query_attention",
    "video_token_index",
]
