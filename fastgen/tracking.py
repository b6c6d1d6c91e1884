"""Denoising-step tracking for diffusers transformers (used by the sparse-attention processors).

Sparse methods keep the first denoising steps dense, so an attention processor needs to know which
step a call belongs to. A :class:`StepTracker` is attached to a transformer with a diffusers
``ModelHook`` (``diffusers.hooks.HookRegistry``); the hook reads the ``timestep`` argument of every
forward call:

- a new step begins when the timestep value changes, so classifier-free guidance run as two calls
  per step (same timestep twice) or as one batched call counts as ONE step;
- a new generation begins when the pipeline says so: :func:`fastgen.api.apply_to_pipeline` (what
  ``fastgen.apply_sparse_attention(pipe, config)`` does) hooks the scheduler's ``set_timesteps``,
  which every diffusers pipeline calls once at the start of a generation, and
  :meth:`StepTracker.begin_generation` marks one by hand. That resets the step counter and the state
  of the processors. A pipeline that knows its steps (the chunked causal Wan, whose timesteps go
  back up at every chunk) sets :attr:`StepTracker.explicit` and calls :meth:`StepTracker.mark_step`.
- only a tracker that no pipeline drives (a transformer called directly, processors set by hand)
  still guesses: there a timestep that goes back up starts a new generation, and the first such
  guess is logged.

- under ``torch.compile`` the hook is traced with the forward, so it reads no timestep there (a host
  sync and a graph break): a pipeline-driven tracker then advances at each ``scheduler.step`` (the
  scheduler hook), and processors read the warm-up decision as a per-threshold bool
  (:meth:`StepTracker.step_reached`) that a compiled graph guards on, not the step value.

The hook also records the latent video grid ``(frames, height, width)`` after patchify, read from
the shape of ``hidden_states`` and the model's patch size.

State lives on the tracker instance. While a tracked forward runs, the tracker is also reachable
through :func:`active_tracker` (a ``contextvars`` variable scoped to that call), which is how
processors set by hand with ``transformer.set_attn_processor(...)`` find it.

Example (Wan 2.2 has two transformers; one shared tracker counts steps across both):
    >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
    >>> apply_sparse_attention(pipe, RectifiedSpaAttnConfig(sparsity=0.8))
    >>> video = pipe(prompt="a red fox in snow", num_inference_steps=40).frames[0]
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

HOOK_NAME = "fastgen_step_tracker"

_ACTIVE: contextvars.ContextVar[StepTracker | None] = contextvars.ContextVar(
    "fastgen_active_step_tracker", default=None
)

GridFn = Callable[[torch.nn.Module, torch.Tensor], "tuple[int, int, int] | None"]


def active_tracker() -> StepTracker | None:
    """The tracker of the tracked forward call running now (None outside one)."""
    return _ACTIVE.get()


class StepTracker:
    """Counts denoising steps of one generation from the timesteps a transformer is called with."""

    def __init__(self, pipeline_driven: bool = False) -> None:
        self.pipeline_driven: bool = pipeline_driven
        """True when a pipeline marks each generation (scheduler hook or :meth:`begin_generation`): a
        timestep that goes back up is then a further step, never a guessed new generation."""
        self._step: int = -1
        self._reached: dict[int, bool] = {}
        self.generation: int = 0
        """Number of generations started (bumped when the timestep goes back up or on reset)."""
        self.calls: int = 0
        """Forward calls seen in this generation (CFG in two calls gives two per step)."""
        self.grid: tuple[int, int, int] | None = None
        """Latent token grid ``(frames, height, width)`` of the current call, after patchify."""
        self.last_timestep: float | None = None
        """Timestep value of the current step."""
        self.explicit: bool = False
        """True while a pipeline marks steps itself with :meth:`mark_step` (the chunked causal Wan, whose
        timesteps go back up at every chunk): :meth:`observe` then only counts calls and records the grid."""
        self._guess_logged = False
        self._listeners: list[Callable[[], None]] = []
        self._call_end_listeners: list[Callable[[], None]] = []
        self.compiled_calls: bool = False
        """True when the last forward call ran under ``torch.compile`` (the hook could not read its
        timestep): a pipeline-driven tracker then counts steps from the scheduler's ``step``."""

    @property
    def step(self) -> int:
        """Index of the current denoising step in this generation (-1 before the first call)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value
        for n in self._reached:
            self._reached[n] = value >= n

    def watch_step(self, n: int) -> None:
        """Keep :meth:`step_reached` ``(n)`` as a precomputed bool (a processor's ``warmup_steps``)."""
        self._reached[int(n)] = self._step >= n

    def step_reached(self, n: int) -> bool:
        """``step >= n`` (the step before the first call counts as 0). Watched thresholds
        (:meth:`watch_step`) are read from a bool, so a compiled forward guards on that bool, which
        flips once per generation, instead of on the step value (a recompile at every step)."""
        reached = self._reached.get(n)
        return max(self._step, 0) >= n if reached is None else reached

    def scheduler_stepped(self) -> None:
        """The pipeline's scheduler finished a step: under ``torch.compile`` (no timestep read in the
        traced forward) that is what advances the step of a pipeline-driven tracker."""
        if self.compiled_calls and self.pipeline_driven and not self.explicit:
            self.step = max(self.step, 0) + 1

    def observe(self, timestep: float | None, grid: tuple[int, int, int] | None = None) -> None:
        """Record one forward call at ``timestep`` (largest value of the timestep tensor)."""
        self.grid = grid
        self.compiled_calls = False
        if self.explicit:
            self.calls += 1
            return
        if timestep is None:  # no timestep given: every call is its own step
            self.step += 1
        elif self.last_timestep is None:
            self.step = 0
        elif timestep > self.last_timestep and not self.pipeline_driven:
            if not self._guess_logged:
                self._guess_logged = True
                logger.info(
                    "fastgen: new generation guessed from the timestep going back up (%s -> %s): no "
                    "pipeline marks generations for this tracker (processors set by hand or a transformer "
                    "called directly); fastgen.apply_sparse_attention(pipe, config) tracks them from the "
                    "pipeline, StepTracker.begin_generation() marks one by hand",
                    self.last_timestep,
                    timestep,
                )
            self._new_generation()
            self.step = 0
        elif timestep != self.last_timestep:
            self.step += 1
        self.last_timestep = timestep
        self.calls += 1

    def mark_step(self, step: int) -> None:
        """Set the current step explicitly (used with :attr:`explicit`)."""
        self.step = int(step)

    def begin_generation(self) -> None:
        """Mark the start of a new generation (the scheduler hook of :func:`apply_to_pipeline` calls it)."""
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step counter back to the beginning, processors notified."""
        self._new_generation()
        self.step = -1
        self.last_timestep = None
        self.grid = None

    def add_reset_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever a new generation starts (processors reset their state there)."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def remove_reset_listener(self, fn: Callable[[], None]) -> None:
        """Stop notifying ``fn``."""
        if fn in self._listeners:
            self._listeners.remove(fn)

    def add_call_end_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every tracked forward call (processors free their scratch buffers there)."""
        if fn not in self._call_end_listeners:
            self._call_end_listeners.append(fn)

    def remove_call_end_listener(self, fn: Callable[[], None]) -> None:
        """Stop notifying ``fn`` of the end of forward calls."""
        if fn in self._call_end_listeners:
            self._call_end_listeners.remove(fn)

    def call_ended(self) -> None:
        """Tell the call-end listeners that a tracked forward call has returned (or raised)."""
        for fn in list(self._call_end_listeners):
            fn()

    def _new_generation(self) -> None:
        self.generation += 1
        self.calls = 0
        for fn in list(self._listeners):
            fn()

    def __repr__(self) -> str:
        return f"StepTracker(step={self.step}, generation={self.generation}, grid={self.grid})"


def _timestep_value(timestep) -> float | None:
    """One number per call: the largest timestep (Wan 2.2 TI2V gives per-token timesteps with 0s)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max()) if timestep.numel() else None
    return float(timestep)


def video_grid(model: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int, int] | None:
    """Token grid after patchify of a ``[B, C, F, H, W]`` latent for Wan / HunyuanVideo configs."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        return None
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        pt, ph, pw = patch
    elif isinstance(patch, int):
        pt, ph, pw = getattr(config, "patch_size_t", 1) or 1, patch, patch
    else:
        return None
    _, _, f, h, w = hidden_states.shape
    return f // pt, h // ph, w // pw


@functools.cache
def _step_tracking_hook_class():
    """The diffusers ``ModelHook`` subclass, built on first use so importing fastgen does not import
    diffusers (and with it triton)."""
    from diffusers.hooks import ModelHook

    class _StepTrackingHook(ModelHook):
        """diffusers ``ModelHook`` that feeds each forward call's timestep and grid to a tracker."""

        def __init__(self, tracker: StepTracker, grid_fn: GridFn = video_grid) -> None:
            super().__init__()
            self.tracker = tracker
            self.grid_fn = grid_fn

        def new_forward(self, module: torch.nn.Module, *args, **kwargs):
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            if torch.compiler.is_compiling():
                # traced by torch.compile: no timestep read (a host sync and a graph break), no Python
                # state read (a guard per value). Only the grid (from shapes) is written; the step comes
                # from the pipeline (scheduler hook: StepTracker.scheduler_stepped, or mark_step).
                self.tracker.grid = self.grid_fn(module, hidden_states)
                self.tracker.compiled_calls = True
                return self.fn_ref.original_forward(*args, **kwargs)
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self.tracker.observe(_timestep_value(timestep), self.grid_fn(module, hidden_states))
            token = _ACTIVE.set(self.tracker)
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)
                self.tracker.call_ended()

    return _StepTrackingHook


def register_step_tracker(
    model: torch.nn.Module, tracker: StepTracker | None = None, grid_fn: GridFn = video_grid
) -> StepTracker:
    """Attach a step tracker to ``model`` (idempotent) and return it.

    Pass ``tracker`` to share one tracker between models (Wan 2.2's two transformers). If ``model``
    already has a tracker it is returned unchanged (``tracker`` must then be None or that one).
    """
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    existing = registry.get_hook(HOOK_NAME)
    if existing is not None:
        if tracker is not None and tracker is not existing.tracker:
            raise ValueError("register_step_tracker: model already has a different step tracker")
        return existing.tracker
    tracker = tracker if tracker is not None else StepTracker()
    registry.register_hook(_step_tracking_hook_class()(tracker, grid_fn), HOOK_NAME)
    return tracker


def get_step_tracker(model: torch.nn.Module) -> StepTracker | None:
    """The tracker attached to ``model`` (None if none)."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.tracker if hook is not None else None


def remove_step_tracker(model: torch.nn.Module) -> None:
    """Detach the step tracker from ``model`` (a no-op if none)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)


def reset_step_tracking(model: torch.nn.Module) -> None:
    """Start a new generation now: reset the tracker of ``model`` and every fastgen processor on it.

    Needed only when a generation is interrupted midway or processors were set by hand without a
    tracker; otherwise a new generation is detected when the timestep goes back up.
    """
    tracker = get_step_tracker(model)
    if tracker is not None:
        tracker.reset()
    processors = getattr(model, "attn_processors", {}) or {}
    seen = set()
    for proc in processors.values():
        if id(proc) not in seen and callable(getattr(proc, "reset", None)):
            seen.add(id(proc))
            proc.reset()


__all__ = [
    "StepTracker",
    "active_tracker",
    "get_step_tracker",
    "register_step_tracker",
    "remove_step_tracker",
    "reset_step_tracking",
    "video_grid",
]
