#!/usr/bin/env python
"""Seconds per generated frame: exact streaming caches against full recomputation of the window.

One converted world model (frame-conditioning + a continuous action adapter, random weights with
its zero-initialised layers re-randomised), one context of L−1 frames so that the window (L
frames: L−1 history + the current one) is full from the first generated frame and slides at
every frame, the same actions and seed for both strategies:

  streaming   causalize.rollout with cache=True: per generated frame, one prefill of the L−1
              history frames (the window slid), then S denoising steps on the current frame
              alone against the per-layer caches (KV, conv buffers)
  full        cache=False, the reference strategy: every step runs the whole window

Both run S steps of DDIM with causal action guidance (two branches batched in one forward) unless
--no-guidance. Timing: per strategy, --frames generated frames after one warm-up frame, the
median seconds per frame; the strategies alternate (full, streaming, full, ...) --repeats times.
The ideal speed-up is the ratio of frame-passes (frames pushed through the model per generated
frame): full 2·S·L (guided) against streaming (L−1) + 2·S, which tends to L as S grows. The
frames of the two strategies are compared (max abs difference) in the same run.

Cache memory: the bytes held by the KV caches and conv buffers after a prefill (streaming.cache_bytes).

Models (--model): "wan" (default; a Wan DiT, full spatio-temporal attention, the compute-bound
case) or "unet3d" (a UNet3D with temporal attention and convs).

Usage: python benchmarks/rollout_streaming.py [--quick] [--model wan|unet3d] [--steps S] [--window L]
       [--frames N] [--repeats R] [--threads N] [--device cpu|cuda] [--no-guidance]
Writes benchmarks/results/rollout_streaming[.MODEL][.quick].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import machine_info, machine_line, table, write_json

MODELS = {
    # A Wan 2.1-style DiT: 4 layers of width 384 (6 heads x 64), 16 latent channels, 16x16 latents
    # with 2x2 patches = 64 tokens per frame; 1024 tokens in a 16-frame window.
    "wan": dict(
        patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=1536, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ),
    # A ModelScope-style UNet3D at 32x32 latents.
    "unet3d": dict(
        block_out_channels=(64, 128, 256), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=64, attention_head_dim=32, out_channels=4, in_channels=4, layers_per_block=1, sample_size=32,
    ),
}
QUICK = {
    "wan": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, in_channels=4, out_channels=4),
    "unet3d": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8),
}
SIZE = {"wan": 16, "unet3d": 32}
QUICK_SIZE = {"wan": 8, "unet3d": 16}


def build(name: str, quick: bool, device: str):
    from causalize.api import convert_model
    from causalize.plugin_manager import registries
    from causalize.world_model import WorldModel

    plan = registries().plans.get(name)
    config = {**MODELS[name], **(QUICK[name] if quick else {})}
    torch.manual_seed(0)
    model = plan.model_cls()(**config).eval()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=4}}")
    wm = WorldModel(model, plan)
    with torch.no_grad():
        for p in wm.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return wm.to(device), config


def run(wm, context, actions, cfg):
    from causalize.rollout import RolloutSession

    session = RolloutSession(wm, cfg)
    session.reset(context)
    frames = [session.step(actions[:, i]) for i in range(actions.shape[1])]
    if context.is_cuda:
        torch.cuda.synchronize()
    return session.result(frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and 4 steps (a smoke run, not a measurement)")
    ap.add_argument("--model", choices=sorted(MODELS), default="wan")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps S (default 10; quick 4)")
    ap.add_argument("--window", type=int, default=16, help="frames per forward L (history L-1 + current)")
    ap.add_argument("--frames", type=int, default=1, help="timed generated frames per strategy and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-guidance", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.quick else 10)
    from causalize.rollout import RolloutConfig

    wm, config = build(args.model, args.quick, args.device)
    size = (QUICK_SIZE if args.quick else SIZE)[args.model]
    channels = config["in_channels"]
    L = args.window
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, channels, L - 1, size, size, generator=gen).to(args.device)
    actions = torch.randn(1, args.frames + 1, 4, generator=gen).to(args.device)
    scale = 1.0 if args.no_guidance else 2.5
    base = RolloutConfig(steps=steps, window=L, guidance_scale=scale, seed=0)
    cfgs = {"full": RolloutConfig(**{**base.to_json(), "cache": False}), "streaming": base}
    seconds: dict[str, list[float]] = {"full": [], "streaming": []}
    results = {}
    print(f"model {args.model}, S={steps}, L={L}, guidance s={scale}, {args.frames} timed frames x {args.repeats} repeats",
          file=sys.stderr)
    t_start = time.perf_counter()
    for r in range(args.repeats):
        for name in ("full", "streaming") if r % 2 == 0 else ("streaming", "full"):
            res = run(wm, context, actions, cfgs[name])
            seconds[name] += res.seconds_per_frame[1:]  # the first frame is the warm-up
            results[name] = res
            print(f"  repeat {r + 1} {name}: {[round(s, 3) for s in res.seconds_per_frame]}", file=sys.stderr)
    full, stream = results["full"], results["streaming"]
    diff = float((full.frames - stream.frames).abs().max())
    med = {k: statistics.median(v) for k, v in seconds.items()}
    branches = 1 if args.no_guidance else 2
    passes_full = branches * steps * L
    passes_stream = (L - 1) + branches * steps
    measured_passes = {k: r.frame_passes / actions.shape[1] for k, r in results.items()}
    n_params = sum(p.numel() for p in wm.parameters())
    speedup = med["full"] / med["streaming"]
    ideal = passes_full / passes_stream
    rows = [
        ["full recomputation", f"{med['full']:.3f}", f"{min(seconds['full']):.3f}", f"{measured_passes['full']:.0f}", "-"],
        ["streaming", f"{med['streaming']:.3f}", f"{min(seconds['streaming']):.3f}", f"{measured_passes['streaming']:.0f}",
         f"{stream.cache_bytes / 2**20:.1f}"],
    ]
    print(table(["strategy", "s/frame (median)", "s/frame (min)", "frame-passes/frame", "cache MiB"], rows))
    print(f"speed-up {speedup:.2f}x (ideal by frame-passes {ideal:.2f}x; -> L = {L} as S grows); "
          f"max |streaming - full| = {diff:.2e}")
    info = machine_info()
    print(machine_line(info), file=sys.stderr)
    payload = {
        "benchmark": "rollout_streaming", "quick": args.quick, "model": args.model, "config": config,
        "parameters": n_params, "steps": steps, "window": L, "guidance_scale": scale, "timed_frames": len(seconds["full"]),
        "seconds_per_frame": {"full": med["full"], "streaming": med["streaming"]},
        "seconds_per_frame_min": {k: min(v) for k, v in seconds.items()},
        "seconds_all": seconds, "speedup": speedup, "ideal_speedup": ideal,
        "frame_passes_per_frame": {"full": passes_full, "streaming": passes_stream, "measured": measured_passes},
        "cache_bytes": stream.cache_bytes, "max_abs_diff": diff, "wall_seconds": time.perf_counter() - t_start,
        "device": args.device, "machine": info,
    }
    suffix = ("" if args.model == "wan" else f".{args.model}") + (".quick" if args.quick else "")
    path = write_json(f"rollout_streaming{suffix}", payload)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
