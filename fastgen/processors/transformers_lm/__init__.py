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

Layout: :mod:`.sparsed` (SparseD's attention function, state and step protocol) and :mod:`.window`
(Window-Diffusion's attention function, state and statistics); this package is the adapter
``fastgen.apply_sparse_attention`` dispatches to (``supports`` / ``apply`` / ``remove`` / ``stats``).
"""

from .sparsed import (
    IMPLEMENTATION,
    SparseDState,
    apply,
    begin_generation,
    end_generation,
    key_padding_from_mask,
    remove,
    set_step,
    sparsed_attention_forward,
    stats,
    supports,
)
from .window import (
    WINDOW_CONFIG_ATTR,
    WINDOW_IMPLEMENTATION,
    WindowState,
    WindowStats,
    begin_window,
    end_window,
    window_attention_forward,
    window_config,
)

__all__ = [
    "IMPLEMENTATION",
    "WINDOW_CONFIG_ATTR",
    "WINDOW_IMPLEMENTATION",
    "SparseDState",
    "WindowState",
    "WindowStats",
    "apply",
    "begin_generation",
    "begin_window",
    "end_generation",
    "end_window",
    "key_padding_from_mask",
    "remove",
    "set_step",
    "sparsed_attention_forward",
    "stats",
    "supports",
    "window_attention_forward",
    "window_config",
]
