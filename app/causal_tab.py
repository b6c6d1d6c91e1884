"""The demo's "Causal video (Light Forcing)" tab: the autoregressive Wan, dense vs Light Forcing, with the
causal local window (local attention frames, sink frames) and per-chunk pictures."""

from __future__ import annotations

from fastgen.optional import require

from .backends import CausalDemoBackend
from .limits import CAUSAL_DEFAULTS
from .video_tab import metrics_outputs, video_pair


def _causal_inputs(gr, limits, cd: dict) -> dict:
    """The prompt, generation, local-window and Light Forcing controls, by name."""
    c = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(label="prompt", value="A paper boat drifting down a stream", lines=2)
        with gr.Column(scale=1):
            c["button"] = gr.Button("Generate", variant="primary", elem_id="causal-generate")
    with gr.Row():
        c["steps"] = gr.Slider(1, limits.max_steps, value=4, step=1, label="denoising steps per chunk")
        c["seed"] = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
        c["height"] = gr.Slider(limits.min_side, limits.max_side, value=cd["height"], step=16, label="height")
        c["width"] = gr.Slider(limits.min_side, limits.max_side, value=cd["width"], step=16, label="width")
        c["frames"] = gr.Slider(1, limits.max_frames, value=cd["frames"], step=4, label="frames (4k+1)")
    with gr.Accordion("Local attention window", open=False), gr.Row():
        c["local"] = gr.Number(value=cd["local_attn_frames"], precision=0, minimum=0,
                               label="local attention frames (latent; 0 = every earlier frame)")  # fmt: skip
        c["sink"] = gr.Number(value=cd["sink_frames"], precision=0, minimum=0, label="sink frames (latent)")
    with gr.Accordion("Light Forcing options", open=True), gr.Row():
        c["sparsity"] = gr.Slider(0.0, 0.99, value=cd["sparsity"], step=0.01, label="target sparsity")
        c["sparsity_base"] = gr.Slider(0.0, 0.99, value=cd["sparsity_base"], step=0.01, label="sparsity base")
        c["block"] = gr.Dropdown([16, 32, 64, 128, 256], value=cd["block_size"], label="block size")
        c["rectify"] = gr.Checkbox(value=False, label="rectify dropped blocks (beyond the paper)")
    return c


def add_causal_tab(backend: CausalDemoBackend, source: str, defaults: dict | None = None) -> None:
    """The "Causal video (Light Forcing)" tab, built inside an open ``gr.Blocks``."""
    gr = require("gradio")
    limits = backend.limits
    cd = {**CAUSAL_DEFAULTS, **(defaults or {})}
    track = gr.Progress(track_tqdm=True)

    def run(prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width, frames,
            local_attn_frames, sink_frames, progress=track):  # fmt: skip
        return backend.run(prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width, frames,
                           local_attn_frames, sink_frames, progress=progress)  # fmt: skip

    with gr.Tab("Causal video (Light Forcing)"):
        note = f" **{backend.note}.**" if backend.note else ""
        gr.Markdown(
            f"Model: `{source}`: autoregressive Wan (Self-Forcing chunks of 3 latent frames, KV cache) with "
            f"Light Forcing (Chunk-Aware Growth + Hierarchical Sparse Attention).{note}"
        )
        c = _causal_inputs(gr, limits, cd)
        dense_out, sparse_out = video_pair(gr, "causal", "Light Forcing")
        with gr.Row():
            with gr.Column():
                table, metrics = metrics_outputs(gr, "causal")
                density = gr.Image(label="density per chunk", type="filepath", elem_id="causal-density")
            with gr.Column():
                mask = gr.Image(label="block mask (kept key blocks)", type="filepath", elem_id="causal-mask")
                with gr.Row():
                    chunk = gr.Dropdown([], label="chunk", allow_custom_value=True)
                    layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                    head = gr.Number(value=0, precision=0, minimum=0, label="head")
        state = gr.State()
        names = ["prompt", "sparsity", "sparsity_base", "block", "rectify", "steps", "seed", "height", "width",
                 "frames", "local", "sink"]  # fmt: skip
        c["button"].click(
            run,
            [c[n] for n in names],
            [dense_out, sparse_out, table, metrics, density, mask, chunk, layer, head, state],
            api_name="generate_causal",
            concurrency_limit=limits.concurrency,
            concurrency_id="causal",
        )
        for control in (chunk, layer, head):
            control.input(backend.redraw_mask, [state, chunk, layer, head], mask, api_name=False)


__all__ = ["add_causal_tab"]
