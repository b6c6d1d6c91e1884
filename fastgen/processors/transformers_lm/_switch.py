"""What the SparseD and Window-Diffusion adapters share: switching a transformers model to one of
fastgen's registered attention functions, and attaching a state to the model's attention modules."""

from __future__ import annotations

from collections.abc import Callable

import torch


def switch_attention(model: torch.nn.Module, name: str, function: Callable, method: str) -> str | dict | None:
    """Register ``function`` with transformers under ``name`` (masks built as for SDPA, so dense calls
    match the unmodified model) and switch ``model`` to it; returns the implementation the model had.
    A ``ValueError`` naming ``method`` (the model is left as it was) when the model cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    saved = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(saved)
        raise ValueError(
            f"model={type(model).__name__} cannot switch its attention implementation (it does not use "
            f"transformers' AttentionInterface); {method} is not available for it"
        )
    return saved


def attach_to_layers(model: torch.nn.Module, attr: str, state) -> list[int]:
    """Set ``attr`` to ``state`` on ``model`` and on each of its attention modules (the submodules with an
    integer ``layer_idx``); returns their sorted layer indices."""
    setattr(model, attr, state)
    layers = set()
    for module in model.modules():
        if module is not model and isinstance(getattr(module, "layer_idx", None), int):
            setattr(module, attr, state)
            layers.add(module.layer_idx)
    return sorted(layers)


__all__ = ["attach_to_layers", "switch_attention"]
