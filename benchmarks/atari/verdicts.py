"""The study's claims for one training seed: paired comparisons and controllability.

Every claim compares two runs on the same test segments, so its standard error is that of the
per-segment difference; ``benchmarks.atari.seeds`` then combines the claims over training seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.atari import control
from benchmarks.atari import seeds as seeds_mod
from benchmarks.atari.backbones import backbone_of
from benchmarks.atari.scales import BASELINE, BASELINE_AE, FIRST_FRAMES, run_name

__all__ = [
    "analyse",
    "claim_verdict",
    "comparisons",
    "controllability",
]


def _paired(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Mean and standard error of the per-segment difference a − b (same segments, so paired)."""
    x = np.asarray(a["metrics"][metric]["per_sample"], dtype=np.float64)
    y = np.asarray(b["metrics"][metric]["per_sample"], dtype=np.float64)
    return seeds_mod.paired(x - y)


def comparisons(runs: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired comparisons behind each claim: (claim, a, b) with a − b for PSNR and SSIM."""
    s0 = float(cfg["eval"]["ablation_guidance"][0])
    main = backbone_of(cfg).main
    pairs = [  # pairs whose runs the backbone does not have are left out below
        (
            "pretrained transfer beats training from scratch",
            run_name(main, s0, "real"),
            run_name("scratch", s0, "real"),
        ),
        ("extrapolative beats masked transfer", run_name(main, s0, "real"), run_name("masked", s0, "real")),
        ("extrapolative beats shift transfer", run_name(main, s0, "real"), run_name("shift", s0, "real")),
        ("masked beats shift transfer", run_name("masked", s0, "real"), run_name("shift", s0, "real")),
        (
            "causal norm beats the time-spanning norm left as is",
            run_name(main, s0, "real"),
            run_name("noncausal-norm", s0, "real"),
        ),
        ("the world model beats repeating the last context frame", run_name(main, s0, "real"), BASELINE),
        (
            "the world model beats repeating the autoencoded last context frame",
            run_name(main, s0, "real"),
            BASELINE_AE,
        ),
    ]
    for s in cfg["eval"]["guidance"]:
        if float(s) != 1.0:
            pairs.append(
                (f"action guidance s={s:g} beats s=1", run_name(main, float(s), "real"), run_name(main, 1.0, "real"))
            )
    for name, r in runs.items():
        if r.get("actions") == "random":
            real = run_name(r["variant"], r["guidance"], "real")
            pairs.append(
                (f"{r['variant']} (s={r['guidance']:g}) follows the real actions: real beats random", real, name)
            )
    out = []
    for claim, a, b in pairs:
        if a in runs and b in runs:
            out.append(
                {
                    "claim": claim,
                    "a": a,
                    "b": b,
                    "psnr": _paired(runs[a], runs[b], "psnr"),
                    "ssim": _paired(runs[a], runs[b], "ssim"),
                }
            )
    k = min(FIRST_FRAMES, cfg["eval"]["horizon"])
    for b, what in ((BASELINE, "the last context frame"), (BASELINE_AE, "the autoencoded last context frame")):
        a = run_name(main, s0, "real")
        if a in runs and b in runs and all("values" in runs[x]["metrics"]["psnr"] for x in (a, b)):
            out.append(
                {
                    "claim": f"the world model beats repeating {what} on the first {k} generated frames",
                    "a": a,
                    "b": b,
                    **{m: seeds_mod.first_frames(runs[a], runs[b], m, k) for m in ("psnr", "ssim")},
                }
            )
    return out


def controllability(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every random-action run against the same model's real-action run (``control.controllability``):
    the paddle error with real and random actions, their paired difference and verdict, and the
    paper's ΔPSNR / ΔSSIM per horizon step; keyed ``<variant>_s<guidance>``."""
    out = {}
    for name, r in runs.items():
        real = run_name(r["variant"], r["guidance"], "real") if r.get("actions") == "random" else None
        if real in runs:
            out[f"{r['variant']}_s{r['guidance']:g}"] = {
                "variant": r["variant"],
                "guidance": r["guidance"],
                "real": real,
                "random": name,
                **control.controllability(runs[real]["metrics"], r["metrics"]),
            }
    return out


def claim_verdict(c: dict[str, Any]) -> str:
    """Whether a beats b, from both metrics; a difference within 2 standard errors of the paired
    difference counts as none (a rule of thumb, not a formal test)."""
    return seeds_mod.metrics_verdict(c["psnr"], c["ssim"], "beyond_2sem", none="no difference beyond 2 s.e.")


def analyse(runs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Comparisons (with verdicts) and controllability of one training seed's runs."""
    comps = comparisons(runs, cfg)
    for c in comps:
        c["verdict"] = claim_verdict(c)
    return {"comparisons": comps, "controllability": controllability(runs)}
