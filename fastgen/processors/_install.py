"""What every diffusers adapter shares: model detection, the dense dispatch, config checks, and installing
/ restoring attention processors on a model instance (step tracker included).

The adapter protocol (``fastgen.api`` dispatches on it): each adapter module has
``supports(model, config) -> Support`` (truthy when it can run ``config`` on ``model``; falsy with the
reason when the model is its family but the config is not one it can run), ``apply(model, config)``,
``remove(model)`` and ``stats(model)``.
"""

from __future__ import annotations

import torch

from fastgen.attention.workspace import Workspace
from fastgen.attention_stats import requested_level
from fastgen.tracking import get_step_tracker, register_step_tracker, remove_step_tracker

MIN_HEAD_DIM = 16
"""Smallest head_dim the sparse kernels serve."""
MAX_HEAD_DIM = 256
"""Largest head_dim the sparse kernels serve."""


class Support:
    """An adapter's answer to "can you run this config on this model?": truthy when yes; falsy with
    ``reason`` set when the model is of its family but it cannot run the config (``reason`` empty when
    the model is not its family at all)."""

    def __init__(self, ok: bool, reason: str = "") -> None:
        self.ok = ok
        """Whether the adapter runs the config on the model."""
        self.reason = reason
        """Why not (for the user's error message), when the adapter knows the model."""

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"Support({self.ok}{', ' + repr(self.reason) if self.reason else ''})"


def head_dim_supported(head_dim: int) -> bool:
    """Whether the sparse kernels serve this head_dim (multiple of 8 in [16, 256])."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def is_wan(model) -> bool:
    """Whether ``model`` is diffusers' ``WanTransformer3DModel`` (the one Wan detector of the adapters)."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, WanTransformer3DModel)


def check_config(config, kind: type, who: str):
    """``config`` itself if it is a ``kind``, else a ``ValueError`` naming ``who`` cannot run it."""
    if not isinstance(config, kind):
        raise ValueError(
            f"config={type(config).__name__} is not supported by {who}; allowed: {kind.__name__}"
        )
    return config


def dense_dispatch(processor, query, key, value, attn_mask=None, parallel_config=None) -> torch.Tensor:
    """diffusers' dispatched attention on ``[B, N, H, D]`` tensors with ``processor``'s attention backend
    (so ``set_attention_backend`` keeps working); the one dense path of every fastgen processor."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=0.0,
        is_causal=False,
        backend=processor._attention_backend,
        parallel_config=parallel_config,
    )


def carry_backend(processor, original) -> None:
    """Keep what diffusers' ``set_attention_backend`` / context parallelism wrote on the processor that
    ``processor`` replaces."""
    processor._attention_backend = getattr(original, "_attention_backend", None)
    processor._parallel_config = getattr(original, "_parallel_config", None)


def install_processors(model: torch.nn.Module, state_attr: str, build) -> None:
    """Attach the step tracker and set the processors ``build(tracker)`` returns (attention-processor
    name -> new processor) on ``model``, keeping every other processor; they record statistics at the
    level asked for on ``model`` (``fastgen.attention_stats.requested_level``: ``"off"`` unless asked).
    The originals and whether the tracker was attached here are saved on the model instance under
    ``state_attr`` so :func:`restore_processors` puts back exactly those objects."""
    restore_processors(model, state_attr)
    owns_tracker = get_step_tracker(model) is None
    processors = build(register_step_tracker(model))
    saved = dict(model.attn_processors)
    new = dict(saved)
    workspace = Workspace()  # the layers run one after another: one set of scratch buffers for all
    for name, proc in processors.items():
        carry_backend(proc, saved[name])
        proc.workspace = workspace
        if hasattr(proc, "record_stats"):
            proc.record_stats = requested_level(model)
        new[name] = proc
    model.set_attn_processor(new)
    setattr(model, state_attr, {"saved": saved, "owns_tracker": owns_tracker})


def restore_processors(model: torch.nn.Module, state_attr: str) -> None:
    """Undo :func:`install_processors`: the saved processor objects come back and a step tracker
    attached by the install is removed."""
    state = getattr(model, state_attr, None)
    if state is None:
        return
    saved = dict(state["saved"])
    for name, proc in model.attn_processors.items():
        if callable(getattr(proc, "detach", None)):
            proc.detach()
        if name in saved:  # set_attention_backend / context parallelism made while applied are kept
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(proc, attr, None) is not getattr(saved[name], attr, None):
                    setattr(saved[name], attr, getattr(proc, attr, None))
    model.set_attn_processor(saved)
    if state["owns_tracker"]:
        remove_step_tracker(model)
    setattr(model, state_attr, None)


__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "Support",
    "carry_backend",
    "check_config",
    "dense_dispatch",
    "head_dim_supported",
    "install_processors",
    "is_wan",
    "restore_processors",
]
