"""Atomic output files: written to a temporary file beside the target, then renamed into place, so an
interrupted run never leaves a truncated file that looks complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the target's folder; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the target's extension (imageio picks the format from it).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return os.fspath(path)


def to_uint8(frames) -> np.ndarray:
    """``frames`` as uint8: floats in [0, 1] are clipped, scaled to 0-255 and rounded; uint8 is kept."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 16) -> str:
    """Write ``frames`` (``[T, H, W, 3]`` uint8, or float in [0, 1]) as an mp4 atomically with imageio."""
    import imageio.v2 as imageio

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {frames.shape}")
    with atomic_path(path) as tmp:
        # macro_block_size=1 keeps odd tiny sizes as they are instead of resizing
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=8)
    return os.fspath(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read an mp4 back as ``[T, H, W, 3]`` uint8."""
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(os.fspath(path), memtest=False))
