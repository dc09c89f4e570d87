"""Does pretrained transfer still beat scratch after more fine-tuning? (issue 17)

    python -m benchmarks.atari.transfer --study DIR [--json PATH]

The study compares the method with scratch at its own fine-tuning budget. The budget check
(``benchmarks.atari.budget``) fine-tunes one variant on to more steps and measures each model
against repeating the last frame, per test segment. Where the method and ``scratch`` have both
been taken to the same step count (``DIR/budget/<method>.json`` and ``DIR/budget/scratch.json``,
and the same under each replicate's ``DIR/seed<S+r>/``), this pairs them: a segment's
(method − copy-last) − (scratch − copy-last) is method − scratch on that segment, the copy-last
frames being the same for both (the study's segments). PSNR and SSIM, on the first
``FIRST_FRAMES`` generated frames and on all of them; one seed: ± over segments, the 2-s.e. rule;
several: the study's rule over seeds (``seeds.py``: Student's t over seeds and 2 s.e. over the
seed-averaged segments). A table goes to stdout and everything to ``DIR/budget/transfer.json``
(or ``--json``). Only the sampler the study used counts (``@<sampler>`` measurements are left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.atari.backbones import get_backbone
from benchmarks.atari.seeds import metrics_verdict, over_seeds, over_segments, paired

__all__ = ["SPANS", "TransferError", "collect", "margins", "table"]

#: The copy-last spans the budget check measures (``first_<k>`` is found by name).
SPANS = ("first", "all")


class TransferError(ValueError):
    """No pair to compare (no study, no budget runs of both variants at a common step count)."""


def collect(out: Path) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """Per training seed, the method's and scratch's budget-check documents (the study's sampler)."""
    ident_path = out / "study.json"
    if not ident_path.is_file():
        raise TransferError(f"{out} holds no study (no study.json)")
    ident = json.loads(ident_path.read_text(encoding="utf-8"))
    method = get_backbone(ident["config"].get("backbone", "unet3d")).main
    found: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for seed_dir in [out, *sorted(out.glob("seed*"))]:
        docs = [seed_dir / "budget" / f"{v}.json" for v in (method, "scratch")]
        if all(p.is_file() for p in docs):
            a, b = (json.loads(p.read_text(encoding="utf-8")) for p in docs)
            found[int(a["training_seed"])] = (a, b)
    if not found:
        raise TransferError(
            f"no seed of {out} has budget checks of both {method!r} and 'scratch' "
            f"(python -m benchmarks.atari.budget --study {out} --variant V --steps N, for both)"
        )
    return found


def _span(row: Mapping[str, Any], span: str) -> dict[str, Any]:
    return next(v for k, v in row["copy_last"].items() if (k == "all") == (span == "all"))


def _pair(a: Mapping[str, Any], b: Mapping[str, Any], span: str, metric: str) -> dict[str, Any]:
    """method − scratch per segment, from their paired differences against copy-last."""
    x = np.asarray(_span(a, span)[metric]["per_segment"], dtype=np.float64)
    y = np.asarray(_span(b, span)[metric]["per_segment"], dtype=np.float64)
    if x.shape != y.shape:
        raise TransferError(f"the two runs were measured on different segments ({x.size} against {y.size})")
    return paired(x - y)


def margins(per_seed: Mapping[int, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per step count measured for both variants in every seed: the per-seed paired
    margins and, over several seeds, the study's rule (the module docstring)."""
    seeds = sorted(per_seed)
    common = set.intersection(
        *({n for n, r in doc["steps"].items() if "copy_last" in r} for s in seeds for doc in per_seed[s])
    )
    rows = []
    for n in sorted(common, key=int):
        row: dict[str, Any] = {"steps": int(n), "seeds": seeds}
        for span in SPANS:
            cell: dict[str, Any] = {}
            for m in ("psnr", "ssim"):
                each = {s: _pair(per_seed[s][0]["steps"][n], per_seed[s][1]["steps"][n], span, m) for s in seeds}
                cell[m] = {"per_seed": {str(s): each[s] for s in seeds}}
                if len(seeds) > 1:
                    g = over_segments([each[s]["per_segment"] for s in seeds])
                    o = over_seeds([each[s]["mean"] for s in seeds])
                    cell[m].update(mean=o["mean"], sem=o["sem"], beyond=o["beyond"] and g["beyond"])
                    cell[m].update(over_seeds=o, over_segments=g)
                else:
                    only = each[seeds[0]]
                    cell[m].update(mean=only["mean"], sem=only["sem"], beyond=only["beyond_2sem"])
            cell["verdict"] = metrics_verdict(cell["psnr"], cell["ssim"], "beyond", none="no difference")
            row[span] = cell
        rows.append(row)
    if not rows:
        raise TransferError("the method and scratch share no step count measured against copy-last in every seed")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per step count, method − scratch (± over segments, or over seeds)."""
    lines = [
        "| fine-tuning steps | seeds | first frames: PSNR (dB) | SSIM | verdict | all frames: PSNR (dB) | SSIM | verdict |",
        "|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        cells = []
        for span in SPANS:
            c = r[span]
            cells += [
                f"{c['psnr']['mean']:+.2f} ± {c['psnr']['sem']:.2f}",
                f"{c['ssim']['mean']:+.4f} ± {c['ssim']['sem']:.4f}",
            ]
            cells.append(c["verdict"])
        lines.append(f"| {r['steps']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("\nmethod − scratch, paired over test segments; ± over segments (1 seed) or over seeds.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="a study whose method and scratch both have budget checks")
    p.add_argument("--json", default=None, help="where to write the rows (default DIR/budget/transfer.json)")
    args = p.parse_args(argv)
    out = Path(args.study)
    try:
        rows = margins(collect(out))
    except TransferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.json) if args.json else out / "budget" / "transfer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"study": str(out), "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
