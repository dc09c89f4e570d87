"""What a study runs: its scales, spaces and variants, and the configuration they resolve to.

A scale (``smoke``, ``cpu``, ``gpu``) fixes every size and budget; the space (latent, patch, pixel)
and the backbone (UNet3D, Wan) overlay theirs; ``--set SECTION.KEY=VALUE`` overrides one setting.
:func:`resolve_config` does all of that and refuses what cannot run before any work starts; the
result is what ``DIR/study.json`` records. Also the names every other module shares: the baselines'
run names, the fixed diagnostic noise levels and :class:`StudyError`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from benchmarks.atari import data as atari_data
from benchmarks.atari import patches
from benchmarks.atari.backbones import UNET3D, WAN, backbone_of, get_backbone

__all__ = [
    "AUTOENCODER",
    "BASELINE",
    "BASELINE_AE",
    "CONTEXT_LEVELS",
    "DENOISE_LEVELS",
    "DIT_LATENT_SCALES",
    "DIT_SCALES",
    "FINETUNE_DEFAULTS",
    "FIRST_FRAMES",
    "LATENT_SCALES",
    "MAIN",
    "SCALES",
    "SPACES",
    "STUDY_ONLY",
    "VARIANTS",
    "StudyError",
    "check_episodes",
    "default_space",
    "eval_runs",
    "model_input",
    "normalised_identity",
    "replicate_variants",
    "resolve_config",
    "run_name",
    "variant_pipeline",
]

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
FINETUNE_DEFAULTS = {"motion_weight": 0.0, "adapter_lr_scale": 1.0, "episodes": None}
#: The study's fine-tuning settings that are not TrainConfig fields.
STUDY_ONLY = ("episodes",)


class StudyError(RuntimeError):
    """The study cannot run as asked (e.g. DIR holds a study with another configuration)."""


def normalised_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """A recorded study.json with the settings added since filled in at their old values."""
    cfg = ident.setdefault("config", {})
    cfg.setdefault("backbone", UNET3D.name)  # recorded before backbones existed
    for key, value in _DEFAULTS.items():  # recorded before issue 17
        cfg.setdefault(key, copy.deepcopy(value))
    if isinstance(cfg.get("finetune"), dict):
        cfg["finetune"] = {**FINETUNE_DEFAULTS, **cfg["finetune"]}
    return ident


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
    cfg["finetune"] = {**FINETUNE_DEFAULTS, **cfg["finetune"]}
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
    check_episodes(cfg["finetune"]["episodes"], cfg["data"]["train_episodes"])  # before hours of work
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


def check_episodes(episodes: Any, recorded: int) -> None:
    """Refuse a ``finetune.episodes`` that is not null or an integer from 1 to ``recorded``."""
    if episodes is not None and (
        isinstance(episodes, bool) or not isinstance(episodes, int) or not 1 <= episodes <= recorded
    ):
        raise StudyError(f"finetune.episodes must be an integer from 1 to {recorded} (the recorded ones) or null")
