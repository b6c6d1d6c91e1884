"""The demo's request bounds, initial values, input checks, lazily loaded pipelines and per-request
folders (no gradio import at module level)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastgen.optional import require


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
    rounds: int = 3
    """Interleaved timing rounds of every dense-vs-accelerated comparison (median, range, load shown)."""


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

CAUSAL_DEFAULTS = {"height": 128, "width": 128, "frames": 33, "sparsity": 0.88, "sparsity_base": 0.98,
                   "block_size": 128, "local_attn_frames": 0, "sink_frames": 0}  # fmt: skip
"""Initial values of the Causal tab (the tiny-causal-wan preset: 9 latent frames = 3 chunks; a local
window of 0 frames means every earlier frame)."""

TEXT_PRESET_DEFAULTS = {
    "tiny-llada-long": {"method": "window_diffusion", "steps": 256, "gen_length": 256, "block_length": 256},
}
"""Initial values of the Text tab that differ per preset from :data:`TEXT_DEFAULTS` (the ``tiny-llada-kv``
card's). ``tiny-llada-long``: its model card's 256 answer tokens at one token per step, compared with
Window-Diffusion in one block of 256 (as ``fastgen generate --method window_diffusion`` runs it when no block
length is given) at the authors' 64 / 16 / 32: 8 refresh steps, 248 pruned ones."""

TRAINED_TEXT_PRESETS = ("tiny-llada-kv", "tiny-llada-long")
"""The trained text presets the Text tab's model picker offers besides the served model (when the demo was
started on presets)."""

TEXT_EXAMPLE_SEEDS = (1_000_000, 1_000_001, 1_000_002)
"""Held-out task examples offered as prompts in the Text tab for ``tiny-llada-kv`` (seeds of ``KVTask.example``;
``tiny-llada-long`` offers the first three of ``LedgerTask.held_out``)."""


def text_defaults_of(preset: str | None) -> dict:
    """Initial values of the Text tab for ``preset`` (a model name or ``None`` gets :data:`TEXT_DEFAULTS`)."""
    return {**TEXT_DEFAULTS, **TEXT_PRESET_DEFAULTS.get(preset or "", {})}


def task_examples(preset: str | None) -> list[str]:
    """Example prompts from the task generator when ``preset`` is a model trained on a checkable task
    (``tiny-llada-kv``, ``tiny-llada-long``); ``[]`` otherwise."""
    if preset == "tiny-llada-kv":
        from fastgen.pipelines.kv_task import KVTask

        return [KVTask().example(seed).prompt for seed in TEXT_EXAMPLE_SEEDS]
    if preset == "tiny-llada-long":
        from fastgen.pipelines.long_task import LedgerTask

        return [example.prompt for example in LedgerTask().held_out(len(TEXT_EXAMPLE_SEEDS))]
    return []


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


def gr_error(message: str):
    """A ``gr.Error`` (shown in the browser as the message) for ``message``."""
    gr = require("gradio")

    return gr.Error(message)


def check_range(name: str, value, low, high, integer: bool = True):
    """``value`` as int/float within ``[low, high]``; a ``gr.Error`` naming the input otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise gr_error(f"{name} is missing; allowed: {low}..{high}")
    if integer and float(value) != int(value):
        raise gr_error(f"{name}={value} must be a whole number in {low}..{high}")
    value = int(value) if integer else float(value)
    if not low <= value <= high:
        raise gr_error(f"{name}={value} is out of range; allowed: {low}..{high}")
    return value


def check_prompt(prompt: str, limits: DemoLimits) -> str:
    """The stripped prompt; a ``gr.Error`` when it is empty or longer than ``limits.max_prompt_chars``."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise gr_error("prompt is empty; write a prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise gr_error(f"prompt has {len(prompt)} characters; allowed: at most {limits.max_prompt_chars}")
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


__all__ = [
    "CAUSAL_DEFAULTS",
    "TEXT_DEFAULTS",
    "TEXT_METHODS",
    "TEXT_PRESET_DEFAULTS",
    "TRAINED_TEXT_PRESETS",
    "VIDEO_DEFAULTS",
    "DemoLimits",
    "LazyPipeline",
    "RequestFolders",
    "check_prompt",
    "check_range",
    "gr_error",
    "task_examples",
    "text_defaults_of",
]
