"""Video generation with ``CausalWanPipeline`` for the CLI, batch and the demo (same result dict as
``fastgen.pipelines.video_runner.generate_video``, which hands causal pipelines over to this module).

``steps`` picks the per-chunk denoising schedule: ``linspace(1000, 0, steps + 1)[:-1]`` warped with shift 5,
which for 4 steps is Self-Forcing's own ``[1000, 937.5, 833.33, 625]``. A sparse ``config`` (Light Forcing)
is applied to the transformer for the call and removed afterwards; ``"dense"`` runs the causal model as is.

Example:
    >>> from fastgen.pipelines.video_runner import load_video_pipeline, generate_video
    >>> pipe = load_video_pipeline("tiny-causal-wan")
    >>> result = generate_video(pipe, prompt="a red kite over the sea", method="dense")
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

CAUSAL_METHODS = ("dense",)
"""Attention methods of :func:`generate_causal_video` (sparse ones add their name and config here)."""

CAUSAL_DEFAULTS = {"steps": 4, "height": 480, "width": 832, "frames": 81, "guidance_scale": 1.0, "fps": 16}
"""Generation defaults of a real Self-Forcing checkpoint (tiny presets carry their own)."""


def schedule_for_steps(steps: int, shift: float = 5.0) -> list[float]:
    """Per-chunk timesteps for ``steps`` denoising steps: ``1000 * (1 - i / steps)`` warped with ``shift``."""
    from .causal_wan import warp_timesteps

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    return warp_timesteps([1000.0 * (1.0 - i / steps) for i in range(steps)], shift=shift)


def _to_uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return frames


def generate_causal_video(
    pipe,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    guidance_scale: float | None = None,
    method: str = "dense",
    config=None,
    progress: bool = True,
    **pipe_options,
) -> dict:
    """Generate one video with a ``CausalWanPipeline``; returns ``frames`` uint8 ``[T, H, W, 3]``,
    ``seconds``, ``fps``, ``stats`` (rows of the method's statistics, empty for dense) and ``config``.
    ``pipe_options`` go to the pipeline (``num_frames_per_chunk``, ``local_attn_frames``, ``sink_frames``)."""
    from fastgen import apply_sparse_attention, remove_sparse_attention

    if method not in CAUSAL_METHODS:
        raise ValueError(
            f"method={method!r} is not allowed for the causal Wan; allowed: {', '.join(CAUSAL_METHODS)}"
        )
    if method == "dense" and config is not None:
        raise ValueError(f"config={type(config).__name__} does not match method='dense'")
    defaults = {**CAUSAL_DEFAULTS, **getattr(pipe, "fastgen_defaults", {})}
    kwargs = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height or defaults["height"],
        "width": width or defaults["width"],
        "num_frames": frames or defaults["frames"],
        "denoising_timesteps": schedule_for_steps(steps or defaults["steps"]),
        "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": "np",
        **pipe_options,
    }
    pipe.set_progress_bar_config(disable=not progress)
    stats = []
    if config is not None:
        apply_sparse_attention(pipe.transformer, config)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            output = pipe(**kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if config is not None:
            from fastgen.processors.common import collect_stats

            stats = [{"model": "transformer", **row} for row in collect_stats(pipe.transformer)]
    finally:
        if config is not None:
            remove_sparse_attention(pipe.transformer)
    return {
        "frames": _to_uint8(output.frames[0]),
        "seconds": seconds,
        "fps": int(defaults["fps"]),
        "stats": stats,
        "config": config.to_dict() if config is not None else {"method": "dense"},
    }


__all__ = ["CAUSAL_DEFAULTS", "CAUSAL_METHODS", "generate_causal_video", "schedule_for_steps"]
