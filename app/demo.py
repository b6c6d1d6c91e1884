"""Gradio demo of fastgen: dense vs sparse attention side by side, for video and for diffusion LMs.

The Video tab runs a video DiT (Wan / HunyuanVideo) with Rectified SpaAttn, the Causal tab the
autoregressive (Self-Forcing) Wan with Light Forcing (per-chunk density and the mask of a chosen chunk /
layer / head), the Text tab a diffusion LM with the method chosen there: SparseD, Window-Diffusion or both
(window / active / refresh controls, and a picture of the active / window / far-field positions at every
step). Generate runs dense and accelerated with the same seed and shows both outputs with time, speedup
and fidelity (PSNR/SSIM for video, token agreement, tokens/s and, for the trained task's prompts, whether
each answer is right for text), plus a heatmap of the block mask the sparse attention kept for a chosen
layer and head.

``build_demo`` takes its loaders and generators as arguments (tests pass tiny presets or fakes); by
default they are ``fastgen.pipelines.video_runner`` / ``text_runner`` on the tiny presets. Pipelines are
loaded lazily on first use and cached; every request writes into its own temporary folder.

Example::

    fastgen demo --video-preset tiny-wan --text-preset tiny-llada --port 7860
    python -m fastgen.app --video-model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastgen.optional import require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on what one request may ask for (checked on the server, not only by the sliders)."""

    max_steps: int = 50
    """Most denoising steps per run."""
    max_frames: int = 81
    """Most video frames."""
    max_side: int = 1280
    """Largest video height or width in pixels."""
    min_side: int = 16
    """Smallest video height or width in pixels."""
    max_gen_length: int = 512
    """Most generated tokens."""
    max_prompt_chars: int = 4000
    """Longest prompt in characters (the trained preset's task prompts are about 2,400)."""
    concurrency: int = 1
    """Requests served at once per tab (a pipeline runs one generation at a time)."""
    keep_seconds: float = 3600.0
    """Request folders older than this are deleted."""


VIDEO_DEFAULTS = {
    "steps": 4,
    "height": 128,
    "width": 160,
    "frames": 9,
    "sparsity": 0.9,
    "block_size": 128,
    "dense_layers": 0,
    "warmup_steps": 1,
}
"""Initial values of the Video tab: the ``tiny-wan-long`` preset's own (6400 tokens, attention-bound)."""
TEXT_DEFAULTS = {
    "method": "sparsed",
    "steps": 4,
    "gen_length": 4,
    "block_length": 4,
    "skip": 0.2,
    "select": 0.3,
    "block_size": 32,
    "window": 64,
    "active": 16,
    "refresh_cycle": 32,
}
"""Initial values of the Text tab: the decoding of the ``tiny-llada-kv`` model card; Window-Diffusion at the
authors' LLaDA settings 64 / 16 / 32 (within both rules' constraints at one token per step)."""

TEXT_METHODS = ("sparsed", "window_diffusion", "sparsed+window_diffusion")
"""Methods the Text tab compares with dense."""

TEXT_EXAMPLE_SEEDS = (1_000_000, 1_000_001, 1_000_002)
"""Held-out task examples offered as prompts in the Text tab (seeds of ``KVTask.example``)."""


def task_examples(preset: str | None) -> list[str]:
    """Example prompts from the task generator when ``preset`` is a model trained on a checkable task."""
    if preset != "tiny-llada-kv":
        return []
    from fastgen.pipelines.kv_task import KVTask

    return [KVTask().example(seed).prompt for seed in TEXT_EXAMPLE_SEEDS]


class LazyPipeline:
    """Loads a pipeline on first use and caches it; one generation at a time per pipeline."""

    def __init__(self, loader: Callable[[], object]):
        self.loader = loader
        self.pipe = None
        self.lock = threading.Lock()

    def get(self):
        """The cached pipeline (built on the first call; callers hold ``lock`` while generating)."""
        if self.pipe is None:
            self.pipe = self.loader()
        return self.pipe


def _gr_error(message: str):
    gr = require("gradio")

    return gr.Error(message)


def check_range(name: str, value, low, high, integer: bool = True):
    """``value`` as int/float within ``[low, high]``; a ``gr.Error`` naming the input otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise _gr_error(f"{name} is missing; allowed: {low}..{high}")
    if integer and float(value) != int(value):
        raise _gr_error(f"{name}={value} must be a whole number in {low}..{high}")
    value = int(value) if integer else float(value)
    if not low <= value <= high:
        raise _gr_error(f"{name}={value} is out of range; allowed: {low}..{high}")
    return value


def _check_prompt(prompt: str, limits: DemoLimits) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise _gr_error("prompt is empty; write a prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise _gr_error(f"prompt has {len(prompt)} characters; allowed: at most {limits.max_prompt_chars}")
    return prompt


class RequestFolders:
    """One fresh temporary folder per request under a demo root; old ones are pruned."""

    def __init__(self, keep_seconds: float):
        self.root = tempfile.mkdtemp(prefix="fastgen-demo-")
        self.keep_seconds = keep_seconds

    def new(self) -> str:
        """A new, empty folder for one request (folders older than ``keep_seconds`` are removed)."""
        now = time.time()
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if now - os.path.getmtime(path) > self.keep_seconds:
                shutil.rmtree(path, ignore_errors=True)
        return tempfile.mkdtemp(prefix="req-", dir=self.root)


# ----------------------------------------------------------------------------------------------------
# block-mask heatmap


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


def _num_heads(stats: list[dict] | None, layer: str | None) -> int:
    _, mask, _ = _mask_of(stats, layer, 0)
    return 1 if mask is None else int(mask.shape[0])


def _mean_density(stats) -> float | None:
    """Mean density over the recorded sparse layers: the same rows the heatmap draws (``None`` if none)."""
    from fastgen.stats import mean_stat, stats_layers

    return mean_stat(stats_layers(stats), "density")


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞ (identical)"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _metrics_table(rows: list[tuple[str, object]]) -> str:
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)


TEXT_METHOD_NAMES = {
    "sparsed": "SparseD",
    "window_diffusion": "Window-Diffusion",
    "sparsed+window_diffusion": "Window-Diffusion + SparseD",
}
"""Display name of each Text-tab method."""


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
        raise _gr_error(str(err)) from None
    return configs


# ----------------------------------------------------------------------------------------------------
# request handlers (plain functions of a DemoBackend, so tests can call them without a browser)


@dataclass
class DemoBackend:
    """Pipelines, generators and limits behind the two tabs."""

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

    def __post_init__(self):
        self.folders = RequestFolders(self.limits.keep_seconds)

    def run_video(self, prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form, steps,
                  seed, height, width, frames, image=None, progress=None):  # fmt: skip
        """Dense and Rectified SpaAttn with one seed; returns outputs, metrics and the mask heatmap.
        ``image`` (a file path) is the first frame for image-to-video pipelines (Wan I2V)."""
        from fastgen.compare import VIDEO_WARM_UP, compare_with_dense, video_fidelity
        from fastgen.configs import RectifiedSpaAttnConfig

        lim = self.limits
        prompt = _check_prompt(prompt, lim)
        params = {
            "steps": check_range("steps", steps, 1, lim.max_steps),
            "height": check_range("height", height, lim.min_side, lim.max_side),
            "width": check_range("width", width, lim.min_side, lim.max_side),
            "frames": check_range("frames", frames, 1, lim.max_frames),
        }
        seed = check_range("seed", seed, 0, 2**31 - 1)
        negative_prompt = (negative_prompt or "").strip()[: lim.max_prompt_chars] or None
        try:
            config = RectifiedSpaAttnConfig(
                sparsity=check_range("sparsity", sparsity, 0.0, 0.99, integer=False),
                block_size=int(check_range("block size", block_size, 16, 1024)),
                dense_layers=check_range("dense layers", dense_layers, 0, 1000),
                warmup_steps=check_range("warm-up steps", warmup_steps, 0, lim.max_steps),
                form=form or "exact",
            )
        except ValueError as err:
            raise _gr_error(str(err)) from None
        folder = self.folders.new()
        with self.video_pipeline.lock:
            if progress is not None:
                progress(0, desc="loading the video pipeline")
            pipe = self.video_pipeline.get()
            common = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, **params}
            if image:
                common["image"] = image
            try:
                comparison = compare_with_dense(
                    self.video_generate, pipe, method="rectified", config=config, fidelity=video_fidelity,
                    warm_up=VIDEO_WARM_UP, **common,
                )  # fmt: skip
            except ValueError as err:
                raise _gr_error(str(err)) from None
        dense, sparse = comparison.dense, comparison.accelerated
        from fastgen.io import write_video

        dense_path = write_video(
            os.path.join(folder, "dense.mp4"), dense["frames"], fps=int(dense.get("fps") or 16)
        )
        sparse_path = write_video(
            os.path.join(folder, "rectified.mp4"), sparse["frames"], fps=int(sparse.get("fps") or 16)
        )
        fid = comparison.fidelity
        value = math.inf if fid["identical"] else fid["psnr"]
        metrics = {
            "dense_seconds": float(dense["seconds"]),
            "sparse_seconds": float(sparse["seconds"]),
            "speedup": comparison.speedup,
            "speedup_excludes_warm_up": True,
            "psnr": fid["psnr"],
            "identical": fid["identical"],
            "ssim": fid["ssim"],
            "density": _mean_density(sparse.get("stats")),
            "seed": seed,
            "config": config.to_dict(),
        }
        table = _metrics_table(
            [
                ("dense time (s)", metrics["dense_seconds"]),
                ("Rectified SpaAttn time (s)", metrics["sparse_seconds"]),
                ("speedup (warm-up excluded)", metrics["speedup"]),
                ("PSNR vs dense (dB)", value),
                ("SSIM vs dense", metrics["ssim"]),
                ("mean density of sparse layers", metrics["density"]),
            ]
        )
        return dense_path, sparse_path, table, metrics, *self._mask_outputs(sparse.get("stats"), folder)

    def run_text(self, prompt, method, skip, select, block_size, window, active, refresh_cycle, steps, gen_length,
                 block_length, temperature, seed, progress=None):  # fmt: skip
        """Dense and ``method`` (SparseD, Window-Diffusion or both) with one seed; returns both texts, the
        metrics, the block-mask heatmap (with its selectors and state) and the picture of the window sets."""
        from fastgen.compare import compare_with_dense, text_fidelity, text_warm_up

        lim = self.limits
        prompt = _check_prompt(prompt, lim)
        if method not in TEXT_METHODS:
            raise _gr_error(f"method={method!r} is not allowed; allowed: {', '.join(TEXT_METHODS)}")
        gen_length = check_range("generation length", gen_length, 1, lim.max_gen_length)
        params = {
            "steps": check_range("steps", steps, 1, max(lim.max_steps, lim.max_gen_length)),
            "gen_length": gen_length,
            "block_length": check_range("block length", block_length, 1, gen_length),
            "temperature": check_range("temperature", temperature, 0.0, 2.0, integer=False),
        }
        seed = check_range("seed", seed, 0, 2**31 - 1)
        configs = _text_configs(method, skip, select, block_size, window, active, refresh_cycle, lim)
        windowed = "window_diffusion" in method
        folder = self.folders.new()
        with self.text_pipeline.lock:
            if progress is not None:
                progress(0, desc="loading the diffusion LM")
            pipe = self.text_pipeline.get()
            task = getattr(pipe, "fastgen_task", None)
            answer = task.answer_of(prompt) if task is not None else None
            common = {"prompt": prompt, "seed": seed, **params}
            try:
                comparison = compare_with_dense(
                    self.text_generate, pipe, method=method, config=configs if windowed else configs[0],
                    fidelity=lambda acc, dense: text_fidelity(acc, dense, answer),
                    warm_up=text_warm_up(gen_length), **common,
                )  # fmt: skip
            except ValueError as err:
                raise _gr_error(str(err)) from None
        dense, fast, fid = comparison.dense, comparison.accelerated, comparison.fidelity
        stats = fast.get("stats") or {}
        name = TEXT_METHOD_NAMES[method]
        metrics = {
            "method": method,
            "dense_seconds": float(dense["seconds"]),
            "accelerated_seconds": float(fast["seconds"]),
            "speedup": comparison.speedup,
            "speedup_excludes_warm_up": True,
            "token_agreement": fid["token_agreement"],
            "dense_tokens_per_s": float(dense["tokens_per_s"]),
            "accelerated_tokens_per_s": float(fast["tokens_per_s"]),
            "seed": seed,
            "config": [c.to_dict() for c in configs] if windowed else configs[0].to_dict(),
        }
        rows = [
            ("dense time (s)", metrics["dense_seconds"]),
            (f"{name} time (s)", metrics["accelerated_seconds"]),
            ("speedup (warm-up excluded)", metrics["speedup"]),
            ("token agreement", metrics["token_agreement"]),
            ("dense tokens/s", metrics["dense_tokens_per_s"]),
            (f"{name} tokens/s", metrics["accelerated_tokens_per_s"]),
        ]
        if "sparsed" in method:  # the same layer rows the heatmap draws
            metrics["density"] = _mean_density(stats)
            rows.append(("mean density of sparse layers", metrics["density"]))
        if windowed:  # the same trace the window picture draws
            metrics.update(
                refresh_steps=stats.get("refresh_steps"),
                pruned_steps=stats.get("pruned_steps"),
                mean_rows_run=stats.get("mean_queries"),
                mean_keys=stats.get("mean_keys"),
            )
            rows += [
                ("refresh / pruned steps", f"{metrics['refresh_steps']} / {metrics['pruned_steps']}"),
                ("mean rows run per step", metrics["mean_rows_run"]),
                ("mean keys attended per step", metrics["mean_keys"]),
            ]
        if answer is not None:
            metrics.update(
                answer=answer,
                dense_correct=fid["dense_correct"],
                accelerated_correct=fid["accelerated_correct"],
            )
            rows += [
                ("expected answer", answer),
                ("dense answer right", "yes" if fid["dense_correct"] else "no"),
                (f"{name} answer right", "yes" if fid["accelerated_correct"] else "no"),
            ]
        from .window_demo import draw_window_sets

        sets_picture = draw_window_sets(
            stats.get("trace") if windowed else None,
            int(stats.get("positions") or 0),
            int(stats.get("prompt_length") or 0),
            os.path.join(folder, "window_sets.png"),
        )
        return (
            dense["text"],
            fast["text"],
            _metrics_table(rows),
            metrics,
            *self._mask_outputs(stats, folder),
            sets_picture,
        )

    def _mask_outputs(self, stats, folder):
        """Heatmap of the first recorded layer plus updated layer/head selectors and the stats state."""
        gr = require("gradio")

        from fastgen.stats import stats_layers

        stats = [dict(s) for s in stats_layers(stats)]
        choices = layer_choices(stats)
        layer = choices[0] if choices else None
        picture = draw_block_mask(stats, layer, 0, os.path.join(folder, "mask.png"))
        heads = _num_heads(stats, layer)
        return (
            picture,
            gr.Dropdown(choices=choices, value=layer),
            gr.Number(value=0, minimum=0, maximum=max(heads - 1, 0)),
            {"stats": stats, "folder": folder},
        )

    def redraw_mask(self, state, layer, head):
        """Heatmap for another layer/head of the last generation (no new generation)."""
        if not state:
            return None
        folder = state["folder"]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"mask-{layer}-{int(head or 0)}-{time.time_ns()}.png")
        return draw_block_mask(state["stats"], layer, head, path)


# ----------------------------------------------------------------------------------------------------
# causal (autoregressive) Wan: dense vs Light Forcing


CAUSAL_DEFAULTS = {"height": 128, "width": 128, "frames": 33, "sparsity": 0.88, "sparsity_base": 0.98,
                   "block_size": 128}  # fmt: skip
"""Initial values of the Causal tab (the tiny-causal-wan preset: 9 latent frames = 3 chunks)."""


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
    from matplotlib.figure import Figure

    from fastgen.processors.light_forcing_wan import chunk_densities

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


def _default_causal_generate(pipe, **kwargs):
    from fastgen.pipelines.causal_video_runner import generate_causal_video

    return generate_causal_video(pipe, **kwargs)


@dataclass
class CausalDemoBackend:
    """Pipeline, generator and limits behind the Causal tab (dense vs Light Forcing)."""

    pipeline: LazyPipeline
    """Lazily loaded ``CausalWanPipeline``."""
    generate: Callable[..., dict]
    """``generate_causal_video`` or a compatible function."""
    limits: DemoLimits = field(default_factory=DemoLimits)
    """Request bounds."""

    def __post_init__(self):
        self.folders = RequestFolders(self.limits.keep_seconds)

    def run(self, prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width, frames,
            progress=None):  # fmt: skip
        """Dense and Light Forcing with one seed: both videos, metrics, per-chunk density, a mask heatmap."""
        from fastgen.configs import LightForcingConfig
        from fastgen.metrics import psnr, ssim
        from fastgen.processors.light_forcing_wan import chunk_densities

        lim = self.limits
        prompt = _check_prompt(prompt, lim)
        params = {
            "steps": check_range("steps", steps, 1, lim.max_steps),
            "height": check_range("height", height, lim.min_side, lim.max_side),
            "width": check_range("width", width, lim.min_side, lim.max_side),
            "frames": check_range("frames", frames, 1, lim.max_frames),
        }
        seed = check_range("seed", seed, 0, 2**31 - 1)
        try:
            config = LightForcingConfig(
                sparsity=check_range("sparsity", sparsity, 0.0, 0.99, integer=False),
                sparsity_base=check_range("sparsity base", sparsity_base, 0.0, 0.99, integer=False),
                block_size=int(check_range("block size", block_size, 16, 1024)),
                rectify=bool(rectify),
            )
        except ValueError as err:
            raise _gr_error(str(err)) from None
        folder = self.folders.new()
        with self.pipeline.lock:
            if progress is not None:
                progress(0, desc="loading the causal Wan pipeline")
            pipe = self.pipeline.get()
            common = {"prompt": prompt, "seed": seed, **params}
            try:
                dense = self.generate(pipe, method="dense", config=None, **common)
                sparse = self.generate(pipe, method="light_forcing", config=config, **common)
            except ValueError as err:
                raise _gr_error(str(err)) from None
        from fastgen.io import write_video

        dense_path = write_video(
            os.path.join(folder, "dense.mp4"), dense["frames"], fps=int(dense.get("fps") or 16)
        )
        sparse_path = write_video(
            os.path.join(folder, "light_forcing.mp4"), sparse["frames"], fps=int(sparse.get("fps") or 16)
        )
        value = psnr(dense["frames"], sparse["frames"])
        stats = list(sparse.get("stats") or [])
        per_chunk = chunk_densities(stats)
        metrics = {
            "dense_seconds": float(dense["seconds"]),
            "light_forcing_seconds": float(sparse["seconds"]),
            "speedup": float(dense["seconds"]) / max(float(sparse["seconds"]), 1e-9),
            "psnr": None if math.isinf(value) else float(value),
            "identical": bool(math.isinf(value)),
            "ssim": float(ssim(dense["frames"], sparse["frames"])),
            "chunk_density": {str(c): d for c, d in per_chunk.items()},
            "seed": seed,
            "config": config.to_dict(),
        }
        table = _metrics_table(
            [
                ("dense time (s)", metrics["dense_seconds"]),
                ("Light Forcing time (s)", metrics["light_forcing_seconds"]),
                ("speedup", metrics["speedup"]),
                ("PSNR vs dense (dB)", value),
                ("SSIM vs dense", metrics["ssim"]),
                *[(f"density of chunk {c}", d) for c, d in per_chunk.items()],
            ]
        )
        density_png = draw_chunk_density(stats, os.path.join(folder, "density.png"))
        return dense_path, sparse_path, table, metrics, density_png, *self._mask_outputs(stats, folder)

    def _mask_outputs(self, stats, folder):
        import gradio as gr

        chunks = chunk_choices(stats)
        chunk = chunks[-1] if chunks else None
        layers = causal_layer_choices(stats, chunk)
        layer = layers[0] if layers else None
        picture = draw_chunk_mask(stats, chunk, layer, 0, os.path.join(folder, "mask.png"))
        heads = _num_heads([s for s in stats if str(s.get("chunk")) == str(chunk)], layer)
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


def add_causal_tab(backend: CausalDemoBackend, source: str, defaults: dict | None = None) -> None:
    """The "Causal (Light Forcing)" tab, built inside an open ``gr.Blocks``."""
    import gradio as gr

    limits = backend.limits
    cd = {**CAUSAL_DEFAULTS, **(defaults or {})}
    track = gr.Progress(track_tqdm=True)

    def run(prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width, frames,
            progress=track):  # fmt: skip
        return backend.run(prompt, sparsity, sparsity_base, block_size, rectify, steps, seed, height, width,
                           frames, progress=progress)  # fmt: skip

    with gr.Tab("Causal video (Light Forcing)"):
        gr.Markdown(
            f"Model: `{source}`: autoregressive Wan (Self-Forcing chunks of 3 latent frames, KV cache) with "
            "Light Forcing (Chunk-Aware Growth + Hierarchical Sparse Attention)."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", value="A paper boat drifting down a stream", lines=2)
            with gr.Column(scale=1):
                button = gr.Button("Generate", variant="primary", elem_id="causal-generate")
        with gr.Row():
            steps = gr.Slider(1, limits.max_steps, value=4, step=1, label="denoising steps per chunk")
            seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
            height = gr.Slider(limits.min_side, limits.max_side, value=cd["height"], step=16, label="height")
            width = gr.Slider(limits.min_side, limits.max_side, value=cd["width"], step=16, label="width")
            frames = gr.Slider(1, limits.max_frames, value=cd["frames"], step=4, label="frames (4k+1)")
        with gr.Accordion("Light Forcing options", open=True), gr.Row():
            sparsity = gr.Slider(0.0, 0.99, value=cd["sparsity"], step=0.01, label="target sparsity")
            sparsity_base = gr.Slider(0.0, 0.99, value=cd["sparsity_base"], step=0.01, label="sparsity base")
            block = gr.Dropdown([16, 32, 64, 128, 256], value=cd["block_size"], label="block size")
            rectify = gr.Checkbox(value=False, label="rectify dropped blocks (beyond the paper)")
        with gr.Row():
            dense_out = gr.Video(label="dense", format="mp4", elem_id="causal-dense")
            sparse_out = gr.Video(label="Light Forcing", format="mp4", elem_id="causal-sparse")
        with gr.Row():
            with gr.Column():
                table = gr.Markdown(elem_id="causal-metrics")
                metrics = gr.JSON(label="metrics")
                density = gr.Image(label="density per chunk", type="filepath", elem_id="causal-density")
            with gr.Column():
                mask = gr.Image(label="block mask (kept key blocks)", type="filepath", elem_id="causal-mask")
                with gr.Row():
                    chunk = gr.Dropdown([], label="chunk", allow_custom_value=True)
                    layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                    head = gr.Number(value=0, precision=0, minimum=0, label="head")
        state = gr.State()
        button.click(
            run,
            [prompt, sparsity, sparsity_base, block, rectify, steps, seed, height, width, frames],
            [dense_out, sparse_out, table, metrics, density, mask, chunk, layer, head, state],
            api_name="generate_causal",
            concurrency_limit=limits.concurrency,
            concurrency_id="causal",
        )
        for control in (chunk, layer, head):
            control.input(backend.redraw_mask, [state, chunk, layer, head], mask, api_name=False)


# ----------------------------------------------------------------------------------------------------
# UI


def _default_video_loader(preset, model):
    def load():
        from fastgen.pipelines.video_runner import load_video_pipeline

        return load_video_pipeline(preset=preset if model is None else None, model=model)

    return load


def _default_text_loader(preset, model):
    def load():
        from fastgen.pipelines.text_runner import load_text_pipeline

        return load_text_pipeline(preset=preset if model is None else None, model=model)

    return load


def _default_video_generate(pipe, **kwargs):
    from fastgen.pipelines.video_runner import generate_video

    return generate_video(pipe, **kwargs)


def _default_text_generate(pipe, **kwargs):
    from fastgen.pipelines.text_runner import generate_text

    return generate_text(pipe, **kwargs)


def build_demo(
    video_loader: Callable[[], object] | None = None,
    text_loader: Callable[[], object] | None = None,
    video_generate: Callable[..., dict] | None = None,
    text_generate: Callable[..., dict] | None = None,
    limits: DemoLimits | None = None,
    *,
    video_preset: str = "tiny-wan-long",
    text_preset: str = "tiny-llada-kv",
    video_model: str | None = None,
    text_model: str | None = None,
    video_defaults: dict | None = None,
    text_defaults: dict | None = None,
    causal_loader: Callable[[], object] | None = None,
    causal_generate: Callable[..., dict] | None = None,
    causal_preset: str = "tiny-causal-wan",
    causal_model: str | None = None,
    causal_defaults: dict | None = None,
):
    """The demo as a ``gr.Blocks`` (queue already on with ``limits.concurrency`` per tab).

    Loaders are zero-argument callables returning a pipeline; generators follow
    ``fastgen.pipelines.video_runner.generate_video`` / ``text_runner.generate_text``. Defaults: those
    runners on ``video_preset`` / ``text_preset`` (or ``video_model`` / ``text_model``). The Causal tab
    (dense vs Light Forcing) uses ``causal_loader`` / ``causal_generate`` (default
    ``causal_video_runner.generate_causal_video`` on ``causal_preset`` or ``causal_model``).
    """
    gr = require("gradio")

    limits = limits or DemoLimits()
    backend = DemoBackend(
        video_pipeline=LazyPipeline(video_loader or _default_video_loader(video_preset, video_model)),
        text_pipeline=LazyPipeline(text_loader or _default_text_loader(text_preset, text_model)),
        video_generate=video_generate or _default_video_generate,
        text_generate=text_generate or _default_text_generate,
        limits=limits,
    )
    vd = {**VIDEO_DEFAULTS, **(video_defaults or {})}
    td = {**TEXT_DEFAULTS, **(text_defaults or {})}
    block_sizes = [16, 32, 64, 128, 256]

    track = gr.Progress(track_tqdm=True)  # gradio finds it as the handlers' default and reports tqdm bars

    def run_video(prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form, steps, seed,
                  height, width, frames, image=None, progress=track):  # fmt: skip
        return backend.run_video(prompt, negative_prompt, sparsity, block_size, dense_layers, warmup_steps, form,
                                 steps, seed, height, width, frames, image=image, progress=progress)  # fmt: skip

    def run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps, gen_length,
                 block_length, temperature, seed, progress=track):  # fmt: skip
        return backend.run_text(prompt, method, skip, select, block_size, window, active, refresh_cycle, steps,
                                gen_length, block_length, temperature, seed, progress=progress)  # fmt: skip

    source_video = video_model or video_preset
    source_text = text_model or text_preset
    with gr.Blocks(title="fastgen: dense vs sparse attention", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# fastgen: dense vs sparse attention\n"
            "Generate runs the dense model and the accelerated one with the **same seed** and shows both, "
            "with time, speedup and fidelity, and the block mask the sparse attention kept."
        )
        with gr.Tab("Video (Rectified SpaAttn)"):
            gr.Markdown(f"Model: `{source_video}`: video DiT with Rectified SpaAttn.")
            with gr.Row():
                with gr.Column(scale=2):
                    v_prompt = gr.Textbox(
                        label="prompt", value="A cat surfing a small wave at sunset", lines=2
                    )
                    v_negative = gr.Textbox(label="negative prompt", value="")
                with gr.Column(scale=1):
                    v_image = gr.Image(
                        label="first frame (image-to-video models only)",
                        type="filepath",
                        elem_id="video-image",
                    )
                    v_button = gr.Button("Generate", variant="primary", elem_id="video-generate")
            with gr.Row():
                v_steps = gr.Slider(1, limits.max_steps, value=vd["steps"], step=1, label="steps")
                v_seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
                v_height = gr.Slider(
                    limits.min_side, limits.max_side, value=vd["height"], step=16, label="height"
                )
                v_width = gr.Slider(
                    limits.min_side, limits.max_side, value=vd["width"], step=16, label="width"
                )
                v_frames = gr.Slider(1, limits.max_frames, value=vd["frames"], step=1, label="frames")
            with gr.Accordion("Rectified SpaAttn options", open=True), gr.Row():
                v_sparsity = gr.Slider(
                    0.0, 0.99, value=vd["sparsity"], step=0.01, label="sparsity (blocks dropped)"
                )
                v_block = gr.Dropdown(block_sizes, value=vd["block_size"], label="block size")
                v_dense_layers = gr.Number(
                    value=vd["dense_layers"], precision=0, minimum=0, label="dense layers (first N)"
                )
                v_warmup = gr.Number(
                    value=vd["warmup_steps"], precision=0, minimum=0, label="dense warm-up steps"
                )
                v_form = gr.Radio(["exact", "paper", "none"], value="exact", label="rectification")
            with gr.Row():
                v_dense_out = gr.Video(label="dense", format="mp4", elem_id="video-dense")
                v_sparse_out = gr.Video(label="Rectified SpaAttn", format="mp4", elem_id="video-sparse")
            with gr.Row():
                with gr.Column():
                    v_table = gr.Markdown(elem_id="video-metrics")
                    v_metrics = gr.JSON(label="metrics")
                with gr.Column():
                    v_mask = gr.Image(
                        label="block mask (kept key blocks)", type="filepath", elem_id="video-mask"
                    )
                    with gr.Row():
                        v_layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                        v_head = gr.Number(value=0, precision=0, minimum=0, label="head")
            v_state = gr.State()
            v_button.click(
                run_video,
                [
                    v_prompt,
                    v_negative,
                    v_sparsity,
                    v_block,
                    v_dense_layers,
                    v_warmup,
                    v_form,
                    v_steps,
                    v_seed,
                    v_height,
                    v_width,
                    v_frames,
                    v_image,
                ],  # fmt: skip
                [v_dense_out, v_sparse_out, v_table, v_metrics, v_mask, v_layer, v_head, v_state],
                api_name="generate_video",
                concurrency_limit=limits.concurrency,
                concurrency_id="video",
            )
            for control in (v_layer, v_head):
                control.input(backend.redraw_mask, [v_state, v_layer, v_head], v_mask, api_name=False)

        causal_backend = CausalDemoBackend(
            pipeline=LazyPipeline(causal_loader or _default_video_loader(causal_preset, causal_model)),
            generate=causal_generate or _default_causal_generate,
            limits=limits,
        )
        add_causal_tab(causal_backend, causal_model or causal_preset, causal_defaults)

        with gr.Tab("Text"):
            gr.Markdown(
                f"Model: `{source_text}`: masked-diffusion LM, dense vs SparseD, Window-Diffusion (only the "
                "active tokens are computed between refresh steps) or both."
            )
            with gr.Row():
                with gr.Column(scale=2):
                    examples = task_examples(text_model or text_preset)
                    t_prompt = gr.Textbox(
                        label="prompt"
                        + (" (a held-out task example; the answer is checked)" if examples else ""),
                        value=examples[0] if examples else "Write a haiku about sparse attention.",
                        lines=4 if examples else 2,
                    )
                    if examples:
                        gr.Examples([[e] for e in examples], inputs=[t_prompt], label="task examples")
                with gr.Column(scale=1):
                    t_method = gr.Radio(list(TEXT_METHODS), value=td["method"], label="method",
                                        elem_id="text-method")  # fmt: skip
                    t_button = gr.Button("Generate", variant="primary", elem_id="text-generate")
            with gr.Row():
                t_steps = gr.Slider(1, max(limits.max_steps, limits.max_gen_length), value=td["steps"], step=1,
                                    label="steps")  # fmt: skip
                t_length = gr.Slider(
                    1, limits.max_gen_length, value=td["gen_length"], step=1, label="generation length"
                )
                t_block_length = gr.Slider(1, limits.max_gen_length, value=td["block_length"], step=1,
                                           label="block length")  # fmt: skip
                t_temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature")
                t_seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=2**31 - 1)
            with gr.Row():
                with gr.Accordion("SparseD options", open=True), gr.Row():
                    t_skip = gr.Slider(
                        0.0, 1.0, value=td["skip"], step=0.05, label="skip (dense fraction of steps)"
                    )
                    t_select = gr.Slider(
                        0.01, 1.0, value=td["select"], step=0.01, label="select (key blocks kept)"
                    )
                    t_block = gr.Dropdown(block_sizes, value=td["block_size"], label="block size")
                with gr.Accordion("Window-Diffusion options", open=True), gr.Row():
                    t_window = gr.Slider(1, limits.max_gen_length, value=td["window"], step=1,
                                         label="window (masks)")  # fmt: skip
                    t_active = gr.Slider(1, limits.max_gen_length, value=td["active"], step=1,
                                         label="active (masks computed)")  # fmt: skip
                    t_refresh = gr.Slider(1, limits.max_gen_length, value=td["refresh_cycle"], step=1,
                                          label="refresh cycle (steps)")  # fmt: skip
            with gr.Row():
                t_dense_out = gr.Textbox(label="dense", lines=6, elem_id="text-dense")
                t_sparse_out = gr.Textbox(
                    label="accelerated (the chosen method)", lines=6, elem_id="text-sparse"
                )
            with gr.Row():
                with gr.Column():
                    t_table = gr.Markdown(elem_id="text-metrics")
                    t_metrics = gr.JSON(label="metrics")
                with gr.Column():
                    t_mask = gr.Image(
                        label="block mask (kept key blocks, SparseD)", type="filepath", elem_id="text-mask"
                    )
                    with gr.Row():
                        t_layer = gr.Dropdown([], label="layer", allow_custom_value=True)
                        t_head = gr.Number(value=0, precision=0, minimum=0, label="head")
                with gr.Column():
                    t_sets = gr.Image(label="active / window / far field per step (Window-Diffusion)",
                                      type="filepath", elem_id="text-window-sets")  # fmt: skip
            t_state = gr.State()
            t_button.click(
                run_text,
                [
                    t_prompt,
                    t_method,
                    t_skip,
                    t_select,
                    t_block,
                    t_window,
                    t_active,
                    t_refresh,
                    t_steps,
                    t_length,
                    t_block_length,
                    t_temperature,
                    t_seed,
                ],
                [t_dense_out, t_sparse_out, t_table, t_metrics, t_mask, t_layer, t_head, t_state, t_sets],
                api_name="generate_text",
                concurrency_limit=limits.concurrency,
                concurrency_id="text",
            )
            for control in (t_layer, t_head):
                control.input(backend.redraw_mask, [t_state, t_layer, t_head], t_mask, api_name=False)
    demo.queue(max_size=32, default_concurrency_limit=limits.concurrency)
    demo.fastgen_backend = backend
    demo.fastgen_causal_backend = causal_backend
    return demo


def launch(args: argparse.Namespace) -> int:
    """Run ``fastgen demo`` (blocks until the server stops); returns the exit status."""
    demo = build_demo(
        video_preset=args.video_preset,
        text_preset=args.text_preset,
        video_model=args.video_model,
        text_model=args.text_model,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


__all__ = [
    "CausalDemoBackend",
    "DemoBackend",
    "DemoLimits",
    "LazyPipeline",
    "TEXT_DEFAULTS",
    "TEXT_METHODS",
    "build_demo",
    "add_causal_tab",
    "check_range",
    "draw_block_mask",
    "draw_chunk_density",
    "draw_chunk_mask",
    "launch",
]
