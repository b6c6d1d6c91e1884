"""Accuracy benchmark: task accuracy and wall-clock tokens/s of the trained tiny diffusion LM
(``tiny-llada-kv``) on a fixed held-out set, dense vs SparseD vs threshold decoding vs Window-Diffusion
(when this build has it) and their combinations, with sweeps that show where each starts to lose answers.

Accuracy is the exact match of the whole answer (:class:`~fastgen.pipelines.kv_task.KVTask`); greedy
decoding makes it the same in every round. Speed is wall-clock: every variant runs once per round,
variants interleaved in the same process, and the median over rounds is reported with the load average.

Run: ``fastgen bench accuracy`` (``--examples 100 --rounds 3``; ``--json``/``--plot`` write the results
table and the speed-vs-accuracy picture; ``--quick`` runs the default of each method only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from fastgen.bench._timing import synchronize

logger = logging.getLogger(__name__)


@dataclass
class Variant:
    """One decoding setting: acceleration configs plus pipeline options."""

    name: str
    """Row label."""
    method: str
    """Group for the plot (one colour each): dense, sparsed, threshold, window_diffusion, Fast-dLLM or a
    combination."""
    acceleration: list = field(default_factory=list)
    """Configs passed as ``acceleration=`` (empty = dense attention)."""
    options: dict = field(default_factory=dict)
    """Extra pipeline options (``confidence_threshold``, ``steps``, ``block_length``)."""


def window_diffusion_config(**fields):
    """A ``WindowDiffusionConfig`` if this build runs Window-Diffusion, else ``None`` (logged)."""
    try:
        from fastgen.configs import WindowDiffusionConfig
    except ImportError:
        logger.warning("Window-Diffusion is not in this build; its rows are left out")
        return None
    return WindowDiffusionConfig(**fields)


def build_variants(quick: bool = False, block_size: int = 32) -> list[Variant]:
    """The benchmark's variants: each method's default, then sweeps (unless ``quick``)."""
    from fastgen.configs import SparseDConfig

    variants = [Variant("dense", "dense")]
    default_sparsed = SparseDConfig(block_size=block_size)
    variants.append(Variant(f"SparseD select {default_sparsed.select}", "sparsed", [default_sparsed]))
    variants.append(Variant("threshold 0.9", "threshold", [], {"confidence_threshold": 0.9}))
    variants.append(
        Variant(
            "SparseD + threshold 0.9", "sparsed+threshold", [default_sparsed], {"confidence_threshold": 0.9}
        )
    )
    wd = window_diffusion_config()
    if wd is not None:
        variants.append(Variant("Window-Diffusion (default)", "window_diffusion", [wd]))
        variants.append(
            Variant("Window-Diffusion + SparseD", "window_diffusion+sparsed", [default_sparsed, wd])
        )
        variants.append(
            Variant(
                "Window-Diffusion + threshold 0.9",
                "window_diffusion+threshold",
                [wd],
                {"confidence_threshold": 0.9},
            )
        )
    if quick:
        return variants
    for select in (0.2, 0.1, 0.05):
        variants.append(
            Variant(
                f"SparseD select {select}", "sparsed", [SparseDConfig(block_size=block_size, select=select)]
            )
        )
    for threshold in (0.7, 0.5, 0.3):
        variants.append(
            Variant(f"threshold {threshold}", "threshold", [], {"confidence_threshold": threshold})
        )
    if wd is not None:
        for active in (2, 1):
            cfg = window_diffusion_config(active=active, window=max(active, 4), refresh_cycle=4)
            variants.append(Variant(f"Window-Diffusion active {active} window 4", "window_diffusion", [cfg]))
    return variants


def evaluate(pipe, examples, variant: Variant, batch: int, decoding: dict) -> tuple[float, float, list[str]]:
    """``(accuracy, seconds, texts)`` of ``variant`` over ``examples`` (prompts decoded ``batch`` at a time)."""
    texts = []
    synchronize()
    start = time.perf_counter()
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        out = pipe(
            prompt=[e.prompt for e in chunk],
            generator=0,
            progress=False,
            acceleration=list(variant.acceleration) or None,
            **decoding,
            **variant.options,
        )
        texts.extend(out.texts)
    synchronize()
    seconds = time.perf_counter() - start
    correct = sum(t.split() == e.answer.split() for t, e in zip(texts, examples))
    return correct / len(examples), seconds, texts


def token_accuracy(texts: list[str], examples) -> float:
    """Fraction of answer tokens right, position by position (partial credit beside the exact match)."""
    hits = total = 0
    for text, e in zip(texts, examples):
        got, want = text.split(), e.answer.split()
        hits += sum(a == b for a, b in zip(got, want))
        total += len(want)
    return hits / max(1, total)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark; returns the results (also printed as a table)."""
    from fastgen.pipelines import load_preset

    torch.set_num_threads(args.threads)
    pipe = load_preset(args.preset, device="cpu", dtype="float32")
    task = pipe.fastgen_task
    decoding = dict(pipe.fastgen_defaults)
    examples = task.held_out(args.examples)
    variants = build_variants(quick=args.quick, block_size=args.block_size)
    # untimed warm-up of every variant on one example (kernel builds, allocator), excluded from timings;
    # a variant this build cannot run (e.g. Window-Diffusion before it lands) is left out, with a log line
    supported = []
    for v in variants:
        try:
            evaluate(pipe, examples[:1], v, 1, decoding)
        except (ValueError, NotImplementedError) as err:
            logger.warning("left out %s: %s", v.name, err)
            continue
        supported.append(v)
    variants = supported
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    if "dense" not in times:
        raise ValueError("the dense variant failed to run; see the log")
    accuracy: dict[str, float] = {}
    token_acc: dict[str, float] = {}
    for r in range(args.rounds):
        for v in variants:
            acc, seconds, texts = evaluate(pipe, examples, v, args.batch, decoding)
            token_acc[v.name] = token_accuracy(texts, examples)
            if v.name in accuracy and acc != accuracy[v.name]:
                logger.warning(
                    "%s: accuracy changed between rounds (%s -> %s)", v.name, accuracy[v.name], acc
                )
            accuracy[v.name] = acc
            times[v.name].append(seconds)
            logger.info("round %d %s: accuracy %.3f, %.2f s", r, v.name, acc, seconds)
    tokens = len(examples) * decoding["gen_length"]
    dense_s = statistics.median(times["dense"])
    rows = []
    for v in variants:
        seconds = statistics.median(times[v.name])
        rows.append(
            {
                "variant": v.name,
                "method": v.method,
                "accuracy": accuracy[v.name],
                "accuracy_delta_points": 100 * (accuracy[v.name] - accuracy["dense"]),
                "token_accuracy": token_acc[v.name],
                "tokens_per_s": tokens / seconds,
                "speedup": dense_s / seconds,
                "seconds_median": seconds,
                "seconds_rounds": times[v.name],
                "configs": [c.to_dict() for c in v.acceleration],
                "options": v.options,
            }
        )
    result = {
        "preset": args.preset,
        "examples": len(examples),
        "rounds": args.rounds,
        "batch": args.batch,
        "threads": args.threads,
        "decoding": decoding,
        "loadavg": list(os.getloadavg()),
        "rows": rows,
        "left_out": [v.name for v in build_variants(args.quick, args.block_size) if v.name not in times],
    }
    return result


def markdown_table(result: dict) -> str:
    """The results as a Markdown table."""
    lines = [
        "| variant | exact match | vs dense (points) | answer tokens right | tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['variant']} | {row['accuracy']:.3f} | {row['accuracy_delta_points']:+.1f} | "
            f"{row['token_accuracy']:.3f} | "
            f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """Save the speed-vs-accuracy scatter (one colour per method) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in result["rows"]})
    for method in methods:
        rows = [r for r in result["rows"] if r["method"] == method]
        ax.scatter([r["speedup"] for r in rows], [r["accuracy"] for r in rows], label=method, s=40)
        for r in rows:
            ax.annotate(r["variant"], (r["speedup"], r["accuracy"]), fontsize=6, alpha=0.7)
    ax.set_xlabel("speed-up vs dense (wall clock, median)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(
        f"{result['preset']}: {result['examples']} held-out prompts, load {result['loadavg'][0]:.1f}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_result(result, json_path: str | None, plot_path: str | None = None, draw=None) -> None:
    """Write ``result`` as indented JSON to ``json_path`` and ``draw(result, plot_path)``, each when its path
    is given."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    if plot_path:
        draw(result, plot_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgen bench accuracy", description=__doc__)
    parser.add_argument("--preset", default="tiny-llada-kv", help="a text preset trained on a checkable task")
    parser.add_argument("--examples", type=int, default=100, help="held-out prompts (fixed seeds)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=25, help="prompts per pipeline call")
    parser.add_argument("--block-size", type=int, default=32, help="SparseD block size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="each method's default only, no sweeps")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the speed-vs-accuracy PNG here")
    args = parser.parse_args(argv)
    for name in ("examples", "rounds", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = run(args)
    sys.stdout.write(markdown_table(result) + "\n")
    sys.stdout.write(
        f"load average {result['loadavg']}; {result['examples']} prompts, {result['rounds']} rounds\n"
    )
    save_result(result, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
