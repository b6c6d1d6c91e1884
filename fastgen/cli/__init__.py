"""The ``fastgen`` command line: generate, batch, bench, demo.

This package parses arguments and dispatches (:func:`main`); :mod:`fastgen.cli.options` is the one
validation layer of what a user can type (shared with batch and the demo), :mod:`fastgen.cli.checks`
checks devices, output files, checkpoint files and ports up front, :mod:`fastgen.cli.generate` runs
``fastgen generate``. Errors reach the user as one line (exit status 2 for what was typed, 1 for a
failure of the run, 3 for a missing optional dependency, 130 for Ctrl-C); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

EXIT_USAGE = 2
"""Exit status of a problem with what the user typed."""
EXIT_RUNTIME = 1
"""Exit status of a failure of the run."""
EXIT_MISSING_DEPENDENCY = 3
"""Exit status when an optional dependency is missing."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C."""


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after every option whose default is a value (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
            and action.option_strings
            and not isinstance(action, argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fastgen-sparse")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    from fastgen.pipelines.presets import PRESETS

    model = p.add_argument_group("model and method")
    src = model.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        default=None,
        help="embedded tiny model built in code, no download: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
        + " (default: tiny-wan)",
    )
    src.add_argument(
        "--model",
        default=None,
        help="hub id or local folder of a real checkpoint (Wan, HunyuanVideo, LLaDA, Dream)",
    )
    model.add_argument(
        "--method",
        default=None,
        help="video: rectified | dense; causal Wan: light_forcing | dense; text: sparsed | window_diffusion | "
        "sparsed+window_diffusion | dense (default: the model's sparse method, the first of its list)",
    )
    model.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    model.add_argument("--seed", type=int, default=0, help="random seed")
    model.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"],
        help="weights and activations (default: float32 on CPU, bfloat16 on GPU)",
    )  # fmt: skip
    model.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    model.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run dense with the same seed; report the median speed-up over --rounds, its range, "
        "the load average and the fidelity (no speed-up when sparse attention never ran)",
    )
    model.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds of --compare-dense (default: 3)"
    )
    model.add_argument(
        "--trust-remote-code", action="store_true", help="text: allow a checkpoint's own modelling code"
    )

    model.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="rectified, light_forcing, sparsed: tokens per attention block, a power of two >= 16",
    )
    _add_video_arguments(p)
    from fastgen.cli.context_parallel import add_context_parallel_arguments

    add_context_parallel_arguments(p)
    _add_text_arguments(p)


def _add_video_arguments(p: argparse.ArgumentParser) -> None:
    video = p.add_argument_group("video (Wan, HunyuanVideo, the causal Wan)")
    video.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16")
    video.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16")
    video.add_argument("--frames", type=int, default=None, help="frames (Wan: 4k+1)")
    video.add_argument(
        "--guidance-scale", type=float, default=None, help="classifier-free guidance scale, >= 0"
    )
    video.add_argument("--negative-prompt", default=None, help="negative prompt")
    video.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="rectified, light_forcing: fraction of key blocks dropped, in [0, 1)",
    )
    video.add_argument(
        "--dense-layers", type=int, default=None, help="rectified: the first N blocks stay dense"
    )
    video.add_argument(
        "--warmup-steps", type=int, default=None, help="rectified: the first N steps stay dense"
    )
    video.add_argument(
        "--form", default=None, choices=["exact", "paper", "none"], help="rectified: rectification form"
    )
    video.add_argument(
        "--self-forcing-checkpoint",
        default=None,
        help="causal Wan: a Self-Forcing .pt (generator_ema / generator) loaded into the --model Wan 2.1 T2V "
        "folder for chunked autoregressive generation",
    )
    video.add_argument(
        "--local-attn-frames", type=int, default=None, help="causal Wan: latent frames each chunk attends to"
    )
    video.add_argument(
        "--sink-frames",
        type=int,
        default=None,
        help="causal Wan: first latent frames always kept in the window",
    )


def _add_text_arguments(p: argparse.ArgumentParser) -> None:
    text = p.add_argument_group("text (LLaDA, Dream)")
    text.add_argument("--gen-length", type=int, default=None, help="tokens to generate")
    text.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length")
    text.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature, >= 0 (0 = greedy)"
    )
    text.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale, >= 0")
    text.add_argument(
        "--skip", type=float, default=None, help="sparsed: fraction of steps run dense first, in [0, 1]"
    )
    text.add_argument(
        "--select", type=float, default=None, help="sparsed: fraction of key blocks kept, in (0, 1]"
    )
    text.add_argument("--window", type=int, default=None, help="window_diffusion: masks in the window")
    text.add_argument("--active", type=int, default=None, help="window_diffusion: masks computed per step")
    text.add_argument("--refresh-cycle", type=int, default=None, help="window_diffusion: steps per refresh")


def _subparser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastgen`` command (every subcommand; the CLI reference is made from it)."""
    parser = argparse.ArgumentParser(
        prog="fastgen",
        description="Sparse attention for video diffusion transformers and diffusion LMs.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; show tracebacks")
    parser.add_argument("--version", action="version", version=f"fastgen {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = _subparser(
        sub, "generate", help="generate one video or text", description="Generate one video or text."
    )
    _add_model_arguments(gen)
    io = gen.add_argument_group("input and output")
    io.add_argument(
        "--prompt",
        default=None,
        help="the prompt (required, except for a task-trained preset such as tiny-llada-kv, which then "
        "uses the held-out task example of --seed)",
    )
    io.add_argument(
        "--image", default=None, help="image-to-video pipelines (Wan I2V): the first frame (png/jpg)"
    )
    io.add_argument(
        "--out",
        default=None,
        help="output file, .mp4 for video, .txt for text; checked before generating, written atomically "
        "(default: output.mp4 for video; text goes to stdout only)",
    )
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    batch = _subparser(
        sub,
        "batch",
        help="generate for every prompt in a file",
        description="Generate for every prompt in a file (txt, jsonl or csv); resumable.",
    )
    batch.add_argument("prompts", help="prompt file: .txt (one per line), .jsonl or .csv")
    _add_model_arguments(batch)
    bio = batch.add_argument_group("input and output")
    bio.add_argument(
        "--image", default=None, help="image-to-video: the first frame of every item (or an 'image' column)"
    )
    bio.add_argument("--out-dir", default="outputs", help="folder for outputs and manifest.jsonl")
    bio.add_argument("--overwrite", action="store_true", help="redo items that are already finished")

    bench = sub.add_parser(
        "bench",
        help="benchmarks (speed ratio vs SDPA with error next to speed)",
        description="Benchmarks: speed as a ratio to a reference in the same run, error next to speed.",
    )
    from fastgen.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    for name, action in _subcommands(bench).items():
        action.prog = f"fastgen bench {name}"

    demo = _subparser(
        sub, "demo", help="launch the Gradio demo", description="Launch the Gradio demo (dense vs sparse)."
    )
    demo.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    demo.add_argument("--port", type=int, default=7860, help="port, 1..65535")
    demo.add_argument("--share", action="store_true", help="create a public Gradio share link")
    demo.add_argument("--video-preset", default="tiny-wan-long", help="video preset (Video tab)")
    demo.add_argument("--text-preset", default="tiny-llada-kv", help="text preset (Text tab)")
    demo.add_argument("--causal-preset", default="tiny-causal-wan", help="causal Wan preset (Causal tab)")
    demo.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved timing rounds of every dense-vs-accelerated comparison",
    )
    demo.add_argument("--video-model", default=None, help="real video checkpoint instead of the preset")
    demo.add_argument("--text-model", default=None, help="real diffusion-LM checkpoint instead of the preset")
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _check_bench(args: argparse.Namespace) -> None:
    """Range checks of ``fastgen bench attention``'s options (the other suites check their own)."""
    if getattr(args, "suite", None) != "attention":
        return
    problems = []
    for name, low in (("tokens", 1), ("heads", 1), ("head_dim", 1), ("repeats", 1), ("block_size", 16),
                      ("threads", 1), ("text_tokens", 0), ("text_valid", 0)):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None and value < low:
            problems.append(
                f"--{name.replace('_', '-')}={value} is not allowed; allowed: an integer >= {low}"
            )
    for s in getattr(args, "sparsity", None) or []:
        if not 0.0 <= s < 1.0:
            problems.append(f"--sparsity={s} is not allowed; allowed: numbers in [0, 1)")
    for g in getattr(args, "grid", None) or []:
        if g < 1:
            problems.append(
                f"--grid={' '.join(map(str, args.grid))} is not allowed; allowed: three integers >= 1"
            )
            break
    if problems:
        from fastgen.cli.checks import UsageError

        raise UsageError(problems)
    from fastgen.cli.checks import check_device

    check_device(getattr(args, "device", None))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from fastgen.cli.generate import run_generate

        return run_generate(args)
    if args.command == "batch":
        from fastgen.cli.batch import run_batch

        return run_batch(args)
    if args.command == "bench":
        _check_bench(args)
        from fastgen.bench.cli import run_bench

        # suites that build their own parser take their program name from sys.argv[0]
        saved, sys.argv[0] = sys.argv[0], f"fastgen bench {args.suite}"
        try:
            return run_bench(args)
        finally:
            sys.argv[0] = saved
    if args.command == "demo":
        from fastgen.app.layout import launch

        return launch(args)
    raise ValueError(f"unknown command {args.command!r}")


NOTICES_DROPPED = (
    "requires torchvision (not installed); falling back to",  # transformers, diffusers' Wan I2V import
    "to instantiate a model of type",  # transformers, a recognised LM family's tokenizer
)
"""Library notices a user cannot act on (shown again with ``-v``)."""


class _DropNotices(logging.Filter):
    """Drops the log records of :data:`NOTICES_DROPPED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern in NOTICES_DROPPED)


def _quiet_libraries() -> None:
    """Silence notices a user cannot act on (:data:`NOTICES_DROPPED`, gradio's analytics); ``-v``
    keeps them."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    root = hf_logging.get_logger()  # the library's root logger, which owns its handler
    for handler in root.handlers:
        if not any(isinstance(f, _DropNotices) for f in handler.filters):
            handler.addFilter(_DropNotices())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgen`` console script: returns 0 when the command succeeded, else raises
    ``SystemExit`` with the exit status (module docstring) after printing its one-line reason."""
    code = _main(argv)
    if code:
        raise SystemExit(code)
    return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    prefix = f"fastgen {args.command}: "
    from fastgen.cli.checks import RuntimeFailure

    try:
        return int(_dispatch(args) or 0)
    except KeyboardInterrupt as err:
        detail = (
            str(err)
            or "nothing half-written was left (outputs are written atomically); run the command again"
        )
        sys.stderr.write(f"{prefix}interrupted: {detail}\n")
        return EXIT_INTERRUPTED
    except ImportError as err:  # an optional dependency is missing: say what to install, no traceback
        from fastgen.optional import missing_dependency_message

        message = missing_dependency_message(err)
        if message is None:
            return _unexpected(prefix, err, args.verbose)
        sys.stderr.write(f"{prefix}error: {message}\n")
        return EXIT_MISSING_DEPENDENCY
    except RuntimeFailure as err:
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"{prefix}error: {err}\n")
        return EXIT_RUNTIME
    except ValueError as err:
        if args.verbose:
            traceback.print_exc()
        if _launched_rank() == 0:  # under torchrun every rank finds the same problem: rank 0 says it
            for line in str(err).splitlines() or [type(err).__name__]:
                sys.stderr.write(f"{prefix}error: {line}\n")
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - a failure of the run: one line, the traceback with -v
        return _unexpected(prefix, err, args.verbose)


def _launched_rank() -> int:
    """This process's rank under a launcher (torchrun: ``RANK``), 0 without one."""
    import os

    try:
        return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
    except ValueError:
        return 0


def _unexpected(prefix: str, err: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    first = (str(err).strip().splitlines() or [""])[0]
    hint = "" if verbose else " (run with -v for the traceback)"
    sys.stderr.write(f"{prefix}error: {type(err).__name__}: {first}{hint}\n")
    return EXIT_RUNTIME


__all__ = ["EXIT_INTERRUPTED", "EXIT_RUNTIME", "EXIT_USAGE", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
