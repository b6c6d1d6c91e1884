"""The demo Text tab's picture of Window-Diffusion (Window-Diffusion for diffusion LMs): which positions
each step computed (active), attended from the cache (window) or pruned (far field), drawn from the
pipeline's per-step trace (``DiffusionLMOutput.window_trace``, batch row 0).

The Text tab's handler (``app/backends.py``) calls :func:`draw_window_sets` after every Window-Diffusion run; the metrics
table beside it reads its refresh / pruned / rows-run figures from the same trace.
"""

from __future__ import annotations

import numpy as np

SET_COLOURS = np.array([[235, 235, 235], [120, 170, 230], [230, 110, 60]], dtype=np.uint8)
"""Picture colours: far field (pruned), window (attended from the cache), active (computed)."""


def window_sets_image(trace: list[dict], total: int) -> np.ndarray:
    """``[steps, total]`` codes per step and position: 0 far field, 1 window (cached), 2 computed."""
    codes = np.zeros((max(len(trace), 1), total), dtype=np.uint8)
    for row, entry in enumerate(trace):
        window = entry["window"].numpy() if hasattr(entry["window"], "numpy") else np.asarray(entry["window"])
        active = entry["active"].numpy() if hasattr(entry["active"], "numpy") else np.asarray(entry["active"])
        codes[row, window[window < total]] = 1
        codes[row, active[active < total]] = 2
    return codes


def draw_window_sets(trace: list[dict] | None, total: int, prompt_length: int, path: str) -> str:
    """Save a PNG of the active / window / far-field sets over the steps (rows) and positions (columns)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot()
    if not trace:
        ax.text(0.5, 0.5, "no Window-Diffusion trace recorded\n(the method ran no Window-Diffusion)",
                ha="center", va="center")  # fmt: skip
        ax.set_axis_off()
    else:
        ax.imshow(SET_COLOURS[window_sets_image(trace, total)], interpolation="nearest", aspect="auto")
        ax.axvline(prompt_length - 0.5, color="black", linewidth=0.8)
        ax.set_xlabel("position (prompt | generated)")
        ax.set_ylabel("step")
        names = ("far field (pruned)", "window (cached K/V)", "active (computed)")
        ax.legend(
            handles=[Patch(color=SET_COLOURS[i] / 255, label=n) for i, n in enumerate(names)],
            loc="lower left",
            fontsize=7,
        )
        refreshes = sum(1 for t in trace if t["refresh"])
        ax.set_title(f"{len(trace)} steps, {refreshes} refresh steps (full rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = [
    "draw_window_sets",
    "window_sets_image",
]
