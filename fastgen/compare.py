"""The one dense-vs-accelerated comparison used by ``fastgen generate --compare-dense``, ``fastgen batch
--compare-dense`` and the demo, so the three report the same speed-up for the same run.

It reports only what it measured: when the accelerated run never ran sparse (e.g. Rectified SpaAttn
with ``warmup_steps >= steps``, SparseD skipping every step, Window-Diffusion never pruning), it gives the
reason and no speed-up. Timings come from several interleaved rounds (accelerated and dense alternate,
the order flipping every round); the speed-up is the median of the per-round ratios, shown with their
range and the load average of the machine (and a warning when the load is high).

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
    >>> c.speedup, c.fidelity["psnr"], c.speed_summary()
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_warmed: dict[int, set[str]] = {}
"""Methods already warmed up, per pipeline (by ``id``; an entry goes when its pipeline is collected)."""


DEFAULT_ROUNDS = 3
"""Interleaved timing rounds of a comparison unless asked otherwise."""

HIGH_LOAD = 0.8
"""A 1-minute load average above this fraction of the CPU count makes timings unreliable (warning)."""


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


@dataclass
class Comparison:
    """Result of :func:`compare_with_dense`."""

    accelerated: dict
    """The accelerated run's result of the first round (as the ``generate`` function returns it)."""
    dense: dict
    """The dense run's result of the first round, same seed and options."""
    speedup: float | None
    """Median over rounds of dense seconds / accelerated seconds (warm-up excluded); ``None`` when a time
    is missing or zero, or when the accelerated run never ran sparse (:attr:`not_sparse`)."""
    fidelity: dict = field(default_factory=dict)
    """Figures of the accelerated output against dense (e.g. ``psnr``/``ssim`` or ``token_agreement``)."""
    warmed_up: bool = False
    """True if this call ran the untimed warm-up (first comparison of this pipeline and method)."""
    speedups: list = field(default_factory=list)
    """The per-round ratios (dense / accelerated) the median is taken over."""
    accelerated_seconds: list = field(default_factory=list)
    """Seconds of the accelerated run in every round."""
    dense_seconds: list = field(default_factory=list)
    """Seconds of the dense run in every round."""
    load: float | None = None
    """Highest 1-minute load average seen before and after the rounds (``None`` if unknown)."""
    cpus: int = 1
    """CPU count of the machine, to read :attr:`load` against."""
    not_sparse: str | None = None
    """Why the accelerated run never ran sparse (then there is no speed-up), else ``None``."""

    @property
    def rounds(self) -> int:
        """Number of timed rounds."""
        return len(self.accelerated_seconds)

    def load_text(self) -> str:
        """``"load average 0.52 on 2 CPUs"`` (or ``"load average unknown"``)."""
        if self.load is None:
            return "load average unknown"
        return f"load average {self.load:.2f} on {self.cpus} CPU{'s' if self.cpus != 1 else ''}"

    def high_load(self) -> bool:
        """Whether the load average was high enough to make the timings unreliable."""
        return self.load is not None and self.load > HIGH_LOAD * self.cpus

    def speed_summary(self) -> str:
        """One line: the median speed-up with its range, rounds and the load average; or why there is none."""
        if self.not_sparse is not None:
            return f"no speedup vs dense: sparse attention never ran ({self.not_sparse}); the output is dense"
        if self.speedup is None:
            return f"speedup vs dense not measured (a time is missing or zero); {self.load_text()}"
        text = f"speedup vs dense {self.speedup:.2f}x"
        if len(self.speedups) > 1:
            text += (
                f" (median of {len(self.speedups)} interleaved rounds, range "
                f"{min(self.speedups):.2f}x-{max(self.speedups):.2f}x; warm-up excluded; {self.load_text()})"
            )
        else:
            text += f" (1 round, warm-up excluded; {self.load_text()}; one round says little: use --rounds)"
        return text

    def load_warning(self) -> str | None:
        """A warning line when the load average was high during the rounds (and a speedup is shown),
        else ``None``."""
        if not self.high_load() or self.not_sparse is not None:
            return None
        return (
            f"warning: {self.load_text()} during the timing: other work shared the CPUs, so the speedup "
            "is unreliable; rerun on an idle machine or with more --rounds"
        )


def sparse_never_ran(method: str, result: dict) -> str | None:
    """Why the accelerated ``result`` of ``method`` ran no sparse attention at all (``None`` if it did),
    read from what the run recorded: its statistics, its config and the steps it ran."""
    from fastgen.stats import mean_stat, stats_layers

    stats = result.get("stats")
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    if method == "rectified":
        if stats_layers(stats):
            return None
        warm, steps = config.get("warmup_steps"), result.get("steps")
        if warm is not None and steps is not None and warm >= steps:
            return f"warmup_steps={warm} >= steps={steps}"
        return "no layer recorded a sparse call (dense_layers, min_tokens or a short sequence kept every layer dense)"
    if method == "light_forcing":
        return None if stats_layers(stats) else "no chunk recorded a sparse call"
    reasons = []
    if "sparsed" in method and mean_stat(stats, "density") is None:
        parts = [config.get("method") or {}, *(config.get("acceleration") or [])]
        skip = next((p["skip"] for p in parts if isinstance(p, dict) and p.get("skip") is not None), None)
        reasons.append(
            "SparseD ran no sparse step" + (f" (skip={skip} of the steps run dense)" if skip else "")
        )
    if "window_diffusion" in method and isinstance(stats, dict) and stats.get("pruned_steps") == 0:
        reasons.append("Window-Diffusion pruned no step (every step was a refresh step)")
    if method == "sparsed+window_diffusion" and len(reasons) < 2:
        return None  # one of the two ran: the run was accelerated
    return "; ".join(reasons) or None


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
    rounds: int = DEFAULT_ROUNDS,
    **options,
) -> Comparison:
    """Time ``method`` and dense on ``pipe`` with the same options in ``rounds`` interleaved rounds;
    warm-up excluded (module docstring).

    Args:
        generate: ``generate(pipe, method=..., config=..., **options) -> dict`` with a ``seconds`` entry
            (``generate_video`` or ``generate_text``).
        pipe: the pipeline.
        method: the accelerated method name (not ``"dense"``).
        config: its config (``None`` = the runner's default).
        fidelity: ``fidelity(accelerated, dense) -> dict`` of figures.
        warm_up: options that make the untimed warm-up call short.
        rounds: timed rounds (>= 1); each runs both, the order flipping every round.
        options: generation options shared by both runs (prompt, seed, steps, ...).
    """
    if method == "dense":
        raise ValueError("method='dense' has nothing to compare with; pass the accelerated method")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not allowed; allowed: an integer >= 1")
    ran = warm_up_once(generate, pipe, method=method, config=config, warm_up=warm_up, **options)
    ran = warm_up_once(generate, pipe, method="dense", config=None, warm_up=warm_up, **options) or ran
    loads = [load_average()]
    accelerated = dense = None
    acc_seconds, dense_seconds = [], []
    for r in range(rounds):
        order = ("acc", "dense") if r % 2 == 0 else ("dense", "acc")
        if r > 0:
            options = {**options, "progress": False}
        for which in order:
            if which == "acc":
                out = generate(pipe, method=method, config=config, **options)
                accelerated = accelerated or out
                acc_seconds.append(out.get("seconds"))
            else:
                out = generate(pipe, method="dense", config=None, **options)
                dense = dense or out
                dense_seconds.append(out.get("seconds"))
    loads.append(load_average())
    ratios = [speedup_of(d, a) for d, a in zip(dense_seconds, acc_seconds)]
    not_sparse = sparse_never_ran(method, accelerated)
    speedup = None
    if not_sparse is None and ratios and all(x is not None for x in ratios):
        speedup = float(statistics.median(ratios))
    known = [x for x in loads if x is not None]
    return Comparison(
        accelerated=accelerated,
        dense=dense,
        speedup=speedup,
        fidelity=fidelity(accelerated, dense),
        warmed_up=ran,
        speedups=[x for x in ratios if x is not None] if not_sparse is None else [],
        accelerated_seconds=acc_seconds,
        dense_seconds=dense_seconds,
        load=max(known) if known else None,
        cpus=os.cpu_count() or 1,
        not_sparse=not_sparse,
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
    "DEFAULT_ROUNDS",
    "Comparison",
    "load_average",
    "sparse_never_ran",
    "compare_with_dense",
    "speedup_of",
    "text_fidelity",
    "video_fidelity",
    "warm_up_once",
]
