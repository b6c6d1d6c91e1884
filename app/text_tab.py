"""The demo's "Text" tab: dense vs SparseD, Window-Diffusion or both on a diffusion LM."""

from __future__ import annotations

from fastgen.optional import require

from .backends import DemoBackend
from .limits import TEXT_METHODS, task_examples, text_defaults_of
from .video_tab import BLOCK_SIZES, metrics_outputs


def _text_inputs(gr, limits, td: dict, examples: list[str]) -> dict:
    """The prompt, method, generation, SparseD and Window-Diffusion controls, by name."""
    c = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(
                label="prompt" + (" (a held-out task example; the answer is checked)" if examples else ""),
                value=examples[0] if examples else "Write a haiku about sparse attention.",
                lines=4 if examples else 2,
            )
            if examples:
                gr.Examples([[e] for e in examples], inputs=[c["prompt"]], label="task examples")
        with gr.Column(scale=1):
            c["method"] = gr.Radio(
                list(TEXT_METHODS), value=td["method"], label="method", elem_id="text-method"
            )
            c["button"] = gr.Button("Generate", variant="primary", elem_id="text-generate")
    longest = limits.max_gen_length
    with gr.Row():
        c["steps"] = gr.Slider(1, max(limits.max_steps, longest), value=td["steps"], step=1, label="steps")
        c["length"] = gr.Slider(1, longest, value=td["gen_length"], step=1, label="generation length")
        c["block_length"] = gr.Slider(1, longest, value=td["block_length"], step=1, label="block length")
        c["temperature"] = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature")
        c["seed"] = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
    with gr.Row():
        with gr.Accordion("SparseD options", open=True), gr.Row():
            c["skip"] = gr.Slider(
                0.0, 1.0, value=td["skip"], step=0.05, label="skip (dense fraction of steps)"
            )
            c["select"] = gr.Slider(
                0.01, 1.0, value=td["select"], step=0.01, label="select (key blocks kept)"
            )
            c["block"] = gr.Dropdown(BLOCK_SIZES, value=td["block_size"], label="block size")
        with gr.Accordion("Window-Diffusion options", open=True), gr.Row():
            c["window"] = gr.Slider(1, longest, value=td["window"], step=1, label="window (masks)")
            c["active"] = gr.Slider(1, longest, value=td["active"], step=1, label="active (masks computed)")
            c["refresh"] = gr.Slider(
                1, longest, value=td["refresh_cycle"], step=1, label="refresh cycle (steps)"
            )
    return c


def add_text_tab(backend: DemoBackend, source: str, defaults: dict | None = None) -> None:
    """The "Text" tab, built inside an open ``gr.Blocks``; initial values are ``source``'s
    (:func:`~fastgen.app.limits.text_defaults_of`), updated by ``defaults``."""
    gr = require("gradio")
    limits = backend.limits
    td = {**text_defaults_of(source), **(defaults or {})}
    track = gr.Progress(track_tqdm=True)

    def run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps, gen_length,
                 block_length, temperature, seed, progress=track):  # fmt: skip
        return backend.run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps,
                                gen_length, block_length, temperature, seed, progress=progress)  # fmt: skip

    with gr.Tab("Text"):
        note = f" **{backend.text_note}.**" if backend.text_note else ""
        gr.Markdown(
            f"Model: `{source}`: masked-diffusion LM, dense vs SparseD, Window-Diffusion (only the active "
            f"tokens are computed between refresh steps) or both.{note}"
        )
        c = _text_inputs(gr, limits, td, task_examples(source))
        with gr.Row():
            dense_out = gr.Textbox(label="dense", lines=6, elem_id="text-dense")
            sparse_out = gr.Textbox(label="accelerated (the chosen method)", lines=6, elem_id="text-sparse")
        with gr.Row():
            with gr.Column():
                table, metrics = metrics_outputs(gr, "text")
            with gr.Column():
                mask = gr.Image(
                    label="block mask (kept key blocks, SparseD)", type="filepath", elem_id="text-mask"
                )
                with gr.Row():
                    layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                    head = gr.Number(value=0, precision=0, minimum=0, label="head")
            with gr.Column():
                sets = gr.Image(label="active / window / far field per step (Window-Diffusion)", type="filepath",
                                elem_id="text-window-sets")  # fmt: skip
        state = gr.State()
        names = ["prompt", "method", "skip", "select", "block", "window", "active", "refresh", "steps", "length",
                 "block_length", "temperature", "seed"]  # fmt: skip
        c["button"].click(
            run_text,
            [c[n] for n in names],
            [dense_out, sparse_out, table, metrics, mask, layer, head, state, sets],
            api_name="generate_text",
            concurrency_limit=limits.concurrency,
            concurrency_id="text",
        )
        for control in (layer, head):
            control.input(backend.redraw_mask, [state, layer, head], mask, api_name=False)


__all__ = ["add_text_tab"]
