"""``apply_sparse_attention`` / ``remove_sparse_attention``: the one-line switch.

Each model family has one adapter module (``fastgen/processors/<family>.py``) that exposes
``supports(model, config) -> bool``, ``apply(model, config) -> None`` and ``remove(model) -> None``.
This module only dispatches: it picks the first adapter that supports the model and config.
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

# adapter modules, tried in order; imported lazily so a missing optional stack never breaks import
ADAPTERS = (
    "fastgen.processors.wan",
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


def apply_sparse_attention(model: torch.nn.Module, config) -> torch.nn.Module:
    """Install the sparse-attention method described by ``config`` on ``model`` (in place).

    Works on diffusers transformers (``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
    fastgen's causal Wan) and on transformers diffusion LMs. Applying again replaces the previous
    method. Returns the model.

    Example:
        >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
        >>> apply_sparse_attention(pipe.transformer, RectifiedSpaAttnConfig(sparsity=0.8))
        >>> video = pipe(prompt="a cat surfing", num_inference_steps=50).frames[0]
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        remove_sparse_attention(model)
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


def remove_sparse_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention ``model`` had before :func:`apply_sparse_attention` (a no-op if none)."""
    name = getattr(model, _STATE_ATTR, None)
    if name is None:
        return model
    importlib.import_module(name).remove(model)
    setattr(model, _STATE_ATTR, None)
    return model
