"""Summaries of the per-layer statistics a sparse method records, read the same way by the CLI, batch
manifests and the demo (its metrics table and its block-mask heatmap read the same rows).

A runner's ``stats`` is either a list of per-layer dicts (video: one row per sparse layer of the last
step) or a dict with a ``layers`` list and its own summary values (text).
"""

from __future__ import annotations

import math

import numpy as np


def finite(x) -> float | None:
    """A float for JSON (``None`` for ``None``, inf and nan)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def stats_layers(stats) -> list[dict]:
    """Per-layer stat dicts from a runner's ``stats`` (a list of layer dicts, or a dict with ``layers``)."""
    if isinstance(stats, dict):
        stats = stats.get("layers")
    return [s for s in stats or [] if isinstance(s, dict)]


def mean_stat(stats, key: str) -> float | None:
    """Mean of ``key`` over the recorded layers of a runner's ``stats``; ``None`` when no layer has it.

    Computed from the layer rows whenever there are any (the same rows a heatmap draws), so a summary
    and a picture can never disagree; a dict's own summary value is used only when it has no rows.
    """
    values = [float(s[key]) for s in stats_layers(stats) if s.get(key) is not None]
    if values:
        return float(np.mean(values))
    if isinstance(stats, dict) and stats.get(key) is not None:
        return float(stats[key])
    return None


__all__ = ["finite", "mean_stat", "stats_layers"]
