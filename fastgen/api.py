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

logger = logging.getLogger(__name__)

# adapter modules, tried in order; imported lazily so a missing optional stack never breaks import
ADAPTERS = (
    "fastgen.processors.wan",
    "fastgen.processors.light_forcing_wan",
    "fastgen.processors.hunyuan_video",
    "fastgen.processors.transformers_lm",
)

_STATE_ATTR = "_fastgen_adapter"


def _adapters():
    for name in ADAPTERS:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("fastgen."):
                continue  # adapter not written yet
            raise


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
    from fastgen.hooks import apply_to_pipeline, is_pipeline

    if is_pipeline(model):
        return apply_to_pipeline(model, config)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}"
        )
    return _apply_to_model(model, config)


def _apply_to_model(model: torch.nn.Module, config) -> torch.nn.Module:
    """:func:`apply_sparse_attention` on one model: the first adapter that supports it."""
    if getattr(model, _STATE_ATTR, None) is not None:
        _remove_from_model(model)
    for adapter in _adapters():
        if adapter.supports(model, config):
            adapter.apply(model, config)
            setattr(model, _STATE_ATTR, adapter.__name__)
            logger.info(
                "fastgen: applied %s to %s via %s",
                type(config).__name__,
                type(model).__name__,
                adapter.__name__,
            )
            return model
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
    from fastgen.hooks import is_pipeline, remove_from_pipeline

    if is_pipeline(model):
        return remove_from_pipeline(model)
    return _remove_from_model(model)


def _remove_from_model(model: torch.nn.Module) -> torch.nn.Module:
    name = getattr(model, _STATE_ATTR, None)
    if name is None:
        return model
    importlib.import_module(name).remove(model)
    setattr(model, _STATE_ATTR, None)
    return model


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
