"""Report helpers: metric-vs-horizon plots, real-vs-predicted GIFs, frame grids, markdown tables.

Frames may be given as uint8 ``(T, H, W, 3)`` (the stored episode layout) or as float [0, 1]
arrays / tensors, channels last or first (``(T, 3, H, W)``, the model layout); everything is
converted to uint8 channels-last before drawing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "controllability_table",
    "plot_horizon",
    "save_frame_grid",
    "to_uint8_frames",
    "write_comparison_gif",
    "write_markdown_table",
]


def to_uint8_frames(frames: Any) -> np.ndarray:
    """uint8 ``(T, H, W, C)`` from uint8 or float-[0, 1] frames, channels last or first."""
    x = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if x.ndim != 4:
        raise ValueError(f"expected frames (T, H, W, C) or (T, C, H, W), got shape {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = np.moveaxis(x, 1, -1)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: keeps pixels crisp


def write_comparison_gif(
    path: str | os.PathLike,
    panels: Mapping[str, Any],
    *,
    scale: int = 4,
    fps: float = 5.0,
    context: int = 0,
    gap: int = 4,
) -> Path:
    """Write an animated GIF showing the named frame sequences side by side, one GIF frame per step.

    ``panels`` maps a label (e.g. ``"real"``, ``"predicted"``, ``"random actions"``) to frames of
    equal length T. Each frame is upscaled ``scale`` x nearest; a header names the panels and
    shows ``t`` (steps below ``context`` are marked as context). The header also keeps consecutive
    GIF frames distinct: Pillow would otherwise merge identical frames and change the frame count.
    """
    if not panels:
        raise ValueError("panels must name at least one frame sequence")
    seqs = {name: to_uint8_frames(f) for name, f in panels.items()}
    shapes = {s.shape for s in seqs.values()}
    if len(shapes) != 1:
        raise ValueError(f"all panels need the same (T, H, W, C); got {sorted(shapes)}")
    t_len, h, w, _ = next(iter(shapes))
    font = ImageFont.load_default()
    header = 26
    pw, ph = w * scale, h * scale
    width = len(seqs) * pw + (len(seqs) - 1) * gap
    out = []
    for t in range(t_len):
        canvas = Image.new("RGB", (width, header + ph), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k, (name, seq) in enumerate(seqs.items()):
            x0 = k * (pw + gap)
            canvas.paste(Image.fromarray(_upscale(seq[t], scale)), (x0, header))
            draw.text((x0 + 2, 1), name, fill=(0, 0, 0), font=font)
        draw.text((2, 13), f"t={t}" + (" (context)" if t < context else ""), fill=(160, 0, 0), font=font)
        out.append(np.asarray(canvas))
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack(out), extension=".gif", duration=1000.0 / fps, loop=0)
    return path


def save_frame_grid(
    path: str | os.PathLike,
    rows: Sequence[Any],
    *,
    scale: int = 4,
    gap: int = 2,
) -> Path:
    """Write a PNG with one row per frame sequence (rows may differ in length), upscaled nearest."""
    seqs = [to_uint8_frames(r) for r in rows]
    if not seqs:
        raise ValueError("rows must hold at least one frame sequence")
    h, w = seqs[0].shape[1:3]
    if any(s.shape[1:3] != (h, w) for s in seqs):
        raise ValueError("all frames in a grid need the same height and width")
    cols = max(len(s) for s in seqs)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.full((len(seqs) * cell_h - gap, cols * cell_w - gap, 3), 255, np.uint8)
    for r, seq in enumerate(seqs):
        for c, frame in enumerate(seq):
            grid[r * cell_h : r * cell_h + h * scale, c * cell_w : c * cell_w + w * scale] = _upscale(frame, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _curve(value: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(steps, mean, band half-width or None) from a list or a metrics.horizon_summary dict."""
    if isinstance(value, Mapping):
        mean = np.asarray(value["mean"], dtype=np.float64)
        steps = np.asarray(value.get("steps", range(len(mean))), dtype=np.float64)
        band = value.get("sem")
        return steps, mean, None if band is None else np.asarray(band, dtype=np.float64)
    mean = np.asarray(value, dtype=np.float64)
    return np.arange(len(mean), dtype=np.float64), mean, None


def plot_horizon(
    path: str | os.PathLike,
    curves: Mapping[str, Any],
    *,
    ylabel: str,
    title: str | None = None,
    xlabel: str = "horizon (frame index)",
) -> Path:
    """Plot one metric against the horizon for several named runs into a PNG.

    Each value of ``curves`` is a per-step list, or a ``metrics.horizon_summary`` dict (its
    ``steps`` are the x values and a ``sem`` band is shaded). Non-finite points are not drawn.
    """
    if not curves:
        raise ValueError("curves must name at least one run")
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    try:
        for name, value in curves.items():
            steps, mean, band = _curve(value)
            ok = np.isfinite(mean)
            (line,) = ax.plot(steps[ok], mean[ok], marker="o", markersize=3, label=name)
            if band is not None:
                ok &= np.isfinite(band)
                m, b = mean[ok], band[ok]
                ax.fill_between(steps[ok], m - b, m + b, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return (
            ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else "nan"
            if math.isnan(value)
            else format(value, float_format)
        )
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown_table(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    *,
    columns: Sequence[str] | None = None,
    row_header: str = "run",
    float_format: str = ".3f",
) -> str:
    """A markdown table with one row per run and one column per metric; written to ``path`` if given.

    ``columns`` defaults to every metric name in first-seen order; a missing value prints as "–".
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in results.values() for k in row))
    lines = [
        "| " + " | ".join([row_header, *columns]) + " |",
        "|" + "---|" + "---:|" * len(columns),
    ]
    for name, row in results.items():
        cells = [_cell(name, float_format)] + [_cell(row.get(c), float_format) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def _pm(d: Mapping[str, Any] | None, *, signed: bool = False, spec: str = ".2f") -> str:
    """ "mean ± sem" of a ``{"mean", "sem"}`` dict; "–" where there is no mean."""
    if not d or d.get("mean") is None:
        return "–"
    m = format(d["mean"], ("+" if signed else "") + spec)
    return m if d.get("sem") is None else f"{m} ± {format(d['sem'], '.2g')}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def controllability_table(controls: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table, one row per model and guidance scale, of ``control.controllability``
    results: the paddle error with real and random actions (mean over segments ± s.e.), their paired
    difference, the share of predictions without a paddle, the paddle verdict, and the paper's
    ΔPSNR / ΔSSIM (real − random) with theirs."""
    rows: dict[str, dict[str, Any]] = {}
    for name, c in controls.items():
        row: dict[str, Any] = {}
        pad = c.get("paddle")
        if pad:
            row["paddle err real (px)"] = _pm(pad["real"]["overall"])
            row["paddle err random (px)"] = _pm(pad["random"]["overall"])
            row["Δ err real − random"] = _pm(pad["real_minus_random"]["overall"], signed=True)
            row["no paddle real / random"] = (
                f"{_pct(pad['real']['missing']['overall'])} / {_pct(pad['random']['missing']['overall'])}"
            )
            row["paddle verdict"] = pad["verdict"]
        for metric, label in (("psnr", "ΔPSNR dB"), ("ssim", "ΔSSIM")):
            d = c.get(f"delta_{metric}")
            if d:
                row[label] = _pm(d["overall"], signed=True, spec=".3g")
                row[f"{label} verdict"] = d["verdict"]
        rows[name] = row
    return write_markdown_table(rows, row_header="model")
