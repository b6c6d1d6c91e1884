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
from fastgen.configs import SparseDConfig, WindowDiffusionConfig
from fastgen.metrics import token_agreement

logger = logging.getLogger(__name__)

SHAPES = {
    "llada": {"hidden": 512, "heads": 4, "kv_heads": 4, "head_dim": 128, "layers": 4, "mlp": 1536},
    "dream": {"hidden": 512, "heads": 4, "kv_heads": 2, "head_dim": 128, "layers": 4, "mlp": 1536},
}
"""Tiny model shapes: LLaDA-like (MHA) and Dream-like (GQA, attention biases, logit shift)."""

VOCAB = 256

REAL_SHAPES = {
    "llada": {
        "hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128, "layers": 32, "mlp": 12288,
        "vocab": 126464, "mask_token_id": 126336, "rope_theta": 500000.0,
    },
    "dream": {
        "hidden": 3584, "heads": 28, "kv_heads": 4, "head_dim": 128, "layers": 28, "mlp": 18944,
        "vocab": 152064, "mask_token_id": 151666, "rope_theta": 1000000.0,
    },
}  # fmt: skip
"""``--scale real``: the published LLaDA-8B and Dream-7B (Qwen2.5-7B) shapes, vocabularies and mask ids,
with random weights (a GPU measurement: 16 / 15 GB in bf16; no checkpoint is read)."""

VARIANTS = ("window_diffusion", "window_diffusion+sparsed", "window_diffusion+threshold")
"""The accelerated variants timed against dense (one token per step)."""


def build_model(family: str, max_positions: int, device=None, dtype=None, seed: int = 0, scale: str = "tiny"):
    """A tiny ``LlamaForCausalLM`` (``"llada"``) or ``Qwen2ForCausalLM`` (``"dream"``) pipeline, mask = last id;
    ``scale="real"``: the published model's shape (:data:`REAL_SHAPES`), random weights made on ``device``."""
    from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if scale == "real":
        return _build_real(family, max_positions, device, dtype, seed)
    if scale != "tiny":
        raise ValueError(f"scale={scale!r}: allowed 'tiny' or 'real'")
    shape = SHAPES[family]
    if family == "llada":
        from fastgen.pipelines.tiny_lm import build_tiny_llama

        model = build_tiny_llama(
            VOCAB,
            hidden=shape["hidden"],
            heads=shape["heads"],
            head_dim=shape["head_dim"],
            layers=shape["layers"],
            intermediate=shape["mlp"],
            max_positions=max_positions,
            seed=seed,
        )
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**_config_fields(shape, VOCAB, max_positions), initializer_range=0.1)
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).eval()
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = VOCAB - 1
    return DiffusionLMPipeline(model.to(device=device, dtype=dtype), mask_token_id=VOCAB - 1)


def _config_fields(shape: dict, vocab: int, max_positions: int) -> dict:
    """The transformers config fields of a bench shape (shared by the Llama and Qwen2 configs)."""
    return dict(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max_positions,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def _build_real(family: str, max_positions: int, device, dtype, seed: int):
    """The published shape of ``family`` with random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, Qwen2Config

    from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

    if family not in REAL_SHAPES:
        raise ValueError(f"family={family!r}: allowed {', '.join(REAL_SHAPES)}")
    shape = REAL_SHAPES[family]
    common = _config_fields(shape, shape["vocab"], max_positions)
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    if family == "llada":
        from transformers import LlamaForCausalLM as cls

        config = LlamaConfig(head_dim=shape["head_dim"], **common)
    else:
        from transformers import Qwen2ForCausalLM as cls

        config = Qwen2Config(**common)
    config._attn_implementation = "sdpa"
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=fork_devices), torch.device(device):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype).eval()
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = shape["mask_token_id"]
    return DiffusionLMPipeline(model, mask_token_id=shape["mask_token_id"])


def _forward_cost_ratio(model, total: int, rows: int, rounds: int = 3) -> float:
    """Wall time of a plain forward over ``total`` tokens over one over ``rows`` tokens (interleaved,
    median of ``rounds``): what a pruned step of ``rows`` rows can cost at best relative to a dense step
    on this machine (small matrix products stream the same weights for fewer rows)."""
    from fastgen.pipelines.diffusion_lm import bidirectional_mask

    times = {total: [], rows: []}
    with torch.no_grad():
        for _ in range(rounds):
            for n in (total, rows):
                ids = torch.zeros(1, n, dtype=torch.long, device=model.device)
                positions = torch.arange(n, device=model.device)[None]
                mask = bidirectional_mask(
                    torch.ones(1, n, dtype=torch.bool, device=model.device), model.dtype
                )
                calls = 1 if n == total else max(1, min(20, total // max(rows, 1)))
                forward = functools.partial(
                    model, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                )
                times[n].append(time_per_call(forward, calls, model.device))
    return statistics.median(times[total]) / statistics.median(times[rows])


def _plan_flops(out, total: int, shape: dict) -> float:
    trace = out.window_trace or []
    queries = [t["queries"] for t in trace]
    keys = [t["keys"] for t in trace]
    return predicted_flop_ratio(total, queries, keys, hidden=shape["hidden"], mlp=shape["mlp"])


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
        wd = WindowDiffusionConfig().resolved(family)
        every = {
            "window_diffusion": dict(acceleration=[wd]),
            "window_diffusion+sparsed": dict(acceleration=[wd, sparsed]),
            "window_diffusion+threshold": dict(acceleration=[wd], confidence_threshold=threshold),
        }
        unknown = set(variants) - set(every)
        if unknown or not variants:
            raise ValueError(f"variants={variants!r}: allowed a non-empty subset of {', '.join(every)}")
        variants_here = {name: every[name] for name in variants}
        # warm-up: first-call overheads (kernel builds, allocator) of every path
        warm_gen = min(64, min(gen_lengths))  # fits the model's positions (prompt + longest generation)
        warm = dict(gen_length=warm_gen, steps=warm_gen, progress=False, generator=seed)
        pipe(input_ids=input_ids[:, :64], **warm, block_length=warm_gen)
        for options in variants_here.values():
            pipe(input_ids=input_ids[:, :64], **warm, **options)
        for gen in gen_lengths:
            total = prompt_length + gen
            common = dict(input_ids=input_ids, gen_length=gen, progress=False, generator=seed)
            times = {"dense_step": []}
            outs = {}
            for _ in range(max(1, int(rounds.get(gen, 1)))):
                _, t = timed(functools.partial(pipe, steps=dense_probe_steps, block_length=gen, **common))
                times["dense_step"].append(t / dense_probe_steps)
                for name, options in variants_here.items():
                    out, t = timed(functools.partial(pipe, steps=gen, **common, **options))
                    times.setdefault(name, []).append(t)
                    outs[name] = out
            dense_step = statistics.median(times["dense_step"])
            dense_tps = 1.0 / dense_step
            row = {
                "family": family,
                "shape": shape,
                "gen_length": gen,
                "steps": gen,
                "rounds": len(times["dense_step"]),
                "dense": {"seconds_per_step": dense_step, "tokens_per_s": dense_tps},
                "window_config": wd.to_dict(),
                "sparsed_config": sparsed.to_dict(),
                "threshold": threshold,
                "kv_cache_mib": 2
                * shape["layers"]
                * shape["kv_heads"]
                * (total + 1)
                * shape["head_dim"]
                * torch.finfo(pipe.dtype).bits
                / 8
                / 2**20,
            }
            dense_tokens = None
            if gen <= agreement_up_to:
                dense_out, t_full = timed(functools.partial(pipe, steps=gen, block_length=gen, **common))
                dense_tokens = dense_out.sequences[0, prompt_length:].tolist()
                row["dense"]["full_run_s"] = t_full
            for name in variants_here:
                seconds = statistics.median(times[name])
                out = outs[name]
                entry = {
                    "seconds": seconds,
                    "tokens_per_s": gen / seconds,
                    "speedup": (gen / seconds) / dense_tps,
                    "predicted_flop_ratio": _plan_flops(out, total, shape),
                    "steps_run": out.steps_run,
                    "refresh_steps": sum(1 for t in out.window_trace or [] if t["refresh"]),
                }
                if dense_tokens is not None:
                    entry["token_agreement"] = token_agreement(
                        dense_tokens, out.sequences[0, prompt_length:].tolist()
                    )
                row[name] = entry
            first = row[next(iter(variants_here))]
            trace = outs[next(iter(variants_here))].window_trace or []
            pruned_rows = [t["queries"] for t in trace if not t["refresh"]]
            if pruned_rows:
                rows_run = round(statistics.mean(pruned_rows))
                ratio = _forward_cost_ratio(pipe.model, total, rows_run, rounds=3)
                # refresh steps in dense-step units (Dream rules run a prefix: its share of the tokens)
                refreshes = sum(t["queries"] / total for t in trace if t["refresh"])
                row["forward_cost"] = {
                    "pruned_rows_mean": rows_run,
                    "full_over_pruned_forward": ratio,
                    # the speed-up if a pruned step cost exactly a plain forward of its rows
                    "speedup_bound": first["steps_run"] / (refreshes + len(pruned_rows) / ratio),
                }
            row["loadavg"] = os.getloadavg()
            report["results"].append(row)
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
