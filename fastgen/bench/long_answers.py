"""Long answers, many tokens per step: the trained ``tiny-llada-long`` model (256-token ledger answers)
decoded by dense one-token-per-step, threshold decoding, Fast-dLLM (prefix / dual cache + threshold),
Window-Diffusion, Window-Diffusion + threshold and Window-Diffusion + SparseD + threshold, at
``gen_length`` 256 and 1024 (the answer followed by EOS padding, as Fast-dLLM's 1024-token GSM8K runs).

Per variant: exact match of the whole answer and per-token accuracy (:class:`LedgerTask.score`), wall
clock (every variant once per round, variants interleaved in one process, median over rounds, load
average recorded), answer tokens per second, decoding steps per call and mean tokens committed per step.

Tokens per second counts the **answer** tokens: the decoded text up to the first EOS, EOS excluded (the
256 ledger tokens when the answer is right), over the whole call's wall clock. This is how Fast-dLLM's
LLaDA harness counts them (stop-truncated answer tokens, EOS 126081 excluded, wall clock of the loop);
positions decoded after the answer (EOS padding at gen 1024) cost time but add no tokens. No variant stops
early at EOS (Fast-dLLM v1 has no early stop), so all decode the same ``gen_length`` positions.

Run: ``python -m fastgen.bench.long_answers --gen 256 1024 --rounds 3 --json samples/bench/long_answers.json
--plot samples/long_answers_speed_vs_accuracy.png`` (``--sweep`` adds the threshold sweep of the plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

from .accuracy import Variant, save_result

logger = logging.getLogger(__name__)


def build_variants(gen_length: int, sweep: bool = False, block: int = 32) -> list[Variant]:
    """The table's variants at ``gen_length`` (and the threshold sweep when ``sweep``)."""
    from fastgen.configs import FastDLLMConfig, SparseDConfig, WindowDiffusionConfig

    dense = {"steps": gen_length, "block_length": block}
    wd = WindowDiffusionConfig()
    variants = [
        Variant("dense, 1 token/step", "dense", [], dict(dense)),
        Variant("threshold 0.9", "threshold", [], {**dense, "confidence_threshold": 0.9}),
        Variant("Fast-dLLM prefix + 0.9", "fast-dllm prefix", [FastDLLMConfig(cache="prefix", threshold=0.9)]),
        Variant("Fast-dLLM dual + 0.9", "fast-dllm dual", [FastDLLMConfig(cache="dual", threshold=0.9)]),
        Variant("Fast-dLLM dual + factor 1", "fast-dllm dual factor", [FastDLLMConfig(cache="dual", threshold=None, factor=1.0)]),
        Variant("Window-Diffusion", "window-diffusion", [wd], {"steps": gen_length}),
        Variant("Window-Diffusion + 0.9", "window-diffusion+threshold", [wd], {"steps": gen_length, "confidence_threshold": 0.9}),
        Variant(
            "Window-Diffusion + SparseD + 0.9",
            "window-diffusion+sparsed+threshold",
            [SparseDConfig(block_size=block), wd],
            {"steps": gen_length, "confidence_threshold": 0.9},
        ),
    ]  # fmt: skip
    if sweep:
        for t in (0.5, 0.7, 0.8, 0.95, 0.99):
            variants.append(Variant(f"threshold {t}", "threshold", [], {**dense, "confidence_threshold": t}))
            variants.append(
                Variant(
                    f"Fast-dLLM dual + {t}", "fast-dllm dual", [FastDLLMConfig(cache="dual", threshold=t)]
                )
            )
            variants.append(
                Variant(
                    f"Window-Diffusion + {t}",
                    "window-diffusion+threshold",
                    [wd],
                    {"steps": gen_length, "confidence_threshold": t},
                )
            )
    return variants


def evaluate(pipe, task, examples, variant: Variant, gen_length: int, batch: int) -> dict:
    """Decode ``examples`` with ``variant``; accuracy, answer tokens, steps and seconds."""
    exact = tokens_right = answer_tokens = steps = calls = 0
    start = time.perf_counter()
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        out = pipe(
            prompt=[e.prompt for e in chunk],
            gen_length=gen_length,
            temperature=0.0,
            generator=0,
            progress=False,
            acceleration=list(variant.acceleration) or None,
            **variant.options,
        )
        steps += out.steps_run
        calls += 1
        for text, e in zip(out.texts, chunk):
            ok, frac = task.score(text, e.answer)
            exact += ok
            tokens_right += frac
            answer_tokens += len(text.split())
    seconds = time.perf_counter() - start
    n = len(examples)
    return {
        "seconds": seconds,
        "accuracy": exact / n,
        "token_accuracy": tokens_right / n,
        "answer_tokens": answer_tokens,
        "steps_per_call": steps / calls,
        "tokens_per_step": gen_length / (steps / calls),
    }


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark for every ``--gen`` length; returns the results."""
    from fastgen.pipelines import tiny_llada_long

    torch.set_num_threads(args.threads)
    pipe = tiny_llada_long.build_tiny_llada_long(device="cpu", dtype="float32")
    task = pipe.fastgen_task
    examples = task.held_out(args.examples)
    results = []
    for gen_length in args.gen:
        variants = build_variants(gen_length, sweep=args.sweep)
        main_names = {v.name for v in build_variants(gen_length)}
        evaluate(pipe, task, examples[:1], variants[0], gen_length, 1)  # untimed warm-up
        measured: dict[str, list[dict]] = {v.name: [] for v in variants}
        load = []
        for r in range(args.rounds):
            for v in variants:
                if v.name not in main_names and r >= args.sweep_rounds:
                    continue  # the sweep's extra rows run fewer rounds
                measured[v.name].append(evaluate(pipe, task, examples, v, gen_length, args.batch))
                load.append(os.getloadavg()[0])
                m = measured[v.name][-1]
                logger.info(
                    "gen %d round %d %s: exact %.3f, tokens %.3f, %.2f s, %.1f steps",
                    gen_length, r, v.name, m["accuracy"], m["token_accuracy"], m["seconds"], m["steps_per_call"],
                )  # fmt: skip
        dense_s = statistics.median(m["seconds"] for m in measured[variants[0].name])
        rows = []
        for v in variants:
            ms = measured[v.name]
            seconds = statistics.median(m["seconds"] for m in ms)
            rows.append(
                {
                    "variant": v.name,
                    "method": v.method,
                    "accuracy": ms[0]["accuracy"],
                    "token_accuracy": ms[0]["token_accuracy"],
                    "answer_tokens_per_s": ms[0]["answer_tokens"] / seconds,
                    "speedup": dense_s / seconds,
                    "steps_per_call": ms[0]["steps_per_call"],
                    "tokens_per_step": ms[0]["tokens_per_step"],
                    "seconds_median": seconds,
                    "seconds_rounds": [m["seconds"] for m in ms],
                    "configs": [c.to_dict() for c in v.acceleration],
                    "options": v.options,
                }
            )
        results.append(
            {
                "gen_length": gen_length,
                "examples": len(examples),
                "batch": args.batch,
                "rounds": args.rounds,
                "loadavg_during": [min(load), statistics.median(load), max(load)],
                "rows": rows,
            }
        )
    return {"preset": "tiny-llada-long", "threads": args.threads, "results": results}


def markdown_table(result: dict) -> str:
    """The results as Markdown tables, one per generation length."""
    out = []
    for res in result["results"]:
        lo, med, hi = res["loadavg_during"]
        out.append(
            f"gen_length {res['gen_length']}: {res['examples']} held-out prompts, batch {res['batch']}, "
            f"{res['rounds']} rounds (median), load average {lo:.1f}-{hi:.1f} (median {med:.1f})\n"
        )
        out.append(
            "| variant | exact match | tokens right | answer tok/s | speed-up | steps/call | tokens/step |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            out.append(
                f"| {r['variant']} | {r['accuracy']:.3f} | {r['token_accuracy']:.3f} | "
                f"{r['answer_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['steps_per_call']:.1f} | "
                f"{r['tokens_per_step']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: str) -> str:
    """Speed-up vs exact match, one panel per generation length, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = result["results"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, res in zip(axes[0], panels):
        for method in sorted({r["method"] for r in res["rows"]}):
            rows = sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["speedup"])
            ax.plot([r["speedup"] for r in rows], [r["accuracy"] for r in rows], "o-", label=method, ms=4)
            for r in rows:
                ax.annotate(
                    r["variant"].split("+ ")[-1], (r["speedup"], r["accuracy"]), fontsize=6, alpha=0.6
                )
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over dense one-token-per-step (wall clock, median)")
        ax.set_ylabel("held-out exact match")
        ax.set_title(f"tiny-llada-long, gen {res['gen_length']}, load {res['loadavg_during'][1]:.1f}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def step_costs(
    families=("llada", "dream"),
    gen_lengths=(256, 1024),
    prompt_length: int = 512,
    device: str = "cuda",
    dtype: str = "bfloat16",
    scale: str = "real",
    reps: int = 5,
) -> list[dict]:
    """Per-step forward cost of Fast-dLLM's three forwards at ``scale`` shapes (random weights: per-step
    cost and memory only, no accuracy): the block-start full forward (= a dense step), a PrefixCache step
    (block + suffix against the cached prefix) and a DualCache step (the block only), for the middle
    block; median milliseconds over ``reps`` and peak CUDA memory."""
    from fastgen.bench.window import build_model
    from fastgen.pipelines.fast_dllm import FastDLLMCache

    out = []
    for family in families:
        pipe = build_model(family, prompt_length + max(gen_lengths), device=device, dtype=dtype, scale=scale)
        model, dev = pipe.model, pipe.device
        for gen_length in gen_lengths:
            total = prompt_length + gen_length
            vocab = model.get_input_embeddings().num_embeddings
            x = torch.randint(0, vocab - 1, (1, total), device=dev)
            mask = torch.zeros(1, 1, total, total, dtype=pipe.dtype, device=dev)
            positions = torch.arange(total, device=dev)[None]
            start = prompt_length + (gen_length // 64) * 32
            end = start + 32
            cache = FastDLLMCache()
            timings = {}
            for mode, lo, hi in (("refresh", 0, total), ("prefix", start, total), ("dual", start, end)):
                keep = torch.arange(32, device=dev) + (start if mode == "refresh" else 0)
                runs = []
                for _ in range(reps + 1):
                    cache.mode, cache.start, cache.end = mode, start, end
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        model(input_ids=x[:, lo:hi], attention_mask=mask[:, :, lo:hi], position_ids=positions[:, lo:hi],
                              cache=cache, use_cache=True, logits_to_keep=keep)  # fmt: skip
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    runs.append(time.perf_counter() - t0)
                timings[mode] = 1000 * statistics.median(runs[1:])
            row = {
                "family": family,
                "gen_length": gen_length,
                "prompt_length": prompt_length,
                "full_step_ms": timings["refresh"],
                "prefix_step_ms": timings["prefix"],
                "dual_step_ms": timings["dual"],
                "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30
                if dev.type == "cuda"
                else None,
            }
            logger.info("%s", row)
            out.append(row)
        del pipe, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.bench.long_answers``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="fastgen bench long-answers", description=__doc__.split("\n")[0])
    parser.add_argument("--gen", type=int, nargs="+", default=[256, 1024], help="generation lengths")
    parser.add_argument("--examples", type=int, default=8, help="held-out prompts (fixed seeds)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per pipeline call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--sweep", action="store_true", help="add the threshold sweep (plot)")
    parser.add_argument(
        "--sweep-rounds", type=int, default=1, help="rounds for the sweep's extra rows (they are slow)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the speed-vs-accuracy PNG here")
    parser.add_argument(
        "--step-costs",
        action="store_true",
        help="instead: Fast-dLLM's per-step forward costs at the published LLaDA-8B / Dream-7B shapes "
        "(random weights, --device/--dtype; a GPU measurement)",
    )
    parser.add_argument("--device", default="cuda", help="--step-costs device")
    parser.add_argument("--dtype", default="bfloat16", help="--step-costs dtype")
    parser.add_argument("--scale", default="real", choices=("real", "tiny"), help="--step-costs shapes")
    args = parser.parse_args(argv)
    if args.step_costs:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        rows = step_costs(gen_lengths=tuple(args.gen), device=args.device, dtype=args.dtype, scale=args.scale)
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        save_result(rows, args.json)
        return 0
    for name in ("examples", "batch", "rounds", "threads", "sweep_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for g in args.gen:
        if g < 256 or g % 32:
            parser.error(f"--gen={g} must be a multiple of 32 and >= 256 (the answer is 256 tokens)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = run(args)
    sys.stdout.write(markdown_table(result) + "\n")
    save_result(result, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
