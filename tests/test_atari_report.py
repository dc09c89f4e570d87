"""Report helpers (benchmarks/atari/report.py): files are written with the expected frames and sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
iio = pytest.importorskip("imageio.v3")
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import report
from benchmarks.atari.metrics import horizon_summary


def test_gif_side_by_side_keeps_every_frame(tmp_path):
    real = np.zeros((6, 64, 64, 3), np.uint8)  # identical frames: Pillow would merge them
    real[:, 10:20, 10:20] = 200
    pred = torch.rand(6, 3, 64, 64)  # model layout, float [0, 1]
    path = report.write_comparison_gif(tmp_path / "g" / "cmp.gif", {"real": real, "predicted": pred}, context=2)
    frames = iio.imread(path, index=None)
    assert frames.shape == (6, 26 + 64 * 4, 2 * 64 * 4 + 4, 3)
    # nearest upscaling: the real panel's square is an exact 40x40 block of one colour
    block = frames[0, 26 + 40 : 26 + 80, 40:80]
    assert (block == block[0, 0]).all() and block[0, 0].max() > 150


def test_gif_rejects_mismatched_panels(tmp_path):
    with pytest.raises(ValueError, match="same"):
        report.write_comparison_gif(
            tmp_path / "x.gif", {"a": np.zeros((3, 8, 8, 3), np.uint8), "b": np.zeros((4, 8, 8, 3), np.uint8)}
        )


def test_plot_horizon_png(tmp_path):
    values = torch.tensor([[float("inf"), 20.0, 18.0, 17.0], [float("inf"), 22.0, 19.0, 15.0]])
    curves = {"causal": horizon_summary(values), "baseline": [float("nan"), 15.0, 14.0, 13.0]}
    path = report.plot_horizon(tmp_path / "psnr.png", curves, ylabel="PSNR (dB)", title="Pong")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (600, 400)


def test_frame_grid(tmp_path):
    rows = [np.zeros((4, 8, 8, 3), np.uint8), np.full((2, 8, 8, 3), 0.5, np.float32)]
    with Image.open(report.save_frame_grid(tmp_path / "grid.png", rows, scale=2, gap=1)) as im:
        assert im.size == (4 * 17 - 1, 2 * 17 - 1)


def test_markdown_table(tmp_path):
    results = {"causal": {"psnr": 21.23456, "ssim": 0.5}, "bidirectional|copy": {"psnr": float("inf"), "steps": 3}}
    text = report.write_markdown_table(results, tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == text
    assert text.splitlines() == [
        "| run | psnr | ssim | steps |",
        "|---|---:|---:|---:|",
        "| causal | 21.235 | 0.500 | – |",
        "| bidirectional\\|copy | inf | – | 3 |",
    ]
    assert report.write_markdown_table(results, columns=["ssim"]).splitlines()[0] == "| run | ssim |"
