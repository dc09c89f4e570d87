"""The issue's three targets at each fine-tuning budget, over training seeds (issue 17)

    python -m benchmarks.atari.targets --study DIR [--json PATH]

The study judges its claims at its own fine-tuning budget. The budget check
(``benchmarks.atari.budget``) fine-tunes a variant on to more steps and measures each model: paddle
error with real against random actions, and the real-action rollout against repeating the last
frame, per test segment. This reads those checks (``DIR/budget/<method>.json`` and
``DIR/budget/scratch.json``, and the same under each replicate's ``DIR/seed<S+r>/``) and judges, at
every step count measured in every seed:

* **follows its actions**: the method's paddle error real − random (lower is better);
* **beats copy-last**: the method − copy-last, PSNR and SSIM, first ``FIRST_FRAMES`` generated
  frames (the target) and all of them;
* **transfer beats scratch**, where scratch was taken to the same step count in every seed: per
  segment (method − copy-last) − (scratch − copy-last) is method − scratch, the copy-last frames
  being the same for both (the study's segments); PSNR and SSIM, first frames and all.

One seed: ± over test segments, the 2-s.e. rule. Several: the study's rule (``seeds.py``: Student's
t over seeds and 2 s.e. over the seed-averaged segments). A table goes to stdout and everything to
``DIR/budget/targets.json`` (or ``--json``). Only the study's sampler counts (``@<sampler>``
measurements are left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import record_text
from benchmarks.atari.backbones import backbone_of
from benchmarks.atari.scales import StudyError
from benchmarks.atari.seeds import metrics_verdict, over_seeds, over_segments, paired, verdict
from benchmarks.atari.stages import read_identity

__all__ = ["SPANS", "TargetsError", "collect", "copy_last_span", "judge", "table"]

#: The copy-last spans the budget check measures (``first_<k>`` is found by name).
SPANS = ("first", "all")

Docs = Mapping[int, tuple[Mapping[str, Any], Mapping[str, Any] | None]]


class TargetsError(ValueError):
    """Nothing to judge: no study, no budget check of the method, no step count every seed has."""


def collect(out: Path) -> dict[int, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Per training seed with a budget check of the method: its document and scratch's (or None)."""
    try:
        ident = read_identity(out)
    except StudyError as err:
        raise TargetsError(str(err)) from None
    method = backbone_of(ident["config"]).main
    found: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
    for seed_dir in [out, *sorted(out.glob("seed*"))]:
        mine, theirs = (seed_dir / "budget" / f"{v}.json" for v in (method, "scratch"))
        if mine.is_file():
            doc = json.loads(mine.read_text(encoding="utf-8"))
            other = json.loads(theirs.read_text(encoding="utf-8")) if theirs.is_file() else None
            found[int(doc["training_seed"])] = (doc, other)
    if not found:
        raise TargetsError(
            f"no seed of {out} has a budget check of {method!r} "
            f"(python -m benchmarks.atari.budget --study {out} --steps N [--replicate r])"
        )
    return found


def _measured(doc: Mapping[str, Any] | None) -> set[str]:
    return {n for n, r in doc["steps"].items() if "copy_last" in r} if doc else set()


def copy_last_span(row: Mapping[str, Any], span: str) -> Mapping[str, Any]:
    """A budget measurement's copy-last comparison over ``span`` (``SPANS``: ``first`` is the
    ``first_<k>`` entry, whatever k the study used)."""
    return next(v for k, v in row["copy_last"].items() if (k == "all") == (span == "all"))


def _transfer(a: Mapping[str, Any], b: Mapping[str, Any], span: str, metric: str) -> dict[str, Any]:
    """method − scratch per segment, from their paired differences against copy-last."""
    x = np.asarray(copy_last_span(a, span)[metric]["per_segment"], dtype=np.float64)
    y = np.asarray(copy_last_span(b, span)[metric]["per_segment"], dtype=np.float64)
    if x.shape != y.shape:
        raise TargetsError(f"the two runs were measured on different segments ({x.size} against {y.size})")
    return paired(x - y)


def _over(each: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed paired differences (mean, sem, n, per_segment) → the claim's mean, sem and bar: one
    seed's 2 s.e. over its segments, or the study's two bars over several."""
    if len(each) == 1:
        (d,) = each
        return {"mean": d["mean"], "sem": d["sem"], "beyond": bool(d["n"] > 1 and abs(d["mean"]) > 2 * d["sem"])}
    o = over_seeds([d["mean"] for d in each])
    g = over_segments([d["per_segment"] for d in each])
    return {"mean": o["mean"], "sem": o["sem"], "beyond": o["beyond"] and g["beyond"], "seeds": o, "segments": g}


def _metrics(each: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """PSNR and SSIM per seed (``paired`` rows) → per seed, over seeds, and the verdict."""
    cell: dict[str, Any] = {}
    for m in ("psnr", "ssim"):
        cell[m] = {
            **_over([each[s][m] for s in sorted(each)]),
            "per_seed": {str(s): each[s][m] for s in each},
        }
    cell["verdict"] = metrics_verdict(cell["psnr"], cell["ssim"], "beyond", none="no difference")
    return cell


def _follows(rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The method's paddle error real − random per seed → over seeds, with the study's verdict."""
    diffs = {str(s): r["paddle"]["real_minus_random"] for s, r in rows.items()}
    if len(rows) == 1:
        ((only, d),) = zip(rows.values(), diffs.values(), strict=True)
        return {"mean": d["mean"], "sem": d["sem"], "verdict": only["paddle"]["verdict"], "per_seed": diffs}
    if missing := sorted(int(s) for s, d in diffs.items() if "per_segment" not in d):
        raise TargetsError(
            f"seed(s) {missing}: measured before the budget check kept per-segment paddle errors; "
            "rerun their budget check (it measures such rows again)"
        )
    cell = {**_over(list(diffs.values())), "per_seed": diffs}
    cell["verdict"] = verdict({"paddle": cell})
    return cell


def judge(per_seed: Docs) -> list[dict[str, Any]]:
    """One row per step count the method was measured at in every seed (module docstring)."""
    if not per_seed:
        raise TargetsError("no seed to judge")
    seeds = sorted(per_seed)
    steps = set.intersection(*(_measured(per_seed[s][0]) for s in seeds))
    with_scratch = set.intersection(*(_measured(per_seed[s][1]) for s in seeds))
    rows = []
    for n in sorted(steps, key=int):
        mine = {s: per_seed[s][0]["steps"][n] for s in seeds}
        row: dict[str, Any] = {"steps": int(n), "seeds": seeds, "follows": _follows(mine)}
        row["copy_last"] = {span: _metrics({s: copy_last_span(mine[s], span) for s in seeds}) for span in SPANS}
        row["transfer"] = None  # scratch not taken to this step count in every seed
        if n in with_scratch:
            theirs = {s: per_seed[s][1]["steps"][n] for s in seeds}  # type: ignore[index]
            row["transfer"] = {
                span: _metrics(
                    {s: {m: _transfer(mine[s], theirs[s], span, m) for m in ("psnr", "ssim")} for s in seeds}
                )
                for span in SPANS
            }
        rows.append(row)
    if not rows:
        raise TargetsError("no step count was measured against copy-last in every seed")
    return rows


def _cell(c: Mapping[str, Any], unit: str = " dB") -> str:
    return f"{c['psnr']['mean']:+.2f} ± {c['psnr']['sem']:.2f}{unit}, {c['verdict']}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per step count, the three targets (± over segments, or over seeds)."""
    lines = [
        "| fine-tuning steps | seeds | follows: paddle real − random (px) | − copy-last, first frames | "
        "− copy-last, all | transfer − scratch, first frames | transfer − scratch, all |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = r["follows"]
        t = r["transfer"]
        cells = [
            f"{f['mean']:+.2f} ± {f['sem']:.2f}, {f['verdict']}",
            _cell(r["copy_last"]["first"]),
            _cell(r["copy_last"]["all"]),
            _cell(t["first"]) if t else "not measured",
            _cell(t["all"]) if t else "not measured",
        ]
        lines.append(f"| {r['steps']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("\nPSNR shown; the verdicts count PSNR and SSIM. ± over segments (1 seed) or over seeds.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="a study whose method has budget checks (and scratch, for transfer)")
    p.add_argument("--json", default=None, help="where to write the rows (default DIR/budget/targets.json)")
    args = p.parse_args(argv)
    out = Path(args.study)
    try:
        rows = judge(collect(out))
    except TargetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.json) if args.json else out / "budget" / "targets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record_text({"study": str(out), "rows": rows}), encoding="utf-8")
    print(table(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
