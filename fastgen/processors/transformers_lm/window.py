"""Window-Diffusion on transformers diffusion LMs: the attention function that feeds and reads the
position-addressed KV cache, its per-generation state and statistics. See the package docstring."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fastgen._validation import log_once
from fastgen.attention.window import WindowKVCache, window_attention
from fastgen.attention_stats import DEFAULT_LEVEL, requested_level, stats_providers
from fastgen.configs import WindowDiffusionConfig

from ._switch import attach_to_layers, switch_attention

logger = logging.getLogger(__name__)

WINDOW_IMPLEMENTATION = "fastgen_window"
"""Name under which the Window-Diffusion attention function is registered with transformers."""

WINDOW_CONFIG_ATTR = "_fastgen_window_config"
"""Attribute holding the :class:`WindowDiffusionConfig` recorded by ``apply_sparse_attention``."""

_WINDOW_ATTR = "_fastgen_window"


@dataclass
class WindowState:
    """Window-Diffusion state of one model during one generation."""

    cache: WindowKVCache
    """Post-RoPE keys/values per layer and position."""
    saved_implementation: str | dict | None
    """``config._attn_implementation`` before :func:`begin_window` (the wrapped function)."""
    mode: str = "off"
    """``"refresh"``, ``"pruned"`` or ``"off"`` (plain forward, cache untouched)."""
    query_index: torch.Tensor | None = None
    """Pruned step: positions ``[B, Q]`` of the rows the model runs (padding: the dump slot)."""
    query_slots: torch.Tensor | None = None
    """Pruned step: slots ``[B, Q]`` of those rows in the phase's window buffer."""
    stats: WindowStats | None = None
    """This generation's statistics (kept on the model after :func:`end_window`)."""

    def refresh(self) -> None:
        """Next forward is a refresh: write keys/values of the positions run, attend as usual."""
        self.mode = "refresh"
        self.query_index = self.query_slots = None

    def freeze_window(self, window_index: torch.Tensor, window_valid: torch.Tensor) -> None:
        """After a refresh: the phase's window ``window_index [B, W]`` (``window_valid [B, W]``) is copied
        once into the cache's contiguous window buffer that the phase's pruned steps read and update."""
        self.cache.freeze_window(window_index, window_valid)

    def pruned(self, query_index: torch.Tensor) -> None:
        """Next forward runs the rows at ``query_index [B, Q]``; they attend to the frozen window."""
        self.mode = "pruned"
        self.query_index = query_index
        self.query_slots = self.cache.window_slots(query_index)


class WindowStats:
    """Window-Diffusion's statistics of the last generation (``fastgen.attention_stats`` protocol): per step,
    the rows run and the keys each attends to, against a dense step's ``N`` rows x ``N`` keys. Steps are
    counted only while ``record_stats`` is not ``"off"`` (the default); what was counted stays readable."""

    def __init__(self, layers: list[int], num_positions: int) -> None:
        self.layers = layers
        """Layer indices of the attention modules (every layer runs the same sets)."""
        self.num_positions = num_positions
        """``N``: positions of the sequence (prompt + generated)."""
        self.record_stats = DEFAULT_LEVEL
        """``"off"`` (nothing counted; the default) or ``"summary"`` / ``"masks"`` (steps counted; rows;
        Window-Diffusion has no block mask)."""
        self.scores = 0
        self.steps = 0
        self.keys = 0

    def record(self, queries: int, keys: int) -> None:
        """One step ran ``queries`` rows over ``keys`` keys (host ints the loop already has); nothing is
        counted while recording is off."""
        if self.record_stats == "off":
            return
        self.scores += queries * keys
        self.keys += keys
        self.steps += 1

    def layer_stats(self) -> list[dict]:
        """One row per layer: ``layer``, ``method`` (``"window_diffusion"``), ``density`` (attention scores
        computed over the generation / a dense generation's), ``keys_per_query`` (mean over steps), ``steps``."""
        if self.steps == 0:
            return []
        density = self.scores / (self.steps * self.num_positions**2)
        keys = self.keys / self.steps
        return [
            {
                "layer": layer,
                "method": "window_diffusion",
                "density": density,
                "keys_per_query": keys,
                "steps": self.steps,
            }
            for layer in self.layers
        ]


def _wrapped_function(module: torch.nn.Module, implementation):
    """The attention function ``implementation`` names for ``module`` (eager: the model's own)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager") or not isinstance(implementation, str):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        log_once(
            logger, "fastgen Window-Diffusion: no eager attention function found; refresh steps use SDPA"
        )
        return sdpa_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def window_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function of Window-Diffusion (q ``[B, H, Q, D]``, k/v ``[B, H_kv, Q, D]``).

    Refresh: cache the keys/values of positions ``[0, Q)`` and call the wrapped function. Pruned:
    write them into the phase's window buffer at the state's ``query_slots`` and attend to the buffer. Returns
    ``(attn_output [B, Q, H, D], None)``.
    """
    state: WindowState | None = getattr(module, _WINDOW_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    if state is None or state.mode == "off" or not isinstance(layer, int):
        inner = _wrapped_function(module, state.saved_implementation if state else None)
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if state.mode == "refresh":
        state.cache.write_prefix(layer, key, value)
        inner = _wrapped_function(module, state.saved_implementation)
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if state.query_index.shape != (query.shape[0], query.shape[2]):
        raise ValueError(
            f"pruned step: the model ran {tuple(query.shape[::2])} (batch, rows) but the plan has "
            f"query_index of shape {tuple(state.query_index.shape)}"
        )
    state.cache.scatter_window(layer, state.query_slots, key, value)
    k_window, v_window, key_mask = state.cache.window(layer)
    out = window_attention(query, k_window, v_window, key_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def window_config(model: torch.nn.Module) -> WindowDiffusionConfig | None:
    """The :class:`WindowDiffusionConfig` recorded on ``model`` by ``apply_sparse_attention`` (or None)."""
    return getattr(model, WINDOW_CONFIG_ATTR, None)


def begin_window(model: torch.nn.Module, num_positions: int) -> WindowState:
    """Switch ``model`` to the Window-Diffusion attention function for one generation of
    ``num_positions`` tokens (prompt + generated) and return its fresh state (mode ``"off"``)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"Window-Diffusion needs a transformers PreTrainedModel using AttentionInterface, got model="
            f"{type(model).__name__}"
        )
    end_window(model)
    saved = switch_attention(model, WINDOW_IMPLEMENTATION, window_attention_forward, "Window-Diffusion")
    state = WindowState(cache=WindowKVCache(num_positions), saved_implementation=saved)
    layers = attach_to_layers(model, _WINDOW_ATTR, state)
    previous = stats_providers(model).get("window_diffusion")
    state.stats = WindowStats(layers, num_positions)
    state.stats.record_stats = previous.record_stats if previous is not None else requested_level(model)
    stats_providers(model)["window_diffusion"] = state.stats
    if not layers:
        end_window(model)
        raise ValueError(
            f"model={type(model).__name__} has no attention modules with a layer_idx; Window-Diffusion needs "
            "them to address its per-layer cache"
        )
    return state


def end_window(model: torch.nn.Module) -> None:
    """Restore the attention implementation of before :func:`begin_window` and drop the cache."""
    state = getattr(model, _WINDOW_ATTR, None)
    if state is None:
        return
    model.set_attn_implementation(state.saved_implementation)
    for module in model.modules():
        if module.__dict__.get(_WINDOW_ATTR) is not None:
            delattr(module, _WINDOW_ATTR)


__all__ = [
    "WINDOW_CONFIG_ATTR",
    "WINDOW_IMPLEMENTATION",
    "WindowState",
    "WindowStats",
    "begin_window",
    "end_window",
    "window_attention_forward",
    "window_config",
]
