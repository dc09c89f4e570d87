"""Uncertainty over training runs (issue 17): the study's claims across fine-tuning seeds.

Within one training run a claim's standard error is over test segments: it says how sure we are
about *that* pair of trained models, not whether retraining would give the same answer. Replicates
(``replicates.seeds`` in a scale) fine-tune the same variants again with other training seeds
(adapter initialisation, noise levels, noise, dropout, data order), from the same pretrained and
scratch weights, and evaluate them on the same segments with the same sampler noise.

Per claim two uncertainties are kept, and a claim counts only when it clears both:

* **over seeds**: each seed's paired mean difference over segments → their mean ± the standard
  error over seeds, beyond Student's two-sided 95 % critical value for n − 1 degrees of freedom
  (12.7 s.e. for 2 seeds, 4.3 for 3: with so few seeds "2 s.e." would be far too loose);
* **over segments**: each segment's difference averaged over the seeds → mean ± the standard error
  over segments, beyond 2 s.e. (the seeds share the test segments, so the spread between seeds
  leaves out how the segments were drawn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "T_CRITICAL",
    "across_seeds",
    "first_frames",
    "mean_sem",
    "metrics_verdict",
    "over_segments",
    "over_seeds",
    "paired",
    "verdict",
]

#: Student's t, two-sided 95 %, by degrees of freedom (beyond 10: 2.0, the normal rule of thumb).
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _finite(values: Sequence[float | None]) -> np.ndarray:
    x = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    return x[np.isfinite(x)]


def mean_sem(values: Sequence[float | None], critical: float = 2.0) -> dict[str, Any]:
    """Mean, standard error (ddof 1), and whether |mean| > ``critical`` × s.e. (None / NaN dropped)."""
    x = _finite(values)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "mean": mean,
        "sem": sem,
        "n": n,
        "critical": critical,
        "positive": bool(n and mean > 0),
        "beyond": bool(n > 1 and abs(mean) > critical * sem),
    }


def over_seeds(per_seed: Sequence[float | None]) -> dict[str, Any]:
    """Seeds' paired means → mean ± s.e. over seeds, judged with Student's t."""
    n = int(_finite(per_seed).size)
    return {**mean_sem(per_seed, T_CRITICAL.get(n - 1, 2.0)), "per_seed": list(per_seed)}


def over_segments(per_seed_segments: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """Per-segment differences (one list per seed) → averaged over seeds → mean ± s.e. over segments."""
    x = np.asarray([[math.nan if v is None else v for v in s] for s in per_seed_segments], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(x).sum(0)
        per_segment = np.where(counts > 0, np.nansum(x, 0) / np.maximum(counts, 1), np.nan)
    return mean_sem(list(per_segment), 2.0)


def paired(d: np.ndarray) -> dict[str, Any]:
    """One run of the study against another on the same segments: their per-segment differences
    ``d`` → mean, standard error, and whether the mean is beyond 2 s.e. (``beyond_2sem``)."""
    d = np.asarray(d, dtype=np.float64)
    sem = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {
        "mean": float(d.mean()),
        "sem": sem,
        "n": int(len(d)),
        "positive": bool(d.mean() > 0),
        "beyond_2sem": bool(len(d) > 1 and abs(d.mean()) > 2 * sem),
        "per_segment": d.tolist(),
    }


def first_frames(a: Mapping[str, Any], b: Mapping[str, Any], metric: str, frames: int) -> dict[str, Any]:
    """Paired a − b of a metric over the first ``frames`` generated frames, per segment."""
    x = np.asarray(a["metrics"][metric]["values"], dtype=np.float64)[:, :frames].mean(1)
    y = np.asarray(b["metrics"][metric]["values"], dtype=np.float64)[:, :frames].mean(1)
    return paired(x - y)


def _combine(per_seed: Sequence[float | None], segments: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    s, g = over_seeds(per_seed), over_segments(segments)
    return {"mean": s["mean"], "sem": s["sem"], "seeds": s, "segments": g, "beyond": s["beyond"] and g["beyond"]}


def across_seeds(per_seed: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every claim present in every seed's results (``comparisons`` with ``per_segment``
    differences, and ``controllability``), aggregated over seeds (see the module docstring)."""
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        return []
    out: list[dict[str, Any]] = []
    for claim in [c["claim"] for c in per_seed[seeds[0]]["comparisons"]]:
        found = [next((c for c in per_seed[s]["comparisons"] if c["claim"] == claim), None) for s in seeds]
        if any(c is None for c in found):
            continue
        row: dict[str, Any] = {"claim": claim, "a": found[0]["a"], "b": found[0]["b"], "seeds": seeds}
        for m in ("psnr", "ssim"):
            row[m] = _combine([c[m]["mean"] for c in found], [c[m]["per_segment"] for c in found])
        out.append(row)
    for key, first in (per_seed[seeds[0]].get("controllability") or {}).items():
        found = [(per_seed[s].get("controllability") or {}).get(key) for s in seeds]
        if "paddle" not in first or any(c is None or "paddle" not in c for c in found):
            continue
        diffs = [c["paddle"]["real_minus_random"] for c in found]
        out.append(
            {
                "claim": f"{key} follows the real actions: paddle error real − random < 0",
                "a": first["real"],
                "b": first["random"],
                "seeds": seeds,
                "paddle": _combine([d["overall"]["mean"] for d in diffs], [d["per_sample"] for d in diffs]),
            }
        )
    return out


def verdict(row: Mapping[str, Any]) -> str:
    """The verdict of an :func:`across_seeds` row (paddle rows: lower is better)."""
    if "paddle" in row:
        p = row["paddle"]
        if p["seeds"]["n"] < 2:
            return "undetermined (fewer than 2 seeds)"
        if not p["beyond"]:
            return "no difference"
        return "follows its actions" if p["mean"] < 0 else "reversed"
    return metrics_verdict(row["psnr"], row["ssim"], "beyond", none="no difference")


def _sign(d: Mapping[str, Any], beyond: str) -> str:
    """ "+" / "-" when the difference clears its bar (``d[beyond]``), else "0"."""
    if not d[beyond]:
        return "0"
    return "+" if d["mean"] > 0 else "-"


def metrics_verdict(psnr: Mapping[str, Any], ssim: Mapping[str, Any], beyond: str, *, none: str) -> str:
    """Whether a beats b from PSNR and SSIM together, each counted only where ``d[beyond]``."""
    table = {
        ("+", "+"): "holds",
        ("-", "-"): "reversed",
        ("0", "0"): none,
        ("+", "0"): "holds on PSNR only",
        ("0", "+"): "holds on SSIM only",
        ("-", "0"): "reversed on PSNR only",
        ("0", "-"): "reversed on SSIM only",
    }
    return table.get((_sign(psnr, beyond), _sign(ssim, beyond)), "mixed (PSNR and SSIM disagree)")
