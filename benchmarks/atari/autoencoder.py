"""The study's own autoencoder (issue 17): the stand-in for a pipeline's VAE in the latent study.

A pixel-space world model at 64×64 costs ~2.3 s per training step on the 2-core machine, so two
CPU hours buy a few hundred steps: the models learned the scene, not the game. A real pipeline
diffuses in the latent space of its VAE; the study does the same with a small diffusers
``AutoencoderKL`` (an image autoencoder, 4× spatial compression, one latent frame per video
frame) that it trains itself, then encodes its datasets with ``causalize encode``'s library
function and trains, rolls out and decodes through ``causalize.latents``, the path users take.

Training: L1 + MSE reconstruction of the posterior mode (no KL term and no sampling: the diffusion
model is trained on the mode, as ``causalize encode`` stores it), each pixel weighted
``1 + foreground_weight`` where it differs from its frame's median colour (the background) by more
than 0.1 in [-1, 1] units. Atari objects are a few pixels on a flat background: unweighted, a
1,000-step autoencoder reached 33.7 dB on Pong test frames yet drew the agent's paddle so faintly
that the detector found it in 0.2% of them; weighted ×21, 63% at the same PSNR. The frames are the action-free
clips plus the held-out game's *training* frames (no actions; a pipeline's VAE is trained on a
broad image corpus that covers the target's appearance; the test episodes are never seen). After
training, ``shift_factor`` / ``scaling_factor`` are set from the latents' mean and standard
deviation so that the diffusion model sees unit-variance latents (``causalize.latents`` applies
them). The reconstruction of the held-out test frames (PSNR, and the paddle detector on the
reconstructions) is the reference for every latent model: what predicting the encoder's own
latents would score.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.atari import control
from benchmarks.atari.data import load_episode
from causalize.episodes import list_episodes

__all__ = [
    "MODEL_DIR",
    "SUMMARY_FILE",
    "build_autoencoder",
    "foreground",
    "load_frames",
    "reconstruction_check",
    "train_autoencoder",
]

MODEL_DIR = "vae"
SUMMARY_FILE = "autoencoder.json"

Log = Callable[[str], None]
Progress = Callable[[int, int, float], None]


def build_autoencoder(cfg: dict[str, Any], seed: int) -> Any:
    """An ``AutoencoderKL`` of ``len(block_out_channels) - 1`` spatial halvings, RGB in and out."""
    from diffusers import AutoencoderKL

    levels = len(cfg["block_out_channels"])
    torch.manual_seed(int(seed))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg["block_out_channels"]),
        layers_per_block=int(cfg["layers_per_block"]),
        latent_channels=int(cfg["latent_channels"]),
        norm_num_groups=int(cfg["norm_num_groups"]),
        sample_size=64,
    )


def load_frames(roots: Sequence[Path]) -> np.ndarray:
    """Every frame of every episode of the datasets, uint8 (N, H, W, 3)."""
    return np.concatenate([load_episode(r, e)["frames"] for r in roots for e in list_episodes(r)])


def _signed(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def _latent_stats(vae: Any, x: torch.Tensor, device: str, chunk: int = 256) -> tuple[float, float]:
    zs = [vae.encode(x[i : i + chunk].to(device)).latent_dist.mode().float().cpu() for i in range(0, len(x), chunk)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


@torch.no_grad()
def reconstruction_check(vae: Any, frames: np.ndarray, device: str, chunk: int = 256) -> dict[str, Any]:
    """Encode → decode of real frames: PSNR (dB, over [0, 1] pixels) and, for Pong, the paddle
    detector on the reconstructions against the real frames (a latent model's reference)."""
    recon = []
    for i in range(0, len(frames), chunk):
        x = _signed(frames[i : i + chunk]).to(device)
        recon.append(_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample.cpu()))
    rec = np.concatenate(recon)
    mse = ((rec.astype(np.float64) - frames.astype(np.float64)) / 255.0) ** 2
    psnr = 10 * np.log10(1.0 / np.maximum(mse.mean(axis=(1, 2, 3)), 1e-10))
    y_real, y_rec = control.detect_paddle(frames), control.detect_paddle(rec)
    seen = ~np.isnan(y_real)
    found = seen & ~np.isnan(y_rec)
    return {
        "frames": int(len(frames)),
        "psnr": float(np.minimum(psnr, 100.0).mean()),
        "paddle_found": float(found.sum() / max(seen.sum(), 1)),
        "paddle_error_px": float(np.abs(y_rec[found] - y_real[found]).mean()) if found.any() else None,
    }


def foreground(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel of ``x`` (B, 3, H, W) in [-1, 1] differs from its frame's median colour by more
    than ``threshold`` in some channel, else 0; (B, 1, H, W)."""
    background = x.flatten(2).median(dim=2).values[..., None, None]
    return ((x - background).abs().amax(1, keepdim=True) > threshold).to(x.dtype)


def train_autoencoder(
    train_roots: Sequence[Path],
    check_root: Path,
    out: Path,
    cfg: dict[str, Any],
    seed: int,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on every frame of ``train_roots``, set the latent normalisation, save to
    ``out/vae`` and return the summary (with the reconstruction check on ``check_root``)."""
    t0 = time.perf_counter()
    x = _signed(load_frames(train_roots))
    vae = build_autoencoder(cfg, seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=float(cfg["lr"]), weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    steps, batch = int(cfg["steps"]), int(cfg["batch_size"])
    losses: list[float] = []
    vae.train()
    for step in range(1, steps + 1):
        lr = float(cfg["lr"]) * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)].to(device)
        rec = vae.decode(vae.encode(xb).latent_dist.mode()).sample
        weight = 1.0 + float(cfg["foreground_weight"]) * foreground(xb)
        loss = (weight * (rec - xb).abs()).mean() + (weight * (rec - xb).pow(2)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, steps, float(np.mean(losses[-20:])))
    vae.eval()
    mean, std = _latent_stats(vae, x, device)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    vae.save_pretrained(out / MODEL_DIR, safe_serialization=True)
    check_frames = load_frames([check_root])
    summary = {
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_frames": int(len(x)),
        "steps": steps,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "latent_mean": mean,
        "latent_std": std,
        "reconstruction": reconstruction_check(vae, check_frames, device),
        "seconds": time.perf_counter() - t0,
        "seconds_per_step": None,
    }
    summary["seconds_per_step"] = summary["seconds"] / max(steps, 1)
    return summary
