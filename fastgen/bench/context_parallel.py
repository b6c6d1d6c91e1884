"""Benchmark: per-rank attention time under diffusers-style Ulysses context parallelism, dense vs
Rectified SpaAttn, against the single-process ratio at the same density (``fastgen bench cp``).

Run under torchrun (one process per rank; gloo on CPU, nccl on CUDA)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m fastgen.bench.context_parallel \\
        --tokens 8192 --heads 8 --head-dim 64 --sparsity 0.8 --rounds 11

Every rank builds the same synthetic video workload (``fastgen.bench.attention.make_workload``, all
``H`` heads over all ``S`` tokens) and takes its token share ``[S/P]``, as diffusers' plan hands it
to a self-attention layer. One round times, in this order and with a barrier before each call so
the ranks run together:

1. single process, dense (SDPA over all heads and tokens) and sparse (``rectified_attention``);
2. under CP, dense and sparse: the Ulysses all-to-all in (q, k, v), the attention of the rank's
   ``H/P`` heads over all tokens, the all-to-all out (the path of
   :mod:`fastgen.processors.context_parallel`), each part timed.

Reported (medians over rounds, the slowest rank's time for CP, the load average): the single-process
ratio sparse/dense, the CP ratio of the attention alone (the exchange is the same for both and is
reported apart as its share of the CP step) and of the whole step, and whether the CP attention
ratio is within 10% of the single-process one; also that comparison made round by round (median and
quartiles), which a load swing between rounds does not move. The sparse outputs under CP are checked against the
single-process ones for the rank's heads while timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastgen.bench.attention import _load_average, make_workload


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, barrier) -> tuple[object, float]:
    barrier()
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


NAMES = (
    "single_dense",
    "single_sparse",
    "cp_dense_in",
    "cp_dense_attn",
    "cp_dense_out",
    "cp_sparse_in",
    "cp_sparse_attn",
    "cp_sparse_out",
)
"""The timed parts: one device alone, then per attention kind the exchange in, the attention, the exchange out."""


def _ulysses_layout(rank: int, world: int):
    """Ulysses over every rank of the default group (no ring)."""
    import torch.distributed as dist

    from fastgen.processors.context_parallel import ContextParallelLayout

    return ContextParallelLayout(
        ulysses=world,
        ring=1,
        ulysses_rank=rank,
        ring_rank=0,
        rank=rank,
        world=world,
        ulysses_group=dist.group.WORLD,
        ring_group=None,
        uneven=False,
    )


def _calls(w, config, layout, local: list) -> dict:
    """The calls the bench times: dense and Rectified attention on one device (whole workload ``w``), the
    all-to-all in (``local``: this rank's share of the sequence), the attention on this rank's heads, the
    all-to-all out."""
    import torch.nn.functional as F

    from fastgen.attention.rectified import rectified_attention
    from fastgen.processors.context_parallel import heads_to_sequence, sequence_to_heads

    return {
        "dense_single": lambda: F.scaled_dot_product_attention(w.q, w.k, w.v),
        "sparse_single": lambda: rectified_attention(w.q, w.k, w.v, config, grid=w.grid, return_stats=True),
        "exchange_in": lambda: [
            heads_to_sequence(t, layout).transpose(1, 2) for t in local
        ],  # [B, H/P, S, D]
        "dense": lambda qkv: F.scaled_dot_product_attention(*qkv),
        "sparse": lambda qkv: rectified_attention(*qkv, config, grid=w.grid),
        "exchange_out": lambda out: sequence_to_heads(out.transpose(1, 2), layout),
    }


def _measure(calls: dict, args: argparse.Namespace, device, heads_slice: tuple[int, int]):
    """``args.warmup`` then ``args.rounds`` rounds of every call (a barrier before each); returns the recorded
    times by :data:`NAMES`, the density and the largest error of the sparse context-parallel output against
    the single-device one (on this rank's heads, ``heads_slice``)."""
    import torch.distributed as dist

    def barrier():
        dist.barrier()

    times: dict[str, list[float]] = {n: [] for n in NAMES}
    density = None
    max_err = 0.0
    for round_index in range(args.warmup + args.rounds):
        record = round_index >= args.warmup
        measured = {}
        _, measured["single_dense"] = _timed(calls["dense_single"], device, barrier)
        (single_out, stats), measured["single_sparse"] = _timed(calls["sparse_single"], device, barrier)
        for kind in ("dense", "sparse"):
            qkv, measured[f"cp_{kind}_in"] = _timed(calls["exchange_in"], device, barrier)
            out, measured[f"cp_{kind}_attn"] = _timed(
                lambda qkv=qkv, fn=calls[kind]: fn(qkv), device, barrier
            )
            _, measured[f"cp_{kind}_out"] = _timed(
                lambda out=out: calls["exchange_out"](out), device, barrier
            )
            if kind == "sparse":
                ref = single_out[:, heads_slice[0] : heads_slice[1]].float()
                max_err = max(max_err, float((out.float() - ref).norm() / ref.norm()))
        density = float(stats["density"])
        if record:
            for name, seconds in measured.items():
                times[name].append(seconds)
    return times, density, max_err


def _cp_times(slowest: dict) -> dict:
    """Per attention kind: the slowest rank's attention, exchange (in + out), total and communication share."""
    cp = {}
    for kind in ("dense", "sparse"):
        exchange = slowest[f"cp_{kind}_in"] + slowest[f"cp_{kind}_out"]
        total = exchange + slowest[f"cp_{kind}_attn"]
        cp[kind] = {"attention_s": slowest[f"cp_{kind}_attn"], "exchange_s": exchange, "total_s": total}
        cp[kind]["communication_share"] = exchange / total
    return cp


def _paired_ratio_vs_single(times_by_rank: list[dict], rounds: int) -> dict:
    """The CP attention ratio over the single-process ratio, round by round (each round's four calls ran
    back to back, so a load swing shared by them cancels), slowest rank per call: median and quartiles."""
    per_round = []
    for i in range(rounds):
        t = {n: max(times[n][i] for times in times_by_rank) for n in NAMES}
        cp = t["cp_sparse_attn"] / t["cp_dense_attn"]
        per_round.append(cp / (t["single_sparse"] / t["single_dense"]))
    if len(per_round) == 1:
        return {"median": per_round[0], "q1": per_round[0], "q3": per_round[0]}
    q1, median, q3 = statistics.quantiles(per_round, n=4)
    return {"median": statistics.median(per_round), "q1": q1, "q3": q3}


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark on this rank (``torch.distributed`` initialised); the report on every rank."""
    import torch.distributed as dist

    from fastgen.configs import RectifiedSpaAttnConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if args.heads % world or args.tokens % world:
        raise ValueError(
            f"--heads={args.heads} and --tokens={args.tokens} must be multiples of the {world} ranks (Ulysses)"
        )
    dtype = getattr(torch, args.dtype)
    w = make_workload(
        "video", heads=args.heads, head_dim=args.head_dim, tokens=args.tokens, dtype=dtype, device=device
    )
    config = RectifiedSpaAttnConfig(sparsity=args.sparsity, block_size=args.block_size)
    share = args.tokens // world
    local = [t.transpose(1, 2)[:, rank * share : (rank + 1) * share].contiguous() for t in (w.q, w.k, w.v)]
    calls = _calls(w, config, _ulysses_layout(rank, world), local)
    heads = args.heads // world
    times, density, max_err = _measure(calls, args, device, heads_slice=(rank * heads, (rank + 1) * heads))
    medians = {n: statistics.median(v) for n, v in times.items()}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, {"medians": medians, "err": max_err, "times": times})
    slowest = {n: max(g["medians"][n] for g in gathered) for n in NAMES}
    paired = _paired_ratio_vs_single([g["times"] for g in gathered], args.rounds)
    cp = _cp_times(slowest)
    single_ratio = slowest["single_sparse"] / slowest["single_dense"]
    cp_ratio = cp["sparse"]["attention_s"] / cp["dense"]["attention_s"]
    return {
        "world": world,
        "device": str(device),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "grid": list(w.grid),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "sparsity": args.sparsity,
        "block_size": args.block_size,
        "density": density,
        "rounds": args.rounds,
        "single": {
            "dense_s": slowest["single_dense"],
            "sparse_s": slowest["single_sparse"],
            "ratio": single_ratio,
        },
        "cp": cp,
        "cp_attention_ratio": cp_ratio,
        "cp_total_ratio": cp["sparse"]["total_s"] / cp["dense"]["total_s"],
        "attention_ratio_vs_single": cp_ratio / single_ratio,
        "within_10_percent": abs(cp_ratio / single_ratio - 1.0) <= 0.10,
        "paired_ratio_vs_single": paired,
        "max_rel_err_vs_single": max(g["err"] for g in gathered),
        "loadavg": _load_average(),
    }


def format_report(result: dict) -> str:
    """The report as a few readable lines."""
    cp, single, paired = result["cp"], result["single"], result["paired_ratio_vs_single"]
    return "\n".join(
        [
            f"context parallel (Ulysses) bench: {result['world']} ranks on {result['device']}, {result['tokens']} "
            f"tokens grid {tuple(result['grid'])}, {result['heads']} heads x {result['head_dim']}, {result['dtype']}, "
            f"density {result['density']:.3f}, {result['rounds']} rounds, load {result['loadavg']}",
            f"single process: dense {single['dense_s'] * 1e3:.1f} ms, sparse {single['sparse_s'] * 1e3:.1f} ms, "
            f"ratio {single['ratio']:.3f}",
            f"CP per rank (slowest): dense {cp['dense']['attention_s'] * 1e3:.1f} ms + exchange "
            f"{cp['dense']['exchange_s'] * 1e3:.1f} ms (comm share {cp['dense']['communication_share']:.1%}); "
            f"sparse {cp['sparse']['attention_s'] * 1e3:.1f} ms + exchange {cp['sparse']['exchange_s'] * 1e3:.1f} ms "
            f"(comm share {cp['sparse']['communication_share']:.1%})",
            f"ratio sparse/dense under CP: attention {result['cp_attention_ratio']:.3f} "
            f"({result['attention_ratio_vs_single']:.3f}x the single-process ratio; within 10%: "
            f"{result['within_10_percent']}), whole step {result['cp_total_ratio']:.3f}; "
            f"max rel err vs single {result['max_rel_err_vs_single']:.1e}",
            f"round by round, CP ratio / single-process ratio: median {paired['median']:.3f} "
            f"(quartiles {paired['q1']:.3f}-{paired['q3']:.3f})",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """``fastgen bench cp`` (run under torchrun): print the report on rank 0 (``--json`` for JSON)."""
    import torch.distributed as dist

    parser = argparse.ArgumentParser(prog="fastgen bench cp", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, default=8192, help="video tokens of the layer (multiple of ranks)"
    )
    parser.add_argument("--heads", type=int, default=8, help="attention heads (multiple of ranks)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.8, help="Rectified SpaAttn sparsity")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the report here (rank 0)")
    args = parser.parse_args(argv)
    owns_group = not dist.is_initialized()
    if owns_group:
        if "RANK" not in os.environ:
            parser.error(
                "run under torchrun: python -m torch.distributed.run --nproc-per-node N -m fastgen.bench.context_parallel"
            )
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        result = run(args)
        if dist.get_rank() == 0:
            print(format_report(result), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(result, fh, indent=2)
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
