"""The one dense-vs-accelerated comparison used by ``fastgen generate --compare-dense``, ``fastgen batch
--compare-dense`` and the demo, so the three report the same speed-up for the same run.

Warm-up policy (the only one): before the first timed comparison of a (pipeline, method) pair in a
process, one short untimed call of that method runs (:data:`VIDEO_WARM_UP`: 1 denoising step for video;
:func:`text_warm_up`: a 4-token generation for text), so neither timed run pays one-time costs (kernel builds, lazy initialisation, allocator
growth); later comparisons in the same process (a batch, the next demo request) skip it. The
accelerated run is timed first, then dense, both with the same seed and options.

Example:
    >>> from fastgen.compare import compare_with_dense, video_fidelity
    >>> from fastgen.pipelines.video_runner import generate_video, load_video_pipeline
    >>> pipe = load_video_pipeline("tiny-wan-long")
    >>> c = compare_with_dense(generate_video, pipe, method="rectified", fidelity=video_fidelity,
    ...                        warm_up={"steps": 1}, prompt="a kite", seed=0)
    >>> c.speedup, c.fidelity["psnr"]
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_warmed: dict[int, set[str]] = {}
"""Methods already warmed up, per pipeline (by ``id``; an entry goes when its pipeline is collected)."""


@dataclass
class Comparison:
    """Result of :func:`compare_with_dense`."""

    accelerated: dict
    """The accelerated run's result (as the ``generate`` function returns it)."""
    dense: dict
    """The dense run's result, same seed and options."""
    speedup: float | None
    """Dense seconds / accelerated seconds (warm-up excluded); ``None`` if a time is missing or zero."""
    fidelity: dict = field(default_factory=dict)
    """Figures of the accelerated output against dense (e.g. ``psnr``/``ssim`` or ``token_agreement``)."""
    warmed_up: bool = False
    """True if this call ran the untimed warm-up (first comparison of this pipeline and method)."""


VIDEO_WARM_UP = {"steps": 1}
"""Options of the untimed video warm-up call: one denoising step."""


def text_warm_up(gen_length: int) -> dict:
    """Options of the untimed text warm-up call: a generation of ``min(4, gen_length)`` tokens, one per
    step, in one block (one token per step keeps every method's own constraints, e.g.
    Window-Diffusion's ``active + (refresh_cycle - 1) * tokens_per_step <= window``)."""
    w = max(1, min(4, int(gen_length)))
    return {"gen_length": w, "steps": w, "block_length": w}


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def speedup_of(dense_seconds, accelerated_seconds) -> float | None:
    """``dense / accelerated`` for positive finite times, else ``None``."""
    d, a = _finite(dense_seconds), _finite(accelerated_seconds)
    if d is None or a is None or a <= 0:
        return None
    return d / a


def warm_up_once(
    generate: Callable[..., dict], pipe, *, method: str, config=None, warm_up: dict, **options
) -> bool:
    """Run one untimed short call of ``method`` on ``pipe`` unless it ran already in this process.

    Returns True if it ran. ``warm_up`` holds the options that make the call short (e.g. ``{"steps": 1}``).
    """
    key = id(pipe)
    if key not in _warmed:
        _warmed[key] = set()
        if _weakrefable(pipe):
            weakref.finalize(pipe, _warmed.pop, key, None)
    done = _warmed[key]
    if method in done:
        return False
    logger.info("untimed warm-up call of %s (excluded from timings)", method)
    generate(pipe, method=method, config=config, **{**options, **warm_up, "progress": False})
    done.add(method)
    return True


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def compare_with_dense(
    generate: Callable[..., dict],
    pipe,
    *,
    method: str,
    config=None,
    fidelity: Callable[[dict, dict], dict],
    warm_up: dict,
    **options,
) -> Comparison:
    """Time ``method`` and dense on ``pipe`` with the same options; warm-up excluded (module docstring).

    Args:
        generate: ``generate(pipe, method=..., config=..., **options) -> dict`` with a ``seconds`` entry
            (``generate_video`` or ``generate_text``).
        pipe: the pipeline.
        method: the accelerated method name (not ``"dense"``).
        config: its config (``None`` = the runner's default).
        fidelity: ``fidelity(accelerated, dense) -> dict`` of figures.
        warm_up: options that make the untimed warm-up call short.
        options: generation options shared by both runs (prompt, seed, steps, ...).
    """
    if method == "dense":
        raise ValueError("method='dense' has nothing to compare with; pass the accelerated method")
    ran = warm_up_once(generate, pipe, method=method, config=config, warm_up=warm_up, **options)
    ran = warm_up_once(generate, pipe, method="dense", config=None, warm_up=warm_up, **options) or ran
    accelerated = generate(pipe, method=method, config=config, **options)
    dense = generate(pipe, method="dense", config=None, **options)
    return Comparison(
        accelerated=accelerated,
        dense=dense,
        speedup=speedup_of(dense.get("seconds"), accelerated.get("seconds")),
        fidelity=fidelity(accelerated, dense),
        warmed_up=ran,
    )


def video_fidelity(accelerated: dict, dense: dict) -> dict:
    """``psnr`` (dB; ``None`` when the frames are identical) and ``ssim`` of the accelerated frames vs dense."""
    from fastgen.metrics import psnr, ssim

    value = psnr(dense["frames"], accelerated["frames"])
    return {
        "psnr": None if math.isinf(value) else float(value),
        "identical": bool(math.isinf(value)),
        "ssim": float(ssim(dense["frames"], accelerated["frames"])),
    }


def text_fidelity(accelerated: dict, dense: dict, answer: str | None = None) -> dict:
    """``token_agreement`` with dense, and when ``answer`` is known whether each text is exactly right."""
    from fastgen.metrics import token_agreement

    out = {"token_agreement": float(token_agreement(accelerated["tokens"], dense["tokens"]))}
    if answer is not None:
        out["accelerated_correct"] = accelerated["text"].split() == answer.split()
        out["dense_correct"] = dense["text"].split() == answer.split()
    return out


__all__ = [
    "Comparison",
    "compare_with_dense",
    "speedup_of",
    "text_fidelity",
    "video_fidelity",
    "warm_up_once",
]
