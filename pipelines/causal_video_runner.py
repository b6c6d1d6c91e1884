"""Autoregressive (causal Wan) video generation for the CLI, batch and the demo.

``generate_causal_video`` runs a ``CausalWanPipeline`` once and returns the frames, the time and the
statistics of a sparse method (none for dense). ``fastgen.pipelines.video_runner.generate_video`` hands
causal pipelines to it, which is how ``fastgen generate --preset tiny-causal-wan --method dense`` and
``fastgen batch`` reach it. ``METHODS`` lists the attention methods; a sparse one (Light Forcing) adds its
name there and is applied for the call only with ``fastgen.apply_sparse_attention``.

Example:
    >>> from fastgen.pipelines import load_preset
    >>> from fastgen.pipelines.causal_video_runner import generate_causal_video
    >>> pipe = load_preset("tiny-causal-wan")
    >>> result = generate_causal_video(pipe, prompt="a paper boat on a river", method="dense")
    >>> result["frames"].shape, result["seconds"]
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

METHODS = ("dense",)
"""Attention methods of ``generate_causal_video``."""

CAUSAL_DEFAULTS = {"height": 480, "width": 832, "frames": 81, "guidance_scale": 1.0, "fps": 16}
"""Generation defaults of a real Self-Forcing checkpoint (the tiny preset carries its own)."""


def is_causal_pipeline(pipe) -> bool:
    """Whether ``pipe`` is a ``fastgen.pipelines.CausalWanPipeline``."""
    return type(pipe).__name__ == "CausalWanPipeline"


def denoising_timesteps(steps: int | None) -> list[float] | None:
    """Self-Forcing's schedule for ``steps`` steps per chunk: ``linspace(1000, 0, steps + 1)[:-1]`` warped
    with shift 5 (4 steps give the default ``[1000, 937.5, 833.33, 625]``); None for the pipeline's default."""
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1 (denoising steps per chunk)")
    from .causal_wan import warp_timesteps

    return warp_timesteps([1000.0 * (1.0 - i / steps) for i in range(steps)])


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
    local_attn_frames: int | None = None,
    sink_frames: int = 0,
    progress: bool = True,
) -> dict:
    """Generate one video chunk by chunk.

    Returns a dict: ``frames`` uint8 ``[T, H, W, 3]``, ``seconds`` (pipeline call), ``fps``, ``stats``
    (empty for dense) and ``config`` (the method's settings as a dict).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed for a causal Wan; allowed: {', '.join(METHODS)}")
    if config is not None:
        raise ValueError(f"config={type(config).__name__} does not match method={method!r}")
    defaults = {**CAUSAL_DEFAULTS, **getattr(pipe, "fastgen_defaults", {})}
    kwargs = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height or defaults["height"],
        "width": width or defaults["width"],
        "num_frames": frames or defaults["frames"],
        "denoising_timesteps": denoising_timesteps(steps),
        "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
        "local_attn_frames": local_attn_frames,
        "sink_frames": sink_frames,
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": "np",
    }
    pipe.set_progress_bar_config(disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():
        output = pipe(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "frames": _to_uint8(output.frames[0]),
        "seconds": seconds,
        "fps": int(defaults["fps"]),
        "stats": [],
        "config": {"method": "dense"},
    }


__all__ = ["CAUSAL_DEFAULTS", "METHODS", "denoising_timesteps", "generate_causal_video", "is_causal_pipeline"]
