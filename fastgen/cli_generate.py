"""``fastgen generate``: resolve what kind of model is asked for, generate with its runner, write the
output and report on stdout (this is the CLI layer; the runners in ``fastgen.pipelines`` only compute)."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)


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
        return generate_video_from_args(args)
    return generate_text_from_args(args)


def generate_video_from_args(args: argparse.Namespace) -> int:
    """``fastgen generate`` for video: generate, write ``--out`` (mp4, atomic), report; returns the exit status."""
    from fastgen.io import write_video
    from fastgen.metrics import psnr, ssim
    from fastgen.pipelines.video_runner import METHODS, config_from_args, generate_video, load_video_pipeline

    method = args.method or "rectified"
    if method not in METHODS:
        raise ValueError(f"--method={method!r} is not allowed for video; allowed: {', '.join(METHODS)}")
    config = config_from_args(args) if method == "rectified" else None
    pipe = load_video_pipeline(preset=args.preset, model=args.model, device=args.device, dtype=args.dtype)
    common = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "guidance_scale": args.guidance_scale,
        "image": getattr(args, "image", None),
    }
    if getattr(args, "compare_dense", False) and method != "dense":
        # one untimed 1-step call first, so neither timed run pays the one-time costs
        generate_video(pipe, method=method, config=config, **{**common, "steps": 1}, progress=False)
    result = generate_video(pipe, method=method, config=config, **common)
    out = args.out or "output.mp4"
    write_video(out, result["frames"], fps=result["fps"])
    t, h, w, _ = result["frames"].shape
    print(f"wrote {out}: {t} frames {h}x{w} in {result['seconds']:.2f}s ({method})")
    if result["stats"]:
        density = np.mean([row["density"] for row in result["stats"]])
        print(f"sparse layers: {len(result['stats'])}, mean density {density:.3f}")
    if getattr(args, "compare_dense", False) and method != "dense":
        dense = generate_video(pipe, method="dense", **common)
        print(
            f"dense: {dense['seconds']:.2f}s; speedup {dense['seconds'] / result['seconds']:.2f}x; "
            f"PSNR {psnr(result['frames'], dense['frames']):.2f} dB; "
            f"SSIM {ssim(result['frames'], dense['frames']):.4f}"
        )
    return 0


def generate_text_from_args(args: argparse.Namespace) -> int:
    """``fastgen generate`` for text: print the text and tokens/s (and speedup + token agreement vs dense
    with ``--compare-dense``); ``--out`` is written atomically. Returns the exit status."""
    from fastgen.io import write_text
    from fastgen.metrics import token_agreement
    from fastgen.pipelines.text_runner import (
        METHODS,
        default_sparsed_config,
        generate_text,
        load_text_pipeline,
    )

    method = args.method or "sparsed"
    if getattr(args, "image", None) is not None:
        raise ValueError(f"--image={args.image!r} is for image-to-video pipelines, not text generation")
    if method not in METHODS:
        raise ValueError(f"--method={method!r} is not allowed for text; allowed: {', '.join(METHODS)}")
    pipe = load_text_pipeline(
        preset=args.preset,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
    )
    common = dict(
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        gen_length=args.gen_length,
        block_length=args.block_length,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        progress=not getattr(args, "quiet", False),
    )
    config = None
    if method in ("window_diffusion", "sparsed+window_diffusion"):
        if common["block_length"] is None:  # Window-Diffusion and its dense baseline: one block
            common["block_length"] = args.gen_length or 128
        from fastgen.configs import SparseDConfig, WindowDiffusionConfig

        config = [
            WindowDiffusionConfig(
                window=getattr(args, "window", None),
                active=getattr(args, "active", None),
                refresh_cycle=getattr(args, "refresh_cycle", None),
            )
        ]
        sparsed_fields = {"skip": args.skip, "select": args.select, "block_size": args.block_size}
        if method == "sparsed+window_diffusion" and any(v is not None for v in sparsed_fields.values()):
            config.append(SparseDConfig(**{k: v for k, v in sparsed_fields.items() if v is not None}))
    if method == "sparsed":
        prompt_tokens = len(pipe.tokenizer(args.prompt)["input_ids"]) if pipe.tokenizer is not None else 0
        config = default_sparsed_config(
            prompt_tokens + (args.gen_length or 128),
            skip=args.skip,
            select=args.select,
            block_size=args.block_size,
        )
    if args.compare_dense:
        # one short untimed call first, so neither timed run pays the one-time costs
        warm = min(32, args.gen_length or 128)
        pipe(prompt=args.prompt, gen_length=warm, steps=1, block_length=warm, progress=False)
    result = generate_text(pipe, method=method, config=config, **common)
    print(result["text"])
    print(f"[{result['method']}] {result['tokens_per_s']:.1f} tokens/s ({result['seconds']:.3f} s)")
    if "refresh_steps" in result["stats"]:
        st = result["stats"]
        print(
            f"[{result['method']}] refresh steps {st['refresh_steps']}, pruned steps {st['pruned_steps']}, "
            f"mean rows run {st['mean_queries']:.1f}, mean keys {st['mean_keys']:.1f}"
        )
    if "density" in result["stats"]:
        print(f"[{result['method']}] attention density: {result['stats']['density']:.3f}")
    if args.compare_dense:
        dense = generate_text(pipe, method="dense", **common)
        speedup = dense["seconds"] / result["seconds"] if result["seconds"] > 0 else float("inf")
        agreement = token_agreement(result["tokens"], dense["tokens"])
        print(f"[dense] {dense['tokens_per_s']:.1f} tokens/s ({dense['seconds']:.3f} s)")
        print(f"speedup vs dense: {speedup:.2f}x  token agreement: {agreement:.3f}")
    if args.out:
        write_text(args.out, result["text"])
        logger.info("wrote %s", args.out)
    return 0
