"""The one timing helper of the benchmarks: wall-clock seconds of a call, synchronised on CUDA before and
after (a CUDA call returns before its kernels finish), and CUDA-event milliseconds for the GPU checks.
Every helper returns ``(result, seconds)`` in that order."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the CUDA work queued on ``device`` (every CUDA device when None and CUDA is available);
    nothing on other devices."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[object, float]:
    """``(fn(), wall-clock seconds)`` of one call, synchronised on CUDA before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_call(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall-clock seconds of one call of ``fn`` (synchronised on CUDA)."""
    return timed(fn, device)[1]


def time_per_call(fn: Callable[[], object], calls: int, device: torch.device | str | None = None) -> float:
    """Mean wall-clock seconds of ``calls`` back-to-back calls of ``fn`` (synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def cuda_event_ms(fn: Callable[[], object], rounds: int) -> list[float]:
    """Milliseconds of ``fn()`` per round, from CUDA events around each call (synchronised)."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


__all__ = ["cuda_event_ms", "synchronize", "time_call", "time_per_call", "timed"]
