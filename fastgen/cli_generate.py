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


def is_causal_request(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for the autoregressive causal Wan (``--self-forcing-checkpoint`` or a causal preset)."""
    from fastgen.pipelines import get_preset

    if getattr(args, "self_forcing_checkpoint", None) is not None:
        return True
    return args.preset is not None and get_preset(args.preset).family == "causal-wan"


def run_generate(args: argparse.Namespace) -> int:
    """Run ``fastgen generate``; returns the process exit status."""
    if model_kind(args) == "video":
        return generate_video_from_args(args)
    return generate_text_from_args(args)


def generate_video_from_args(args: argparse.Namespace) -> int:
    """``fastgen generate`` for video: generate, write ``--out`` (mp4, atomic), report; returns the exit status.

    With ``--compare-dense`` the run goes through :func:`fastgen.compare.compare_with_dense` (warm-up
    excluded, the same helper as batch and the demo)."""
    from fastgen.compare import VIDEO_WARM_UP, compare_with_dense, video_fidelity
    from fastgen.io import write_video
    from fastgen.pipelines.video_runner import METHODS, config_from_args, generate_video, load_video_pipeline

    if not args.prompt:
        raise ValueError("--prompt is required for video")
    pipe = load_video_pipeline(
        preset=args.preset,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        self_forcing_checkpoint=getattr(args, "self_forcing_checkpoint", None),
    )
    from fastgen.pipelines.causal_video_runner import is_causal_pipeline

    if is_causal_pipeline(pipe):
        method, config = causal_method_from_args(args)
    else:
        method = args.method or "rectified"
        if method not in METHODS:
            raise ValueError(f"--method={method!r} is not allowed for video; allowed: {', '.join(METHODS)}")
        config = config_from_args(args, pipe) if method == "rectified" else None
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
    comparison = None
    if getattr(args, "compare_dense", False) and method != "dense":
        comparison = compare_with_dense(
            generate_video, pipe, method=method, config=config, fidelity=video_fidelity, warm_up=VIDEO_WARM_UP,
            **common,
        )  # fmt: skip
        result = comparison.accelerated
    else:
        result = generate_video(pipe, method=method, config=config, **common)
    out = args.out or "output.mp4"
    write_video(out, result["frames"], fps=result["fps"])
    t, h, w, _ = result["frames"].shape
    print(f"wrote {out}: {t} frames {h}x{w} in {result['seconds']:.2f}s ({method})")
    if result["stats"] and method == "light_forcing":
        from fastgen.pipelines.causal_video_runner import chunk_densities

        per_chunk = ", ".join(f"{c}: {d:.3f}" for c, d in chunk_densities(result["stats"]).items())
        print(f"Light Forcing density per chunk (mean over layers): {per_chunk}")
    elif result["stats"]:
        density = np.mean([row["density"] for row in result["stats"]])
        print(f"sparse layers: {len(result['stats'])}, mean density {density:.3f}")
    if comparison is not None:
        fid = comparison.fidelity
        psnr_text = "PSNR inf dB (identical frames)" if fid["identical"] else f"PSNR {fid['psnr']:.2f} dB"
        print(
            f"dense: {comparison.dense['seconds']:.2f}s; speedup {_fmt_speedup(comparison.speedup)} "
            f"(warm-up excluded); {psnr_text}; SSIM {fid['ssim']:.4f}"
        )
    return 0


def _fmt_speedup(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def causal_method_from_args(args: argparse.Namespace):
    """``(method, LightForcingConfig or None)`` for a causal Wan from ``--method`` (default
    ``light_forcing``), ``--sparsity`` and ``--block-size``."""
    from fastgen.configs import LightForcingConfig
    from fastgen.pipelines.causal_video_runner import METHODS as CAUSAL_METHODS

    method = args.method or "light_forcing"
    if method not in CAUSAL_METHODS:
        raise ValueError(
            f"--method={method!r} is not allowed for a causal Wan; allowed: {', '.join(CAUSAL_METHODS)}"
        )
    if method == "dense":
        return method, None
    options = {"sparsity": getattr(args, "sparsity", None), "block_size": getattr(args, "block_size", None)}
    options = {k: v for k, v in options.items() if v is not None}
    if "sparsity" in options and options["sparsity"] > LightForcingConfig.sparsity_base:
        options["sparsity_base"] = min(0.99, options["sparsity"] + 0.1)  # keep s_base >= s_target
        logger.warning(
            "--sparsity=%s is above Light Forcing's default sparsity_base; using sparsity_base=%s",
            options["sparsity"],
            options["sparsity_base"],
        )
    return method, LightForcingConfig(**options)


def generate_text_from_args(args: argparse.Namespace) -> int:
    """``fastgen generate`` for text: print the text and tokens/s (and speedup + token agreement vs dense
    with ``--compare-dense``, through :func:`fastgen.compare.compare_with_dense`, warm-up excluded); for a
    model trained on a checkable task (``tiny-llada-kv``) also whether each answer is right. ``--out`` is
    written atomically. Returns the exit status."""
    from fastgen.compare import compare_with_dense, text_fidelity, text_warm_up
    from fastgen.io import write_text
    from fastgen.pipelines.text_runner import (
        METHODS,
        default_sparsed_config,
        generate_text,
        load_text_pipeline,
        text_defaults,
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
    prompt = args.prompt
    task = getattr(pipe, "fastgen_task", None)
    if task is not None and (prompt is None or task.answer_of(prompt) is None):
        example = task.example(int(args.seed))
        if prompt is not None:
            logger.warning(
                "the prompt is not in the task's format; using held-out example seed %d", args.seed
            )
        prompt = example.prompt
        print(f"prompt (task example seed {args.seed}): ...{prompt[-60:]}")
    if not prompt:
        raise ValueError(
            "--prompt is required (only task-trained presets such as tiny-llada-kv pick an example)"
        )
    answer = task.answer_of(prompt) if task is not None else None
    settings = text_defaults(
        pipe,
        steps=args.steps,
        gen_length=args.gen_length,
        block_length=args.block_length,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
    )
    common = dict(prompt=prompt, seed=args.seed, progress=not getattr(args, "quiet", False), **settings)
    config = None
    if method in ("window_diffusion", "sparsed+window_diffusion"):
        if args.block_length is None:  # Window-Diffusion and its dense baseline: one block
            common["block_length"] = settings["gen_length"]
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
        prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"]) if pipe.tokenizer is not None else 0
        config = default_sparsed_config(
            prompt_tokens + settings["gen_length"],
            skip=args.skip,
            select=args.select,
            block_size=args.block_size,
        )
    comparison = None
    if args.compare_dense and method != "dense":
        comparison = compare_with_dense(
            generate_text, pipe, method=method, config=config,
            fidelity=lambda acc, dense: text_fidelity(acc, dense, answer),
            warm_up=text_warm_up(settings["gen_length"]), **common,
        )  # fmt: skip
        result = comparison.accelerated
    else:
        result = generate_text(pipe, method=method, config=config, **common)
    print(result["text"])
    print(f"[{result['method']}] {result['tokens_per_s']:.1f} tokens/s ({result['seconds']:.3f} s)")
    if "refresh_steps" in result["stats"]:
        st = result["stats"]
        print(
            f"[{result['method']}] refresh steps {st['refresh_steps']}, pruned steps {st['pruned_steps']}, "
            f"mean rows run {st['mean_queries']:.1f}, mean keys {st['mean_keys']:.1f}"
        )
    if answer is not None:
        print(f"[{result['method']}] answer {'correct' if result['text'].split() == answer.split() else 'WRONG'}"
              f" (expected: {answer})")  # fmt: skip
    if "density" in result["stats"]:
        print(f"[{result['method']}] attention density: {result['stats']['density']:.3f}")
    if comparison is not None:
        dense, fid = comparison.dense, comparison.fidelity
        print(f"[dense] {dense['text']}")
        print(f"[dense] {dense['tokens_per_s']:.1f} tokens/s ({dense['seconds']:.3f} s)")
        line = f"speedup vs dense: {_fmt_speedup(comparison.speedup)} (warm-up excluded)"
        line += f"  token agreement: {fid['token_agreement']:.3f}"
        if "dense_correct" in fid:
            line += (
                f"  correct: {result['method']} {fid['accelerated_correct']}, dense {fid['dense_correct']}"
            )
        print(line)
    if args.out:
        write_text(args.out, result["text"])
        logger.info("wrote %s", args.out)
    return 0
