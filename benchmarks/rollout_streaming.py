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
  compiled    (--compile MODE) streaming with compiled current-frame steps (RolloutConfig.compile,
              causalize.rollout.compiled); one untimed rollout first compiles, so the timed
              frames measure the steady state, not the compilation

All run S steps of DDIM with causal action guidance (two branches batched in one forward) unless
--no-guidance. Timing: per strategy and repeat, --frames generated frames after one warm-up frame
(timed together, the device synchronised), the median over repeats of seconds per frame; the
strategies alternate (full, streaming, streaming, full, ...) --repeats times.
The ideal speed-up is the ratio of frame-passes (frames pushed through the model per generated
frame): full 2·S·L (guided) against streaming (L−1) + 2·S, which tends to L as S grows. The
frames of the two strategies are compared (max abs difference) in the same run.

Cache memory: the bytes the KV caches (their allocated capacity) and conv buffers hold (streaming.cache_bytes).

Per-step cost (section "steps"): the model called directly, outside the sampler, to separate the
cost of one streaming step from the rollout around it: seconds per single-frame step (the current
frame of every branch against the cached L−1 history frames) against seconds per frame-pass of a
full-window forward (every branch, L frames), and the history prefill (L−1 frames). A step that
cost exactly its frame-passes would show a ratio of 1; the excess is per-call overhead (cache
copies, masks, kernel choice) or the step's larger attention span (its frame attends to all L
frames, the average frame of a full window to about half of them when masked blocks are skipped;
on CPU the dense mask computes all of them). With --compile the same step is also timed through
the compiled forward (after one untimed call that compiles it).

Models (--model): "wan" (default; a Wan DiT, full spatio-temporal attention, the compute-bound
case) or "unet3d" (a UNet3D with temporal attention and convs).

Usage: python benchmarks/rollout_streaming.py [--quick] [--model wan|unet3d] [--steps S] [--window L]
       [--frames N] [--repeats R] [--threads N] [--device cpu|cuda] [--dtype float32|bfloat16]
       [--section all|rollout|steps] [--step-repeats R] [--size N] [--no-guidance] [--tag NAME]
       [--compile MODE]
Writes benchmarks/results/rollout_streaming[.MODEL][.quick][.TAG].json.
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
        patch_size=(1, 2, 2),
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=256,
        ffn_dim=1536,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ),
    # A ModelScope-style UNet3D at 32x32 latents.
    "unet3d": dict(
        block_out_channels=(64, 128, 256),
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=64,
        attention_head_dim=32,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=32,
    ),
}
QUICK = {
    "wan": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, in_channels=4, out_channels=4),
    "unet3d": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8),
}
SIZE = {"wan": 16, "unet3d": 32}
QUICK_SIZE = {"wan": 8, "unet3d": 16}


def build(name: str, quick: bool, device: str, dtype: torch.dtype = torch.float32):
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
    return wm.to(device=device, dtype=dtype), config


def run(wm, context, actions, cfg):
    """One rollout; returns its result and the seconds per frame after the first (warm-up) frame,
    timed over all of them together with the device synchronised at both ends."""
    from causalize.rollout import RolloutSession

    session = RolloutSession(wm, cfg)
    session.reset(context)
    frames = [session.step(actions[:, 0])]
    _sync(context)
    t0 = time.perf_counter()
    frames += [session.step(actions[:, i]) for i in range(1, actions.shape[1])]
    _sync(context)
    return session.result(frames), (time.perf_counter() - t0) / max(1, actions.shape[1] - 1)


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def _timed(fn, repeats: int, cuda: bool) -> list[float]:
    """Seconds of `repeats` calls of fn after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def step_costs(wm, context: torch.Tensor, branches: int, repeats: int, compile_mode: str | None = None) -> dict:
    """Seconds of one streaming step, of one full-window forward and of the history prefill.

    The model is called directly (the sampler's calls, without its bookkeeping): history at level
    39, the current frame at level 500, `branches` copies of the current frame (guidance batches
    two) against a history cache written at batch 1. Inputs take the model's dtype."""
    from causalize.rollout.streaming import Stream
    from causalize.training.trainer import conditioning_kwargs

    plan = wm.plan
    axis = plan.layout.inputs[plan.conditioning.sample_arg]
    param = next(wm.parameters())
    device, dtype = param.device, param.dtype
    hist_frames = context.shape[axis]
    window = hist_frames + 1
    gen = torch.Generator().manual_seed(1)
    current = torch.randn(context.narrow(axis, 0, 1).shape, generator=gen).to(device=device, dtype=dtype)
    history = context.to(device=device, dtype=dtype)
    actions = torch.randn(1, window, 4, generator=gen).to(device=device, dtype=dtype)
    levels = torch.full((1, window), 39, dtype=torch.long, device=device)
    levels[:, -1] = 500

    def kwargs(batch: int, frames: int) -> dict:
        out = conditioning_kwargs(plan, wm.model, batch, frames, None, device)
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(branches, *([1] * (t.ndim - 1)))

    full_in = (rep(torch.cat([history, current], dim=axis)), rep(levels), rep(actions), kwargs(branches, window))
    step_in = (rep(current), rep(levels[:, -1:]), rep(actions[:, -1:]), kwargs(branches, 1))
    hist_in = (history, levels[:, :-1], actions[:, :-1], kwargs(1, hist_frames))
    stream = Stream.of(wm.model, plan)
    cuda = device.type == "cuda"

    def prefill():
        stream.reset()
        stream.anchor_timestep = 39
        with stream.write(hist_frames):
            wm(*hist_in[:3], **hist_in[3])

    def step():
        with stream.read():
            wm(*step_in[:3], **step_in[3])

    timings = {}
    compile_failure = None
    with torch.no_grad():
        timings["full"] = _timed(lambda: wm(*full_in[:3], **full_in[3]), repeats, cuda)
        timings["prefill"] = _timed(prefill, repeats, cuda)  # leaves the history cached for the steps
        timings["step"] = _timed(step, 4 * repeats, cuda)
        if compile_mode:
            from causalize.rollout.compiled import CompiledStep

            compiled = CompiledStep(wm.model, compile_mode, eager=stream.attention_modules())
            compiled.start_frame(("bench",))
            compiled.start_frame(("bench",))  # the same key twice: a static step

            def compiled_step():
                with stream.read():
                    compiled.run(lambda: wm(*step_in[:3], **step_in[3]))

            t0 = time.perf_counter()
            compiled_step()  # compiles
            print(f"  compiled step: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            timings["step_compiled"] = _timed(compiled_step, 4 * repeats, cuda)
            if compiled.failure:  # its times are eager ones: say so in the JSON too
                print(f"  compiled step ran eagerly: {compiled.failure}", file=sys.stderr)
            compile_failure = compiled.failure
        stream.reset()
    med = {k: statistics.median(v) for k, v in timings.items()}
    passes = {"full": branches * window, "prefill": hist_frames, "step": branches, "step_compiled": branches}
    per_pass = {k: med[k] / passes[k] for k in med}
    return {
        "seconds": med,
        "seconds_min": {k: min(v) for k, v in timings.items()},
        "seconds_all": timings,
        "frame_passes": {k: passes[k] for k in med},
        "seconds_per_frame_pass": per_pass,
        "step_vs_full_per_frame_pass": per_pass["step"] / per_pass["full"],
        "prefill_vs_full_per_frame_pass": per_pass["prefill"] / per_pass["full"],
        "compile": compile_mode,
        "compile_failure": compile_failure,
        "compiled_step_vs_eager_step": med["step"] / med["step_compiled"] if "step_compiled" in med else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and 4 steps (a smoke run, not a measurement)")
    ap.add_argument("--model", choices=sorted(MODELS), default="wan")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps S (default 10; quick 4)")
    ap.add_argument("--window", type=int, default=16, help="frames per forward L (history L-1 + current)")
    ap.add_argument("--frames", type=int, default=1, help="timed generated frames per strategy and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--step-repeats", type=int, default=5, help="timed full forwards / prefills (4x as many steps)")
    ap.add_argument("--section", choices=("all", "rollout", "steps"), default="all")
    ap.add_argument(
        "--size", type=int, default=None, help="latent height = width (default wan 16, unet3d 32; quick 8, 16)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--no-guidance", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. before / after)")
    ap.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time streaming with compiled current-frame steps (a torch.compile mode, e.g. default)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    wm, config = build(args.model, args.quick, args.device, dtype)
    size = args.size or (QUICK_SIZE if args.quick else SIZE)[args.model]
    channels = config["in_channels"]
    L = args.window
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, channels, L - 1, size, size, generator=gen).to(args.device)
    actions = torch.randn(1, args.frames + 1, 4, generator=gen).to(args.device)
    scale = 1.0 if args.no_guidance else 2.5
    branches = 1 if args.no_guidance else 2
    n_params = sum(p.numel() for p in wm.parameters())
    info = machine_info()
    payload = {
        "benchmark": "rollout_streaming",
        "quick": args.quick,
        "model": args.model,
        "config": config,
        "parameters": n_params,
        "steps": steps,
        "window": L,
        "guidance_scale": scale,
        "device": args.device,
        "dtype": args.dtype,
        "latent_size": size,
    }
    t_start = time.perf_counter()
    print(
        f"model {args.model} ({n_params / 1e6:.1f}M parameters, {args.dtype} on {args.device}), S={steps}, L={L}, "
        f"guidance s={scale}",
        file=sys.stderr,
    )
    if args.section in ("all", "rollout"):
        payload.update(rollout_section(wm, context, actions, steps, L, scale, branches, args))
    if args.section in ("all", "steps"):
        costs = step_costs(wm, context, branches, args.step_repeats, args.compile)
        sec, passes, per = costs["seconds"], costs["frame_passes"], costs["seconds_per_frame_pass"]
        rows = [
            [
                name,
                f"{1e3 * sec[key]:.2f}",
                f"{1e3 * costs['seconds_min'][key]:.2f}",
                passes[key],
                f"{1e3 * per[key]:.3f}",
                f"{per[key] / per['full']:.2f}",
            ]
            for name, key in (
                ("full-window forward", "full"),
                ("history prefill", "prefill"),
                ("streaming step", "step"),
                ("streaming step, compiled", "step_compiled"),
            )
            if key in sec
        ]
        print(
            table(
                ["call", "ms (median)", "ms (min)", "frame-passes", "ms / frame-pass", "vs full per frame-pass"], rows
            )
        )
        payload["step_costs"] = costs
    payload.update(wall_seconds=time.perf_counter() - t_start, machine=info)
    print(machine_line(info), file=sys.stderr)
    suffix = ("" if args.model == "wan" else f".{args.model}") + (".quick" if args.quick else "")
    if args.section != "all":
        suffix += f".{args.section}"
    if args.size:
        suffix += f".size{size}"
    if args.device != "cpu":
        suffix += f".{args.device}"
    if args.tag:
        suffix += f".{args.tag}"
    path = write_json(f"rollout_streaming{suffix}", payload)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def rollout_section(wm, context, actions, steps: int, L: int, scale: float, branches: int, args) -> dict:
    """Both strategies through the sampler, alternating; seconds per generated frame."""
    from causalize.rollout import RolloutConfig
    from causalize.rollout.compiled import compile_failure

    base = RolloutConfig(steps=steps, window=L, guidance_scale=scale, seed=0)
    cfgs = {"full": RolloutConfig(**{**base.to_json(), "cache": False}), "streaming": base}
    if args.compile:
        cfgs["compiled"] = RolloutConfig(**{**base.to_json(), "compile": args.compile})
        t0 = time.perf_counter()
        run(wm, context, actions[:, :2], cfgs["compiled"])  # compiles (frame 2); later sessions reuse it
        print(f"rollout: compiled streaming warmed up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    seconds: dict[str, list[float]] = {name: [] for name in cfgs}
    results = {}
    print(f"rollout: {args.frames} timed frames x {args.repeats} repeats", file=sys.stderr)
    for r in range(args.repeats):
        for name in list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]:
            res, per_frame = run(wm, context, actions, cfgs[name])
            seconds[name].append(per_frame)  # the first frame is the warm-up
            results[name] = res
            print(f"  repeat {r + 1} {name}: {[round(s, 3) for s in res.seconds_per_frame]}", file=sys.stderr)
    full, stream = results["full"], results["streaming"]
    diff = float((full.frames.float() - stream.frames.float()).abs().max())
    compiled = results.get("compiled")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    passes_full = branches * steps * L
    passes_stream = (L - 1) + branches * steps
    measured_passes = {k: r.frame_passes / actions.shape[1] for k, r in results.items()}
    speedup = med["full"] / med["streaming"]
    ideal = passes_full / passes_stream
    rows = [
        [
            "full recomputation",
            f"{med['full']:.3f}",
            f"{min(seconds['full']):.3f}",
            f"{measured_passes['full']:.0f}",
            "-",
        ],
        [
            "streaming",
            f"{med['streaming']:.3f}",
            f"{min(seconds['streaming']):.3f}",
            f"{measured_passes['streaming']:.0f}",
            f"{stream.cache_bytes / 2**20:.1f}",
        ],
    ]
    extra = {}
    if compiled is not None:
        rows.append(
            [
                f"streaming, compiled ({args.compile})",
                f"{med['compiled']:.3f}",
                f"{min(seconds['compiled']):.3f}",
                f"{measured_passes['compiled']:.0f}",
                f"{compiled.cache_bytes / 2**20:.1f}",
            ]
        )
        extra = {
            "compile": args.compile,
            "compiled_speedup_vs_full": med["full"] / med["compiled"],
            "compile_failure": compile_failure(wm.model),
            "compiled_calls": compiled.compiled_calls,
            "model_calls_compiled_run": compiled.model_calls,
            "max_abs_diff_compiled": float((full.frames.float() - compiled.frames.float()).abs().max()),
        }
    print(table(["strategy", "s/frame (median)", "s/frame (min)", "frame-passes/frame", "cache MiB"], rows))
    print(
        f"speed-up {speedup:.2f}x (ideal by frame-passes {ideal:.2f}x; -> L = {L} as S grows); "
        f"max |streaming - full| = {diff:.2e}"
        + (
            f"; compiled: {extra['compiled_speedup_vs_full']:.2f}x, "
            f"max |compiled - full| = {extra['max_abs_diff_compiled']:.2e}"
            if extra
            else ""
        )
    )
    return {
        **extra,
        "timed_frames": args.frames * args.repeats,
        "seconds_per_frame": med,
        "seconds_per_frame_min": {k: min(v) for k, v in seconds.items()},
        "seconds_all": seconds,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "frame_passes_per_frame": {"full": passes_full, "streaming": passes_stream, "measured": measured_passes},
        "cache_bytes": stream.cache_bytes,
        "max_abs_diff": diff,
    }


if __name__ == "__main__":
    raise SystemExit(main())
