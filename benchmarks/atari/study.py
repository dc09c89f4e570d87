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
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.atari import autoencoder as ae_mod
from benchmarks.atari import control, patches
from benchmarks.atari import data as atari_data
from benchmarks.atari import evaluate as ev
from benchmarks.atari import pretrain as pt
from benchmarks.atari import seeds as seeds_mod
from benchmarks.atari.backbones import BACKBONES, UNET3D, WAN, backbone_of, get_backbone
from causalize import fs

__all__ = [
    "DIT_LATENT_SCALES",
    "DIT_SCALES",
    "LATENT_SCALES",
    "SCALES",
    "SPACES",
    "VARIANTS",
    "StudyError",
    "controllability",
    "default_space",
    "determinism",
    "eval_runs",
    "gif_segment",
    "linked_data",
    "main",
    "model_input",
    "read_identity",
    "replicate_variants",
    "recorded_data",
    "resolve_config",
    "run_study",
    "usable_cores",
    "variant_pipeline",
]

Log = Callable[[str], None]

BASELINE = "copy-last"
#: Latent studies: the last context frame as the autoencoder reconstructs it, repeated (the
#: trivial predictor that pays the autoencoder's loss, as every latent model does).
BASELINE_AE = "copy-last-autoencoded"
#: The autoencoder's own reconstruction of the real future frames (latent studies): a reference.
AUTOENCODER = "autoencoder"
#: Where the world models diffuse: the study autoencoder's latents, 4×4-pixel patches
#: (``benchmarks.atari.patches``: 16×16×48, lossless) or pixels (64×64 RGB).
SPACES = ("latent", "patch", "pixel")
#: Noise levels of the one-step denoising check (a fixed diagnostic, not part of a scale).
DENOISE_LEVELS = (20, 100, 300, 600, 999)
#: Noise levels of the first generated frame in the context check (own past against another's).
CONTEXT_LEVELS = (300, 700)
#: The short-horizon claim against copy-last (issue 17's target): the first generated frames.
FIRST_FRAMES = 2

#: The default (UNet3D) backbone's method and conversion variants: initial weights, weight
#: transfer of the temporal convs, causal norm or not (``backbones.UNET3D``).
MAIN = UNET3D.main
VARIANTS: dict[str, dict[str, Any]] = UNET3D.variants

_SMALL_UNET = {
    "down_block_types": ["DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
}

#: Scales. Sizes of the `cpu` scale were set from step times measured on the 2-core machine (see
#: benchmarks/atari/README.md for the measurements and the time estimate).
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "threads": 1,
        "data": {
            "games": ["Breakout", "Freeway"],
            "heldout": "Pong",
            "clips_per_game": 2,
            "clip_len": 8,
            "train_episodes": 3,
            "test_episodes": 2,
            "episode_len": 12,
            "warmup": [0, 8],
            "size": 32,
        },
        "model": {
            **_SMALL_UNET,
            "block_out_channels": [8, 8, 16],
            "norm_num_groups": 4,
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
        },
        "pretrain": {
            "window": 4,
            "stride": 4,
            "batch_size": 2,
            "steps": 2,
            "lr": 2e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "checkpoint_every": 0,
        },
        "finetune": {"window": 4, "batch_size": 2, "steps": 2, "lr": 1e-4, "log_every": 1, "checkpoint_every": 0},
        "eval": {
            "context": 2,
            "horizon": 2,
            "segments_per_episode": 1,
            "steps": 1,
            "window": 4,
            "history_noise": 20,
            "guidance": [1.0, 1.5, 2.5],
            "ablation_guidance": [1.0],
            "guidance_rescale": 0.7,
            "eta": 0.0,
            "random_main_guidance": [1.0, 2.5],
            "random_variants": ["scratch"],
            "batch_size": None,
        },
    },
    "cpu": {
        "threads": 2,
        "data": {
            "games": list(atari_data.DEFAULT_GAMES),
            "heldout": "Pong",
            "clips_per_game": 40,
            "clip_len": 16,
            "train_episodes": 32,
            "test_episodes": 10,
            "episode_len": 64,
            "warmup": [0, 200],
            "size": 64,
        },
        "model": {**_SMALL_UNET, "block_out_channels": [16, 32, 64], "attention_head_dim": 4},
        "pretrain": {
            "window": 8,
            "stride": 4,
            "batch_size": 4,
            "steps": 500,
            "lr": 1e-3,
            "warmup_steps": 50,
            "log_every": 10,
            "checkpoint_every": 100,
        },
        "finetune": {"window": 16, "batch_size": 2, "steps": 120, "lr": 5e-4, "log_every": 10, "checkpoint_every": 40},
        "eval": {
            "context": 4,
            "horizon": 12,
            "segments_per_episode": 1,
            "steps": 10,
            "window": 16,
            "history_noise": 20,
            "guidance": [1.0, 1.5, 2.5],
            "ablation_guidance": [1.0],
            "guidance_rescale": 0.7,
            "eta": 0.0,
            "random_main_guidance": [1.0, 2.5],
            "random_variants": ["scratch"],
            "batch_size": None,
        },
    },
    "gpu": {
        "threads": 4,
        "data": {
            "games": list(atari_data.DEFAULT_GAMES),
            "heldout": "Pong",
            "clips_per_game": 256,
            "clip_len": 16,
            "train_episodes": 256,
            "test_episodes": 64,
            "episode_len": 64,
            "warmup": [0, 400],
            "size": 64,
        },
        "model": {
            "block_out_channels": [64, 128, 256],
            "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
            "up_block_types": ["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
        },
        "pretrain": {
            "window": 16,
            "stride": 4,
            "batch_size": 16,
            "steps": 20000,
            "lr": 2e-4,
            "warmup_steps": 500,
            "log_every": 50,
            "checkpoint_every": 1000,
        },
        "finetune": {
            "window": 16,
            "batch_size": 16,
            "steps": 5000,
            "lr": 1e-4,
            "log_every": 50,
            "checkpoint_every": 1000,
        },
        "eval": {
            "context": 4,
            "horizon": 16,
            "segments_per_episode": 2,
            "steps": 50,
            "window": 16,
            "history_noise": 20,
            "guidance": [1.0, 1.5, 2.5],
            "ablation_guidance": [1.0, 2.5],
            "guidance_rescale": 0.7,
            "eta": 0.0,
            "random_main_guidance": [1.0, 2.5],
            "random_variants": ["scratch", "shift", "masked", "noncausal-norm"],
            "batch_size": 64,
        },
    },
}

_SMALL_WAN = {"cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64}

#: The Wan backbone (``--backbone wan``): its sections replace the scale's ``model`` and update the
#: others. 4×4 patches: 256 tokens per 64×64 frame, so full 3-D attention over 16 frames stays
#: affordable on a CPU. The cpu sizes come near the UNet3D's parameter count (1.29M against 1.65M); the DiT's
#: learning rates are not tuned (no probe was run for it).
DIT_SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": {
            **_SMALL_WAN,
            "patch_size": [1, 4, 4],
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "text_dim": 8,
            "freq_dim": 32,
            "ffn_dim": 32,
            "num_layers": 2,
        }
    },
    "cpu": {
        "model": {
            **_SMALL_WAN,
            "patch_size": [1, 4, 4],
            "num_attention_heads": 4,
            "attention_head_dim": 24,
            "text_dim": 16,
            "freq_dim": 64,
            "ffn_dim": 384,
            "num_layers": 8,
        },
        "pretrain": {"lr": 5e-4},
        "finetune": {"lr": 2e-4},
    },
    "gpu": {
        "model": {
            **_SMALL_WAN,
            "patch_size": [1, 4, 4],
            "num_attention_heads": 8,
            "attention_head_dim": 64,
            "text_dim": 64,
            "freq_dim": 256,
            "ffn_dim": 2048,
            "num_layers": 12,
        },
        "pretrain": {"lr": 1e-4},
        "finetune": {"lr": 5e-5},
        "eval": {"random_variants": ["scratch"]},
    },
}

#: The Wan DiT on a 16×16 grid (latent, patch), over :data:`DIT_SCALES`. At the gpu scale it is the
#: wide DiT whose cpu runs met the targets over 3 seeds (over 5, all but copy-last's PSNR lead on
#: the first 2 frames; 5.08M parameters, benchmarks/results/atari-wan-wide-latent-seeds), so the
#: gpu run asks whether they hold with 5× the pretraining frames; fine-tuned for as many windows
#: as those runs' 6,400 steps of 2 (800 × 16), at their learning rates (not probed at batch 16).
#: The 52.8M pixel-scale DiT would count 43.7 PFLOP here, about 29 min at 25 TFLOP/s (compute.py).
DIT_LATENT_SCALES: dict[str, dict[str, Any]] = {
    "gpu": {  # the cpu DiT with --set model.attention_head_dim=48 --set model.ffn_dim=768, as those runs
        "model": {**DIT_SCALES["cpu"]["model"], "patch_size": [1, 2, 2], "attention_head_dim": 48, "ffn_dim": 768},
        "pretrain": {"lr": 5e-4},
        "finetune": {"lr": 2e-4, "steps": 800},
    },
}


#: The latent space (``--space latent``, issue 17): the study trains its own autoencoder
#: (``benchmarks.atari.autoencoder``, 64×64 RGB → 16×16×4) on the action-free clips and the held-out
#: game's training frames, encodes every dataset with ``causalize.latents`` and trains the world
#: models on the latents (16× fewer positions: 0.29 s instead of 2.39 s per plain training step on
#: the 2-core machine, measured by ``benchmarks.atari.step_cost``, so ~8× the steps in the same time). Its sections replace the scale's ``model``
#: and update the others. Rollouts are decoded by the autoencoder and scored in pixels.
LATENT_SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "latent": {
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 4,
            "steps": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "heldout_train_frames": True,
            "foreground_weight": 20.0,
        },
        "model": {
            **_SMALL_UNET,
            "block_out_channels": [8, 8, 16],
            "norm_num_groups": 4,
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
        },
        "replicates": {"seeds": 2, "variants": ["extrapolative", "scratch"]},
    },
    "cpu": {
        "latent": {
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "steps": 4800,  # 1,200 lost the paddle in 42 % of frames, 4,800 in 4 % (README, ae_probe)
            "batch_size": 16,
            "lr": 1e-3,
            "heldout_train_frames": True,
            "foreground_weight": 20.0,
        },
        "model": {**_SMALL_UNET, "block_out_channels": [32, 64, 128], "attention_head_dim": 8},
        "pretrain": {"steps": 4000, "lr": 1e-3, "warmup_steps": 100, "log_every": 50, "checkpoint_every": 500},
        "finetune": {"steps": 800, "lr": 5e-4, "log_every": 25, "checkpoint_every": 200},
        "eval": {"segments_per_episode": 3},
        "replicates": {"seeds": 3, "variants": ["extrapolative", "shift", "masked", "scratch"]},
    },
    "gpu": {
        "latent": {  # the cpu widths at 4x the batch (64, 128, 128 would cost 2.6 of 10 PFLOP; compute.py)
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "steps": 2000,
            "batch_size": 64,
            "lr": 1e-3,
            "heldout_train_frames": True,
            "foreground_weight": 20.0,
        },
        "data": {"clips_per_game": 128, "train_episodes": 128, "test_episodes": 32},
        "model": {**_SMALL_UNET, "block_out_channels": [64, 128, 256], "attention_head_dim": 8},
        "pretrain": {
            "window": 16,
            "batch_size": 16,
            "steps": 2500,
            "lr": 5e-4,
            "warmup_steps": 100,
            "log_every": 100,
            "checkpoint_every": 1000,
        },
        "finetune": {
            "window": 16,
            "batch_size": 16,
            "steps": 400,
            "lr": 2e-4,
            "log_every": 50,
            "checkpoint_every": 250,
            # at the cpu scale only the motion-weighted loss made rollouts follow the actions, in
            # every seed from 3,200 steps of batch 2 (README, budget check); 400 x 16 is as many windows
            "motion_weight": 1.0,
        },
        "eval": {
            "segments_per_episode": 2,
            "steps": 10,
            "batch_size": 64,
            "random_variants": ["scratch"],
            "ablation_guidance": [1.0],
        },
        # the targets' variants only: all four would count 1.7 PFLOP more (compute.py), past 8 min
        "replicates": {"seeds": 3, "variants": ["extrapolative", "scratch"]},
    },
}

#: What a configuration holds when it does not say (pixel studies recorded before issue 17).
_DEFAULTS = {"space": "pixel", "latent": None, "patch": None, "replicates": {"seeds": 1, "variants": []}}

#: Fine-tuning settings every scale has at the trainer's defaults (the plain loss, one learning
#: rate) and on every recorded training episode (``episodes``: null); ``--set
#: finetune.motion_weight=1`` or ``finetune.episodes=4`` changes them. Filled into studies recorded
#: before them.
_FINETUNE_DEFAULTS = {"motion_weight": 0.0, "adapter_lr_scale": 1.0, "episodes": None}
#: The study's fine-tuning settings that are not TrainConfig fields.
_STUDY_ONLY = ("episodes",)


#: Where a study run with ``--data DIR`` finds its recordings (the tools that open a finished study
#: read it; absent when they are in OUT/data).
DATA_LINK = "data.json"


def linked_data(out: Path) -> Path | None:
    """The recordings' directory a study at ``out`` recorded in its :data:`DATA_LINK`, if any."""
    link = out / DATA_LINK
    return Path(_read_json(link)["data"]) if link.is_file() else None


def _normalised_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """A recorded study.json with the settings added since filled in at their old values."""
    cfg = ident.setdefault("config", {})
    cfg.setdefault("backbone", UNET3D.name)  # recorded before backbones existed
    for key, value in _DEFAULTS.items():  # recorded before issue 17
        cfg.setdefault(key, copy.deepcopy(value))
    if isinstance(cfg.get("finetune"), dict):
        cfg["finetune"] = {**_FINETUNE_DEFAULTS, **cfg["finetune"]}
    return ident


class StudyError(RuntimeError):
    """The study cannot run as asked (e.g. DIR holds a study with another configuration)."""


def read_identity(out: str | os.PathLike) -> dict[str, Any]:
    """The study.json of the study at ``out`` (scale, seed, resolved configuration), with settings
    added since it was recorded filled in at their old values."""
    path = Path(out) / "study.json"
    if not path.is_file():
        raise StudyError(f"{out} holds no study (no study.json)")
    return _normalised_identity(_read_json(path))


# ------------------------------------------------------------------------------------ config


def model_input(cfg: dict[str, Any]) -> tuple[int, int]:
    """Channels and grid side the diffusion model sees in the configuration's space."""
    size = int(cfg["data"]["size"])
    if cfg["space"] == "latent":
        return int(cfg["latent"]["latent_channels"]), size // 2 ** (len(cfg["latent"]["block_out_channels"]) - 1)
    if cfg["space"] == "patch":
        return 3 * int(cfg["patch"]["size"]) ** 2, size // int(cfg["patch"]["size"])
    return 3, size


def replicate_variants(cfg: dict[str, Any]) -> list[str]:
    """``replicates.variants``, refused unless every one is a variant of the backbone."""
    bb, names = backbone_of(cfg), list(cfg["replicates"]["variants"])
    if unknown := [v for v in names if v not in bb.variants]:
        raise StudyError(f"replicates.variants: {unknown} are not variants of the {bb.name} backbone")
    return names


def _set_path(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        if k not in node or not isinstance(node[k], dict):
            raise StudyError(f"--set {dotted}: no section {k!r}")
        node = node[k]
    if keys[-1] not in node:
        raise StudyError(f"--set {dotted}: no setting {keys[-1]!r} (known: {', '.join(node)})")
    node[keys[-1]] = value


def _overlay(cfg: dict[str, Any], sections: dict[str, Any]) -> None:
    """``model`` and ``latent`` replace the scale's; the other sections update it."""
    for section, values in copy.deepcopy(sections).items():
        if section in ("model", "latent") or not isinstance(cfg.get(section), dict):
            cfg[section] = values
        else:
            cfg[section].update(values)


def _overlay_dit(cfg: dict[str, Any], scale: str, space: str) -> None:
    """The Wan DiT's model and learning rates over the space's budgets. On a 16×16 grid (latent,
    patch) it patches 2×2, 64 tokens per frame (4×4 on 64×64 pixels gives 256); its replicates are
    its own variants (the UNet3D's transfer variants do not exist for it)."""
    _overlay(cfg, DIT_SCALES[scale])
    if space != "pixel":
        cfg["model"]["patch_size"] = [1, 2, 2]
        _overlay(cfg, DIT_LATENT_SCALES.get(scale, {}))
        cfg["replicates"]["variants"] = list(WAN.variants)


def default_space(backbone: str) -> str:
    """Latent for the UNet3D (issue 17); pixels for the Wan DiT, its space before issue 17 (every
    committed Wan study chose ``--space latent``; the pixel one is smoke-tested only)."""
    return "latent" if backbone == UNET3D.name else "pixel"


def resolve_config(
    scale: str, overrides: Sequence[str] = (), backbone: str = "unet3d", space: str | None = None
) -> dict[str, Any]:
    """The scale's configuration for the backbone and space (default :func:`default_space`), with
    ``section.key=JSON`` overrides applied."""
    space = space or default_space(backbone)
    if scale not in SCALES:
        raise StudyError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    if space not in SPACES:
        raise StudyError(f"unknown space {space!r}; use one of {', '.join(SPACES)}")
    try:
        get_backbone(backbone)
    except ValueError as exc:
        raise StudyError(str(exc)) from None
    cfg = {**copy.deepcopy(_DEFAULTS), **copy.deepcopy(SCALES[scale])}
    if space == "latent":
        _overlay(cfg, LATENT_SCALES[scale])
    if space == "patch":  # the latent study's 16×16 model and budgets, without its autoencoder
        _overlay(cfg, {k: v for k, v in LATENT_SCALES[scale].items() if k != "latent"})
        cfg["patch"] = {"size": patches.PATCH}
    if backbone != UNET3D.name:
        _overlay_dit(cfg, scale, space)
    cfg["backbone"], cfg["space"] = backbone, space
    cfg["finetune"] = {**_FINETUNE_DEFAULTS, **cfg["finetune"]}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise StudyError(f"--set expects section.key=value, got {item!r}")
        if key.strip() in ("space", "backbone"):
            raise StudyError(f"--set {key.strip()}: use --{key.strip()}, which also picks that setting's sections")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        _set_path(cfg, key.strip(), value)
    _check_episodes(cfg["finetune"]["episodes"], cfg["data"]["train_episodes"])  # before hours of work
    return cfg


def variant_pipeline(variant: str, backbone: str = UNET3D.name) -> str:
    """The conversion pipeline of a variant of the backbone (the frame-conditioning pass is added
    by convert)."""
    from causalize.plugin_manager import registries

    bb = get_backbone(backbone)
    try:
        return bb.pipeline(registries().plans.get(bb.plan), bb.variants[variant])
    except ValueError as exc:
        raise StudyError(str(exc)) from None


def eval_runs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rollout to evaluate: (variant, guidance scale, real or random actions)."""
    e, bb = cfg["eval"], backbone_of(cfg)
    main = bb.main
    runs = [{"variant": main, "guidance": float(s), "actions": "real"} for s in e["guidance"]]
    for v in bb.variants:
        if v != main:
            runs += [{"variant": v, "guidance": float(s), "actions": "real"} for s in e["ablation_guidance"]]
    runs += [{"variant": main, "guidance": float(s), "actions": "random"} for s in e["random_main_guidance"]]
    for v in e["random_variants"]:
        if v not in bb.variants:
            raise StudyError(
                f"eval.random_variants: {v!r} is not a variant of the {bb.name} backbone ({', '.join(bb.variants)})"
            )
        runs += [{"variant": v, "guidance": float(s), "actions": "random"} for s in e["ablation_guidance"]]
    for r in runs:
        r["name"] = run_name(r["variant"], r["guidance"], r["actions"])
    return runs


def run_name(variant: str, guidance: float, actions: str) -> str:
    return f"{variant}_s{guidance:g}_{actions}"


# ------------------------------------------------------------------------------------ helpers


def episode_subset(root: Path, episodes: int | None) -> dict[str, Any]:
    """TrainConfig fields that fine-tune on ``episodes`` of the dataset's episodes (None: all).

    Why: does pretraining pay when action-labelled data is scarce? The trainer's split
    (``causalize.episodes.split_episodes``, split seed 0 whatever the training seed) puts exactly
    round(fraction · n) episodes, chosen by a hash of their indices, on its "test" side; the study
    trains on that side, so every variant and training seed sees the same ``episodes``."""
    from causalize.episodes import list_episodes, split_episodes

    if episodes is None:
        return {"split": None}
    n = len(list_episodes(root))
    _check_episodes(episodes, n)
    if episodes == n:
        return {"split": None}
    fraction = episodes / n
    chosen = split_episodes(root, fraction)[1]
    if len(chosen) != episodes:  # the split rounds; it must not change the count
        raise StudyError(f"finetune.episodes={episodes}: the split picks {len(chosen)} of {n} episodes")
    return {"split": "test", "test_fraction": fraction}


def _check_episodes(episodes: Any, recorded: int) -> None:
    """Refuse a ``finetune.episodes`` that is not null or an integer from 1 to ``recorded``."""
    if episodes is not None and (
        isinstance(episodes, bool) or not isinstance(episodes, int) or not 1 <= episodes <= recorded
    ):
        raise StudyError(f"finetune.episodes must be an integer from 1 to {recorded} (the recorded ones) or null")


def _write_json(path: Path, obj: Any) -> None:
    """Atomic, replacing an earlier file (a rerun redoes a stage). json.dumps rather than
    fs.write_json: a single-segment comparison has a NaN standard error, a perfect frame an
    infinite PSNR, and both must still be recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.write_text(path, json.dumps(obj, indent=1, default=str) + "\n", overwrite=True)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS says, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_determinism(threads: int, device: str) -> None:
    """Fixed threads and deterministic kernels. On CUDA some kernels the UNet needs (e.g. the
    nearest-upsampling backward) have no deterministic version: warn instead of failing there.
    On CUDA, fp32 matmuls and convolutions run on TF32 tensor cores (cuDNN's default already, now
    cuBLAS's too), several times fp32's rate: the gpu scale's minutes are counted at both (compute.py)."""
    torch.set_num_threads(int(threads))
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def determinism(threads: int, device: str) -> Iterator[None]:
    """:func:`set_determinism` for the block, then the process as it was (threads, deterministic
    kernels, TF32 and cuBLAS's workspace variable): tests and notebooks run studies in one process."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        set_determinism(threads, device)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3], saved[4]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


_MACHINE: dict[str, Any] = {}


def _machine(device: str) -> dict[str, Any]:
    """benchmarks._common.machine_info, its slow parts (git, versions) computed once per process."""
    import datetime

    from benchmarks._common import machine_info

    if not _MACHINE:
        _MACHINE.update(machine_info())
    return {
        **_MACHINE,
        "torch_threads": torch.get_num_threads(),
        # meaningful only where CUDA runs the matmuls
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


class StageProgress:
    """Rate-limited progress lines: a step counter every ``every`` seconds and at the end."""

    def __init__(self, log: Log, label: str, every: float = 30.0):
        self.log, self.label, self.every = log, label, every
        self.t0 = self.last = time.perf_counter()
        self.first: int | None = None  # the step before the first reported one (a resumed run starts late)

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = step - 1
        if step == total or now - self.last >= self.every:
            self.last = now
            rate = (now - self.t0) / max(step - self.first, 1)
            self.log(
                f"{self.label}: step {step}/{total} loss {loss:.4f} ({rate:.2f}s/step, ~{rate * (total - step) / 60:.1f} min left)"
            )


# ------------------------------------------------------------------------------------ the study


class Study:
    """The stages, sharing the output directory, the configuration and the seed."""

    def __init__(
        self,
        out: Path,
        cfg: dict[str, Any],
        seed: int,
        *,
        scale: str,
        data_dir: Path | None = None,
        device: str = "cpu",
        log: Log = _stderr,
        replicate: int = 0,
        record_workers: int = 1,
    ):
        #: ``root`` holds the shared stages (data, autoencoder, latents, pretraining, scratch init);
        #: ``out`` the replicate's (conversion, fine-tuning, evaluation): ``root`` itself for
        #: replicate 0, ``root/seed<S>`` for the others (training seed S = seed + replicate).
        self.root, self.cfg, self.seed, self.scale = out, cfg, seed, scale
        self.train_seed = seed + replicate
        self.out = out if replicate == 0 else out / f"seed{self.train_seed}"
        self.data_root = data_dir or out / "data"
        self.device, self.log = device, log
        #: processes that record the clips, one game each (the same recordings for any number)
        self.record_workers = record_workers
        self.backbone = backbone_of(cfg)
        self.space = cfg.get("space", "pixel")
        self.latent = self.space == "latent"  # the study's autoencoder
        self.patched = self.space == "patch"
        #: the world models see latents or patches, decoded to pixels for scoring
        self.encoded = self.space in ("latent", "patch")
        #: the paddle metric knows Pong only
        self.paddle = cfg["data"]["heldout"] == "Pong"
        self.executed: list[str] = []  # stages run (not skipped) by this invocation
        self._vae: tuple[Any, Any] | None = None

    def replica(self, replicate: int) -> Study:
        """The same study with another training seed: shared stages, its own conversion,
        fine-tuning and evaluation (same test segments, sampler noise and random actions)."""
        other = Study(
            self.root, self.cfg, self.seed, scale=self.scale, device=self.device, log=self.log, replicate=replicate
        )
        other.data_root, other.executed, other._vae = self.data_root, self.executed, self._vae
        return other

    # ---- bookkeeping -------------------------------------------------------------------------

    def check_identity(self) -> None:
        """Write study.json, or refuse a DIR that holds another study."""
        ident = {"scale": self.scale, "seed": self.seed, "config": self.cfg}
        path = self.root / "study.json"
        if path.is_file():
            old = _normalised_identity(_read_json(path))
            if old != json.loads(json.dumps(ident)):
                raise StudyError(
                    f"{self.root} holds a study with another scale, seed or configuration ({path}); "
                    "use another --out, or delete it"
                )
        else:
            _write_json(path, ident)
        link = self.root / DATA_LINK
        if self.data_root.resolve() != (self.root / "data").resolve():
            _write_json(link, {"data": str(self.data_root.resolve())})  # where --data put them, this time
        elif link.is_file():
            link.unlink()

    def named(self, what: str) -> str:
        """A stage's name in the log and in ``stages_run_now``: a replicate's names its training seed."""
        return what if self.train_seed == self.seed else f"{what} (seed {self.train_seed})"

    def _skip(self, marker: Path, what: str) -> bool:
        what = self.named(what)
        if marker.is_file():
            self.log(
                f"[{what}] done already ({marker.relative_to(self.root) if marker.is_relative_to(self.root) else marker}), skipped"
            )
            return True
        self.log(f"[{what}] running")
        self.executed.append(what)
        return False

    # ---- 1. data -----------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        d = self.cfg["data"]
        settings = atari_data.RecordSettings(warmup=tuple(d["warmup"]), size=int(d["size"]))
        request = {**d, "seed": self.seed, "settings": settings.to_json()}
        d = {k: v for k, v in d.items() if k not in ("warmup", "size")}
        marker = self.data_root / "summary.json"
        if marker.is_file():
            found = _read_json(marker)
            if found.get("request") != json.loads(json.dumps(request)):
                raise StudyError(
                    f"{self.data_root} holds recordings made with other settings than this study's; "
                    "use another --data / --out"
                )
        if self._skip(marker, "data"):
            return _read_json(marker)
        t0 = time.perf_counter()
        summary = atari_data.record_default(
            self.data_root,
            seed=self.seed,
            games=d["games"],
            heldout=d["heldout"],
            clips_per_game=d["clips_per_game"],
            clip_len=d["clip_len"],
            train_episodes=d["train_episodes"],
            test_episodes=d["test_episodes"],
            episode_len=d["episode_len"],
            overwrite=self.data_root == self.root / "data",
            settings=settings,
            log=lambda m: self.log(f"[data] {m}"),
            workers=self.record_workers,
        )
        doc = {"request": request, "summary": summary, "seconds": time.perf_counter() - t0}
        _write_json(marker, doc)
        return doc

    def pixel_dataset(self, key: str) -> Path:
        return self.data_root / atari_data.DATASETS[key]

    def dataset(self, key: str) -> Path:
        """The dataset the world models train on: pixels, or their latents or patches."""
        if self.encoded:
            return self.root / self.space / atari_data.DATASETS[key]
        return self.pixel_dataset(key)

    # ---- 1b. the autoencoder and the latent datasets (latent studies) ---------------------------

    def autoencoder(self) -> dict[str, Any] | None:
        from benchmarks.atari import autoencoder as ae

        if not self.latent:
            return None
        out = self.root / "autoencoder"
        marker = out / ae.SUMMARY_FILE
        if self._skip(marker, "autoencoder"):
            return _read_json(marker)
        stale = self.root / "latent"
        if stale.exists():  # encoded by an autoencoder whose marker is gone: not this one's latents
            self.log(f"[autoencoder] removing {stale}: latents of an earlier autoencoder")
            shutil.rmtree(stale)
        a = self.cfg["latent"]
        roots = [self.pixel_dataset("pretrain")] + ([self.pixel_dataset("train")] if a["heldout_train_frames"] else [])
        doc = ae.train_autoencoder(
            roots,
            self.pixel_dataset("test"),
            out,
            a,
            self.seed,
            device=self.device,
            progress=StageProgress(self.log, "[autoencoder]"),
        )
        rec = doc["reconstruction"]
        self.log(
            f"[autoencoder] test reconstruction {rec['psnr']:.2f} dB; paddle found in "
            f"{100 * rec['paddle_found']:.1f}% of the real frames showing it, {rec['paddle_error_px']} px off"
        )
        _write_json(marker, doc)
        return doc

    def vae_dir(self) -> Path:
        from benchmarks.atari.autoencoder import MODEL_DIR

        return self.root / "autoencoder" / MODEL_DIR

    def encode(self) -> dict[str, Any] | None:
        """Every dataset through ``causalize.latents.encode_episodes`` (what ``causalize encode`` runs)."""
        if not self.encoded:
            return None
        marker = self.root / self.space / "summary.json"
        if self._skip(marker, "encode"):
            return _read_json(marker)
        doc: dict[str, Any] = {}
        marker.parent.mkdir(parents=True, exist_ok=True)
        norm = patches.measure_norm(self.pixel_dataset("pretrain"), self.cfg["patch"]["size"]) if self.patched else None
        for key in atari_data.DATASETS:
            if self.dataset(key).is_dir():
                continue  # encoded by an interrupted run (a dataset appears by one rename when complete)
            doc[key] = self._encode_one(key, norm)
            self.log(f"[encode] {key}: {doc[key]['episodes']} episodes, {doc[key]['latent_frames']} latent frames")
        doc["seconds"] = sum(d["seconds"] for d in doc.values())
        _write_json(marker, doc)
        return doc

    def _encode_one(self, key: str, norm: dict[str, Any] | None) -> dict[str, Any]:
        """One dataset through the autoencoder (``causalize.latents``, what ``causalize encode``
        runs) or into patches (the per-colour normalisation measured on the pretraining clips)."""
        from causalize.latents.encode import encode_episodes

        t0 = time.perf_counter()
        if norm is not None:
            done = patches.encode_dataset(self.pixel_dataset(key), self.dataset(key), norm)
            return {"episodes": done["episodes"], "latent_frames": done["frames"], "seconds": time.perf_counter() - t0}
        report = encode_episodes(
            self.pixel_dataset(key), self.dataset(key), self.vae_dir(), batch_size=256, device=self.device
        )
        return {"episodes": report.episodes, "latent_frames": report.latent_frames, "seconds": report.seconds}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents or patches (N, C, T, h, w) → pixels (N, 3, T, H, W) in [-1, 1]: through the
        study's autoencoder, or the exact inverse of the patch transform."""
        from causalize.latents.vae import decode_clip, load_vae

        if self.patched:
            return patches.decode(latents, patches.read_norm(self.dataset("test")))

        if self._vae is None:
            self._vae = load_vae(self.vae_dir(), device=self.device)
        vae, spec = self._vae
        with torch.no_grad():
            return torch.cat([decode_clip(vae, spec, z) for z in latents.split(32)]).cpu()

    # ---- 2. pretraining and the scratch initialisation ----------------------------------------

    def pretrain(self) -> dict[str, Any]:
        out = self.root / "pretrain"
        marker = out / pt.SUMMARY_FILE
        if self._skip(marker, "pretrain"):
            return _read_json(marker)
        config = pt.PretrainConfig(
            data=str(self.dataset("pretrain")),
            output_dir=str(out),
            model=self.cfg["model"],
            backbone=self.backbone.name,
            seed=self.seed,
            **self.cfg["pretrain"],
        )
        return pt.pretrain(config, progress=StageProgress(self.log, "[pretrain]"), device=self.device)

    def scratch_init(self) -> dict[str, Any]:
        """The pretraining architecture at its random initialisation (the same seed), saved like
        the pretrained model: the "trained from scratch" baseline starts here."""
        out = self.root / "scratch_init"
        marker = out / "init.json"
        if self._skip(marker, "scratch-init"):
            return _read_json(marker)
        from causalize.episodes import read_info

        info = read_info(self.dataset("pretrain"))
        model = pt.build_model(self.cfg["model"], info.channels, info.frame_shape_chw[1], self.seed, self.backbone.name)
        pt.save_model(model, out / pt.MODEL_DIR)
        doc = {
            "seed": self.seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "note": "the initial weights of pretraining (same architecture and seed), never trained",
        }
        _write_json(marker, doc)
        return doc

    # ---- 3. conversion ------------------------------------------------------------------------

    def convert(self, variant: str) -> dict[str, Any]:
        from causalize.api import convert
        from causalize.episodes import read_info

        marker = self.out / "convert" / f"{variant}.json"
        if self._skip(marker, f"convert {variant}"):
            return _read_json(marker)
        spec = self.backbone.variants[variant]
        src = self.root / ("pretrain" if spec["init"] == "pretrained" else "scratch_init") / pt.MODEL_DIR
        space = read_info(self.dataset("train")).action_space
        pipeline = variant_pipeline(variant, self.backbone.name)
        torch.manual_seed(self.train_seed)  # the action adapter's initialisation
        report = convert(
            src,
            self.out / "convert" / variant,
            pipeline=pipeline,
            action_dim=space.num_actions,
            action_type="discrete",
            verify=True,
            allow_leak=not spec["causal"],
            overwrite=True,
        )
        ver = report.verification or {}
        doc = {
            "variant": variant,
            **spec,
            "src": str(src),
            "pipeline": report.pipeline,
            "parameters": report.parameters,
            "verification": {k: ver.get(k) for k in ("passed", "max_leak", "culprit", "summary")},
            "written": report.written,
            "seconds": report.seconds,
        }
        if not report.written:
            raise StudyError(f"conversion of {variant} wrote nothing: {ver.get('summary')}")
        self.log(
            f"[{self.named(f'convert {variant}')}] {report.pipeline}: verification {'passed' if ver.get('passed') else 'FAILED'} "
            f"(max leak {ver.get('max_leak')})"
        )
        _write_json(marker, doc)
        return doc

    # ---- 4. fine-tuning -----------------------------------------------------------------------

    def finetune(self, variant: str) -> dict[str, Any]:
        from causalize.training.trainer import TrainConfig, train

        marker = self.out / "finetune" / f"{variant}.json"
        if self._skip(marker, f"finetune {variant}"):
            return _read_json(marker)
        f = self.cfg["finetune"]
        config = TrainConfig(
            model=str(self.out / "convert" / variant),
            data=str(self.dataset("train")),
            output_dir=str(self.out / "finetune" / variant),
            window=f["window"],
            batch_size=f["batch_size"],
            steps=f["steps"],
            lr=f["lr"],
            **{k: f.get(k, v) for k, v in _FINETUNE_DEFAULTS.items() if k not in _STUDY_ONLY},
            **episode_subset(self.dataset("train"), f.get("episodes")),
            seed=self.train_seed,
            log_every=f["log_every"],
            checkpoint_every=f["checkpoint_every"],
            keep_checkpoints=1,
            resume=True,
        )
        summary = train(config, progress=StageProgress(self.log, f"[{self.named(f'finetune {variant}')}]"))
        summary["config"] = config.to_json()
        _write_json(marker, summary)
        return summary

    # ---- 5. evaluation ------------------------------------------------------------------------

    def segments(self) -> ev.Segments:
        e = self.cfg["eval"]
        seg = ev.load_segments(self.pixel_dataset("test"), e["context"], e["horizon"], e["segments_per_episode"])
        if self.encoded:
            seg.latents = ev.load_latent_frames(self.dataset("test"), seg.index, seg.frames.shape[1])
        return seg

    def rollout_config(self, variant: str, guidance: float) -> Any:
        from causalize.rollout.loading import resolve_config

        e = self.cfg["eval"]
        config, _ = resolve_config(
            self.out / "finetune" / variant / "final",
            steps=e["steps"],
            window=e["window"],
            guidance_scale=guidance,
            guidance_rescale=e["guidance_rescale"],
            eta=e["eta"],
            history_noise=e["history_noise"],
            seed=self.seed,
            # Streaming caches are exact only for a causal model; the time-spanning-norm ablation
            # recomputes the whole window at every step (the reference strategy).
            cache=self.backbone.variants[variant]["causal"],
        )
        return config

    def evaluate(self, run: dict[str, Any], segments: ev.Segments) -> dict[str, Any]:
        from causalize.rollout.loading import load_world_model

        marker = self.out / "eval" / f"{run['name']}.json"
        if self._skip(marker, f"eval {run['name']}"):
            return self._add_new_metrics(_read_json(marker), marker, segments)
        wm, path = load_world_model(self.out / "finetune" / run["variant"] / "final", device=self.device)
        config = self.rollout_config(run["variant"], run["guidance"])
        actions = segments.actions if run["actions"] == "real" else ev.random_actions(segments, self.seed)
        pred, timing = self.rollout(wm, segments, actions, config)
        marker.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(self.out / "eval" / f"{run['name']}.npz", frames=ev.to_uint8(pred), actions=actions)
        doc = {
            **run,
            "metrics": ev.score(pred, segments.real_future, paddle=self.paddle),
            "timing": timing,
            "rollout_config": config.to_json(),
            "checkpoint": str(path),
        }
        _write_json(marker, doc)
        self.log(
            f"[eval {run['name']}] PSNR {doc['metrics']['psnr']['overall']:.2f} dB, "
            f"SSIM {doc['metrics']['ssim']['overall']:.4f} ({timing['seconds']:.1f}s)"
        )
        return doc

    def rollout(self, wm: Any, segments: ev.Segments, actions: np.ndarray, config: Any) -> tuple[torch.Tensor, dict]:
        """The world model rolled out on the segments from ``actions``: pixels in [-1, 1] (decoded
        in a latent or patch study) and the timing facts."""
        pred, timing = ev.rollout_segments(wm, segments, actions, config, batch_size=self.cfg["eval"]["batch_size"])
        return (self.decode(pred) if self.encoded else pred), timing

    def _add_new_metrics(self, doc: dict[str, Any], marker: Path, segments: ev.Segments) -> dict[str, Any]:
        """A run evaluated before the per-frame values and the paddle metric existed gets them from
        its stored frames (uint8, as saved), without rolling out again; its existing numbers stay."""
        m = doc["metrics"]
        lacks = [k for k in ("psnr", "ssim") if "values" not in m[k]] + (
            ["paddle"] if self.paddle and "paddle" not in m else []
        )
        frames = marker.with_suffix(".npz")
        if not lacks or not frames.is_file():
            return doc
        with np.load(frames) as z:
            pred = ev.model_space(z["frames"])
        new = ev.score(pred, segments.real_future, paddle=self.paddle)
        for k in lacks:
            if k == "paddle":
                m["paddle"] = new["paddle"]
            else:
                m[k]["values"] = new[k]["values"]
        doc["added_from_stored_frames"] = lacks
        _write_json(marker, doc)
        self.log(f"[eval {doc['name']}] added {', '.join(lacks)} from {frames.name}")
        return doc

    def _one_step_check(self, kind: str, variant: str, compute: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """A cached per-variant check of the fine-tuned model (``eval/<kind>_<variant>.json``):
        ``compute(world_model)`` gives its levels."""
        from causalize.rollout.loading import load_world_model

        marker = self.out / "eval" / f"{kind}_{variant}.json"
        if self._skip(marker, f"{kind} {variant}"):
            return _read_json(marker)
        wm, _ = load_world_model(self.out / "finetune" / variant / "final", device=self.device)
        doc = {"variant": variant, "levels": compute(wm)}
        _write_json(marker, doc)
        return doc

    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Model space → pixels (None: the models work on pixels)."""
        return self.decode if self.encoded else None

    def denoise(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """One-step x0 prediction quality of the fine-tuned variant at DENOISE_LEVELS."""

        def compute(wm: Any) -> dict[str, Any]:
            levels = ev.denoising_psnr(
                wm,
                segments,
                list(DENOISE_LEVELS),
                self.seed,
                batch_size=self.cfg["eval"]["batch_size"],
                decode=self.decoder(),
            )
            self.log(
                f"[denoise {variant}] x0 PSNR by level: "
                + ", ".join(f"{k}: {d['x0']:.1f} dB (input {d['input']:.1f})" for k, d in levels.items())
            )
            return levels

        return self._one_step_check("denoise", variant, compute)

    def context(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """Does the fine-tuned variant use its past (``evaluate.context_check``)?"""
        return self._first_frame_check("context", ev.context_check, variant, segments)

    def action(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """Does the fine-tuned variant's next frame depend on its action (``evaluate.action_check``)?"""
        return self._first_frame_check("action", ev.action_check, variant, segments)

    def _first_frame_check(
        self, kind: str, check: Callable[..., dict[str, Any]], variant: str, segments: ev.Segments
    ) -> dict[str, Any]:
        """A cached one-step check of the first generated frame at CONTEXT_LEVELS."""
        return self._one_step_check(
            kind,
            variant,
            lambda wm: check(
                wm,
                segments,
                list(CONTEXT_LEVELS),
                self.seed,
                decode=self.decoder(),
                batch_size=self.cfg["eval"]["batch_size"],
                paddle=self.paddle,
            ),
        )

    def _reference(self, name: str, pred: torch.Tensor, segments: ev.Segments) -> dict[str, Any]:
        """A run of no model (a baseline or a reference), scored like every rollout."""
        metrics = ev.score(pred, segments.real_future, paddle=self.paddle)
        return {"name": name, "variant": name, "guidance": None, "actions": "none", "metrics": metrics}

    def baseline(self, segments: ev.Segments) -> dict[str, Any]:
        return self._reference(BASELINE, ev.copy_last_baseline(segments), segments)

    def baseline_autoencoded(self, segments: ev.Segments) -> dict[str, Any]:
        assert segments.latents is not None
        c = segments.context
        last = self.decode(segments.model_frames(c - 1, c))
        return self._reference(BASELINE_AE, last.expand(-1, -1, segments.horizon, -1, -1), segments)

    def autoencoder_reference(self, segments: ev.Segments) -> dict[str, Any]:
        """The real future frames through the autoencoder: what predicting the encoder's latents exactly scores."""
        assert segments.latents is not None
        return self._reference(AUTOENCODER, self.decode(segments.model_frames(segments.context)), segments)


# ------------------------------------------------------------------------------------ analysis


def _paired(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Mean and standard error of the per-segment difference a − b (same segments, so paired)."""
    x = np.asarray(a["metrics"][metric]["per_sample"], dtype=np.float64)
    y = np.asarray(b["metrics"][metric]["per_sample"], dtype=np.float64)
    return seeds_mod.paired(x - y)


def comparisons(runs: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired comparisons behind each claim: (claim, a, b) with a − b for PSNR and SSIM."""
    s0 = float(cfg["eval"]["ablation_guidance"][0])
    main = backbone_of(cfg).main
    pairs = [  # pairs whose runs the backbone does not have are left out below
        (
            "pretrained transfer beats training from scratch",
            run_name(main, s0, "real"),
            run_name("scratch", s0, "real"),
        ),
        ("extrapolative beats masked transfer", run_name(main, s0, "real"), run_name("masked", s0, "real")),
        ("extrapolative beats shift transfer", run_name(main, s0, "real"), run_name("shift", s0, "real")),
        ("masked beats shift transfer", run_name("masked", s0, "real"), run_name("shift", s0, "real")),
        (
            "causal norm beats the time-spanning norm left as is",
            run_name(main, s0, "real"),
            run_name("noncausal-norm", s0, "real"),
        ),
        ("the world model beats repeating the last context frame", run_name(main, s0, "real"), BASELINE),
        (
            "the world model beats repeating the autoencoded last context frame",
            run_name(main, s0, "real"),
            BASELINE_AE,
        ),
    ]
    for s in cfg["eval"]["guidance"]:
        if float(s) != 1.0:
            pairs.append(
                (f"action guidance s={s:g} beats s=1", run_name(main, float(s), "real"), run_name(main, 1.0, "real"))
            )
    for name, r in runs.items():
        if r.get("actions") == "random":
            real = run_name(r["variant"], r["guidance"], "real")
            pairs.append(
                (f"{r['variant']} (s={r['guidance']:g}) follows the real actions: real beats random", real, name)
            )
    out = []
    for claim, a, b in pairs:
        if a in runs and b in runs:
            out.append(
                {
                    "claim": claim,
                    "a": a,
                    "b": b,
                    "psnr": _paired(runs[a], runs[b], "psnr"),
                    "ssim": _paired(runs[a], runs[b], "ssim"),
                }
            )
    k = min(FIRST_FRAMES, cfg["eval"]["horizon"])
    for b, what in ((BASELINE, "the last context frame"), (BASELINE_AE, "the autoencoded last context frame")):
        a = run_name(main, s0, "real")
        if a in runs and b in runs and all("values" in runs[x]["metrics"]["psnr"] for x in (a, b)):
            out.append(
                {
                    "claim": f"the world model beats repeating {what} on the first {k} generated frames",
                    "a": a,
                    "b": b,
                    **{m: seeds_mod.first_frames(runs[a], runs[b], m, k) for m in ("psnr", "ssim")},
                }
            )
    return out


def controllability(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every random-action run against the same model's real-action run (``control.controllability``):
    the paddle error with real and random actions, their paired difference and verdict, and the
    paper's ΔPSNR / ΔSSIM per horizon step; keyed ``<variant>_s<guidance>``."""
    out = {}
    for name, r in runs.items():
        real = run_name(r["variant"], r["guidance"], "real") if r.get("actions") == "random" else None
        if real in runs:
            out[f"{r['variant']}_s{r['guidance']:g}"] = {
                "variant": r["variant"],
                "guidance": r["guidance"],
                "real": real,
                "random": name,
                **control.controllability(runs[real]["metrics"], r["metrics"]),
            }
    return out


def _verdict(c: dict[str, Any]) -> str:
    """Whether a beats b, from both metrics; a difference within 2 standard errors of the paired
    difference counts as none (a rule of thumb, not a formal test)."""
    return seeds_mod.metrics_verdict(c["psnr"], c["ssim"], "beyond_2sem", none="no difference beyond 2 s.e.")


# ------------------------------------------------------------------------------------ report


def _curve(summary: dict[str, Any]) -> dict[str, Any]:
    """A horizon summary with steps counted from 1 (the first generated frame)."""
    return {**summary, "steps": [s + 1 for s in summary["steps"]]}


def write_report(study: Study, results: dict[str, Any], segments: ev.Segments) -> None:
    """Plots, GIF, frame grid and README.md under DIR."""
    from benchmarks.atari import report as rp

    out, cfg = study.out, study.cfg
    runs = results["runs"]
    main, variants = study.backbone.main, study.backbone.variants
    s0 = float(cfg["eval"]["ablation_guidance"][0])
    plots = out / "plots"
    xlabel = "generated frame (1 = first after the context)"
    variants_real = {v: runs[run_name(v, s0, "real")] for v in variants if run_name(v, s0, "real") in runs}
    for metric, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
        curves = {v: _curve(r["metrics"][metric]) for v, r in variants_real.items()}
        curves[BASELINE] = _curve(runs[BASELINE]["metrics"][metric])
        rp.plot_horizon(
            plots / f"variants_{metric}.png",
            curves,
            ylabel=label,
            xlabel=xlabel,
            title=f"variants, real actions, s={s0:g}",
        )
        guided = {
            f"s={s:g}": _curve(runs[run_name(main, float(s), "real")]["metrics"][metric])
            for s in cfg["eval"]["guidance"]
        }
        rp.plot_horizon(
            plots / f"guidance_{metric}.png",
            guided,
            ylabel=label,
            xlabel=xlabel,
            title=f"{main}: action guidance scale",
        )
        ctrl = {}
        for r in runs.values():
            if r.get("actions") == "random":
                real = runs[run_name(r["variant"], r["guidance"], "real")]
                ctrl[f"{r['variant']} s={r['guidance']:g} real"] = _curve(real["metrics"][metric])
                ctrl[f"{r['variant']} s={r['guidance']:g} random"] = _curve(r["metrics"][metric])
        if ctrl:
            rp.plot_horizon(
                plots / f"controllability_{metric}.png",
                ctrl,
                ylabel=label,
                xlabel=xlabel,
                title="real vs random actions",
            )
    paddle: dict[str, Any] = {}
    for name, c in results.get("controllability", {}).items():
        if "paddle" in c:
            for actions in ("real", "random"):
                paddle[f"{name} {actions}"] = _curve(runs[c[actions]]["metrics"]["paddle"])
    if paddle and "paddle" in runs[BASELINE]["metrics"]:
        paddle[BASELINE] = _curve(runs[BASELINE]["metrics"]["paddle"])
    if paddle:
        rp.plot_horizon(
            plots / "controllability_paddle.png",
            paddle,
            ylabel="agent's paddle: |y_pred − y_real| (px; no paddle = max)",
            xlabel=xlabel,
            title="real vs random actions: the controlled object",
        )
    losses = {}
    for v in variants:
        path = out / "finetune" / v / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            losses[v] = {"steps": [r["step"] for r in rows], "mean": [r["loss_avg"] for r in rows]}
    if losses:
        rp.plot_horizon(
            plots / "finetune_loss.png",
            losses,
            ylabel="Diffusion-Forcing loss (v)",
            xlabel="fine-tuning step",
            title="fine-tuning loss (same budget)",
        )
    # GIF and grid: the test segment where the real paddle moves most (Pong; else the first), the
    # method at its best guidance scale, with the real and with random actions.
    best = results["best_main_guidance"]
    c = segments.context
    shown = gif_segment(runs[BASELINE]["metrics"].get("paddle"))
    results["gif"] = {"segment": shown, "index": list(segments.index[shown])}
    real = segments.frames[shown]

    def with_context(name: str) -> np.ndarray:
        pred = np.load(out / "eval" / f"{name}.npz")["frames"][shown]
        return np.concatenate([real[:c], pred])

    panels = {"real": real, f"{main} s={best:g}": with_context(run_name(main, best, "real"))}
    if run_name("scratch", s0, "real") in runs:
        panels[f"scratch s={s0:g}"] = with_context(run_name("scratch", s0, "real"))
    if run_name(main, best, "random") in runs:
        panels["random actions"] = with_context(run_name(main, best, "random"))
    rp.write_comparison_gif(out / "rollout.gif", panels, context=c, fps=4.0)
    rp.save_frame_grid(out / "rollout_grid.png", list(panels.values()))
    (out / "README.md").write_text(markdown(results, list(panels)), encoding="utf-8")


def _pm(d: dict[str, Any], spec: str = "+.3g") -> str:
    """``mean ± sem``, "–" for a missing or NaN value."""
    return f"{_fmt(d.get('mean'), spec)} ± {_fmt(d.get('sem'), '.2g')}"


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The claims, one row each: the study seed's paired difference over test segments and, with
    replicates, the aggregate over training seeds (``benchmarks.atari.seeds``), each with its verdict."""
    seeds = {c["claim"]: c for c in results.get("across_seeds") or []}
    n_seeds = len(results.get("replicates") or {})
    seg = results["segments"]["count"]
    head = f"| claim | seed {results['study']['seed']}, over {seg} segments | verdict |"
    rows = [
        head + (f" over {n_seeds} training seeds | verdict |" if seeds else ""),
        "|---|---|---|" + ("---|---|" if seeds else ""),
    ]

    def across(claim: str, metrics: tuple[str, ...], spec: str) -> str:
        if not seeds:
            return ""
        x = seeds.get(claim)
        if x is None:
            return " – | – |"
        return " " + ", ".join(f"{_pm(x[m], spec)}{UNITS[m]}" for m in metrics) + f" | {x['verdict']} |"

    for key, c in (results.get("controllability") or {}).items():
        if "paddle" in c:
            claim = f"{key} follows the real actions: paddle error real − random < 0"
            d = c["paddle"]["real_minus_random"]["overall"]
            mine = f"| {claim} | {_pm(d, '+.2f')} px | {c['paddle']['verdict']} |"
            rows.append(mine + across(claim, ("paddle",), "+.2f"))
    for c in results["comparisons"]:
        mine = f"| {c['claim']} | {_pm(c['psnr'])} dB, {_pm(c['ssim'])} SSIM | {c['verdict']} |"
        rows.append(mine + across(c["claim"], ("psnr", "ssim"), "+.3g"))
    note = (
        " Over training seeds (`benchmarks/atari/seeds.py`): the mean of the seeds' paired differences ± the "
        "standard error over seeds; a difference counts only when it clears Student's 95 % t over seeds "
        "(12.7 s.e. with 2 seeds, 4.3 with 3) *and* 2 s.e. over segments of the seed-averaged per-segment "
        "difference (the seeds share the test segments). `–`: not replicated."
        if seeds
        else ""
    )
    return [
        "## Verdicts, claim by claim",
        "",
        "Study seed: a claim holds when a beats b by more than 2 standard errors of the paired per-segment "
        "difference (PSNR and SSIM both; the paddle error alone for the controllability rows, where lower is "
        "better), is reversed for the opposite, and shows no difference otherwise."
        + note
        + SPACE_NOTES.get(results["study"]["config"].get("space", "pixel"), ""),
        "",
        *rows,
        "",
        *_per_seed_lines(seeds),
    ]


UNITS = {"psnr": " dB", "ssim": " SSIM", "paddle": " px"}


def _per_seed_lines(seeds: dict[str, Any]) -> list[str]:
    """Each seed's paired mean difference, per claim (the numbers behind the over-seeds column)."""
    if not seeds:
        return []
    order = [str(x) for x in next(iter(seeds.values()))["seeds"]]
    lines = ["| claim (a − b per training seed) | " + " | ".join(f"seed {x}" for x in order) + " |"]
    lines.append("|---" * (len(order) + 1) + "|")
    for c in seeds.values():
        metrics = ("paddle",) if "paddle" in c else ("psnr", "ssim")
        cells = [
            ", ".join(f"{_fmt(c[m]['seeds']['per_seed'][i], '+.3g')}{UNITS[m]}" for m in metrics)
            for i in range(len(order))
        ]
        lines.append(f"| {c['claim']} | " + " | ".join(cells) + " |")
    return ["Each training seed's paired mean difference over the test segments:", "", *lines, ""]


AE_NOTE = (
    "Latent study: every prediction is decoded by the study's autoencoder and scored in pixels; the "
    "`autoencoder` row of the runs table (the real future frames encoded and decoded) is a reference: what "
    "predicting the encoder's own latents would score."
)
PATCH_NOTE = (
    "Patch study: the world models diffuse in 4×4-pixel patches (16×16×48 per frame, a lossless rearrangement "
    "normalised per colour); every prediction is mapped back to pixels exactly and scored there."
)
SPACE_NOTES = {"latent": " " + AE_NOTE, "patch": " " + PATCH_NOTE}


def gif_lines(results: dict[str, Any], panels: list[str]) -> list[str]:
    """What the GIF shows: the segment, and the paddle rows of the real and predicted frames."""
    g, runs = results.get("gif") or {}, results["runs"]
    main, best = backbone_of(results["study"]["config"]).main, results["best_main_guidance"]
    lines = [f"![rollout](rollout.gif) — test segment {g.get('index')}, panels: {', '.join(panels)}.", ""]
    names = {"real frames": BASELINE, "real actions": run_name(main, best, "real")}
    names["random actions"] = run_name(main, best, "random")
    if not all(n in runs and "paddle" in runs[n]["metrics"] for n in names.values()):
        return lines
    seg = int(g.get("segment", 0))
    real = control.positions(runs[BASELINE]["metrics"]["paddle"], "real")[seg]
    table = ["| generated frame | " + " | ".join(str(i + 1) for i in range(len(real))) + " |"]
    table.append("|---" * (len(real) + 1) + "|")
    row = {"real frames": real}
    for label in ("real actions", "random actions"):
        row[label] = control.positions(runs[names[label]]["metrics"]["paddle"], "pred")[seg]
    for label, ys in row.items():
        table.append(f"| paddle row, {label} | " + " | ".join("–" if np.isnan(y) else f"{y:.1f}" for y in ys) + " |")
    err, miss = {}, {}
    for k in ("real actions", "random actions"):
        d = np.abs(row[k] - real)
        err[k] = float(d[np.isfinite(d)].mean()) if np.isfinite(d).any() else math.nan
        miss[k] = int(np.isnan(row[k][~np.isnan(real)]).sum())
    lines += [
        f"Paddle rows detected in this segment (`{main}` s={best:g}; – = no paddle found). Mean distance to the real "
        "paddle where one is found: "
        + ", ".join(
            f"{k} {_fmt(None if np.isnan(v) else float(v), '.1f')} px ({miss[k]} frames without one)"
            for k, v in err.items()
        )
        + ". One segment is an illustration; the verdicts above are the evidence.",
        "",
        *table,
        "",
    ]
    return lines


def gif_segment(paddle: dict[str, Any] | None) -> int:
    """The segment whose real paddle travels farthest over the horizon (0 without a paddle metric)."""
    if not paddle:
        return 0
    y = control.positions(paddle, "real")
    travel = [float(np.ptp(r[np.isfinite(r)])) if np.isfinite(r).any() else -1.0 for r in y]
    return int(np.argmax(travel))


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _action_lines(results: dict[str, Any]) -> list[str]:
    """The one-step action check's section: how much the next frame moves with its action."""
    from benchmarks.atari.report import write_markdown_table

    act = results.get("action") or {}
    if not act.get("variants"):
        return []
    rows: dict[str, dict[str, str]] = {}
    for v, levels in act["variants"].items():
        for k, d in levels.items():
            rows[f"{v}, k={k}"] = {"action rms": f"{d['action_rms']:.4f}", "past rms": f"{d['past_rms']:.4f}"} | {
                f"move after a={m['action']}": f"{_fmt(m['mean'], '+.2f')} (n={m['n']})" for m in d.get("moves", [])
            }
    if act.get("real_moves"):
        rows["real test frames"] = {"action rms": "–", "past rms": "–"} | {
            f"move after a={m['action']}": f"{_fmt(m['mean'], '+.2f')} ± {_fmt(m['sem'], '.2f')} (n={m['n']})"
            for m in act["real_moves"]
        }
    return [
        "## Does the next frame depend on its action? (one-step action check)",
        "",
        "The first generated frame of every test segment noised to level k, its own context clean, predicted once "
        "per action with the same noise (`evaluate.action_check`). `action rms`: the spread of the predicted x0 over "
        "the actions; `past rms`: its change when the past is swapped for the next segment's (model space, so the "
        "two compare). `move after a`: the predicted paddle's move (rows of the frame, + = down) from the "
        "last context frame, mean over the segments where both show a paddle; the last row is what the real test "
        "frames show after each action (Pong's minimal set: 0 NOOP, 1 FIRE, 2 RIGHT, 3 LEFT, 4 RIGHTFIRE, "
        "5 LEFTFIRE). A model that follows its actions predicts moves that differ by action as the real ones do.",
        "",
        write_markdown_table(rows, row_header="variant, level"),
    ]


def markdown(results: dict[str, Any], panels: list[str]) -> str:
    """The generated report: tables of every run, the paired comparisons, the figures."""
    from benchmarks.atari.report import write_markdown_table

    cfg, runs = results["study"]["config"], results["runs"]
    rows = {}
    for name, r in runs.items():
        m = r["metrics"]
        rows[name] = {
            "variant": r["variant"],
            "s": r["guidance"],
            "actions": r["actions"],
            "PSNR": m["psnr"]["overall"],
            "SSIM": m["ssim"]["overall"],
            "PSNR first": m["psnr"]["mean"][0],
            "PSNR last": m["psnr"]["mean"][-1],
            "SSIM first": m["ssim"]["mean"][0],
            "SSIM last": m["ssim"]["mean"][-1],
        }
        if "paddle" in m:
            rows[name]["paddle err (px)"] = m["paddle"]["overall"]["mean"]
            rows[name]["no paddle"] = m["paddle"]["missing"]["overall"]
    table = write_markdown_table(rows, row_header="run")
    var_rows = {
        v: {
            "init": d["init"],
            "pipeline": d["pipeline"],
            "verified causal": d["verification"]["passed"],
            "max leak": d["verification"]["max_leak"],
            "final FT loss": d["finetune"]["final_loss"],
        }
        for v, d in results["variants"].items()
    }
    var_table = write_markdown_table(var_rows, row_header="variant", float_format=".4g")
    if cfg["finetune"].get("episodes") is not None:
        var_table += (
            f"\nFine-tuned on {cfg['finetune']['episodes']} of the {cfg['data']['train_episodes']} recorded "
            "training episodes (the trainer's hash split: the same episodes for every variant and seed).\n"
        )
    den = results.get("denoising") or {}
    den_rows = {
        v: {f"k={k}": f"{d['x0']:.2f} ({d['input']:.2f})" for k, d in levels.items()} for v, levels in den.items()
    }
    den_table = write_markdown_table(den_rows, row_header="variant") if den_rows else ""
    ctx_rows = {
        v: {
            f"k={k} {what}": (
                f"{d['own']['psnr']:.2f} / {d['other']['psnr']:.2f}"
                if what == "PSNR own / other"
                else f"{_fmt(d['own']['paddle'], '.1f')} / {_fmt(d['other']['paddle'], '.1f')}"
            )
            for k, d in levels.items()
            for what in ("PSNR own / other", "paddle px own / other")
        }
        for v, levels in (results.get("context") or {}).items()
    }
    ctx_table = write_markdown_table(ctx_rows, row_header="variant") if ctx_rows else ""
    comp = ["| claim | a − b | ΔPSNR dB (± s.e.) | ΔSSIM (± s.e.) | verdict |", "|---|---|---:|---:|---|"]
    for cmp in results["comparisons"]:
        p, s = cmp["psnr"], cmp["ssim"]
        comp.append(
            f"| {cmp['claim']} | `{cmp['a']}` − `{cmp['b']}` | {p['mean']:+.3g} ± {_fmt(p['sem'], '.2g')} | "
            f"{s['mean']:+.3g} ± {_fmt(s['sem'], '.2g')} | {cmp['verdict']} |"
        )
    ctrl = results.get("controllability") or {}
    ctrl_lines = []
    if ctrl:
        from benchmarks.atari.report import controllability_table

        pads = [c["paddle"] for c in ctrl.values() if "paddle" in c]
        ctrl_lines = [
            "## Controllability on the controlled object (the agent's paddle)",
            "",
            "The agent's (right, green) paddle found by its colour in every predicted and real frame "
            "(`benchmarks/atari/control.py`); error = |y_pred − y_real| in pixels, averaged over the steps whose "
            "real frame shows the paddle, a prediction without a paddle counting as the largest possible error"
            + (f" ({pads[0]['penalty']:g} px)" if pads else "")
            + "; mean over segments ± standard error. A model follows its actions when its error with the real "
            "actions is smaller than with random ones by more than 2 standard errors of the paired difference. "
            "ΔPSNR / ΔSSIM: real − random (the paper's controllability measure), per segment, paired.",
            "",
            controllability_table(ctrl),
        ]
        if pads:
            base = runs.get(BASELINE, {}).get("metrics", {}).get("paddle", {}).get("overall", {}).get("mean")
            ctrl_lines += [
                "Floor: on the real frames the detector's error is 0 by construction; it finds the real paddle in "
                f"{100 * pads[0]['real_visible']:.0f}% of the generated steps' real frames (the others are left out). "
                f"The copy-last baseline (the paddle never moves) scores {_fmt(base, '.2f')} px.",
                "",
                "![paddle error](plots/controllability_paddle.png)",
                "",
            ]
    e, st = cfg["eval"], results["study"]
    t = results["timings"]
    lines = [
        f"# Atari world-model study — backbone `{backbone_of(cfg).name}`, scale `{st['scale']}`, seed {st['seed']}",
        "",
        f"Generated by `python -m benchmarks.atari.study` ({st['command']}). Held-out game "
        f"{cfg['data']['heldout']}; {results['segments']['count']} test segments of {e['context']} context + "
        f"{e['horizon']} generated frames; DDIM, {e['steps']} trailing steps, η = {e['eta']}, history level "
        f"{e['history_noise']}, window {e['window']}, guidance rescale {e['guidance_rescale']}. PSNR / SSIM are "
        "per generated frame against the real frame, averaged over segments (and over the horizon for the "
        "overall columns). `real` = the recorded actions, `random` = uniformly random actions (same seed).",
        "",
        *verdict_lines(results),
        "## Runs",
        "",
        table,
        "## Variants (conversion and fine-tuning, equal budget)",
        "",
        var_table,
        "## One-step denoising (how good a denoiser each model is, apart from the sampler)",
        "",
        "Every frame of the test segments (context and future) noised to the same level k, the real actions, one "
        "forward pass: PSNR (dB) of the predicted x0 against the real frames, and in brackets the PSNR of the noisy "
        "input rescaled by 1/sqrt(alpha_k) (no denoising).",
        "",
        den_table,
        *(
            [
                "## Does the model use its past? (one-step context check)",
                "",
                "The first generated frame of every test segment noised to level k, its context clean, the real "
                "actions, one forward pass; the predicted x0 scored against the real frame with the segment's own "
                "context and with the next segment's (a plausible but wrong past). A model that continues its past "
                "scores better with its own: higher PSNR, lower paddle error (no paddle = the largest error).",
                "",
                ctx_table,
            ]
            if ctx_table
            else []
        ),
        *_action_lines(results),
        "## Paired comparisons (same test segments; a − b, mean over segments ± standard error)",
        "",
        *comp,
        "",
        f"Best guidance scale for `{backbone_of(cfg).main}` (overall PSNR): s = {results['best_main_guidance']:g}.",
        "",
        *ctrl_lines,
        "## Figures",
        "",
        "![variants PSNR](plots/variants_psnr.png) ![variants SSIM](plots/variants_ssim.png)",
        "",
        "![guidance PSNR](plots/guidance_psnr.png) ![guidance SSIM](plots/guidance_ssim.png)",
        "",
        "![controllability PSNR](plots/controllability_psnr.png) ![fine-tuning loss](plots/finetune_loss.png)",
        "",
        *gif_lines(results, panels),
        "## Time",
        "",
        f"Recorded stage times (s): data {t['data']:.0f}, "
        + (
            f"autoencoder {t.get('autoencoder', 0):.0f}, encode {t.get('encode', 0):.0f}, "
            if t.get("autoencoder")
            else ""
        )
        + f"pretrain {t['pretrain']:.0f}, convert {t['convert_total']:.0f}, "
        f"fine-tune {t['finetune_total']:.0f}, eval {t['eval_total']:.0f}"
        + (f", replicates {t['replicates_total']:.0f}" if t.get("replicates_total") else "")
        + f"; sum {t['stages_total']:.0f} s "
        f"({t['stages_total'] / 60:.1f} min). Machine: {results['machine'].get('cpu_model')} "
        f"({results['machine'].get('cpu_count')} CPUs), {results['study']['threads']} torch threads.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ driver


#: Sections a study may change and still reuse another's shared stages (``--reuse``): they
#: concern conversion, fine-tuning and evaluation only.
REUSE_FREE = ("finetune", "eval", "replicates", "threads")
#: The shared stages' directories under a study's root, copied by ``--reuse``.
SHARED_STAGES = ("data", "autoencoder", "latent", "patch", "pretrain", "scratch_init")
#: Each training seed's runs (conversion, fine-tuning, evaluation), copied by ``--reuse`` only from a
#: study that differs in nothing but :data:`RUNS_FREE`: the study seed's runs at the root, the
#: other seeds' in ``seed<S>/``.
RUN_DIRS = ("convert", "finetune", "eval")
#: What a study may change and still reuse another's finished runs: how many seeds (and which
#: variants) are replicated, and the thread count, which the shared stages' reuse ignores too.
RUNS_FREE = ("replicates", "threads")
#: What a shared stage is made from, beyond seed and scale: the settings two studies must agree on
#: for ``--reuse`` to copy it. The recordings and the latent or patch encodings do not depend on the
#: world model, so a study of another backbone reuses them; the pretraining and the scratch
#: initialisation (not listed) depend on every setting outside :data:`REUSE_FREE`.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "autoencoder": ("data", "latent"),
    "latent": ("data", "latent"),
    "patch": ("data", "patch"),
}


#: What each shared stage leaves beside its record (sub-directories): a study kept in results/
#: commits the records and figures, not the recordings or encodings, so ``--reuse`` of it copies
#: a stage only where these are there too (the models of a few studies are committed).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": tuple(atari_data.DATASETS.values()),
    "autoencoder": (ae_mod.MODEL_DIR,),
    "latent": tuple(atari_data.DATASETS.values()),
    "patch": tuple(atari_data.DATASETS.values()),
    "pretrain": (pt.MODEL_DIR,),
    "scratch_init": (pt.MODEL_DIR,),
}


def runs_lacking(root: Path) -> list[str]:
    """What the finished runs under ``root`` (the study seed's, and each ``seed<S>/``) lack beside
    their records: a converted model, a fine-tuned ``final/``, an evaluation's frames. A study kept
    in results/ lacks them all; its runs are then trained again rather than copied."""
    needed: list[Path] = []
    for run_root in [root, *sorted(p for p in root.glob("seed*") if p.is_dir())]:
        needed += [m.with_suffix("") for m in sorted((run_root / "convert").glob("*.json"))]
        needed += [m.with_suffix("") / "final" for m in sorted((run_root / "finetune").glob("*.json"))]
        rollouts = [m for m in sorted((run_root / "eval").glob("*.json")) if "metrics" in _read_json(m)]
        needed += [m.with_suffix(".npz") for m in rollouts]  # the one-step probes keep no frames
    return [str(p.relative_to(root)) for p in needed if not p.exists()]


def _differing(mine: dict[str, Any], other: dict[str, Any], keys: set[str]) -> list[str]:
    return sorted(k for k in keys if other.get(k) != mine.get(k))


def reuse_stages(out: Path, source: Path, cfg: dict[str, Any], seed: int, scale: str, log: Log) -> list[str]:
    """Copy the finished shared stages (data, autoencoder, encoded datasets, pretraining, scratch
    initialisation) of the study at ``source`` into ``out`` where ``out`` lacks them, so that a
    fine-tuning ablation skips the hour before it. A stage is copied only when the two studies
    agree on what it is made from (:data:`STAGE_SETTINGS`; the pretraining on every setting outside
    :data:`REUSE_FREE`), so another backbone reuses the recordings and the autoencoder and pretrains
    anew; from a study that differs only in its replicates, the finished runs too
    (:func:`_reuse_runs`). Refused unless they agree on seed, scale and the recordings. Returns the
    directories copied."""
    path = source / "study.json"
    if not path.is_file():
        raise StudyError(f"--reuse {source}: no study there (no study.json)")
    other = _normalised_identity(_read_json(path))
    mine = json.loads(json.dumps({"scale": scale, "seed": seed, "config": cfg}))
    theirs = other.get("config", {})
    everything = (set(mine["config"]) | set(theirs)) - set(REUSE_FREE)
    differs = _differing(mine, other, {"scale", "seed"}) + _differing(mine["config"], theirs, {"data"})
    if differs:
        raise StudyError(
            f"--reuse {source}: that study differs in {', '.join(differs)}: it has other recordings, "
            "so none of its stages is this study's"
        )
    copied = []
    for stage in SHARED_STAGES:
        src, dst = source / stage, out / stage
        if not src.is_dir() or dst.exists():
            continue
        stage_differs = _differing(mine["config"], theirs, set(STAGE_SETTINGS.get(stage, everything)))
        if stage_differs:
            log(f"[reuse] {stage}/ not copied: the studies differ in {', '.join(stage_differs)}")
            continue
        if lacking := [name for name in STAGE_OUTPUTS[stage] if not (src / name).is_dir()]:
            log(f"[reuse] {stage}/ not copied: its record is there but not {', '.join(lacking)} (made again)")
            continue
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
        copied.append(stage)
        log(f"[reuse] {stage}/ copied from {source}")
    return copied + _reuse_runs(out, source, mine["config"], theirs, log)


def _reuse_runs(out: Path, source: Path, mine: dict[str, Any], theirs: dict[str, Any], log: Log) -> list[str]:
    """Copy the finished runs of every training seed from ``source`` when the two studies differ
    only in :data:`RUNS_FREE` (adding seeds to a study then trains only the new ones); their
    checkpoints come too, so a budget check can continue them. Returns the directories copied."""
    differs = _differing(mine, theirs, (set(mine) | set(theirs)) - set(RUNS_FREE))
    if differs:
        log(f"[reuse] runs not copied (trained anew): the studies differ in {', '.join(differs)}")
        return []
    if lacking := runs_lacking(source):
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        log(f"[reuse] runs not copied (trained anew): their records are there but not {', '.join(lacking[:3])}{more}")
        return []
    names = list(RUN_DIRS) + sorted(p.name for p in source.glob("seed*") if p.is_dir())
    copied = [name for name in names if (source / name).is_dir() and not (out / name).exists()]
    for name in copied:
        shutil.copytree(source / name, out / name)
        log(f"[reuse] {name}/ copied from {source} (the same runs: the studies differ only in {', '.join(RUNS_FREE)})")
    return copied


def recorded_data(out: Path, reuse: Path | None = None, log: Log = _stderr) -> Path | None:
    """Where the study at ``out``, run without ``--data``, finds its recordings: where it recorded
    them before (its :data:`DATA_LINK`), else, when ``out`` has none of its own, where the
    ``--reuse`` study's link says, else None (``out/data``). A link to recordings that are gone is
    refused, not silently replaced by a fresh recording."""
    holder = out
    linked = linked_data(out)
    if linked is None and reuse is not None and not (out / "data").is_dir() and not (reuse / "data").is_dir():
        holder, linked = reuse, linked_data(reuse)
    if linked is None:
        return None
    if not linked.is_dir():
        fix = f"delete {out / DATA_LINK}" if holder == out else "leave out --reuse"
        raise StudyError(
            f"{holder / DATA_LINK} says the recordings are in {linked}, which is gone: pass --data DIR "
            f"to record them there, or {fix} to record them into {out / 'data'}"
        )
    log(f"study: recordings in {linked} (linked; --data overrides)")
    return linked


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
    log: Log = _stderr,
    command: str = "",
    shared_only: bool = False,
    record_workers: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage and write the report; returns the results document. Without
    ``space``, a DIR holding a study resumes in that study's space (pixel if it predates spaces).
    ``reuse``: a finished study whose shared stages this one copies (:func:`reuse_stages`).
    ``shared_only``: stop after the shared stages (returns which ran), so that budget checks
    fine-tune the seeds one run at a time (``budget --fine-tune-missing``).
    ``record_workers``: processes that record the clips, one game each (default: one per CPU core, at most 8,
    at the gpu scale, whose recording runs on the CPU beside an idle GPU; 1 otherwise)."""
    recorded = Path(out) / "study.json"
    if space is None and recorded.is_file():
        space = _read_json(recorded).get("config", {}).get("space", "pixel")
    cfg = resolve_config(scale, overrides, backbone, space)
    threads = int(threads or cfg["threads"])
    device = device or ("cuda" if scale == "gpu" and torch.cuda.is_available() else "cpu")
    if record_workers is None:
        record_workers = min(8, usable_cores()) if scale == "gpu" else 1
    elif isinstance(record_workers, bool) or not isinstance(record_workers, int) or record_workers < 1:
        raise StudyError(f"record_workers must be a positive integer, got {record_workers!r}")
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


def _analyse(runs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Comparisons (with verdicts) and controllability of one training seed's runs."""
    comps = comparisons(runs, cfg)
    for c in comps:
        c["verdict"] = _verdict(c)
    return {"comparisons": comps, "controllability": controllability(runs)}


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
        f"output {out}"
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
    results: dict[str, Any] = {
        "study": {
            "scale": scale,
            "seed": seed,
            "threads": threads,
            "device": device,
            "deterministic_algorithms": "warn_only" if device.startswith("cuda") else True,
            "config": cfg,
            "command": command or f"--scale {scale} --seed {seed}",
        },
        "machine": _machine(device),
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
    results["comparisons"] = comparisons(results["runs"], cfg)
    for c in results["comparisons"]:
        c["verdict"] = _verdict(c)
    results["controllability"] = controllability(results["runs"])
    per_seed = {seed: {"comparisons": results["comparisons"], "controllability": results["controllability"]}}
    for s_, rep_ in replicates.items():
        if s_ != seed:
            per_seed[s_] = _analyse(rep_["runs"], cfg)
    results["replicates"] = {
        str(s_): {**{k: v for k, v in r.items() if k != "runs"}, **per_seed[s_]} for s_, r in replicates.items()
    }
    results["across_seeds"] = seeds_mod.across_seeds(per_seed)
    for c in results["across_seeds"]:
        c["verdict"] = seeds_mod.verdict(c)
    write_report(study, results, segments)
    results["stages_run_now"] = study.executed
    results["timings"]["this_invocation"] = time.perf_counter() - t_start
    _write_json(out / "results.json", results)
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
        help="processes that record the clips, one game each; the same recordings for any N (default: one per CPU core, "
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
