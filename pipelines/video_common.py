"""Small helpers the video runners and loaders share: device and dtype defaults, the pipeline's execution
device, and the checks of generation values (kept apart so the runners and loaders import no each other)."""

from __future__ import annotations

import numpy as np
import torch


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


__all__ = ["check_generation_values", "execution_device", "resolve_device_dtype"]
