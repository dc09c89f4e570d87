"""The side-by-side GIF of a budget-checked model: does its paddle move with the real actions?

    python -m benchmarks.atari.budget_gif --study DIR --steps N [--replicate R] [--variant V] [--out PATH]

The budget check (``budget.py``) measures a model fine-tuned on to N steps with the real and with
random actions, and keeps numbers only. This rolls the same model out again exactly as that
measurement did (same segments, sampler, noise and random actions) and checks it: the paddle
error of both rollouts, segment by segment, must equal the one the measurement recorded
(``budget/<variant>.json``), or nothing is written. The GIF shows the real frames, the rollout with
the real actions and the rollout with random ones, on the segment where the real paddle travels
farthest (the study's own GIF's choice); the context frames are the real ones in every panel.
Default output: ``DIR[/seed<S>]/budget/<variant>/step-N/rollout.gif``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.atari import control
from benchmarks.atari import evaluate as ev
from benchmarks.atari import report as rp
from benchmarks.atari.budget import open_study, record_path, rollouts, run_dir, run_name
from benchmarks.atari.runtime import set_determinism
from benchmarks.atari.scales import StudyError
from benchmarks.atari.writeup import gif_segment

__all__ = ["main", "write_gif"]


def _measured_model(study: Any, variant: str, steps: int) -> tuple[Path, dict[str, Any]]:
    """The model the budget check measured at ``steps`` (the study's own at its step count) and
    that measurement, from the check's record ``budget/<variant>.json``; refused unless both exist."""
    own = steps == int(study.cfg["finetune"]["steps"])
    name = run_name(variant, {})
    model = study.out / "finetune" / variant / "final" if own else run_dir(study, name, steps) / "final"
    record = record_path(study.out, name)
    row = json.loads(record.read_text(encoding="utf-8"))["steps"].get(str(steps)) if record.is_file() else None
    if not model.is_dir() or row is None:
        raise StudyError(
            f"no budget check of {variant!r} measured at {steps} steps here ({model}, {record}); "
            "run python -m benchmarks.atari.budget with these --steps first"
        )
    return model, row


def write_gif(
    study_dir: Path, steps: int, replicate: int = 0, variant: str | None = None, out: Path | None = None
) -> dict:
    """Roll the measured model out again, check it against its measurement, write the GIF; a summary."""
    from causalize.rollout.loading import load_world_model

    study = open_study(study_dir, replicate)
    variant = variant or study.backbone.main
    model, measured = _measured_model(study, variant, steps)
    wm, _ = load_world_model(model, device=study.device)
    segments = study.segments()
    rolled = rollouts(study, variant, wm, segments)  # exactly the measurement's
    preds = {kind: pred for kind, (pred, _) in rolled.items()}
    scored = {kind: score for kind, (_, score) in rolled.items()}
    again = control.controllability(scored["real"], scored["random"])["paddle"]["real_minus_random"]["per_sample"]
    recorded = measured["paddle"]["real_minus_random"]["per_segment"]
    if not np.allclose(np.asarray(again, float), np.asarray(recorded, float), rtol=0, atol=1e-6, equal_nan=True):
        raise StudyError(f"the rollouts differ from the budget check's measurement of {model}; no GIF written")
    baseline = ev.score(ev.copy_last_baseline(segments), segments.real_future)
    shown, c = gif_segment(baseline.get("paddle")), segments.context
    real = segments.frames[shown]
    panels = {"real": real}
    for kind in ("real", "random"):
        panels[f"{kind} actions, {steps} steps"] = np.concatenate([real[:c], ev.to_uint8(preds[kind])[shown]])
    path = out or model.parent / "rollout.gif"
    rp.write_comparison_gif(path, panels, context=c, fps=4.0)
    paddle = control.positions(scored["real"]["paddle"], "real")[shown]

    def rows(kind: str, which: str) -> list[float | None]:  # the shown segment's paddle row per frame
        y = control.positions(scored[kind]["paddle"], which)[shown]
        return [None if not np.isfinite(v) else round(float(v), 2) for v in y]

    return {
        "gif": str(path),
        "model": str(model),
        "segment": shown,
        "episode_and_start": list(segments.index[shown]),
        "paddle_real_minus_random_rechecked": float(np.nanmean(again)),
        "real_paddle_travel_px": float(np.ptp(paddle[np.isfinite(paddle)])) if np.isfinite(paddle).any() else None,
        "paddle_rows": {  # generated frames only; None: no paddle found
            "real": rows("real", "real"),
            "real_actions": rows("real", "pred"),
            "random_actions": rows("random", "pred"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.budget_gif", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="the study folder the budget check ran on")
    p.add_argument("--steps", type=int, required=True, help="the budget check's step count to show")
    p.add_argument("--replicate", type=int, default=0, help="r > 0: the replicate with training seed S + r")
    p.add_argument("--variant", default=None, help="default: the backbone's method variant")
    p.add_argument("--out", default=None, help="the GIF's path (default: beside the model's measurement)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    set_determinism(args.threads, "cpu")
    try:
        summary = write_gif(
            Path(args.study), args.steps, args.replicate, args.variant, Path(args.out) if args.out else None
        )
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
