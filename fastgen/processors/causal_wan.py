"""Causal (autoregressive, KV-cached) attention on a plain diffusers ``WanTransformer3DModel``: Self-Forcing.

Self-Forcing (Huang et al., 2025) turns Wan 2.1 into a chunk-by-chunk video generator without changing a
single weight: latent frames come in chunks, the self-attention of a chunk sees the K/V of every earlier
chunk (cached) plus its own, RoPE uses absolute frame positions and the cross-attention K/V of the prompt
never change. diffusers has no such model, so fastgen adds the behaviour with its own attention processors
and one hook on the transformer's ``rope`` module; the model class is untouched and everything is removed
by :func:`remove_causal_processors` (the original processor objects come back).

Pieces
------
- :class:`CausalWanState`: one per transformer (on the instance), shared by its processors. Outside a
  generation (``state.session is None``) every processor computes exactly what diffusers'
  ``WanAttnProcessor`` computes (full, non-causal attention).
- :class:`CausalWanSession`: the state of one generation, opened by :func:`causal_generation` (what
  ``fastgen.pipelines.CausalWanPipeline`` does). The pipeline marks chunks, steps and the CFG branch
  explicitly (:meth:`~CausalWanSession.begin_chunk`, :meth:`~CausalWanSession.begin_step`,
  :attr:`~CausalWanSession.branch`); nothing is guessed from timesteps.
- :class:`KVCache`: the self-attention cache of one (branch, layer), allocated ONCE per generation at
  its final size (``num_frames`` frames, or ``local_attn_frames`` with a rolling window), layout
  ``[B, H, frames * frame_tokens, D]``. Keys are stored after QK-norm and RoPE (absolute positions), values
  raw. Write rule: a new chunk appends; further steps of the same chunk and its context pass overwrite
  the same slot. Rolling window of ``W = local_attn_frames`` frames with ``S = sink_frames`` pinned: a
  token of a chunk ending at (exclusive) frame ``e`` sees frames ``f < e`` with ``f < S`` or
  ``f >= e - (W - S)``; frames leave the window by an in-place shift (no reallocation, no concatenation),
  so the keys handed to attention are always in temporal order.
- RoPE positions: ``rope_positions="absolute"`` (Self-Forcing, LongLive; default) rotates keys once, at
  their absolute frame, before caching. ``"window"`` (Light Forcing's long-video config) caches keys
  without RoPE and rotates them on every read by their position in the attended window (key frame ``j`` at
  position ``j``), the queries at the window's last positions.
- :class:`CausalWanSelfAttnProcessor` (``attn1``) and :class:`CausalWanCrossAttnProcessor` (``attn2``,
  prompt K/V computed once per generation and branch).

The attention interface (stable; Light Forcing overrides it)
------------------------------------------------------------
During a generation the self-attention of a chunk's queries over [cached keys + chunk keys] is one call::

    CausalWanSelfAttnProcessor.chunk_attention(self, query, key, value, info) -> out

- ``query``: ``[B, H, Nq, D]`` (the chunk's tokens, after QK-norm and RoPE), ``Nq = info.query_tokens``.
- ``key`` / ``value``: ``[B, H, Nk, D]`` views into the cache (already holding this chunk's K/V at the end),
  ``Nk = len(info.key_frames) * info.frame_tokens``; key frame ``j`` is tokens
  ``[j * frame_tokens, (j + 1) * frame_tokens)``, frames in temporal order:
  ``[sinks (info.sink_frames)] [other cached frames] [current chunk (info.current_frames)]``.
- ``info``: a :class:`ChunkInfo` (layer, branch, chunk index, step index, timestep, context pass, tokens
  per frame, absolute query frames, absolute key frames, cached / sink / current frame counts).
- returns ``[B, H, Nq, D]`` in the dtype of ``query``.

The default is dense attention through diffusers' ``dispatch_attention_fn`` (so ``set_attention_backend``
applies). Subclass and override it, or pass ``chunk_attention_fn=callable(query, key, value, info)`` to the
constructor. After the context pass of a chunk has written its clean K/V, :meth:`~CausalWanSelfAttnProcessor
.on_chunk_written` is called once per (branch, layer) with views of that chunk's keys and values (default:
nothing), the place for per-chunk statistics that must not be recomputed at every step. Install a subclass
with ``install_causal_processors(transformer, self_attention=lambda layer, state: MyProcessor(layer, state))``.

Token layout: Wan flattens a latent ``[C, F, H, W]`` into tokens frame-major (f, h, w) after the
``(1, 2, 2)`` patch, so latent frame ``f`` is the ``T = (H/2) * (W/2)`` consecutive tokens
``[f*T, (f+1)*T)``. 480x832 gives T = 30 * 52 = 1560 (= 12 * 128 + 24: blocks of 64 or 128 straddle frame
boundaries); 512x768 gives T = 32 * 48 = 1536 = 12 * 128 = 24 * 64 (every frame is whole blocks).

Example:
    >>> from fastgen.processors.causal_wan import causal_generation
    >>> with causal_generation(transformer, batch_size=1, num_frames=21, frame_tokens=1560) as session:
    ...     for c in range(7):
    ...         session.begin_chunk(c)
    ...         for s, t in enumerate([1000.0, 937.5, 833.33, 625.0]):
    ...             session.begin_step(s, t)
    ...             v = transformer(chunk_latents, timestep, prompt_embeds).sample
    ...         session.begin_step(4, 0.0, context=True)
    ...         transformer(clean_chunk, zero_timestep, prompt_embeds)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ._install import carry_backend, dense_dispatch, is_wan
from .wan import _STATE_ATTR as RECTIFIED_STATE_ATTR
from .wan import apply_wan_rotary, norm_rope, projections

logger = logging.getLogger(__name__)

_STATE_ATTR = "_fastgen_causal_wan"
ROPE_POSITIONS = ("absolute", "window")
"""Allowed ``rope_positions``."""
ROPE_HOOK_NAME = "fastgen_causal_wan_rope"

ChunkAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "ChunkInfo"], torch.Tensor]
"""``fn(query, key, value, info) -> out`` on ``[B, H, N, D]`` tensors (see the module docstring)."""


@dataclass(frozen=True)
class ChunkInfo:
    """What a chunk's self-attention call knows about where it is (all frame indices are latent frames)."""

    layer: int
    """Transformer block index."""
    branch: int
    """0 for the conditional forward, 1 for the unconditional one of classifier-free guidance."""
    chunk_index: int
    """Index of the chunk being generated (0 = first)."""
    num_chunks: int
    """Chunks in this generation."""
    step_index: int
    """Denoising step within the chunk (0-based); equals the number of denoising steps for the context pass."""
    timestep: float
    """Timestep of this forward (all frames of the chunk share it)."""
    context_pass: bool
    """True for the extra pass on the clean chunk that writes its final K/V into the cache."""
    frames_per_chunk: int
    """Latent frames per chunk."""
    frame_tokens: int
    """Tokens per latent frame (after patchify)."""
    query_frames: tuple[int, ...]
    """Absolute frame index of each query frame (the chunk's frames, in order)."""
    key_frames: tuple[int, ...]
    """Absolute frame index of each key frame, in the order of ``key`` (temporal)."""
    cached_frames: int
    """Key frames before the current chunk (the cache's history); ``key_frames[:cached_frames]``."""
    sink_frames: int
    """Leading key frames that are pinned sinks of a rolling window (0 without ``local_attn_frames``)."""
    current_frames: int
    """Trailing key frames that are the current chunk (= ``len(query_frames)``)."""
    local_attn_frames: int | None
    """Rolling-window size in frames (None: every earlier frame is kept)."""
    rope_positions: str = "absolute"
    """``"absolute"``: keys rotated at their absolute frames; ``"window"``: at their index in ``key_frames``."""

    @property
    def query_tokens(self) -> int:
        """Tokens of the chunk (queries)."""
        return len(self.query_frames) * self.frame_tokens

    @property
    def key_tokens(self) -> int:
        """Tokens attended (cache + chunk)."""
        return len(self.key_frames) * self.frame_tokens


def visible_frames(end: int, *, local_attn_frames: int | None, sink_frames: int = 0) -> list[int]:
    """Frames a token of a chunk ending at (exclusive) frame ``end`` attends to, in temporal order.

    Every ``f < end`` without a window; with ``W = local_attn_frames``, ``S = sink_frames``: ``f < S`` or
    ``f >= end - (W - S)``.
    """
    if local_attn_frames is None:
        return list(range(end))
    low = end - (local_attn_frames - sink_frames)
    return [f for f in range(end) if f < sink_frames or f >= low]


class KVCache:
    """Self-attention K/V of one (branch, layer) for one generation, ``[B, H, capacity_frames * T, D]``.

    Slots ``[0, S)`` hold the sink frames; the rest hold the most recent frames in temporal order. It is
    allocated once (on the first write, when heads, head_dim, dtype and device are known) and never grown.
    """

    def __init__(self, capacity_frames: int, frame_tokens: int, sink_frames: int = 0) -> None:
        self.capacity_frames = capacity_frames
        """Frames the buffers hold."""
        self.frame_tokens = frame_tokens
        """Tokens per frame."""
        self.sink_frames = sink_frames
        """Pinned leading frames (rolling window only)."""
        self.keys: torch.Tensor | None = None
        """``[B, H, capacity_frames * T, D]`` keys after QK-norm and RoPE (None before the first write)."""
        self.values: torch.Tensor | None = None
        """``[B, H, capacity_frames * T, D]`` raw values."""
        self.frames: list[int] = []
        """Absolute frame index held by each filled slot, in slot (= temporal) order."""

    def _allocate(self, like: torch.Tensor) -> None:
        b, _, h, d = like.shape
        n = self.capacity_frames * self.frame_tokens
        self.keys = like.new_zeros((b, h, n, d))
        self.values = like.new_zeros((b, h, n, d))

    def write(self, key: torch.Tensor, value: torch.Tensor, frames: list[int], visible: list[int]) -> None:
        """Store a chunk's ``key`` / ``value`` ``[B, Nq, H, D]`` for absolute ``frames`` so that the cache holds
        exactly the ``visible`` frames afterwards (earlier frames leave by an in-place shift)."""
        if self.keys is None:
            self._allocate(key)
        if len(visible) > self.capacity_frames:
            raise RuntimeError(
                f"{len(visible)} visible frames exceed the cache capacity {self.capacity_frames}"
            )
        if self.frames != visible:
            keep = [f for f in visible if f not in frames]
            missing = [f for f in keep if f not in self.frames]
            if missing:
                raise RuntimeError(f"cache lost frames {missing}: chunks must be generated in order")
            t = self.frame_tokens
            for slot, f in enumerate(keep):  # ascending slots; a frame only moves left, so no overlap
                src = self.frames.index(f)
                if src != slot:
                    self.keys[:, :, slot * t : (slot + 1) * t].copy_(self.keys[:, :, src * t : (src + 1) * t])
                    self.values[:, :, slot * t : (slot + 1) * t].copy_(
                        self.values[:, :, src * t : (src + 1) * t]
                    )
            self.frames = keep + list(frames)
        start = self.frames.index(frames[0]) * self.frame_tokens
        stop = start + len(frames) * self.frame_tokens
        self.keys[:, :, start:stop].copy_(key.transpose(1, 2))
        self.values[:, :, start:stop].copy_(value.transpose(1, 2))

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the filled slots, ``[B, H, len(frames) * T, D]`` views (no copy)."""
        n = len(self.frames) * self.frame_tokens
        return self.keys[:, :, :n], self.values[:, :, :n]

    def chunk_view(self, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the consecutive ``frames`` (views)."""
        start = self.frames.index(frames[0]) * self.frame_tokens
        stop = start + len(frames) * self.frame_tokens
        return self.keys[:, :, start:stop], self.values[:, :, start:stop]

    def nbytes(self) -> int:
        """Bytes held by the two buffers."""
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()


class CausalWanSession:
    """State of one chunked generation: geometry, the current chunk / step / branch, the caches."""

    def __init__(
        self,
        *,
        batch_size: int,
        num_frames: int,
        frame_tokens: int,
        frames_per_chunk: int = 3,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
        rope_positions: str = "absolute",
    ) -> None:
        check_chunking(num_frames, frames_per_chunk, local_attn_frames, sink_frames)
        if rope_positions not in ROPE_POSITIONS:
            raise ValueError(
                f"rope_positions={rope_positions!r} is not allowed; allowed: {', '.join(map(repr, ROPE_POSITIONS))}"
            )
        self.rope_positions = rope_positions
        """``"absolute"`` or ``"window"`` (module docstring)."""
        self.key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        """``"window"`` mode: RoPE table of the attended window (positions 0..), set by the RoPE hook."""
        self.batch_size = batch_size
        """Batch of every forward (per branch)."""
        self.num_frames = num_frames
        """Latent frames generated."""
        self.frame_tokens = frame_tokens
        """Tokens per latent frame."""
        self.frames_per_chunk = frames_per_chunk
        """Latent frames per chunk."""
        self.num_chunks = num_frames // frames_per_chunk
        """Chunks in this generation."""
        self.local_attn_frames = local_attn_frames
        """Rolling-window size in frames (None: keep every frame)."""
        self.sink_frames = sink_frames if local_attn_frames is not None else 0
        """Pinned frames of the rolling window."""
        self.capacity_frames = num_frames if local_attn_frames is None else min(num_frames, local_attn_frames)
        """Frames one cache holds."""
        self.chunk_index = -1
        """Current chunk (-1 before :meth:`begin_chunk`)."""
        self.step_index = 0
        """Current denoising step within the chunk (the step count for the context pass)."""
        self.timestep = 0.0
        """Timestep of the current step."""
        self.context_pass = False
        """Whether the current forward is the cache-writing pass on the clean chunk."""
        self.branch = 0
        """0: conditional forward, 1: unconditional (each has its own caches)."""
        self.caches: dict[tuple[int, int], KVCache] = {}
        """Self-attention cache per (branch, layer)."""
        self.cross_kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """Prompt K/V ``[B, L, H, D]`` per (branch, layer), computed on the first forward of the branch."""

    # ------------------------------------------------------------ marking
    def begin_chunk(self, index: int) -> None:
        """Start chunk ``index`` (chunks come in order 0, 1, ...)."""
        if not 0 <= index < self.num_chunks:
            raise ValueError(f"chunk index={index} is out of range; allowed: 0..{self.num_chunks - 1}")
        self.chunk_index = index
        self.step_index = 0
        self.context_pass = False

    def begin_step(self, step_index: int, timestep: float, context: bool = False) -> None:
        """Mark the next forward(s) as denoising step ``step_index`` at ``timestep`` (or the context pass)."""
        if self.chunk_index < 0:
            raise RuntimeError("begin_step before begin_chunk")
        self.step_index = int(step_index)
        self.timestep = float(timestep)
        self.context_pass = bool(context)

    # ------------------------------------------------------------ geometry
    @property
    def chunk_frames(self) -> list[int]:
        """Absolute frames of the current chunk."""
        start = self.chunk_index * self.frames_per_chunk
        return list(range(start, start + self.frames_per_chunk))

    @property
    def frame_start(self) -> int:
        """First absolute frame of the current chunk."""
        return self.chunk_index * self.frames_per_chunk

    @property
    def query_position(self) -> int:
        """RoPE frame position of the chunk's first query frame (absolute, or its index in the window)."""
        if self.rope_positions == "window":
            return len(self.visible()) - self.frames_per_chunk
        return self.frame_start

    def visible(self) -> list[int]:
        """Key frames of the current chunk, in temporal order."""
        end = self.frame_start + self.frames_per_chunk
        return visible_frames(end, local_attn_frames=self.local_attn_frames, sink_frames=self.sink_frames)

    def cache(self, layer: int) -> KVCache:
        """The cache of ``layer`` for the current branch (created empty on first use)."""
        key = (self.branch, layer)
        if key not in self.caches:
            self.caches[key] = KVCache(self.capacity_frames, self.frame_tokens, self.sink_frames)
        return self.caches[key]

    def info(self, layer: int, key_frames: list[int]) -> ChunkInfo:
        """The :class:`ChunkInfo` of ``layer``'s call now."""
        current = self.frames_per_chunk
        cached = len(key_frames) - current
        return ChunkInfo(
            layer=layer,
            branch=self.branch,
            chunk_index=self.chunk_index,
            num_chunks=self.num_chunks,
            step_index=self.step_index,
            timestep=self.timestep,
            context_pass=self.context_pass,
            frames_per_chunk=self.frames_per_chunk,
            frame_tokens=self.frame_tokens,
            query_frames=tuple(self.chunk_frames),
            key_frames=tuple(key_frames),
            cached_frames=cached,
            sink_frames=sum(1 for f in key_frames[:cached] if f < self.sink_frames),
            current_frames=current,
            local_attn_frames=self.local_attn_frames,
            rope_positions=self.rope_positions,
        )

    def cache_bytes(self) -> int:
        """Bytes held by every self-attention cache of this generation."""
        return sum(c.nbytes() for c in self.caches.values())

    def close(self) -> None:
        """Free the caches."""
        self.caches.clear()
        self.cross_kv.clear()
        self.key_rotary = None


def check_chunking(
    num_frames: int, frames_per_chunk: int, local_attn_frames: int | None, sink_frames: int
) -> None:
    """``ValueError`` (naming the parameter, value and what is allowed) for a chunking that cannot run."""
    for name, value in (("num_frames_per_chunk", frames_per_chunk), ("num_frames (latent)", num_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if num_frames % frames_per_chunk:
        raise ValueError(
            f"{num_frames} latent frames are not a whole number of chunks of num_frames_per_chunk="
            f"{frames_per_chunk}; allowed: a multiple of {frames_per_chunk} latent frames"
        )
    if isinstance(sink_frames, bool) or not isinstance(sink_frames, int) or sink_frames < 0:
        raise ValueError(f"sink_frames={sink_frames!r} must be an integer >= 0")
    if local_attn_frames is None:
        return
    if isinstance(local_attn_frames, bool) or not isinstance(local_attn_frames, int):
        raise ValueError(f"local_attn_frames={local_attn_frames!r} must be an integer or None")
    if local_attn_frames < frames_per_chunk:
        raise ValueError(
            f"local_attn_frames={local_attn_frames} is smaller than a chunk; allowed: >= "
            f"num_frames_per_chunk={frames_per_chunk} (None: no window)"
        )
    if sink_frames >= local_attn_frames:
        raise ValueError(
            f"sink_frames={sink_frames} must be smaller than local_attn_frames={local_attn_frames}"
        )
    if local_attn_frames - sink_frames < frames_per_chunk:
        raise ValueError(
            f"local_attn_frames={local_attn_frames} leaves {local_attn_frames - sink_frames} frames after "
            f"sink_frames={sink_frames}, fewer than a chunk; allowed: local_attn_frames >= "
            f"sink_frames + num_frames_per_chunk = {sink_frames + frames_per_chunk}"
        )


class CausalWanState:
    """Per-transformer state shared by its causal processors: the open session (None outside a generation)."""

    def __init__(self) -> None:
        self.session: CausalWanSession | None = None
        """The generation running now (None: processors act as diffusers' ``WanAttnProcessor``)."""


# ----------------------------------------------------------------------------- processors


class _CausalProcessorBase:
    """What both causal processors share: the state, the layer index, diffusers' backend attributes."""

    def __init__(self, layer: int, state: CausalWanState) -> None:
        self.layer = layer
        """Transformer block index."""
        self.state = state
        """The transformer's :class:`CausalWanState`."""
        self._attention_backend = None  # diffusers' set_attention_backend writes here
        self._parallel_config = None

    def reset(self) -> None:
        """Nothing per-generation lives on the processor itself (the session holds it)."""


class CausalWanSelfAttnProcessor(_CausalProcessorBase):
    """``attn1`` of a Wan block: block-causal self-attention over the KV cache during a generation,
    diffusers' ``WanAttnProcessor`` math otherwise. Override :meth:`chunk_attention` (module docstring)."""

    def __init__(
        self, layer: int, state: CausalWanState, chunk_attention_fn: ChunkAttentionFn | None = None
    ) -> None:
        super().__init__(layer, state)
        self.chunk_attention_fn = chunk_attention_fn
        """Optional replacement of the default dense :meth:`chunk_attention`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``WanAttnProcessor.__call__`` (self-attention only)."""
        if encoder_hidden_states is not None:
            raise ValueError("CausalWanSelfAttnProcessor serves self-attention (attn1) only")
        session = self.state.session
        if session is not None and attention_mask is not None:
            raise ValueError(
                "causal Wan self-attention got an attention_mask during a causal generation; the chunked "
                "generation attends block-causally over its KV cache and cannot honour a mask (it would run "
                "non-causal and skip the cache write); allowed: attention_mask=None"
            )
        if session is not None and self._parallel_config is not None:
            from .context_parallel import causal_self_attention  # [context parallel] Ulysses chunk exchange

            return causal_self_attention(self, attn, session, hidden_states, rotary_emb)
        query, key, value = projections(attn, hidden_states, None)
        query = norm_rope(attn.norm_q, query, attn.heads, rotary_emb)
        raw_keys = session is not None and session.rope_positions == "window" and attention_mask is None
        key = norm_rope(attn.norm_k, key, attn.heads, None if raw_keys else rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        if session is None or attention_mask is not None:
            out = dense_dispatch(self, query, key, value, attention_mask, self._parallel_config)
        else:
            out = self._causal(session, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _causal(self, session: CausalWanSession, query, key, value) -> torch.Tensor:
        if session.chunk_index < 0:
            raise RuntimeError("causal Wan forward before session.begin_chunk(...)")
        b, n = query.shape[:2]
        expected = session.frames_per_chunk * session.frame_tokens
        if n != expected or b != session.batch_size:
            raise ValueError(
                f"causal Wan forward got hidden states of batch {b} x {n} tokens; this generation expects "
                f"batch {session.batch_size} x {expected} tokens (one chunk of {session.frames_per_chunk} "
                f"frames x {session.frame_tokens} tokens)"
            )
        cache = session.cache(self.layer)
        visible = session.visible()
        frames = session.chunk_frames
        cache.write(key, value, frames, visible)
        keys, values = cache.view()
        if session.rope_positions == "window":  # cached without RoPE: rotate by window position
            keys = apply_wan_rotary(keys.transpose(1, 2), *session.key_rotary).transpose(1, 2)
        info = session.info(self.layer, cache.frames)
        fn = self.chunk_attention_fn or self.chunk_attention
        out = fn(query.transpose(1, 2), keys, values, info)
        if session.context_pass:
            self.on_chunk_written(*cache.chunk_view(frames), info)
        return out.transpose(1, 2)

    def chunk_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, info: ChunkInfo
    ) -> torch.Tensor:
        """Attention of the chunk's queries ``[B, H, Nq, D]`` over cache + chunk keys/values ``[B, H, Nk, D]``;
        ``[B, H, Nq, D]``. Dense (diffusers' dispatched attention); Light Forcing overrides this."""
        out = dense_dispatch(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    def on_chunk_written(self, key: torch.Tensor, value: torch.Tensor, info: ChunkInfo) -> None:
        """Called after the context pass wrote the clean chunk's K/V (views ``[B, H, Nq, D]``; keys without
        RoPE in ``"window"`` mode); no-op here."""


class CausalWanCrossAttnProcessor(_CausalProcessorBase):
    """``attn2`` of a Wan block (text cross-attention): during a generation the prompt K/V are computed on
    the first forward of each CFG branch and reused for every chunk and step."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``WanAttnProcessor.__call__`` for text-only cross-attention."""
        if encoder_hidden_states is None:
            raise ValueError("CausalWanCrossAttnProcessor serves cross-attention (attn2) only")
        session = self.state.session
        cached = session.cross_kv.get((session.branch, self.layer)) if session is not None else None
        if cached is None:
            query, key, value = projections(attn, hidden_states, encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if session is not None:
                session.cross_kv[(session.branch, self.layer)] = (key, value)
        else:
            key, value = cached
            query = attn.to_q(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        out = dense_dispatch(self, query, key, value, attention_mask)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# ----------------------------------------------------------------------------- RoPE hook


def _rope_hook_class():
    from diffusers.hooks import ModelHook

    class AbsoluteFrameRoPEHook(ModelHook):
        """Hook on ``transformer.rope``: during a generation the table covers the chunk's frame positions
        ``[p, p + F)`` with ``p = session.query_position`` (diffusers' own table for ``p + F`` frames, sliced);
        in ``"window"`` mode the whole table is also kept for the keys (``session.key_rotary``)."""

        def __init__(self, state: CausalWanState) -> None:
            super().__init__()
            self.state = state

        def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
            session = self.state.session
            forward = self.fn_ref.original_forward
            if session is None or session.chunk_index < 0:
                return forward(hidden_states, *args, **kwargs)
            from .context_parallel import unsplit_rope_forward  # [context parallel] whole table in any order

            forward = unsplit_rope_forward(module, forward, ROPE_HOOK_NAME)
            b, c, f, h, w = hidden_states.shape
            p_t, p_h, p_w = module.patch_size
            offset = session.query_position * p_t
            if offset == 0:
                cos, sin = forward(hidden_states, *args, **kwargs)
                session.key_rotary = (cos, sin) if session.rope_positions == "window" else None
                return cos, sin
            if (offset + f) // p_t > module.max_seq_len:
                raise ValueError(
                    f"frame {(offset + f) // p_t} is beyond the RoPE table of rope_max_seq_len={module.max_seq_len}"
                )
            # only the shape matters to the table: a zero-stride view of the right size
            longer = hidden_states[:, :, :1].expand(b, c, offset + f, h, w)
            cos, sin = forward(longer, *args, **kwargs)
            session.key_rotary = (cos, sin) if session.rope_positions == "window" else None
            skip = (offset // p_t) * (h // p_h) * (w // p_w)
            return cos[:, skip:], sin[:, skip:]

    return AbsoluteFrameRoPEHook


# ----------------------------------------------------------------------------- install / remove


def check_causal_wan(model) -> None:
    """``ValueError`` unless ``model`` is a text-to-video ``WanTransformer3DModel`` with frame patch 1."""
    if not is_wan(model):
        raise ValueError(
            f"transformer={type(model).__name__} is not supported; allowed: diffusers WanTransformer3DModel"
        )
    if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
        raise ValueError(
            "transformer is an image-to-video Wan (image_dim / added_kv_proj_dim set); allowed: text-to-video Wan"
        )
    if tuple(model.config.patch_size)[0] != 1:
        raise ValueError(
            f"transformer patch_size={tuple(model.config.patch_size)} has a temporal patch != 1; allowed: (1, p, p)"
        )


def get_causal_state(model) -> CausalWanState | None:
    """The :class:`CausalWanState` of ``model`` if causal processors are installed, else None."""
    saved = getattr(model, _STATE_ATTR, None)
    return saved["state"] if saved is not None else None


def install_causal_processors(
    model,
    self_attention: Callable[[int, CausalWanState], CausalWanSelfAttnProcessor] | None = None,
) -> CausalWanState:
    """Install the causal processors (``attn1``: ``self_attention(layer, state)``, default
    :class:`CausalWanSelfAttnProcessor`; ``attn2``: :class:`CausalWanCrossAttnProcessor`) and the RoPE hook
    on a diffusers ``WanTransformer3DModel``. Installing again replaces the previous causal processors.
    The original processor objects are saved on the instance for :func:`remove_causal_processors`."""
    from diffusers.hooks import HookRegistry

    check_causal_wan(model)
    if getattr(model, RECTIFIED_STATE_ATTR, None) is not None:
        raise ValueError(
            "this transformer has RectifiedSpaAttnConfig applied; the causal Wan's chunked generation installs "
            "its own causal processors, which would replace it and run dense; allowed: remove it "
            "(fastgen.remove_sparse_attention) and apply LightForcingConfig, the causal method"
        )
    remove_causal_processors(model)
    build = self_attention or (lambda layer, state: CausalWanSelfAttnProcessor(layer, state))
    state = CausalWanState()
    saved = dict(model.attn_processors)
    new = dict(saved)
    for i in range(len(model.blocks)):
        for name, proc in (
            (f"blocks.{i}.attn1.processor", build(i, state)),
            (f"blocks.{i}.attn2.processor", CausalWanCrossAttnProcessor(i, state)),
        ):
            if not isinstance(proc, _CausalProcessorBase):
                raise ValueError(
                    f"self_attention must build causal Wan processors, got {type(proc).__name__}"
                )
            carry_backend(proc, saved[name])
            new[name] = proc
    model.set_attn_processor(new)
    registry = HookRegistry.check_if_exists_or_initialize(model.rope)
    registry.register_hook(_rope_hook_class()(state), ROPE_HOOK_NAME)
    setattr(model, _STATE_ATTR, {"saved": saved, "state": state})
    return state


def remove_causal_processors(model) -> None:
    """Undo :func:`install_causal_processors`: original processors back, RoPE hook removed (no-op if none)."""
    saved = getattr(model, _STATE_ATTR, None)
    if saved is None:
        return
    if saved["state"].session is not None:
        saved["state"].session.close()
        saved["state"].session = None
    model.set_attn_processor(dict(saved["saved"]))
    registry = getattr(model.rope, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(ROPE_HOOK_NAME) is not None:
        registry.remove_hook(ROPE_HOOK_NAME, recurse=False)
    setattr(model, _STATE_ATTR, None)


@contextlib.contextmanager
def causal_generation(model, **session_options) -> Iterator[CausalWanSession]:
    """Open a :class:`CausalWanSession` (options: its constructor's) on ``model`` for one generation.

    Uses the causal processors already installed (e.g. Light Forcing's) or installs the dense ones for
    the duration of the block and removes them after. The caches are freed on exit.
    """
    session = CausalWanSession(**session_options)  # validates before anything is installed
    state = get_causal_state(model)
    installed_here = state is None
    if installed_here:
        state = install_causal_processors(model)
    if state.session is not None:
        raise RuntimeError("a causal generation is already running on this transformer")
    state.session = session
    try:
        yield session
    finally:
        session.close()
        state.session = None
        if installed_here:
            remove_causal_processors(model)


__all__ = [
    "ROPE_POSITIONS",
    "ChunkAttentionFn",
    "ChunkInfo",
    "CausalWanCrossAttnProcessor",
    "CausalWanSelfAttnProcessor",
    "CausalWanSession",
    "CausalWanState",
    "KVCache",
    "causal_generation",
    "check_causal_wan",
    "check_chunking",
    "get_causal_state",
    "install_causal_processors",
    "remove_causal_processors",
    "visible_frames",
]
