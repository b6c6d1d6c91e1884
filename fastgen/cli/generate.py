"""``fastgen generate``: check everything the user typed (:mod:`fastgen.cli.options`,
:mod:`fastgen.cli.checks`) before any model is loaded, then generate with the family's runner, write the
output (atomically) and report on stdout. The runners in ``fastgen.pipelines`` only compute."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

from fastgen.cli.checks import (
    RuntimeFailure,
    UsageError,
    check_checkpoint_folder,
    check_device,
    check_output_file,
    check_torch_file,
    friendly_load_error,
)
from fastgen.cli.options import OPTIONS, Run, check_options, resolve_method

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = "random weights: output is noise by design"
"""What a run of a preset with random weights says where its output is reported."""


def random_weights(source: str | None) -> bool:
    """Whether ``source`` is a preset whose weights are random (its output is noise by design)."""
    from fastgen.pipelines.presets import PRESETS

    preset = PRESETS.get(source or "")
    return preset is not None and "random weights" in preset.description


def _model_index(model: str) -> dict | None:
    """The diffusers ``model_index.json`` of a folder or hub id, ``None`` for a transformers model."""
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.exists(index):
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = hf_hub_download(model, "model_index.json")
        except Exception:  # noqa: BLE001 - no diffusers index on the Hub: a transformers model
            return None
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise RuntimeFailure(f"--model={model!r}: {index} could not be read ({err})") from None


def resolve_family(args: argparse.Namespace) -> tuple[str, str]:
    """``(family, source)`` of the preset or checkpoint ``args`` name (``tiny-wan`` when neither):
    ``video``, ``causal`` (a causal preset or ``--self-forcing-checkpoint``) or ``text``."""
    from fastgen.pipelines import get_preset

    if getattr(args, "self_forcing_checkpoint", None) is not None:
        if args.model is None:
            raise UsageError(
                [
                    f"--self-forcing-checkpoint={args.self_forcing_checkpoint!r} needs --model, the diffusers "
                    "Wan 2.1 T2V folder or hub id its weights are loaded into"
                ]
            )
        return "causal", args.model
    if args.preset is None and args.model is None:
        args.preset = "tiny-wan"
    if args.preset is not None:
        preset = get_preset(args.preset)
        if preset.kind == "text":
            return "text", args.preset
        return ("causal" if preset.family == "causal-wan" else "video"), args.preset
    return ("video" if _model_index(args.model) is not None else "text"), args.model


def model_kind(args: argparse.Namespace) -> str:
    """``"video"`` or ``"text"`` for the preset or checkpoint named by ``args``."""
    return "text" if resolve_family(args)[0] == "text" else "video"


def is_causal_request(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for the autoregressive causal Wan (``--self-forcing-checkpoint`` or a causal preset)."""
    from fastgen.pipelines import get_preset

    if getattr(args, "self_forcing_checkpoint", None) is not None:
        return True
    return args.preset is not None and get_preset(args.preset).family == "causal-wan"


def takes_image_source(args: argparse.Namespace, family: str) -> bool:
    """Whether the preset or checkpoint of ``args`` is image-to-video (read without loading it)."""
    if family != "video" or args.model is None:
        return False  # no image-to-video preset ships
    index = _model_index(args.model) or {}
    return "ImageToVideo" in str(index.get("_class_name", ""))


def option_values(args: argparse.Namespace) -> dict[str, object]:
    """The options of ``args`` the validation layer knows (``None`` = not given)."""
    return {name: getattr(args, name, None) for name in OPTIONS}


def check_run(args: argparse.Namespace, *, need_prompt: bool = True) -> Run:
    """Every check of a generation's arguments that needs no model: family and method, each option's
    range and relevance, ``--compare-dense`` / ``--rounds``, the device, the prompt, the image and the
    checkpoint files. Raises :class:`UsageError` (all problems, one line each) or :class:`RuntimeFailure`."""
    family, source = resolve_family(args)
    method = resolve_method(family, args.method)
    run = Run(family, method, source)
    values = option_values(args)
    problems = check_options(values, run)
    if getattr(args, "compare_dense", False) and method == "dense":
        problems.append(
            "--compare-dense with --method dense compares dense with itself; allowed: an accelerated "
            f"--method ({', '.join(m for m in (run_methods(family)) if m != 'dense')})"
        )
    if getattr(args, "rounds", None) is not None and not getattr(args, "compare_dense", False):
        problems.append(
            f"--rounds={args.rounds} is for --compare-dense timings; add --compare-dense or drop it"
        )
    image = getattr(args, "image", None)
    if image is not None and family == "video" and not takes_image_source(args, family):
        problems.append(
            f"--image={image!r} is for image-to-video pipelines (Wan I2V); {source} is text-to-video"
        )
    if need_prompt:
        problems.extend(_prompt_problems(args, family))
    if problems:
        raise UsageError(problems)
    check_device(getattr(args, "device", None))
    if args.model is not None and os.path.isdir(args.model):
        check_checkpoint_folder(args.model)
    if getattr(args, "self_forcing_checkpoint", None) is not None:
        check_torch_file(args.self_forcing_checkpoint, "--self-forcing-checkpoint")
    return run


def run_methods(family: str) -> tuple[str, ...]:
    """Methods of ``family`` (for messages)."""
    from fastgen.cli.options import FAMILY_METHODS

    return FAMILY_METHODS[family]


def _prompt_problems(args: argparse.Namespace, family: str) -> list[str]:
    prompt = getattr(args, "prompt", None)
    task = task_of_preset(args.preset) if family == "text" else None
    if task is not None:
        if prompt is not None and task.answer_of(prompt) is None:
            return [
                f"--prompt={_short(prompt)} is not a prompt of {args.preset}'s key-value retrieval task "
                "(fields 'a01 b02 ... ? ->'), the only thing it was trained on; omit --prompt to use the "
                "held-out task example of --seed"
            ]
        return []
    if prompt is None or not prompt.strip():
        return [
            f"--prompt is required for {'text' if family == 'text' else 'video'}; allowed: a non-empty text"
        ]
    return []


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


TASK_PRESETS = {
    "tiny-llada-kv": "fastgen.pipelines.tiny_llada_kv",
    "tiny-llada-long": "fastgen.pipelines.tiny_llada_long",
}
"""Text presets trained on a checkable task: the module with their ``checkpoint_folder`` and ``task_of``."""


def task_of_preset(preset: str | None):
    """The checkable task a text preset was trained on (``TASK_PRESETS``), read without loading it."""
    if preset not in TASK_PRESETS:
        return None
    import importlib

    module = importlib.import_module(TASK_PRESETS[preset])
    try:
        return module.task_of(module.checkpoint_folder())
    except OSError:
        return None  # the loader says the checkpoint is missing


def load_pipeline(load, *args, **kwargs):
    """``load(*args, **kwargs)`` with a loader's failure on a user's file turned into one line."""
    try:
        return load(*args, **kwargs)
    except (ValueError, ImportError, KeyboardInterrupt):
        raise
    except Exception as err:
        message = friendly_load_error(err)
        if message is None:
            raise
        raise RuntimeFailure(message) from None


def pipeline_from_args(args: argparse.Namespace, kind: str, device=None):
    """The ``kind`` (``"text"`` or video) pipeline that ``args`` name (``--preset`` / ``--model``, ``--dtype``,
    and the kind's own options) on ``device``, through :func:`load_pipeline`."""
    if kind == "text":
        from fastgen.pipelines.text_runner import load_text_pipeline as load

        own = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    else:
        from fastgen.pipelines.video_runner import load_video_pipeline as load

        own = {"self_forcing_checkpoint": getattr(args, "self_forcing_checkpoint", None)}
    return load_pipeline(load, preset=args.preset, model=args.model, device=device, dtype=args.dtype, **own)


def run_generate(args: argparse.Namespace) -> int:
    """Run ``fastgen generate``; returns the process exit status."""
    from fastgen.cli.context_parallel import check_context_parallel, context_parallel_session, rank_device

    run = check_run(args)
    plan = check_context_parallel(args, run.family, command="generate")
    out = args.out
    if out is None and run.family != "text":
        out = "output.mp4"
    if out is not None and (plan is None or plan.writer):  # under CP only the writing rank touches files
        check_output_file(out, run.family, overwrite=getattr(args, "overwrite", False))
    args.out = out
    if run.family == "text":
        return generate_text_from_args(args, run)
    if plan is None:
        return generate_video_from_args(args, run)
    args.device = rank_device(plan)
    with context_parallel_session(plan):
        return generate_video_from_args(args, run, plan)


def _print_comparison(comparison) -> None:
    print(comparison.speed_summary())
    warning = comparison.load_warning()
    if warning:
        print(warning)


def _video_options(args: argparse.Namespace, run: Run) -> dict:
    """The generation options of a video run from ``args`` (the first frame and the causal window when given)."""
    common = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "guidance_scale": args.guidance_scale,
    }
    if getattr(args, "image", None) is not None:
        common["image"] = args.image
    if run.family == "causal":
        common["local_attn_frames"] = getattr(args, "local_attn_frames", None)
        common["sink_frames"] = getattr(args, "sink_frames", None) or 0
    return common


def generate_video_from_args(args: argparse.Namespace, run: Run | None = None, plan=None) -> int:
    """``fastgen generate`` for video: generate, write ``--out`` (mp4, atomic), report; returns the exit status.

    With ``--compare-dense`` the run goes through :func:`fastgen.compare.compare_with_dense` (warm-up
    excluded, interleaved rounds, the same helper as batch and the demo). With ``plan`` (a
    :class:`fastgen.cli.context_parallel.ContextParallelPlan`, process group initialised) the
    transformer runs under context parallelism (dense and sparse alike) and only the writing rank
    writes and prints."""
    from fastgen.compare import (
        DEFAULT_ROUNDS,
        VIDEO_WARM_UP,
        compare_with_dense,
        video_fidelity,
    )
    from fastgen.io import write_video
    from fastgen.pipelines.video_runner import config_from_args, generate_video

    run = run or check_run(args)
    pipe = pipeline_from_args(args, "video", args.device)
    if plan is not None:
        from fastgen.cli.context_parallel import enable

        enable(pipe, plan)
    method = run.method
    if run.family == "video" and args.block_size is not None:
        from fastgen.pipelines.video_runner import check_block_size_fits

        check_block_size_fits(
            pipe,
            args.block_size,
            frames=args.frames,
            height=args.height,
            width=args.width,
            flag="--block-size",
        )
    if run.family == "causal":
        config = causal_config_from_args(args) if method != "dense" else None
    else:
        config = config_from_args(args, pipe) if method == "rectified" else None
    common = _video_options(args, run)
    comparison = None
    if getattr(args, "compare_dense", False) and method != "dense":
        comparison = compare_with_dense(
            generate_video, pipe, method=method, config=config, fidelity=video_fidelity, warm_up=VIDEO_WARM_UP,
            rounds=args.rounds or DEFAULT_ROUNDS, progress=plan is None or plan.writer, **common,
        )  # fmt: skip
        result = comparison.accelerated
    else:
        result = generate_video(
            pipe, method=method, config=config, progress=plan is None or plan.writer, **common
        )
    if plan is not None and not plan.writer:
        return 0
    write_video(args.out, result["frames"], fps=result["fps"])
    _print_video_result(args.out, result, comparison, run)
    if plan is not None:
        print(
            f"context parallel: {plan.describe()}; times and densities are rank {plan.rank}'s "
            "(its share of the heads / tokens)"
        )
    return 0


def _print_video_result(out: str, result: dict, comparison, run: Run) -> None:
    """Print a video run (and its comparison with dense) as ``fastgen generate`` reports it."""
    from fastgen.compare import sparse_never_ran

    method = run.method
    t, h, w, _ = result["frames"].shape
    print(f"wrote {out}: {t} frames {h}x{w} in {result['seconds']:.2f}s ({method})")
    if random_weights(run.source):
        print(f"note: {run.source} has {RANDOM_WEIGHTS_NOTE}")
    if result["stats"] and method == "light_forcing":
        from fastgen.pipelines.causal_video_runner import chunk_densities

        per_chunk = ", ".join(f"{c}: {d:.3f}" for c, d in chunk_densities(result["stats"]).items())
        print(f"Light Forcing density per chunk (mean over layers): {per_chunk}")
    elif result["stats"]:
        density = np.mean([row["density"] for row in result["stats"]])
        print(f"sparse layers: {len(result['stats'])}, mean density {density:.3f}")
    elif method != "dense" and comparison is None:
        print(f"sparse attention never ran ({sparse_never_ran(method, result)}); the output is dense")
    if comparison is not None:
        fid = comparison.fidelity
        psnr_text = "PSNR inf dB (identical frames)" if fid["identical"] else f"PSNR {fid['psnr']:.2f} dB"
        print(f"dense: {comparison.dense['seconds']:.2f}s; {psnr_text}; SSIM {fid['ssim']:.4f}")
        _print_comparison(comparison)


def causal_config_from_args(args: argparse.Namespace):
    """The ``LightForcingConfig`` of ``--sparsity`` and ``--block-size`` (the rest at their defaults)."""
    from fastgen.configs import LightForcingConfig

    options = {"sparsity": getattr(args, "sparsity", None), "block_size": getattr(args, "block_size", None)}
    options = {k: v for k, v in options.items() if v is not None}
    if "sparsity" in options and options["sparsity"] > LightForcingConfig.sparsity_base:
        options["sparsity_base"] = min(0.99, options["sparsity"] + 0.1)  # keep s_base >= s_target
        logger.warning(
            "--sparsity=%s is above Light Forcing's default sparsity_base; using sparsity_base=%s",
            options["sparsity"],
            options["sparsity_base"],
        )
    return LightForcingConfig(**options)


def causal_method_from_args(args: argparse.Namespace):
    """``(method, LightForcingConfig or None)`` for a causal Wan from ``--method`` (default
    ``light_forcing``), ``--sparsity`` and ``--block-size``."""
    method = resolve_method("causal", args.method)
    return method, (None if method == "dense" else causal_config_from_args(args))


def _text_config(args: argparse.Namespace, run: Run, pipe, prompt: str, settings: dict, common: dict):
    """The method config of a text run from ``args`` (``common`` gets Window-Diffusion's one block),
    after checking the settings the model's defaults complete and a ``--block-size`` against the tokens."""
    from fastgen.pipelines.text_runner import default_sparsed_config

    method = run.method
    config = None
    if method in ("window_diffusion", "sparsed+window_diffusion"):
        if args.block_length is None:  # Window-Diffusion and its dense baseline: one block
            common["block_length"] = settings["gen_length"]
        from fastgen.configs import SparseDConfig, WindowDiffusionConfig

        config = [
            WindowDiffusionConfig(window=args.window, active=args.active, refresh_cycle=args.refresh_cycle)
        ]
        sparsed_fields = {"skip": args.skip, "select": args.select, "block_size": args.block_size}
        if method == "sparsed+window_diffusion" and any(v is not None for v in sparsed_fields.values()):
            config.append(SparseDConfig(**{k: v for k, v in sparsed_fields.items() if v is not None}))
    resolved = {k: common.get(k) for k in ("steps", "gen_length", "block_length")}
    problems = check_options(resolved, run, flag=False)
    if problems:  # the preset's defaults combined with what was given
        raise UsageError([p + " (with the model's defaults for what was not given)" for p in problems])
    if method == "sparsed":
        prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"]) if pipe.tokenizer is not None else 0
        total = prompt_tokens + settings["gen_length"]
        if args.block_size is not None and args.block_size > total:
            raise UsageError(
                [
                    f"--block-size={args.block_size} is larger than the {total} tokens of prompt and answer: one "
                    f"block would hold everything (density 1.0); allowed: a power of two <= {total}"
                ]
            )
        config = default_sparsed_config(total, skip=args.skip, select=args.select, block_size=args.block_size)
    return config


def _print_text_result(result: dict, comparison, answer: str | None, run: Run) -> None:
    """Print a text run (and its comparison with dense) as ``fastgen generate`` reports it."""
    from fastgen.compare import sparse_never_ran

    method = run.method
    print(result["text"])
    print(f"[{result['method']}] {result['tokens_per_s']:.1f} tokens/s ({result['seconds']:.3f} s)")
    if random_weights(run.source):
        print(f"note: {run.source} has {RANDOM_WEIGHTS_NOTE}")
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
    if method != "dense" and comparison is None:
        why = sparse_never_ran(method, result)
        if why is not None:
            print(f"[{result['method']}] sparse attention never ran ({why})")
    if comparison is not None:
        dense, fid = comparison.dense, comparison.fidelity
        print(f"[dense] {dense['text']}")
        print(f"[dense] {dense['tokens_per_s']:.1f} tokens/s ({dense['seconds']:.3f} s)")
        line = f"token agreement with dense: {fid['token_agreement']:.3f}"
        if "dense_correct" in fid:
            line += (
                f"; correct: {result['method']} {fid['accelerated_correct']}, dense {fid['dense_correct']}"
            )
        print(line)
        _print_comparison(comparison)


def generate_text_from_args(args: argparse.Namespace, run: Run | None = None) -> int:
    """``fastgen generate`` for text: print the text and tokens/s (and the speed-up and token agreement
    vs dense with ``--compare-dense``, through :func:`fastgen.compare.compare_with_dense`); for a model
    trained on a checkable task (``tiny-llada-kv``) also whether each answer is right. ``--out`` is
    written atomically. Returns the exit status."""
    from fastgen.compare import (
        DEFAULT_ROUNDS,
        compare_with_dense,
        text_fidelity,
        text_warm_up,
    )
    from fastgen.io import write_text
    from fastgen.pipelines.text_runner import generate_text, text_defaults

    run = run or check_run(args)
    method = run.method
    pipe = pipeline_from_args(args, "text", args.device)
    prompt = args.prompt
    task = getattr(pipe, "fastgen_task", None)
    if task is not None and prompt is None:
        prompt = task.example(int(args.seed)).prompt
        print(f"prompt (task example seed {args.seed}): ...{prompt[-60:]}")
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
    config = _text_config(args, run, pipe, prompt, settings, common)
    comparison = None
    if args.compare_dense and method != "dense":
        comparison = compare_with_dense(
            generate_text, pipe, method=method, config=config,
            fidelity=lambda acc, dense: text_fidelity(acc, dense, answer),
            warm_up=text_warm_up(settings["gen_length"]), rounds=args.rounds or DEFAULT_ROUNDS, **common,
        )  # fmt: skip
        result = comparison.accelerated
    else:
        result = generate_text(pipe, method=method, config=config, **common)
    _print_text_result(result, comparison, answer, run)
    if args.out:
        write_text(args.out, result["text"])
        logger.info("wrote %s", args.out)
    return 0


__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "UsageError",
    "causal_method_from_args",
    "check_run",
    "generate_text_from_args",
    "generate_video_from_args",
    "is_causal_request",
    "load_pipeline",
    "model_kind",
    "pipeline_from_args",
    "random_weights",
    "resolve_family",
    "run_generate",
]
