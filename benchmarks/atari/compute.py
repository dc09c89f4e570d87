"""The compute of a study scale, counted rather than timed (issue 17): what a scale's minutes rest on.

    python -m benchmarks.atari.compute [--scale gpu] [--backbone unet3d|wan] [--space latent] \\
        [--set section.key=JSON ...] [--tflops 25 100] [--json PATH]

No GPU has run the ``gpu`` scale, so its "under 8 minutes" cannot be a measurement. This counts,
with ``torch.utils.flop_counter`` on the meta device (no weights, no arithmetic: seconds on any
machine), the floating-point operations of each training stage and of the evaluation rollouts,
and converts the total into minutes at an *assumed* sustained throughput (``--tflops``).

What is counted:

* autoencoder, pretraining: one optimiser step's forward and backward at the scale's batch
  shape, times its steps (the optimiser's own arithmetic is not counted: it is linear in the
  parameters and small beside it);
* fine-tuning: the bidirectional model at the fine-tuning shape, times the steps of every
  fine-tuning run the study makes (its variants, then ``replicates.variants`` for each further
  seed). The converted model adds a small action adapter and masks its attention (the counter
  counts a masked attention at full cost), so this is the scale's count to within the adapter;
* evaluation: every rollout of the study (and of each further seed's replicate runs) as the
  frame passes the rollouts count (:func:`rollout_passes`; streamed for a causal variant, the
  whole window recomputed at every sampler step for the time-spanning-norm ablation) times a
  frame's share of a forward over a full window at the evaluation batch: a streamed frame
  attends to at most that window, so this bounds its cost from above. The per-frame checks
  (denoising, context, action) are not counted.

``--study DIR`` counts a finished study's recorded configuration and adds the seconds it recorded
per stage (``total``: every stage, recording and encoding included) and the TFLOP/s they imply: on
the 2-core machine 0.09–0.21 TFLOP/s per stage, 0.10–0.13 over whole studies (README).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import record_text
from benchmarks.atari import autoencoder as ae
from benchmarks.atari import pretrain as pt
from benchmarks.atari.backbones import backbone_of
from benchmarks.atari.scales import StudyError, eval_runs, model_input, replicate_variants, resolve_config
from benchmarks.atari.stages import read_identity

__all__ = ["count_flops", "measured_rates", "rollout_passes", "scale_compute"]

#: The assumed sustained throughputs the minutes are given at, not measurements: 25 TFLOP/s, about a
#: third of an H100's dense fp32 peak (67), for a run without tensor cores; 100, a fifth of its dense
#: TF32 peak (495), which the study enables on CUDA.
DEFAULT_TFLOPS = (25.0, 100.0)


def count_flops(fn: Callable[[], None]) -> int:
    """Floating-point operations ``fn`` dispatches (its tensors on the meta device)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _diffusion_pass(cfg: dict[str, Any], batch: int, window: int, backward: bool) -> Callable[[], None]:
    channels, grid = model_input(cfg)
    width = cfg["model"].get("cross_attention_dim") or cfg["model"]["text_dim"]  # UNet3D / Wan

    def run() -> None:
        with torch.device("meta"):
            model = pt.build_model(cfg["model"], channels, grid, 0, cfg["backbone"])
            x = torch.randn(batch, channels, window, grid, grid)
            k = torch.zeros(batch, dtype=torch.long)
            ehs = torch.zeros(batch, 1, width)
        with torch.set_grad_enabled(backward):
            out = model(x, k, encoder_hidden_states=ehs).sample
            if backward:
                out.float().square().mean().backward()

    return run


def _autoencoder_pass(cfg: dict[str, Any]) -> Callable[[], None]:
    size = int(cfg["data"]["size"])

    def run() -> None:
        with torch.device("meta"):
            vae = ae.build_autoencoder(cfg["latent"], 0)
            x = torch.randn(int(cfg["latent"]["batch_size"]), 3, size, size)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        (rec - x).abs().mean().backward()

    return run


def _finetune_runs(cfg: dict[str, Any]) -> int:
    extra_seeds = max(0, int(cfg["replicates"]["seeds"]) - 1)
    return len(backbone_of(cfg).variants) + extra_seeds * len(replicate_variants(cfg))


def _rollout_passes(cfg: dict[str, Any]) -> int:
    """Frame passes per test segment, summed over every rollout the study makes."""
    r, variants = cfg["replicates"], backbone_of(cfg).variants
    runs = eval_runs(cfg)
    runs += [x for x in runs if x["variant"] in r["variants"]] * max(0, int(r["seeds"]) - 1)
    return sum(rollout_passes(cfg, x["guidance"], streamed=variants[x["variant"]]["causal"]) for x in runs)


def rollout_passes(cfg: dict[str, Any], guidance: float, streamed: bool = True) -> int:
    """Frame passes one segment's rollout makes, as the rollout counts them. Streamed (a causal
    model): each sampler step of a generated frame (two branches with guidance), its clean-history
    pass, and the context frames but the last. Not streamed (the time-spanning-norm ablation):
    every sampler step recomputes the window of frames so far."""
    e = cfg["eval"]
    branches = 2 if guidance != 1.0 else 1
    if not streamed:
        frames = sum(min(e["window"], e["context"] + i + 1) for i in range(e["horizon"]))
        return e["steps"] * branches * frames
    return e["horizon"] * (e["steps"] * branches + 1) + e["context"] - 1


def _segments(cfg: dict[str, Any]) -> int:
    return int(cfg["data"]["test_episodes"]) * int(cfg["eval"]["segments_per_episode"])


def _minutes(flop: float, tflops: Sequence[float]) -> dict[str, float]:
    return {f"min at {t:g} TFLOP/s": round(flop / (t * 1e12) / 60.0, 2) for t in tflops}


def _row(stage: str, shape: str, per: int, count: int, unit: str, tflops: Sequence[float]) -> dict[str, Any]:
    total = per * count
    return {
        "stage": stage,
        "shape": shape,
        "GFLOP each": round(per / 1e9, 2),
        "count": count,
        "unit": unit,
        "flop": total,
        "PFLOP": round(total / 1e15, 3),
        **_minutes(total, tflops),
    }


def scale_compute(cfg: dict[str, Any], tflops: Sequence[float] = DEFAULT_TFLOPS) -> list[dict[str, Any]]:
    """One row per stage of the configuration's study, then the total."""
    rows = []
    if cfg["space"] == "latent":
        a = cfg["latent"]
        per = count_flops(_autoencoder_pass(cfg))
        rows.append(_row("autoencoder", f"{a['batch_size']} frames", per, int(a["steps"]), "steps", tflops))
    p, f, e = cfg["pretrain"], cfg["finetune"], cfg["eval"]
    per = count_flops(_diffusion_pass(cfg, p["batch_size"], p["window"], backward=True))
    rows.append(_row("pretraining", f"{p['batch_size']} × {p['window']}", per, int(p["steps"]), "steps", tflops))
    per = count_flops(_diffusion_pass(cfg, f["batch_size"], f["window"], backward=True))
    runs = _finetune_runs(cfg)
    rows.append(
        _row(
            f"fine-tuning ({runs} runs)",
            f"{f['batch_size']} × {f['window']}",
            per,
            runs * int(f["steps"]),
            "steps",
            tflops,
        )
    )
    segments = _segments(cfg)
    chunk = min(segments, int(e["batch_size"] or segments))
    window = int(e["window"])  # a frame among a full window's: its share of a forward over the window
    per = count_flops(_diffusion_pass(cfg, chunk, window, backward=False)) // (chunk * window)
    rows.append(
        _row("evaluation", f"{segments} segments", per, segments * _rollout_passes(cfg), "frame passes", tflops)
    )
    total = sum(r["flop"] for r in rows)
    rows.append({"stage": "total", "flop": total, "PFLOP": round(total / 1e15, 3), **_minutes(total, tflops)})
    return rows


#: results.json ``timings`` key of each stage's recorded seconds (fine-tuning and evaluation only
#: when no replicate seeds ran: their recorded seconds mix both stages).
_TIMED = {
    "autoencoder": "autoencoder",
    "pretraining": "pretrain",
    "fine-tuning": "finetune_total",
    "evaluation": "eval_total",
}


def measured_rates(rows: list[dict[str, Any]], timings: dict[str, Any]) -> None:
    """Add the seconds a finished study recorded for each stage and the TFLOP/s they imply."""
    separate = not timings.get("replicates_total")
    for row in rows:
        stage = row["stage"].split(" (")[0]
        key = "stages_total" if stage == "total" else _TIMED.get(stage)
        seconds = timings.get(key) if key and (separate or stage in ("autoencoder", "pretraining", "total")) else None
        if seconds:
            row["measured s"] = round(float(seconds), 1)
            row["TFLOP/s measured"] = round(row["flop"] / float(seconds) / 1e12, 4)


def _recorded_results(study: str | None) -> dict[str, Any]:
    """A finished study's results.json ({} without --study or before the study finished)."""
    if not study or not (path := Path(study, "results.json")).is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.compute", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default=None, help="smoke, cpu or gpu (default gpu)")
    p.add_argument("--backbone", default=None, choices=("unet3d", "wan"), help="default unet3d")
    p.add_argument("--space", default=None, choices=("latent", "patch", "pixel"), help="default: the backbone's")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON", help="as the study's --set")
    p.add_argument(
        "--tflops",
        type=float,
        nargs="+",
        default=list(DEFAULT_TFLOPS),
        help="assumed sustained TFLOP/s, one column each (default 25 100: an H100 in fp32, in TF32)",
    )
    p.add_argument(
        "--study",
        default=None,
        metavar="DIR",
        help="count a finished study's recorded configuration instead (not with --scale/--backbone/--space/--set), "
        "with the seconds its stages took",
    )
    p.add_argument("--json", default=None, help="write the configuration's rows here")
    args = p.parse_args(argv)
    if min(args.tflops) <= 0:
        p.error("--tflops must be positive")
    if args.study and (args.set or args.space or args.scale or args.backbone):
        p.error("--study counts the study's own configuration: drop --scale, --backbone, --space and --set")
    try:
        if args.study:
            ident = read_identity(args.study)
            cfg, args.scale = ident["config"], ident["scale"]
        else:
            args.scale = args.scale or "gpu"
            cfg = resolve_config(args.scale, args.set, backbone=args.backbone or "unet3d", space=args.space)
        rows = scale_compute(cfg, args.tflops)
        recorded = _recorded_results(args.study)
    except (StudyError, ValueError) as exc:
        p.error(str(exc))
    measured_rates(rows, recorded.get("timings", {}))
    from benchmarks._common import machine_info
    from benchmarks.atari.report import write_markdown_table

    shown = {r["stage"]: {k: v for k, v in r.items() if k not in ("stage", "flop")} for r in rows}
    print(write_markdown_table(shown, row_header="stage"))
    if args.json:
        doc = {"scale": args.scale, "backbone": cfg["backbone"], "space": cfg["space"], "set": args.set}
        doc["study"] = args.study
        doc["timed_on"] = recorded.get("machine")  # the machine the measured seconds come from
        doc["machine"] = machine_info()  # the counting machine (a count does not depend on it)
        doc |= {"assumed_tflops": args.tflops, "rows": rows}
        Path(args.json).write_text(record_text(doc), encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
