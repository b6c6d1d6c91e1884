"""Gradio demo of fastgen: dense vs sparse attention side by side, for video and for diffusion LMs.

The Video tab runs a video DiT (Wan / HunyuanVideo) with Rectified SpaAttn, the Causal tab the
autoregressive (Self-Forcing) Wan with Light Forcing (per-chunk density and the mask of a chosen chunk /
layer / head; the local attention window), the Text tab a diffusion LM (picked in the tab: the served
model, and the trained tiny presets when started on presets) with SparseD, Window-Diffusion or both.
Generate runs dense and accelerated with the same seed in interleaved rounds and shows both outputs
with the median speed-up (its range and the load average; none when sparse attention never ran), the
fidelity and a heatmap of the block mask the sparse attention kept.

The demo is split by role: :mod:`.limits` (bounds, input checks), :mod:`.plots` (pictures, tables),
:mod:`.backends` (request handlers), :mod:`.video_tab`, :mod:`.text_tab`, :mod:`.causal_tab` (one
module per tab) and :mod:`.layout` (``build_demo``, ``launch``). This module keeps the names importable
from ``fastgen.app.demo``.
"""

from __future__ import annotations

from .backends import TEXT_METHOD_NAMES, CausalDemoBackend, DemoBackend
from .causal_tab import add_causal_tab
from .layout import build_demo, launch
from .limits import (
    CAUSAL_DEFAULTS,
    TEXT_DEFAULTS,
    TEXT_METHODS,
    VIDEO_DEFAULTS,
    DemoLimits,
    LazyPipeline,
    check_prompt,
    check_range,
    task_examples,
)
from .plots import draw_block_mask, draw_chunk_density, draw_chunk_mask, layer_choices

_check_prompt = check_prompt  # the name older tests use

__all__ = [
    "CAUSAL_DEFAULTS",
    "TEXT_DEFAULTS",
    "TEXT_METHODS",
    "TEXT_METHOD_NAMES",
    "VIDEO_DEFAULTS",
    "CausalDemoBackend",
    "DemoBackend",
    "DemoLimits",
    "LazyPipeline",
    "add_causal_tab",
    "build_demo",
    "check_prompt",
    "check_range",
    "draw_block_mask",
    "draw_chunk_density",
    "draw_chunk_mask",
    "launch",
    "layer_choices",
    "task_examples",
]
