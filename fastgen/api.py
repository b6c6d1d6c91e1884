"""``apply_sparse_attention`` / ``remove_sparse_attention`` / ``sparse_attention``: the one-line switch
for a model or a whole diffusers pipeline.

Each model family has one adapter module (``fastgen/processors/<family>.py``) that exposes
``supports(model, config) -> bool``, ``apply(model, config) -> None`` and ``remove(model) -> None``.
This module only dispatches: it picks the first adapter that supports the model and config.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator

import torch

from .tracking import StepTracker, get_step_tracker, register_step_tracker, remove_step_tracker

logger = logging.getLogger(__name__)

# adapter modules, tried in order; imported lazily so a missing optional stack never breaks import
ADAPTERS = (
    "fastgen.processors.wan",
    "fastgen.processors.light_forcing_wan",
    "fastgen.processors.hunyuan_video",
    "fastgen.processors.transformers_lm",
)

STATE_ATTR = "_fastgen_adapter"
"""Attribute of a model with fastgen attention applied: the name of the adapter module that applied it."""
_STATE_ATTR = STATE_ATTR  # old private name


def _adapters():
    for name in ADAPTERS:
        yield importlib.import_module(name)


def apply_sparse_attention(model, config):
    """Install the sparse-attention method described by ``config`` on ``model`` (in place).

    ``model`` is a diffusers transformer (``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
    fastgen's causal Wan), a transformers diffusion LM, or a diffusers pipeline: then every
    transformer it has (Wan 2.2: ``transformer`` and ``transformer_2``) gets the method with one shared
    step counter, and the scheduler's ``set_timesteps`` marks each new generation. Applying again
    replaces the previous method. Returns ``model``.

    Example:
        >>> import torch
        >>> from diffusers import WanPipeline
        >>> from diffusers.utils import export_to_video
        >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
        >>> pipe = WanPipeline.from_pretrained(
        ...     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> apply_sparse_attention(pipe, RectifiedSpaAttnConfig(sparsity=0.8))
        >>> video = pipe(prompt="a cat surfing", num_inference_steps=50).frames[0]
        >>> export_to_video(video, "cat.mp4", fps=16)
    """
    if is_pipeline(model):
        return apply_to_pipeline(model, config)
    if not isinstance(model, torch.nn.Module):
        if isinstance(getattr(model, "model", None), torch.nn.Module):
            # fastgen's DiffusionLMPipeline: its methods are options of each call
            raise ValueError(
                f"model={type(model).__name__} is a pipeline that takes its methods per call: pass "
                f"pipe(..., acceleration=[{type(config).__name__}(...)]), or apply them to pipe.model"
            )
        raise ValueError(
            f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}"
        )
    return _apply_to_model(model, config)


def _apply_to_model(model: torch.nn.Module, config) -> torch.nn.Module:
    """:func:`apply_sparse_attention` on one model: the first adapter that supports it."""
    if getattr(model, STATE_ATTR, None) is not None:
        _remove_from_model(model)
    reasons = []
    for adapter in _adapters():
        support = adapter.supports(model, config)
        if not support:
            if getattr(support, "reason", ""):
                reasons.append(support.reason)
            continue
        if support:
            adapter.apply(model, config)
            setattr(model, STATE_ATTR, adapter.__name__)
            logger.info(
                "fastgen: applied %s to %s via %s",
                type(config).__name__,
                type(model).__name__,
                adapter.__name__,
            )
            return model
    if reasons:
        raise ValueError(
            f"apply_sparse_attention: config={type(config).__name__} cannot run on "
            f"model={type(model).__name__}: {'; '.join(reasons)}"
        )
    raise ValueError(
        f"apply_sparse_attention: no adapter supports model={type(model).__name__} with "
        f"config={type(config).__name__}; supported: Wan and HunyuanVideo diffusers transformers "
        "(RectifiedSpaAttnConfig, LightForcingConfig) and transformers diffusion LMs (SparseDConfig; "
        "WindowDiffusionConfig, recorded for DiffusionLMPipeline, which runs it and composes it with SparseD)"
    )


def remove_sparse_attention(model):
    """Restore the attention ``model`` (a model or a pipeline) had before :func:`apply_sparse_attention`
    (a no-op if none). An attention backend set with ``set_attention_backend`` meanwhile is kept.

    Example:
        >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention, remove_sparse_attention
        >>> apply_sparse_attention(pipe, RectifiedSpaAttnConfig(sparsity=0.8))
        >>> sparse_video = pipe(prompt="a cat surfing").frames[0]
        >>> remove_sparse_attention(pipe)  # diffusers' own processors again, exactly
        >>> dense_video = pipe(prompt="a cat surfing").frames[0]
    """
    if is_pipeline(model):
        return remove_from_pipeline(model)
    return _remove_from_model(model)


def _remove_from_model(model: torch.nn.Module) -> torch.nn.Module:
    name = getattr(model, STATE_ATTR, None)
    if name is None:
        return model
    importlib.import_module(name).remove(model)
    setattr(model, STATE_ATTR, None)
    return model


# ------------------------------------------------------------------ pipelines
def pipeline_transformers(pipe) -> list[torch.nn.Module]:
    """The denoising transformers of a diffusers pipeline: ``transformer`` and ``transformer_2`` if present."""
    models = [getattr(pipe, name, None) for name in ("transformer", "transformer_2")]
    return [m for m in models if isinstance(m, torch.nn.Module)]


SCHEDULER_HOOK_ATTR = "_fastgen_generation_hook"
"""Attribute of a hooked scheduler instance: the trackers its ``set_timesteps`` starts a generation on."""


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers-style pipeline (not a module, has a ``components`` dict)."""
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "components", None), dict)


def _hook_scheduler(scheduler, tracker: StepTracker) -> None:
    """Make ``scheduler.set_timesteps`` (called once at the start of every pipeline call) begin a
    generation on ``tracker``. The wrapper is an attribute of this scheduler instance only."""
    trackers = getattr(scheduler, SCHEDULER_HOOK_ATTR, None)
    if trackers is not None:
        if tracker not in trackers:
            trackers.append(tracker)
        return
    trackers = [tracker]
    original = scheduler.set_timesteps  # bound method of the class

    def set_timesteps(*args, **kwargs):
        for t in list(trackers):
            t.begin_generation()
        return original(*args, **kwargs)

    set_timesteps.__wrapped__ = original
    scheduler.set_timesteps = set_timesteps
    original_step = getattr(scheduler, "step", None)
    if callable(original_step):

        def step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            for t in list(trackers):
                t.scheduler_stepped()
            return out

        step.__wrapped__ = original_step
        scheduler.step = step
    setattr(scheduler, SCHEDULER_HOOK_ATTR, trackers)


def _unhook_scheduler(scheduler, tracker: StepTracker) -> None:
    trackers = getattr(scheduler, SCHEDULER_HOOK_ATTR, None)
    if trackers is None:
        return
    if tracker in trackers:
        trackers.remove(tracker)
    if not trackers:
        del scheduler.set_timesteps  # the class's method shows through again
        if "step" in vars(scheduler):
            del scheduler.step
        delattr(scheduler, SCHEDULER_HOOK_ATTR)


def apply_to_pipeline(pipe, config):
    """Apply ``config`` to every transformer of ``pipe`` (Wan 2.2: ``transformer`` and ``transformer_2``).

    Both transformers share one step tracker, so ``warmup_steps`` counts the steps of the whole
    generation, whichever expert runs them; the scheduler's ``set_timesteps`` marks each new
    generation on it. Returns the pipeline.
    """
    models = pipeline_transformers(pipe)
    if not models:
        raise ValueError(f"pipe={type(pipe).__name__} has no `transformer` or `transformer_2` to accelerate")
    for adapter in _adapters():
        check = getattr(adapter, "supports_pipeline", None)
        support = check(pipe, config) if check is not None else True
        if not support:
            raise ValueError(
                f"apply_sparse_attention: config={type(config).__name__} cannot run on "
                f"pipe={type(pipe).__name__}: {support.reason}"
            )
    trackers = [get_step_tracker(m) for m in models]
    shared = next((t for t in trackers if t is not None), None) or StepTracker()
    shared.pipeline_driven = True
    for model in models:
        register_step_tracker(model, shared)
        _apply_to_model(model, config)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and callable(getattr(scheduler, "set_timesteps", None)):
        _hook_scheduler(scheduler, shared)
    else:
        logger.info(
            "fastgen: %s has no scheduler.set_timesteps; generations are guessed from timesteps",
            type(pipe).__name__,
        )
        shared.pipeline_driven = False
    return pipe


def remove_from_pipeline(pipe):
    """Undo :func:`apply_to_pipeline`: original processors back, scheduler unhooked, trackers detached."""
    scheduler = getattr(pipe, "scheduler", None)
    for model in pipeline_transformers(pipe):
        tracker = get_step_tracker(model)
        if tracker is not None and scheduler is not None:
            _unhook_scheduler(scheduler, tracker)
        _remove_from_model(model)
        remove_step_tracker(model)
    return pipe


@contextlib.contextmanager
def sparse_attention(model, config) -> Iterator:
    """``with fastgen.sparse_attention(pipe_or_model, config):`` applies the method for the block and
    restores the original attention afterwards, also when the block raises.

    Example:
        >>> import fastgen
        >>> from fastgen import RectifiedSpaAttnConfig
        >>> with fastgen.sparse_attention(pipe, RectifiedSpaAttnConfig(sparsity=0.8)):
        ...     video = pipe(prompt="a red fox in snow").frames[0]
    """
    apply_sparse_attention(model, config)
    try:
        yield model
    finally:
        remove_sparse_attention(model)
