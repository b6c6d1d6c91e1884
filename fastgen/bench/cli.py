"""``fastgen bench``: argument parsing and dispatch to the benchmark modules.

Suites: ``attention`` (:mod:`fastgen.bench.attention`, options parsed here), and ``fidelity``,
``transformer``, ``sparsed``, ``causal``, ``accuracy``, ``gpu``, ``window``, ``cp`` whose modules parse their own
options: everything after the suite name
is handed to that module's ``main(argv)``, imported only when the suite runs.
"""

from __future__ import annotations

import argparse
import importlib

PASS_THROUGH_SUITES = {
    "fidelity": ("fastgen.bench.fidelity", "Rectified SpaAttn fidelity: error of each form vs dense"),
    "transformer": (
        "fastgen.bench.transformer",
        "tiny Wan or HunyuanVideo transformer: sparse vs dense speed",
    ),
    "sparsed": ("fastgen.bench.sparsed", "SparseD on a diffusion LM: speed and agreement"),
    "causal": (
        "fastgen.bench.causal",
        "Light Forcing on a tiny causal Wan: generation speed, ideal, error, memory",
    ),
    "accuracy": (
        "fastgen.bench.accuracy",
        "trained tiny diffusion LM: task accuracy and tokens/s, dense vs SparseD / threshold / Window-Diffusion",
    ),
    "gpu": (
        "fastgen.bench.gpu",
        "the prepared GPU check: every Triton kernel vs its reference, timed vs SDPA",
    ),
    "long-answers": (
        "fastgen.bench.long_answers",
        "trained long-answer LM: dense vs threshold, Fast-dLLM (prefix/dual) and Window-Diffusion (+ SparseD)",
    ),
    "window": (
        "fastgen.bench.window",
        "Window-Diffusion on tiny LLaDA/Dream-shaped LMs: tokens/s vs dense, with SparseD and threshold",
    ),
    "cp": (
        "fastgen.bench.context_parallel",
        "sparse vs dense attention under context parallelism (run under torchrun): per-rank time, exchange share",
    ),
}
"""Suite name -> (module with ``main(argv)``, one-line help)."""


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fastgen bench``: one sub-command per suite."""
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    sub.required = True
    from fastgen.bench.attention import add_arguments

    attention = sub.add_parser(
        "attention",
        help="attention kernels: speedup vs SDPA, density, error, peak memory",
        description="Attention benchmark: speed as a ratio to SDPA in the same run, error next to speed.",
    )
    add_arguments(attention)
    for name, (_, help_text) in PASS_THROUGH_SUITES.items():
        # no option prefix of its own, so every argument (``--help`` too) reaches the suite's main()
        suite = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\x01")
        suite.add_argument("suite_args", nargs=argparse.REMAINDER, help="options of the suite")


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected benchmark suite."""
    if args.suite == "attention":
        from fastgen.bench.attention import run

        return run(args)
    if args.suite in PASS_THROUGH_SUITES:
        module_name = PASS_THROUGH_SUITES[args.suite][0]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            raise ValueError(
                f"suite={args.suite!r} is not available yet ({module_name} is missing)"
            ) from None
        return int(module.main(list(args.suite_args)) or 0)
    raise ValueError(f"suite={args.suite!r} is unknown; allowed: attention, {', '.join(PASS_THROUGH_SUITES)}")
