"""SparseD benchmark: end-to-end diffusion-LM generation sparse vs dense in one run, and the attention
op alone at long context (SparseD pattern + block-sparse attention vs SDPA, with error).

The end-to-end model is an attention-bound Llama (hidden 512, 4 heads x 128, 2 layers, small MLP and
vocabulary) run by :class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline`. Speed is a ratio of
wall-clock times measured in the same process; token agreement compares the generated tokens.

Run: ``python -m fastgen.bench.sparsed`` (defaults: prompt 8192, gen 64, steps 16, block 64, skip 0.2,
select 0.3; op at 16k and 32k). ``--small`` runs a configuration that takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

import torch

from fastgen.attention.sparsed import compute_sparsed_pattern, dense_step_count, sparsed_attention
from fastgen.bench._timing import timed
from fastgen.configs import SparseDConfig
from fastgen.metrics import token_agreement

logger = logging.getLogger(__name__)


def _interleaved(fns: dict, device: torch.device, rounds: int) -> tuple[dict, dict]:
    """Run every function of ``fns`` once per round, in turn, ``rounds`` times: ``(last results,
    median wall-clock seconds)`` per name, all measured under the same load."""
    samples = {name: [] for name in fns}
    results = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            results[name], seconds = timed(fn, device)
            samples[name].append(seconds)
    return results, {name: statistics.median(x) for name, x in samples.items()}


def structured_qkv(
    length: int, heads: int = 4, head_dim: int = 128, device=None, dtype=torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Long-context q/k/v ``[1, H, N, D]`` with LM-like structure: smooth content (local heads), a few
    sink keys, and 1D RoPE; random q/k would give near-uniform attention that says little."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(1, heads, length, head_dim, generator=g).cumsum(2)
    content = content / content.std(dim=2, keepdim=True)  # smooth along tokens
    q = content + 0.5 * torch.randn(1, heads, length, head_dim, generator=g)
    k = content + 0.5 * torch.randn(1, heads, length, head_dim, generator=g)
    k[:, :, :4] *= 3.0  # sink keys
    pos = torch.arange(length, dtype=torch.float32)
    freqs = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    theta = pos[:, None] * freqs
    cos, sin = theta.cos(), theta.sin()

    def rope(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    v = torch.randn(1, heads, length, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (rope(q) * 1.5, rope(k) * 1.5, v))


def bench_op(
    length: int,
    *,
    select: float,
    block_size: int,
    heads: int = 4,
    head_dim: int = 128,
    device=None,
    dtype=None,
    rounds: int = 3,
) -> dict:
    """Pattern computation + SparseD attention vs SDPA on one structured input of ``length`` tokens
    (wall clock, interleaved rounds, medians)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    q, k, v = structured_qkv(length, heads, head_dim, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        sdpa(q[:, :, :256], k, v)  # warm-up
        pattern = compute_sparsed_pattern(q, k, select=select, block_size=block_size)
        sparsed_attention(q[:, :, :block_size], k, v, pattern.block_mask[:, :, :1], block_size)  # warm-up
        results, seconds = _interleaved(
            {
                "sdpa": lambda: sdpa(q, k, v),
                "pattern": lambda: compute_sparsed_pattern(q, k, select=select, block_size=block_size),
                "sparse": lambda: sparsed_attention(q, k, v, pattern.block_mask, block_size),
            },
            device,
            rounds,
        )
    dense, sparse = results["sdpa"].float(), results["sparse"].float()
    err = (sparse - dense).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt()
    return {
        "length": length,
        "density": pattern.density,
        "sdpa_s": seconds["sdpa"],
        "pattern_s": seconds["pattern"],
        "sparse_s": seconds["sparse"],
        "speedup": seconds["sdpa"] / seconds["sparse"],
        "rel_rmse": float(err),
        "rounds": rounds,
    }


def _end_to_end(pipe, input_ids: torch.Tensor, config: SparseDConfig, common: dict, rounds: int) -> dict:
    """Dense and SparseD generations of ``input_ids`` interleaved over ``rounds`` (after a warm-up at a small
    length: first-call overheads of both paths): median times, speed-up, token agreement, dense steps."""
    warm = input_ids[:, : min(input_ids.shape[1], 4 * config.block_size)]
    pipe(input_ids=warm, **common)
    pipe(input_ids=warm, acceleration=[config], **common)
    runs, seconds = _interleaved(
        {
            "dense": lambda: pipe(input_ids=input_ids, **common),
            "sparse": lambda: pipe(input_ids=input_ids, acceleration=[config], **common),
        },
        pipe.device,
        rounds,
    )
    dense, sparse = runs["dense"], runs["sparse"]
    t_dense, t_sparse = seconds["dense"], seconds["sparse"]
    p = dense.prompt_length
    return {
        "prompt_length": input_ids.shape[1],
        "gen_length": common["gen_length"],
        "steps": common["steps"],
        "block_length": common["block_length"],
        "config": config.to_dict(),
        "dense_s": t_dense,
        "sparse_s": t_sparse,
        "speedup": t_dense / t_sparse,
        "token_agreement": token_agreement(dense.sequences[0, p:].tolist(), sparse.sequences[0, p:].tolist()),
        "dense_steps": dense_step_count(config.skip, common["steps"]),
    }


def run_sparsed_bench(
    *,
    prompt_length: int = 8192,
    gen_length: int = 64,
    steps: int = 16,
    block_length: int = 64,
    skip: float = 0.2,
    select: float = 0.3,
    block_size: int = 128,
    hidden: int = 512,
    heads: int = 4,
    head_dim: int = 128,
    layers: int = 2,
    op_lengths: tuple[int, ...] = (16384, 32768),
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    backend: str | None = None,
    rounds: int = 3,
) -> dict:
    """End-to-end sparse vs dense generation (speedup, token agreement) and the op at ``op_lengths``;
    wall clock, dense and sparse interleaved in each of ``rounds`` rounds, medians."""
    from fastgen.attention import set_default_backend
    from fastgen.pipelines.tiny_lm import build_attention_bound_llama

    set_default_backend(backend)
    try:
        pipe = build_attention_bound_llama(
            hidden=hidden,
            heads=heads,
            head_dim=head_dim,
            layers=layers,
            max_positions=prompt_length + gen_length,
            device=device,
            dtype=dtype,
            seed=seed,
        )
        dev = pipe.device
        vocab = pipe.model.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab - 1, (1, prompt_length), generator=g).to(dev)
        config = SparseDConfig(skip=skip, select=select, block_size=block_size)
        common = dict(
            gen_length=gen_length, steps=steps, block_length=block_length, generator=seed, progress=False
        )
        end_to_end = _end_to_end(pipe, input_ids, config, common, rounds)
        result = {
            "device": str(dev),
            "dtype": str(pipe.dtype),
            "threads": torch.get_num_threads(),
            "clock": f"wall clock, {rounds} interleaved rounds, median",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "backend": backend or "auto",
            "end_to_end": end_to_end,
            "op": [
                bench_op(
                    n,
                    select=select,
                    block_size=block_size,
                    heads=heads,
                    head_dim=head_dim,
                    device=dev,
                    rounds=rounds,
                )
                for n in op_lengths
            ],
        }
    finally:
        set_default_backend(None)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m fastgen.bench.sparsed [--small] [--json PATH]``; prints a JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-length", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--gen-length", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps (default 16)")
    p.add_argument(
        "--block-length", type=int, default=64, help="semi-autoregressive block length (default 64)"
    )
    p.add_argument(
        "--skip", type=float, default=0.2, help="SparseD: fraction of steps run dense (default 0.2)"
    )
    p.add_argument(
        "--select", type=float, default=0.3, help="SparseD: fraction of key blocks kept (default 0.3)"
    )
    p.add_argument("--block-size", type=int, default=128, help="attention block size (default 128)")
    p.add_argument(
        "--op-lengths", type=int, nargs="*", default=[16384, 32768], help="lengths for the op-only comparison"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU)")
    p.add_argument(
        "--backend", default=None, help="block-sparse backend (torch, gather, flex, triton; default auto)"
    )
    p.add_argument(
        "--small", action="store_true", help="prompt 2048, op at 8192 only (about a minute on CPU)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median; default 3)")
    p.add_argument("--json", default=None, help="also write the report to this path")
    args = p.parse_args(argv)
    if args.small:
        args.prompt_length, args.op_lengths = 2048, [8192]
    logging.basicConfig(level=logging.WARNING)
    result = run_sparsed_bench(
        prompt_length=args.prompt_length,
        gen_length=args.gen_length,
        steps=args.steps,
        block_length=args.block_length,
        skip=args.skip,
        select=args.select,
        block_size=args.block_size,
        op_lengths=tuple(args.op_lengths),
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        rounds=args.rounds,
    )
    text = json.dumps(result, indent=2)
    if args.json:
        from fastgen.io import write_text

        write_text(args.json, text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
