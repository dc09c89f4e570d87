"""The patch space (issue 17): 64×64 RGB frames as 16×16 grids of 4×4-pixel patches, 48 channels.

The study's learned autoencoder (``benchmarks.atari.autoencoder``) compresses 12× and, trained
within the CPU budget, drops Pong's agent paddle (1–2 pixels wide at 64×64) from ~42 % of its
reconstructions: the diffusion model then cannot learn what the actions do, because the thing
they move is missing from its inputs. One-step predictions of the latent models moved by
0.001 (rms, unit-variance latents) between opposite actions against 0.05 between two pasts.

The patch space keeps every pixel: ``pixel_unshuffle`` by 4 (what a DiT's patch embedding does
before its first linear layer), so the world model works on the same 16×16 grid as the latent
study, at the same cost per step, and the paddle is always in its input. It is a pixel model,
not a compression: nothing here is learned and decoding is exact. The only setting is a per-colour
shift and scale, measured on the action-free pretraining clips, so that the denoiser sees
roughly unit-variance inputs (as a VAE's ``shift_factor`` / ``scaling_factor`` provide); Pong's
flat background makes raw [-1, 1] pixels a low-variance signal under unit-variance noise.

Datasets are written in the episode format as ``latents`` of shape (48, 16, 16) with the
transform recorded under ``"patches"`` in dataset.json, so the trainer and the rollout read
them like any latent dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.atari.data import load_episode
from causalize import fs
from causalize.episodes import create_dataset, list_episodes, read_info, write_episode

__all__ = ["PATCH", "decode", "encode", "encode_dataset", "measure_norm", "read_norm"]

#: Pixels per patch side.
PATCH = 4
#: The dataset.json field that records the transform.
FIELD = "patches"


def measure_norm(root: str | os.PathLike, patch: int = PATCH) -> dict[str, Any]:
    """Per-colour mean and standard deviation of the frames of the pixel dataset ``root`` in [-1, 1]."""
    total, sq, count = np.zeros(3), np.zeros(3), 0
    for e in list_episodes(root):
        x = load_episode(root, e)["frames"].reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
        total += x.sum(0)
        sq += (x * x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise ValueError(f"{root} holds no frames")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
    return {"size": int(patch), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _norm_tensors(norm: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 3, 1, 1)
    mean = torch.tensor(norm["mean"], dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(norm["std"], dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def encode(frames: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """uint8 frames (T, H, W, 3) → float32 patches (T, 3·p², H/p, W/p), normalised per colour."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)
    mean, std = _norm_tensors(norm, x)
    return torch.nn.functional.pixel_unshuffle((x - mean) / std, norm["size"]).numpy()


def decode(z: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """Patches (N, 3·p², T, h, w) in model space → pixels (N, 3, T, h·p, w·p) in [-1, 1] (not clamped)."""
    n, _, t, h, w = z.shape
    flat = z.movedim(2, 1).reshape(n * t, -1, h, w)
    x = torch.nn.functional.pixel_shuffle(flat, norm["size"])
    mean, std = _norm_tensors(norm, x)
    x = x * std + mean
    return x.reshape(n, t, 3, h * norm["size"], w * norm["size"]).movedim(1, 2)


def read_norm(root: str | os.PathLike) -> dict[str, Any]:
    """The transform a patch dataset was written with."""
    norm = read_info(root).extra_fields.get(FIELD)
    if not norm:
        raise ValueError(f"{root} is not a patch dataset (no {FIELD!r} in dataset.json)")
    return norm


def encode_dataset(src: str | os.PathLike, dst: str | os.PathLike, norm: dict[str, Any]) -> dict[str, Any]:
    """Write the pixel dataset ``src`` as the patch dataset ``dst`` (same episodes, actions and
    extras). Written in a temporary sibling and renamed into place, so ``dst`` appears complete
    or not at all; an existing ``dst`` is refused."""
    info = read_info(src)
    h, w, c = info.shape
    p = norm["size"]
    if h % p or w % p:
        raise ValueError(f"{src}: frames of {h}×{w} do not split into {p}×{p} patches")
    frames = 0
    with fs.new_directory(Path(dst)) as tmp:
        create_dataset(
            tmp,
            info.action_space.to_json(),
            frame_shape=(c * p * p, h // p, w // p),
            kind="latents",
            extras=info.extras,
            fps=info.fps,
            source={"patches_of": str(src), "source": info.source},
            extra={FIELD: norm},
        )
        for e in list_episodes(src):
            ep = load_episode(src, e)
            extras = {k: ep[k] for k in info.extras}
            write_episode(tmp, e, actions=ep["actions"], latents=encode(ep["frames"], norm), **extras)
            frames += ep["frames"].shape[0]
    return {"episodes": len(list_episodes(dst)), "frames": frames}
