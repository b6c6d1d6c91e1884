"""Fidelity benchmark of Rectified SpaAttn: error of each output form and correction against dense
attention, on structured video-like workloads (3D RoPE over smooth content, spatial / temporal /
mixed heads, sink keys, optional padded text).

Run: ``python -m fastgen.bench.fidelity`` (CPU, well under a minute at the default shapes).
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

logger = logging.getLogger(__name__)

VARIANTS: dict[str, dict] = {
    "topk": {"form": "none", "selection": "pooled"},
    "topk-subblock": {"form": "none", "selection": "subblock"},
    "paper": {"form": "paper", "selection": "pooled"},
    "exact-pooled": {"form": "exact", "selection": "pooled", "isolated_keys": 0.0},
    "exact-subblock": {"form": "exact", "selection": "subblock", "isolated_keys": 0.0},
    "exact-isolated": {"form": "exact", "selection": "pooled"},
    "default": {},
    "default+split16": {"pool_splits": 16},
    "default+iso2": {"isolated_keys": 2.0},
    "default+comp4": {"compensation_splits": 4},
    "exact-pooled+var": {
        "form": "exact",
        "selection": "pooled",
        "isolated_keys": 0.0,
        "variance_correction": True,
    },
    "exact-pooled+tilt": {"form": "exact", "selection": "pooled", "isolated_keys": 0.0, "value_tilt": True},
    "default+var": {"variance_correction": True},
    "paper+var+tilt": {
        "form": "paper",
        "selection": "pooled",
        "variance_correction": True,
        "value_tilt": True,
    },
}
"""Named option sets of :func:`rectified_sparse_attention` compared by the benchmark. ``topk`` (the
baseline every ratio divides by) is plain block-sparse attention with the paper's pooled estimate;
``paper`` is the paper's method as published; ``default`` is the function's defaults."""

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
    amplitude = {"spatial": (1.0, 0.6, 0.6), "temporal": (0.0, 1.0, 1.0), "mixed": (0.6, 0.7, 0.7)}
    position = torch.zeros(heads, d)
    for i, kind in enumerate(kinds):
        base = torch.randn(d, generator=gen).abs() + 0.5
        for axis, sl in enumerate(_axis_channels(d)):
            position[i, sl] = base[sl] * amplitude[kind][axis]
        # scaled so that a query meets its own position with logit ``locality``
        position[i] *= math.sqrt(locality * math.sqrt(d)) / position[i].norm()
    position = position[None, :, None, :]
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
    (rel. L2 over that of plain top-k at the same sparsity and seed), ``density`` and
    ``compensated_fraction``; the video part only is scored (text queries are always dense).
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
            q, k, v, mask = shared.q, shared.k, shared.v, shared.key_padding_mask
        else:
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
            q, k, v, mask = work["q"], work["k"], work["v"], work["key_padding_mask"]
        n_video = q.shape[2] - text_tokens
        ref = dense_attention(q, k, v, key_padding_mask=mask)[:, :, :n_video]
        for sparsity in sparsities:
            topk_error = None
            for name in ("topk",) + tuple(x for x in variants if x != "topk"):
                out, stats = rectified_sparse_attention(
                    q,
                    k,
                    v,
                    sparsity=sparsity,
                    block_size=block_size,
                    num_text_tokens=text_tokens,
                    key_padding_mask=mask,
                    grid=grid,
                    reorder=reorder,
                    return_stats=True,
                    **VARIANTS[name],
                )
                rel, cos = _errors(out[:, :, :n_video], ref)
                topk_error = rel if name == "topk" else topk_error
                if name not in variants:
                    continue
                rows.append(
                    {
                        "seed": seed,
                        "sparsity": sparsity,
                        "variant": name,
                        "rel_l2": rel,
                        "cosine": cos,
                        "ratio_to_topk": rel / topk_error if topk_error else float("nan"),
                        "density": stats["density"],
                        "compensated_fraction": stats["compensated_fraction"],
                    }
                )
    return rows


def measure_cost(
    grid: tuple[int, int, int] = (8, 32, 32),
    heads: int = 4,
    head_dim: int = 64,
    block_size: int = 64,
    sparsity: float = 0.8,
    text_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, float]:
    """Time of each rectification stage as a fraction of the block-sparse attention itself, measured in
    one run on the shared workload (median of ``repeats``): ``selection_pooled`` (block statistics +
    IPAR + top-k), ``selection_subblock`` (:func:`subblock_estimate`), ``compensation_pooled`` (one
    pooled key per compensated block) and ``compensation_isolated`` (outlier keys found, pools rebuilt
    without them, pooled + isolated keys attended)."""
    import time

    from fastgen.attention import rectified as r
    from fastgen.bench.workloads import video_workload

    work = video_workload(grid, heads, head_dim, num_text_tokens=text_tokens, seed=0)
    n_video = work.q.shape[2] - text_tokens
    qv, kv, vv = (x[:, :, :n_video].contiguous() for x in (work.q, work.k, work.v))
    kt = work.k[:, :, n_video:]
    scale = 1.0 / math.sqrt(head_dim)
    stats = r.block_statistics(qv, kv, vv, block_size)
    valid = (stats.key_counts > 0)[:, None, None, :]
    probs, text_mass = r.ipar_estimate(
        r.block_logits(stats, scale), r.text_logits(stats.pooled_q, kt, None, scale)
    )
    critical = r.critical_blocks(probs, text_mass, valid, sparsity)
    compensated = r.gapr_compensated(stats, valid & ~critical)

    def pooled_selection():
        st = r.block_statistics(qv, kv, vv, block_size)
        p, t = r.ipar_estimate(r.block_logits(st, scale), r.text_logits(st.pooled_q, kt, None, scale))
        return r.critical_blocks(p, t, valid, sparsity)

    def subblock_selection():
        p, t = r.subblock_estimate(qv, kv, block_size, 4, None, lambda pq: r.text_logits(pq, kt, None, scale))
        return r.critical_blocks(p, t, valid, sparsity)

    def isolated_compensation():
        iso = r.isolated_outlier_keys(kv, stats.pooled_k, block_size, valid.shape[-1], None)
        comp = r.compensation_statistics(kv, vv, stats, block_size, 1, None, iso)
        comp, mask = r.with_isolated_keys(comp, compensated, kv, vv, iso, critical, block_size)
        return r.pooled_key_attention(qv, comp, mask, block_size, scale)

    stages = {
        "sparse_attention": lambda: r.video_sparse_attention(
            qv, kv, vv, critical, block_size, scale, None, None
        ),
        "selection_pooled": pooled_selection,
        "selection_subblock": subblock_selection,
        "compensation_pooled": lambda: r.pooled_key_attention(qv, stats, compensated, block_size, scale),
        "compensation_isolated": isolated_compensation,
    }
    times = {}
    for name, fn in stages.items():
        fn()  # warm-up (compilation, caches)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[name] = sorted(samples)[len(samples) // 2]
    base = times["sparse_attention"]
    return {name: t / base for name, t in times.items()}


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`run_fidelity` rows."""
    lines = [
        "| seed | sparsity | variant | rel L2 | cosine | / top-k | density | compensated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['sparsity']:.2f} | {r['variant']} | {r['rel_l2']:.4f} | {r['cosine']:.5f} "
            f"| {r['ratio_to_topk']:.3f} | {r['density']:.3f} | {r['compensated_fraction']:.3f} |"
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
        help="time the rectification stages against the sparse attention instead",
    )
    args = p.parse_args(argv)
    if args.cost:
        costs = measure_cost(tuple(args.grid), args.heads, args.head_dim, args.block_size, args.sparsity[0])
        sys.stdout.write(
            "\n".join(f"{name}: {ratio:.3f} x sparse attention" for name, ratio in costs.items()) + "\n"
        )
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
