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


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of frames ``[..., H, W, C]`` (per channel, uniform window, data range 1)."""
    import torch
    import torch.nn.functional as F

    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {x.shape} and {y.shape}")
    # [frames*channels, 1, H, W]
    tx = torch.from_numpy(x.reshape(-1, *x.shape[-3:])).permute(0, 3, 1, 2).reshape(-1, 1, *x.shape[-3:-1])
    ty = torch.from_numpy(y.reshape(-1, *y.shape[-3:])).permute(0, 3, 1, 2).reshape(-1, 1, *y.shape[-3:-1])
    win = (min(window, tx.shape[-2]), min(window, tx.shape[-1]))

    def mean(t):
        return F.avg_pool2d(t, win, stride=1)

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
