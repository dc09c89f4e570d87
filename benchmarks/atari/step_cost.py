"""Training steps per second of the Atari study's scales: pixel, latent and patch spaces (issue 17).

    python -m benchmarks.atari.step_cost [--scale cpu] [--backbone unet3d|wan] [--threads 2] [--repeats 5] [--json PATH]

Times, with random inputs, one optimiser step of the scale's bidirectional model (the UNet3D, or
the Wan DiT with ``--backbone wan``) at the
pretraining and at the fine-tuning shapes (batch × window; pixel: 64×64 RGB, latent: the
autoencoder's 16×16×4, patch: 16×16×48) and, for the latent space, one autoencoder step. The first step of each is
a warm-up; the table gives the median of the others. It compares the spaces' cost: the study's
own steps cost more (the fine-tuning trainer runs the converted model with its action adapter and
per-frame noise levels, and loads data), and the study records their measured times. Whether the
steps are enough to learn the game is the study's question.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import record_text
from benchmarks.atari import autoencoder as ae
from benchmarks.atari import pretrain as pt
from benchmarks.atari.scales import model_input, resolve_config


def _median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _diffusion_step(cfg: dict[str, Any], channels: int, size: int, batch: int, window: int) -> Callable[[], None]:
    model = pt.build_model(cfg["model"], channels, size, 0, cfg["backbone"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, window, size, size)
    width = cfg["model"].get("cross_attention_dim") or cfg["model"]["text_dim"]  # UNet3D / Wan
    ehs = torch.zeros(batch, 1, width)

    def step() -> None:
        k = torch.randint(0, 1000, (batch,))
        out = model(x, k, encoder_hidden_states=ehs).sample
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _autoencoder_step(cfg: dict[str, Any], size: int) -> Callable[[], None]:
    vae = ae.build_autoencoder(cfg["latent"], 0)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(int(cfg["latent"]["batch_size"]), 3, size, size) * 2 - 1

    def step() -> None:
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        (rec - x).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(scale: str, repeats: int, backbone: str = "unet3d") -> list[dict[str, Any]]:
    rows = []
    for space in ("pixel", "latent", "patch"):
        cfg = resolve_config(scale, backbone=backbone, space=space)
        channels, grid = model_input(cfg)
        if space == "latent":
            sec = _median_seconds(_autoencoder_step(cfg, int(cfg["data"]["size"])), repeats)
            rows.append(_row(space, "autoencoder", cfg["latent"]["batch_size"], 1, grid, sec, cfg["latent"]["steps"]))
        for stage in ("pretrain", "finetune"):
            p = cfg[stage]
            sec = _median_seconds(_diffusion_step(cfg, channels, grid, p["batch_size"], p["window"]), repeats)
            rows.append(_row(space, stage, p["batch_size"], p["window"], grid, sec, p["steps"]))
    return rows


def _row(space: str, stage: str, batch: int, window: int, grid: int, sec: float, steps: int) -> dict[str, Any]:
    return {
        "space": space,
        "stage": stage,
        "batch": f"{batch} × {window}",
        "model input": f"{grid}×{grid}",
        "s/step": round(sec, 3),
        "steps/s": round(1.0 / sec, 2),
        "scale steps": int(steps),
        "min at scale": round(sec * steps / 60.0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.step_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", help="the study scale whose shapes are timed (default cpu)")
    p.add_argument("--backbone", default="unet3d", choices=("unet3d", "wan"), help="the model timed (default unet3d)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the cpu scale's)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--json", default=None, help="write the rows and the machine here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = measure(args.scale, args.repeats, args.backbone)
    from benchmarks._common import machine_info
    from benchmarks.atari.report import write_markdown_table

    print(write_markdown_table({f"{r['space']} {r['stage']}": r for r in rows}, row_header="what"))
    if args.json:
        doc = {
            "scale": args.scale,
            "backbone": args.backbone,
            "threads": args.threads,
            "repeats": args.repeats,
            "rows": rows,
        }
        doc["machine"] = machine_info()
        Path(args.json).write_text(record_text(doc), encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
