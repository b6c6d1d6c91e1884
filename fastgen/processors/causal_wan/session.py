"""The causal Wan's per-generation state: chunk geometry (:class:`ChunkInfo`, :func:`visible_frames`),
the per-layer :class:`KVCache`, the :class:`CausalWanSession` a generation opens, the chunking checks and
the :class:`CausalWanState` the processors share. See the package docstring."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

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


__all__ = [
    "ROPE_POSITIONS",
    "ChunkAttentionFn",
    "ChunkInfo",
    "CausalWanSession",
    "CausalWanState",
    "KVCache",
    "check_chunking",
    "visible_frames",
]
