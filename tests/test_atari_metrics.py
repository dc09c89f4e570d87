"""PSNR / SSIM (benchmarks/atari/metrics.py) against known values and an independent reference."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari.metrics import (
    frames_to_unit,
    gaussian_window,
    horizon_summary,
    psnr,
    ssim,
    video_metrics,
)

C1, C2 = 0.01**2, 0.03**2


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_identical_images():
    x = _rand(2, 3, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, 3), atol=1e-6)


@pytest.mark.parametrize("offset", [0.1, 0.01, 0.25])
def test_constant_offset_gives_analytic_psnr(offset):
    x = 0.2 + 0.5 * _rand(4, 3, 12, 12)
    expected = 20 * math.log10(1.0 / offset)  # MSE = offset^2, range 1
    assert torch.allclose(psnr(x + offset, x), torch.full((4,), expected), atol=1e-4)
    assert torch.allclose(psnr(255 * (x + offset), 255 * x, data_range=255.0), torch.full((4,), expected), atol=1e-4)


def test_ssim_symmetric_and_bounded():
    a, b = _rand(8, 3, 20, 24, seed=1), _rand(8, 3, 20, 24, seed=2)
    for x, y in [(a, b), (a, 1 - a), (a, (a + 0.3 * b).clamp(0, 1)), (a, torch.zeros_like(a))]:
        s = ssim(x, y)
        assert torch.allclose(s, ssim(y, x), atol=1e-7)
        assert (s >= -1).all() and (s <= 1).all()
    assert (ssim(a, 1 - a) < 0).all()  # anti-correlated structure scores negative
    assert (ssim(a, (a + 0.3 * b).clamp(0, 1)) > ssim(a, b)).all()


@pytest.mark.parametrize("a,b", [(0.2, 0.6), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_constant_11x11_images_by_hand(a, b):
    """One window, no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    x, y = torch.full((1, 11, 11), a), torch.full((1, 11, 11), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-6)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Straight from the definition: explicit loops over valid 11x11 windows of each channel."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                p, q = x[c, i : i + 11, j : j + 11], y[c, i : i + 11, j : j + 11]
                mp, mq = (w * p).sum(), (w * q).sum()
                vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                cov = (w * (p - mp) * (q - mq)).sum()
                vals.append((2 * mp * mq + C1) * (2 * cov + C2) / ((mp**2 + mq**2 + C1) * (vp + vq + C2)))
    return float(np.mean(vals))


def test_ssim_matches_definition_on_a_small_case():
    x = _rand(2, 13, 14, seed=3)
    y = (0.7 * x + 0.3 * _rand(2, 13, 14, seed=4)).clamp(0, 1)
    expected = _ssim_reference(x.double().numpy(), y.double().numpy())
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-6)


def test_gaussian_window():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0)
    assert torch.equal(g, g.flip(0)) and g.argmax().item() == 5
    assert (g[5] / g[6]).item() == pytest.approx(math.exp(1 / (2 * 1.5**2)))


def test_per_frame_shapes_and_batch_independence():
    pred, target = _rand(3, 5, 3, 16, 16, seed=5), _rand(3, 5, 3, 16, 16, seed=6)
    m = video_metrics(pred, target)
    assert m["psnr"].shape == (3, 5) and m["ssim"].shape == (3, 5)
    assert m["psnr"].dtype == torch.float32
    assert torch.allclose(ssim(pred[1, 2], target[1, 2]), m["ssim"][1, 2])
    assert torch.allclose(psnr(pred[1, 2], target[1, 2]), m["psnr"][1, 2])


def test_bad_inputs():
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))
    with pytest.raises(ValueError, match="float"):
        psnr(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_frames_to_unit():
    u8 = np.array([[[[0, 255, 51]]]], dtype=np.uint8)  # (T=1, H=1, W=1, C=3)
    out = frames_to_unit(u8)
    assert out.shape == (1, 3, 1, 1) and torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.2]))
    signed = frames_to_unit(torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 4, 1, 1), "signed")
    assert torch.allclose(signed.flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError):
        frames_to_unit(u8.astype(np.float32))


def test_horizon_summary():
    values = torch.tensor([[math.inf, 10.0, 20.0], [math.inf, 14.0, 20.0]])
    s = horizon_summary(values, start=1)
    assert s["steps"] == [1, 2] and s["n"] == 2
    assert s["mean"] == [12.0, 20.0] and s["std"] == [2.0, 0.0]
    assert s["sem"] == pytest.approx([2.0 / math.sqrt(2), 0.0])
    assert horizon_summary(values)["mean"][0] == math.inf
    assert horizon_summary([[1.0, 2.0]])["std"] == [0.0, 0.0]
