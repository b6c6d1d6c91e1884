"""The demo's "Text" tab: dense vs SparseD, Window-Diffusion or both on a diffusion LM."""

from __future__ import annotations

from fastgen.optional import require

from .backends import DemoBackend
from .limits import TEXT_METHODS, task_examples, text_defaults_of
from .video_tab import BLOCK_SIZES, metrics_outputs

DEFAULT_TEXT_PROMPT = "Write a haiku about sparse attention."
"""The Text tab's prompt for a model without held-out task examples."""

EXAMPLE_PROMPT_LABEL = "prompt (a held-out task example; the answer is checked)"
"""The prompt's label for a model with held-out task examples."""

_TEXT_CONTROLS = {"method": "method", "steps": "steps", "length": "gen_length", "block_length": "block_length",
                  "window": "window", "active": "active", "refresh": "refresh_cycle", "skip": "skip",
                  "select": "select", "block": "block_size"}  # fmt: skip
"""The Text tab's controls a model pick resets, with their keys in :func:`text_defaults_of`."""


def model_line(name: str, note: str | None) -> str:
    """The Text tab's line about the text model ``name`` (with its ``note``, e.g. random weights)."""
    note = f" **{note}.**" if note else ""
    return (
        f"Model: `{name}`: masked-diffusion LM, dense vs SparseD, Window-Diffusion (only the active "
        f"tokens are computed between refresh steps) or both.{note}"
    )


def text_model_values(backend: DemoBackend, model: str, defaults: dict | None = None) -> dict:
    """What the Text tab shows for the text ``model`` (one of ``backend.text_models``; a ``gr.Error``
    otherwise): each reset control's value by control name (``method``, ``steps``, ``length``,
    ``block_length``, ``window``, ``active``, ``refresh``, ``skip``, ``select``, ``block``) from
    :func:`text_defaults_of` updated by ``defaults``, the ``prompt`` (the first held-out example, if any),
    the ``examples`` list and the model ``line``."""
    model = backend.text_model_of(model)
    td = {**text_defaults_of(model), **(defaults or {})}
    examples = task_examples(model)
    return {
        **{control: td[key] for control, key in _TEXT_CONTROLS.items()},
        "prompt": examples[0] if examples else DEFAULT_TEXT_PROMPT,
        "examples": examples,
        "line": model_line(model, backend.text_models[model][1]),
    }


def _prompt_props(examples: list[str]) -> dict:
    return {"label": EXAMPLE_PROMPT_LABEL if examples else "prompt", "lines": 4 if examples else 2}


def _text_inputs(gr, limits, td: dict, examples: list[str]) -> dict:
    """The prompt, its task examples, method, generation, SparseD and Window-Diffusion controls, by name."""
    c = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(value=td["prompt"], elem_id="text-prompt", **_prompt_props(examples))
            # a Dataset by index plus the examples in a State: its samples change with the picked model
            c["examples"] = gr.Dataset(
                components=[c["prompt"]], samples=[[e] for e in examples], type="index",
                label="task examples", visible=bool(examples), elem_id="text-examples",
            )  # fmt: skip
            c["example_list"] = gr.State(examples)
        with gr.Column(scale=1):
            c["method"] = gr.Radio(
                list(TEXT_METHODS), value=td["method"], label="method", elem_id="text-method"
            )
            c["button"] = gr.Button("Generate", variant="primary", elem_id="text-generate")
    longest = limits.max_gen_length
    with gr.Row():
        c["steps"] = gr.Slider(1, max(limits.max_steps, longest), value=td["steps"], step=1, label="steps")
        c["length"] = gr.Slider(1, longest, value=td["length"], step=1, label="generation length")
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
            c["block"] = gr.Dropdown(BLOCK_SIZES, value=td["block"], label="block size")
        with gr.Accordion("Window-Diffusion options", open=True), gr.Row():
            c["window"] = gr.Slider(1, longest, value=td["window"], step=1, label="window (masks)")
            c["active"] = gr.Slider(1, longest, value=td["active"], step=1, label="active (masks computed)")
            c["refresh"] = gr.Slider(1, longest, value=td["refresh"], step=1, label="refresh cycle (steps)")
    return c


def _pick_model(gr, backend: DemoBackend, c: dict, source: str, defaults: dict | None):
    """The handler of the model picker: every reset control, the prompt, the examples and the model line
    (``defaults`` update those of the model the tab started on, ``source``)."""

    def pick(model):
        v = text_model_values(backend, model, defaults if model == source else None)
        examples = v["examples"]
        return (
            *(v[n] for n in _TEXT_CONTROLS),
            gr.Textbox(value=v["prompt"], **_prompt_props(examples)),
            gr.Dataset(samples=[[e] for e in examples], visible=bool(examples)),
            examples,
            v["line"],
        )

    outputs = [*(c[n] for n in _TEXT_CONTROLS), c["prompt"], c["examples"], c["example_list"], c["line"]]
    return pick, outputs


def add_text_tab(backend: DemoBackend, source: str, defaults: dict | None = None) -> None:
    """The "Text" tab, built inside an open ``gr.Blocks``, with the model picker (``backend.text_models``;
    interactive when there are several); initial values are ``source``'s (:func:`text_model_values`),
    updated by ``defaults``; picking a model resets them to its own (``source``'s again with ``defaults``)."""
    gr = require("gradio")
    limits = backend.limits
    td = text_model_values(backend, source, defaults)
    track = gr.Progress(track_tqdm=True)

    def run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps, gen_length,
                 block_length, temperature, seed, model=None, progress=track):  # fmt: skip
        return backend.run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps,
                                gen_length, block_length, temperature, seed, model, progress=progress)  # fmt: skip

    def show_example(index, examples):
        return examples[index] if examples and index is not None and 0 <= index < len(examples) else gr.skip()

    with gr.Tab("Text"):
        models = list(backend.text_models)
        with gr.Row():
            model = gr.Dropdown(models, value=source, label="model", elem_id="text-model",
                                interactive=len(models) > 1, scale=1)  # fmt: skip
            line = gr.Markdown(td["line"], elem_id="text-model-line")
        c = _text_inputs(gr, limits, td, td["examples"])
        c["line"] = line
        c["examples"].click(show_example, [c["examples"], c["example_list"]], c["prompt"], api_name=False)
        pick, pick_outputs = _pick_model(gr, backend, c, source, defaults)
        model.input(pick, model, pick_outputs, api_name=False)
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
            [*(c[n] for n in names), model],
            [dense_out, sparse_out, table, metrics, mask, layer, head, state, sets],
            api_name="generate_text",
            concurrency_limit=limits.concurrency,
            concurrency_id="text",
        )
        for control in (layer, head):
            control.input(backend.redraw_mask, [state, layer, head], mask, api_name=False)


__all__ = ["DEFAULT_TEXT_PROMPT", "EXAMPLE_PROMPT_LABEL", "add_text_tab", "model_line", "text_model_values"]
