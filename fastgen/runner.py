"""``fastgen generate``: resolve what kind of model is asked for and hand over to its runner."""

from __future__ import annotations

import argparse
import json
import os


def model_kind(args: argparse.Namespace) -> str:
    """``"video"`` or ``"text"`` for the preset or checkpoint named by ``args``."""
    from fastgen.pipelines import get_preset

    if args.preset is None and args.model is None:
        args.preset = "tiny-wan"
    if args.preset is not None:
        return get_preset(args.preset).kind
    index = os.path.join(args.model, "model_index.json")
    if os.path.isdir(args.model):
        return "video" if os.path.exists(index) else "text"
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(args.model, "model_index.json")) as f:
            json.load(f)
        return "video"
    except Exception:  # noqa: BLE001 - any failure to find a diffusers index means a transformers model
        return "text"


def run_generate(args: argparse.Namespace) -> int:
    """Run ``fastgen generate``; returns the process exit status."""
    if model_kind(args) == "video":
        from fastgen.pipelines.video_runner import generate_from_args
    else:
        from fastgen.pipelines.text_runner import generate_from_args
    return generate_from_args(args)
