"""Window-Diffusion benchmark: tokens/s of dense one-token-per-step decoding vs Window-Diffusion, vs
Window-Diffusion + SparseD, vs Window-Diffusion + confidence-threshold decoding, on tiny models shaped
like LLaDA (Llama, MHA) and Dream (Qwen2, GQA, logit shift), with ``steps == gen_length``.

Per model and generation length the variants run interleaved in the same process, ``rounds`` times,
and the median wall-clock time is reported. A dense step costs the same at every step (the shape never
changes), so dense tokens/s is measured from ``dense_probe_steps`` full steps (1 token per step); the
full dense generation (for token agreement) runs once where ``--agreement`` asks for it. Next to the
measured speed-up: the FLOP ratio the run's plan predicts (rows and keys per step, from the trace), the
cache size, and the process's peak RSS.

Run: ``fastgen bench window`` (prompt 512, gen 256 and 1024, 3 rounds at 256, 1 at 1024);
``fastgen bench window --quick`` is the smoke test (prompt 64, gen 64, one round).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time

import torch

from fastgen.attention.window import predicted_flop_ratio
from fastgen.configs import SparseDConfig, WindowDiffusionConfig
from fastgen.metrics import token_agreement

logger = logging.getLogger(__name__)

SHAPES = {
    "llada": {"hidden": 512, "heads": 4, "kv_heads": 4, "head_dim": 128, "layers": 4, "mlp": 1536},
    "dream": {"hidden": 512, "heads": 4, "kv_heads": 2, "head_dim": 128, "layers": 4, "mlp": 1536},
}
"""Tiny model shapes: LLaDA-like (MHA) and Dream-like (GQA, attention biases, logit shift)."""

VOCAB = 256


def build_model(family: str, max_positions: int, device=None, dtype=None, seed: int = 0):
    """A tiny ``LlamaForCausalLM`` (``"llada"``) or ``Qwen2ForCausalLM`` (``"dream"``) pipeline, mask = last id."""
    from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

    shape = SHAPES[family]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
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

        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=shape["hidden"],
            intermediate_size=shape["mlp"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=max_positions,
            use_cache=False,
            initializer_range=0.1,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).eval()
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = VOCAB - 1
    return DiffusionLMPipeline(model.to(device=device, dtype=dtype), mask_token_id=VOCAB - 1)


def _timed(fn, **kwargs):
    """``(fn(**kwargs), wall seconds)``, synchronised on CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


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
        "results": [],
    }
    for family in families:
        shape = SHAPES[family]
        pipe = build_model(family, prompt_length + max(gen_lengths), device=device, dtype=dtype, seed=seed)
        report["device"] = str(pipe.device)
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, VOCAB - 1, (1, prompt_length), generator=g).to(pipe.device)
        wd = WindowDiffusionConfig().resolved(family)
        variants = {
            "window_diffusion": dict(acceleration=[wd]),
            "window_diffusion+sparsed": dict(acceleration=[wd, sparsed]),
            "window_diffusion+threshold": dict(acceleration=[wd], confidence_threshold=threshold),
        }
        # warm-up: first-call overheads (kernel builds, allocator) of every path
        warm = dict(gen_length=64, steps=64, progress=False, generator=seed)
        pipe(input_ids=input_ids[:, :64], **warm, block_length=64)
        for options in variants.values():
            pipe(input_ids=input_ids[:, :64], **warm, **options)
        for gen in gen_lengths:
            total = prompt_length + gen
            common = dict(input_ids=input_ids, gen_length=gen, progress=False, generator=seed)
            times = {"dense_step": []}
            outs = {}
            for _ in range(max(1, int(rounds.get(gen, 1)))):
                _, t = _timed(pipe, steps=dense_probe_steps, block_length=gen, **common)
                times["dense_step"].append(t / dense_probe_steps)
                for name, options in variants.items():
                    out, t = _timed(pipe, steps=gen, **common, **options)
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
                dense_out, t_full = _timed(pipe, steps=gen, block_length=gen, **common)
                dense_tokens = dense_out.sequences[0, prompt_length:].tolist()
                row["dense"]["full_run_s"] = t_full
            for name in variants:
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
            row["loadavg"] = os.getloadavg()
            report["results"].append(row)
            logger.info("window bench %s gen %d done", family, gen)
            if on_row is not None:
                on_row(report)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["loadavg_end"] = os.getloadavg()
    return report


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
        for name in ("window_diffusion", "window_diffusion+sparsed", "window_diffusion+threshold"):
            e = row[name]
            agreement = f"{e['token_agreement']:.3f}" if "token_agreement" in e else "-"
            lines.append(
                f"| {row['family']} | {row['gen_length']} | {name} | {e['tokens_per_s']:.1f} | {e['speedup']:.1f}x "
                f"| {e['predicted_flop_ratio']:.1f} | {e['steps_run']} | {agreement} |"
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
    args = p.parse_args(argv)
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
        device=args.device,
        dtype=args.dtype,
        on_row=lambda partial: _write(args.json, partial),
    )
    text = _write(args.json, report)
    sys.stdout.write(format_table(report) + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
