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


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [H, W] planes written out position by position (Wang et al. 2004): 11 x 11 Gaussian
    weights with sigma 1.5 normalised to 1, weighted means, variances and covariance about the mean,
    C1 = (0.01)^2, C2 = (0.03)^2, averaged over the positions where the window fits."""
    offsets = np.arange(11) - 5
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    weights /= weights.sum()
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (weights * px).sum(), (weights * py).sum()
            vx, vy = (weights * (px - mx) ** 2).sum(), (weights * (py - my) ** 2).sum()
            cxy = (weights * (px - mx) * (py - my)).sum()
            c1, c2 = 0.01**2, 0.03**2
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_uses_the_standard_gaussian_window():
    """Against the position-by-position definition: 2 frames x 3 channels, 17 x 14 (not square, not a
    multiple of the window), a smooth picture and a noisy copy of it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:17, 0:14]
    phase = np.arange(3)[None, None, :]
    base = 0.5 + 0.36 * np.sin(xx / 3.0)[..., None] * np.cos(yy[..., None] / 4.0 + phase)
    a = np.stack([base, np.roll(base, 2, axis=1)])  # [2, 17, 14, 3]
    b = np.clip(a + 0.08 * rng.standard_normal(a.shape), 0, 1)
    want = np.mean([_ssim_by_hand(a[f, ..., c], b[f, ..., c]) for f in range(2) for c in range(3)])
    assert ssim(a, b) == pytest.approx(want, abs=1e-10)
    assert 0.3 < want < 0.95  # a case where the window shape matters, not a saturated one


def test_ssim_of_flat_frames_is_the_luminance_term():
    """Flat frames have zero variance, so SSIM is (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) exactly."""
    a, b = np.full((1, 12, 12, 1), 0.2), np.full((1, 12, 12, 1), 0.6)
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4), abs=1e-12)
    uint8 = (np.full((1, 12, 12, 3), 51, np.uint8), np.full((1, 12, 12, 3), 153, np.uint8))
    assert ssim(*uint8) == pytest.approx(ssim(a.repeat(3, -1), b.repeat(3, -1)), abs=1e-12)


def test_ssim_rejects_frames_smaller_than_its_window():
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(np.zeros((1, 10, 32, 3)), np.zeros((1, 10, 32, 3)))
