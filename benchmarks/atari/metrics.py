"""Per-frame PSNR and SSIM in torch, and per-horizon aggregation.

Images are float tensors in [0, 1] (``data_range`` = 1), channels first: ``(..., C, H, W)``. Both
metrics return one value per image, shaped like the leading dims, so a video batch
``(N, T, C, H, W)`` gives ``(N, T)`` and can be averaged over N per horizon step.

SSIM follows Wang et al. (2004) as in their reference ``ssim_index.m``: an 11x11 Gaussian window
with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics computed per channel over "valid" window
positions only (no padding, so borders do not bias the score), averaged over positions and
channels. Computed in float64, so values are reproducible and do not drift with batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "frames_to_unit",
    "gaussian_window",
    "horizon_summary",
    "psnr",
    "ssim",
    "video_metrics",
]


def frames_to_unit(frames: Any, source: str = "uint8") -> torch.Tensor:
    """Convert frames to float [0, 1] channels-first ``(..., C, H, W)``.

    ``source="uint8"``: stored episode pixels, uint8 channels-last ``(..., H, W, C)``.
    ``source="signed"``: loader / model pixels in [-1, 1], channels first (clamped to the range).
    """
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if source == "uint8":
        if x.dtype != torch.uint8:
            raise ValueError(f"source='uint8' expects uint8 pixels, got {x.dtype}")
        return x.movedim(-1, -3).to(torch.float32) / 255.0
    if source == "signed":
        return ((x.to(torch.float32) + 1.0) / 2.0).clamp_(0.0, 1.0)
    raise ValueError(f"source must be 'uint8' or 'signed', got {source!r}")


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 3:
        raise ValueError(f"expected images (..., C, H, W), got shape {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError("expected float images in [0, 1]; convert uint8 with frames_to_unit")
    return pred.to(torch.float64), target.to(torch.float64)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``10 log10(range^2 / MSE)``; inf when equal."""
    p, t = _pair(pred, target)
    mse = (p - t).pow(2).flatten(-3).mean(-1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(torch.float32)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian (float64); the 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image, in [-1, 1] (1 iff equal up to the constants' slack)."""
    p, t = _pair(pred, target)
    *lead, c, h, w = p.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window")
    p = p.reshape(-1, 1, h, w)
    t = t.reshape(-1, 1, h, w)
    g = gaussian_window(window_size, sigma)
    gy, gx = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable valid convolution
        return F.conv2d(F.conv2d(x, gy), gx)

    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_p * mu_t + c1) * (2 * cov + c2)
    den = (mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)
    per_channel = (num / den).flatten(1).mean(1)
    return per_channel.view(*lead, c).mean(-1).to(torch.float32)


def video_metrics(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """``{"psnr", "ssim"}``, each shaped like the leading dims (e.g. (N, T) for (N, T, C, H, W))."""
    return {"psnr": psnr(pred, target, data_range), "ssim": ssim(pred, target, data_range)}


def horizon_summary(values: torch.Tensor | Sequence[Sequence[float]], start: int = 0) -> dict[str, list[float] | int]:
    """Per-step statistics of ``values`` (N samples, T steps), from step ``start`` on.

    Returns plain lists for JSON: ``mean``, ``std`` (population), ``sem`` (std / sqrt(N)) per step,
    ``steps`` (the step indices) and ``n``. Use ``start`` to drop context frames, which equal the
    ground truth (PSNR inf). A step whose values include inf has mean inf.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim != 2 or v.shape[0] < 1:
        raise ValueError(f"expected values of shape (N, T) with N >= 1, got {tuple(v.shape)}")
    v = v[:, start:]
    n = v.shape[0]
    mean = v.mean(0)
    std = v.std(0, correction=0) if n > 1 else torch.zeros_like(mean)
    std = torch.nan_to_num(std, nan=math.inf)
    return {
        "steps": list(range(start, start + v.shape[1])),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "sem": (std / math.sqrt(n)).tolist(),
        "n": n,
    }
