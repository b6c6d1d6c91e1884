"""Atomic writers and fidelity metrics."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fastgen.io import atomic_path, read_video, write_text, write_video
from fastgen.metrics import psnr, ssim, token_agreement


def test_write_text_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    write_text(path, "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"previous complete file")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"previous complete file"
    assert sorted(os.listdir(tmp_path)) == ["video.mp4"]


def test_video_round_trip(tmp_path):
    yy, xx = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 24), indexing="ij")
    smooth = np.stack([yy, xx, 0.5 * (yy + xx)], -1)  # smooth content: what a codec keeps
    frames = (np.stack([np.roll(smooth, t, axis=1) for t in range(4)]) * 255).astype(np.uint8)
    path = write_video(tmp_path / "a.mp4", frames, fps=8)
    back = read_video(path)
    assert back.shape == frames.shape
    assert psnr(back, frames) > 25  # lossy codec, but the same picture
    with pytest.raises(ValueError, match="frames must have shape"):
        write_video(tmp_path / "b.mp4", frames[..., 0])


def test_metrics():
    a = np.random.rand(2, 20, 20, 3)
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + 0.2 * np.random.randn(*a.shape), 0, 1)
    assert ssim(a, noisy) < 0.9
    assert psnr(a, noisy) < 20
    assert token_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:1])
