#!/usr/bin/env python
"""What does a Diffusion-Forcing training step cost next to a plain diffusion step?

One converted UNet3D world model (frame-conditioning + a continuous action adapter), one fixed
batch of random latents and actions, and three training steps on it, each a full optimizer step
(zero_grad, loss, backward, grad clip 0.5, AdamW):

  diffusion-forcing  the trainer's step (causalize.training.trainer.compute_loss) with
                     timestep_mode="independent": a noise level per frame, per-frame timestep
                     embeddings and action embeddings through WorldModel, action dropout 0.2
  shared-level       the same trainer step with timestep_mode="shared" (one level per sample,
                     still through the per-frame conditioning path)
  plain              plain video diffusion on the same model: one noise level per sample, the
                     diffusers forward with its own per-sample timestep, no actions (the frame
                     context is empty, so the conditioning hooks do nothing)

Each variant has its own copy of the model and of its AdamW state. Timing: after 2 warm-up steps
per variant, --repeats rounds in a rotated order (a b c / b c a / c a b ...), each round
--steps timed steps per variant; a variant's time is the median over all its timed steps;
samples/s = batch / that median. Ratios are diffusion-forcing / plain and shared-level / plain,
of the medians (and of the minima, less sensitive to other load on a shared machine).

Peak memory: on a GPU, torch.cuda.max_memory_allocated over a timed step, minus the memory
allocated just before it (median over steps), in the same alternating run. On a CPU, a fresh
child process per variant (run --mem-repeats times, rotated): it builds the model and batch, warms
up 2 steps, resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs 2 steps and
reports VmHWM − VmRSS-at-reset ("step peak") and VmHWM itself; medians over repeats. The child
runs with MALLOC_MMAP_THRESHOLD_=65536 so that freed activations leave the RSS.

Usage: python benchmarks/train_step.py [--quick] [--repeats N] [--steps N] [--threads N] [--device cpu|cuda]
Writes benchmarks/results/train_step.json (train_step.quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, table, write_json

NAME = "train_step"
VARIANTS = ("diffusion-forcing", "shared-level", "plain")
ACTION_DIM = 3
CONFIGS = {
    # 7.1M parameters; batch 2 × 8 frames of 4×32×32 latents (a 256×256 video's SD latents). Spatial
    # attention at 16×16 and 8×8 (none at 32×32, which would dominate the CPU time); temporal
    # attention (causal, over the 8 frames) in every cross-attention block and in transformer_in.
    "full": dict(
        model=dict(
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            cross_attention_dim=64,
            down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
            attention_head_dim=8,
            norm_num_groups=16,
            in_channels=4,
            out_channels=4,
            sample_size=32,
        ),
        batch=2,
        frames=8,
        size=32,
    ),
    "quick": dict(
        model=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            attention_head_dim=4,
            norm_num_groups=8,
            in_channels=4,
            out_channels=4,
            sample_size=16,
        ),
        batch=2,
        frames=4,
        size=16,
    ),
}


# ---------------------------------------------------------------------------------------- setup


def build(cfg: dict[str, Any], device: str):
    """(world model, batch dict, model kwargs) for one config, deterministic."""
    import torch
    from diffusers import UNet3DConditionModel

    from causalize.api import convert_model
    from causalize.plugin_manager import registries
    from causalize.training.trainer import conditioning_kwargs
    from causalize.world_model import WorldModel

    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    model = UNet3DConditionModel(**cfg["model"])
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={ACTION_DIM}}}")
    torch.nn.init.normal_(model.causalize_action_encoder.out[-1].weight, std=0.02)  # as if partly trained
    wm = WorldModel(model, plan).to(device).train()
    g = torch.Generator().manual_seed(1)
    b, t, s = cfg["batch"], cfg["frames"], cfg["size"]
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, 0] = False
    batch = {
        "x0": (torch.rand(b, 4, t, s, s, generator=g) * 2 - 1).to(device),  # native layout (B, C, T, H, W)
        "actions": torch.randn(b, t, ACTION_DIM, generator=g).to(device),
        "action_mask": mask.to(device),
    }
    kwargs = conditioning_kwargs(plan, wm.model, b, t, device=device)
    return wm, batch, kwargs


class Runner:
    """One variant: its own model copy, AdamW state and step function."""

    def __init__(self, variant: str, wm, batch, kwargs, device: str):
        import torch

        from causalize.noise import NoiseSchedule

        self.variant, self.batch, self.kwargs, self.device = variant, batch, kwargs, device
        self.wm = copy.deepcopy(wm)
        self.params = [p for p in self.wm.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.schedule = NoiseSchedule.from_config()
        self.step_index = 0

    def loss(self, gen):
        from causalize.training.objective import (
            diffusion_forcing_loss,
            sample_frame_timesteps,
        )
        from causalize.training.trainer import compute_loss

        b = self.batch
        if self.variant != "plain":
            mode = "independent" if self.variant == "diffusion-forcing" else "shared"
            loss, _, _ = compute_loss(
                self.wm,
                b["x0"],
                b["actions"],
                b["action_mask"],
                schedule=self.schedule,
                frame_axis=2,
                generator=gen,
                model_kwargs=self.kwargs,
                timestep_mode=mode,
                action_dropout=0.2,
            )
            return loss
        import torch

        x0 = b["x0"]
        k = sample_frame_timesteps(x0.shape[0], x0.shape[2], 1000, gen, x0.device, mode="shared")
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_k = self.schedule.q_sample(x0, noise, k, 2)
        plan = self.wm.plan
        out = plan.forward(self.wm.model, {"sample": x_k, "timestep": k[:, 0], **self.kwargs})
        return diffusion_forcing_loss(out, self.schedule.target(x0, noise, k, "v", 2), 2)

    def step(self) -> float:
        import torch

        from causalize.training.trainer import step_generator

        self.step_index += 1
        gen = step_generator(0, self.step_index, device=self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.5)
        self.opt.step()
        return float(loss.detach())


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- measuring


def time_variants(cfg, device: str, repeats: int, steps: int) -> dict[str, dict[str, Any]]:
    import torch

    wm, batch, kwargs = build(cfg, device)
    runners = {v: Runner(v, wm, batch, kwargs, device) for v in VARIANTS}
    del wm
    for r in runners.values():  # warm-up (allocator, AdamW state)
        r.step()
        r.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    mem: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for rep in range(repeats):
        rot = order[rep % len(order) :] + order[: rep % len(order)]
        for v in rot:
            for _ in range(steps):
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                _sync(device)
                t0 = time.perf_counter()
                losses[v].append(runners[v].step())
                _sync(device)
                times[v].append(time.perf_counter() - t0)
                if device.startswith("cuda"):
                    mem[v].append((torch.cuda.max_memory_allocated() - base) / 2**20)
    out = {}
    for v in VARIANTS:
        med = statistics.median(times[v])
        out[v] = {
            "seconds_per_step_median": med,
            "seconds_per_step_min": min(times[v]),
            "seconds_per_step_max": max(times[v]),
            "samples_per_second": cfg["batch"] / med,
            "timed_steps": len(times[v]),
            "seconds_per_step_all": times[v],
            "mean_loss": statistics.fmean(losses[v]),
        }
        if mem[v]:
            out[v]["step_peak_mib"] = statistics.median(mem[v])
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, config: str) -> None:
    """Peak RSS of two training steps of one variant in this fresh process (CPU)."""
    cfg = CONFIGS[config]
    wm, batch, kwargs = build(cfg, "cpu")
    runner = Runner(variant, wm, batch, kwargs, "cpu")
    del wm
    runner.step()
    runner.step()
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    rss0 = _status_kib("VmRSS")
    runner.step()
    runner.step()
    hwm = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "variant": variant,
                "rss_before_mib": rss0 / 1024,
                "peak_rss_mib": hwm / 1024,
                "step_peak_mib": (hwm - rss0) / 1024 if reset else None,
                "peak_reset": reset,
            }
        )
    )


def cpu_memory(config: str, repeats: int, threads: int | None) -> dict[str, dict[str, Any]]:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    env = dict(os.environ)
    # Tensors above 64 KiB are mmapped and handed back to the kernel when freed, so that RSS falls
    # after a step and the next step's peak is its own (glibc would otherwise keep freed heap).
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    order = list(VARIANTS)
    for rep in range(repeats):
        for v in order[rep % 3 :] + order[: rep % 3]:
            cmd = [sys.executable, __file__, "--child", v, "--config", config] + (
                ["--threads", str(threads)] if threads else []
            )
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
    out = {}
    for v, rs in runs.items():
        peaks = [r["step_peak_mib"] for r in rs if r["step_peak_mib"] is not None]
        out[v] = {
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            "rss_before_step_mib": statistics.median(r["rss_before_mib"] for r in rs),
            "step_peak_mib": statistics.median(peaks) if peaks else None,
            "memory_runs": len(rs),
        }
    return out


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 5; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 3; quick 2)")
    ap.add_argument(
        "--mem-repeats", type=int, default=None, help="CPU memory child processes per variant (default 2; quick 1)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.config)
        return
    config = "quick" if args.quick else "full"
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 3)
    mem_repeats = args.mem_repeats or (1 if args.quick else 2)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CONFIGS[config]

    info = machine_info()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    results = time_variants(cfg, device, repeats, steps)
    if not device.startswith("cuda"):
        for v, m in cpu_memory(config, mem_repeats, args.threads).items():
            results[v].update(m)
    wall = time.perf_counter() - t0

    wm, _, _ = build(cfg, "cpu")
    n_params = sum(p.numel() for p in wm.parameters())
    plain = results["plain"]
    ratios = {
        f"{v}/plain": {
            "time": results[v]["seconds_per_step_median"] / plain["seconds_per_step_median"],
            "time_min": results[v]["seconds_per_step_min"] / plain["seconds_per_step_min"],
            "samples_per_second": results[v]["samples_per_second"] / plain["samples_per_second"],
            **(
                {"step_peak_memory": results[v]["step_peak_mib"] / plain["step_peak_mib"]}
                if results[v].get("step_peak_mib") and plain.get("step_peak_mib")
                else {}
            ),
        }
        for v in ("diffusion-forcing", "shared-level")
    }
    mem_head = "step peak MiB" + (" (CUDA alloc)" if device.startswith("cuda") else " (RSS)")
    rows = []
    for v in VARIANTS:
        r = results[v]
        rows.append(
            [
                v,
                f"{r['seconds_per_step_median'] * 1000:.0f}",
                f"{r['seconds_per_step_min'] * 1000:.0f}-{r['seconds_per_step_max'] * 1000:.0f}",
                f"{r['samples_per_second']:.2f}",
                "-" if r.get("step_peak_mib") is None else f"{r['step_peak_mib']:.0f}",
                "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}",
                "1.00" if v == "plain" else f"{ratios[f'{v}/plain']['time']:.2f}",
            ]
        )
    headers = ["variant", "ms/step (median)", "min-max", "samples/s", mem_head, "process peak RSS MiB", "time / plain"]
    print(
        f"train_step ({config}): UNet3D world model, {n_params:,} parameters, batch {cfg['batch']} x {cfg['frames']} frames "
        f"of 4x{cfg['size']}x{cfg['size']} latents, action_dim {ACTION_DIM}, device {device}"
    )
    print(f"{repeats} rounds x {steps} timed steps per variant (rotated order), medians; wall {wall:.0f}s")
    print(table(headers, rows))
    for k, r in ratios.items():
        print(
            f"{k}: time x{r['time']:.3f} (median), x{r['time_min']:.3f} (min); samples/s x{r['samples_per_second']:.3f}"
            + (f", step peak memory x{r['step_peak_memory']:.3f}" if "step_peak_memory" in r else "")
        )
    print(machine_line(info))
    path = write_json(
        NAME + (".quick" if args.quick else ""),
        {
            "benchmark": NAME,
            "config": config,
            "device": device,
            "model": {
                "class": "UNet3DConditionModel",
                "config": cfg["model"],
                "parameters": n_params,
                "action_dim": ACTION_DIM,
            },
            "batch": cfg["batch"],
            "frames": cfg["frames"],
            "latent_size": cfg["size"],
            "repeats": repeats,
            "steps_per_repeat": steps,
            "memory_repeats": None if device.startswith("cuda") else mem_repeats,
            "results": results,
            "ratios": ratios,
            "wall_seconds": wall,
            "machine": info,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
