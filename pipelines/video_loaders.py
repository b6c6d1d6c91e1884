"""Loading real Wan / HunyuanVideo checkpoints (hub id or local folder) with diffusers' ``from_pretrained``.

The pipeline class is read from the checkpoint's ``model_index.json``; only Wan and HunyuanVideo
pipelines are accepted. ``dtype`` goes to ``torch_dtype`` (diffusers keeps its fp32 modules in
fp32), then the pipeline is moved to ``device``.

Example:
    >>> from fastgen.pipelines.video_loaders import load_video_checkpoint
    >>> pipe = load_video_checkpoint("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", device="cuda", dtype="bfloat16")
"""

from __future__ import annotations

import json
import os

SUPPORTED_PREFIXES = ("Wan", "HunyuanVideo")
"""Pipeline class-name prefixes this loader accepts."""


def pipeline_class_name(source: str) -> str:
    """``_class_name`` of the checkpoint's ``model_index.json`` (local folder or hub id)."""
    if os.path.isdir(source):
        index = os.path.join(source, "model_index.json")
        if not os.path.exists(index):
            raise ValueError(
                f"model={source!r} is a folder without model_index.json (not a diffusers pipeline)"
            )
    else:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(source, "model_index.json")
    with open(index, encoding="utf-8") as f:
        return str(json.load(f).get("_class_name", ""))


def load_video_checkpoint(source: str, device=None, dtype=None):
    """A Wan or HunyuanVideo diffusers pipeline from ``source`` (hub id or folder), on ``device`` in ``dtype``."""
    import diffusers

    from .video_common import resolve_device_dtype

    device, dtype = resolve_device_dtype(device, dtype)
    name = pipeline_class_name(source)
    if not name.startswith(SUPPORTED_PREFIXES) or not hasattr(diffusers, name):
        raise ValueError(
            f"model={source!r} holds pipeline {name!r}; allowed: Wan* and HunyuanVideo* diffusers pipelines"
        )
    pipe = getattr(diffusers, name).from_pretrained(source, dtype=dtype)
    pipe.to(device)
    return pipe


def load_causal_wan_checkpoint(source: str, self_forcing_checkpoint: str, device=None, dtype=None):
    """A ``CausalWanPipeline`` from the diffusers Wan 2.1 T2V pipeline ``source`` (hub id or folder) with the
    transformer weights of the Self-Forcing ``.pt`` (EMA), on ``device`` in ``dtype``."""
    from .causal_wan import CausalWanPipeline
    from .self_forcing import load_self_forcing_checkpoint
    from .video_common import resolve_device_dtype

    device, dtype = resolve_device_dtype(device, dtype)
    name = pipeline_class_name(source)
    if name != "WanPipeline":
        raise ValueError(
            f"model={source!r} holds pipeline {name!r}; a Self-Forcing checkpoint needs a Wan 2.1 T2V "
            "folder (WanPipeline)"
        )
    pipe = CausalWanPipeline.from_pretrained(source, dtype=dtype)
    load_self_forcing_checkpoint(pipe.transformer, self_forcing_checkpoint)
    pipe.to(device)
    return pipe


__all__ = ["SUPPORTED_PREFIXES", "load_causal_wan_checkpoint", "load_video_checkpoint", "pipeline_class_name"]
