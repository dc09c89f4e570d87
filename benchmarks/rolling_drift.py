#!/usr/bin/env python
"""Drift and cost of rolling caches (issue #15): one trained world model rolled out for N frames in
exact, rolling (sink 0, 1, 4) and no-cache modes, scored against a real episode and against the
exact rollout, with the seconds per frame of each.

Why these pieces:

* **A trained model, not random weights**: drift only means something if the exact rollout is
  itself a plausible continuation. A UNet3D of the Atari study's family (`benchmarks/atari`), at
  32×32 so that the whole run fits a 2-core CPU, is converted (the plan's default pipeline: causal
  temporal convs with extrapolative transfer, causal temporal attention, per-frame causal norms;
  a discrete action adapter) and trained from its random initialisation with Diffusion Forcing
  (`causalize.training.trainer.train`) on action-labelled Pong episodes recorded by
  `benchmarks/atari/data.py` (no pretraining stage: the drift question is about the sampler, not
  about transfer). The UNet3D has no temporal position table, so rolling's globally counted
  positions cannot run out over 256 frames. `--data squares` trains on the toy moving squares of
  `causalize.testing.episodes` instead (no ALE needed; the `--quick` smoke run uses it).
* **One real test episode**: the context is its frames 1..c with the actions that produced them
  (the Atari study's protocol, `benchmarks/atari/evaluate.py`), then its recorded actions drive N
  generated frames, each scored (PSNR / SSIM, `benchmarks/atari/metrics.py`, PSNR capped at 100 dB)
  against the real frame at that step and against the exact rollout's frame.
* **Lockstep**: every mode runs on its own copy of the model and the modes take turns frame by
  frame (the order rotating), so that load from other processes on the shared machine falls on all
  of them alike. Two clocks per frame: the sampler's own wall seconds
  (`RolloutResult.seconds_per_frame`) and the process's CPU seconds around the same `step()` call,
  which other processes barely inflate (one torch thread by default, so no thread waits either).
  `none` (full recomputation: equal to exact up to float rounding, and ~5× slower) runs only the
  first `--none-frames` frames: it shows the cost, and that exact still equals it.
* **The isolated reference** of the target "rolling within 1.2× of 1 push + S·branches
  single-frame steps measured alone": the model called directly through its `Stream` with the
  sampler's inputs: a history of L−1 cached frames, then (timed separately, medians over repeats)
  one push (a 1-frame write plus the eviction of the frame that left the window) and one guided
  single-frame step (both branches batched in one forward, as the sampler calls it). Reference =
  push + S · step (exact's: prefill of L−1 frames + S · step). Measured before and after the
  rollouts, medians of the pooled samples; the same costs at other windows (`window_sweep`) say
  where exact / rolling would reach 2×: it needs prefill(L−1) ≥ push + S·step.

Constancy is judged on 16-frame blocks (frames 16-31, ..., N-16..N-1): every block's mean seconds
per frame within ±10 % of the mean over frames 16..N-1, and (load-independent, since lockstep loads
all modes alike) every block's rolling / exact ratio within ±10 % of its mean. Single frames are
too noisy on a shared machine to be judged one by one; their spread is recorded too.

Usage: python benchmarks/rolling_drift.py [--quick] [--data atari|squares] [--frames N]
       [--none-frames N] [--window L] [--steps S] [--train-steps N] [--threads N] [--out DIR]
       [--work DIR] [--fresh] [--no-plots] [--note TEXT]
Writes OUT/rolling_drift[.quick][.DATA].json and, unless --no-plots, OUT/metrics[...].png,
OUT/seconds_per_frame[...].png and OUT/frames[...].png; OUT is benchmarks/results/rolling_drift
(--quick: WORK/out), .DATA names a non-default data source (a full run on the squares: .squares).
The recorded data and the trained model stay in WORK (benchmarks/_work/rolling_drift/KIND[.DATA],
git-ignored, ~25 MB) and a rerun with the same data / model settings reuses them (training is
most of a fresh run's time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # `benchmarks.atari` (absolute imports inside it)

from _common import RESULTS, WORK, _rounded, machine_info, machine_line, record_text, table  # noqa: E402

#: name -> (cache mode, sink)
MODES: dict[str, tuple[str, int]] = {
    "exact": ("exact", 0),
    "rolling-sink0": ("rolling", 0),
    "rolling-sink1": ("rolling", 1),
    "rolling-sink4": ("rolling", 4),
    "none": ("none", 0),
}
ROLLING = [m for m, (cache, _) in MODES.items() if cache == "rolling"]
BLOCK = 16  # frames per constancy block; also the first frame of the "after the slide" range
#: wall: what a user waits (the sampler's timing); cpu: the process's CPU time, which other
#: processes on a shared machine barely inflate (one torch thread: no thread waits either)
CLOCKS = ("cpu", "wall")

_UNET = {
    "down_block_types": ["DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "data": "atari",
        "game": "Pong",
        "size": 32,
        "train_episodes": 24,
        "episode_len": 64,
        "model": {**_UNET, "block_out_channels": [16, 32, 64], "attention_head_dim": 4},
        "train_steps": 300,
        "train_window": 16,
        "batch_size": 2,
        "lr": 1e-3,
        "context": 4,
        "frames": 256,
        "none_frames": 32,
        "window": 16,
        "steps": 10,
        "guidance_scale": 2.5,
        "guidance_rescale": 0.7,
        "history_noise": 20,
        "ref_repeats": 30,
        "sweep_windows": [8, 16, 32, 48],
        "sweep_repeats": 8,
        "threads": 1,
        "seed": 0,
    },
    "quick": {
        "data": "squares",
        "game": None,
        "size": 16,
        "train_episodes": 4,
        "episode_len": 12,
        "model": {
            **_UNET,
            "block_out_channels": [8, 8, 16],
            "norm_num_groups": 4,
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
        },
        "train_steps": 2,
        "train_window": 8,
        "batch_size": 2,
        "lr": 1e-3,
        "context": 4,
        "frames": 36,
        "none_frames": 6,
        "window": 8,
        "steps": 2,
        "guidance_scale": 2.5,
        "guidance_rescale": 0.7,
        "history_noise": 20,
        "ref_repeats": 3,
        "sweep_windows": [8],
        "sweep_repeats": 1,
        "threads": 1,
        "seed": 0,
    },
}
#: settings that decide the recorded data and the trained model (a rerun reuses both if they match)
MODEL_KEYS = (
    "data",
    "game",
    "size",
    "train_episodes",
    "episode_len",
    "model",
    "train_steps",
    "train_window",
    "batch_size",
    "lr",
    "context",
    "frames",
    "seed",
)
PSNR_CAP = 100.0
#: a frame "differs" from exact above this max abs difference (model space): float rounding between
#: exact streaming and full recomputation stays ~1e-6 (the tests allow 1e-5)
DIFFERS = 1e-4


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- model + data


def prepare(s: dict[str, Any], work: Path, fresh: bool) -> dict[str, Any]:
    """Record the data and train the model in `work`, or reuse them when `work` holds a run of the
    same settings; returns what was done (recorded in the results)."""
    identity = {k: s[k] for k in MODEL_KEYS}
    marker = work / "prepared.json"
    if not fresh and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("identity") == identity:
            _log(f"reusing the data and model in {work}")
            return {**done, "reused": True}
    if work.exists() and any(work.iterdir()):
        if not marker.is_file():  # never delete a directory this script did not make
            raise SystemExit(f"error: {work} is not empty and holds no {marker.name}: give another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    test_len = 1 + s["context"] + s["frames"]
    if s["data"] == "atari":
        from benchmarks.atari.data import record_episodes
        from benchmarks.atari.emulator import RecordSettings

        rec = RecordSettings(size=s["size"])
        record_episodes(s["game"], work / "train", s["train_episodes"], s["episode_len"], s["seed"], settings=rec)
        record_episodes(s["game"], work / "test", 1, test_len, s["seed"], split="test", settings=rec)
        source = f"ALE {s['game']}, {s['size']}x{s['size']} (benchmarks/atari/data.py, sticky-random policy)"
    else:
        from causalize.testing.episodes import write_toy_episodes

        write_toy_episodes(
            work / "train", episodes=s["train_episodes"], frames=s["episode_len"], size=s["size"], seed=s["seed"]
        )
        write_toy_episodes(work / "test", episodes=1, frames=test_len, size=s["size"], seed=s["seed"] + 1)
        source = f"toy moving squares (causalize.testing.episodes), {s['size']}x{s['size']}"
    data_seconds = time.perf_counter() - t0

    from benchmarks.atari.backbones import UNET3D
    from benchmarks.atari.pretrain import save_model
    from causalize.api import convert
    from causalize.episodes import read_info
    from causalize.training.trainer import TrainConfig, train

    t0 = time.perf_counter()
    save_model(UNET3D.build(s["model"], 3, s["size"], s["seed"]), work / "init")
    torch.manual_seed(s["seed"])  # the action adapter's initialisation
    actions = read_info(work / "train").action_space.num_actions
    report = convert(work / "init", work / "converted", action_dim=actions, action_type="discrete", overwrite=True)
    if not report.written:
        raise RuntimeError(f"conversion wrote nothing: {(report.verification or {}).get('summary')}")
    config = TrainConfig(
        model=str(work / "converted"),
        data=str(work / "train"),
        output_dir=str(work / "run"),
        window=s["train_window"],
        batch_size=s["batch_size"],
        steps=s["train_steps"],
        lr=s["lr"],
        seed=s["seed"],
        split=None,
        log_every=10,
        checkpoint_every=0,
        device="cpu",
    )
    last = [0.0]

    def progress(step: int, total: int, loss: float) -> None:
        if time.perf_counter() - last[0] > 30 or step == total:
            last[0] = time.perf_counter()
            _log(f"  train step {step}/{total}: loss {loss:.4f}")

    summary = train(config, progress=progress)
    losses = [json.loads(line)["loss"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line]
    done = {
        "identity": identity,
        "source": source,
        "pipeline": report.pipeline,
        "parameters": report.parameters,
        "verification_passed": (report.verification or {}).get("passed"),
        "num_actions": actions,
        "train": {
            "steps": s["train_steps"],
            "seconds": summary.get("train_seconds", summary.get("seconds")),
            "loss_first_logged": losses[0] if losses else None,
            "loss_last_logged": losses[-1] if losses else None,
            "loss_mean_last_5_logged": statistics.fmean(losses[-5:]) if losses else None,
        },
        "data_seconds": data_seconds,
        "model_seconds": time.perf_counter() - t0,
    }
    marker.write_text(record_text(done))
    return {**done, "reused": False}


def load_episode_segment(work: Path, s: dict[str, Any]) -> dict[str, Any]:
    """The test episode cut as the Atari study cuts a segment starting at frame 1."""
    from benchmarks.atari.data import load_episode
    from benchmarks.atari.evaluate import model_space

    ep = load_episode(work / "test", 0)
    c, n = s["context"], s["frames"]
    return {
        "context": model_space(ep["frames"][None, 1 : 1 + c]),
        "context_actions": torch.from_numpy(ep["actions"][None, 0:c].astype(np.int64)),
        "actions": torch.from_numpy(ep["actions"][None, c : c + n].astype(np.int64)),
        "real": ep["frames"][1 + c : 1 + c + n],  # uint8 (N, H, W, C)
        "history": model_space(ep["frames"][None, 1 : s["window"]]),  # L−1 frames for the reference
        "frames": model_space(ep["frames"][None]),  # the whole episode: histories of other windows
    }


def load_models(work: Path, count: int) -> list[Any]:
    """`count` independent copies of the trained model: the streaming caches live on the model (one
    Stream per model), so sessions that run side by side on one model would overwrite each other's."""
    from causalize.rollout.loading import load_world_model

    return [load_world_model(work / "run", device="cpu")[0] for _ in range(count)]


def rollout_config(work: Path, s: dict[str, Any], cache: str, sink: int):
    from causalize.rollout.loading import resolve_config

    config, _ = resolve_config(
        work / "run",
        steps=s["steps"],
        window=s["window"],
        guidance_scale=s["guidance_scale"],
        guidance_rescale=s["guidance_rescale"],
        history_noise=s["history_noise"],
        eta=0.0,
        seed=s["seed"],
        cache=cache,
        sink=sink,
    )
    return config


# -------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def isolated_costs(wm: Any, history: torch.Tensor, s: dict[str, Any], level: int) -> dict[str, dict[str, list]]:
    """Wall and CPU seconds of one rolling push (1-frame write + eviction), one guided single-frame step (after
    a push, and after a prefill) and one exact prefill of L−1 frames: the model called directly
    through its Stream, as the sampler calls it but without the sampler around it. History at
    `level`, the current frame at 500."""
    from causalize.rollout.streaming import Stream

    stream = Stream.of(wm.model, wm.plan)
    hist_frames = history.shape[2]
    gen = torch.Generator().manual_seed(1)
    frame = history[:, :, -1:]
    current = torch.randn(frame.shape, generator=gen).repeat(2, 1, 1, 1, 1)
    num_actions = wm.action_encoder.action_dim
    acts = torch.randint(0, num_actions, (1, hist_frames), generator=gen)
    ones = torch.ones(1, hist_frames, dtype=torch.bool)

    def ts(batch: int, frames: int, value: int) -> torch.Tensor:
        return torch.full((batch, frames), value, dtype=torch.long)

    def prefill() -> None:
        stream.reset()
        stream.anchor_timestep = level
        with stream.write(hist_frames):
            wm(history, ts(1, hist_frames, level), acts, ones, **wm.unconditional_inputs(1, hist_frames))

    step_inputs = (current, ts(2, 1, 500), acts[:, :1].repeat(2, 1), torch.tensor([[True], [False]]))

    def push() -> None:
        with stream.write(1, rolling=True):
            wm(frame, ts(1, 1, level), acts[:, :1], ones[:, :1], **wm.unconditional_inputs(1, 1))
        stream.evict(0, stream.cached_frames - hist_frames)  # sink 0: the window's oldest frame leaves

    def step() -> None:
        with stream.read():
            wm(*step_inputs, **wm.unconditional_inputs(2, 1))

    def timed(key: str, fn) -> None:
        w, c = time.perf_counter(), time.process_time()
        fn()
        out["cpu"][key].append(time.process_time() - c)
        out["wall"][key].append(time.perf_counter() - w)

    keys = ("prefill", "step_after_prefill", "push", "step")
    out: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in keys} for clock in CLOCKS}
    prefill()
    push()
    step()  # warm-up
    for _ in range(s["ref_repeats"]):
        for key, fn, times in (
            ("prefill", prefill, 1),
            ("step_after_prefill", step, 2),  # exact's state: L−1 frames just prefilled
            ("push", push, 1),  # against L−1 cached frames, as in the rollout
            ("step", step, 2),  # rolling's state: after a push and an eviction
        ):
            for _ in range(times):
                timed(key, fn)
    stream.reset()
    return out


def window_sweep(wm: Any, episode: torch.Tensor, s: dict[str, Any], level: int) -> dict[str, Any]:
    """The isolated costs at other windows L (CPU clock, medians): what a frame would cost exact
    (prefill of L−1 + S steps) and rolling (push + S steps) once slid, and their ratio; the
    target's 2× needs prefill(L−1) ≥ push + S·step, so it depends on L and S."""
    out = {}
    for window in s["sweep_windows"]:
        if window - 1 > episode.shape[2]:
            continue
        costs = isolated_costs(wm, episode[:, :, : window - 1], {**s, "ref_repeats": s["sweep_repeats"]}, level)
        med = {k: statistics.median(v) for k, v in costs["cpu"].items()}
        exact = med["prefill"] + s["steps"] * med["step_after_prefill"]
        rolling = med["push"] + s["steps"] * med["step"]
        out[str(window)] = {
            "seconds_median_cpu": med,
            "exact_per_frame": exact,
            "rolling_per_frame": rolling,
            "predicted_speedup": exact / rolling,
            "ideal_speedup_by_frame_passes": (window - 1 + 2 * s["steps"]) / (1 + 2 * s["steps"]),
        }
    return out


def run_lockstep(models: list[Any], configs: dict[str, Any], seg: dict[str, Any], s: dict[str, Any]) -> dict:
    """Every mode's rollout, one frame at a time in rotating order; per mode its frames (model
    space), per-frame seconds (the sampler's wall clock, and the process's CPU time around each
    step), pushes and cache bytes."""
    from causalize.rollout import RolloutSession

    names = list(configs)
    sessions = {}
    for name, wm in zip(names, models):
        sessions[name] = RolloutSession(wm, configs[name])
        sessions[name].reset(seg["context"], seg["context_actions"])
    limit = {name: (s["none_frames"] if name == "none" else s["frames"]) for name in names}
    frames: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    cache: dict[str, list[int]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for i in range(s["frames"]):
        active = [n for n in names if i < limit[n]]
        shift = i % len(active)
        for name in active[shift:] + active[:shift]:
            sess = sessions[name]
            c = time.process_time()
            frames[name].append(sess.step(seg["actions"][:, i]))
            cpu[name].append(time.process_time() - c)
            stream = getattr(sess.denoiser, "stream", None)
            cache[name].append(stream.cache_bytes() if stream is not None else 0)
        if (i + 1) % 32 == 0 or i + 1 == s["frames"]:
            _log(f"  frame {i + 1}/{s['frames']} ({time.perf_counter() - t0:.0f} s)")
    out = {}
    for name in names:
        res = sessions[name].result(frames[name])
        out[name] = {"result": res, "cache_bytes": cache[name], "cpu_seconds": cpu[name]}
    return out


def _metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """Per-frame PSNR (capped) and SSIM of (T, C, H, W) images in [0, 1]."""
    from benchmarks.atari.metrics import video_metrics

    m = video_metrics(pred, target)
    psnr = torch.nan_to_num(m["psnr"].double(), posinf=PSNR_CAP).clamp(max=PSNR_CAP)
    return {"psnr": psnr.tolist(), "ssim": m["ssim"].double().tolist()}


def _unit(frames: torch.Tensor) -> torch.Tensor:
    """Model-space (1, C, T, H, W) frames -> (T, C, H, W) in [0, 1] (as the study scores them)."""
    from benchmarks.atari.metrics import frames_to_unit

    return frames_to_unit(frames[0].movedim(1, 0).float(), "signed")


def _mean(values: list[float], lo: int, hi: int | None = None) -> float | None:
    part = values[lo:hi]
    return statistics.fmean(part) if part else None


def _timing(sec: list[float]) -> dict[str, Any]:
    """Seconds per frame over frames 16..end: mean, median, 16-frame block means and their spread."""
    after = sec[BLOCK:]
    if not after:
        return {"mean_16_to_end": None, "block_max_rel_dev": None}
    mean = statistics.fmean(after)
    blocks = [statistics.fmean(sec[b : b + BLOCK]) for b in range(BLOCK, len(sec) - BLOCK + 1, BLOCK)]
    return {
        "mean_16_to_end": mean,
        "median_16_to_end": statistics.median(after),
        "block_means_16": blocks,
        "block_max_rel_dev": max(abs(b / mean - 1) for b in blocks) if blocks else None,
        "block_max_over_min": max(blocks) / min(blocks) if blocks else None,
        "frame_p5_p95_over_mean": [float(np.percentile(after, q)) / mean for q in (5, 95)],
    }


def summarise(runs: dict, seg: dict[str, Any], ref: dict[str, dict[str, list]], s: dict[str, Any]) -> dict[str, Any]:
    """Per-mode curves and summaries, the isolated reference, the targets (timing ones per clock)."""
    from benchmarks.atari.metrics import frames_to_unit

    n, window, steps = s["frames"], s["window"], s["steps"]
    slide = window - s["context"]  # the first generated frame whose window has slid
    real = frames_to_unit(torch.from_numpy(np.ascontiguousarray(seg["real"])), "uint8")
    exact_frames = runs["exact"]["result"].frames
    exact_unit = _unit(exact_frames)
    last_ctx = _unit(seg["context"][:, :, -1:]).expand(n, -1, -1, -1)
    med = {clock: {k: statistics.median(v) for k, v in ref[clock].items()} for clock in CLOCKS}
    reference = {
        clock: {
            "rolling": med[clock]["push"] + steps * med[clock]["step"],
            "exact": med[clock]["prefill"] + steps * med[clock]["step_after_prefill"],
        }
        for clock in CLOCKS
    }
    modes: dict[str, Any] = {}
    for name, run in runs.items():
        res = run["result"]
        k = res.frames.shape[2]
        unit = _unit(res.frames)
        vs_real = _metrics(unit, real[:k])
        vs_exact = _metrics(unit, exact_unit[:k])
        seconds = {"wall": list(res.seconds_per_frame), "cpu": run["cpu_seconds"]}
        per_frame_diff = (res.frames.float() - exact_frames[:, :, :k].float()).abs().amax(dim=(0, 1, 3, 4)).tolist()
        timing = {clock: _timing(seconds[clock]) for clock in CLOCKS}
        if name in ROLLING:
            for clock in CLOCKS:
                mean, exact_mean = timing[clock]["mean_16_to_end"], modes["exact"]["timing"][clock]["mean_16_to_end"]
                timing[clock]["over_reference"] = mean / reference[clock]["rolling"] if mean else None
                timing[clock]["speedup_vs_exact"] = exact_mean / mean if mean and exact_mean else None
                # load from other processes slows every mode at once (lockstep): the ratio to exact
                # per block shows whether rolling's own cost moves with the frame index
                ratios = [
                    b / e
                    for b, e in zip(
                        timing[clock].get("block_means_16", []),
                        modes["exact"]["timing"][clock].get("block_means_16", []),
                    )
                ]
                timing[clock]["block_ratio_to_exact"] = ratios
                mean_ratio = statistics.fmean(ratios) if ratios else None
                timing[clock]["block_ratio_to_exact_max_rel_dev"] = (
                    max(abs(r / mean_ratio - 1) for r in ratios) if ratios else None
                )
        elif name == "exact":
            for clock in CLOCKS:
                mean = timing[clock]["mean_16_to_end"]
                timing[clock]["over_reference"] = mean / reference[clock]["exact"] if mean else None
        modes[name] = {
            "cache": res.cache_mode,
            "sink": MODES[name][1],
            "frames": k,
            "timing": timing,
            "pushed_frames_per_frame_after_slide": sorted(set(res.passes_per_frame[slide:])) if k > slide else [],
            "frame_passes_total": res.frame_passes,
            "model_calls_total": res.model_calls,
            "cache_bytes_max": max(run["cache_bytes"]) if run["cache_bytes"] else 0,
            "cache_bytes_at": {
                str(i): run["cache_bytes"][i] for i in sorted({0, slide, min(k, 64) - 1, k - 1}) if i < k
            },
            "first_frame_differing_from_exact": next((i for i, d in enumerate(per_frame_diff) if d > DIFFERS), None),
            "first_frame_not_bit_equal_to_exact": next((i for i, d in enumerate(per_frame_diff) if d > 0), None),
            "max_abs_diff_vs_exact": max(per_frame_diff),
            "psnr_vs_real_mean": statistics.fmean(vs_real["psnr"]),
            "ssim_vs_real_mean": statistics.fmean(vs_real["ssim"]),
            "psnr_vs_real_by_range": _ranges(vs_real["psnr"], slide),
            "ssim_vs_real_by_range": _ranges(vs_real["ssim"], slide),
            "psnr_vs_exact_by_range": _ranges(vs_exact["psnr"], slide),
            "ssim_vs_exact_by_range": _ranges(vs_exact["ssim"], slide),
            "per_frame": {
                "seconds": seconds["wall"],
                "cpu_seconds": seconds["cpu"],
                "pushed_frames": list(res.passes_per_frame),
                "cache_bytes": run["cache_bytes"],
                "max_abs_diff_vs_exact": per_frame_diff,
                "psnr_vs_real": vs_real["psnr"],
                "ssim_vs_real": vs_real["ssim"],
                "psnr_vs_exact": vs_exact["psnr"],
                "ssim_vs_exact": vs_exact["ssim"],
            },
        }
    base = _metrics(last_ctx, real)
    none = modes["none"]

    def per_clock(key: str, check) -> dict[str, dict[str, bool | None]]:
        return {clock: {m: check(modes[m]["timing"][clock].get(key)) for m in ROLLING} for clock in CLOCKS}

    targets = {
        "rolling_within_1.2x_of_reference": per_clock("over_reference", lambda x: _at_most(x, 1.2)),
        "rolling_constant_10pct_blocks": per_clock("block_max_rel_dev", lambda x: _at_most(x, 0.10)),
        "rolling_over_exact_constant_10pct_blocks": per_clock(
            "block_ratio_to_exact_max_rel_dev", lambda x: _at_most(x, 0.10)
        ),
        "rolling_2x_faster_than_exact_after_slide": per_clock("speedup_vs_exact", lambda x: _at_most(2.0, x)),
        "exact_equals_none_within_1e-5": none["max_abs_diff_vs_exact"] <= 1e-5,
        "exact_pushes_window_after_slide": modes["exact"]["pushed_frames_per_frame_after_slide"] == [window - 1],
        "rolling_pushes_one_after_slide": {m: modes[m]["pushed_frames_per_frame_after_slide"] == [1] for m in ROLLING},
    }
    ratio = {
        clock: statistics.fmean(none["per_frame"][key][1:])
        / statistics.fmean(modes["exact"]["per_frame"][key][1 : none["frames"]])
        if none["frames"] > 1
        else None
        for clock, key in (("cpu", "cpu_seconds"), ("wall", "seconds"))
    }
    return {
        "slide_frame": slide,
        "reference": {
            "seconds_median": med,
            "seconds_min": {clock: {k: min(v) for k, v in ref[clock].items()} for clock in CLOCKS},
            "samples": {k: len(v) for k, v in ref["wall"].items()},
            "per_frame_seconds": reference,
            "formula": "rolling: push + S * step; exact: prefill(L-1) + S * step_after_prefill "
            "(a step = both guidance branches in one forward, as the sampler calls it)",
        },
        "ideal_speedup_by_frame_passes": (window - 1 + 2 * steps) / (1 + 2 * steps),
        "none_over_exact_first_frames": ratio,
        "copy_last_baseline": {
            "psnr_vs_real_mean": statistics.fmean(base["psnr"]),
            "ssim_vs_real_mean": statistics.fmean(base["ssim"]),
            "psnr_vs_real_by_range": _ranges(base["psnr"], slide),
            "ssim_vs_real_by_range": _ranges(base["ssim"], slide),
            "per_frame": {"psnr_vs_real": base["psnr"], "ssim_vs_real": base["ssim"]},
        },
        "targets": targets,
        "modes": modes,
    }


def _at_most(x: float | None, y: float | None) -> bool | None:
    """x <= y, or None when either was not measured (too few frames)."""
    return None if x is None or y is None else x <= y


def _ranges(values: list[float], slide: int) -> dict[str, float | None]:
    """Means over the frames before the slide, then 16-63, 64-127, 128-end (those that exist)."""
    n = len(values)
    spans = {f"0-{slide - 1}": (0, slide), "16-63": (16, 64), "64-127": (64, 128), f"128-{n - 1}": (128, n)}
    return {k: _mean(values, lo, hi) for k, (lo, hi) in spans.items() if lo < n}


# ---------------------------------------------------------------------------------------- output


def plots(out: Path, summary: dict[str, Any], runs: dict, seg: dict[str, Any], s: dict[str, Any], suffix: str) -> list:
    """Metrics over the horizon, seconds per frame, and a strip of frames; small PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.atari.evaluate import to_uint8

    colours = {
        "exact": "black",
        "rolling-sink0": "tab:red",
        "rolling-sink1": "tab:orange",
        "rolling-sink4": "tab:blue",
        "none": "tab:green",
    }
    modes, slide = summary["modes"], summary["slide_frame"]
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for (row, ref), (col, metric) in (
        (r, c) for r in enumerate(("real", "exact")) for c in enumerate(("psnr", "ssim"))
    ):
        ax = axes[row][col]
        for name, m in modes.items():
            if ref == "exact" and name in ("exact", "none"):
                continue
            ax.plot(_uncapped(m["per_frame"][f"{metric}_vs_{ref}"]), lw=0.8, color=colours[name], label=name)
        if ref == "real":
            base = summary["copy_last_baseline"]["per_frame"][f"{metric}_vs_real"]
            ax.plot(_uncapped(base), lw=0.8, ls=":", color="grey", label="copy-last")
        ax.axvline(slide, color="grey", lw=0.5, ls="--")
        title = f"{metric.upper()} vs {'the real episode' if ref == 'real' else 'the exact rollout'}"
        ax.set_title(title + (" (identical frames: not drawn)" if metric == "psnr" else ""), fontsize=9)
        ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
        if row == 1:
            ax.set_xlabel("generated frame")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"rolling caches: S={s['steps']}, guidance {s['guidance_scale']}, window {s['window']}, "
        f"context {s['context']} (dashed: the window starts to slide)",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"metrics{suffix}.png"
    fig.savefig(path, dpi=64)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ref = summary["reference"]["per_frame_seconds"]
    for ax, clock, key in ((axes[0], "wall", "seconds"), (axes[1], "cpu", "cpu_seconds")):
        for name, m in modes.items():
            ax.plot(m["per_frame"][key], lw=0.7, color=colours[name], label=name)
        rolling, exact = ref[clock]["rolling"], ref[clock]["exact"]
        ax.axhline(rolling, color="tab:purple", lw=1, ls="--", label="push + S·step alone")
        ax.axhline(1.2 * rolling, color="tab:purple", lw=0.8, ls=":", label="1.2× that")
        ax.axhline(exact, color="grey", lw=1, ls="--", label="prefill + S·step alone")
        ax.set_yscale("log")
        ax.set_ylabel(f"{clock} seconds per frame")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("wall clock (other processes share the 2 cores) and the process's CPU time", fontsize=9)
    axes[1].set_xlabel("generated frame")
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = out / f"seconds_per_frame{suffix}.png"
    fig.savefig(path, dpi=64)
    plt.close(fig)
    written.append(path)

    n = s["frames"]
    cols = sorted({0, slide, min(n - 1, 31), min(n - 1, 63), min(n - 1, 127), n - 1})
    rows = [("real", seg["real"])] + [
        (name, to_uint8(runs[name]["result"].frames)[0]) for name in ("exact", *ROLLING) if name in runs
    ]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.4 * len(rows)))
    for r, (name, video) in enumerate(rows):
        for c, t in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(video[t], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path = out / f"frames{suffix}.png"
    fig.savefig(path, dpi=64)
    plt.close(fig)
    written.append(path)
    return written


def _uncapped(values: list[float]) -> list[float]:
    """PSNR curves without the cap (identical frames: a gap, not a jump to 100 dB)."""
    return [math.nan if v >= PSNR_CAP else v for v in values]


def print_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, m in summary["modes"].items():
        cpu, wall = m["timing"]["cpu"], m["timing"]["wall"]
        rows.append(
            [
                name,
                m["frames"],
                f"{_fmt(cpu['mean_16_to_end'], '.3f')} / {_fmt(wall['mean_16_to_end'], '.3f')}",
                f"{_fmt(cpu['block_max_rel_dev'], '.1%')} / {_fmt(wall['block_max_rel_dev'], '.1%')}",
                f"{_fmt(cpu.get('block_ratio_to_exact_max_rel_dev'), '.1%')} / "
                f"{_fmt(wall.get('block_ratio_to_exact_max_rel_dev'), '.1%')}",
                f"{_fmt(cpu.get('over_reference'), '.2f')} / {_fmt(wall.get('over_reference'), '.2f')}",
                f"{_fmt(cpu.get('speedup_vs_exact'), '.2f')} / {_fmt(wall.get('speedup_vs_exact'), '.2f')}",
                ",".join(map(str, m["pushed_frames_per_frame_after_slide"])) or "-",
                f"{m['cache_bytes_max'] / 2**20:.1f}",
                _fmt(m["psnr_vs_real_mean"], ".2f"),
                _fmt(m["ssim_vs_real_mean"], ".3f"),
                " / ".join(_fmt(v, ".1f") for v in m["psnr_vs_exact_by_range"].values()),
                f"{m['max_abs_diff_vs_exact']:.1e}",
            ]
        )
    base = summary["copy_last_baseline"]
    rows.append(
        ["copy-last", *[""] * 8, _fmt(base["psnr_vs_real_mean"], ".2f"), _fmt(base["ssim_vs_real_mean"], ".3f")]
    )
    rows[-1] += ["", ""]
    ranges = " / ".join(summary["modes"]["exact"]["psnr_vs_exact_by_range"])
    return table(
        [
            "mode",
            "frames",
            "s/frame 16..end (cpu / wall)",
            "max block dev",
            "max block dev of /exact",
            "/ reference",
            "exact / this",
            "pushes/frame after slide",
            "cache MiB",
            "PSNR vs real",
            "SSIM vs real",
            f"PSNR vs exact ({ranges})",
            "max |Δ| vs exact",
        ],
        rows,
    )


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy data, a tiny model, 36 frames (a smoke run)")
    ap.add_argument("--data", choices=("atari", "squares"), default=None)
    ap.add_argument("--frames", type=int, default=None, help="generated frames per mode (full: 256)")
    ap.add_argument("--none-frames", type=int, default=None, help="frames of the no-cache run (full: 32)")
    ap.add_argument("--window", type=int, default=None, help="rollout window L (full: 16)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps S (full: 10)")
    ap.add_argument("--train-steps", type=int, default=None, help="training steps (full: 300)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1: repeatable on a shared CPU)")
    ap.add_argument("--out", type=Path, default=None, help="default results/rolling_drift; quick: WORK/out")
    ap.add_argument("--work", type=Path, default=None, help="data + trained model (reused when settings match)")
    ap.add_argument("--fresh", action="store_true", help="record and train again even if WORK matches")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--note", default=None, help="free text recorded in the JSON (e.g. which source tree was measured)")
    args = ap.parse_args(argv)
    kind = "quick" if args.quick else "full"
    s = dict(SETTINGS[kind])
    for key in ("data", "frames", "none_frames", "window", "steps", "train_steps", "threads"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["game"] = (s["game"] or "Pong") if s["data"] == "atari" else None
    if not (s["context"] < s["window"] <= s["frames"] and 1 <= s["none_frames"] <= s["frames"]):
        ap.error("need context < window <= frames and 1 <= none-frames <= frames")
    torch.set_num_threads(s["threads"])
    import causalize

    default_data = s["data"] == SETTINGS[kind]["data"]
    work = args.work or WORK / "rolling_drift" / (kind if default_data else f"{kind}.{s['data']}")
    # a smoke run's outputs stay in the git-ignored work directory, never beside the results
    out = args.out or (work / "out" if args.quick else RESULTS / "rolling_drift")
    t_start = time.perf_counter()
    load_before = list(os.getloadavg())

    _log(f"[prepare] {s['data']} data, UNet3D {s['model']['block_out_channels']}, {s['train_steps']} train steps")
    prepared = prepare(s, work, args.fresh)
    seg = load_episode_segment(work, s)
    configs = {name: rollout_config(work, s, cache, sink) for name, (cache, sink) in MODES.items()}
    models = load_models(work, len(MODES) + 1)
    ref_model = models.pop()
    from causalize.rollout import RolloutSession

    level = RolloutSession(ref_model, configs["exact"]).level_h
    _log("[reference] push / step / prefill alone")
    ref = isolated_costs(ref_model, seg["history"], s, level)
    _log(f"[rollout] {', '.join(MODES)}: {s['frames']} frames (none: {s['none_frames']}), lockstep")
    t_roll = time.perf_counter()
    runs = run_lockstep(models, configs, seg, s)
    rollout_seconds = time.perf_counter() - t_roll
    _log("[reference] again")
    for clock, costs in isolated_costs(ref_model, seg["history"], s, level).items():
        for k, v in costs.items():
            ref[clock][k] += v
    summary = summarise(runs, seg, ref, s)
    _log(f"[window sweep] push / step / prefill alone at L = {', '.join(map(str, s['sweep_windows']))}")
    summary["window_sweep"] = window_sweep(ref_model, seg["frames"], s, level)
    info = machine_info()
    payload = {
        "benchmark": "rolling_drift",
        "quick": args.quick,
        "note": args.note,
        "causalize_file": causalize.__file__,
        "settings": {**s, "history_level": level, "modes": {k: {"cache": c, "sink": n} for k, (c, n) in MODES.items()}},
        "world_model": {
            "what": "UNet3DConditionModel converted by causalize (plan default pipeline) + discrete action adapter, "
            "trained from its random initialisation with Diffusion Forcing (causalize.training.trainer.train)",
            **{k: v for k, v in prepared.items() if k != "identity"},
        },
        "episode": {
            "source": prepared["source"],
            "context_frames": "1..c",
            "first_generated_real_frame": 1 + s["context"],
        },
        **summary,
        "rollout_seconds": rollout_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "machine": info,
    }
    out.mkdir(parents=True, exist_ok=True)
    # the default data of each kind writes the plain names; the other data source gets its own
    suffix = (".quick" if args.quick else "") + ("" if default_data else f".{s['data']}")
    path = out / f"rolling_drift{suffix}.json"
    path.write_text(record_text(_rounded(payload, 4)))
    print(print_table(summary))
    med, per = summary["reference"]["seconds_median"]["cpu"], summary["reference"]["per_frame_seconds"]["cpu"]
    print(
        f"alone (cpu): push {1e3 * med['push']:.1f} ms, step {1e3 * med['step']:.1f} ms (after a prefill "
        f"{1e3 * med['step_after_prefill']:.1f}), prefill {1e3 * med['prefill']:.1f} ms -> rolling "
        f"{per['rolling']:.3f} s, exact {per['exact']:.3f} s per frame; ideal speed-up by frame passes "
        f"{summary['ideal_speedup_by_frame_passes']:.2f}"
    )
    sweep = summary["window_sweep"]
    if sweep:
        print(
            table(
                [
                    "window L",
                    "exact s/frame (alone)",
                    "rolling s/frame (alone)",
                    "predicted speed-up",
                    "by frame passes",
                ],
                [
                    [L, f"{v['exact_per_frame']:.3f}", f"{v['rolling_per_frame']:.3f}", f"{v['predicted_speedup']:.2f}"]
                    + [f"{v['ideal_speedup_by_frame_passes']:.2f}"]
                    for L, v in sweep.items()
                ],
            )
        )
    print("targets: " + json.dumps(summary["targets"]))
    if not args.no_plots:
        for p in plots(out, summary, runs, seg, s, suffix):
            _log(f"wrote {p}")
    _log(machine_line(info))
    _log(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
