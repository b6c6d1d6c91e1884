"""Autoregressive (causal Wan) video generation for the CLI, batch and the demo: dense or Light Forcing.

``generate_causal_video`` runs a ``CausalWanPipeline`` once, with Light Forcing applied for the call only
(``fastgen.apply_sparse_attention(pipe.transformer, LightForcingConfig(...))``, removed afterwards), and
returns the frames, the time and the per-(chunk, layer) statistics of the processors.
``fastgen.pipelines.video_runner.generate_video`` hands causal pipelines to it, which is how ``fastgen
generate --preset tiny-causal-wan --method light_forcing`` and ``fastgen batch`` reach it.

Example:
    >>> from fastgen.pipelines import load_preset
    >>> from fastgen.pipelines.causal_video_runner import generate_causal_video
    >>> pipe = load_preset("tiny-causal-wan")
    >>> result = generate_causal_video(pipe, prompt="a paper boat on a river", method="light_forcing")
    >>> result["frames"].shape, result["seconds"], [r["density"] for r in result["stats"] if r["layer"] == 0]
"""

from __future__ import annotations

import logging

from fastgen.configs import LightForcingConfig
from fastgen.io import to_uint8
from fastgen.processors import light_forcing_wan
from fastgen.processors.light_forcing_wan import chunk_densities

from .video_common import call_kwargs, check_generation_values, timed_call

logger = logging.getLogger(__name__)

METHODS = ("light_forcing", "dense")
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
    method: str = "light_forcing",
    config: LightForcingConfig | None = None,
    local_attn_frames: int | None = None,
    sink_frames: int = 0,
    progress: bool = True,
) -> dict:
    """Generate one video chunk by chunk, dense or with Light Forcing (applied for this call only).

    Returns a dict: ``frames`` uint8 ``[T, H, W, 3]``, ``seconds`` (pipeline call), ``fps``, ``stats``
    (rows of ``fastgen.processors.light_forcing_wan.stats``: ``chunk``, ``layer``, ``density``, ``sparsity``,
    ``regime``, ``block_mask``; empty for dense) and ``config`` (the method's settings as a dict).
    """
    check_generation_values(
        steps=steps, height=height, width=width, frames=frames, guidance_scale=guidance_scale,
        local_attn_frames=local_attn_frames, sink_frames=sink_frames,
    )  # fmt: skip
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed for a causal Wan; allowed: {', '.join(METHODS)}")
    if method == "light_forcing":
        config = config if config is not None else LightForcingConfig()
        if not isinstance(config, LightForcingConfig):
            raise ValueError(f"config={type(config).__name__} does not match method='light_forcing'")
    defaults = {**CAUSAL_DEFAULTS, **getattr(pipe, "fastgen_defaults", {})}
    kwargs = call_kwargs(
        defaults, prompt=prompt, negative_prompt=negative_prompt, seed=seed, height=height, width=width,
        frames=frames, guidance_scale=guidance_scale, denoising_timesteps=denoising_timesteps(steps),
        local_attn_frames=local_attn_frames, sink_frames=sink_frames,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=not progress)
    output, seconds, stats = timed_call(
        pipe, kwargs, config=config if method == "light_forcing" else None, target=pipe.transformer,
        models=[pipe.transformer], read_stats=lambda: light_forcing_wan.stats(pipe.transformer),
    )  # fmt: skip
    return {
        "frames": to_uint8(output.frames[0]),
        "seconds": seconds,
        "fps": int(defaults["fps"]),
        "stats": stats,
        "steps": steps,
        "config": config.to_dict() if method == "light_forcing" else {"method": "dense"},
    }


__all__ = [
    "CAUSAL_DEFAULTS",
    "METHODS",
    "chunk_densities",
    "denoising_timesteps",
    "generate_causal_video",
    "is_causal_pipeline",
]
