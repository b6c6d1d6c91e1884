"""Structured synthetic q/k/v workloads for the attention benchmarks.

Random Gaussian q/k give near-uniform attention, which says nothing about sparse methods. These
workloads mimic what real models produce, all seeded and in SDPA layout ``[B, H, N, D]``:

- :func:`video_workload` - video DiT self-attention: 3D RoPE (head_dim split over the t/h/w axes as
  in Wan) applied to smooth content fields (neighbouring tokens are similar), heads of three kinds
  (spatial: within a frame, nearby h/w; temporal: same h/w across frames; mixed), first-frame sink
  keys, and optional trailing text tokens, possibly padded (``key_padding_mask``).
- :func:`text_workload` - long-text diffusion-LM attention: 1D RoPE, local heads, sink tokens and a
  few retrieval heads whose queries look up one far-away key each.

:func:`topk_block_mass` measures how peaked a workload is: the fraction of attention mass that lands
in the top key blocks of the dense map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HEAD_KINDS = ("spatial", "temporal", "mixed")


@dataclass
class Workload:
    """A synthetic attention input: q/k/v ``[B, H, N, D]`` and the metadata methods need."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None  # bool [B, N], True for real tokens; None = all real
    grid: tuple[int, int, int] | None  # (frames, height, width) of the video tokens
    num_text_tokens: int  # trailing text tokens (0 for text workloads and text-free video)
    kind: str = "video"  # "video" or "text"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, heads, tokens, head_dim)``."""
        return tuple(self.q.shape)

    def to(self, device: torch.device | str) -> Workload:
        """The same workload on ``device``."""
        mask = None if self.key_padding_mask is None else self.key_padding_mask.to(device)
        return Workload(
            self.q.to(device),
            self.k.to(device),
            self.v.to(device),
            mask,
            self.grid,
            self.num_text_tokens,
            self.kind,
        )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a positive integer")


def _check_head_dim(head_dim: int) -> None:
    _check_positive("head_dim", head_dim)
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim={head_dim!r} is not allowed; it must be even and >= 8")


def wan_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of head_dim given to the (t, h, w) RoPE axes, split as Wan does (all even)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles ``[N, dim/2]`` for integer positions ``[N]`` over ``dim`` channels."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.double()[:, None] * inv_freq[None, :]


def _apply_rotation(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` ``[..., N, 2P]`` by ``angles`` ``[N, P]``."""
    cos, sin = angles.cos().float(), angles.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_3d(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """3D rotary embedding of raster-order (t, h, w) tokens ``x`` ``[..., f*h*w, D]``, Wan's split."""
    f, h, w = grid
    dt, dh, dw = wan_axis_dims(x.shape[-1])
    t_pos = torch.arange(f).repeat_interleave(h * w)
    h_pos = torch.arange(h).repeat_interleave(w).repeat(f)
    w_pos = torch.arange(w).repeat(f * h)
    angles = torch.cat([_rope_angles(t_pos, dt), _rope_angles(h_pos, dh), _rope_angles(w_pos, dw)], dim=-1)
    return _apply_rotation(x, angles)


def rope_1d(x: torch.Tensor) -> torch.Tensor:
    """1D rotary embedding of tokens ``x`` ``[..., N, D]`` at positions ``0..N-1``."""
    return _apply_rotation(x, _rope_angles(torch.arange(x.shape[-2]), x.shape[-1]))


def smooth_field(
    size: tuple[int, ...], channels: int, cells: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Low-frequency random field: Gaussian values on a coarse lattice of ``cells`` per axis,
    linearly interpolated to ``size``; returns ``[prod(size), channels]`` with unit variance."""
    coarse = torch.randn(1, channels, *[c + 1 for c in cells], generator=generator)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    fine = torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=True)
    fine = fine.reshape(channels, -1).T
    return fine / fine.std().clamp_min(1e-6)


def _axis_weights(kind: str, head_dim: int) -> torch.Tensor:
    """Per-channel weights of the positional component for a head kind (t / h / w channel groups)."""
    dt, dh, dw = wan_axis_dims(head_dim)
    w_t, w_hw = {"spatial": (1.6, 1.0), "temporal": (0.25, 1.5), "mixed": (1.0, 1.0)}[kind]
    return torch.cat([torch.full((dt,), w_t), torch.full((dh + dw,), w_hw)])


def video_workload(
    grid: tuple[int, int, int] = (4, 16, 16),
    heads: int = 4,
    head_dim: int = 64,
    num_text_tokens: int = 0,
    text_valid: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int = 1,
    sink_strength: float = 1.0,
) -> Workload:
    """Video-DiT-like self-attention input: ``f*h*w`` video tokens then ``num_text_tokens`` text.

    Args:
        grid: ``(frames, height, width)`` of the latent video tokens (raster order).
        heads, head_dim: attention heads and channels per head (head_dim even, >= 8).
        num_text_tokens: trailing text tokens (HunyuanVideo style); 0 for none.
        text_valid: how many of the text tokens are real (the rest are padding, masked out in
            ``key_padding_mask``); None = all real.
        dtype: dtype of q/k/v.
        seed: random seed (the workload is a pure function of its arguments).
        batch: batch size (each batch row gets its own content).
        sink_strength: how strongly queries favour first-frame keys (0 = no sink).

    Returns:
        A :class:`Workload`. Heads cycle through spatial, temporal and mixed kinds.
    """
    if len(grid) != 3:
        raise ValueError(f"grid={grid!r} must be (frames, height, width)")
    for name, value in zip(("frames", "height", "width"), grid):
        _check_positive(name, value)
    _check_positive("heads", heads)
    _check_head_dim(head_dim)
    _check_positive("batch", batch)
    if not isinstance(num_text_tokens, int) or num_text_tokens < 0:
        raise ValueError(f"num_text_tokens={num_text_tokens!r} must be an integer >= 0")
    if text_valid is not None and not 0 <= text_valid <= num_text_tokens:
        raise ValueError(f"text_valid={text_valid!r} is out of range; allowed: 0..{num_text_tokens} or None")
    f, h, w = grid
    n_video = f * h * w
    d = head_dim
    gen = torch.Generator().manual_seed(seed)
    cells = (max(1, f // 2), max(1, h // 4), max(1, w // 4))
    qs, ks, vs = [], [], []
    for _ in range(batch):
        content = smooth_field(grid, d, cells, gen)  # [Nv, D], neighbours similar
        value_field = smooth_field(grid, d, cells, gen)
        q_b, k_b, v_b = [], [], []
        for head in range(heads):
            kind = HEAD_KINDS[head % len(HEAD_KINDS)]
            proj = torch.randn(d, d, generator=gen) / math.sqrt(d)
            position = torch.randn(d, generator=gen).abs() * _axis_weights(kind, d)  # [D]
            shared = content @ proj  # similar tokens attend to each other
            q_h = 1.6 * position + 0.9 * shared + 0.3 * torch.randn(n_video, d, generator=gen)
            k_h = 1.6 * position + 0.9 * shared + 0.3 * torch.randn(n_video, d, generator=gen)
            q_h, k_h = rope_3d(q_h, grid), rope_3d(k_h, grid)
            if sink_strength > 0:
                sink = torch.randn(d, generator=gen)
                sink = sink / sink.norm() * math.sqrt(d) * sink_strength
                q_h = q_h + 0.35 * sink
                k_h[: h * w] += 0.35 * sink
            v_h = value_field @ (torch.randn(d, d, generator=gen) / math.sqrt(d))
            v_h = v_h + 0.2 * torch.randn(n_video, d, generator=gen)
            q_b.append(q_h)
            k_b.append(k_h)
            v_b.append(v_h)
        qs.append(torch.stack(q_b))
        ks.append(torch.stack(k_b))
        vs.append(torch.stack(v_b))
    q, k, v = torch.stack(qs), torch.stack(ks), torch.stack(vs)  # [B, H, Nv, D]
    mask = None
    if num_text_tokens:
        text = lambda: torch.randn(batch, heads, num_text_tokens, d, generator=gen)  # noqa: E731
        q = torch.cat([q, text()], dim=2)
        k = torch.cat([k, 0.7 * text()], dim=2)
        v = torch.cat([v, text()], dim=2)
        if text_valid is not None and text_valid < num_text_tokens:
            mask = torch.ones(batch, n_video + num_text_tokens, dtype=torch.bool)
            mask[:, n_video + text_valid :] = False
    return Workload(q.to(dtype), k.to(dtype), v.to(dtype), mask, tuple(grid), num_text_tokens, "video")


def text_workload(
    n: int = 1024,
    heads: int = 4,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int = 1,
    num_sinks: int = 4,
    retrieval_heads: int = 1,
) -> Workload:
    """Long-text-like self-attention input of ``n`` tokens.

    Heads are local (1D RoPE on a constant component plus smooth content: nearby tokens attend),
    with ``num_sinks`` first tokens acting as attention sinks for every head; the last
    ``retrieval_heads`` heads are retrieval heads, where each query strongly matches one far-away
    key (a random earlier or later position) on top of a weak local pattern.
    """
    _check_positive("n", n)
    _check_positive("heads", heads)
    _check_head_dim(head_dim)
    _check_positive("batch", batch)
    if not 0 <= retrieval_heads <= heads:
        raise ValueError(f"retrieval_heads={retrieval_heads!r} is out of range; allowed: 0..{heads}")
    if not 0 <= num_sinks <= n:
        raise ValueError(f"num_sinks={num_sinks!r} is out of range; allowed: 0..{n}")
    d = head_dim
    gen = torch.Generator().manual_seed(seed)
    qs, ks, vs = [], [], []
    for _ in range(batch):
        content = smooth_field((n,), d, (max(1, n // 64),), gen)
        q_b, k_b, v_b = [], [], []
        for head in range(heads):
            retrieval = head >= heads - retrieval_heads
            proj = torch.randn(d, d, generator=gen) / math.sqrt(d)
            position = torch.randn(d, generator=gen).abs() * (0.6 if retrieval else 1.0)
            shared = content @ proj
            q_h = position + 0.8 * shared + 0.3 * torch.randn(n, d, generator=gen)
            k_h = position + 0.8 * shared + 0.3 * torch.randn(n, d, generator=gen)
            q_h, k_h = rope_1d(q_h), rope_1d(k_h)
            if retrieval:
                # each query looks up one key elsewhere in the sequence by a strong content match
                keys = torch.randn(n, d, generator=gen)
                target = torch.randint(0, n, (n,), generator=gen)
                k_h = k_h + 1.2 * keys
                q_h = q_h + 1.2 * keys[target]
            if num_sinks:
                sink = torch.randn(d, generator=gen)
                sink = sink / sink.norm() * math.sqrt(d)
                q_h = q_h + 0.4 * sink
                k_h[:num_sinks] += 0.4 * sink
            v_h = content @ (torch.randn(d, d, generator=gen) / math.sqrt(d)) + 0.3 * torch.randn(
                n, d, generator=gen
            )
            q_b.append(q_h)
            k_b.append(k_h)
            v_b.append(v_h)
        qs.append(torch.stack(q_b))
        ks.append(torch.stack(k_b))
        vs.append(torch.stack(v_b))
    q, k, v = torch.stack(qs), torch.stack(ks), torch.stack(vs)
    return Workload(q.to(dtype), k.to(dtype), v.to(dtype), None, None, 0, "text")


def topk_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 64,
    fraction: float = 0.15,
    key_padding_mask: torch.Tensor | None = None,
) -> float:
    """Mean fraction of attention mass in the top ``fraction`` key blocks of each query block.

    Computes the dense attention map one query block at a time (small N only: ``O(block * N)``
    memory per step). Uniform attention gives about ``fraction``; peaked attention approaches 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is out of range; allowed: 0 < fraction <= 1")
    b, h, n, d = q.shape
    nk = k.shape[2]
    nkb = -(-nk // block_size)
    keep = max(1, math.ceil(fraction * nkb - 1e-9))
    pad = nkb * block_size - nk
    kf = k.float()
    total, count = 0.0, 0
    for start in range(0, n, block_size):
        s = (q[:, :, start : start + block_size].float() @ kf.transpose(-1, -2)) / math.sqrt(d)
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).mean(dim=2)  # [B, H, nk] mass per key, averaged over the block
        p = torch.nn.functional.pad(p, (0, pad)).view(b, h, nkb, block_size).sum(-1)
        total += float(p.topk(keep, dim=-1).values.sum(-1).sum())
        count += b * h
    return total / count
