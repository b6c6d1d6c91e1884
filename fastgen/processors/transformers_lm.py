"""SparseD and Window-Diffusion on transformers diffusion LMs (Llama, Qwen2, ... any model using
``ALL_ATTENTION_FUNCTIONS``).

The adapter registers one transformers attention function, ``"fastgen_sparsed"``, and switches the
model to it. Per-model state (config, current step, per-layer patterns) lives on a
:class:`SparseDState` attached to the model and to each of its attention modules; nothing is kept on
classes or globally, so several models can carry different configs.

Step protocol (the diffusion-LM pipeline drives it; all three are no-ops on a model without SparseD):

- :func:`begin_generation` ``(model, total_steps, prompt_length=None, key_valid=None)`` resets the
  patterns; ``key_valid`` (the pipeline's ``[B, N]`` real-token mask) declares the key padding of
  every call, so the 4D mask's values are never read (no host read, nothing data-dependent for
  ``torch.compile``);
- :func:`set_step` ``(model, step)`` before each denoising forward (0-based over the whole
  generation, across semi-autoregressive blocks); it decides the step's phase in Python, so a
  compiled model sees one of three phase strings (one graph per phase), never the step number;
- :func:`end_generation` ``(model)`` at the end.

The first ``dense_step_count(skip, total_steps) = max(1, round(skip * total_steps))`` steps run
transformers' own SDPA function (bit-identical to the unmodified model); at the last of them each
layer also computes its pattern (per batch row and head, so both CFG branches get their own). Later
steps run :func:`fastgen.attention.sparsed.sparsed_attention` with that pattern. ``skip=0`` still
needs one dense step to compute the pattern; ``skip=1`` is fully dense. Forwards outside a generation
(no ``begin_generation``/``set_step``) are dense.

Masks: the sparse path serves the masks a diffusion LM uses - none on a non-causal module
(bidirectional), or a 4D bool / additive mask that is a key padding mask for every real query (the
pipeline's padding-aware full mask; rows of padded queries may hold anything). Padded keys are
never selected and partially padded key blocks are handled exactly. Any other mask (causal, sliding
window, biases), a missing mask on a causal module (SDPA would run it causally), a KV cache, or
dropout falls back to SDPA, logged once.

Window-Diffusion (:class:`~fastgen.configs.WindowDiffusionConfig`) is driven by the diffusion-LM
pipeline, which decides the active and window sets of each step. For the length of one generation
:func:`begin_window` switches the model to a second attention function, ``"fastgen_window"``, that
wraps the implementation the model had (SDPA, eager, or SparseD's function when the two are composed):

- refresh step (:meth:`WindowState.refresh`): the layer's post-RoPE keys/values of the positions run
  are written into the :class:`~fastgen.attention.window.WindowKVCache`, then the wrapped function
  computes attention as it would without Window-Diffusion (SparseD's pattern applies here);
- after the refresh (:meth:`WindowState.freeze_window`): the phase's window positions are copied once
  per layer from the cache into a contiguous window buffer;
- pruned step (:meth:`WindowState.pruned`): the model was called with the active tokens only (their
  absolute ``position_ids``); their fresh keys/values are written into the window buffer at their
  slots and they attend to the whole buffer (no per-step gather).

``apply_sparse_attention(model, WindowDiffusionConfig(...))`` only records the config on the model
(the pipeline then uses it for every call); nothing in the model changes until a generation starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastgen.attention.backends import log_once
from fastgen.attention.sparsed import (
    SparseDPattern,
    compute_sparsed_pattern,
    dense_step_count,
    sparsed_attention,
)
from fastgen.attention.window import WindowKVCache, window_attention
from fastgen.configs import SparseDConfig, WindowDiffusionConfig

logger = logging.getLogger(__name__)

IMPLEMENTATION = "fastgen_sparsed"
"""Name under which the SparseD attention function is registered with transformers."""

_STATE_ATTR = "_fastgen_sparsed"


@dataclass
class SparseDState:
    """SparseD state of one model: config, step counters and the per-layer patterns."""

    config: SparseDConfig
    """The method's configuration."""
    saved_implementation: str | dict | None
    """``config._attn_implementation`` before :func:`apply`, restored by :func:`remove`."""
    total_steps: int | None = None
    """Denoising steps of the current generation (None outside a generation)."""
    step: int | None = None
    """Current 0-based step (None outside a generation)."""
    prompt_length: int | torch.Tensor | None = None
    """Index of the first generated token (int or ``[B]``); splits the prompt/generated budgets."""
    patterns: dict[int, SparseDPattern] = field(default_factory=dict)
    """Pattern per layer index, computed at the last dense step."""
    current_phase: str = "dense"
    """Phase of the current step, decided by :func:`set_step` (see :meth:`phase`)."""
    declared_shape: tuple[int, int] | None = None
    """``(B, N)`` of the key padding :func:`begin_generation` was given (``key_valid``), None when none
    was; calls of another batch or a longer length run dense."""
    declared_padding: torch.Tensor | None = None
    """The declared ``[B, N]`` real-key mask; None when declared and no key is padded."""
    sparse_call_count: torch.Tensor | None = None
    """Attention calls served sparsely in this generation (a device counter allocated by
    :func:`begin_generation`: no host read per call)."""
    _mask_cache: tuple | None = None

    @property
    def sparse_calls(self) -> int:
        """Attention calls served sparsely in this generation (reads the device counter)."""
        return 0 if self.sparse_call_count is None else int(self.sparse_call_count)

    def phase(self) -> str:
        """``"dense"``, ``"pattern"`` (dense, and compute the pattern) or ``"sparse"`` for the current step."""
        return self.current_phase

    def phase_of(self, step: int | None) -> str:
        """The phase of 0-based ``step`` in the current generation (``"dense"`` outside one)."""
        if self.total_steps is None or step is None:
            return "dense"
        n_dense = dense_step_count(self.config.skip, self.total_steps)
        if n_dense >= self.total_steps or step < n_dense - 1:
            return "dense"
        return "pattern" if step == n_dense - 1 else "sparse"

    def declared_key_padding(self, attention_mask: torch.Tensor, batch: int, num_tokens: int):
        """``(ok, key_padding_mask)`` from the declared padding: only shapes are checked; the call's
        keys are the first ``num_tokens`` declared positions (Window-Diffusion's refresh prefixes)."""
        rows, tokens = self.declared_shape
        shape_ok = (
            attention_mask.dim() == 4
            and tuple(attention_mask.shape[-2:]) == (num_tokens, num_tokens)
            and batch == rows
            and num_tokens <= tokens
        )
        if not shape_ok or self.declared_padding is None:
            return shape_ok, None
        return True, self.declared_padding[:, :num_tokens]

    def key_padding(self, attention_mask: torch.Tensor, num_tokens: int):
        """``(ok, key_padding_mask)`` for a 4D mask, the mask None when no key is padded; cached per
        mask tensor (one check per forward, not one per layer)."""
        cache = self._mask_cache
        if cache is not None and cache[0] is attention_mask and cache[1] == attention_mask._version:
            return cache[2]
        ok, key_padding_mask = key_padding_from_mask(attention_mask, num_tokens)
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None
        result = (ok, key_padding_mask)
        self._mask_cache = (attention_mask, attention_mask._version, result)
        return result


def key_padding_from_mask(attention_mask: torch.Tensor, num_tokens: int):
    """Read a 4D mask ``[B, 1, N, N]`` (bool keep-mask or additive float) as a key padding mask.

    Returns ``(True, key_padding_mask [B, N] bool)`` when every real query row keeps exactly the real
    keys (a query counts as real when its key is kept), else ``(False, None)``.
    """
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return False, None
    if tuple(attention_mask.shape[-2:]) != (num_tokens, num_tokens):
        return False, None
    mask = attention_mask[:, 0]
    if mask.stride(1) == 0:  # an expanded [B, 1, 1, N] row: every query sees the same keys
        mask = mask[:, :1]
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        dropped = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((keep | dropped).all()):
            return False, None  # an additive bias, not a mask
    if keep.shape[1] == 1:
        key_valid = keep[:, 0]
    else:
        reference_row = keep.sum(-1).argmax(-1)  # [B]: the row keeping the most keys
        key_valid = keep[torch.arange(keep.shape[0], device=keep.device), reference_row]  # [B, N]
        real_rows_agree = (keep == key_valid[:, None, :]) | ~key_valid[:, :, None]
        if not bool(real_rows_agree.all()):
            return False, None
    if not bool(key_valid.any(-1).all()):
        return False, None
    return True, key_valid


def sparsed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA on dense steps, SparseD's fixed pattern afterwards.

    Takes q ``[B, H, N, D]`` and k/v ``[B, H_kv, N, D]`` (GQA heads are repeated) and returns
    ``(attn_output [B, N, H, D], None)`` like transformers' SDPA function.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    def dense():
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    state: SparseDState | None = getattr(module, _STATE_ATTR, None)
    phase = state.phase() if state is not None else "dense"
    if phase == "dense":
        return dense()
    reason = _unsupported_reason(module, query, key, attention_mask, dropout, kwargs)
    key_padding_mask = None
    if reason is None and attention_mask is not None:
        if state.declared_shape is not None:
            ok, key_padding_mask = state.declared_key_padding(attention_mask, query.shape[0], key.shape[2])
            if not ok:
                reason = "the attention mask does not have the shape of the declared key padding"
        elif torch.compiler.is_compiling():  # reading the mask's values would be a host read
            reason = "under torch.compile the key padding must be declared (begin_generation key_valid)"
        else:
            ok, key_padding_mask = state.key_padding(attention_mask, key.shape[2])
            if not ok:
                reason = "the attention mask is not a key padding mask"
    if reason is not None:
        log_once(f"fastgen SparseD: dense attention ({reason})", logging.INFO)
        return dense()
    layer = module.layer_idx
    groups = getattr(module, "num_key_value_groups", 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if phase == "pattern":
        state.patterns[layer] = compute_sparsed_pattern(
            query,
            repeat_kv(key, groups),
            select=state.config.select,
            block_size=state.config.block_size,
            key_padding_mask=key_padding_mask,
            prompt_end=state.prompt_length,
            scale=scale,
        )
        return dense()
    pattern = state.patterns.get(layer)
    if pattern is None or tuple(pattern.block_mask.shape[:2]) != (query.shape[0], query.shape[1]):
        log_once("fastgen SparseD: dense attention (no pattern for this layer and shape)", logging.INFO)
        return dense()
    if pattern.num_tokens != query.shape[2]:  # Window-Diffusion's Dream rules: refresh prefixes grow
        log_once(
            "fastgen SparseD: pattern reused on a call of another length (tiles it never saw run dense)",
            logging.INFO,
        )
    out = sparsed_attention(
        query,
        repeat_kv(key, groups),
        repeat_kv(value, groups),
        pattern.for_length(query.shape[2]),
        pattern.block_size,
        key_padding_mask=key_padding_mask,
        scale=scale,
        max_count=pattern.max_blocks_for(query.shape[2]),
        padded_keys=key_padding_mask is not None,  # None when no key is padded (SparseDState.key_padding)
    )
    state.sparse_call_count.add_(1)
    return out.transpose(1, 2).contiguous(), None


def _unsupported_reason(module, query, key, attention_mask, dropout, kwargs) -> str | None:
    """Why the sparse path cannot serve this call (None when it can)."""
    if not isinstance(getattr(module, "layer_idx", None), int):
        return "the attention module has no layer_idx"
    if dropout:
        return "attention dropout is active"
    if query.shape[2] != key.shape[2]:
        return "query and key lengths differ (KV cache)"
    for name in ("position_bias", "softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            return f"{name} is set"
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if is_causal and query.shape[2] > 1:
            return "no mask on a causal module (SDPA would run it causally)"
    elif not isinstance(attention_mask, torch.Tensor):
        return f"unsupported mask type {type(attention_mask).__name__}"
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sparsed_attention_forward)
    # masks for 2D inputs are built as for SDPA, so dense steps match the unmodified model
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _state(model: torch.nn.Module) -> SparseDState | None:
    return getattr(model, _STATE_ATTR, None)


def supports(model: torch.nn.Module, config) -> bool:
    """True for a transformers ``PreTrainedModel`` with a :class:`SparseDConfig`."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and isinstance(config, (SparseDConfig, WindowDiffusionConfig))


def apply(model: torch.nn.Module, config: SparseDConfig) -> None:
    """Switch ``model`` to the SparseD attention function and attach a fresh state; for a
    :class:`WindowDiffusionConfig`, record it on the model for the diffusion-LM pipeline."""
    if supports(model, config) and isinstance(config, WindowDiffusionConfig):
        remove(model)
        setattr(model, WINDOW_CONFIG_ATTR, config)
        return
    if not supports(model, config):
        raise ValueError(
            f"SparseD needs a transformers PreTrainedModel and a SparseDConfig, got {type(model).__name__} "
            f"and {type(config).__name__}"
        )
    if _state(model) is not None:
        remove(model)
    _register()
    state = SparseDState(config=config, saved_implementation=model.config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(state.saved_implementation)
        raise ValueError(
            f"model {type(model).__name__} cannot switch its attention implementation "
            "(it does not use transformers' AttentionInterface)"
        )
    setattr(model, _STATE_ATTR, state)
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            setattr(module, _STATE_ATTR, state)


def remove(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`apply` and drop the state."""
    if model.__dict__.get(WINDOW_CONFIG_ATTR) is not None:
        delattr(model, WINDOW_CONFIG_ATTR)
    state = _state(model)
    if state is None:
        return
    model.set_attn_implementation(state.saved_implementation)
    for module in model.modules():
        if module.__dict__.get(_STATE_ATTR) is not None:
            delattr(module, _STATE_ATTR)


def stats(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics: ``layer``, ``density`` (fraction of tiles computed; 1.0 while dense) and,
    once a pattern exists, ``block_mask`` of batch row 0 as a CPU bool ``[H, nqb, nkb]``."""
    state = _state(model)
    if state is None:
        return []
    layers = sorted(
        {m.layer_idx for m in model.modules() if getattr(m, _STATE_ATTR, None) is state and m is not model}
    )
    rows = []
    for layer in layers:
        pattern = state.patterns.get(layer)
        row = {"layer": layer, "density": 1.0 if pattern is None else pattern.density}
        if pattern is not None:
            row["block_mask"] = pattern.block_mask[0].detach().cpu()
        rows.append(row)
    return rows


def begin_generation(
    model: torch.nn.Module,
    total_steps: int,
    prompt_length: int | torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> None:
    """Start a generation of ``total_steps`` denoising steps: patterns are reset.

    ``prompt_length`` is the index of the first generated token in the (left-padded) sequence, an
    int or a ``[B]`` tensor; with it prompt and generated keys get separate budgets, without it
    one budget covers all keys.

    ``key_valid`` (bool ``[B, N]``, True on real tokens) declares that every attention mask of this
    generation is the key padding mask of these rows (over the first ``n`` positions for a call of
    length ``n``): the sparse path then checks only the mask's shape, never its values. Without it
    each forward's 4D mask is checked (one host read per forward), and under ``torch.compile`` a
    masked call falls back to dense attention.
    """
    state = _state(model)
    if state is None:
        return
    dense_step_count(state.config.skip, total_steps)  # validates total_steps
    declared = None
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool or key_valid.dim() != 2:
            raise ValueError(
                f"key_valid={_describe(key_valid)} must be a bool tensor [batch, tokens] (True on real tokens)"
            )
        if not bool(key_valid.any(-1).all()):
            raise ValueError("key_valid has a row without any real token; allowed: at least one True per row")
        declared = None if bool(key_valid.all()) else key_valid
    state.total_steps = total_steps
    state.step = None
    state.current_phase = "dense"
    state.prompt_length = prompt_length
    state.declared_padding = declared
    state.declared_shape = tuple(key_valid.shape) if key_valid is not None else None
    state.patterns = {}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    state.sparse_call_count = torch.zeros((), dtype=torch.long, device=device)
    state._mask_cache = None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)


def set_step(model: torch.nn.Module, step: int) -> None:
    """Set the 0-based denoising step of the next forward (counted over the whole generation)."""
    state = _state(model)
    if state is None:
        return
    if state.total_steps is None:
        raise ValueError("set_step called before begin_generation")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < state.total_steps:
        raise ValueError(f"step={step!r} is out of range; allowed: integer in [0, {state.total_steps})")
    state.step = step
    state.current_phase = state.phase_of(step)


def end_generation(model: torch.nn.Module) -> None:
    """End the generation: later forwards are dense; the patterns stay readable through :func:`stats`."""
    state = _state(model)
    if state is None:
        return
    state.total_steps = None
    state.step = None
    state.current_phase = "dense"
    state.declared_shape = None
    state.declared_padding = None
    state._mask_cache = None


# ---------------------------------------------------------------- Window-Diffusion

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


def _wrapped_function(module: torch.nn.Module, implementation):
    """The attention function ``implementation`` names for ``module`` (eager: the model's own)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager") or not isinstance(implementation, str):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        log_once("fastgen Window-Diffusion: no eager attention function found; refresh steps use SDPA")
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


def _register_window() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(WINDOW_IMPLEMENTATION, window_attention_forward)
    AttentionMaskInterface.register(WINDOW_IMPLEMENTATION, sdpa_mask)


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
    _register_window()
    state = WindowState(
        cache=WindowKVCache(num_positions), saved_implementation=model.config._attn_implementation
    )
    model.set_attn_implementation(WINDOW_IMPLEMENTATION)
    if model.config._attn_implementation != WINDOW_IMPLEMENTATION:
        model.set_attn_implementation(state.saved_implementation)
        raise ValueError(
            f"model={type(model).__name__} cannot switch its attention implementation (it does not use "
            "transformers' AttentionInterface); Window-Diffusion is not available for it"
        )
    setattr(model, _WINDOW_ATTR, state)
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and module is not model:
            setattr(module, _WINDOW_ATTR, state)
            count += 1
    if count == 0:
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
    "IMPLEMENTATION",
    "WINDOW_CONFIG_ATTR",
    "WINDOW_IMPLEMENTATION",
    "WindowState",
    "begin_window",
    "end_window",
    "window_attention_forward",
    "window_config",
    "SparseDState",
    "apply",
    "begin_generation",
    "end_generation",
    "key_padding_from_mask",
    "remove",
    "set_step",
    "sparsed_attention_forward",
    "stats",
    "supports",
]
