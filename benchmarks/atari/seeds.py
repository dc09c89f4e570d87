"""Uncertainty over training runs (issue 17): the study's claims across fine-tuning seeds.

Within one training run a claim's standard error is over test segments: it says how sure we are
about *that* pair of trained models, not whether retraining would give the same answer. Replicates
(``replicates.seeds`` in a scale) fine-tune the same variants again with other training seeds
(adapter initialisation, noise levels, noise, dropout, data order), from the same pretrained and
scratch weights, and evaluate them on the same segments with the same sampler noise. Per claim,
each seed contributes its paired mean difference over segments; the table gives their mean ± the
standard error over seeds, and the verdict uses the same 2-s.e. rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["across_seeds", "first_frames", "mean_sem"]


def mean_sem(values: list[float]) -> dict[str, Any]:
    """Mean, standard error (ddof 1) and whether the mean is beyond 2 s.e. from 0."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    sem = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "mean": mean,
        "sem": sem,
        "n": n,
        "positive": bool(n and mean > 0),
        "beyond_2sem": bool(n > 1 and abs(mean) > 2 * sem),
    }


def first_frames(a: Mapping[str, Any], b: Mapping[str, Any], metric: str, frames: int) -> dict[str, Any]:
    """Paired a − b of a metric over the first ``frames`` generated frames, per segment."""
    x = np.asarray(a["metrics"][metric]["values"], dtype=np.float64)[:, :frames].mean(1)
    y = np.asarray(b["metrics"][metric]["values"], dtype=np.float64)[:, :frames].mean(1)
    return mean_sem(list(x - y))


def across_seeds(per_seed: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every claim present in every seed's results (``comparisons`` and ``controllability``),
    aggregated over seeds: each seed's paired mean difference → mean ± s.e. over seeds."""
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        return []
    out: list[dict[str, Any]] = []
    claims = [c["claim"] for c in per_seed[seeds[0]]["comparisons"]]
    for claim in claims:
        found = [next((c for c in per_seed[s]["comparisons"] if c["claim"] == claim), None) for s in seeds]
        if any(c is None for c in found):
            continue
        out.append(
            {
                "claim": claim,
                "a": found[0]["a"],
                "b": found[0]["b"],
                "seeds": seeds,
                **{
                    m: {**mean_sem([c[m]["mean"] for c in found]), "per_seed": [c[m]["mean"] for c in found]}
                    for m in ("psnr", "ssim")
                },
            }
        )
    keys = [k for k, c in per_seed[seeds[0]].get("controllability", {}).items() if "paddle" in c]
    for key in keys:
        found = [per_seed[s].get("controllability", {}).get(key) for s in seeds]
        if any(c is None or "paddle" not in c for c in found):
            continue
        diffs = [c["paddle"]["real_minus_random"]["overall"]["mean"] for c in found]
        out.append(
            {
                "claim": f"{key} follows the real actions: paddle error real − random < 0",
                "a": found[0]["real"],
                "b": found[0]["random"],
                "seeds": seeds,
                "paddle": {**mean_sem(diffs), "per_seed": diffs},
            }
        )
    return out
