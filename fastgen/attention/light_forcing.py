"""Light Forcing: sparse attention for autoregressive (chunked, KV-cached) video diffusion.

Model-agnostic: a chunk's queries ``q [B, H, Nq, D]`` attend to the keys ``k, v [B, H, Nk, D]`` of
the cache followed by the chunk itself (``Nk - Nq`` past tokens, then ``Nq`` current tokens), with
``frame_tokens`` tokens per latent frame. Two parts (see DESIGN.md, "Light Forcing"):

- **Chunk-Aware Growth** (:func:`chunk_sparsities`): chunk 0 dense; chunk ``i >= 1`` with ``F_i``
  frames generated through it and ``L_i = min(F_i, local_attn_frames)`` frames of keys gets
  ``s_i = s_base - beta / sqrt(F_i)``, ``beta = (s_base - s_target) * sum L_i / sum (L_i / sqrt F_i)``,
  so the attended-key budget ``sum (1 - s_i) L_i`` equals ``sum (1 - s_target) L_i``.
- **Hierarchical Sparse Attention** (:func:`hsa_block_mask`), per layer, step and head: Q and K are
  mean-pooled in blocks; block scores are ``pooled_q . pooled_k`` (no scale, no softmax: only the
  order matters). (1) no past frame: dense. (2) past frames ``<= keep_frames``: one top-k of
  ``int((1 - s) * K)`` over all ``K`` key blocks. (3) otherwise the "middle" past frames (after the
  ``keep_sink`` first, before the ``keep_near`` last) are each represented by their mean key and
  the best ``keep_frames - keep_sink - keep_near`` are chosen per query block; the candidate key
  blocks are those of the current chunk, of the sink, near and chosen frames; one top-k of
  ``int((1 - s) * K)`` (``K`` still counting every key block) over the candidates. The current chunk
  is a candidate, not forced dense.

Where our statement has to extend the authors' code (which assumes frames that are whole blocks,
``frame_tokens % block_size == 0``): a frame's mean key is the mean of its tokens' keys (equal to
the mean of its pooled blocks when frames are whole blocks), and a key block is a candidate when
any of its tokens lies in a candidate frame. Two degenerate cases the authors' code leaves
undefined are pinned down: at least one block is kept (``int((1 - s) * K)`` may be 0, which makes
their kernel divide by zero), and in regime (3) a top-k larger than the candidate set keeps just the
candidates (theirs picks arbitrary ``-inf`` entries).

Beyond the paper, both optional and measured by ``fastgen bench causal``:

- ``rectify``: the dropped blocks that pass Rectified SpaAttn's GAPR test are compensated with one
  pooled key each (the exact mixed-resolution form: logit ``q . k̄_J / sqrt(d) + log n_J``, value
  ``v̄_J``, in the same softmax as the selected blocks).
- :class:`PooledKeys`: the pooled statistics of the past keys, which do not change while a chunk
  is denoised, are handed back so a caller can pass them to the chunk's next steps (and extend them
  with the chunk once it is written) instead of pooling the whole cache at every call.

The selection is written as a :class:`~fastgen.attention.plan.SelectionPlan` (index table of the
selected key blocks, built straight from the top-k without a host synchronisation; with
``rectify`` the pooled keys as extra keys of weight ``log n_J`` visible to the query blocks that
compensate them) and run by :func:`~fastgen.attention.execute.execute_plan` on the native CPU kernel
or the Triton kernel (query length != key length); nothing ``N x N`` is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen._validation import check_int

from ._checks import check_block_size, check_qkv, check_sparsity
from .backends import default_scale
from .blocks import gapr_compensated, num_blocks, pool_abs_deviation, pool_blocks, tables_to_mask
from .execute import execute_plan
from .plan import SelectionPlan

__all__ = [
    "PooledKeys",
    "chunk_sparsities",
    "hsa_block_mask",
    "hsa_keep_count",
    "hsa_regime",
    "hsa_select",
    "hsa_tables",
    "light_forcing_attention",
    "pool_keys",
    "tables_to_mask",
]

REGIMES = ("dense", "one_stage", "hierarchical")
"""HSA regimes: no history, few past frames (one top-k), many past frames (frame then block level)."""


# ------------------------------------------------------------------------------------------------
# Chunk-Aware Growth
# ------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    check_int(name, value, 1)


def chunk_sparsities(
    num_frames: int,
    frames_per_chunk: int,
    sparsity: float,
    sparsity_base: float,
    local_attn_frames: int | None = None,
) -> list[float]:
    """Per-chunk sparsity of Chunk-Aware Growth, one entry per chunk (chunk 0 dense: 0.0).

    Args:
        num_frames: latent frames of the video, a whole number of chunks.
        frames_per_chunk: latent frames per chunk.
        sparsity: target average sparsity ``s_target`` in [0, 1).
        sparsity_base: asymptotic sparsity ``s_base`` in [sparsity, 1).
        local_attn_frames: frames of keys a chunk attends (rolling window), None for all.

    Example:
        >>> [round(s, 4) for s in chunk_sparsities(21, 3, 0.88, 0.98)]
        [0.0, 0.827, 0.8551, 0.8718, 0.8832, 0.8917, 0.8982]
    """
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("frames_per_chunk", frames_per_chunk)
    if num_frames % frames_per_chunk:
        raise ValueError(
            f"num_frames={num_frames} is not a whole number of chunks of frames_per_chunk={frames_per_chunk}; "
            f"allowed: a multiple of {frames_per_chunk}"
        )
    check_sparsity(sparsity, "sparsity")
    check_sparsity(sparsity_base, "sparsity_base")
    if sparsity_base < sparsity:
        raise ValueError(f"sparsity_base={sparsity_base!r} must be >= sparsity={sparsity!r}")
    if local_attn_frames is not None:
        _check_positive_int("local_attn_frames", local_attn_frames)
        if local_attn_frames < frames_per_chunk:
            raise ValueError(
                f"local_attn_frames={local_attn_frames} is smaller than a chunk; allowed: >= "
                f"frames_per_chunk={frames_per_chunk}"
            )
    frames = range(2 * frames_per_chunk, num_frames + 1, frames_per_chunk)  # F_i, i = 1..n-1
    kv_frames = [f if local_attn_frames is None else min(f, local_attn_frames) for f in frames]
    weighted = sum(kv / math.sqrt(f) for f, kv in zip(frames, kv_frames))
    if not kv_frames:
        return [0.0]
    beta = (sparsity_base - sparsity) * sum(kv_frames) / weighted
    return [0.0] + [sparsity_base - beta / math.sqrt(f) for f in frames]


# ------------------------------------------------------------------------------------------------
# Pooled statistics of the keys
# ------------------------------------------------------------------------------------------------


@dataclass
class PooledKeys:
    """Pooled statistics of keys (and values) ``[B, H, ., D]`` fp32, block- and frame-level.

    Covers the first ``tokens`` keys; ``block_*`` hold the ``tokens // block_size`` whole blocks
    (a partial last block is always recomputed), ``frame_keys`` the ``tokens // frame_tokens``
    whole frames.
    """

    tokens: int
    """Keys covered."""
    block_size: int
    """Tokens per block."""
    frame_tokens: int
    """Tokens per latent frame."""
    block_keys: torch.Tensor
    """``[B, H, nb, D]`` mean key of each whole block."""
    frame_keys: torch.Tensor
    """``[B, H, nf, D]`` mean key of each whole frame."""
    block_values: torch.Tensor | None = None
    """``[B, H, nb, D]`` mean value of each block (rectification only)."""
    block_key_deviation: torch.Tensor | None = None
    """``[B, H, nb, D]`` mean ``|k - k̄|`` of each block (rectification only)."""

    def matches(self, k: torch.Tensor, block_size: int, frame_tokens: int, with_values: bool) -> bool:
        """Whether these statistics can serve keys ``k`` (same geometry, batch, heads, device)."""
        return (
            self.block_size == block_size
            and self.frame_tokens == frame_tokens
            and self.tokens <= k.shape[2]
            and tuple(self.block_keys.shape[:2]) == tuple(k.shape[:2])
            and self.block_keys.device == k.device
            and (not with_values or self.block_values is not None)
        )


def pool_keys(
    k: torch.Tensor,
    v: torch.Tensor | None,
    block_size: int,
    frame_tokens: int,
    past_tokens: int,
    cached: PooledKeys | None = None,
) -> tuple[PooledKeys, PooledKeys]:
    """Pooled statistics of all of ``k`` and, to keep, of its first ``past_tokens`` keys.

    ``cached`` (from an earlier call whose first ``cached.tokens`` keys were the same) is reused:
    only the keys after its whole blocks / frames are read. ``v`` given: pooled values and key
    deviations too (rectification). Returns ``(all_keys, past)``; ``all_keys.frame_keys`` covers
    the past frames only.
    """
    with_values = v is not None
    if cached is not None and not cached.matches(k, block_size, frame_tokens, with_values):
        cached = None
    done_blocks = 0 if cached is None else min(cached.tokens, past_tokens) // block_size
    done_frames = 0 if cached is None else min(cached.tokens, past_tokens) // frame_tokens
    start = done_blocks * block_size
    tail_keys, _ = pool_blocks(k[:, :, start:], block_size)
    block_keys = (
        tail_keys if cached is None else torch.cat([cached.block_keys[:, :, :done_blocks], tail_keys], 2)
    )
    block_values = block_dev = None
    if with_values:
        tail_values, _ = pool_blocks(v[:, :, start:], block_size)
        tail_dev = pool_abs_deviation(k[:, :, start:], tail_keys, block_size)
        if cached is None:
            block_values, block_dev = tail_values, tail_dev
        else:
            block_values = torch.cat([cached.block_values[:, :, :done_blocks], tail_values], 2)
            block_dev = torch.cat([cached.block_key_deviation[:, :, :done_blocks], tail_dev], 2)
    past_frames = past_tokens // frame_tokens
    b, h, _, d = k.shape
    new_frames = (
        k[:, :, done_frames * frame_tokens : past_frames * frame_tokens]
        .float()
        .reshape(b, h, past_frames - done_frames, frame_tokens, d)
        .mean(3)
    )
    frame_keys = (
        new_frames if cached is None else torch.cat([cached.frame_keys[:, :, :done_frames], new_frames], 2)
    )
    everything = PooledKeys(
        tokens=k.shape[2],
        block_size=block_size,
        frame_tokens=frame_tokens,
        block_keys=block_keys,
        frame_keys=frame_keys,
        block_values=block_values,
        block_key_deviation=block_dev,
    )
    keep_blocks = past_tokens // block_size
    past = PooledKeys(
        tokens=past_tokens,
        block_size=block_size,
        frame_tokens=frame_tokens,
        block_keys=block_keys[:, :, :keep_blocks],
        frame_keys=frame_keys,
        block_values=None if block_values is None else block_values[:, :, :keep_blocks],
        block_key_deviation=None if block_dev is None else block_dev[:, :, :keep_blocks],
    )
    return everything, past


# ------------------------------------------------------------------------------------------------
# Hierarchical Sparse Attention
# ------------------------------------------------------------------------------------------------


def _check_hsa_geometry(
    num_queries: int,
    num_keys: int,
    *,
    block_size: int,
    frame_tokens: int,
    keep_frames: int,
    keep_sink: int,
    keep_near: int,
) -> tuple[int, int]:
    """Validate the HSA arguments; returns ``(chunk_frames, past_frames)``."""
    check_block_size(block_size)
    _check_positive_int("frame_tokens", frame_tokens)
    _check_positive_int("keep_frames", keep_frames)
    for name, value in (("keep_sink", keep_sink), ("keep_near", keep_near)):
        check_int(name, value, 0)
    if keep_sink + keep_near > keep_frames:
        raise ValueError(
            f"keep_sink + keep_near = {keep_sink} + {keep_near} = {keep_sink + keep_near} must be <= "
            f"keep_frames={keep_frames}"
        )
    if num_keys < num_queries:
        raise ValueError(
            f"k has {num_keys} tokens, fewer than q's {num_queries}; allowed: keys = cache + the chunk itself"
        )
    if num_queries % frame_tokens or num_keys % frame_tokens:
        raise ValueError(
            f"frame_tokens={frame_tokens} does not divide the query ({num_queries}) and key ({num_keys}) "
            "token counts; allowed: q and k hold whole latent frames"
        )
    return num_queries // frame_tokens, (num_keys - num_queries) // frame_tokens


def hsa_regime(past_frames: int, keep_frames: int) -> str:
    """Which HSA regime a chunk with ``past_frames`` frames of history runs (see :data:`REGIMES`)."""
    if past_frames == 0:
        return "dense"
    return "one_stage" if past_frames <= keep_frames else "hierarchical"


def hsa_keep_count(sparsity: float, num_key_blocks: int) -> int:
    """Key blocks kept per query block: ``int((1 - sparsity) * K)`` as the authors' code, at least 1."""
    return max(1, min(num_key_blocks, int((1.0 - float(sparsity)) * num_key_blocks)))


def _block_frame_overlap(
    num_keys: int, block_size: int, frame_tokens: int, device: torch.device
) -> torch.Tensor:
    """fp32 ``[nkb, frames]``: 1 where key block ``j`` holds a token of frame ``f``."""
    nkb, frames = num_blocks(num_keys, block_size), num_keys // frame_tokens
    first = torch.arange(nkb, device=device) * block_size
    last = torch.clamp(first + block_size, max=num_keys) - 1
    f = torch.arange(frames, device=device)
    overlap = (f[None, :] >= (first // frame_tokens)[:, None]) & (
        f[None, :] <= (last // frame_tokens)[:, None]
    )
    return overlap.float()


def hsa_tables(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    frame_keys: torch.Tensor | None,
    *,
    num_queries: int,
    num_keys: int,
    sparsity: float,
    block_size: int,
    frame_tokens: int,
    keep_frames: int,
    keep_sink: int,
    keep_near: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HSA on pooled statistics as an index table: ``(indices int32 [B, H, nqb, keep], counts int32
    [B, H, nqb])``, the selected key blocks of each query block in ascending order first (entries past
    ``counts`` are not selected). No host synchronisation: ``keep`` follows from the shapes.

    ``pooled_q [B, H, nqb, D]`` and ``pooled_k [B, H, nkb, D]`` are block means,
    ``frame_keys [B, H, past_frames, D]`` the mean key of each past frame (hierarchical regime only).
    """
    check_sparsity(sparsity)
    hsa = dict(block_size=block_size, frame_tokens=frame_tokens, keep_frames=keep_frames)
    hsa.update(keep_sink=keep_sink, keep_near=keep_near)
    _, past_frames = _check_hsa_geometry(num_queries, num_keys, **hsa)
    return _hsa_tables(pooled_q, pooled_k, frame_keys, past_frames, sparsity, num_keys, **hsa)


def _hsa_tables(
    pooled_q, pooled_k, frame_keys, past_frames: int, sparsity: float, num_keys: int, **hsa
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hsa_tables` on arguments already checked (``hsa``: ``block_size``, ``frame_tokens``,
    ``keep_frames``, ``keep_sink``, ``keep_near``)."""
    block_size, frame_tokens, keep_frames = hsa["block_size"], hsa["frame_tokens"], hsa["keep_frames"]
    keep_sink, keep_near = hsa["keep_sink"], hsa["keep_near"]
    b, h, nqb, _ = pooled_q.shape
    nkb = pooled_k.shape[2]
    device = pooled_q.device
    regime = hsa_regime(past_frames, keep_frames)
    if regime == "dense":
        indices = torch.arange(nkb, dtype=torch.int32, device=device).expand(b, h, nqb, nkb).contiguous()
        return indices, torch.full((b, h, nqb), nkb, dtype=torch.int32, device=device)
    scores = torch.matmul(pooled_q.float(), pooled_k.float().transpose(-1, -2))  # [B, H, nqb, nkb]
    keep = hsa_keep_count(sparsity, nkb)
    if regime == "one_stage":
        indices = scores.topk(keep, dim=-1, sorted=False).indices.sort(-1).values
        return indices.to(torch.int32), torch.full((b, h, nqb), keep, dtype=torch.int32, device=device)
    if frame_keys is None or frame_keys.shape[2] < past_frames:
        raise ValueError(
            f"frame_keys must hold the mean key of each of the {past_frames} past frames, got "
            f"{None if frame_keys is None else tuple(frame_keys.shape)}"
        )
    keep_middle = keep_frames - keep_sink - keep_near
    frames = num_keys // frame_tokens
    frame_candidates = torch.zeros(b, h, nqb, frames, dtype=torch.float32, device=device)
    frame_candidates[..., :keep_sink] = 1.0
    frame_candidates[..., past_frames - keep_near :] = 1.0  # near frames and the current chunk
    if keep_middle > 0:
        middle = frame_keys[:, :, keep_sink : past_frames - keep_near].float()
        frame_scores = torch.matmul(pooled_q.float(), middle.transpose(-1, -2))  # [B, H, nqb, M]
        chosen = frame_scores.topk(keep_middle, dim=-1, sorted=False).indices + keep_sink
        frame_candidates.scatter_(-1, chosen, 1.0)
    overlap = _block_frame_overlap(num_keys, block_size, frame_tokens, device)
    candidates = torch.matmul(frame_candidates, overlap.t()) > 0  # [B, H, nqb, nkb]
    top = scores.masked_fill(~candidates, float("-inf")).topk(keep, dim=-1, sorted=False).indices
    chosen_ok = torch.gather(candidates, -1, top)
    # non-candidates (a top-k wider than the candidate set) sort last and are not counted
    indices = torch.where(chosen_ok, top, nkb).sort(-1).values.clamp_max(nkb - 1)
    counts = chosen_ok.sum(-1, dtype=torch.int32)
    return indices.to(torch.int32), counts


def hsa_select(
    pooled_q: torch.Tensor, pooled_k: torch.Tensor, frame_keys: torch.Tensor | None, **kwargs
) -> torch.Tensor:
    """HSA on pooled statistics as a bool block mask ``[B, H, nqb, nkb]`` (arguments of :func:`hsa_tables`)."""
    indices, counts = hsa_tables(pooled_q, pooled_k, frame_keys, **kwargs)
    return tables_to_mask(indices, counts, pooled_k.shape[2])


def hsa_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sparsity: float,
    block_size: int,
    frame_tokens: int,
    keep_frames: int,
    keep_sink: int,
    keep_near: int,
) -> torch.Tensor:
    """Hierarchical Sparse Attention block mask of a chunk, bool ``[B, H, nq_blocks, nk_blocks]``.

    Args:
        q: the current chunk's queries ``[B, H, Nq, D]`` (whole frames).
        k: the keys it attends, cache then chunk, ``[B, H, Nk, D]`` (whole frames, Nk >= Nq).
        sparsity: the chunk's sparsity (from :func:`chunk_sparsities`).
        block_size: tokens per query / key block (blocks start at token 0 of q and of k).
        frame_tokens: tokens per latent frame.
        keep_frames: past frames kept at the frame level (sink + near + chosen middle).
        keep_sink: first frames always candidates.
        keep_near: last past frames always candidates.

    Example:
        >>> q = torch.randn(1, 2, 3 * 256, 64); k = torch.randn(1, 2, 12 * 256, 64)
        >>> hsa_block_mask(q, k, sparsity=0.8, block_size=128, frame_tokens=256,
        ...                keep_frames=6, keep_sink=1, keep_near=2).shape
        torch.Size([1, 2, 6, 24])
    """
    check_qkv(q, k, k)
    hsa = dict(block_size=block_size, frame_tokens=frame_tokens, keep_frames=keep_frames)
    hsa.update(keep_sink=keep_sink, keep_near=keep_near)
    _, past_frames = _check_hsa_geometry(q.shape[2], k.shape[2], **hsa)
    check_sparsity(sparsity)
    pooled_q, _ = pool_blocks(q, block_size)
    pooled, _ = pool_keys(k, None, block_size, frame_tokens, past_frames * frame_tokens)
    tables = _hsa_tables(
        pooled_q, pooled.block_keys, pooled.frame_keys, past_frames, sparsity, k.shape[2], **hsa
    )
    return tables_to_mask(*tables, pooled.block_keys.shape[2])


# ------------------------------------------------------------------------------------------------
# The attention
# ------------------------------------------------------------------------------------------------


def _key_block_counts(num_keys: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Keys per key block ``[nkb]`` fp32 (the last block may be partial)."""
    nkb = num_blocks(num_keys, block_size)
    return (num_keys - torch.arange(nkb, device=device) * block_size).clamp(max=block_size).float()


def light_forcing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float,
    block_size: int = 128,
    frame_tokens: int,
    keep_frames: int = 6,
    keep_sink: int = 1,
    keep_near: int = 2,
    rectify: bool = False,
    pooled: PooledKeys | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """A chunk's Light Forcing self-attention over ``[cache + chunk]`` keys.

    Args:
        q: chunk queries ``[B, H, Nq, D]``; k, v: cache then chunk ``[B, H, Nk, D]``.
        sparsity: the chunk's sparsity (:func:`chunk_sparsities`); the HSA arguments as in
            :func:`hsa_block_mask`.
        rectify: compensate GAPR-reliable dropped blocks with pooled keys (exact form).
        pooled: :class:`PooledKeys` of a prefix of ``k`` from an earlier call (reused, not recomputed).
        scale: softmax scale (default ``1/sqrt(D)``); backend: as :func:`block_sparse_attention`.

    Returns:
        ``(out [B, H, Nq, D], info)`` with ``info``: ``block_mask`` (bool ``[B, H, nqb, nkb]``),
        ``compensated`` (bool, or None), ``plan`` (the :class:`~fastgen.attention.plan.SelectionPlan`
        executed), ``regime``, ``keep_blocks``, ``sparsity``, ``past`` (the :class:`PooledKeys` of the
        past keys, to pass back at the chunk's next call). The dense regime runs dense attention
        (``block_mask`` all True, no plan).
    """
    check_qkv(q, k, v)
    hsa = dict(block_size=block_size, frame_tokens=frame_tokens, keep_frames=keep_frames)
    hsa.update(keep_sink=keep_sink, keep_near=keep_near)
    _, past_frames = _check_hsa_geometry(q.shape[2], k.shape[2], **hsa)
    check_sparsity(sparsity)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    regime = hsa_regime(past_frames, keep_frames)
    nqb, nkb = num_blocks(q.shape[2], block_size), num_blocks(k.shape[2], block_size)
    info = {
        "regime": regime,
        "sparsity": float(sparsity) if regime != "dense" else 0.0,
        "keep_blocks": nkb if regime == "dense" else hsa_keep_count(sparsity, nkb),
        "compensated": None,
        "past": pooled,
        "plan": None,
    }
    if regime == "dense":
        from .dense import dense_attention

        info["block_mask"] = torch.ones(q.shape[0], q.shape[1], nqb, nkb, dtype=torch.bool, device=q.device)
        return dense_attention(q, k, v), info
    past_tokens = past_frames * frame_tokens
    everything, info["past"] = pool_keys(
        k, v if rectify else None, block_size, frame_tokens, past_tokens, pooled
    )
    pooled_q, _ = pool_blocks(q, block_size)
    indices, counts = _hsa_tables(
        pooled_q, everything.block_keys, everything.frame_keys, past_frames, sparsity, k.shape[2], **hsa
    )
    info["block_mask"] = tables_to_mask(indices, counts, nkb)
    extras = {}
    if rectify:
        extras = _compensation_keys(q, pooled_q, everything, info["block_mask"], block_size, k.shape[2])
        info["compensated"] = extras["extra_visible"]
    info["plan"] = SelectionPlan(block_size, q.shape[2], k.shape[2], indices, counts, **extras)
    return execute_plan(q, k, v, info["plan"], scale=scale, backend=backend), info


def _compensation_keys(
    q, pooled_q, everything: PooledKeys, block_mask, block_size: int, num_keys: int
) -> dict:
    """The plan's extra keys of the rectified form: one pooled key per key block (log-weight
    ``log n_J``), visible to the query blocks where GAPR compensates the dropped block."""
    query_deviation = pool_abs_deviation(q, pooled_q, block_size)
    compensated = gapr_compensated(
        pooled_q, everything.block_keys, query_deviation, everything.block_key_deviation, ~block_mask
    )
    b, h, nkb = q.shape[0], q.shape[1], everything.block_keys.shape[2]
    log_counts = torch.log(_key_block_counts(num_keys, block_size, q.device))
    return {
        "extra_k": everything.block_keys,
        "extra_v": everything.block_values,
        "extra_log_weight": log_counts.expand(b, h, nkb).contiguous(),
        "extra_visible": compensated,
    }
