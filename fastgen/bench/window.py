"""Window-Diffusion benchmark: tokens/s of dense one-token-per-step decoding vs Window-Diffusion, vs
Window-Diffusion + SparseD, vs Window-Diffusion + confidence-threshold decoding, on tiny models shaped
like LLaDA (Llama, MHA) and Dream (Qwen2, GQA, logit shift), with ``steps == gen_length``.

Per model and generation length the variants run interleaved in the same process, ``rounds`` times,
and the median wall-clock time is reported. A dense step costs the same at every step (the shape never
changes), so dense tokens/s is measured from ``dense_probe_steps`` full steps (1 token per step); the
full dense generation (for token agreement) runs once where ``--agreement`` asks for it. Next to the
measured speed-up: the FLOP ratio the run's plan predicts (rows and keys per step, from the trace), the
cache size, and the process's peak RSS.

Two more sections in the same report:

- ``pruned_attention``: the attention call of a pruned step alone (queries = the active rows, keys = the
  frozen window) as SDPA vs SparseD's block-sparse kernels at ``select`` 0.3 on the CPU engines, interleaved
  (does block sparsity pay for 16-50 query rows?);
- ``trained``: the trained tiny diffusion LM (``load_preset("tiny-llada-kv")``, held-out task prompts, whose
  logits are not flat): dense one token per step vs threshold decoding vs Window-Diffusion vs
  Window-Diffusion + threshold, with task accuracy and steps run.

Run: ``fastgen bench window`` (prompt 512, gen 256 and 1024, 3 rounds at 256, 1 at 1024);
``fastgen bench window --quick`` is the smoke test (prompt 64, gen 64, one round). On a GPU,
``--scale real --device cuda --dtype bfloat16`` runs the published LLaDA-8B / Dream-7B shapes with random
weights (``scripts/gpu_window_check.sh``); CUDA timings are synchronised and the report adds the peak
CUDA memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import statistics
import sys

import torch

from fastgen.attention.window import predicted_flop_ratio
from fastgen.bench._timing import time_per_call, timed
from fastgen.bench.lm_models import (  # noqa: F401 - VOCAB: importable from here as before
    REAL_SHAPES,
    SHAPES,
    VOCAB,
    _forward_cost_ratio,
    build_model,
)
from fastgen.configs import SparseDConfig, WindowDiffusionConfig
from fastgen.metrics import token_agreement

logger = logging.getLogger(__name__)

VARIANTS = ("window_diffusion", "window_diffusion+sparsed", "window_diffusion+threshold")
"""The accelerated variants timed against dense (one token per step)."""


def _plan_flops(out, total: int, shape: dict) -> float:
    trace = out.window_trace or []
    queries = [t["queries"] for t in trace]
    keys = [t["keys"] for t in trace]
    return predicted_flop_ratio(total, queries, keys, hidden=shape["hidden"], mlp=shape["mlp"])


def _variant_options(family: str, variants: tuple[str, ...], sparsed, threshold: float):
    """Window-Diffusion's config at ``family``'s rules and the pipeline options of each chosen variant."""
    wd = WindowDiffusionConfig().resolved(family)
    every = {
        "window_diffusion": dict(acceleration=[wd]),
        "window_diffusion+sparsed": dict(acceleration=[wd, sparsed]),
        "window_diffusion+threshold": dict(acceleration=[wd], confidence_threshold=threshold),
    }
    unknown = set(variants) - set(every)
    if unknown or not variants:
        raise ValueError(f"variants={variants!r}: allowed a non-empty subset of {', '.join(every)}")
    return wd, {name: every[name] for name in variants}


def _timed_rounds(pipe, common: dict, variants_here: dict, rounds: int, dense_probe_steps: int):
    """Interleaved rounds: a dense step (from a ``dense_probe_steps`` probe, one block) then every variant's
    whole run; returns the times per round by name and each variant's last output."""
    gen = common["gen_length"]
    times = {"dense_step": []}
    outs = {}
    for _ in range(rounds):
        _, t = timed(functools.partial(pipe, steps=dense_probe_steps, block_length=gen, **common))
        times["dense_step"].append(t / dense_probe_steps)
        for name, options in variants_here.items():
            out, t = timed(functools.partial(pipe, steps=gen, **common, **options))
            times.setdefault(name, []).append(t)
            outs[name] = out
    return times, outs


def _variant_entry(
    out, seconds: float, gen: int, dense_tps: float, total: int, shape: dict, dense_tokens, prompt_length
):
    """One variant's figures in a row (agreement with dense when its tokens were generated)."""
    entry = {
        "seconds": seconds,
        "tokens_per_s": gen / seconds,
        "speedup": (gen / seconds) / dense_tps,
        "predicted_flop_ratio": _plan_flops(out, total, shape),
        "steps_run": out.steps_run,
        "refresh_steps": sum(1 for t in out.window_trace or [] if t["refresh"]),
    }
    if dense_tokens is not None:
        entry["token_agreement"] = token_agreement(dense_tokens, out.sequences[0, prompt_length:].tolist())
    return entry


def _forward_cost(pipe, trace: list, total: int, steps_run: int) -> dict | None:
    """The cost of a pruned step's forward against a full one and the speed-up bound it implies (``None``
    without pruned steps)."""
    pruned_rows = [t["queries"] for t in trace if not t["refresh"]]
    if not pruned_rows:
        return None
    rows_run = round(statistics.mean(pruned_rows))
    ratio = _forward_cost_ratio(pipe.model, total, rows_run, rounds=3)
    # refresh steps in dense-step units (Dream rules run a prefix: its share of the tokens)
    refreshes = sum(t["queries"] / total for t in trace if t["refresh"])
    return {
        "pruned_rows_mean": rows_run,
        "full_over_pruned_forward": ratio,
        # the speed-up if a pruned step cost exactly a plain forward of its rows
        "speedup_bound": steps_run / (refreshes + len(pruned_rows) / ratio),
    }


def _kv_cache_mib(shape: dict, total: int, dtype: torch.dtype) -> float:
    """The K and V cache of every layer for ``total`` positions (plus one), in MiB."""
    return (
        2
        * shape["layers"]
        * shape["kv_heads"]
        * (total + 1)
        * shape["head_dim"]
        * torch.finfo(dtype).bits
        / 8
        / 2**20
    )


def _window_row(pipe, input_ids, family: str, gen: int, ctx: dict) -> dict:
    """The report's row of one family and generation length (``ctx``: the bench's settings)."""
    prompt_length, shape, variants_here = ctx["prompt_length"], ctx["shape"], ctx["variants_here"]
    total = prompt_length + gen
    common = dict(input_ids=input_ids, gen_length=gen, progress=False, generator=ctx["seed"])
    rounds = max(1, int(ctx["rounds"].get(gen, 1)))
    times, outs = _timed_rounds(pipe, common, variants_here, rounds, ctx["dense_probe_steps"])
    dense_step = statistics.median(times["dense_step"])
    dense_tps = 1.0 / dense_step
    row = {
        "family": family,
        "shape": shape,
        "gen_length": gen,
        "steps": gen,
        "rounds": len(times["dense_step"]),
        "dense": {"seconds_per_step": dense_step, "tokens_per_s": dense_tps},
        "window_config": ctx["wd"].to_dict(),
        "sparsed_config": ctx["sparsed"].to_dict(),
        "threshold": ctx["threshold"],
        "kv_cache_mib": _kv_cache_mib(shape, total, pipe.dtype),
    }
    dense_tokens = None
    if gen <= ctx["agreement_up_to"]:
        dense_out, t_full = timed(functools.partial(pipe, steps=gen, block_length=gen, **common))
        dense_tokens = dense_out.sequences[0, prompt_length:].tolist()
        row["dense"]["full_run_s"] = t_full
    for name in variants_here:
        seconds = statistics.median(times[name])
        row[name] = _variant_entry(
            outs[name], seconds, gen, dense_tps, total, shape, dense_tokens, prompt_length
        )
    first = next(iter(variants_here))
    cost = _forward_cost(pipe, outs[first].window_trace or [], total, row[first]["steps_run"])
    if cost is not None:
        row["forward_cost"] = cost
    row["loadavg"] = os.getloadavg()
    return row


def run_window_bench(
    *,
    families: tuple[str, ...] = ("llada", "dream"),
    prompt_length: int = 512,
    gen_lengths: tuple[int, ...] = (256, 1024),
    rounds: dict | None = None,
    dense_probe_steps: int = 4,
    threshold: float = 0.9,
    sparsed: SparseDConfig | None = None,
    agreement_up_to: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
    scale: str = "tiny",
    on_row=None,
) -> dict:
    """Measure every variant per family and generation length; returns a JSON-ready report.

    ``on_row(report)`` is called after each (family, generation length) row (partial reports survive)."""
    rounds = rounds or {}
    sparsed = sparsed or SparseDConfig(skip=0.2, select=0.3, block_size=128)
    report = {
        "device": None,
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "clock": "wall (time.perf_counter), median of rounds",
        "prompt_length": prompt_length,
        "scale": scale,
        "results": [],
    }
    for family in families:
        shape = (REAL_SHAPES if scale == "real" else SHAPES)[family]
        pipe = None  # the previous family's model is freed before the next one is built
        pipe = build_model(
            family, prompt_length + max(gen_lengths), device=device, dtype=dtype, seed=seed, scale=scale
        )
        report["device"] = str(pipe.device)
        g = torch.Generator().manual_seed(seed)
        # random prompt tokens below the mask id (the tiny models' mask is their last id)
        input_ids = torch.randint(0, pipe.mask_token_id, (1, prompt_length), generator=g).to(pipe.device)
        wd, variants_here = _variant_options(family, variants, sparsed, threshold)
        # warm-up: first-call overheads (kernel builds, allocator) of every path
        warm_gen = min(64, min(gen_lengths))  # fits the model's positions (prompt + longest generation)
        warm = dict(gen_length=warm_gen, steps=warm_gen, progress=False, generator=seed)
        pipe(input_ids=input_ids[:, :64], **warm, block_length=warm_gen)
        for options in variants_here.values():
            pipe(input_ids=input_ids[:, :64], **warm, **options)
        ctx = dict(prompt_length=prompt_length, shape=shape, variants_here=variants_here, seed=seed, rounds=rounds,
                   dense_probe_steps=dense_probe_steps, wd=wd, sparsed=sparsed, threshold=threshold,
                   agreement_up_to=agreement_up_to)  # fmt: skip
        for gen in gen_lengths:
            report["results"].append(_window_row(pipe, input_ids, family, gen, ctx))
            logger.info("window bench %s gen %d done", family, gen)
            if on_row is not None:
                on_row(report)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if str(report["device"]).startswith("cuda"):
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    report["loadavg_end"] = os.getloadavg()
    return report


def pruned_attention_bench(
    shapes=((16, 600), (31, 700), (50, 1100), (50, 1600)),
    *,
    select: float = 0.3,
    block_sizes=(16, 32, 64),
    heads: int = 4,
    head_dim: int = 128,
    rounds: int = 7,
    calls: int = 10,
    seed: int = 0,
) -> list[dict]:
    """A pruned step's attention call alone: SDPA vs SparseD block-sparse at ``select`` per engine.

    For each ``(query rows, window keys)``: random q/k/v ``[1, heads, rows, head_dim]``, a top-``select``
    key-block mask per query block (the kernel's cost does not depend on which blocks), every variant
    interleaved ``rounds`` times (``calls`` calls each), the median per call and the ratio to SDPA."""
    import torch.nn.functional as F

    from fastgen.attention.sparsed import sparsed_attention

    g = torch.Generator().manual_seed(seed)
    rows = []
    for queries, keys in shapes:
        q = torch.randn(1, heads, queries, head_dim, generator=g)
        k = torch.randn(1, heads, keys, head_dim, generator=g)
        v = torch.randn(1, heads, keys, head_dim, generator=g)
        variants = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        for block in block_sizes:
            nqb, nkb = -(-queries // block), -(-keys // block)
            keep = max(1, round(select * nkb))
            scores = torch.rand(1, heads, nqb, nkb, generator=g)
            mask = torch.zeros(scores.shape, dtype=torch.bool).scatter_(
                -1, scores.topk(keep, -1).indices, True
            )
            for engine in ("gather", "torch"):  # compiled FlexAttention: 0.52 of ideal on the CPU (README)
                variants[f"sparsed block {block} {engine}"] = (
                    lambda q=q, k=k, v=v, m=mask, b=block, e=engine: sparsed_attention(
                        q, k, v, m, b, backend=e
                    )
                )
        for fn in variants.values():  # warm-up (kernel builds, compiled FlexAttention)
            fn()
        times = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                times[name].append(time_per_call(fn, calls))
        sdpa = statistics.median(times["sdpa"])
        for name in variants:
            ms = statistics.median(times[name])
            rows.append(
                {
                    "queries": queries,
                    "keys": keys,
                    "variant": name,
                    "ms": 1e3 * ms,
                    "speedup_vs_sdpa": sdpa / ms,
                }
            )
    return rows


def trained_bench(
    *, examples: int = 50, batch: int = 10, rounds: int = 3, threshold: float = 0.9, seed: int = 0
) -> dict | None:
    """The trained ``tiny-llada-kv`` preset on held-out task prompts: dense (one token per step), threshold
    decoding, Window-Diffusion and Window-Diffusion + threshold, interleaved; ``None`` if the preset's
    checkpoint is missing (logged). Accuracy is the exact match of the whole answer."""
    from fastgen.pipelines import load_preset

    try:
        pipe = load_preset("tiny-llada-kv", device="cpu", dtype="float32")
    except (ValueError, OSError) as err:
        logger.warning("trained rows left out: %s", err)
        return None
    task = pipe.fastgen_task
    decoding = dict(pipe.fastgen_defaults)
    gen = decoding["gen_length"]
    decoding["steps"] = gen  # one token per step at most, as the dense baseline
    decoding["block_length"] = gen
    # the largest window/active the 4-token answer allows under the checked constraint
    active = max(1, gen // 2)
    wd = WindowDiffusionConfig(window=gen, active=active, refresh_cycle=gen - active + 1)
    variants = {
        "dense": {},
        "threshold": {"confidence_threshold": threshold},
        "window_diffusion": {"acceleration": [wd]},
        "window_diffusion+threshold": {"acceleration": [wd], "confidence_threshold": threshold},
    }
    held_out = task.held_out(examples)

    def run(options):
        texts, steps = [], []
        for lo in range(0, len(held_out), batch):
            chunk = held_out[lo : lo + batch]
            out = pipe(
                prompt=[e.prompt for e in chunk], generator=seed, progress=False, **decoding, **options
            )
            texts.extend(out.texts)
            steps.append(out.steps_run)
        return texts, steps

    for options in variants.values():
        pipe(prompt=held_out[0].prompt, generator=seed, progress=False, **decoding, **options)
    times = {name: [] for name in variants}
    results = {}
    for _ in range(rounds):
        for name, options in variants.items():
            (texts, steps), seconds = timed(functools.partial(run, options=options))
            times[name].append(seconds)
            results[name] = (texts, steps)
    dense_s = statistics.median(times["dense"])
    dense_texts = results["dense"][0]
    rows = {}
    for name in variants:
        texts, steps = results[name]
        seconds = statistics.median(times[name])
        rows[name] = {
            "seconds": seconds,
            "tokens_per_s": len(held_out) * gen / seconds,
            "speedup": dense_s / seconds,
            "accuracy": sum(task.is_correct(t, e.answer) for t, e in zip(texts, held_out)) / len(held_out),
            "agreement_with_dense": sum(t == d for t, d in zip(texts, dense_texts)) / len(held_out),
            "mean_steps_per_batch": statistics.mean(steps),
        }
    return {
        "preset": "tiny-llada-kv",
        "examples": len(held_out),
        "batch": batch,
        "rounds": rounds,
        "decoding": decoding,
        "window_config": wd.to_dict(),
        "threshold": threshold,
        "variants": rows,
        "loadavg": os.getloadavg(),
    }


def format_table(report: dict) -> str:
    """Markdown table of a report."""
    lines = [
        "| model | gen | variant | tokens/s | speed-up vs dense | predicted FLOP ratio | steps | agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['family']} | {row['gen_length']} | dense (1 token/step) | {row['dense']['tokens_per_s']:.1f} "
            "| 1.0x | 1.0 | "
            f"{row['steps']} | 1.000 |"
        )
        for name in VARIANTS:
            if name not in row:
                continue
            e = row[name]
            agreement = f"{e['token_agreement']:.3f}" if "token_agreement" in e else "-"
            lines.append(
                f"| {row['family']} | {row['gen_length']} | {name} | {e['tokens_per_s']:.1f} | {e['speedup']:.1f}x "
                f"| {e['predicted_flop_ratio']:.1f} | {e['steps_run']} | {agreement} |"
            )
    bounds = [r for r in report["results"] if "forward_cost" in r]
    if bounds:
        lines += [
            "",
            "| model | gen | pruned rows (mean) | full / pruned-rows forward time | speed-up bound |",
            "|---|---|---|---|---|",
        ]
        for r in bounds:
            f = r["forward_cost"]
            lines.append(
                f"| {r['family']} | {r['gen_length']} | {f['pruned_rows_mean']} | "
                f"{f['full_over_pruned_forward']:.1f} | {f['speedup_bound']:.1f}x |"
            )
    if report.get("pruned_attention"):
        lines += [
            "",
            "| queries | window keys | attention | ms per call | vs SDPA |",
            "|---|---|---|---|---|",
        ]
        for r in report["pruned_attention"]:
            lines.append(
                f"| {r['queries']} | {r['keys']} | {r['variant']} | {r['ms']:.3f} | {r['speedup_vs_sdpa']:.2f}x |"
            )
    trained = report.get("trained")
    if trained:
        lines += [
            "",
            f"| trained {trained['preset']} ({trained['examples']} prompts) | tokens/s | speed-up | accuracy "
            "| agreement with dense | steps per batch |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in trained["variants"].items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['accuracy']:.3f} | "
                f"{r['agreement_with_dense']:.3f} | {r['mean_steps_per_batch']:.2f} |"
            )
    return "\n".join(lines)


def _write(path: str | None, report: dict) -> str:
    text = json.dumps(report, indent=2)
    if path:
        from fastgen.io import write_text

        write_text(path, text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fastgen bench window [--quick] [--json PATH]``; prints a table and the JSON report."""
    p = argparse.ArgumentParser(prog="fastgen bench window", description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=["llada", "dream"], choices=sorted(SHAPES))
    p.add_argument("--prompt-length", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--gen-lengths", type=int, nargs="*", default=[256, 1024], help="default 256 1024")
    p.add_argument("--rounds", type=int, default=3, help="rounds at gen <= 256 (default 3)")
    p.add_argument("--long-rounds", type=int, default=1, help="rounds at gen > 256 (default 1)")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold (default 0.9)")
    p.add_argument("--agreement-up-to", type=int, default=256, help="full dense runs up to this gen length")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: prompt 64, gen 64, one round")
    p.add_argument("--json", default=None, help="also write the report to this path")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS, help="default: all")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--scale",
        default="tiny",
        choices=("tiny", "real"),
        help="tiny: the 4-layer bench shapes (default); real: LLaDA-8B / Dream-7B shapes, random weights (GPU)",
    )
    p.add_argument(
        "--pruned-attention", type=int, default=1, help="1: also time a pruned step's attention call alone"
    )
    p.add_argument(
        "--trained",
        type=int,
        default=None,
        help="held-out prompts for the trained rows (default 50, --quick 5; 0: skip)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompt_length, args.gen_lengths, args.rounds, args.long_rounds = 64, [64], 1, 1
    logging.basicConfig(level=logging.WARNING)
    rounds = {g: (args.rounds if g <= 256 else args.long_rounds) for g in args.gen_lengths}
    sparsed = SparseDConfig(skip=0.2, select=0.3, block_size=32 if args.quick else 128)
    report = run_window_bench(
        families=tuple(args.families),
        prompt_length=args.prompt_length,
        gen_lengths=tuple(args.gen_lengths),
        rounds=rounds,
        threshold=args.threshold,
        sparsed=sparsed,
        agreement_up_to=args.agreement_up_to,
        variants=tuple(args.variants),
        device=args.device,
        dtype=args.dtype,
        scale=args.scale,
        on_row=lambda partial: _write(args.json, partial),
    )
    if args.pruned_attention:
        shapes = ((16, 100), (31, 120)) if args.quick else ((16, 600), (31, 700), (50, 1100), (50, 1600))
        report["pruned_attention"] = pruned_attention_bench(shapes, rounds=2 if args.quick else 7)
        _write(args.json, report)
    trained = args.trained if args.trained is not None else (5 if args.quick else 50)
    if trained:
        report["trained"] = trained_bench(
            examples=trained, batch=min(10, trained), rounds=1 if args.quick else 3
        )
    report["loadavg_end"] = os.getloadavg()
    text = _write(args.json, report)
    sys.stdout.write(format_table(report) + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
