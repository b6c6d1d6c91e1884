"""The ``fastgen`` command line: generate, batch, bench, demo.

Each subcommand's work lives in its own module; this file only parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        default=None,
        help="embedded tiny preset (no download): tiny-wan, tiny-wan-long, tiny-hunyuan, tiny-causal-wan, "
        "tiny-llada-kv (trained), tiny-llada",
    )
    src.add_argument(
        "--model",
        default=None,
        help="hub id or local folder of a real checkpoint (Wan, HunyuanVideo, LLaDA, Dream)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="rectified | light_forcing (causal Wan) | sparsed | window_diffusion | sparsed+window_diffusion | "
        "dense (default: the model's sparse method)",
    )
    p.add_argument(
        "--window", type=int, default=None, help="window_diffusion: masks in the window (default per family)"
    )
    p.add_argument(
        "--active", type=int, default=None, help="window_diffusion: masks recomputed per step (default 16)"
    )
    p.add_argument(
        "--refresh-cycle", type=int, default=None, help="window_diffusion: steps per refresh (default 32)"
    )
    p.add_argument(
        "--self-forcing-checkpoint",
        default=None,
        help="Self-Forcing .pt (generator_ema / generator) loaded into the --model Wan 2.1 T2V folder: "
        "autoregressive chunked generation (CausalWanPipeline)",
    )
    p.add_argument(
        "--sparsity", type=float, default=None, help="video: fraction of key blocks dropped, in [0, 1)"
    )
    p.add_argument(
        "--block-size", type=int, default=None, help="tokens per attention block (power of two >= 16)"
    )
    p.add_argument(
        "--dense-layers", type=int, default=None, help="video: first N transformer blocks stay dense"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="video: first N denoising steps stay dense")
    p.add_argument("--form", default=None, help="rectified: exact | paper | none")
    p.add_argument(
        "--skip", type=float, default=None, help="sparsed: fraction of steps run dense first, in [0, 1]"
    )
    p.add_argument(
        "--select", type=float, default=None, help="sparsed: fraction of key blocks kept, in (0, 1]"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels")
    p.add_argument("--width", type=int, default=None, help="video width in pixels")
    p.add_argument("--frames", type=int, default=None, help="video frames")
    p.add_argument("--guidance-scale", type=float, default=None, help="video: classifier-free guidance scale")
    p.add_argument("--negative-prompt", default=None, help="video: negative prompt")
    p.add_argument("--gen-length", type=int, default=None, help="text: tokens to generate")
    p.add_argument("--block-length", type=int, default=None, help="text: semi-autoregressive block length")
    p.add_argument("--temperature", type=float, default=None, help="text: sampling temperature (0 = greedy)")
    p.add_argument("--cfg-scale", type=float, default=None, help="text: classifier-free guidance scale")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run dense with the same seed; report speedup and fidelity",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own modelling code (off by default)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastgen`` command."""
    parser = argparse.ArgumentParser(
        prog="fastgen",
        description="Sparse attention for video diffusion transformers and diffusion LMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser(
        "generate", help="generate one video or text", description="Generate one video or text."
    )
    _add_model_arguments(gen)
    gen.add_argument(
        "--prompt",
        default=None,
        help="the prompt (required, except for a task-trained preset such as tiny-llada-kv, which then "
        "uses the held-out task example of --seed)",
    )
    gen.add_argument(
        "--image", default=None, help="video, image-to-video pipelines (Wan I2V): the first frame (png/jpg)"
    )
    gen.add_argument(
        "--out", default=None, help="output file (.mp4 for video, .txt for text); written atomically"
    )

    batch = sub.add_parser(
        "batch",
        help="generate for every prompt in a file",
        description="Generate for every prompt in a file (txt, jsonl or csv).",
    )
    batch.add_argument("prompts", help="prompt file: .txt (one per line), .jsonl or .csv")
    _add_model_arguments(batch)
    batch.add_argument(
        "--out-dir", default="outputs", help="folder for outputs and manifest.jsonl (default: outputs)"
    )
    batch.add_argument("--overwrite", action="store_true", help="redo items that are already finished")

    bench = sub.add_parser(
        "bench", help="benchmarks (speed ratio vs SDPA with error next to speed)", description="Benchmarks."
    )
    from fastgen.bench.cli import add_bench_arguments

    add_bench_arguments(bench)

    demo = sub.add_parser(
        "demo", help="launch the Gradio demo", description="Launch the Gradio demo (dense vs sparse)."
    )
    demo.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--share", action="store_true", help="create a public Gradio share link")
    demo.add_argument("--video-preset", default="tiny-wan-long", help="video preset (default tiny-wan-long)")
    demo.add_argument("--text-preset", default="tiny-llada-kv", help="text preset (default tiny-llada-kv)")
    demo.add_argument("--video-model", default=None, help="real video checkpoint instead of the preset")
    demo.add_argument("--text-model", default=None, help="real diffusion-LM checkpoint instead of the preset")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgen`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "generate":
            from fastgen.cli_generate import run_generate

            return run_generate(args)
        if args.command == "batch":
            from fastgen.batch import run_batch

            return run_batch(args)
        if args.command == "bench":
            from fastgen.bench.cli import run_bench

            return run_bench(args)
        if args.command == "demo":
            from fastgen.app.demo import launch

            return launch(args)
    except ValueError as err:
        parser.exit(2, f"fastgen {args.command}: error: {err}\n")
    except ImportError as err:  # an optional dependency is missing: say what to install, no traceback
        from fastgen.optional import missing_dependency_message

        message = missing_dependency_message(err)
        if message is None:
            raise
        parser.exit(3, f"fastgen {args.command}: error: {message}\n")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
