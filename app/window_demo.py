"""The demo's Window-Diffusion tab: dense vs Window-Diffusion (alone or with SparseD) on the text model,
with window / active / refresh-cycle controls and a picture of which positions each step computed
(active), attended from the cache (window) or pruned (far field).

Kept apart from ``app/demo.py``'s Text tab; :func:`build_window_tab` is called once from ``build_demo``
inside its ``gr.Blocks``, and :func:`run_window_text` is a plain function tests call without a browser.
"""

from __future__ import annotations

import os

import numpy as np

WINDOW_TAB_DEFAULTS = {"gen_length": 64, "window": 32, "active": 8, "refresh_cycle": 8}
"""Initial values of the tab (steps == generation length, one token per step)."""

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
        ax.text(0.5, 0.5, "no Window-Diffusion trace recorded", ha="center", va="center")
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


def run_window_text(backend, prompt, method, window, active, refresh_cycle, gen_length, temperature, seed,
                    progress=None):  # fmt: skip
    """Dense and Window-Diffusion (``method``) with one seed, ``steps == gen_length``; returns both texts,
    a metrics table, the metrics dict and the picture of the sets."""
    from fastgen.configs import WindowDiffusionConfig
    from fastgen.metrics import token_agreement

    from .demo import _check_prompt, _gr_error, _metrics_table, check_range

    lim = backend.limits
    prompt = _check_prompt(prompt, lim)
    if method not in ("window_diffusion", "sparsed+window_diffusion"):
        raise _gr_error(
            f"method={method!r} is not allowed; allowed: window_diffusion, sparsed+window_diffusion"
        )
    gen_length = int(check_range("generation length", gen_length, 1, lim.max_gen_length))
    params = {
        "steps": gen_length,
        "gen_length": gen_length,
        "block_length": gen_length,
        "temperature": check_range("temperature", temperature, 0.0, 2.0, integer=False),
    }
    seed = check_range("seed", seed, 0, 2**31 - 1)
    try:
        config = WindowDiffusionConfig(
            window=int(check_range("window", window, 1, lim.max_gen_length)),
            active=int(check_range("active", active, 1, lim.max_gen_length)),
            refresh_cycle=int(check_range("refresh cycle", refresh_cycle, 1, lim.max_gen_length)),
        )
    except ValueError as err:
        raise _gr_error(str(err)) from None
    folder = backend.folders.new()
    with backend.text_pipeline.lock:
        if progress is not None:
            progress(0, desc="loading the diffusion LM")
        pipe = backend.text_pipeline.get()
        common = {"prompt": prompt, "seed": seed, **params}
        try:
            dense = backend.text_generate(pipe, method="dense", config=None, **common)
            fast = backend.text_generate(pipe, method=method, config=config, **common)
        except ValueError as err:
            raise _gr_error(str(err)) from None
    stats = fast.get("stats") or {}
    metrics = {
        "dense_seconds": float(dense["seconds"]),
        "window_seconds": float(fast["seconds"]),
        "speedup": float(dense["seconds"]) / max(float(fast["seconds"]), 1e-9),
        "token_agreement": float(token_agreement(dense["tokens"], fast["tokens"])),
        "refresh_steps": stats.get("refresh_steps"),
        "pruned_steps": stats.get("pruned_steps"),
        "mean_rows_run": stats.get("mean_queries"),
        "seed": seed,
        "config": fast.get("config", {}).get("acceleration", config.to_dict()),
    }
    table = _metrics_table(
        [
            ("dense time (s)", metrics["dense_seconds"]),
            (f"{method} time (s)", metrics["window_seconds"]),
            ("speedup", metrics["speedup"]),
            ("token agreement", metrics["token_agreement"]),
            ("refresh / pruned steps", f"{metrics['refresh_steps']} / {metrics['pruned_steps']}"),
            ("mean rows run per step", metrics["mean_rows_run"]),
        ]
    )
    trace = stats.get("trace")
    total = int(stats.get("positions") or 0)
    prompt_length = int(stats.get("prompt_length") or 0)
    picture = draw_window_sets(trace, total, prompt_length, os.path.join(folder, "window_sets.png"))
    return dense["text"], fast["text"], table, metrics, picture


def build_window_tab(gr, backend, limits, source_text: str, track) -> None:
    """The "Text (Window-Diffusion)" tab; call inside ``build_demo``'s ``gr.Blocks``."""
    d = WINDOW_TAB_DEFAULTS

    def run(prompt, method, window, active, refresh_cycle, gen_length, temperature, seed, progress=track):
        return run_window_text(backend, prompt, method, window, active, refresh_cycle, gen_length, temperature,
                               seed, progress=progress)  # fmt: skip

    with gr.Tab("Text (Window-Diffusion)"):
        gr.Markdown(
            f"Model: `{source_text}`: Window-Diffusion computes only the active tokens between refresh steps "
            "(one token per step, steps = generation length)."
        )
        with gr.Row():
            w_prompt = gr.Textbox(
                label="prompt", value="Write a haiku about sparse attention.", lines=2, scale=2
            )
            w_button = gr.Button("Generate", variant="primary", elem_id="window-generate", scale=1)
        with gr.Row():
            w_method = gr.Radio(["window_diffusion", "sparsed+window_diffusion"], value="window_diffusion",
                                label="method")  # fmt: skip
            w_length = gr.Slider(
                8, limits.max_gen_length, value=d["gen_length"], step=1, label="generation length"
            )
            w_temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature")
            w_seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
        with gr.Row():
            w_window = gr.Slider(1, limits.max_gen_length, value=d["window"], step=1, label="window (masks)")
            w_active = gr.Slider(1, 128, value=d["active"], step=1, label="active (masks computed)")
            w_refresh = gr.Slider(1, 128, value=d["refresh_cycle"], step=1, label="refresh cycle (steps)")
        with gr.Row():
            w_dense = gr.Textbox(label="dense", lines=6, elem_id="window-dense")
            w_fast = gr.Textbox(label="Window-Diffusion", lines=6, elem_id="window-fast")
        with gr.Row():
            with gr.Column():
                w_table = gr.Markdown(elem_id="window-metrics")
                w_metrics = gr.JSON(label="metrics")
            w_picture = gr.Image(label="active / window / far field per step", type="filepath",
                                 elem_id="window-sets")  # fmt: skip
        w_button.click(
            run,
            [w_prompt, w_method, w_window, w_active, w_refresh, w_length, w_temperature, w_seed],
            [w_dense, w_fast, w_table, w_metrics, w_picture],
            api_name="generate_window",
            concurrency_limit=limits.concurrency,
            concurrency_id="text",
        )


__all__ = [
    "WINDOW_TAB_DEFAULTS",
    "build_window_tab",
    "draw_window_sets",
    "run_window_text",
    "window_sets_image",
]
