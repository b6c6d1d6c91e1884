"""Fidelity metrics of accelerated vs dense outputs: PSNR / SSIM for video, token agreement for text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_float(frames: np.ndarray) -> np.ndarray:
    x = np.asarray(frames)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over whole videos/images in [0, 1] (or uint8); ``inf`` when identical."""
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


SSIM_WINDOW = 11
"""Side of SSIM's Gaussian window (Wang et al. 2004; scikit-image ``gaussian_weights=True``)."""

SSIM_SIGMA = 1.5
"""Standard deviation of SSIM's Gaussian window, in pixels."""


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1D Gaussian taps ``exp(-x^2 / 2 sigma^2)`` at ``x = -(size // 2) .. size // 2``, summing to 1."""
    x = np.arange(size, dtype=np.float64) - size // 2
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of frames ``[..., H, W, C]`` (uint8, or float in [0, 1]), as published SSIM figures
    are computed: per channel, an 11 x 11 Gaussian window with sigma 1.5, data range 1,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``, population (co)variances, and the mean over the positions where
    the window fits inside the frame (Wang et al. 2004; equal to scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=-1)``). Frames must be at least 11 pixels high and wide."""
    import torch
    import torch.nn.functional as F

    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {x.shape} and {y.shape}")
    if x.ndim < 3 or min(x.shape[-3:-1]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs frames [..., H, W, C] with H, W >= {SSIM_WINDOW} (its Gaussian window), got {x.shape}"
        )
    h, w = x.shape[-3:-1]

    def planes(v):  # [frames * channels, 1, H, W]
        return (
            torch.from_numpy(np.ascontiguousarray(v.reshape(-1, h, w, v.shape[-1])))
            .permute(0, 3, 1, 2)
            .reshape(-1, 1, h, w)
        )

    taps = torch.from_numpy(gaussian_window())
    row, col = taps.view(1, 1, 1, -1), taps.view(1, 1, -1, 1)

    def mean(t):  # Gaussian-weighted local mean, "valid" positions only (separable)
        return F.conv2d(F.conv2d(t, row), col)

    tx, ty = planes(x), planes(y)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = mean(tx), mean(ty)
    vx = mean(tx * tx) - mx * mx
    vy = mean(ty * ty) - my * my
    cxy = mean(tx * ty) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two generated token sequences agree (over the longer length)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    same = sum(1 for x, y in zip(a, b) if x == y)
    return same / n
