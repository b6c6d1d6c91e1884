"""Attention statistics of every fastgen processor on a model, through one interface shared by every
method: what each sparse layer computed (density, keys per query, compensated fraction, masks).

Statistics are opt-in. Recording is a per-processor level: ``"off"`` (the default,
:data:`DEFAULT_LEVEL`: nothing kept, no extra work per call), ``"summary"`` (a few 0-dim device
tensors per layer, overwritten at every call; no host sync until they are read) or ``"masks"`` (the
summary plus each layer's block / compensated masks, the memory-heavy part: about 1 GB for Wan-14B
at 720p). Opt in for a block or from then on:

>>> fastgen.apply_sparse_attention(pipe, config)
>>> with fastgen.recording_attention_stats(pipe.transformer, "summary"):  # or "masks"
...     pipe(prompt)
>>> rows = fastgen.attention_stats(pipe.transformer)   # one dict per sparse layer

The level asked for is also kept on the model, so a provider created later on it (by a later
``apply_sparse_attention``; Window-Diffusion creates its recorder at each generation) starts at that
level.

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

DEFAULT_LEVEL = "off"
"""Level every provider starts at: statistics are opt-in (:func:`record_attention_stats`,
:func:`recording_attention_stats`)."""

LEVEL_ATTR = "fastgen_stats_level"
"""Attribute of a module: the level last asked for with :func:`record_attention_stats` (providers
created later on the module start at it; see :func:`requested_level`)."""

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


def requested_level(module: torch.nn.Module) -> str:
    """The recording level asked for on ``module`` with :func:`record_attention_stats` (or inside
    :func:`recording_attention_stats`); :data:`DEFAULT_LEVEL` when none was. A provider created on the
    module after the request starts at this level."""
    return module.__dict__.get(LEVEL_ATTR, DEFAULT_LEVEL)


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
    by layer. Statistics are opt-in: this is ``[]`` unless recording was turned on
    (:func:`record_attention_stats` / :func:`recording_attention_stats`, level ``"summary"`` or
    ``"masks"``) before the call, and when nothing ran sparse.

    Example:
        >>> import fastgen
        >>> fastgen.apply_sparse_attention(pipe, fastgen.RectifiedSpaAttnConfig(sparsity=0.8))
        >>> with fastgen.recording_attention_stats(pipe.transformer, "summary"):
        ...     video = pipe(prompt="a red fox running through snow").frames[0]
        >>> rows = fastgen.attention_stats(pipe.transformer)
        >>> [(row["layer"], float(row["density"])) for row in rows]  # one row per sparse layer
    """
    rows = []
    for proc in _processors(model):
        rows.extend(proc.layer_stats())
    return sorted(rows, key=lambda r: r["layer"])


def record_attention_stats(model: torch.nn.Module, level: str = "summary") -> dict[int, str]:
    """Set the recording level of every fastgen processor on ``model`` (and of the providers created on
    it later, see :func:`requested_level`); returns the previous levels (by processor id) for
    :func:`recording_attention_stats` to restore.

    ``level`` is ``"off"`` (keep nothing: the default), ``"summary"`` (0-dim device tensors per layer)
    or ``"masks"`` (also the block masks). Before or after ``apply_sparse_attention``: the providers it
    installs start at the level last asked for on the model.

    Example:
        >>> import fastgen
        >>> fastgen.record_attention_stats(pipe.transformer, "summary")  # from now on
        >>> fastgen.record_attention_stats(pipe.transformer, "off")  # nothing kept from now on
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not allowed; allowed: {', '.join(map(repr, LEVELS))}")
    previous = {}
    for proc in _processors(model):
        previous[id(proc)] = proc.record_stats
        proc.record_stats = level
    setattr(model, LEVEL_ATTR, level)
    return previous


@contextlib.contextmanager
def recording_attention_stats(model: torch.nn.Module, level: str = "masks"):
    """Record at ``level`` inside the block, then restore each processor's previous level (and the
    model's: a provider created inside the block goes back to it too). The video methods' and
    Window-Diffusion's recorded rows stay readable after the block; SparseD's rows come from its
    patterns at the level of the moment they are read, so read them inside the block.

    Example:
        >>> import fastgen
        >>> with fastgen.recording_attention_stats(pipe.transformer, "masks"):
        ...     video = pipe(prompt="a red fox running through snow").frames[0]
        >>> mask = fastgen.attention_stats(pipe.transformer)[0]["block_mask"]  # bool [B, H, nqb, nkb]
    """
    before = model.__dict__.get(LEVEL_ATTR)
    previous = record_attention_stats(model, level)
    try:
        yield model
    finally:
        if before is None:
            model.__dict__.pop(LEVEL_ATTR, None)
        else:
            setattr(model, LEVEL_ATTR, before)
        for proc in _processors(model):
            proc.record_stats = previous.get(id(proc), requested_level(model))
