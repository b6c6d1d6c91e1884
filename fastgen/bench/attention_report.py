"""The output of ``fastgen bench attention``: its tables (all methods x sparsities; the CPU headline), the
speed-up plot and the JSON file. Importable from :mod:`fastgen.bench.attention` as before."""

from __future__ import annotations

import json


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def format_table(result: dict) -> str:
    """Plain-text table of :func:`run_attention_bench` results."""
    c, dense = result["config"], result["dense"]
    lines = [
        f"workload {c['workload']} B={c['batch']} H={c['heads']} N={c['tokens']} D={c['head_dim']} "
        f"{c['dtype']} on {c['device']}, block {c['block_size']}, backend {c['backend']}, "
        f"{c['repeats']} interleaved rounds (wall clock, medians), load {c['load_average']}",
        f"SDPA: {dense['time_s'] * 1e3:.1f} ms median, {dense['time_best_s'] * 1e3:.1f} ms best, "
        f"peak {_mib(dense['peak_bytes'])} MiB",
        "",
        f"{'method':<13}{'sparsity':>9}{'density':>9}{'keys/q':>8}{'eff.dens':>9}{'speedup':>9}{'best':>7}"
        f"{'ideal':>7}{'frac':>6}{'select ms':>10}{'rel L2':>9}{'cosine':>9}{'peak MiB':>10}{'SDPA MiB':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:<13}{r['sparsity']:>9.2f}{r['density']:>9.3f}{r['keys_per_query']:>8.0f}"
            f"{r['effective_density']:>9.3f}{r['speedup']:>8.2f}x{r['speedup_best']:>6.2f}x{r['ideal']:>7.2f}"
            f"{r['fraction_of_ideal']:>6.2f}{r['select_s'] * 1e3:>10.1f}{r['rel_l2']:>9.4f}{r['cosine']:>9.5f}"
            f"{_mib(r['peak_bytes']):>10}{_mib(r['dense_peak_bytes']):>10}"
        )
    return "\n".join(lines)


def format_target(result: dict) -> str:
    """Plain-text summary of :func:`run_target`."""
    c = result["config"]
    lines = [
        f"target: block_sparse_attention, {c['heads']} heads x {c['tokens']} tokens x head_dim "
        f"{c['head_dim']}, block {c['block_size']}, {c['dtype']}, backend {c['backend']}, "
        f"{c['threads']} threads, load {c['load_average']}",
        f"density {result['density']:.4f} ({result['kept_blocks_per_query_block']} key blocks per query "
        f"block), ideal speedup {result['ideal']:.2f}x; wall clock, {c['repeats']} interleaved rounds",
        "SDPA s: " + " ".join(f"{t:.2f}" for t in result["dense_times_s"]),
    ]
    for name in ("structured", "random"):
        r = result[name]
        lines.append(
            f"{name} mask: median {r['speedup_median']:.2f}x ({r['fraction_of_ideal_median']:.2f} of ideal), "
            f"best {r['speedup_best']:.2f}x ({r['fraction_of_ideal_best']:.2f}); s: "
            + " ".join(f"{t:.2f}" for t in r["times_s"])
        )
    lines.append(
        f"rel L2 {result['rel_l2']:.4f}, cosine {result['cosine']:.5f}; peak memory sparse "
        f"{_mib(result['peak_bytes'])} MiB, SDPA {_mib(result['dense_peak_bytes'])} MiB ({c['memory_measure']})"
    )
    return "\n".join(lines)


def write_plot(result: dict, path: str) -> None:
    """PNG of speedup (x) vs relative L2 error (y), one series per method, points labelled by sparsity."""
    from fastgen.optional import require

    require("matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    from fastgen.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == method]
        xs, ys = [r["speedup"] for r in rows], [max(r["rel_l2"], 1e-8) for r in rows]
        ax.plot(xs, ys, marker="o", label=method)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"{r['sparsity']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("speedup vs SDPA (same run)")
    ax.set_ylabel("relative L2 error vs dense")
    ax.set_yscale("log")
    c = result["config"]
    ax.set_title(
        f"{c['workload']} H={c['heads']} N={c['tokens']} D={c['head_dim']} {c['dtype']} {c['device']}"
    )
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_json(result: dict, path: str) -> None:
    """Write ``result`` as JSON atomically."""
    from fastgen.io import write_text

    write_text(path, json.dumps(result, indent=2) + "\n")


__all__ = ["format_table", "format_target", "write_json", "write_plot"]
