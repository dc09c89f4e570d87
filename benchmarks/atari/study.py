"""The Atari world-model study (issues 6 and 17), end to end: one command, resumable, deterministic.

    python -m benchmarks.atari.study --out DIR [--scale smoke|cpu|gpu] [--space latent|patch|pixel]
        [--backbone unet3d|wan] [--seed S] [--threads N]

Stages (each writes under DIR and is skipped when its completion marker is there, so an
interrupted run resumes where it stopped; progress goes to stderr):

1. ``data``: record action-free clips of several games (the "internet video") and action-labelled
   train / test episodes of a held-out game (Pong) with ``benchmarks.atari.data``.
1b. ``autoencoder`` and ``encode`` (``--space latent``, the UNet3D default): the study trains its own
   image autoencoder (``benchmarks.atari.autoencoder``) and encodes every dataset with
   ``causalize.latents``; the world models below then train and roll out on latents, and every
   prediction is decoded and scored in pixels. ``--space patch``: no autoencoder; every dataset is
   rearranged into 4×4-pixel patches (``benchmarks.atari.patches``, lossless), decoded exactly.
2. ``pretrain``: a bidirectional model (the backbone: a UNet3D by default, or a small
   Wan DiT) trained as a plain video diffusion model on the clips, ignoring their actions
   (``benchmarks.atari.pretrain``).
3. ``convert``: ``causalize.api.convert`` with a discrete action adapter, one checkpoint per
   variant (``benchmarks.atari.backbones``). UNet3D: the pretrained model with extrapolative (the
   method), shift or masked weight transfer, with the time-spanning GroupNorms left as they are
   (not causal: converted with ``allow_leak=True``, its failed verification is recorded), and the
   same architecture at its random initialisation ("scratch", converted like the method). Wan:
   the pretrained model with its frame-causal mask ("causal"), and "scratch".
4. ``finetune``: Diffusion-Forcing fine-tuning of every variant on the held-out game's training
   episodes with the same budget (steps, batch, window, learning rate, seed).
5. ``eval``: one-step checks of every fine-tuned variant (x0 predicted from test segments noised
   to a few fixed levels: how good a denoiser it is, apart from the sampler; whether its next frame
   depends on its past and on its action), then
   autoregressive rollouts on the test segments from the real actions (guidance scales
   for the method, the ablation scale for the others) and from uniformly random actions (action
   controllability), scored per horizon step with PSNR and SSIM and, for Pong, the height of the
   agent's paddle (``benchmarks.atari.control``); plus the copy-last-frame baseline. Every
   random-action run is paired with its real-action run: paddle error, ΔPSNR / ΔSSIM, a verdict.
   With ``replicates.seeds`` > 1 the replicated variants are fine-tuned and evaluated again with
   training seeds S+1, ... (``DIR/seed<S+i>/``); every claim gets a mean and standard error over
   training seeds next to the one over test segments (``benchmarks.atari.seeds``).
6. ``report``: ``results.json``, ``README.md`` (tables and paired comparisons), plots of the metrics
   against the horizon, a real-vs-predicted GIF and a frame grid (always regenerated; cheap).

Reproducibility: everything random is seeded from ``--seed``; torch runs with a fixed number of
threads and deterministic algorithms, so a rerun with the same seed, scale and thread count gives
the same numbers (on the CPU, bit for bit). ``DIR/study.json`` records the resolved configuration;
a DIR holding a different configuration is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.atari import evaluate as ev
from benchmarks.atari import seeds as seeds_mod
from benchmarks.atari.backbones import BACKBONES, UNET3D
from benchmarks.atari.reuse import recorded_data, reuse_stages
from benchmarks.atari.runtime import determinism, log_stderr, machine, read_json, usable_cores, write_json
from benchmarks.atari.scales import (
    AUTOENCODER,
    BASELINE,
    BASELINE_AE,
    SCALES,
    SPACES,
    StudyError,
    eval_runs,
    replicate_variants,
    resolve_config,
    run_name,
)
from benchmarks.atari.stages import Study
from benchmarks.atari.verdicts import analyse
from benchmarks.atari.writeup import write_report
from causalize.errors import UsageError
from causalize.modules import attention_exec

__all__ = ["main", "run_study"]

Log = Callable[[str], None]


def _attention() -> str:
    """The attention execution asked for, for the log: "dense (environment variable ...)"."""
    name, source = attention_exec.requested_backend()
    return f"{name} ({source})"


def _attention_record(device: str) -> dict[str, Any]:
    """The attention execution of this process (CAUSALIZE_ATTENTION; call counts of this process
    only: stages resumed from an earlier process ran under that one's, named in its log). A record
    that cannot be made is noted, not fatal: the study's results are written all the same."""
    try:
        return attention_exec.describe(device)
    except Exception as exc:  # noqa: BLE001 - a probe of triton / inductor must not lose the results
        return {"requested": _attention(), "error": f"{type(exc).__name__}: {exc}"}


def run_study(
    out: str | os.PathLike,
    *,
    scale: str = "cpu",
    seed: int = 0,
    threads: int | None = None,
    device: str | None = None,
    data_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    backbone: str = UNET3D.name,
    space: str | None = None,
    reuse: str | os.PathLike | None = None,
    log: Log = log_stderr,
    command: str = "",
    shared_only: bool = False,
    record_workers: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage and write the report; returns the results document. Without
    ``space``, a DIR holding a study resumes in that study's space (pixel if it predates spaces).
    ``reuse``: a finished study whose shared stages this one copies (:func:`reuse_stages`).
    ``shared_only``: stop after the shared stages (returns which ran), so that budget checks
    fine-tune the seeds one run at a time (``budget --fine-tune-missing``).
    ``record_workers``: processes that record, the clips one game each and the held-out train and test
    episodes one dataset each (default: one per CPU core, at most 8,
    at the gpu scale, whose recording runs on the CPU beside an idle GPU; 1 otherwise)."""
    recorded = Path(out) / "study.json"
    if space is None and recorded.is_file():
        space = read_json(recorded).get("config", {}).get("space", "pixel")
    cfg = resolve_config(scale, overrides, backbone, space)
    threads = int(threads or cfg["threads"])
    device = device or ("cuda" if scale == "gpu" and torch.cuda.is_available() else "cpu")
    if record_workers is None:
        record_workers = min(8, usable_cores()) if scale == "gpu" else 1
    elif isinstance(record_workers, bool) or not isinstance(record_workers, int) or record_workers < 1:
        raise StudyError(f"record_workers must be a positive integer, got {record_workers!r}")
    try:
        attention_exec.requested_backend()  # a bad CAUSALIZE_ATTENTION stops here, not at the first forward
    except UsageError as exc:
        raise StudyError(str(exc)) from None
    with determinism(threads, device):
        return _run(
            Path(out),
            cfg,
            scale=scale,
            seed=seed,
            threads=threads,
            device=device,
            data_dir=data_dir,
            reuse=Path(reuse) if reuse else None,
            log=log,
            command=command,
            shared_only=shared_only,
            record_workers=record_workers,
        )


def _replicates(study: Study, segments: ev.Segments, runs0: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Fine-tune and evaluate ``replicates.variants`` again with the other training seeds; the
    study seed's own runs are replicate 0. Returns training seed → its runs (with the shared
    baselines), fine-tuning losses and the seconds its stages took when run."""
    r = study.cfg["replicates"]
    n, names = int(r["seeds"]), replicate_variants(study.cfg)
    if n < 2:
        return {}
    todo = [run for run in eval_runs(study.cfg) if run["variant"] in names]
    shared = {k: v for k, v in runs0.items() if k in (BASELINE, BASELINE_AE, AUTOENCODER)}
    out = {study.seed: {"runs": {**shared, **{x["name"]: runs0[x["name"]] for x in todo}}, "seconds": None}}
    for i in range(1, n):
        rep = study.replica(i)
        seconds = 0.0
        losses = {}
        for v in names:
            seconds += rep.convert(v)["seconds"].get("total", 0.0)
            ft = rep.finetune(v)
            seconds += ft["seconds"]
            losses[v] = ft.get("final_loss")
        runs = dict(shared)
        for run in todo:
            runs[run["name"]] = rep.evaluate(run, segments)
            seconds += runs[run["name"]]["timing"]["seconds"]
        out[rep.train_seed] = {
            "runs": {k: {x: v[x] for x in ("variant", "guidance", "actions", "metrics")} for k, v in runs.items()},
            "final_loss": losses,
            "seconds": seconds,
        }
    return out


def _timings(
    data: dict[str, Any],
    autoencoder: dict[str, Any] | None,
    encoded: dict[str, Any] | None,
    pre: dict[str, Any],
    variants: dict[str, Any],
    runs: dict[str, Any],
    replicates: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """Seconds each stage took when it ran (a skipped stage keeps its first run's), and the totals."""
    timings = {
        "data": data.get("seconds", 0.0),
        "pretrain": pre.get("seconds", 0.0),
        "convert": {v: d["seconds"].get("total", 0.0) for v, d in variants.items()},
        "finetune": {v: d["finetune"]["seconds"] for v, d in variants.items()},
        "eval": {n: r["timing"]["seconds"] for n, r in runs.items() if "timing" in r},
    }
    timings["autoencoder"] = (autoencoder or {}).get("seconds", 0.0)
    timings["encode"] = (encoded or {}).get("seconds", 0.0)
    timings["replicates"] = {str(s): r["seconds"] for s, r in replicates.items() if r.get("seconds") is not None}
    timings["convert_total"] = sum(timings["convert"].values())
    timings["finetune_total"] = sum(timings["finetune"].values())
    timings["eval_total"] = sum(timings["eval"].values())
    timings["replicates_total"] = sum(timings["replicates"].values())
    timings["stages_total"] = (
        timings["data"]
        + timings["autoencoder"]
        + timings["encode"]
        + timings["pretrain"]
        + timings["convert_total"]
        + timings["finetune_total"]
        + timings["eval_total"]
        + timings["replicates_total"]
    )
    return timings


def _run(
    out: Path,
    cfg: dict[str, Any],
    *,
    scale: str,
    seed: int,
    threads: int,
    device: str,
    data_dir: str | os.PathLike | None,
    reuse: Path | None,
    log: Log,
    command: str,
    shared_only: bool = False,
    record_workers: int = 1,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_dir) if data_dir else recorded_data(out, reuse, log)
    study = Study(
        out, cfg, seed, scale=scale, data_dir=data_root, device=device, log=log, record_workers=record_workers
    )
    study.check_identity()
    if reuse is not None:
        reuse_stages(out, reuse, cfg, seed, scale, log)
    log(
        f"study: backbone {study.backbone.name}, scale {scale}, seed {seed}, {threads} torch thread(s), device {device}, "
        f"attention {_attention()}, output {out}"
    )

    data = study.data()
    autoencoder = study.autoencoder()
    encoded = study.encode()
    pre = study.pretrain()
    study.scratch_init()
    if shared_only:
        log(f"study: shared stages done ({', '.join(study.executed) or 'all made before'} run now); stopped there")
        return {"shared_only": True, "stages_run_now": study.executed}
    variants: dict[str, Any] = {}
    for v in study.backbone.variants:
        variants[v] = {**study.convert(v)}
    for v in study.backbone.variants:
        ft = study.finetune(v)
        variants[v]["finetune"] = {
            k: ft.get(k)
            for k in (
                "steps",
                "final_loss",
                "train_seconds",
                "seconds",
                "samples_per_second",
                "parameters",
                "trainable_parameters",
            )
        }
    segments = study.segments()
    denoising = {v: study.denoise(v, segments)["levels"] for v in study.backbone.variants}
    context = {v: study.context(v, segments)["levels"] for v in study.backbone.variants}
    action = {v: study.action(v, segments)["levels"] for v in study.backbone.variants}
    runs: dict[str, Any] = {BASELINE: study.baseline(segments)}
    if study.latent:
        runs[AUTOENCODER] = study.autoencoder_reference(segments)
        runs[BASELINE_AE] = study.baseline_autoencoded(segments)
    for run in eval_runs(cfg):
        runs[run["name"]] = study.evaluate(run, segments)
    replicates = _replicates(study, segments, runs)

    main = study.backbone.main
    best = max(
        cfg["eval"]["guidance"], key=lambda s: runs[run_name(main, float(s), "real")]["metrics"]["psnr"]["overall"]
    )

    timings = _timings(data, autoencoder, encoded, pre, variants, runs, replicates)
    results: dict[str, Any] = {
        "study": {
            "scale": scale,
            "seed": seed,
            "threads": threads,
            "device": device,
            "deterministic_algorithms": "warn_only" if device.startswith("cuda") else True,
            "attention": _attention_record(device),
            "config": cfg,
            "command": command or f"--scale {scale} --seed {seed}",
        },
        "machine": machine(device),
        "data": data["summary"],
        "pretrain": {
            k: pre.get(k)
            for k in ("parameters", "steps", "final_loss", "train_seconds", "median_seconds_per_step", "windows")
        },
        "autoencoder": autoencoder,
        "variants": variants,
        "segments": {
            "count": len(segments.index),
            "index": segments.index,
            "context": segments.context,
            "horizon": segments.horizon,
            "num_actions": segments.num_actions,
        },
        "runs": {n: {k: r[k] for k in ("variant", "guidance", "actions", "metrics")} for n, r in runs.items()},
        "denoising": denoising,
        "context": context,
        "action": {"variants": action, "real_moves": ev.real_moves(segments) if study.paddle else None},
        "best_main_guidance": float(best),
        "timings": timings,
    }
    per_seed = {seed: analyse(results["runs"], cfg)}
    results.update(per_seed[seed])
    for s_, rep_ in replicates.items():
        if s_ != seed:
            per_seed[s_] = analyse(rep_["runs"], cfg)
    results["replicates"] = {
        str(s_): {**{k: v for k, v in r.items() if k != "runs"}, **per_seed[s_]} for s_, r in replicates.items()
    }
    results["across_seeds"] = seeds_mod.across_seeds(per_seed)
    for c in results["across_seeds"]:
        c["verdict"] = seeds_mod.verdict(c)
    write_report(study, results, segments)
    results["stages_run_now"] = study.executed
    results["timings"]["this_invocation"] = time.perf_counter() - t_start
    write_json(out / "results.json", results)
    log(
        f"study: done in {results['timings']['this_invocation']:.1f}s; results in {out / 'results.json'}, report {out / 'README.md'}"
    )
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (resumed if it holds this study)")
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="cpu",
        help="smoke (<1 min), cpu (latent: 113 min measured on 2 cores; pixel: ~2 h), gpu (latent: counted for < 8 min on one GPU at an assumed 25 TFLOP/s, never run; see benchmarks.atari.compute)",
    )
    p.add_argument(
        "--backbone",
        choices=list(BACKBONES),
        default=UNET3D.name,
        help="unet3d (every ablation) or wan (a small DiT: transfer against scratch, guidance, controllability)",
    )
    p.add_argument(
        "--space",
        choices=list(SPACES),
        default=None,
        help="latent (default for unet3d: the study trains its own autoencoder and diffuses in its 16x16x4 latents, "
        "~8x cheaper steps), patch (64x64 RGB as 16x16 grids of 4x4-pixel patches, 48 channels: lossless, same "
        "model and cost as latent) or pixel (64x64 RGB, the earlier study; default for wan, which patches 16x16 "
        "grids 2x2); a directory holding a study resumes in that study's space",
    )
    p.add_argument("--seed", type=int, default=0, help="study seed; replicates train with seed+1, seed+2, ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the scale's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the gpu scale when available)")
    p.add_argument("--data", default=None, help="reuse / record the datasets here instead of OUT/data")
    p.add_argument(
        "--record-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that record: the clips one game each, the held-out train and test episodes one dataset each; "
        "the same recordings for any N (default: one per CPU core, "
        "at most 8, at the gpu scale; 1 otherwise)",
    )
    p.add_argument(
        "--reuse",
        default=None,
        metavar="DIR",
        help="copy the finished shared stages (data, autoencoder, encoded datasets, pretraining, scratch init) of "
        "the study in DIR that were made from the same settings (seed, scale and data must agree; the pretraining "
        "needs everything but finetune, eval, replicates and threads): a fine-tuning ablation without the hour "
        "before it, or another backbone on the same recordings and autoencoder",
    )
    p.add_argument(
        "--shared-only",
        action="store_true",
        help="make the shared stages (recordings, autoencoder, encodings, pretraining, scratch init) and stop: "
        "budget checks with --fine-tune-missing then train the seeds' runs one at a time",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a setting of the scale, e.g. --set pretrain.steps=800 (JSON values)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = " ".join(["python -m benchmarks.atari.study", *(argv if argv is not None else sys.argv[1:])])
    try:
        run_study(
            args.out,
            scale=args.scale,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
            data_dir=args.data,
            overrides=args.overrides,
            backbone=args.backbone,
            space=args.space,
            reuse=args.reuse,
            command=command,
            shared_only=args.shared_only,
            record_workers=args.record_workers,
        )
    except (StudyError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
