"""Attention statistics of every fastgen processor on a model, through one interface shared by every
method: what each sparse layer computed (density, keys per query, compensated fraction, masks).

Recording is a per-processor level: ``"off"`` (nothing kept), ``"summary"`` (the default: a few
0-dim device tensors per layer, overwritten at every call; no host sync until they are read) or
``"masks"`` (the summary plus each layer's block / compensated masks, the memory-heavy part: about
1 GB for Wan-14B at 720p, so only on request).

>>> with fastgen.recording_attention_stats(pipe.transformer, "masks"):
...     pipe(prompt)
>>> rows = fastgen.attention_stats(pipe.transformer)   # one dict per sparse layer

How a method plugs in: give its processor (or its per-model state) an attribute ``record_stats`` (one
of :data:`LEVELS`) and a method ``layer_stats() -> list[dict]`` returning one row per layer with at
least ``layer`` and ``density`` (floats; ``keys_per_query``, ``compensated_fraction``, ``block_mask``,
``method`` when it has them), read only when asked. :func:`attention_stats` and
:func:`record_attention_stats` find it among the model's attention processors (diffusers) or in the
``fastgen_stats`` dict (name -> provider) of the model or a submodule (transformers models: SparseD's
state, Window-Diffusion's recorder).
"""

from __future__ import annotations

import contextlib

import torch

LEVELS = ("off", "summary", "masks")
"""Recording levels of a processor's statistics."""

STATS_ATTR = "fastgen_stats"
"""Attribute of a module: a dict of statistics providers (name -> object with ``record_stats`` and
``layer_stats()``) for methods that are not diffusers attention processors."""


def stats_providers(module: torch.nn.Module) -> dict:
    """The ``fastgen_stats`` dict of ``module`` (name -> statistics provider), created on first use; a
    method that is not a diffusers attention processor registers its per-model state here."""
    providers = module.__dict__.get(STATS_ATTR)
    if providers is None:
        providers = {}
        setattr(module, STATS_ATTR, providers)
    return providers


def _processors(model: torch.nn.Module) -> list:
    found, seen = [], set()
    candidates = list(getattr(model, "attn_processors", {}).values())
    for module in model.modules():
        candidates += list((module.__dict__.get(STATS_ATTR) or {}).values())
    for proc in candidates:
        if proc is not None and hasattr(proc, "layer_stats") and hasattr(proc, "record_stats"):
            if id(proc) not in seen:
                seen.add(id(proc))
                found.append(proc)
    return found


def attention_stats(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics of the last sparse call of every fastgen processor on ``model``, sorted
    by layer (empty when recording is off or nothing ran sparse).

    Example:
        >>> import fastgen
        >>> fastgen.apply_sparse_attention(pipe, fastgen.RectifiedSpaAttnConfig(sparsity=0.8))
        >>> video = pipe(prompt="a red fox running through snow").frames[0]
        >>> rows = fastgen.attention_stats(pipe.transformer)
        >>> [(row["layer"], float(row["density"])) for row in rows]  # one row per sparse layer
    """
    rows = []
    for proc in _processors(model):
        rows.extend(proc.layer_stats())
    return sorted(rows, key=lambda r: r["layer"])


def record_attention_stats(model: torch.nn.Module, level: str = "summary") -> dict[int, str]:
    """Set the recording level of every fastgen processor on ``model``; returns the previous levels
    (by processor id) for :func:`recording_attention_stats` to restore.

    ``level`` is ``"off"`` (keep nothing), ``"summary"`` (0-dim device tensors per layer) or
    ``"masks"`` (also the block masks).

    Example:
        >>> import fastgen
        >>> fastgen.record_attention_stats(pipe.transformer, "off")  # nothing kept from now on
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not allowed; allowed: {', '.join(map(repr, LEVELS))}")
    previous = {}
    for proc in _processors(model):
        previous[id(proc)] = proc.record_stats
        proc.record_stats = level
    return previous


@contextlib.contextmanager
def recording_attention_stats(model: torch.nn.Module, level: str = "masks"):
    """Record at ``level`` inside the block, then restore each processor's previous level (the
    recorded statistics stay readable after the block).

    Example:
        >>> import fastgen
        >>> with fastgen.recording_attention_stats(pipe.transformer, "masks"):
        ...     video = pipe(prompt="a red fox running through snow").frames[0]
        >>> mask = fastgen.attention_stats(pipe.transformer)[0]["block_mask"]  # bool [B, H, nqb, nkb]
    """
    previous = record_attention_stats(model, level)
    try:
        yield model
    finally:
        for proc in _processors(model):
            if id(proc) in previous:
                proc.record_stats = previous[id(proc)]
