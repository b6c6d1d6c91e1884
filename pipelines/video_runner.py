"""Video generation for the CLI, batch and the demo: load a pipeline and generate with or without
Rectified SpaAttn (``fastgen.cli_generate.generate_video_from_args`` writes the mp4 and compares with dense).

Example:
    >>> from fastgen.pipelines.video_runner import load_video_pipeline, generate_video
    >>> pipe = load_video_pipeline("tiny-wan")
    >>> result = generate_video(pipe, prompt="a red kite over the sea", method="rectified")
    >>> result["frames"].shape, result["seconds"], result["stats"][1]["density"]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from fastgen.kernels.cpu_attn import warm_up_cpu_kernel

from fastgen.configs import RectifiedSpaAttnConfig

logger = logging.getLogger(__name__)

METHODS = ("rectified", "dense")
"""Attention methods of ``generate_video``."""

FAMILY_DEFAULTS = {
    "wan": {"steps": 50, "height": 480, "width": 832, "frames": 81, "guidance_scale": 5.0, "fps": 16},
    "hunyuan": {"steps": 50, "height": 720, "width": 1280, "frames": 129, "guidance_scale": 6.0, "fps": 24},
}
"""Generation defaults of real checkpoints per model family (tiny presets carry their own)."""


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Default device (CUDA if available) and dtype (float32 on CPU, bfloat16 on GPU); strings accepted."""
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in allowed:
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(allowed)}")
        dtype = allowed[dtype]
    return device, dtype


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


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes: diffusers' ``_execution_device`` (the accelerator under
    ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``, where ``pipe.device`` says cpu)."""
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else torch.device(pipe.device)


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
        return Image.fromarray(_to_uint8(image)).convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"image={image!r} could not be read as a picture: {err}") from err


def _defaults(pipe) -> dict:
    family = FAMILY_DEFAULTS[pipeline_family(pipe)]
    return {**family, **getattr(pipe, "fastgen_defaults", {})}


def _to_uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return frames


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
) -> dict:
    """Generate one video; sparse attention is applied for the call only and removed afterwards.

    ``image`` (a path, a PIL image or an ``[H, W, 3]`` uint8 array) is the first frame for an
    image-to-video pipeline (``WanImageToVideoPipeline``), which requires it; text-to-video pipelines
    refuse it.

    Returns a dict: ``frames`` uint8 ``[T, H, W, 3]``, ``seconds`` (pipeline call), ``fps``,
    ``stats`` (per-layer rows of the last step, each with ``model``: ``transformer`` / ``transformer_2``)
    and ``config`` (the method's settings as a dict).
    """
    from fastgen.api import apply_sparse_attention, remove_sparse_attention
    from fastgen.processors.common import collect_stats

    from .causal_video_runner import generate_causal_video, is_causal_pipeline

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
            progress=progress,
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed: {', '.join(METHODS)}")
    if method == "rectified":
        config = config if config is not None else default_rectified_config(pipe)
        if not isinstance(config, RectifiedSpaAttnConfig):
            raise ValueError(f"config={type(config).__name__} does not match method='rectified'")
    defaults = _defaults(pipe)
    kwargs = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height or defaults["height"],
        "width": width or defaults["width"],
        "num_frames": frames or defaults["frames"],
        "num_inference_steps": steps or defaults["steps"],
        "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": "np",
    }
    if takes_image(pipe):
        if image is None:
            raise ValueError(f"image=None: {type(pipe).__name__} is image-to-video and needs a first frame")
        kwargs["image"] = load_image(image)
    elif image is not None:
        raise ValueError(f"image= was given but {type(pipe).__name__} is text-to-video (no image input)")
    pipe.set_progress_bar_config(disable=not progress)
    stats = []
    if method == "rectified":
        if execution_device(pipe).type == "cpu":  # a first CPU kernel build must not land in the timing
            warm_up_cpu_kernel()
        apply_sparse_attention(pipe, config)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            output = pipe(**kwargs)
        if execution_device(pipe).type == "cuda":
            torch.cuda.synchronize(execution_device(pipe))
        seconds = time.perf_counter() - start
        if method == "rectified":
            for name in ("transformer", "transformer_2"):
                model = getattr(pipe, name, None)
                if model is not None:
                    stats.extend({"model": name, **row} for row in collect_stats(model))
    finally:
        if method == "rectified":
            remove_sparse_attention(pipe)
    return {
        "frames": _to_uint8(output.frames[0]),
        "seconds": seconds,
        "fps": int(defaults["fps"]),
        "stats": stats,
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
    "generate_video",
    "load_image",
    "load_video_pipeline",
    "pipeline_family",
    "resolve_device_dtype",
    "takes_image",
]
