"""Small helpers the video runners and loaders share: device and dtype defaults, the pipeline's execution
device, the checks of generation values, the pipeline call's arguments and the one timed call with a
method applied for it (kept apart so the runners and loaders import no each other)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from fastgen.kernels.cpu_attn import warm_up_cpu_kernel

from fastgen.api import apply_sparse_attention, remove_sparse_attention
from fastgen.attention_stats import recording_attention_stats


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Default device (CUDA if available) and dtype (float32 on CPU, bfloat16 on GPU); strings accepted."""
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in allowed:
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(allowed)}")
        dtype = allowed[dtype]
    return device, dtype


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes: diffusers' ``_execution_device`` (the accelerator under
    ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``, where ``pipe.device`` says cpu)."""
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else torch.device(pipe.device)


def check_generation_values(**values) -> None:
    """A ``ValueError`` naming the first value that is not allowed: ``steps``, ``height``, ``width``,
    ``frames``, ``local_attn_frames`` must be integers >= 1 when given, ``sink_frames`` an integer >= 0,
    ``guidance_scale`` a finite number >= 0 (``None`` = the pipeline's default; 0 is never read as one)."""
    import math

    for name, value in values.items():
        if value is None:
            continue
        if name == "guidance_scale":
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or value < 0:
                raise ValueError(f"guidance_scale={value!r} is not allowed; allowed: a number >= 0")
            continue
        low = 0 if name == "sink_frames" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= {low}")


def call_kwargs(
    defaults: dict, *, prompt, negative_prompt, seed, height, width, frames, guidance_scale, **extra
) -> dict:
    """The video pipeline's call arguments: the given sizes and guidance, else ``defaults``' (keys
    ``height``, ``width``, ``frames``, ``guidance_scale``); a CPU generator seeded with ``seed``; numpy
    output; ``extra`` added as they are."""

    def pick(name, value):
        return defaults[name] if value is None else value

    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": pick("height", height),
        "width": pick("width", width),
        "num_frames": pick("frames", frames),
        "guidance_scale": pick("guidance_scale", guidance_scale),
        "generator": torch.Generator("cpu").manual_seed(int(seed)),
        "output_type": "np",
        **extra,
    }


def timed_call(
    pipe,
    kwargs: dict,
    *,
    config=None,
    target=None,
    models: Sequence[torch.nn.Module] = (),
    read_stats: Callable[[], list] | None = None,
) -> tuple:
    """``pipe(**kwargs)`` once under ``torch.no_grad``, timed (the execution device synchronised before the
    clock stops). With ``config``: the native CPU kernel is built first when the pipeline runs on the CPU
    (not timed), ``config`` is applied to ``target`` for this call only, the block masks are recorded on
    ``models`` (statistics are opt-in) and ``read_stats()`` gives the statistics before the removal.
    Returns ``(output, seconds, stats)``; ``stats`` is ``[]`` without ``config``."""
    device = execution_device(pipe)
    if config is None:
        target, models = None, ()
    else:
        if device.type == "cpu":  # a first build of the CPU kernel must not land in the timing
            warm_up_cpu_kernel()
        apply_sparse_attention(target, config)
    try:
        with contextlib.ExitStack() as recording:
            for model in models:
                recording.enter_context(recording_attention_stats(model, "masks"))
            start = time.perf_counter()
            with torch.no_grad():
                output = pipe(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            stats = read_stats() if target is not None and read_stats is not None else []
    finally:
        if target is not None:
            remove_sparse_attention(target)
    return output, seconds, stats


__all__ = [
    "call_kwargs",
    "check_generation_values",
    "execution_device",
    "resolve_device_dtype",
    "timed_call",
]
