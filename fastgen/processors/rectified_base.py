"""The Rectified SpaAttn processor base (Wan, HunyuanVideo adapters subclass it); was ``processors/common.py``.

A :class:`RectifiedProcessorBase` decides, per call, whether self-attention runs sparse
(``rectified_sparse_attention``) or dense (diffusers' ``dispatch_attention_fn``, so
``set_attention_backend`` keeps working), keeps the statistics of its last sparse call and resets
them between generations. Model adapters subclass it and only build q/k/v.

Where the layer index and the step come from:

- installed by ``apply`` (via ``fastgen.apply_sparse_attention``): one processor per attention layer,
  constructed with its layer index and the model's :class:`~fastgen.tracking.StepTracker`;
- set by hand (``transformer.set_attn_processor(WanRectifiedProcessor(config))``, one instance on
  every layer): the layer index of an attention module is the order in which the instance first
  sees it (= block order); the step comes from the model's tracker while a tracked forward runs
  (``fastgen.tracking.register_step_tracker(transformer)``). Without a tracker the processor counts
  forward passes itself (a pass begins when the first layer is called again): CFG run as two calls
  then counts as two steps, and ``fastgen.tracking.reset_step_tracking(transformer)`` must be called
  between generations for the dense warm-up to run again.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from fastgen._validation import log_once
from fastgen.attention.rectified import rectified_attention as rectified_sparse_attention_op
from fastgen.attention.workspace import Workspace
from fastgen.attention_stats import DEFAULT_LEVEL, attention_stats
from fastgen.configs import RectifiedSpaAttnConfig
from fastgen.tracking import StepTracker, active_tracker

from ._install import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    dense_dispatch,
    head_dim_supported,
    install_processors,
    restore_processors,
)
from ._install import check_config as _check_config

logger = logging.getLogger(__name__)


def grid_from_rope_table(table: torch.Tensor) -> tuple[int, int, int] | None:
    """Recover the raster ``(frames, height, width)`` token grid from a 3D-RoPE cos table ``[N, D]``.

    Both Wan and HunyuanVideo lay the table out as frame, height, width channel groups, each starting
    with frequency 1 (``cos(position)``, distinct for distinct integer positions). The frame part
    changes every ``height*width`` tokens and the height part every ``width`` tokens.
    """
    n = table.shape[0]
    if n == 0:
        return None
    changed = table != table[:1]
    first = torch.where(
        changed.any(0), changed.float().argmax(0), torch.full_like(changed[0], n, dtype=torch.long)
    )
    periods = sorted({int(p) for p in first.tolist()})
    hw = int(first[0])
    between = [p for p in periods if 1 < p < hw]
    w = between[0] if between else hw
    if n % hw or hw % w:
        return None
    return n // hw, hw // w, w


def key_padding_from_attention_mask(
    mask: torch.Tensor | None, batch: int, n_keys: int
) -> torch.Tensor | None:
    """Bool ``[B, Nk]`` (True = real key) from a diffusers key mask, or None if it is not a pure key mask.

    Accepts bool or additive-float masks of shape ``[B, Nk]``, ``[B, 1, Nk]`` or ``[B, 1, 1, Nk]``.
    Raises ``LookupError`` for masks that vary per query or per head (the caller then runs dense).
    """
    if mask is None:
        return None
    m = mask
    while m.ndim > 2:
        if m.shape[1] != 1:
            raise LookupError(f"attention_mask of shape {tuple(mask.shape)} is not a key padding mask")
        m = m.squeeze(1)
    if m.ndim != 2 or m.shape[-1] != n_keys or m.shape[0] not in (1, batch):
        raise LookupError(f"attention_mask of shape {tuple(mask.shape)} does not match {n_keys} keys")
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    return m.expand(batch, -1)


def check_config(config) -> RectifiedSpaAttnConfig:
    """``config`` itself if it is a :class:`RectifiedSpaAttnConfig`, else a ``ValueError``."""
    return _check_config(config, RectifiedSpaAttnConfig, "the Rectified SpaAttn processors")


class RectifiedProcessorBase:
    """Per-layer sparse/dense decision, statistics and reset; subclasses build q/k/v for one model."""

    def __init__(
        self,
        config: RectifiedSpaAttnConfig | None = None,
        *,
        layer: int | None = None,
        tracker: StepTracker | None = None,
    ) -> None:
        self.config = check_config(config if config is not None else RectifiedSpaAttnConfig())
        """The method's settings."""
        self.layer = layer
        """Layer index (None when set by hand: assigned per attention module on first sight)."""
        self.tracker = tracker
        """Step tracker of the model (None: the active tracker of a tracked call, else own counting)."""
        self._attention_backend = None  # diffusers' set_attention_backend writes here
        self._parallel_config = None
        self._layer_of: dict[int, int] = {}
        self._own_forwards = -1
        # statistics of the last sparse call per layer; the layer's key exists from the start and
        # is never removed (reset writes None), so a compiled forward sees the same dict keys always
        self._last: dict[int, dict | None] = {} if layer is None else {layer: None}
        self.record_stats = DEFAULT_LEVEL
        """Statistics kept per layer: ``"off"`` (the default: statistics are opt-in), ``"summary"`` (0-dim
        device tensors) or ``"masks"`` (also the block masks); see :mod:`fastgen.attention_stats`."""
        self._logged: set[str] = set()
        self._listening: StepTracker | None = None
        self.workspace = Workspace()
        """Scratch buffers of the sparse path, reused layer after layer (CPU). Freed when a tracked
        forward call returns, by :meth:`reset` and on removal; ``apply`` gives every layer's
        processor the same one."""
        if tracker is not None:
            self._listen(tracker)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget per-generation state (statistics, own forward counter) and free the scratch buffers."""
        for layer in self._last:
            self._last[layer] = None
        self._own_forwards = -1
        self.workspace.clear()

    def _listen(self, tracker: StepTracker) -> None:
        if self._listening is not tracker:
            self._stop_listening()
            tracker.add_reset_listener(self.reset)
            tracker.add_call_end_listener(self.release_scratch)
            tracker.watch_step(self.config.warmup_steps)
            self._listening = tracker

    def _stop_listening(self) -> None:
        if self._listening is not None:
            self._listening.remove_reset_listener(self.reset)
            self._listening.remove_call_end_listener(self.release_scratch)
            self._listening = None

    def release_scratch(self) -> None:
        """Free the scratch buffers (the tracker calls this when a forward call returns)."""
        self.workspace.clear()

    def detach(self) -> None:
        """Stop listening to the tracker and free the scratch buffers (called when the processor is removed)."""
        self._stop_listening()
        self.release_scratch()

    def _log_once(self, message: str, level: int = logging.INFO) -> None:
        log_once(logger, message, level, seen=self._logged)

    def _layer_index(self, attn: torch.nn.Module) -> int:
        if self.layer is not None:
            return self.layer
        key = id(attn)
        if key not in self._layer_of:
            self._layer_of[key] = len(self._layer_of)
        return self._layer_of[key]

    def _step_and_grid(self, layer: int) -> tuple[int, tuple[int, int, int] | None]:
        """The step (for the warm-up decision only) and the latent grid of this call. With a tracker
        the step is read as "warm-up over or not" (:meth:`StepTracker.step_reached`, a bool that a
        compiled forward guards on) and returned as 0 or ``warmup_steps``."""
        tracker = self.tracker or active_tracker()
        if tracker is not None:
            self._listen(tracker)
            warmup = self.config.warmup_steps
            return (warmup if tracker.step_reached(warmup) else 0), tracker.grid
        if layer == 0:  # first layer called again: a new forward pass
            self._own_forwards += 1
            if self._own_forwards == 0:
                self._log_once(
                    "fastgen: processor has no step tracker; counting forward passes as steps "
                    "(call fastgen.tracking.register_step_tracker(transformer) for timestep-based counting)"
                )
        return max(self._own_forwards, 0), None

    # -------------------------------------------------------------- decision
    def sparse_reason(self, layer: int, step: int, n_tokens: int, head_dim: int) -> str | None:
        """Why this call runs dense (None: it runs sparse)."""
        cfg = self.config
        if layer < cfg.dense_layers:
            return "dense layer"
        if step < cfg.warmup_steps:
            return "warm-up step"
        if n_tokens < cfg.min_tokens:
            return f"sequence of {n_tokens} tokens is shorter than min_tokens={cfg.min_tokens}"
        if not head_dim_supported(head_dim):
            return f"head_dim={head_dim} is unsupported (allowed: multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])"
        return None

    def fallback(self, reason: str) -> None:
        """Log a dense fallback that the user did not ask for (once per reason)."""
        if reason not in ("dense layer", "warm-up step"):
            self._log_once(f"fastgen: {type(self).__name__} runs dense attention: {reason}")

    # ----------------------------------------------------------------- compute
    def dense(self, query, key, value, attn_mask=None, parallel_config=None) -> torch.Tensor:
        """diffusers' dispatched attention on ``[B, N, H, D]`` tensors (honours ``set_attention_backend``)."""
        return dense_dispatch(self, query, key, value, attn_mask, parallel_config)

    def sparse(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        num_text_tokens: int = 0,
        key_padding_mask: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        padded_video_keys: bool | None = None,
    ) -> torch.Tensor:
        """Rectified sparse self-attention on ``[B, N, H, D]`` tensors; records the layer's statistics
        (``padded_video_keys``: see :func:`~fastgen.attention.rectified.rectified_attention`)."""
        cfg = self.config
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        record = self.record_stats != "off"
        # under torch.compile the compiler owns the memory: no scratch buffers kept across calls
        workspace = None if torch.compiler.is_compiling() else self.workspace
        if grid is None:
            self._note_no_grid(cfg)
        result = rectified_sparse_attention_op(
            q,
            k,
            v,
            cfg if grid is not None or not cfg.reorder else replace(cfg, reorder=False),
            num_text_tokens=num_text_tokens,
            key_padding_mask=key_padding_mask,
            grid=grid,
            return_stats=record,
            workspace=workspace,
            padded_video_keys=padded_video_keys,
        )
        out = result[0] if record else result
        if record:
            stats = result[1]
            kept = ("density", "compensated_fraction", "keys_per_query", "head_density")
            if self.record_stats == "masks":
                kept += ("block_mask", "compensated_mask")
            self._last[layer] = {name: stats[name] for name in kept}
        return out.transpose(1, 2)

    def _note_no_grid(self, cfg: RectifiedSpaAttnConfig) -> None:
        """Say once which settings need the latent grid, when this call has none."""
        why = "the latent (frames, height, width) grid of this call is unknown (no tracker grid, no 3D RoPE table)"
        if cfg.reorder:
            self._log_once(f"fastgen: reorder=True is off for this call: {why}", logging.WARNING)
        if cfg.selection == "paper":
            self._log_once(
                f"fastgen: selection='paper' runs without its 3-D neighbour rule for this call: {why}",
                logging.WARNING,
            )

    def layer_stats(self) -> list[dict]:
        """Statistics of the last sparse call of each layer this processor serves (floats; with
        ``record_stats="masks"`` also the block mask of batch 0 as a CPU bool ``[H, nqb, nkb]``)."""
        rows = []
        for layer in sorted(self._last):
            stats = self._last[layer]
            if stats is None:
                continue
            mask = stats.get("block_mask")
            rows.append(
                {
                    "layer": layer,
                    "density": _as_float(stats.get("density")),
                    "compensated_fraction": _as_float(stats.get("compensated_fraction")),
                    "keys_per_query": _as_float(stats.get("keys_per_query")),
                    "block_mask": mask[0].detach().to("cpu", torch.bool) if mask is not None else None,
                }
            )
        return rows


def _as_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.float().mean())
    return float(value)


def collect_stats(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics of every fastgen processor on ``model``, sorted by layer (the adapters'
    ``stats``; the same as :func:`fastgen.attention_stats`)."""
    return attention_stats(model)


__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "RectifiedProcessorBase",
    "check_config",
    "collect_stats",
    "grid_from_rope_table",
    "head_dim_supported",
    "install_processors",
    "key_padding_from_attention_mask",
    "restore_processors",
]
