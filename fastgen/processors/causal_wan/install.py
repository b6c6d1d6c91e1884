"""Installing and removing the causal Wan's processors and RoPE hook, and :func:`causal_generation`.
See the package docstring."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from fastgen.attention_stats import requested_level

from .._install import carry_backend, is_wan
from ..wan import _STATE_ATTR as RECTIFIED_STATE_ATTR
from .processors import (
    CausalWanCrossAttnProcessor,
    CausalWanSelfAttnProcessor,
    _CausalProcessorBase,
    _rope_hook_class,
)
from .session import ROPE_HOOK_NAME, CausalWanSession, CausalWanState

_STATE_ATTR = "_fastgen_causal_wan"


def check_causal_wan(model) -> None:
    """``ValueError`` unless ``model`` is a text-to-video ``WanTransformer3DModel`` with frame patch 1."""
    if not is_wan(model):
        raise ValueError(
            f"transformer={type(model).__name__} is not supported; allowed: diffusers WanTransformer3DModel"
        )
    if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
        raise ValueError(
            "transformer is an image-to-video Wan (image_dim / added_kv_proj_dim set); allowed: text-to-video Wan"
        )
    if tuple(model.config.patch_size)[0] != 1:
        raise ValueError(
            f"transformer patch_size={tuple(model.config.patch_size)} has a temporal patch != 1; allowed: (1, p, p)"
        )


def get_causal_state(model) -> CausalWanState | None:
    """The :class:`CausalWanState` of ``model`` if causal processors are installed, else None."""
    saved = getattr(model, _STATE_ATTR, None)
    return saved["state"] if saved is not None else None


def install_causal_processors(
    model,
    self_attention: Callable[[int, CausalWanState], CausalWanSelfAttnProcessor] | None = None,
) -> CausalWanState:
    """Install the causal processors (``attn1``: ``self_attention(layer, state)``, default
    :class:`CausalWanSelfAttnProcessor`; ``attn2``: :class:`CausalWanCrossAttnProcessor`) and the RoPE hook
    on a diffusers ``WanTransformer3DModel``. Installing again replaces the previous causal processors.
    Processors that keep statistics start at the level asked for on ``model``
    (``fastgen.attention_stats.requested_level``). The original processor objects are saved on the instance for :func:`remove_causal_processors`."""
    from diffusers.hooks import HookRegistry

    check_causal_wan(model)
    if getattr(model, RECTIFIED_STATE_ATTR, None) is not None:
        raise ValueError(
            "this transformer has RectifiedSpaAttnConfig applied; the causal Wan's chunked generation installs "
            "its own causal processors, which would replace it and run dense; allowed: remove it "
            "(fastgen.remove_sparse_attention) and apply LightForcingConfig, the causal method"
        )
    remove_causal_processors(model)
    build = self_attention or (lambda layer, state: CausalWanSelfAttnProcessor(layer, state))
    state = CausalWanState()
    saved = dict(model.attn_processors)
    new = dict(saved)
    for i in range(len(model.blocks)):
        for name, proc in (
            (f"blocks.{i}.attn1.processor", build(i, state)),
            (f"blocks.{i}.attn2.processor", CausalWanCrossAttnProcessor(i, state)),
        ):
            if not isinstance(proc, _CausalProcessorBase):
                raise ValueError(
                    f"self_attention must build causal Wan processors, got {type(proc).__name__}"
                )
            carry_backend(proc, saved[name])
            if hasattr(proc, "record_stats"):  # statistics at the level asked for on the model
                proc.record_stats = requested_level(model)
            new[name] = proc
    model.set_attn_processor(new)
    registry = HookRegistry.check_if_exists_or_initialize(model.rope)
    registry.register_hook(_rope_hook_class()(state), ROPE_HOOK_NAME)
    setattr(model, _STATE_ATTR, {"saved": saved, "state": state})
    return state


def remove_causal_processors(model) -> None:
    """Undo :func:`install_causal_processors`: original processors back, RoPE hook removed (no-op if none)."""
    saved = getattr(model, _STATE_ATTR, None)
    if saved is None:
        return
    if saved["state"].session is not None:
        saved["state"].session.close()
        saved["state"].session = None
    model.set_attn_processor(dict(saved["saved"]))
    registry = getattr(model.rope, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(ROPE_HOOK_NAME) is not None:
        registry.remove_hook(ROPE_HOOK_NAME, recurse=False)
    setattr(model, _STATE_ATTR, None)


@contextlib.contextmanager
def causal_generation(model, **session_options) -> Iterator[CausalWanSession]:
    """Open a :class:`CausalWanSession` (options: its constructor's) on ``model`` for one generation.

    Uses the causal processors already installed (e.g. Light Forcing's) or installs the dense ones for
    the duration of the block and removes them after. The caches are freed on exit.
    """
    session = CausalWanSession(**session_options)  # validates before anything is installed
    state = get_causal_state(model)
    installed_here = state is None
    if installed_here:
        state = install_causal_processors(model)
    if state.session is not None:
        raise RuntimeError("a causal generation is already running on this transformer")
    state.session = session
    try:
        yield session
    finally:
        session.close()
        state.session = None
        if installed_here:
            remove_causal_processors(model)


__all__ = [
    "causal_generation",
    "check_causal_wan",
    "get_causal_state",
    "install_causal_processors",
    "remove_causal_processors",
]
