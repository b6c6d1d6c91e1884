"""SparseD on transformers diffusion LMs (Llama, Qwen2, ... any model using ``ALL_ATTENTION_FUNCTIONS``):
the attention function, its per-model state and the step protocol. See the package docstring."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastgen._validation import log_once
from fastgen.attention.sparsed import (
    SparseDPattern,
    compute_sparsed_pattern,
    dense_step_count,
    sparsed_attention,
)
from fastgen.attention_stats import DEFAULT_LEVEL, requested_level, stats_providers
from fastgen.configs import SparseDConfig, WindowDiffusionConfig

from ._switch import attach_to_layers, switch_attention
from .window import WINDOW_CONFIG_ATTR

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
    layers: list[int] = field(default_factory=list)
    """Layer indices of the attention modules this state serves."""
    record_stats: str = DEFAULT_LEVEL
    """Statistics shown (``fastgen.attention_stats`` protocol): ``"off"`` (no rows; the default, statistics
    are opt-in), ``"summary"`` (layer, density) or ``"masks"`` (also each layer's block mask of batch row 0).
    The patterns are kept anyway (they are the method's state), so the rows follow the level of the moment
    they are read."""
    _mask_cache: tuple | None = None

    def layer_stats(self) -> list[dict]:
        """One row per layer: ``layer``, ``method`` (``"sparsed"``), ``density`` (fraction of tiles computed;
        1.0 while dense) and at ``"masks"`` level, once a pattern exists, ``block_mask`` of batch row 0 as a
        CPU bool ``[H, nqb, nkb]``."""
        if self.record_stats == "off":
            return []
        rows = []
        for layer in self.layers:
            pattern = self.patterns.get(layer)
            row = {
                "layer": layer,
                "method": "sparsed",
                "density": 1.0 if pattern is None else pattern.density,
            }
            if pattern is not None and self.record_stats == "masks":
                row["block_mask"] = pattern.block_mask[0].detach().cpu()
            rows.append(row)
        return rows

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
        log_once(logger, f"fastgen SparseD: dense attention ({reason})", logging.INFO)
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
        log_once(
            logger, "fastgen SparseD: dense attention (no pattern for this layer and shape)", logging.INFO
        )
        return dense()
    if pattern.num_tokens != query.shape[2]:  # Window-Diffusion's Dream rules: refresh prefixes grow
        log_once(
            logger,
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
    saved = switch_attention(model, IMPLEMENTATION, sparsed_attention_forward, "SparseD")
    state = SparseDState(config=config, saved_implementation=saved, record_stats=requested_level(model))
    state.layers = attach_to_layers(model, _STATE_ATTR, state)
    stats_providers(model)["sparsed"] = state


def remove(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`apply` and drop the state."""
    if model.__dict__.get(WINDOW_CONFIG_ATTR) is not None:
        delattr(model, WINDOW_CONFIG_ATTR)
    state = _state(model)
    if state is None:
        return
    stats_providers(model).pop("sparsed", None)
    model.set_attn_implementation(state.saved_implementation)
    for module in model.modules():
        if module.__dict__.get(_STATE_ATTR) is not None:
            delattr(module, _STATE_ATTR)


def stats(model: torch.nn.Module) -> list[dict]:
    """SparseD's per-layer statistics: ``layer``, ``density`` (fraction of tiles computed; 1.0 while dense)
    and, once a pattern exists, ``block_mask`` of batch row 0 as a CPU bool ``[H, nqb, nkb]`` (whatever the
    recording level; ``fastgen.attention_stats(model)`` gives these rows, and Window-Diffusion's, through
    the shared interface)."""
    state = _state(model)
    if state is None:
        return []
    rows = []
    for layer in state.layers:
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


__all__ = [
    "IMPLEMENTATION",
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
