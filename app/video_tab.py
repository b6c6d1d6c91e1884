"""The demo's "Video (Rectified SpaAttn)" tab: controls, outputs and wiring (inside an open ``gr.Blocks``)."""

from __future__ import annotations

from fastgen.optional import require

from .backends import DemoBackend
from .limits import VIDEO_DEFAULTS

BLOCK_SIZES = [16, 32, 64, 128, 256]
"""Block sizes offered by the demo's dropdowns."""


def _video_inputs(gr, limits, vd: dict, takes_image: bool) -> dict:
    """The prompt, generation and Rectified SpaAttn controls, by name."""
    c = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(label="prompt", value="A cat surfing a small wave at sunset", lines=2)
            c["negative"] = gr.Textbox(label="negative prompt", value="")
        with gr.Column(scale=1):
            # the first-frame upload exists only for image-to-video models
            c["image"] = gr.Image(label="first frame (image-to-video)", type="filepath", elem_id="video-image",
                                  visible=takes_image)  # fmt: skip
            c["button"] = gr.Button("Generate", variant="primary", elem_id="video-generate")
    with gr.Row():
        c["steps"] = gr.Slider(1, limits.max_steps, value=vd["steps"], step=1, label="steps")
        c["seed"] = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
        c["height"] = gr.Slider(limits.min_side, limits.max_side, value=vd["height"], step=16, label="height")
        c["width"] = gr.Slider(limits.min_side, limits.max_side, value=vd["width"], step=16, label="width")
        c["frames"] = gr.Slider(1, limits.max_frames, value=vd["frames"], step=1, label="frames")
    with gr.Accordion("Rectified SpaAttn options", open=True), gr.Row():
        c["sparsity"] = gr.Slider(
            0.0, 0.99, value=vd["sparsity"], step=0.01, label="sparsity (blocks dropped)"
        )
        c["block"] = gr.Dropdown(BLOCK_SIZES, value=vd["block_size"], label="block size")
        c["dense_layers"] = gr.Number(value=vd["dense_layers"], precision=0, minimum=0,
                                      label="dense layers (first N)")  # fmt: skip
        c["warmup"] = gr.Number(value=vd["warmup_steps"], precision=0, minimum=0, label="dense warm-up steps")
        c["form"] = gr.Radio(["exact", "paper", "none"], value="exact", label="rectification")
    return c


def video_pair(gr, prefix: str, label: str) -> tuple:
    """The dense and the accelerated (``label``) video players side by side (ids ``<prefix>-dense`` / ``-sparse``)."""
    with gr.Row():
        return (
            gr.Video(label="dense", format="mp4", elem_id=f"{prefix}-dense"),
            gr.Video(label=label, format="mp4", elem_id=f"{prefix}-sparse"),
        )


def metrics_outputs(gr, prefix: str) -> tuple:
    """The metrics table (id ``<prefix>-metrics``) and the metrics JSON, in the open column."""
    return gr.Markdown(elem_id=f"{prefix}-metrics"), gr.JSON(label="metrics")


def add_video_tab(backend: DemoBackend, source: str, defaults: dict | None = None, takes_image: bool = False):
    """The "Video (Rectified SpaAttn)" tab, built inside an open ``gr.Blocks``; ``takes_image`` shows the
    first-frame upload (image-to-video models only)."""
    gr = require("gradio")
    limits = backend.limits
    vd = {**VIDEO_DEFAULTS, **(defaults or {})}
    track = gr.Progress(track_tqdm=True)  # gradio finds it as the handler's default and reports tqdm bars

    def run_video(prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form, steps, seed,
                  height, width, frames, image=None, progress=track):  # fmt: skip
        return backend.run_video(prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form,
                                 steps, seed, height, width, frames, image=image, progress=progress)  # fmt: skip

    with gr.Tab("Video (Rectified SpaAttn)"):
        note = f" **{backend.video_note}.**" if backend.video_note else ""
        gr.Markdown(f"Model: `{source}`: video DiT with Rectified SpaAttn.{note}")
        c = _video_inputs(gr, limits, vd, takes_image)
        dense_out, sparse_out = video_pair(gr, "video", "Rectified SpaAttn")
        with gr.Row():
            with gr.Column():
                table, metrics = metrics_outputs(gr, "video")
            with gr.Column():
                mask = gr.Image(label="block mask (kept key blocks)", type="filepath", elem_id="video-mask")
                with gr.Row():
                    layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                    head = gr.Number(value=0, precision=0, minimum=0, label="head")
        state = gr.State()
        names = ["prompt", "negative", "sparsity", "block", "dense_layers", "warmup", "form", "steps", "seed",
                 "height", "width", "frames", "image"]  # fmt: skip
        c["button"].click(
            run_video,
            [c[n] for n in names],
            [dense_out, sparse_out, table, metrics, mask, layer, head, state],
            api_name="generate_video",
            concurrency_limit=limits.concurrency,
            concurrency_id="video",
        )
        for control in (layer, head):
            control.input(backend.redraw_mask, [state, layer, head], mask, api_name=False)


__all__ = ["BLOCK_SIZES", "add_video_tab"]
