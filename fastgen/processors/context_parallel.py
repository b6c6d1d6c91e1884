"""fastgen's sparse attention under diffusers' context parallelism (Ulysses, ring, unified).

diffusers shards a video transformer's token sequence over the ranks of a context-parallel mesh
(``transformer.enable_parallelism(config=ContextParallelConfig(...))`` under ``torchrun``): every
rank holds ``S/P`` tokens of every layer. A per-head block-sparse method (Rectified SpaAttn) needs
each head's *whole* sequence to select its critical blocks, so the processors' self-attention goes
through this module when ``processor._parallel_config`` is set:

- **Ulysses** (``ulysses_degree=U``): q/k/v are exchanged with diffusers' own all-to-all
  (``SeqAllToAllDim``, the helper its unified attention uses) over the mesh's ``ulysses`` group, so
  rank ``u`` holds all tokens, in global order, for heads ``[u*H/U, (u+1)*H/U)``. The method runs
  there unchanged with the *global* video grid (from the step tracker, which reads the unsplit
  latent; never the rank's slice of the RoPE table), its selection, output, block masks and
  per-head statistics are those of the single-process run for those heads, and the output is
  exchanged back. Recorded statistics carry ``first_head`` (the global index of the rank's first
  head); :func:`gathered_layer_stats` assembles every head's.
- **Ring** (``ring_degree=R``) and unified (both > 1): diffusers' ring all-gathers K/V on every
  rank, so the exact sparse equivalent needs no log-sum-exp merge: q, k, v of the ring group are
  all-gathered, the selection runs on the whole sequence (the single-process one) and the plan
  runs only for the query blocks holding the rank's video tokens (forms ``"exact"``/``"none"``;
  HunyuanVideo's text rows attend densely, as in one process). ``form="paper"`` runs dense with a
  log line, in the same all-gather-K/V form (local queries against every key, exact with any
  backend, masks included).
- **HunyuanVideo** (plan in :mod:`fastgen.processors.context_parallel_plans`): rank ``r`` holds
  ``[V_r; T_r]`` (its video share, then its text share), so after the exchange the sequence is
  ``[V_0, T_0, V_1, T_1, ...]``; it is put in the model's ``[V; T]`` order (where the padding mask
  built by the model applies) before attention and back after it.

Anything the sparse path cannot serve (heads not divisible by U, an unknown or mismatching grid,
the "anything" modes, ring) runs dense *under CP* with a log line naming the reason; the dense
path is exact under CP (tests: ``tests/test_context_parallel.py``).

Enabling (the library call behind ``--context-parallel``)::

    torchrun --nproc-per-node 8 generate.py   # each rank:
    >>> import torch.distributed as dist
    >>> dist.init_process_group("nccl"); torch.cuda.set_device(dist.get_rank())
    >>> pipe = diffusers.WanPipeline.from_pretrained(...).to("cuda")
    >>> fastgen.apply_sparse_attention(pipe.transformer, RectifiedSpaAttnConfig())
    >>> enable_context_parallel(pipe, "ulysses")  # ContextParallelConfig(ulysses_degree=8)
    >>> video = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0)).frames[0]  # same on every rank
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MODES = ("ulysses", "ring", "unified")
"""Values of ``enable_context_parallel(mode=...)`` / ``--context-parallel``."""


# ------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class ContextParallelLayout:
    """Where this rank sits in diffusers' context-parallel mesh (read from its ``ContextParallelConfig``)."""

    ulysses: int
    """Ulysses degree U (ranks that exchange heads for tokens)."""
    ring: int
    """Ring degree R (ranks that all-gather K/V)."""
    ulysses_rank: int
    """This rank's index in its Ulysses group: it holds heads ``[ulysses_rank*H/U, ...)`` after the exchange."""
    ring_rank: int
    """This rank's index in its ring group."""
    rank: int
    """Index in the flattened ``(ring, ulysses)`` mesh: the rank holds token share ``rank`` of ``world``."""
    world: int
    """Context-parallel size P = R*U (the number of token shares)."""
    ulysses_group: object
    """Process group of the Ulysses dimension (from the config's mesh)."""
    ring_group: object
    """Process group of the ring dimension (from the config's mesh)."""
    uneven: bool
    """Whether a diffusers "anything" mode (uneven shares) is on: the sparse path does not serve it."""


def context_parallel_layout(parallel_config) -> ContextParallelLayout | None:
    """The layout of diffusers' ``ParallelConfig`` (or ``ContextParallelConfig``) after ``setup``; None
    without context parallelism."""
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None or getattr(cp, "_mesh", None) is None:
        return None
    u, r = int(cp.ulysses_degree), int(cp.ring_degree)
    return ContextParallelLayout(
        ulysses=u,
        ring=r,
        ulysses_rank=int(cp._ulysses_local_rank),
        ring_rank=int(cp._ring_local_rank),
        rank=int(cp._ring_local_rank) * u + int(cp._ulysses_local_rank),
        world=u * r,
        ulysses_group=cp._ulysses_mesh.get_group(),
        ring_group=cp._ring_mesh.get_group(),
        uneven=bool(getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False)),
    )


def layout_of(processor) -> ContextParallelLayout:
    """The processor's layout, cached on the processor instance for its current parallel config."""
    config = processor._parallel_config
    cached = getattr(processor, "_fastgen_cp_layout", None)
    if cached is None or cached[0] is not config:
        cached = (config, context_parallel_layout(config))
        processor._fastgen_cp_layout = cached
    return cached[1]


# ------------------------------------------------------------------------------- exchanges


def heads_to_sequence(x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """Ulysses in: ``[B, S/U, H, D]`` (token share, all heads) -> ``[B, S, H/U, D]`` (all tokens of the
    group in rank order, heads ``[u*H/U, (u+1)*H/U)``), with diffusers' all-to-all."""
    if layout.ulysses == 1:
        return x
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(layout.ulysses_group, x.contiguous(), 2, 1)


def sequence_to_heads(x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """Ulysses out: the inverse of :func:`heads_to_sequence`."""
    if layout.ulysses == 1:
        return x
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(layout.ulysses_group, x.contiguous(), 1, 2)


def gather_ring(x: torch.Tensor, layout: ContextParallelLayout, dim: int = 1) -> torch.Tensor:
    """All-gather ``x`` along ``dim`` over the ring group (rank order), as diffusers' ring attention
    does with K/V (functional collective; autograd-aware)."""
    if layout.ring == 1:
        return x
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_gather_tensor(x.contiguous(), gather_dim=dim, group=layout.ring_group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


# --------------------------------------------------------------------------- token order


def interleaved_order(n_video: int, n_text: int, world: int, device=None) -> torch.Tensor:
    """Global ``[V; T]`` index of each position of the exchanged sequence ``[V_0, T_0, ..., V_{P-1}, T_{P-1}]``
    (video share ``V_r`` and text share ``T_r`` of rank r); ``world`` must divide both lengths."""
    sv, st = n_video // world, n_text // world
    ranks = torch.arange(world, device=device)[:, None]
    video = ranks * sv + torch.arange(sv, device=device)
    text = n_video + ranks * st + torch.arange(st, device=device)
    return torch.cat([video, text], dim=1).reshape(-1)


def deinterleave(x: torch.Tensor, n_text_share: int, world: int) -> torch.Tensor:
    """``[B, P*(Sv/P + St/P), ...]`` in rank-interleaved order -> ``[B, Sv + St, ...]`` in ``[V; T]`` order."""
    blocks = x.unflatten(1, (world, -1))
    video = blocks[:, :, : blocks.shape[2] - n_text_share].flatten(1, 2)
    text = blocks[:, :, blocks.shape[2] - n_text_share :].flatten(1, 2)
    return torch.cat([video, text], dim=1)


def reinterleave(x: torch.Tensor, n_text_share: int, world: int) -> torch.Tensor:
    """The inverse of :func:`deinterleave`."""
    n_text = n_text_share * world
    video = x[:, : x.shape[1] - n_text].unflatten(1, (world, -1))
    text = x[:, x.shape[1] - n_text :].unflatten(1, (world, -1))
    return torch.cat([video, text], dim=2).flatten(1, 2)


# ------------------------------------------------------------------------------ decisions


def _unsupported(layout: ContextParallelLayout, ring_ok: bool = False) -> str | None:
    """Why the sparse path cannot run under this layout (None: it can); ``ring_ok``: the caller has a
    ring form for this call."""
    if layout.uneven:
        return "diffusers' ulysses_anything / ring_anything modes (uneven token shares) are not served sparse"
    if layout.ring > 1 and not ring_ok:
        return f"ring_degree={layout.ring}: this sparse call runs under Ulysses only"
    return None


def _grid_reason(grid, n_video: int) -> str | None:
    if grid is None:
        return (
            "the global video grid is unknown (the rank's RoPE slice is not used; install with "
            "fastgen.apply_sparse_attention or register a step tracker)"
        )
    if grid[0] * grid[1] * grid[2] != n_video:
        return f"the tracked grid {tuple(grid)} does not match the {n_video} video tokens"
    return None


def _note_heads(processor, layer: int, first_head: int) -> None:
    stats = processor._last.get(layer)
    if stats is not None:
        stats["first_head"] = first_head


def check_heads(layout: ContextParallelLayout, heads: int) -> None:
    if heads % layout.ulysses:
        raise ValueError(
            f"context parallelism: {heads} attention heads are not divisible by ulysses_degree={layout.ulysses}; "
            "allowed: a ulysses_degree that divides the head count (use ring for the rest)"
        )


# --------------------------------------------------------------------------- Wan (video only)


def wan_self_attention(processor, layer: int, step: int, grid, query, key, value) -> torch.Tensor:
    """Self-attention of a fastgen Wan processor under context parallelism.

    ``query``/``key``/``value``: the rank's token share ``[B, S/P, H, D]`` (projected, normed, rotated
    with the rank's RoPE slice); returns the same shape. ``grid``: the global latent grid of the call
    (the step tracker's); ``step``/``layer``: the processor's warm-up/dense-layer decision inputs.
    """
    layout = layout_of(processor)
    _, s_local, heads, head_dim = query.shape
    check_heads(layout, heads)
    n_tokens = s_local * layout.world
    ring_ok = processor.config.form in RING_FORMS
    reason = (
        _unsupported(layout, ring_ok)
        or processor.sparse_reason(layer, step, n_tokens, head_dim)
        or _grid_reason(grid, n_tokens)
    )
    if reason is not None:
        processor.fallback(f"{reason} (context parallelism)")
        return _dense(processor, layout, query, key, value)
    q, k, v = (heads_to_sequence(t, layout) for t in (query, key, value))
    if layout.ring > 1:
        out = _ring_sparse(processor, layer, q, k, v, tuple(grid), layout)
    else:
        out = processor.sparse(layer, q, k, v, grid=tuple(grid))
    _note_heads(processor, layer, layout.ulysses_rank * (heads // layout.ulysses))
    return sequence_to_heads(out, layout)


RING_FORMS = ("exact", "none")
"""Rectified SpaAttn forms served under ring (row-wise per query block; ``"paper"`` runs dense)."""


def _ring_sparse(
    processor,
    layer: int,
    q,
    k,
    v,
    grid,
    layout: ContextParallelLayout,
    *,
    text_share: int = 0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified SpaAttn for the ring rank's query rows ``[B, S/R, h, D]`` over every key, exact (no
    log-sum-exp merge): q, k, v are all-gathered over the ring (diffusers' ring gathers K/V the same
    way), the selection runs on the whole sequence (the single-process selection), and the plan is
    executed for the query blocks that hold this rank's video tokens only; its text queries (HunyuanVideo:
    ``text_share`` = St/P per rank, sequence rank-interleaved) attend densely to every valid key, as in
    one process."""
    from dataclasses import replace

    from fastgen.attention.execute import execute_plan
    from fastgen.attention.rectified import _summary, plan_rectified, text_query_attention

    config = processor.config
    q_all, k_all, v_all = (gather_ring(t, layout) for t in (q, k, v))  # [B, S, h, D]
    if text_share:  # rank-interleaved [V_0, T_0, V_1, T_1, ...] -> [V; T]
        q_all, k_all, v_all = (deinterleave(t, text_share, layout.world) for t in (q_all, k_all, v_all))
        q = deinterleave(q, text_share, layout.ulysses)  # this ring rank's [V_r; T_r]
    n_text = text_share * layout.world
    n_video = q_all.shape[1] - n_text
    video_share = n_video // layout.ring
    q_all, k_all, v_all = (t.transpose(1, 2) for t in (q_all, k_all, v_all))  # [B, h, S, D]
    call = plan_rectified(
        q_all,
        k_all,
        v_all,
        config,
        num_text_tokens=n_text,
        key_padding_mask=key_padding_mask,
        grid=grid,
        padded_video_keys=False if key_padding_mask is not None else None,
    )
    geometry = (tuple(grid), config.reorder, config.block_size)
    blocks, rows = _ring_rows(processor, call.token_index, n_video, geometry, video_share, layout)
    plan = call.plan
    sub = replace(
        plan,
        q_len=blocks.numel() * config.block_size,
        block_indices=plan.block_indices.index_select(2, blocks).contiguous(),
        block_counts=plan.block_counts.index_select(2, blocks).contiguous(),
        extra_visible=None if plan.extra_visible is None else plan.extra_visible.index_select(2, blocks),
    )
    qp = call.qp.unflatten(2, (-1, config.block_size)).index_select(2, blocks).flatten(2, 3)
    out = execute_plan(qp, call.kp, call.vp, sub, scale=call.scale)  # [B, h, blocks*bs, D]
    out = out.index_select(2, rows)  # [B, h, video_share, D]
    if n_text:
        q_text = q[:, video_share:].transpose(1, 2)
        text = text_query_attention(q_text, k_all, v_all, key_padding_mask, call.scale).to(out.dtype)
        out = torch.cat([out, text], dim=2)
    if processor.record_stats != "off":
        stats = _summary(call.selection, call.plan, n_text)
        kept = ("density", "compensated_fraction", "keys_per_query", "head_density")
        if processor.record_stats == "masks":
            kept += ("block_mask", "compensated_mask")
        processor._last[layer] = {name: stats[name] for name in kept}
    out = out.transpose(1, 2)  # [B, S/R, h, D]
    return reinterleave(out, text_share, layout.ulysses) if text_share else out


def _ring_rows(processor, token_index, n_video: int, geometry: tuple, share: int, layout):
    """Query blocks (in the selection's reordered order) that hold the ring rank's tokens, and the row of
    each of its tokens in those blocks; computed once per geometry ``(grid, reorder, block_size)``
    (one host read) and cached on the processor."""
    block_size = geometry[-1]
    key = (n_video, geometry, share, layout.ring_rank, token_index.device)
    cache = processor.__dict__.setdefault("_fastgen_ring_rows", {})
    if key not in cache:
        index = token_index[:n_video].cpu()
        start = layout.ring_rank * share
        position = torch.empty(n_video, dtype=torch.long)
        position[index] = torch.arange(n_video)  # reordered position of each source token
        local = position[start : start + share]
        blocks = torch.unique(local // block_size)  # sorted
        slot = torch.full((int(blocks.max()) + 1,), -1, dtype=torch.long)
        slot[blocks] = torch.arange(blocks.numel())
        rows = slot[local // block_size] * block_size + local % block_size
        cache[key] = (blocks.to(token_index.device), rows.to(token_index.device))
    return cache[key]


def _dense(processor, layout, query, key, value, mask=None) -> torch.Tensor:
    """Dense self-attention on token shares under CP: diffusers' own CP attention for Ulysses (the
    user's backend), the all-gather-K/V form (exact, any backend) with a ring."""
    if layout.ring == 1:
        return processor.dense(query, key, value, mask, processor._parallel_config)
    q, k, v = (heads_to_sequence(t, layout) for t in (query, key, value))
    k, v = gather_ring(k, layout), gather_ring(v, layout)
    return sequence_to_heads(processor.dense(q, k, v, mask, None), layout)


# ---------------------------------------------------------------- HunyuanVideo (video + text)


def hunyuan_joint_attention(
    processor, layer: int, step: int, grid, query, key, value, attention_mask, n_text_share: int
) -> torch.Tensor:
    """Joint video+text attention of fastgen's HunyuanVideo processor under context parallelism.

    ``query``/``key``/``value``: the rank's ``[V_r; T_r]`` ``[B, Sv/P + St/P, H, D]`` (RoPE on the video
    part with the rank's slice); ``attention_mask``: the model's full-length key mask ``[B, 1, 1, Sv+St]``
    in ``[V; T]`` order (fastgen's plan leaves it so for fastgen processors); ``n_text_share``: St/P.
    Returns ``[B, Sv/P + St/P, H, D]`` in the input order.
    """
    from .rectified_base import key_padding_from_attention_mask

    layout = layout_of(processor)
    batch, s_local, heads, head_dim = query.shape
    check_heads(layout, heads)
    world = layout.world
    n_text = n_text_share * world
    n_tokens = s_local * world
    n_video = n_tokens - n_text
    if attention_mask is not None and attention_mask.shape[-1] != n_tokens:
        raise ValueError(
            f"context parallelism: attention_mask of {attention_mask.shape[-1]} keys does not cover the "
            f"{n_tokens} tokens of the call; allowed: the model's full-length [video; text] mask"
        )
    reason = (
        _unsupported(layout, processor.config.form in RING_FORMS)
        or processor.sparse_reason(layer, step, n_video, head_dim)
        or _grid_reason(grid, n_video)
    )
    padding = None
    if reason is None:
        try:
            padding = key_padding_from_attention_mask(attention_mask, batch, n_tokens)
        except LookupError as err:
            reason = str(err)
    # [B, S/P, H, D] -> all tokens of the Ulysses group, local heads, then every ring share's keys
    q, k, v = (heads_to_sequence(t, layout) for t in (query, key, value))
    if reason is None and layout.ring > 1:
        out = _ring_sparse(
            processor, layer, q, k, v, tuple(grid), layout, text_share=n_text_share, key_padding_mask=padding
        )
        _note_heads(processor, layer, layout.ulysses_rank * (heads // layout.ulysses))
        return sequence_to_heads(out, layout)
    k, v = gather_ring(k, layout), gather_ring(v, layout)
    k, v = deinterleave(k, n_text_share, world), deinterleave(v, n_text_share, world)
    if reason is not None:
        processor.fallback(f"{reason} (context parallelism)")
        # queries stay in exchanged order (rows follow them), keys are in [V; T] order: the model's
        # key mask applies as built; a per-query mask keeps the rows of this rank's queries
        if attention_mask is not None and attention_mask.ndim >= 2 and attention_mask.shape[-2] > 1:
            rows = interleaved_order(n_video, n_text, world, attention_mask.device)
            span = q.shape[1]
            attention_mask = attention_mask.index_select(
                -2, rows[layout.ring_rank * span : (layout.ring_rank + 1) * span]
            )
        return sequence_to_heads(processor.dense(q, k, v, attention_mask, None), layout)
    q = deinterleave(q, n_text_share, world)
    out = processor.sparse(
        layer,
        q,
        k,
        v,
        num_text_tokens=n_text,
        key_padding_mask=padding,
        grid=tuple(grid),
        padded_video_keys=False if padding is not None else None,
    )
    _note_heads(processor, layer, layout.ulysses_rank * (heads // layout.ulysses))
    return sequence_to_heads(reinterleave(out, n_text_share, world), layout)


# ------------------------------------------------------------------- causal Wan (KV-cached)


def unsplit_rope_forward(module: torch.nn.Module, forward, hook_name: str):
    """The forward a RoPE hook (``hook_name`` in ``module``'s diffusers ``HookRegistry``) should call for
    the whole table: ``forward`` itself, or the module class's unhooked forward when diffusers'
    context-parallel split hook was registered before it (it would hand back the rank's slice)."""
    import functools

    registry = getattr(module, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    if hook_name not in order:
        return forward
    inner = order[: order.index(hook_name)]
    if any(name.startswith(("cp_input---", "cp_output---")) for name in inner):
        return functools.partial(type(module).forward, module)
    return forward


# ------------------------------------------------------------------------------- statistics


def gathered_layer_stats(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics of every head under Ulysses: each rank's :func:`fastgen.attention_stats`
    rows joined over the Ulysses group (a collective: call it on every rank; statistics are opt-in, so
    record them first on every rank with ``fastgen.record_attention_stats(model, "summary")``). Every head has the same
    valid blocks and every rank the same number of heads, so ``density`` and ``keys_per_query`` are
    the means over ranks, ``compensated_fraction`` is weighted by each rank's dropped blocks, and
    ``block_mask`` (when recorded) is concatenated in global head order: the single-process values.
    Without context parallelism (or without Ulysses): the plain statistics."""
    import torch.distributed as dist

    from fastgen.attention_stats import attention_stats

    layout = context_parallel_layout(getattr(model, "_parallel_config", None))
    rows = attention_stats(model)
    if layout is None or layout.ulysses == 1:
        return rows
    gathered: list[list[dict]] = [None] * layout.ulysses  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows, group=layout.ulysses_group)
    out = []
    for per_rank in zip(*gathered, strict=True):
        row = dict(per_rank[0])
        row["density"] = sum(r["density"] for r in per_rank) / len(per_rank)
        if all(r.get("keys_per_query") is not None for r in per_rank):
            row["keys_per_query"] = sum(r["keys_per_query"] for r in per_rank) / len(per_rank)
        if all(r.get("compensated_fraction") is not None for r in per_rank):
            dropped = [1.0 - r["density"] for r in per_rank]
            total = sum(dropped)
            row["compensated_fraction"] = (
                sum(r["compensated_fraction"] * d for r, d in zip(per_rank, dropped, strict=True)) / total
                if total > 0
                else 0.0
            )
        masks = [r.get("block_mask") for r in per_rank]
        if all(m is not None for m in masks):
            row["block_mask"] = torch.cat(masks, dim=0)
        out.append(row)
    return out


__all__ = [
    "MODES",
    "ContextParallelLayout",
    "check_heads",
    "context_parallel_layout",
    "deinterleave",
    "gather_ring",
    "gathered_layer_stats",
    "heads_to_sequence",
    "hunyuan_joint_attention",
    "interleaved_order",
    "layout_of",
    "reinterleave",
    "sequence_to_heads",
    "unsplit_rope_forward",
    "wan_self_attention",
]
