"""Controllability measured on the controlled object: the agent's paddle in Pong (issue 17).

PSNR / SSIM of a Pong frame are dominated by the static background, so a model that draws no
paddle at all scores the same with the real actions as with random ones, and the frame metrics
cannot say whether it follows its actions. The agent's paddle is the one object the actions move
directly: this module finds it in real and predicted frames and compares its height.

**Detector** (:func:`detect_paddle`). Pong's agent is the right paddle, ALE colour
:data:`PADDLE_RGB` (92, 186, 92), always at raw columns 140..143 of the 210x160 screen, moving
between the walls (raw rows 34..193, where it is clipped, never fully hidden: at least 4 of its 16
rows stay visible). The score digits share its colour but sit above the top wall, outside the band
searched. After the study's area-average downsampling a paddle pixel is a mix of paddle and
background, so each pixel gets a *paddle coverage* ``1 - |rgb - PADDLE_RGB| / |BACKGROUND_RGB -
PADDLE_RGB|`` clipped to [0, 1] (1 = paddle colour, 0 = background, the walls or the ball), which
for a paddle/background mix is the paddle's share of the pixel. The band searched is the paddle's
columns (one pixel of margin on each side, for a prediction drawn slightly off) between the walls.
A paddle is *found* when the pixels of coverage >= 0.5 number at least 2 and form **one**
vertical run of rows no taller than twice the paddle; its height is the coverage-weighted centroid
of those rows and one row on either side (sub-pixel; exactly shift-equivariant). The "one run"
rule is what rejects noise, whose paddle-coloured pixels are scattered over the band.

Measured on 64x64 frames recorded like the study's (sticky-random policy, frame-skip 4 with
max-pooling): found in all of ~2,000 frames of a long random game (only the frame right after a
reset has no paddle) and in 629 of the 630 frames 1..63 of the cpu scale's ten test episodes (the
miss: the ball crossing the moving paddle cuts it in two runs); mean error 0.09 px (max 0.43 px)
against the emulator's own paddle rows mapped to 64 px, and under 0.6 px at every height a paddle
drawn on a clean screen can take (rows mixed with a wall pull the centroid). Pure uniform noise:
0 of 1,000 frames found; background plus Gaussian noise: at most 1.6% found for every sigma from
10 to 120 (allowing a one-row gap in the run would recover the ball-crossing case but raise this
to 2.7%). The paddle moves up to ~7 px per step; a perfect model rolled out from
the same state with random instead of the recorded actions puts the paddle 9 px away on average
over 12 steps (0.9 px at the first step, 12-14 px from the sixth), the size of the effect a model
that follows its actions should show. At 32x32 (the smoke scale) a clipped paddle covers under
half a pixel and is often missed (found in ~2/3 of the frames): the detector is made for 64x64.

**Error per horizon step** (:func:`paddle_error`): |y_pred - y_real| in pixels, over the segments
whose real frame shows the paddle. A prediction without a paddle counts as the largest error two
detections can have (the band's height, :func:`miss_penalty`), not as a gap: the real- and
random-action runs then average over the same segments and steps, so their difference stays
paired, and a model that loses the paddle cannot look better than one that draws it in the wrong
place. The missing rate and the error over found paddles only are reported next to it.

**Verdict** (:func:`follows_verdict`): per segment, the mean error over its visible steps; the
paired difference real - random over segments; "follows its actions" when the real-action error
is smaller by more than 2 standard errors, "reversed" when larger, else "no difference" (a rule of
thumb with ~10 segments, as the study's other verdicts). The detector applied to the real frames
themselves has error 0: that is the floor, and the copy-last baseline's paddle error is what a
model that never moves the paddle scores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUND_RGB",
    "PADDLE_RGB",
    "action_moves",
    "controllability",
    "detect_paddle",
    "follows_verdict",
    "miss_penalty",
    "paddle_band",
    "paddle_coverage",
    "paddle_error",
    "paired_steps",
    "positions",
    "score_paddle",
]

#: Pong's colours in ALE's palette: the agent's (right) paddle and the playfield.
PADDLE_RGB = (92, 186, 92)
BACKGROUND_RGB = (144, 72, 17)
#: Raw screen geometry (rows x columns), the right paddle's columns and height, the rows between the walls.
RAW_SHAPE = (210, 160)
PADDLE_COLUMNS = (140, 144)
PADDLE_HEIGHT = 16
PLAYFIELD_ROWS = (34, 194)

_GREEN = np.asarray(PADDLE_RGB, dtype=np.float64)
_SPAN = float(np.linalg.norm(np.asarray(BACKGROUND_RGB, dtype=np.float64) - _GREEN))


def paddle_band(height: int, width: int, margin: int = 1) -> tuple[slice, slice]:
    """Rows and columns of a ``height`` x ``width`` frame that can hold the right paddle: every
    pixel overlapping the raw playfield rows and paddle columns, ``margin`` extra columns each side."""
    sy, sx = height / RAW_SHAPE[0], width / RAW_SHAPE[1]
    r0, r1 = math.floor(PLAYFIELD_ROWS[0] * sy), math.ceil(PLAYFIELD_ROWS[1] * sy)
    c0, c1 = math.floor(PADDLE_COLUMNS[0] * sx), math.ceil(PADDLE_COLUMNS[1] * sx)
    return slice(r0, min(r1, height)), slice(max(c0 - margin, 0), min(c1 + margin, width))


def miss_penalty(height: int) -> float:
    """The error charged for a missing paddle: the largest distance between two detections."""
    rows = paddle_band(height, RAW_SHAPE[1])[0]
    return float(rows.stop - rows.start - 1)


def paddle_coverage(frames: np.ndarray) -> np.ndarray:
    """Per pixel, the paddle's share under a paddle/background mix: 1 at the paddle's colour,
    0 at the background's or farther (walls, ball); float64, shaped like the frames without C."""
    x = np.asarray(frames, dtype=np.float64)
    return np.clip(1.0 - np.linalg.norm(x - _GREEN, axis=-1) / _SPAN, 0.0, 1.0)


def _detect_one(cov: np.ndarray, min_coverage: float, min_pixels: int, max_rows: float) -> float:
    mask = cov >= min_coverage
    if mask.sum() < min_pixels:
        return math.nan
    rows = np.flatnonzero(mask.any(1))
    if rows[-1] - rows[0] + 1 != len(rows) or len(rows) > max_rows:  # scattered (noise) or a stripe
        return math.nan
    lo, hi = max(rows[0] - 1, 0), min(rows[-1] + 2, cov.shape[0])
    weight = cov[lo:hi].sum(1)
    return float(weight @ np.arange(lo, hi) / weight.sum())


def detect_paddle(
    frames: np.ndarray,
    *,
    min_coverage: float = 0.5,
    min_pixels: int = 2,
    margin: int = 1,
) -> np.ndarray:
    """Vertical centre (row index, sub-pixel) of the agent's paddle in uint8 RGB Pong frames
    ``(..., H, W, 3)``; NaN where none is found. Returns float64 shaped ``frames.shape[:-3]``."""
    x = np.asarray(frames)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB frames (..., H, W, 3), got shape {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    h, w = x.shape[-3:-1]
    rows, cols = paddle_band(h, w, margin)
    cov = paddle_coverage(x[..., rows, cols, :]).reshape(-1, rows.stop - rows.start, cols.stop - cols.start)
    max_rows = 2.0 * PADDLE_HEIGHT * h / RAW_SHAPE[0]
    y = np.array([_detect_one(c, min_coverage, min_pixels, max_rows) for c in cov], dtype=np.float64)
    return (y + rows.start).reshape(x.shape[:-3])


# ---------------------------------------------------------------------------------- statistics


def _nan_to_none(values: Any) -> Any:
    """JSON-friendly lists: NaN -> None (NaN would break equality checks and strict JSON)."""
    arr = np.asarray(values, dtype=np.float64)
    return (
        [None if math.isnan(v) else float(v) for v in arr.reshape(-1)]
        if arr.ndim <= 1
        else [_nan_to_none(row) for row in arr]
    )


def _mean_sem(x: np.ndarray) -> tuple[float, float, int]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; NaN where undefined."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, sem, n


def _summary(x: np.ndarray) -> dict[str, Any]:
    """Per-step mean / sem / n of an (N, h) array with NaN for "no value", plus the overall paired
    statistic over the per-sample means."""
    per_step = [_mean_sem(x[:, t]) for t in range(x.shape[1])]
    with warnings.catch_warnings():  # an all-NaN sample stays NaN, without "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        per_sample = np.nanmean(x, axis=1) if x.shape[1] else np.full(x.shape[0], math.nan)
    mean, sem, n = _mean_sem(per_sample)
    return {
        "steps": list(range(x.shape[1])),
        "mean": _nan_to_none([m for m, _, _ in per_step]),
        "sem": _nan_to_none([s for _, s, _ in per_step]),
        "n_per_step": [k for _, _, k in per_step],
        "overall": {"mean": _nan_to_none([mean])[0], "sem": _nan_to_none([sem])[0], "n": n},
        "per_sample": _nan_to_none(per_sample),
    }


def paddle_error(pred_y: np.ndarray, real_y: np.ndarray, penalty: float) -> dict[str, Any]:
    """Paddle error of predicted against real positions, both (N, h) with NaN for "not found".

    Steps whose real frame shows no paddle are left out; a missing predicted paddle counts as
    ``penalty``. Returns per-step ``mean`` / ``sem`` / ``n_per_step``, the ``overall`` mean over
    segments (each averaged over its visible steps) with its standard error, ``per_sample``, and
    next to it ``missing`` (per step and overall: the share of visible steps without a predicted
    paddle), ``found`` (the error over found paddles only) and ``real_visible``.
    """
    p, r = np.asarray(pred_y, dtype=np.float64), np.asarray(real_y, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(f"expected positions (N, h) of equal shape, got {p.shape} and {r.shape}")
    visible = ~np.isnan(r)
    found = visible & ~np.isnan(p)
    err = _error_matrix(p, r, penalty)
    missing = np.where(visible, (~found).astype(np.float64), np.nan)
    out = _summary(err)
    miss = _summary(missing)
    out.update(
        {
            "missing": {"mean": miss["mean"], "overall": _rate(~found[visible])},
            "found": {
                "mean": _summary(np.where(found, err, np.nan))["mean"],
                "overall": _nan_to_none([np.abs(p - r)[found].mean() if found.any() else math.nan])[0],
            },
            "real_visible": _rate(visible),
            "penalty": float(penalty),
            "positions": {"pred": _nan_to_none(p), "real": _nan_to_none(r)},
        }
    )
    return out


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if np.size(flags) else None


def score_paddle(pred: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """:func:`paddle_error` of uint8 predicted frames against the real ones, both (N, h, H, W, 3)."""
    if np.shape(pred) != np.shape(real):
        raise ValueError(f"pred and real shapes differ: {np.shape(pred)} vs {np.shape(real)}")
    return paddle_error(detect_paddle(pred), detect_paddle(real), miss_penalty(np.shape(real)[-3]))


def paired_steps(a: Any, b: Any) -> dict[str, Any]:
    """Per-step and overall paired difference a - b of two (N, h) arrays over the same samples
    (None / NaN entries: no value, left out of that step and that sample's mean)."""
    x = np.asarray(_none_to_nan(a), dtype=np.float64) - np.asarray(_none_to_nan(b), dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, h) values, got shape {x.shape}")
    return _summary(x)


def _none_to_nan(values: Any) -> Any:
    if isinstance(values, (list, tuple)):
        return [_none_to_nan(v) for v in values]
    return math.nan if values is None else values


def follows_verdict(diff: Mapping[str, Any], *, lower_is_better: bool) -> str:
    """ "follows its actions" / "reversed" / "no difference" from a paired real - random difference
    ``{"mean", "sem", "n"}`` (beyond 2 standard errors or not); "undetermined" under 2 samples."""
    mean, sem, n = diff.get("mean"), diff.get("sem"), diff.get("n", 0)
    if mean is None or sem is None or n < 2:
        return "undetermined (fewer than 2 segments)"
    if abs(mean) <= 2.0 * sem:
        return "no difference"
    better = mean < 0 if lower_is_better else mean > 0
    return "follows its actions" if better else "reversed"


def controllability(real: Mapping[str, Any], random: Mapping[str, Any]) -> dict[str, Any]:
    """Real- against random-action rollouts of one model on the same segments, from their scored
    ``metrics`` (``evaluate.score``): the paper's ΔPSNR / ΔSSIM (real - random, per step and overall,
    paired over segments; > 0 = follows) and the paddle error difference (real - random; < 0 =
    follows), each with a verdict. ``paddle`` is absent when the runs carry no paddle metrics."""
    out: dict[str, Any] = {}
    for metric in ("psnr", "ssim"):
        a, b = real[metric], random[metric]
        if "values" in a and "values" in b:
            d = paired_steps(a["values"], b["values"])
        else:  # runs scored before per-step values were stored: the overall paired difference only
            d = paired_steps([[v] for v in a["per_sample"]], [[v] for v in b["per_sample"]])
            d = {"overall": d["overall"], "per_sample": d["per_sample"]}
        d["verdict"] = follows_verdict(d["overall"], lower_is_better=False)
        out[f"delta_{metric}"] = d
    if "paddle" in real and "paddle" in random:
        pr, pn = real["paddle"], random["paddle"]
        if pr["positions"]["real"] != pn["positions"]["real"]:
            raise ValueError("the real- and random-action runs were scored on different real frames")
        d = paired_steps(_errors(pr), _errors(pn))
        out["paddle"] = {
            "real_minus_random": d,
            "real": {k: pr[k] for k in ("mean", "sem", "overall", "missing", "found")},
            "random": {k: pn[k] for k in ("mean", "sem", "overall", "missing", "found")},
            "real_visible": pr["real_visible"],
            "penalty": pr["penalty"],
            "verdict": follows_verdict(d["overall"], lower_is_better=True),
        }
        out["verdict"] = out["paddle"]["verdict"]
    return out


def positions(paddle: Mapping[str, Any], key: str) -> np.ndarray:
    """The (N, h) paddle rows (NaN: not found) of a :func:`paddle_error` result, ``key`` "pred" or "real"."""
    return np.asarray(_none_to_nan(paddle["positions"][key]), dtype=np.float64)


def _error_matrix(pred_y: np.ndarray, real_y: np.ndarray, penalty: float) -> np.ndarray:
    """|pred - real|, ``penalty`` where the prediction has no paddle, NaN where the real one has none."""
    return np.where(np.isnan(real_y), np.nan, np.where(np.isnan(pred_y), float(penalty), np.abs(pred_y - real_y)))


def _errors(paddle: Mapping[str, Any]) -> np.ndarray:
    """The (N, h) error matrix behind a :func:`paddle_error` result."""
    p, r = positions(paddle, "pred"), positions(paddle, "real")
    return _error_matrix(p, r, paddle["penalty"])


def action_moves(before: np.ndarray, after: np.ndarray, actions: np.ndarray, num_actions: int) -> list[dict[str, Any]]:
    """Per action a: the mean, standard error and count of the paddle's move ``y(after) - y(before)``
    (rows, + = down) over the pairs whose ``actions`` entry is a and where both frames show a paddle.
    ``before`` / ``after`` are paddle rows (NaN: not found) of the same shape as ``actions``."""
    b, a, act = (np.asarray(v) for v in (before, after, actions))
    if not (b.shape == a.shape == act.shape):
        raise ValueError(f"before, after and actions must share a shape: {b.shape}, {a.shape}, {act.shape}")
    move = (a - b).astype(np.float64)
    out = []
    for k in range(num_actions):
        mean, sem, n = _mean_sem(move[act == k])
        out.append({"action": k, "mean": _nan_to_none([mean])[0], "sem": _nan_to_none([sem])[0], "n": n})
    return out
