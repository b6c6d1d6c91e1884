"""Named presets for the embedded default: tiny models built from configs in code, no downloads.

A preset is a dataclass naming its builder (``module:function``, imported lazily so text presets
never import video code and the reverse) and the kind of output it makes (``video`` or ``text``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One named, ready-to-run configuration.

    Example:
        >>> from fastgen.pipelines import get_preset
        >>> preset = get_preset("tiny-wan-long")
        >>> preset.kind, preset.builder
        ('video', 'fastgen.pipelines.tiny_video:build_tiny_wan_long')
    """

    name: str
    """Preset name used by ``load_preset`` and ``--preset``."""
    kind: str
    """``"video"`` or ``"text"``."""
    builder: str
    """``"module:function"`` returning a ready pipeline; called with keyword options."""
    description: str
    """One line for ``--help`` and the demo."""
    family: str | None = None
    """Model family when the kind alone does not say how to run it (``"causal-wan"``: chunked autoregressive)."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny-wan",
            "video",
            "fastgen.pipelines.tiny_video:build_tiny_wan",
            "tiny Wan 2.1 T2V (random weights)",
        ),
        Preset(
            "tiny-wan-long",
            "video",
            "fastgen.pipelines.tiny_video:build_tiny_wan_long",
            "tiny Wan 2.1 T2V at 6400 tokens, attention-bound: shows the speed-up (random weights)",
        ),
        Preset(
            "tiny-causal-wan",
            "video",
            "fastgen.pipelines.tiny_video:build_tiny_causal_wan",
            "tiny autoregressive Wan, Self-Forcing chunks with a KV cache (random weights)",
            family="causal-wan",
        ),
        Preset(
            "tiny-hunyuan",
            "video",
            "fastgen.pipelines.tiny_video:build_tiny_hunyuan",
            "tiny HunyuanVideo (random weights)",
        ),
        Preset(
            "tiny-llada",
            "text",
            "fastgen.pipelines.tiny_lm:build_tiny_llada",
            "tiny LLaDA-style diffusion LM (random weights, character tokenizer; for tests)",
        ),
        Preset(
            "tiny-llada-kv",
            "text",
            "fastgen.pipelines.tiny_llada_kv:build_tiny_llada_kv",
            "tiny LLaDA trained on key-value retrieval (samples/tiny-llada-kv); answers can be checked",
        ),
        Preset(
            "tiny-llada-long",
            "text",
            "fastgen.pipelines.tiny_llada_long:build_tiny_llada_long",
            "tiny LLaDA trained on the ledger task (samples/tiny-llada-long); 256-token answers that can be checked",
        ),
    )
}
"""Every preset by name: the embedded defaults, tiny models built in code (no download).

Example:
    >>> from fastgen.pipelines import PRESETS
    >>> sorted(name for name, preset in PRESETS.items() if preset.kind == "text")
    ['tiny-llada', 'tiny-llada-kv', 'tiny-llada-long']
"""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ``ValueError`` lists the allowed names otherwise.

    Example:
        >>> from fastgen.pipelines import get_preset
        >>> get_preset("tiny-llada-kv").kind
        'text'
        >>> get_preset("tiny-sora")
        Traceback (most recent call last):
        ...
        ValueError: preset='tiny-sora' is unknown; allowed: ...
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def load_preset(name: str, **options):
    """Build the pipeline of preset ``name`` (e.g. ``"tiny-wan"``, ``"tiny-llada"``).

    Example:
        >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
        >>> from fastgen.pipelines import load_preset
        >>> pipe = load_preset("tiny-wan")  # a diffusers WanPipeline with tiny random weights, on the CPU
        >>> apply_sparse_attention(pipe, RectifiedSpaAttnConfig(sparsity=0.8, warmup_steps=1))
        >>> video = pipe(prompt="a red fox running through snow", num_inference_steps=8).frames[0]
    """
    module, function = get_preset(name).builder.split(":")
    return getattr(importlib.import_module(module), function)(**options)
