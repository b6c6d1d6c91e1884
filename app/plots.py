"""The demo's pictures and tables: the block-mask heatmap (video, text and per causal chunk), the
per-chunk density chart and the metrics table. Pictures are PNG files drawn with matplotlib (in the
``app`` extra)."""

from __future__ import annotations

import math

import numpy as np

from fastgen.optional import require


def _layer_label(record: dict, position: int) -> str:
    """``"3"`` for layer 3 of the transformer; ``"transformer_2:3"`` for the second expert of Wan 2.2."""
    layer = str(record.get("layer", position))
    model = record.get("model")
    return layer if model in (None, "transformer") else f"{model}:{layer}"


def layer_choices(stats: list[dict] | None) -> list[str]:
    """Names of the layers that recorded a block mask (dropdown choices)."""
    return [_layer_label(s, i) for i, s in enumerate(stats or []) if s.get("block_mask") is not None]


def _mask_of(stats: list[dict], layer: str | None, head: int):
    for i, s in enumerate(stats or []):
        if _layer_label(s, i) == str(layer) and s.get("block_mask") is not None:
            mask = np.asarray(s["block_mask"], dtype=bool)
            while mask.ndim > 3:  # [B, H, nq, nk] -> first batch element
                mask = mask[0]
            if mask.ndim == 2:
                mask = mask[None]
            head = min(max(int(head or 0), 0), mask.shape[0] - 1)
            return s, mask, head
    return None, None, 0


def draw_block_mask(stats: list[dict] | None, layer: str | None, head: int, path: str) -> str:
    """Save a PNG heatmap of the block mask of ``layer``/``head`` (kept key blocks bright) to ``path``."""
    Figure = require("matplotlib.figure").Figure

    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    ax = fig.add_subplot()
    record, mask, head = _mask_of(stats, layer, head)
    if mask is None:
        ax.text(
            0.5,
            0.5,
            "no block mask recorded\n(every layer ran dense, or the\nrunner reported no masks)",
            ha="center",
            va="center",
        )
        ax.set_axis_off()
    else:
        ax.imshow(mask[head], cmap="viridis", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        density = float(mask[head].mean())
        layer_density = record.get("density")
        title = f"layer {layer}, head {head}: density {density:.2f}"
        if layer_density is not None:
            title += f" (layer {float(layer_density):.2f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.tight_layout()
    fig.savefig(path)
    return path


def num_heads(stats: list[dict] | None, layer: str | None) -> int:
    """Heads of the mask recorded for ``layer`` (1 when none is)."""
    _, mask, _ = _mask_of(stats, layer, 0)
    return 1 if mask is None else int(mask.shape[0])


def mean_density(stats) -> float | None:
    """Mean density over the recorded sparse layers: the same rows the heatmap draws (``None`` if none)."""
    from fastgen.stats import mean_stat, stats_layers

    return mean_stat(stats_layers(stats), "density")


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞ (identical)"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def metrics_table(rows: list[tuple[str, object]]) -> str:
    """A two-column Markdown table of ``(metric, value)`` rows."""
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)


def chunk_choices(stats: list[dict] | None) -> list[str]:
    """Chunks that recorded a block mask (dropdown choices), as strings."""
    return sorted({str(s["chunk"]) for s in stats or [] if s.get("block_mask") is not None}, key=int)


def causal_layer_choices(stats: list[dict] | None, chunk: str | None) -> list[str]:
    """Layers of ``chunk`` that recorded a block mask."""
    return [
        str(s["layer"])
        for s in stats or []
        if str(s.get("chunk")) == str(chunk) and s.get("block_mask") is not None
    ]


def draw_chunk_mask(
    stats: list[dict] | None, chunk: str | None, layer: str | None, head: int, path: str
) -> str:
    """PNG heatmap of the block mask Light Forcing kept in ``chunk`` / ``layer`` / ``head`` (query blocks x
    key blocks over cache + chunk)."""
    rows = [
        {k: v for k, v in s.items() if k != "model"} for s in stats or [] if str(s.get("chunk")) == str(chunk)
    ]
    return draw_block_mask(rows, layer, head, path)


def draw_chunk_density(stats: list[dict] | None, path: str) -> str:
    """PNG bar chart: density computed per chunk (mean over layers) next to the Chunk-Aware Growth budget."""
    from fastgen.processors.light_forcing_wan import chunk_densities

    Figure = require("matplotlib.figure").Figure

    fig = Figure(figsize=(4.2, 3.0), dpi=100)
    ax = fig.add_subplot()
    densities = chunk_densities(stats)
    if not densities:
        ax.text(0.5, 0.5, "no Light Forcing statistics", ha="center", va="center")
        ax.set_axis_off()
    else:
        chunks = list(densities)
        ax.bar(chunks, [densities[c] for c in chunks], color="tab:blue", label="computed")
        budget = {}
        for s in stats or []:
            if s.get("chunk") is not None and s.get("sparsity") is not None:
                budget[int(s["chunk"])] = 1.0 - float(s["sparsity"])
        ax.plot(
            chunks, [budget.get(c, 1.0) for c in chunks], "o--", color="tab:orange", label="CAG budget 1 - s"
        )
        ax.set_xlabel("chunk")
        ax.set_ylabel("density")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(chunks)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = [
    "causal_layer_choices",
    "chunk_choices",
    "draw_block_mask",
    "draw_chunk_density",
    "draw_chunk_mask",
    "layer_choices",
    "mean_density",
    "metrics_table",
    "num_heads",
]
