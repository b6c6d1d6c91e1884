"""Video generation for the CLI, batch and the demo: load a pipeline and generate with or without
Rectified SpaAttn (``fastgen.cli.generate.generate_video_from_args`` writes the mp4 and compares with dense).

Example:
    >>> from fastgen.pipelines.video_runner import load_video_pipeline, generate_video
    >>> pipe = load_video_pipeline("tiny-wan")
    >>> result = generate_video(pipe, prompt="a red kite over the sea", method="rectified")
    >>> result["frames"].shape, result["seconds"], result["stats"][1]["density"]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from fastgen.configs import RectifiedSpaAttnConfig
from fastgen.io import to_uint8

from .video_common import (
    call_kwargs,
    check_generation_values,
    execution_device,
    resolve_device_dtype,
    timed_call,
)

logger = logging.getLogger(__name__)

METHODS = ("rectified", "dense")
"""Attention methods of ``generate_video``."""

FAMILY_DEFAULTS = {
    "wan": {"steps": 50, "height": 480, "width": 832, "frames": 81, "guidance_scale": 5.0, "fps": 16},
    "hunyuan": {"steps": 50, "height": 720, "width": 1280, "frames": 129, "guidance_scale": 6.0, "fps": 24},
}
"""Generation defaults of real checkpoints per model family (tiny presets carry their own)."""


def pipeline_family(pipe) -> str:
    """``"wan"`` or ``"hunyuan"`` from the pipeline class; ``ValueError`` otherwise."""
    name = type(pipe).__name__
    if name.startswith("Wan"):
        return "wan"
    if name.startswith("HunyuanVideo"):
        return "hunyuan"
    raise ValueError(f"pipe={name} is not a supported video pipeline; allowed: Wan*, HunyuanVideo*")


def load_video_pipeline(
    preset: str | None = None,
    model: str | None = None,
    device=None,
    dtype=None,
    self_forcing_checkpoint: str | None = None,
):
    """A ready video pipeline: a tiny preset (default ``"tiny-wan"``) or a real checkpoint (hub id / folder);
    with ``self_forcing_checkpoint`` the Wan folder becomes a ``CausalWanPipeline`` with those weights."""
    if preset is not None and model is not None:
        raise ValueError(f"give preset={preset!r} or model={model!r}, not both")
    device, dtype = resolve_device_dtype(device, dtype)
    if self_forcing_checkpoint is not None:
        if model is None:
            raise ValueError(
                "self_forcing_checkpoint needs model= (a diffusers Wan 2.1 T2V folder or hub id)"
            )
        from .video_loaders import load_causal_wan_checkpoint

        return load_causal_wan_checkpoint(model, self_forcing_checkpoint, device=device, dtype=dtype)
    if model is not None:
        from .video_loaders import load_video_checkpoint

        return load_video_checkpoint(model, device=device, dtype=dtype)
    from .presets import get_preset, load_preset

    preset = preset or "tiny-wan"
    if get_preset(preset).kind != "video":
        raise ValueError(f"preset={preset!r} is not a video preset")
    return load_preset(preset, device=device, dtype=dtype)


def takes_image(pipe) -> bool:
    """Whether the pipeline is image-to-video (its call takes an ``image``)."""
    import inspect

    return "image" in inspect.signature(type(pipe).__call__).parameters


def load_image(image):
    """A PIL RGB image from a path, a PIL image or an ``[H, W, 3]`` uint8 array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array must be [H, W, 3] (or 4), got shape {image.shape}")
        return Image.fromarray(to_uint8(image)).convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"image={image!r} could not be read as a picture: {err}") from err


def video_tokens(pipe, frames: int, height: int, width: int) -> int | None:
    """Tokens the transformer attends over for one video of this size (``None`` when the pipeline does
    not say its VAE scale factors or patch size)."""
    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None)
    patch_t = getattr(getattr(transformer, "config", None), "patch_size_t", None)
    if isinstance(patch, (tuple, list)):
        patch_t, ph, pw = patch
    elif isinstance(patch, int):
        ph = pw = patch
        patch_t = patch_t or 1
    else:
        return None
    scale_t = getattr(pipe, "vae_scale_factor_temporal", None)
    scale_s = getattr(pipe, "vae_scale_factor_spatial", None)
    if not scale_t or not scale_s:
        return None
    latent_frames = (frames - 1) // scale_t + 1
    return (-(-latent_frames // patch_t)) * (height // scale_s // ph) * (width // scale_s // pw)


def check_block_size_fits(pipe, block_size: int, *, frames=None, height=None, width=None, flag="block_size"):
    """A ``ValueError`` when a chosen ``block_size`` is larger than the tokens of one video of this size
    (``None`` sizes: the pipeline's defaults): one block would hold everything (density 1.0)."""
    defaults = _defaults(pipe)
    sizes = {
        "frames": defaults["frames"] if frames is None else frames,
        "height": defaults["height"] if height is None else height,
        "width": defaults["width"] if width is None else width,
    }
    tokens = video_tokens(pipe, **sizes)
    if tokens is not None and block_size > tokens:
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(
            f"{flag}={block_size} is larger than the {tokens} tokens of this video ({shown}): one block "
            f"would hold everything (density 1.0); allowed: a power of two <= {tokens}"
        )


def _defaults(pipe) -> dict:
    family = FAMILY_DEFAULTS[pipeline_family(pipe)]
    return {**family, **getattr(pipe, "fastgen_defaults", {})}


def generate_video(
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
    method: str = "rectified",
    config: RectifiedSpaAttnConfig | None = None,
    progress: bool = True,
    image=None,
    local_attn_frames: int | None = None,
    sink_frames: int = 0,
) -> dict:
    """Generate one video; sparse attention is applied for the call only and removed afterwards.

    ``image`` (a path, a PIL image or an ``[H, W, 3]`` uint8 array) is the first frame for an
    image-to-video pipeline (``WanImageToVideoPipeline``), which requires it; text-to-video pipelines
    refuse it. ``local_attn_frames`` / ``sink_frames`` (the causal Wan's local attention window) are
    handed to :func:`generate_causal_video` for a causal pipeline and refused for any other.
    ``0`` or negative sizes and steps are refused (``None`` means the pipeline's default).

    Returns a dict: ``frames`` uint8 ``[T, H, W, 3]``, ``seconds`` (pipeline call), ``fps``,
    ``stats`` (per-layer rows of the last sparse step with their block masks, each with ``model``:
    ``transformer`` / ``transformer_2``), ``steps`` (denoising steps run) and ``config`` (the method's settings as a dict).
    """
    from fastgen import attention_stats

    from .causal_video_runner import generate_causal_video, is_causal_pipeline

    check_generation_values(
        steps=steps, height=height, width=width, frames=frames, guidance_scale=guidance_scale
    )
    if is_causal_pipeline(pipe):  # autoregressive Wan: dense or Light Forcing, chunk by chunk
        if image is not None:
            raise ValueError(f"image={image!r} is not allowed: {type(pipe).__name__} is text-to-video")
        return generate_causal_video(
            pipe,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            height=height,
            width=width,
            frames=frames,
            guidance_scale=guidance_scale,
            method=method,
            config=config,
            local_attn_frames=local_attn_frames,
            sink_frames=sink_frames,
            progress=progress,
        )
    if local_attn_frames is not None or sink_frames:
        raise ValueError(
            f"local_attn_frames={local_attn_frames!r}, sink_frames={sink_frames!r} are for the causal Wan; "
            f"{type(pipe).__name__} attends over every frame"
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed: {', '.join(METHODS)}")
    if method == "rectified":
        config = config if config is not None else default_rectified_config(pipe)
        if not isinstance(config, RectifiedSpaAttnConfig):
            raise ValueError(f"config={type(config).__name__} does not match method='rectified'")
    defaults = _defaults(pipe)
    steps = defaults["steps"] if steps is None else steps
    kwargs = call_kwargs(
        defaults, prompt=prompt, negative_prompt=negative_prompt, seed=seed, height=height, width=width,
        frames=frames, guidance_scale=guidance_scale, num_inference_steps=steps,
    )  # fmt: skip
    if takes_image(pipe):
        if image is None:
            raise ValueError(f"image=None: {type(pipe).__name__} is image-to-video and needs a first frame")
        kwargs["image"] = load_image(image)
    elif image is not None:
        raise ValueError(f"image= was given but {type(pipe).__name__} is text-to-video (no image input)")
    pipe.set_progress_bar_config(disable=not progress)
    models = {
        n: getattr(pipe, n) for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None
    }

    def read_stats() -> list[dict]:
        return [{"model": name, **row} for name, model in models.items() for row in attention_stats(model)]

    output, seconds, stats = timed_call(
        pipe, kwargs, config=config if method == "rectified" else None, target=pipe,
        models=list(models.values()), read_stats=read_stats,
    )  # fmt: skip
    return {
        "frames": to_uint8(output.frames[0]),
        "seconds": seconds,
        "fps": int(defaults["fps"]),
        "stats": stats,
        "steps": int(steps),
        "config": config.to_dict() if method == "rectified" else {"method": "dense"},
    }


def default_rectified_config(pipe=None, **fields) -> RectifiedSpaAttnConfig:
    """``RectifiedSpaAttnConfig`` with the pipeline's own defaults (``pipe.fastgen_rectified``, set by presets
    such as ``tiny-wan-long``) under ``fields``; the class defaults for the rest."""
    return RectifiedSpaAttnConfig(**{**getattr(pipe, "fastgen_rectified", {}), **fields})


def config_from_args(args: argparse.Namespace, pipe=None) -> RectifiedSpaAttnConfig:
    """``RectifiedSpaAttnConfig`` from the CLI options that were given (the rest keep the defaults of
    :func:`default_rectified_config` for ``pipe``)."""
    options = {
        "sparsity": getattr(args, "sparsity", None),
        "block_size": getattr(args, "block_size", None),
        "dense_layers": getattr(args, "dense_layers", None),
        "warmup_steps": getattr(args, "warmup_steps", None),
        "form": getattr(args, "form", None),
    }
    return default_rectified_config(pipe, **{k: v for k, v in options.items() if v is not None})


__all__ = [
    "FAMILY_DEFAULTS",
    "METHODS",
    "config_from_args",
    "default_rectified_config",
    "execution_device",
    "check_block_size_fits",
    "check_generation_values",
    "generate_video",
    "load_image",
    "load_video_pipeline",
    "pipeline_family",
    "resolve_device_dtype",
    "takes_image",
    "video_tokens",
]
