"""Fidelity benchmark of Rectified SpaAttn: error of every variant against dense attention, on
structured video-like workloads (3D RoPE over smooth content, spatial / temporal / mixed heads, sink
keys, optional padded text), with the keys each query attends to counted (extra keys included) so
that methods are compared at equal work.

Every variant switches on one idea at a time (pooled compensation, sub-block selection, isolated
outlier keys, the paper's output form, the authors' selection), and ``topk@keys`` is plain top-k
given as many keys per query as the default attends to (block budget raised to match): the honest
baseline for the default.

Run: ``python -m fastgen.bench.fidelity`` (CPU, well under a minute at the default shapes);
``--cost`` times selection and attention of plain top-k and of the default separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import torch

from fastgen.attention import dense_attention
from fastgen.attention.rectified import rectified_sparse_attention
from fastgen.bench._timing import time_call

logger = logging.getLogger(__name__)

VARIANTS: dict[str, dict] = {
    "topk": {"form": "none", "selection": "pooled", "isolated_keys": 0.0},
    "pooled-comp": {"form": "exact", "selection": "pooled", "isolated_keys": 0.0},
    "subblock-sel": {"form": "none", "selection": "subblock", "isolated_keys": 0.0},
    "isolated": {"form": "none", "selection": "pooled", "isolated_keys": 1.0},
    "default": {},
    "paper-form": {"form": "paper", "selection": "pooled"},
    "paper-sel": {"form": "none", "selection": "paper"},
    "paper": {"form": "paper", "selection": "paper"},
    "default+iso2": {"isolated_keys": 2.0},
    "default+split16": {"pool_splits": 16},
}
"""Named option sets of :func:`rectified_sparse_attention`, one idea each. ``topk`` (the baseline
the ``/ top-k`` column divides by) is plain block-sparse attention with the paper's pooled estimate;
``pooled-comp`` adds only the pooled compensation keys (exact form), ``subblock-sel`` only the
sub-block estimate, ``isolated`` only the isolated outlier keys; ``default`` is the op's defaults (all
three); ``paper-form`` is the paper's output combination with top-k selection, ``paper-sel`` the
authors' selection rule without rectification, ``paper`` both (the paper-faithful method)."""

MATCHED = "topk@keys"
"""Plain top-k with its block budget raised until it attends to at least as many keys per query as
``default`` (reported when both ``topk`` and ``default`` run)."""

HEAD_KINDS = ("spatial", "temporal", "mixed")


def _rope_3d(x: torch.Tensor, grid: tuple[int, int, int], base: float = 10000.0) -> torch.Tensor:
    """3D rotary embedding of ``x`` ``[B, H, N, D]`` over raster positions of ``grid``: the head dim is
    split into (t, h, w) parts of D/4, 3D/8, 3D/8 channels (as in Wan / HunyuanVideo)."""
    f, h, w = grid
    d = x.shape[-1]
    dims = (d // 4, 3 * d // 8, d - d // 4 - 3 * d // 8)
    pos = torch.stack(
        torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    angles = []
    for axis, dim in enumerate(dims):
        freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(pos[:, axis, None].float() * freqs)
    theta = torch.cat(angles, dim=-1)  # [N, D/2]
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def _axis_channels(d: int) -> list[slice]:
    """Channel ranges of the (t, h, w) parts of the head dim, matching :func:`_rope_3d`."""
    dt, dh = d // 4, 3 * d // 8
    return [slice(0, dt), slice(dt, dt + dh), slice(dt + dh, d)]


def _head_positions(kinds: list[str], d: int, locality: float, gen: torch.Generator) -> torch.Tensor:
    """Each head's constant positional component ``[H, D]`` on the RoPE axes its kind lives on, scaled so that
    a query meets its own position with logit ``locality``."""
    amplitude = {"spatial": (1.0, 0.6, 0.6), "temporal": (0.0, 1.0, 1.0), "mixed": (0.6, 0.7, 0.7)}
    position = torch.zeros(len(kinds), d)
    for i, kind in enumerate(kinds):
        base = torch.randn(d, generator=gen).abs() + 0.5
        for axis, sl in enumerate(_axis_channels(d)):
            position[i, sl] = base[sl] * amplitude[kind][axis]
        position[i] *= math.sqrt(locality * math.sqrt(d)) / position[i].norm()
    return position


def structured_video_workload(
    grid: tuple[int, int, int] = (8, 16, 16),
    heads: int = 4,
    head_dim: int = 64,
    batch: int = 1,
    text_tokens: int = 0,
    padded_text: int = 0,
    sinks: int = 4,
    locality: float = 8.0,
    content: float = 1.0,
    seed: int = 0,
) -> dict:
    """Seeded video-like q/k/v ``[B, H, N, D]`` (video tokens in raster order, then text).

    Each head is ``spatial`` (attends within its frame, near in space), ``temporal`` (same place
    across frames) or ``mixed`` (near in space and time): a constant per-axis component rotated by
    3D RoPE gives locality along the axes it lives on; smooth content (low-resolution noise
    upsampled over the grid, projected per head) adds data-dependent structure; ``sinks`` keys of the
    first frame carry a strong shared direction every query aligns with. ``padded_text`` of the
    ``text_tokens`` trailing text tokens are marked False in ``key_padding_mask``.

    Returns a dict with ``q``, ``k``, ``v``, ``key_padding_mask`` (or None), ``grid``,
    ``num_text_tokens`` and ``head_kinds``.
    """
    gen = torch.Generator().manual_seed(seed)
    f, h, w = grid
    n_video = f * h * w
    d = head_dim
    channels = 16
    low = torch.randn(batch, channels, max(2, f // 2), max(2, h // 4), max(2, w // 4), generator=gen)
    field = torch.nn.functional.interpolate(low, size=(f, h, w), mode="trilinear", align_corners=True)
    field = field.flatten(2).transpose(1, 2)  # [B, Nv, C]
    field = field + 0.1 * torch.randn(field.shape, generator=gen)

    def project() -> torch.Tensor:
        weight = torch.randn(heads, channels, d, generator=gen) / math.sqrt(channels)
        return torch.einsum("bnc,hcd->bhnd", field, weight)

    kinds = [HEAD_KINDS[i % len(HEAD_KINDS)] for i in range(heads)]
    position = _head_positions(kinds, d, locality, gen)[None, :, None, :]
    qv = _rope_3d(content * project() + position, grid)
    kv = _rope_3d(content * project() + position, grid)
    vv = project() + 0.3 * torch.randn(batch, heads, n_video, d, generator=gen)

    # attention sinks: a few first-frame keys share a direction every query leans towards
    sink_dir = torch.randn(heads, d, generator=gen)
    sink_dir = sink_dir / sink_dir.norm(dim=-1, keepdim=True)
    qv = qv + 1.5 * sink_dir[None, :, None, :]
    sink_idx = torch.randperm(h * w, generator=gen)[:sinks]
    kv[:, :, sink_idx] += 2.7 * math.sqrt(d) * sink_dir[None, :, None, :]  # sink logit ~ +4

    # text keys: a shared direction every video query leans towards, plus noise (logit ~ +3.75)
    text_dir = torch.randn(heads, d, generator=gen)
    text_dir = text_dir / text_dir.norm(dim=-1, keepdim=True)
    qv = qv + 1.5 * text_dir[None, :, None, :]
    tq = torch.randn(batch, heads, text_tokens, d, generator=gen)
    tk = (
        torch.randn(batch, heads, text_tokens, d, generator=gen)
        + 2.5 * math.sqrt(d) * text_dir[None, :, None, :]
    )
    tv = torch.randn(batch, heads, text_tokens, d, generator=gen)
    mask = None
    if text_tokens:
        mask = torch.ones(batch, n_video + text_tokens, dtype=torch.bool)
        if padded_text:
            mask[:, n_video + text_tokens - padded_text :] = False
    return {
        "q": torch.cat([qv, tq], dim=2),
        "k": torch.cat([kv, tk], dim=2),
        "v": torch.cat([vv, tv], dim=2),
        "key_padding_mask": mask,
        "grid": grid,
        "num_text_tokens": text_tokens,
        "head_kinds": kinds,
    }


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error and cosine similarity over the whole output (fp32)."""
    a, e = out.float().flatten(), ref.float().flatten()
    rel = ((a - e).norm() / e.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, e, dim=0).item()
    return rel, cos


def run_fidelity(
    sparsities: tuple[float, ...] = (0.8, 0.9),
    variants: tuple[str, ...] = tuple(VARIANTS),
    grid: tuple[int, int, int] = (8, 16, 16),
    heads: int = 4,
    head_dim: int = 64,
    block_size: int = 64,
    text_tokens: int = 32,
    padded_text: int = 12,
    seeds: tuple[int, ...] = (0,),
    reorder: bool = True,
    sinks: int = 4,
    locality: float = 8.0,
    workload: str = "local",
) -> list[dict]:
    """Rel. L2 error and cosine similarity vs dense of each variant at each sparsity.

    Returns one row per (seed, sparsity, variant) with ``rel_l2``, ``cosine``, ``ratio_to_topk``
    (rel. L2 over that of plain top-k at the same sparsity and seed), ``ratio_to_topk_at_keys``
    (over that of top-k at the default's keys per query, :data:`MATCHED`), ``density`` (selected
    blocks), ``keys_per_query`` and ``effective_density`` (keys per query, extra keys counted, over
    the video keys), ``compensated_fraction``; the video part only is scored (text queries are
    always dense).
    ``workload`` is ``"local"`` (:func:`structured_video_workload`) or ``"shared"``
    (``fastgen.bench.workloads.video_workload``, the bench harness's generator).
    """
    if workload not in ("local", "shared"):
        raise ValueError(f"workload={workload!r} is not allowed; allowed: 'local', 'shared'")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants={unknown} are unknown; allowed: {sorted(VARIANTS)}")
    rows = []
    for seed in seeds:
        q, k, v, mask = _workload_tensors(workload, seed, grid, heads, head_dim, text_tokens, padded_text, sinks,
                                          locality)  # fmt: skip
        n_video = q.shape[2] - text_tokens
        ref = dense_attention(q, k, v, key_padding_mask=mask)[:, :, :n_video]
        for sparsity in sparsities:
            common = dict(
                block_size=block_size,
                num_text_tokens=text_tokens,
                key_padding_mask=mask,
                grid=grid,
                reorder=reorder,
                return_stats=True,
            )
            results = {}
            for name in ("topk",) + tuple(x for x in variants if x != "topk"):
                out, stats = rectified_sparse_attention(
                    q, k, v, sparsity=sparsity, **common, **VARIANTS[name]
                )
                results[name] = (sparsity, out, stats)
            if "default" in results:  # top-k at the default's keys per query
                target = float(results["default"][2]["keys_per_query"])
                results[MATCHED] = _topk_at_keys(q, k, v, target, -(-n_video // block_size), common)
            rows += _fidelity_rows(results, variants, ref, n_video, seed=seed, sparsity=sparsity)
    return rows


def _workload_tensors(
    workload: str, seed: int, grid, heads, head_dim, text_tokens, padded_text, sinks, locality
):
    """``(q, k, v, key_padding_mask)`` of the ``"local"`` or ``"shared"`` workload at ``seed``."""
    if workload == "shared":
        from fastgen.bench.workloads import video_workload

        shared = video_workload(
            grid,
            heads,
            head_dim,
            num_text_tokens=text_tokens,
            text_valid=text_tokens - padded_text,
            seed=seed,
        )
        return shared.q, shared.k, shared.v, shared.key_padding_mask
    work = structured_video_workload(
        grid,
        heads,
        head_dim,
        text_tokens=text_tokens,
        padded_text=padded_text,
        sinks=sinks,
        locality=locality,
        seed=seed,
    )
    return work["q"], work["k"], work["v"], work["key_padding_mask"]


def _topk_at_keys(q, k, v, target: float, n_blocks: int, common: dict):
    """Plain top-k at the sparsity whose keys per query first reach ``target``: ``(sparsity, out, stats)``."""
    block_size = common["block_size"]
    keep = min(n_blocks, math.ceil(target / block_size - 1e-9))
    matched = max(0.0, 1.0 - keep / n_blocks)
    while True:
        out, stats = rectified_sparse_attention(q, k, v, sparsity=matched, **common, **VARIANTS["topk"])
        if float(stats["keys_per_query"]) >= target or matched <= 0.0:
            break
        matched = max(0.0, matched - 1.0 / n_blocks)
    return matched, out, stats


def _fidelity_rows(results: dict, variants, ref, n_video: int, *, seed: int, sparsity: float) -> list[dict]:
    """The rows of one seed and sparsity: each variant's (and the matched top-k's) errors against ``ref``,
    with its ratios to top-k at the same sparsity and at the default's keys per query."""
    rows = []
    topk_error = None
    for name, (used, out, stats) in results.items():
        rel, cos = _errors(out[:, :, :n_video], ref)
        topk_error = rel if name == "topk" else topk_error
        if name not in variants and name != MATCHED:
            continue
        kpq = float(stats["keys_per_query"])
        rows.append(
            {
                "seed": seed,
                "sparsity": sparsity,
                "variant": name,
                "block_sparsity": used,
                "rel_l2": rel,
                "cosine": cos,
                "ratio_to_topk": rel / topk_error if topk_error else float("nan"),
                "density": float(stats["density"]),
                "keys_per_query": kpq,
                "effective_density": kpq / n_video,
                "compensated_fraction": float(stats["compensated_fraction"]),
            }
        )
    by_name = {r["variant"]: r for r in rows}
    if MATCHED in by_name:
        for r in by_name.values():
            r["ratio_to_topk_at_keys"] = r["rel_l2"] / by_name[MATCHED]["rel_l2"]
    return rows


def measure_cost(
    grid: tuple[int, int, int] = (8, 32, 32),
    heads: int = 4,
    head_dim: int = 64,
    block_size: int = 64,
    sparsity: float = 0.8,
    text_tokens: int = 32,
    rounds: int = 5,
) -> dict[str, float]:
    """Wall-clock seconds (median of ``rounds`` interleaved rounds) of the selection (reorder + pad,
    statistics, estimate, critical blocks, GAPR, isolated keys, plan) and of the attention pass, for
    plain top-k (``topk``) and the default, on the shared workload, plus SDPA for scale. Each
    variant is timed with its own selection; the ``*_selection`` entries show it separately."""
    import os
    import statistics

    from fastgen.attention.execute import execute_plan
    from fastgen.attention.rectified import plan_rectified
    from fastgen.bench.workloads import video_workload
    from fastgen.configs import RectifiedSpaAttnConfig

    work = video_workload(grid, heads, head_dim, num_text_tokens=text_tokens, seed=0)
    q, k, v = work.q, work.k, work.v
    args = dict(num_text_tokens=text_tokens, key_padding_mask=work.key_padding_mask, grid=grid)
    configs = {
        name: RectifiedSpaAttnConfig(sparsity=sparsity, block_size=block_size, **VARIANTS[name])
        for name in ("topk", "default")
    }
    calls = {name: plan_rectified(q, k, v, cfg, **args) for name, cfg in configs.items()}
    stages = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
    for name, cfg in configs.items():
        stages[f"{name}_selection"] = lambda cfg=cfg: plan_rectified(q, k, v, cfg, **args)
        stages[f"{name}_attention"] = lambda c=calls[name]: execute_plan(
            c.qp, c.kp, c.vp, c.plan, scale=c.scale
        )
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for fn in stages.values():
        fn()  # warm-up (kernel build, caches)
    for _ in range(rounds):  # interleaved: every stage once per round
        for name, fn in stages.items():
            samples[name].append(time_call(fn))
    times = {name: statistics.median(x) for name, x in samples.items()}
    for name in configs:
        times[f"{name}_total"] = times[f"{name}_selection"] + times[f"{name}_attention"]
    times["loadavg_1m"] = os.getloadavg()[0]
    return times


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`run_fidelity` rows: every variant the command ran."""
    lines = [
        "| seed | sparsity | variant | rel L2 | cosine | / top-k | / top-k at equal keys | keys/query "
        "| eff. density | block density | compensated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at_keys = r.get("ratio_to_topk_at_keys")
        lines.append(
            f"| {r['seed']} | {r['sparsity']:.2f} | {r['variant']} | {r['rel_l2']:.4f} | {r['cosine']:.5f} "
            f"| {r['ratio_to_topk']:.3f} | {'-' if at_keys is None else f'{at_keys:.3f}'} "
            f"| {r['keys_per_query']:.0f} | {r['effective_density']:.3f} | {r['density']:.3f} "
            f"| {r['compensated_fraction']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print the fidelity table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--grid", type=int, nargs=3, default=[8, 16, 16], metavar=("F", "H", "W"))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--padded-text", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sinks", type=int, default=4, help="attention-sink keys in the first frame")
    p.add_argument("--locality", type=float, default=8.0, help="positional logit of a token with itself")
    p.add_argument("--workload", choices=["local", "shared"], default="local", help="workload generator")
    p.add_argument("--no-reorder", action="store_true", help="keep raster order (no 3D tiles)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines")
    p.add_argument(
        "--cost",
        action="store_true",
        help="time selection and attention of top-k and the default instead (wall clock, interleaved, median)",
    )
    args = p.parse_args(argv)
    if args.cost:
        costs = measure_cost(tuple(args.grid), args.heads, args.head_dim, args.block_size, args.sparsity[0])
        sys.stdout.write("\n".join(f"{name}: {value:.4f}" for name, value in costs.items()) + "\n")
        return 0
    rows = run_fidelity(
        sparsities=tuple(args.sparsity),
        variants=tuple(args.variants),
        grid=tuple(args.grid),
        heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        text_tokens=args.text_tokens,
        padded_text=args.padded_text,
        seeds=tuple(args.seeds),
        reorder=not args.no_reorder,
        sinks=args.sinks,
        locality=args.locality,
        workload=args.workload,
    )
    # the table is this command's output, not a diagnostic
    text = "\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows)
    logger.info("fidelity benchmark done (%d rows)", len(rows))
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
