#!/usr/bin/env python
"""The latent path's costs: encode throughput and peak memory of a tiny AutoencoderKLWan, and for a
rollout with decoding the decode time per generated latent frame next to its denoising time.

Encode (section "encode"): a toy pixel dataset (causalize.testing.episodes: --episodes episodes of
--frames frames of --size² RGB pixels) encoded by `causalize.latents.encode.encode_episodes`
(what `causalize encode` runs) through the tiny Wan pipeline's VAE (causalize.testing.pipelines)
and, for comparison, the tiny UNet3D pipeline's image VAE (AutoencoderKL, --batch-size frames per call).
Each VAE runs in its own fresh child process so that its memory is its own; the child imports
torch, diffusers' VAE classes and causalize's encode modules first (a one-off cost of any process,
measured in convert_cost), so neither the times nor the memory growth below count them:

  end-to-end frames/s   EncodeReport.frames_per_second: video frames over the whole call (VAE
                        load from disk, reading, encoding and writing every episode; the first
                        encode of the process is in it)
  encode_clip frames/s  the same clips through `encode_clip` alone, the VAE loaded and warmed up
                        (one clip), median over --encode-repeats passes over the dataset
  peak memory           CUDA: torch.cuda.max_memory_allocated over encode_episodes (its report).
                        CPU: the child's peak RSS (VmHWM: torch, diffusers, the VAE and the encode
                        together) and the encode's own growth: VmHWM − VmRSS after resetting the
                        peak just before encode_episodes (/proc/self/clear_refs), the default
                        allocator (a low MALLOC_MMAP_THRESHOLD_, as train_step uses, halved the
                        encode rate here and gave a slightly lower growth, so it is not set).

Rollout (section "rollout"): the tiny Wan pipeline's transformer converted into a world model
(`causalize.api.convert`, --action-dim 12 discrete: 4 video frames × 3 actions per latent frame;
random weights, no verification), the encoded dataset's latent record stored beside it as training
does (latent.json: per-video-frame actions are grouped onto latent frames), then
`causalize.rollout.to_file.rollout_to_file` with vae=the pipeline: a pixel context of
--context-frames frames (5 → 2 latent frames) encoded, --actions video-frame actions (a multiple
of 4 → actions/4 generated latent frames), every latent frame decoded through the streaming
decoder. One untimed warm-up rollout, then --repeats rollouts per entry of --steps (alternating
order). Per generated latent frame: denoising seconds (the report's seconds_per_frame) and decode
seconds (the report's decode_seconds for the generated frames; the context's come first), each as
the mean and the median over every generated frame of every repeat (the median is what a shared
machine's other load disturbs least).

Decoding once per frame is checked, not assumed: the script counts StreamingDecoder.push calls,
WanDecoder3d forwards and whole-clip decodes (AutoencoderKLWan.decode) and requires
decode_calls == decoder_forwards == context_latent_frames + generated_latent_frames with no
whole-clip decode; decode seconds per frame should not grow with the number of steps. A failed
check is recorded in the JSON and makes the script exit 1.

Usage: python benchmarks/latent_path.py [--quick] [--device cpu|cuda] [--episodes N] [--frames T]
       [--size PX] [--batch-size N] [--context-frames N] [--actions N] [--steps 4,10] [--repeats R]
       [--encode-repeats R] [--threads N] [--no-image-vae] [--out PATH] [--work DIR] [--keep]
Writes benchmarks/results/latent_path.json (latent_path.quick.json with --quick) unless --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, WORK, _rounded, machine_info, machine_line, record_text, table

NAME = "latent_path"
FULL = dict(episodes=8, frames=17, size=64, actions=32, steps="4,10", repeats=3, encode_repeats=3)
QUICK = dict(episodes=2, frames=9, size=32, actions=8, steps="2,4", repeats=1, encode_repeats=1)
ACTION_DIM = 12  # the toy episodes' 3 discrete actions × 4 video frames per Wan latent frame


# ---- encode (in a child process) ----------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def encode_child(src: str, out: str, vae: str, device: str, batch_size: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: encode_episodes once (memory, end-to-end rate), then encode_clip alone."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLWan  # noqa: F401  (diffusers' lazy imports, done here)

    import causalize.latents.actions  # noqa: F401
    import causalize.latents.record  # noqa: F401
    from causalize.episodes import episode_path, list_episodes, read_arrays
    from causalize.latents.encode import encode_episodes
    from causalize.latents.vae import encode_clip, load_vae

    cuda = device.startswith("cuda")
    hwm_imports = _status_bytes("VmHWM")
    reset = _reset_peak_rss()
    rss_at_reset = _status_bytes("VmRSS")
    report = encode_episodes(src, out, vae, device=device, batch_size=batch_size)
    hwm_encode = _status_bytes("VmHWM")
    peak = max((v for v in (hwm_imports, hwm_encode) if v is not None), default=None)

    model, spec = load_vae(vae, device=device)
    clips = []
    for i in list_episodes(src):
        frames = np.array(read_arrays(episode_path(src, i))["frames"])
        clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0)
    encode_clip(model, spec, clips[0].to(device), chunk=batch_size)  # warm-up
    seconds = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for clip in clips:
            encode_clip(model, spec, clip.to(device), chunk=batch_size)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    frames = sum(c.shape[2] for c in clips)
    return {
        "vae_class": spec.class_name,
        "decode_stream": spec.decode_stream,
        "parameters": sum(p.numel() for p in model.parameters()),
        "episodes": report.episodes,
        "video_frames": report.video_frames,
        "latent_frames": report.latent_frames,
        "end_to_end_seconds": report.seconds,
        "end_to_end_frames_per_second": report.frames_per_second,
        "encode_clip_seconds": seconds,
        "encode_clip_frames_per_second": frames / statistics.median(seconds),
        "cuda_peak_memory_bytes": report.peak_memory_bytes,
        "peak_rss_bytes": peak,
        "rss_before_encode_bytes": rss_at_reset if reset else None,
        "encode_rss_growth_bytes": (hwm_encode - rss_at_reset) if reset and hwm_encode and rss_at_reset else None,
    }


def run_encode(name: str, src: Path, vae: Path, work: Path, args) -> dict[str, Any]:
    """One VAE's encode in a fresh child process: its result and the child's wall time."""
    out = work / f"latents-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child-encode", json.dumps([str(src), str(out), str(vae), args.device])]
    cmd += ["--batch-size", str(args.batch_size), "--encode-repeats", str(args.encode_repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"encode child for {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(name=name, vae_path=str(vae), child_wall_seconds=wall, latents=str(out))
    return result


# ---- rollout with decoding ----------------------------------------------------------------------


class DecodeCounter:
    """Counts, during a rollout, the streaming decoder's pushes, the Wan decoder's forwards, whole-clip
    decodes and VAE encodes, by wrapping the classes' methods (restored on exit)."""

    def __init__(self) -> None:
        self.counts = {"pushes": 0, "decoder_forwards": 0, "whole_clip_decodes": 0, "vae_encodes": 0}

    @contextlib.contextmanager
    def active(self):
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d

        from causalize.latents.vae import StreamingDecoder

        targets = [
            (StreamingDecoder, "push", "pushes"),
            (WanDecoder3d, "forward", "decoder_forwards"),
            (AutoencoderKLWan, "decode", "whole_clip_decodes"),
            (AutoencoderKLWan, "encode", "vae_encodes"),
        ]
        saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in targets]

        def counting(fn, key):
            def wrapper(*a, **kw):
                self.counts[key] += 1
                return fn(*a, **kw)

            return wrapper

        for cls, attr, key in targets:
            setattr(cls, attr, counting(getattr(cls, attr), key))
        try:
            yield self.counts
        finally:
            for cls, attr, fn in saved:
                setattr(cls, attr, fn)


def prepare_world_model(pipe: Path, latents: Path, work: Path) -> Path:
    """The pipeline's transformer converted (random weights) with the latent record beside it."""
    from causalize import fs
    from causalize.api import convert
    from causalize.episodes import read_info
    from causalize.latents.record import RECORD_FILE, RECORD_KEY

    wm = work / "wm"
    convert(pipe, wm, action_dim=ACTION_DIM, action_type="discrete", verify=False, overwrite=True)
    fs.write_json(wm / RECORD_FILE, read_info(latents).extra_fields[RECORD_KEY], indent=2)
    return wm


def one_rollout(wm: Path, context: Path, actions: Path, out: Path, pipe: Path, steps: int, args) -> dict[str, Any]:
    from causalize.latents.spec import read_spec
    from causalize.rollout.to_file import rollout_to_file

    grouping = read_spec(pipe).grouping
    counter = DecodeCounter()
    with counter.active() as counts:
        rep = rollout_to_file(
            wm,
            context,
            actions,
            out,
            context_frames=args.context_frames,
            vae=pipe,
            device=args.device,
            steps=steps,
            seed=0,
            overwrite=True,
        )
    ctx = grouping.latent_frames(args.context_frames)
    gen = len(rep.seconds_per_frame)
    dec = rep.decode_seconds
    return {
        "steps": steps,
        "context_latent_frames": ctx,
        "generated_latent_frames": gen,
        "generated_video_frames": rep.generated,
        "frames_written": rep.frames_written,
        "model_calls": rep.model_calls,
        "decode_mode": (rep.vae or {}).get("decode"),
        "decode_calls": len(dec),
        "counted": dict(counts),
        "denoise_seconds_per_frame": statistics.fmean(rep.seconds_per_frame),
        "denoise_seconds_all": list(rep.seconds_per_frame),
        "decode_seconds_per_frame": statistics.fmean(dec[ctx:]) if len(dec) > ctx else None,
        "decode_seconds_context": dec[:ctx],
        "decode_seconds_generated": dec[ctx:],
        "rollout_seconds": rep.seconds,
        "config": rep.config,
    }


def once_per_frame(r: dict[str, Any]) -> list[str]:
    """What breaks 'every latent frame decoded exactly once' in one rollout (empty: nothing)."""
    want = r["context_latent_frames"] + r["generated_latent_frames"]
    c = r["counted"]
    problems = []
    if r["decode_calls"] != want:
        problems.append(f"decode_calls {r['decode_calls']} != {want} latent frames")
    if c["pushes"] != want:
        problems.append(f"StreamingDecoder.push called {c['pushes']} times for {want} latent frames")
    if c["decoder_forwards"] != want:
        problems.append(f"WanDecoder3d ran {c['decoder_forwards']} times for {want} latent frames")
    if c["whole_clip_decodes"]:
        problems.append(f"{c['whole_clip_decodes']} whole-clip decode(s)")
    return problems


def run_rollouts(pipe: Path, latents: Path, src: Path, work: Path, args) -> dict[str, Any]:
    import numpy as np

    from causalize.episodes import episode_path

    wm = prepare_world_model(pipe, latents, work)
    actions = work / "actions.npy"
    np.save(actions, np.random.default_rng(0).integers(0, 3, args.actions))
    context = episode_path(src, 0)
    steps = [int(s) for s in args.steps.split(",")]
    one_rollout(wm, context, actions, work / "warmup.npz", pipe, min(steps), args)  # lazy inits, page cache
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in steps}
    for r in range(args.repeats):
        for s in steps if r % 2 == 0 else steps[::-1]:
            res = one_rollout(wm, context, actions, work / f"rollout-{s}.npz", pipe, s, args)
            runs[s].append(res)
            print(
                f"  steps {s}: denoise {res['denoise_seconds_per_frame']:.4f} s/frame, "
                f"decode {res['decode_seconds_per_frame']:.4f} s/frame, {res['counted']}",
                file=sys.stderr,
            )
    summary = {}
    for s, rs in runs.items():
        den = [x for r in rs for x in r["denoise_seconds_all"]]
        dec = [x for r in rs for x in r["decode_seconds_generated"]]
        med_den, med_dec = statistics.median(den), statistics.median(dec)
        summary[str(s)] = {
            "frames_timed": len(den),
            "denoise_seconds_per_latent_frame": med_den,
            "denoise_seconds_per_latent_frame_mean": statistics.fmean(den),
            "decode_seconds_per_latent_frame": med_dec,
            "decode_seconds_per_latent_frame_mean": statistics.fmean(dec),
            "decode_seconds_per_video_frame": med_dec / 4,
            "decode_over_denoise": med_dec / med_den,
            "problems": sorted({p for r in rs for p in once_per_frame(r)}),
        }
    lo, hi = str(min(steps)), str(max(steps))
    return {
        "checkpoint": str(wm),
        "action_dim": ACTION_DIM,
        "context_frames": args.context_frames,
        "video_frame_actions": args.actions,
        "steps": steps,
        "repeats": args.repeats,
        "runs": {str(s): rs for s, rs in runs.items()},
        "summary": summary,
        "decode_growth_with_steps": summary[hi]["decode_seconds_per_latent_frame"]
        / summary[lo]["decode_seconds_per_latent_frame"],
        "denoise_growth_with_steps": summary[hi]["denoise_seconds_per_latent_frame"]
        / summary[lo]["denoise_seconds_per_latent_frame"],
        "decode_once_per_frame": not any(v["problems"] for v in summary.values()),
    }


# ---- main ---------------------------------------------------------------------------------------


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _defaults(args) -> None:
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.actions % 4:
        raise SystemExit(f"--actions must be a multiple of 4 (video frames per Wan latent frame), got {args.actions}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run, not a measurement)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--episodes", type=int, default=None, help="toy episodes to encode (default 8; quick 2)")
    ap.add_argument("--frames", type=int, default=None, help="frames per episode, 1 + 4k (default 17; quick 9)")
    ap.add_argument("--size", type=int, default=None, help="frame height = width in pixels (default 64; quick 32)")
    ap.add_argument("--batch-size", type=int, default=1, help="encode --batch-size (default 1, the CLI's)")
    ap.add_argument("--encode-repeats", type=int, default=None, help="timed encode_clip passes (default 3)")
    ap.add_argument("--context-frames", type=int, default=5, help="pixel context frames (5: 2 latent frames)")
    ap.add_argument("--actions", type=int, default=None, help="video-frame actions, a multiple of 4 (default 32)")
    ap.add_argument("--steps", default=None, help="comma-separated sampler steps (default 4,10; quick 2,4)")
    ap.add_argument("--repeats", type=int, default=None, help="rollouts per step count (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-image-vae", action="store_true", help="skip the AutoencoderKL comparison")
    ap.add_argument("--out", type=Path, default=None, help="results file (default results/latent_path[.quick].json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default benchmarks/_work/latent_path)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--child-encode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_encode:
        src, out, vae, device = json.loads(args.child_encode)
        print(json.dumps(encode_child(src, out, vae, device, args.batch_size, args.encode_repeats or 1)))
        return 0
    _defaults(args)
    from causalize import fs
    from causalize.testing.episodes import write_toy_episodes
    from causalize.testing.pipelines import build_tiny_pipeline, tiny_vae

    work = args.work or WORK / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        pipe = build_tiny_pipeline("wan", work / "wan-pipe")
        src = write_toy_episodes(work / "episodes", episodes=args.episodes, frames=args.frames, size=args.size)
        vaes = {"wan": pipe}
        if not args.no_image_vae:
            tiny_vae("unet3d").save_pretrained(work / "image-vae", safe_serialization=True)
            vaes["image"] = work / "image-vae"
        print(f"encode: {args.episodes} episodes x {args.frames} frames x {args.size}px", file=sys.stderr)
        encode = {name: run_encode(name, src, vae, work, args) for name, vae in vaes.items()}
        print(f"rollout: steps {args.steps}, {args.actions} video-frame actions", file=sys.stderr)
        rollout = run_rollouts(pipe, Path(encode["wan"]["latents"]), src, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    enc_rows = [
        [
            f"{r['vae_class']} ({r['parameters'] / 1e3:.0f}k params)",
            f"{r['video_frames']} -> {r['latent_frames']}",
            f"{r['end_to_end_frames_per_second']:.1f}",
            f"{r['encode_clip_frames_per_second']:.1f}",
            _mib(r["peak_rss_bytes"]),
            _mib(r["encode_rss_growth_bytes"]),
            _mib(r["cuda_peak_memory_bytes"]),
        ]
        for r in encode.values()
    ]
    print(
        table(
            [
                "VAE",
                "frames -> latent frames",
                "end-to-end frames/s",
                "encode_clip frames/s",
                "peak RSS MiB (process)",
                "RSS growth in encode MiB",
                "CUDA peak MiB",
            ],
            enc_rows,
        )
    )
    rows = []
    for s, v in rollout["summary"].items():
        r0 = rollout["runs"][s][0]
        ms = {k: 1e3 * v[f"{k}_seconds_per_latent_frame"] for k in ("denoise", "decode")}
        ms_mean = {k: 1e3 * v[f"{k}_seconds_per_latent_frame_mean"] for k in ("denoise", "decode")}
        rows.append(
            [
                s,
                r0["generated_latent_frames"],
                f"{ms['denoise']:.2f} ({ms_mean['denoise']:.2f})",
                f"{ms['decode']:.2f} ({ms_mean['decode']:.2f})",
                f"{v['decode_over_denoise']:.2f}",
                f"{r0['decode_calls']} = {r0['context_latent_frames']} + {r0['generated_latent_frames']}",
                r0["counted"]["decoder_forwards"],
                r0["counted"]["whole_clip_decodes"],
            ]
        )
    print(
        table(
            [
                "steps",
                "generated latent frames",
                "denoise ms/frame median (mean)",
                "decode ms/frame median (mean)",
                "decode/denoise",
                "decode calls (ctx + gen)",
                "decoder forwards",
                "whole-clip decodes",
            ],
            rows,
        )
    )
    ro = rollout
    print(
        f"from {min(ro['steps'])} to {max(ro['steps'])} steps (medians): "
        f"denoise x{ro['denoise_growth_with_steps']:.2f}, decode x{ro['decode_growth_with_steps']:.2f}; "
        f"each latent frame decoded once: {ro['decode_once_per_frame']}"
    )
    info = machine_info()
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "device": args.device,
        "settings": {
            k: getattr(args, k)
            for k in ("episodes", "frames", "size", "batch_size", "encode_repeats", "context_frames", "actions")
        }
        | {"steps": rollout["steps"], "repeats": args.repeats, "threads": torch.get_num_threads()},
        "memory_measured": (
            "CUDA: torch.cuda.max_memory_allocated over encode_episodes (cuda_peak_memory_bytes). CPU: peak_rss_bytes "
            "is the peak RSS (VmHWM) of the child process that ran encode_episodes (imports, VAE and encode); "
            "encode_rss_growth_bytes is VmHWM minus VmRSS after resetting the peak just before encode_episodes "
            "(default allocator)"
        ),
        "encode": encode,
        "rollout": rollout,
        "wall_seconds": time.perf_counter() - t_start,
        "load_average_at_start": load_start,
        "machine": info,
    }
    print(machine_line(info), file=sys.stderr)
    path = args.out or RESULTS / f"{NAME}{'.quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # record_text rather than fs.write_json: a measurement may be NaN or infinite, and is recorded as such
    fs.write_text(path, record_text(_rounded(payload, 6)), overwrite=True)
    print(f"wrote {path}", file=sys.stderr)
    if not rollout["decode_once_per_frame"]:
        problems = {s: v["problems"] for s, v in rollout["summary"].items() if v["problems"]}
        print(f"decoding is not once per latent frame: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
