"""The request handlers behind the demo's tabs, as plain methods (tests call them without a browser):
check every input (:mod:`fastgen.app.limits`, the CLI's option checks), run dense and the accelerated
method through :func:`fastgen.compare.compare_with_dense` (interleaved rounds; no speed-up when sparse
attention never ran), write the outputs into a fresh request folder and build the metrics and pictures."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastgen.optional import require

from .limits import DemoLimits, LazyPipeline, RequestFolders, check_prompt, check_range, gr_error
from .plots import (
    causal_layer_choices,
    chunk_choices,
    draw_block_mask,
    draw_chunk_density,
    draw_chunk_mask,
    layer_choices,
    mean_density,
    metrics_table,
    num_heads,
)

TEXT_METHOD_NAMES = {
    "sparsed": "SparseD",
    "window_diffusion": "Window-Diffusion",
    "sparsed+window_diffusion": "Window-Diffusion + SparseD",
}
"""Display name of each Text-tab method."""

RANDOM_WEIGHTS_NOTE = "random weights: output is noise by design"
"""Shown with the output of a preset whose weights are random."""


def _video_params(steps, height, width, frames, limits: DemoLimits) -> dict:
    return {
        "steps": check_range("steps", steps, 1, limits.max_steps),
        "height": check_range("height", height, limits.min_side, limits.max_side),
        "width": check_range("width", width, limits.min_side, limits.max_side),
        "frames": check_range("frames", frames, 1, limits.max_frames),
    }


def comparison_metrics(comparison) -> dict:
    """The timing figures of a comparison as the metrics JSON shows them (what was measured only)."""
    return {
        "speedup": comparison.speedup,
        "speedup_rounds": comparison.speedups,
        "rounds": comparison.rounds,
        "speedup_excludes_warm_up": True,
        "load_average": comparison.load,
        "cpus": comparison.cpus,
        "sparse_never_ran": comparison.not_sparse,
    }


def comparison_rows(comparison) -> list[tuple[str, object]]:
    """Table rows of the speed-up: the median with its range, rounds and load, or why there is none."""
    rows = [("speedup (median, warm-up excluded)", comparison.speed_summary())]
    warning = comparison.load_warning()
    if warning:
        rows.append(("timing warning", warning))
    return rows


def _note_rows(note: str | None) -> list[tuple[str, object]]:
    return [("note", note)] if note else []


def _locked_comparison(lazy: LazyPipeline, what: str, progress, compare: Callable[[object], object]):
    """``compare(pipe)`` on the lazily loaded pipeline, holding its lock for the whole comparison (loading
    shown as ``what``); a ``ValueError`` from the run becomes a ``gr.Error`` with its message."""
    with lazy.lock:
        if progress is not None:
            progress(0, desc=f"loading the {what}")
        pipe = lazy.get()
        try:
            return compare(pipe)
        except ValueError as err:
            raise gr_error(str(err)) from None


def _write_videos(comparison, folder: str, name: str) -> tuple[str, str]:
    """The dense and accelerated videos of a comparison as ``dense.mp4`` and ``<name>.mp4`` in ``folder``."""
    from fastgen.io import write_video

    dense, fast = (
        write_video(os.path.join(folder, f"{file}.mp4"), result["frames"], fps=int(result.get("fps") or 16))
        for result, file in ((comparison.dense, "dense"), (comparison.accelerated, name))
    )
    return dense, fast


def _video_metrics(
    comparison, label: str, seconds_key: str, own: dict, own_rows: list, **tail
) -> tuple[dict, str]:
    """The metrics JSON and table of a video comparison: times (the accelerated one under ``seconds_key``,
    named ``label`` in the table), speed-up, PSNR / SSIM, then the method's ``own`` figures and rows; ``tail``
    (seed, config, note) ends the JSON and its note heads the table."""
    dense, sparse, fid = comparison.dense, comparison.accelerated, comparison.fidelity
    metrics = {
        "dense_seconds": float(dense["seconds"]),
        seconds_key: float(sparse["seconds"]),
        **comparison_metrics(comparison),
        "psnr": fid["psnr"],
        "identical": fid["identical"],
        "ssim": fid["ssim"],
        **own,
        **tail,
    }
    table = metrics_table(
        [
            *_note_rows(tail.get("note")),
            ("dense time (s)", metrics["dense_seconds"]),
            (f"{label} time (s)", metrics[seconds_key]),
            *comparison_rows(comparison),
            ("PSNR vs dense (dB)", math.inf if fid["identical"] else fid["psnr"]),
            ("SSIM vs dense", metrics["ssim"]),
            *own_rows,
        ]
    )
    return metrics, table


def _mask_outputs(stats, folder):
    """Heatmap of the first recorded layer plus updated layer/head selectors and the stats state."""
    gr = require("gradio")
    from fastgen.stats import stats_layers

    stats = [dict(s) for s in stats_layers(stats)]
    choices = layer_choices(stats)
    layer = choices[0] if choices else None
    picture = draw_block_mask(stats, layer, 0, os.path.join(folder, "mask.png"))
    heads = num_heads(stats, layer)
    return (
        picture,
        gr.Dropdown(choices=choices, value=layer),
        gr.Number(value=0, minimum=0, maximum=max(heads - 1, 0)),
        {"stats": stats, "folder": folder},
    )


def _text_configs(method, skip, select, block_size, window, active, refresh_cycle, limits) -> list:
    """The configs of a Text-tab ``method`` from its controls (Window-Diffusion first), checked."""
    from fastgen.configs import SparseDConfig, WindowDiffusionConfig

    configs = []
    try:
        if "window_diffusion" in method:
            configs.append(
                WindowDiffusionConfig(
                    window=int(check_range("window", window, 1, limits.max_gen_length)),
                    active=int(check_range("active", active, 1, limits.max_gen_length)),
                    refresh_cycle=int(check_range("refresh cycle", refresh_cycle, 1, limits.max_gen_length)),
                )
            )
        if "sparsed" in method:
            configs.append(
                SparseDConfig(
                    skip=check_range("skip", skip, 0.0, 1.0, integer=False),
                    select=check_range("select", select, 0.01, 1.0, integer=False),
                    block_size=int(check_range("block size", block_size, 16, 1024)),
                )
            )
    except ValueError as err:
        raise gr_error(str(err)) from None
    return configs


@dataclass
class DemoBackend:
    """Pipelines, generators and limits behind the Video and Text tabs."""

    video_pipeline: LazyPipeline
    """Lazily loaded video pipeline."""
    text_pipeline: LazyPipeline
    """Lazily loaded diffusion-LM pipeline."""
    video_generate: Callable[..., dict]
    """``generate_video`` or a compatible function."""
    text_generate: Callable[..., dict]
    """``generate_text`` or a compatible function."""
    limits: DemoLimits = field(default_factory=DemoLimits)
    """Request bounds."""
    video_note: str | None = None
    """A line shown with every video output (e.g. that the preset's weights are random)."""
    text_note: str | None = None
    """A line shown with every text output of the served text model."""
    text_name: str = "text model"
    """Name of the served text model (``text_pipeline``): the Text tab's first choice and the model a
    request without one runs."""
    text_others: dict[str, tuple[LazyPipeline, str | None]] = field(default_factory=dict)
    """More text models the Text tab offers, by name: each one's lazily loaded pipeline and note line."""

    def __post_init__(self):
        self.folders = RequestFolders(self.limits.keep_seconds)
        # every text model a request may pick, the served one first: pipeline and note line by name
        self.text_models = {self.text_name: (self.text_pipeline, self.text_note), **self.text_others}

    def text_model_of(self, model: str | None) -> str:
        """The text model a request runs: ``model``, or the served one when it is ``None`` or empty; a
        ``gr.Error`` naming the value and the allowed models when it is not one of them."""
        if model is None or model == "":
            return self.text_name
        if not isinstance(model, str) or model not in self.text_models:
            raise gr_error(f"model={model!r} is not allowed; allowed: {', '.join(self.text_models)}")
        return model

    def _video_config(self, sparsity, block_size, dense_layers, warmup_steps, form):
        from fastgen.configs import RectifiedSpaAttnConfig

        lim = self.limits
        try:
            return RectifiedSpaAttnConfig(
                sparsity=check_range("sparsity", sparsity, 0.0, 0.99, integer=False),
                block_size=int(check_range("block size", block_size, 16, 1024)),
                dense_layers=check_range("dense layers", dense_layers, 0, 1000),
                warmup_steps=check_range("warm-up steps", warmup_steps, 0, lim.max_steps),
                form=form or "exact",
            )
        except ValueError as err:
            raise gr_error(str(err)) from None

    def run_video(self, prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form, steps,
                  seed, height, width, frames, image=None, progress=None):  # fmt: skip
        """Dense and Rectified SpaAttn with one seed; returns outputs, metrics and the mask heatmap.
        ``image`` (a file path) is the first frame for image-to-video pipelines (Wan I2V)."""
        from fastgen.compare import VIDEO_WARM_UP, compare_with_dense, video_fidelity

        lim = self.limits
        prompt = check_prompt(prompt, lim)
        params = _video_params(steps, height, width, frames, lim)
        seed = check_range("seed", seed, 0, 2**31 - 1)
        negative_prompt = (negative_prompt or "").strip()[: lim.max_prompt_chars] or None
        config = self._video_config(sparsity, block_size, dense_layers, warmup_steps, form)
        folder = self.folders.new()
        common = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, **params}
        if image:
            common["image"] = image
        comparison = _locked_comparison(
            self.video_pipeline, "video pipeline", progress,
            lambda pipe: compare_with_dense(
                self.video_generate, pipe, method="rectified", config=config, fidelity=video_fidelity,
                warm_up=VIDEO_WARM_UP, rounds=lim.rounds, **common,
            ),
        )  # fmt: skip
        sparse = comparison.accelerated
        dense_path, sparse_path = _write_videos(comparison, folder, "rectified")
        density = mean_density(sparse.get("stats"))
        metrics, table = _video_metrics(
            comparison, "Rectified SpaAttn", "sparse_seconds", {"density": density},
            [("mean density of sparse layers", density)], seed=seed, config=config.to_dict(), note=self.video_note,
        )  # fmt: skip
        return dense_path, sparse_path, table, metrics, *_mask_outputs(sparse.get("stats"), folder)

    def _text_comparison(self, model, method, configs, prompt, seed, params, progress):
        from fastgen.compare import compare_with_dense, text_fidelity, text_warm_up

        def compare(pipe):
            task = getattr(pipe, "fastgen_task", None)
            answer = task.answer_of(prompt) if task is not None else None
            windowed = "window_diffusion" in method
            comparison = compare_with_dense(
                self.text_generate, pipe, method=method, config=configs if windowed else configs[0],
                fidelity=lambda acc, dense: text_fidelity(acc, dense, answer),
                warm_up=text_warm_up(params["gen_length"]), rounds=self.limits.rounds, prompt=prompt,
                seed=seed, **params,
            )  # fmt: skip
            return comparison, answer

        lazy = self.text_models[model][0]
        comparison, answer = _locked_comparison(lazy, f"diffusion LM {model}", progress, compare)
        return comparison, answer

    def run_text(self, prompt, method, skip, select, block_size, window, active, refresh_cycle, steps, gen_length,
                 block_length, temperature, seed, model=None, progress=None):  # fmt: skip
        """Dense and ``method`` (SparseD, Window-Diffusion or both) with one seed on the text ``model`` (one
        of :attr:`text_models`; ``None``: the served one); returns both texts, the metrics, the block-mask
        heatmap (with its selectors and state) and the picture of the window sets. The answer check is the
        picked model's task."""
        from .window_demo import draw_window_sets

        lim = self.limits
        model = self.text_model_of(model)
        prompt = check_prompt(prompt, lim)
        if method not in TEXT_METHOD_NAMES:
            raise gr_error(f"method={method!r} is not allowed; allowed: {', '.join(TEXT_METHOD_NAMES)}")
        gen_length = check_range("generation length", gen_length, 1, lim.max_gen_length)
        params = {
            "steps": check_range("steps", steps, 1, max(lim.max_steps, lim.max_gen_length)),
            "gen_length": gen_length,
            "block_length": check_range("block length", block_length, 1, gen_length),
            "temperature": check_range("temperature", temperature, 0.0, 2.0, integer=False),
        }
        seed = check_range("seed", seed, 0, 2**31 - 1)
        configs = _text_configs(method, skip, select, block_size, window, active, refresh_cycle, lim)
        folder = self.folders.new()
        comparison, answer = self._text_comparison(model, method, configs, prompt, seed, params, progress)
        stats = comparison.accelerated.get("stats") or {}
        metrics, rows = self._text_metrics(model, method, configs, comparison, answer, seed)
        windowed = "window_diffusion" in method
        sets_picture = draw_window_sets(
            stats.get("trace") if windowed else None,
            int(stats.get("positions") or 0),
            int(stats.get("prompt_length") or 0),
            os.path.join(folder, "window_sets.png"),
        )
        return (
            comparison.dense["text"],
            comparison.accelerated["text"],
            metrics_table(rows),
            metrics,
            *_mask_outputs(stats, folder),
            sets_picture,
        )

    def _text_metrics(self, model, method, configs, comparison, answer, seed):
        """The metrics JSON and the table rows of a Text-tab comparison on ``model``."""
        dense, fast, fid = comparison.dense, comparison.accelerated, comparison.fidelity
        note = self.text_models[model][1]
        stats = fast.get("stats") or {}
        name = TEXT_METHOD_NAMES[method]
        windowed = "window_diffusion" in method
        metrics = {
            "model": model,
            "method": method,
            "dense_seconds": float(dense["seconds"]),
            "accelerated_seconds": float(fast["seconds"]),
            **comparison_metrics(comparison),
            "token_agreement": fid["token_agreement"],
            "dense_tokens_per_s": float(dense["tokens_per_s"]),
            "accelerated_tokens_per_s": float(fast["tokens_per_s"]),
            "seed": seed,
            "config": [c.to_dict() for c in configs] if windowed else configs[0].to_dict(),
            "note": note,
        }
        rows = [
            *_note_rows(note),
            ("model", model),
            ("dense time (s)", metrics["dense_seconds"]),
            (f"{name} time (s)", metrics["accelerated_seconds"]),
            *comparison_rows(comparison),
            ("token agreement", metrics["token_agreement"]),
            ("dense tokens/s", metrics["dense_tokens_per_s"]),
            (f"{name} tokens/s", metrics["accelerated_tokens_per_s"]),
        ]
        if "sparsed" in method:  # the same layer rows the heatmap draws
            metrics["density"] = mean_density(stats)
            rows.append(("mean density of sparse layers", metrics["density"]))
        if windowed:  # the same trace the window picture draws
            metrics.update(refresh_steps=stats.get("refresh_steps"), pruned_steps=stats.get("pruned_steps"),
                           mean_rows_run=stats.get("mean_queries"), mean_keys=stats.get("mean_keys"))  # fmt: skip
            rows += [
                ("refresh / pruned steps", f"{metrics['refresh_steps']} / {metrics['pruned_steps']}"),
                ("mean rows run per step", metrics["mean_rows_run"]),
                ("mean keys attended per step", metrics["mean_keys"]),
            ]
        if answer is not None:
            metrics.update(answer=answer, dense_correct=fid["dense_correct"],
                           accelerated_correct=fid["accelerated_correct"])  # fmt: skip
            rows += [
                ("expected answer", answer),
                ("dense answer right", "yes" if fid["dense_correct"] else "no"),
                (f"{name} answer right", "yes" if fid["accelerated_correct"] else "no"),
            ]
        return metrics, rows

    def redraw_mask(self, state, layer, head):
        """Heatmap for another layer/head of the last generation (no new generation)."""
        if not state:
            return None
        folder = state["folder"]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"mask-{layer}-{int(head or 0)}-{time.time_ns()}.png")
        return draw_block_mask(state["stats"], layer, head, path)


@dataclass
class CausalDemoBackend:
    """Pipeline, generator and limits behind the Causal tab (dense vs Light Forcing)."""

    pipeline: LazyPipeline
    """Lazily loaded ``CausalWanPipeline``."""
    generate: Callable[..., dict]
    """``generate_causal_video`` or a compatible function."""
    limits: DemoLimits = field(default_factory=DemoLimits)
    """Request bounds."""
    note: str | None = None
    """A line shown with every output (e.g. that the preset's weights are random)."""

    def __post_init__(self):
        self.folders = RequestFolders(self.limits.keep_seconds)

    def _config(self, sparsity, sparsity_base, block_size, rectify):
        from fastgen.configs import LightForcingConfig

        try:
            return LightForcingConfig(
                sparsity=check_range("sparsity", sparsity, 0.0, 0.99, integer=False),
                sparsity_base=check_range("sparsity base", sparsity_base, 0.0, 0.99, integer=False),
                block_size=int(check_range("block size", block_size, 16, 1024)),
                rectify=bool(rectify),
            )
        except ValueError as err:
            raise gr_error(str(err)) from None

    def run(self, prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width, frames,
            local_attn_frames=0, sink_frames=0, progress=None):  # fmt: skip
        """Dense and Light Forcing with one seed: both videos, metrics, per-chunk density, a mask heatmap.
        ``local_attn_frames`` (0: every earlier frame) and ``sink_frames`` set the causal local window."""
        from fastgen.compare import VIDEO_WARM_UP, compare_with_dense, video_fidelity
        from fastgen.processors.light_forcing_wan import chunk_densities

        lim = self.limits
        prompt = check_prompt(prompt, lim)
        local = check_range("local attention frames", local_attn_frames or 0, 0, lim.max_frames)
        params = {
            **_video_params(steps, height, width, frames, lim),
            "local_attn_frames": local or None,
            "sink_frames": check_range("sink frames", sink_frames or 0, 0, lim.max_frames),
        }
        seed = check_range("seed", seed, 0, 2**31 - 1)
        config = self._config(sparsity, sparsity_base, block_size, rectify)
        folder = self.folders.new()
        comparison = _locked_comparison(
            self.pipeline, "causal Wan pipeline", progress,
            lambda pipe: compare_with_dense(
                self.generate, pipe, method="light_forcing", config=config, fidelity=video_fidelity,
                warm_up=VIDEO_WARM_UP, rounds=lim.rounds, prompt=prompt, seed=seed, **params,
            ),
        )  # fmt: skip
        dense_path, sparse_path = _write_videos(comparison, folder, "light_forcing")
        stats = list(comparison.accelerated.get("stats") or [])
        per_chunk = chunk_densities(stats)
        metrics, table = _video_metrics(
            comparison, "Light Forcing", "light_forcing_seconds",
            {"chunk_density": {str(c): d for c, d in per_chunk.items()}},
            [(f"density of chunk {c}", d) for c, d in per_chunk.items()],
            seed=seed, config=config.to_dict(), note=self.note,
        )  # fmt: skip
        density_png = draw_chunk_density(stats, os.path.join(folder, "density.png"))
        return dense_path, sparse_path, table, metrics, density_png, *self._mask_outputs(stats, folder)

    def _mask_outputs(self, stats, folder):
        gr = require("gradio")

        chunks = chunk_choices(stats)
        chunk = chunks[-1] if chunks else None
        layers = causal_layer_choices(stats, chunk)
        layer = layers[0] if layers else None
        picture = draw_chunk_mask(stats, chunk, layer, 0, os.path.join(folder, "mask.png"))
        heads = num_heads([s for s in stats if str(s.get("chunk")) == str(chunk)], layer)
        return (
            picture,
            gr.Dropdown(choices=chunks, value=chunk),
            gr.Dropdown(choices=layers, value=layer),
            gr.Number(value=0, minimum=0, maximum=max(heads - 1, 0)),
            {"stats": stats, "folder": folder},
        )

    def redraw_mask(self, state, chunk, layer, head):
        """Heatmap for another chunk / layer / head of the last generation (no new generation)."""
        if not state:
            return None
        folder = state["folder"]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"mask-{chunk}-{layer}-{int(head or 0)}-{time.time_ns()}.png")
        return draw_chunk_mask(state["stats"], chunk, layer, head, path)


__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "TEXT_METHOD_NAMES",
    "CausalDemoBackend",
    "DemoBackend",
    "comparison_metrics",
]
