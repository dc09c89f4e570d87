"""A checkpoint ready to roll out: the world model, and sampler settings that match its training.

Precedence of every RolloutConfig field: an explicit option > the checkpoint's training.json (the
trainer's `prediction_type`, `zero_terminal_snr` and `window`) > the RolloutConfig default. A
model trained for ε on the plain schedule would produce garbage under the v / zero-terminal-SNR
defaults, so the trained settings must win unless the caller says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalize.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

    from causalize.rollout.sampler import RolloutConfig
    from causalize.world_model import WorldModel

TRAINING_FILE = "training.json"  # written by causalize.training.trainer next to the final model
FROM_TRAINING = ("prediction_type", "zero_terminal_snr", "window")


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The converted model directory: `path` itself, or `path/final` for a training run's output."""
    p = Path(path)
    if not (p / "causalize.json").is_file() and (p / "final" / "causalize.json").is_file():
        return p / "final"
    return p


def training_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """The sampler-relevant training settings recorded in training.json ({} when there is none)."""
    f = checkpoint_dir(path) / TRAINING_FILE
    doc = _training_record(f)
    if doc is None:
        return {}
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} has no 'config' object", "delete it to use the rollout defaults")
    found = {k: cfg[k] for k in FROM_TRAINING if cfg.get(k) is not None}
    if isinstance(found.get("window"), int) and found["window"] < 2:
        del found["window"]  # a 1-frame training window is no sliding window: keep the default
    return found


def resolve_config(checkpoint: str | os.PathLike | None = None, **options: Any) -> tuple[RolloutConfig, dict[str, str]]:
    """A validated RolloutConfig and, per field, where its value came from ("option",
    "training.json" or "default"). Options whose value is None count as not given."""
    from causalize.rollout.sampler import RolloutConfig

    names = [f.name for f in dataclasses.fields(RolloutConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(f"unknown rollout option(s) {', '.join(unknown)}", f"valid: {', '.join(names)}")
    trained = training_defaults(checkpoint) if checkpoint is not None else {}
    values: dict[str, Any] = {}
    sources = {name: "default" for name in names}
    for name in names:
        if options.get(name) is not None:
            values[name], sources[name] = options[name], "option"
        elif name in trained:
            values[name], sources[name] = trained[name], TRAINING_FILE
    config = RolloutConfig(**values)
    config.validate()
    return config, sources


def load_world_model(
    path: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[WorldModel, Path]:
    """The checkpoint as an eval-mode WorldModel on `device` (None: CUDA when available) in `dtype`
    (None: as stored), and the directory it came from. Device and dtype are checked before the
    weights are read; a model converted without frame conditioning is a UsageError."""
    from causalize.precision import check_dtype_on, parse_dtype, resolve_device
    from causalize.world_model import WorldModel

    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device, default_cuda=True)
    check_dtype_on(torch_dtype, dev)
    p = checkpoint_dir(path)
    if not p.exists():
        raise CheckpointError(
            f"{p} does not exist", "give a converted checkpoint (causalize convert ... --action-dim N)"
        )
    wm = WorldModel.from_pretrained(p, torch_dtype=torch_dtype, device=dev)
    if wm.image_condition is not None:  # the data's normalisation, for an image in raw units (SVD)
        wm.latent_norm = _latent_norm(p)
    return wm.eval(), p


def _latent_norm(p: Path) -> Any:
    """The normalisation training used for the image condition: the latent record's, else the one
    training.json names (a `--vae` run), else None."""
    from causalize.latents.record import read_model_record
    from causalize.latents.spec import LatentNorm

    record = read_model_record(p)
    if record is not None:
        return record.vae.norm
    doc = _training_record(p / TRAINING_FILE)
    norm = doc.get("latent_norm") if isinstance(doc, dict) else None
    return LatentNorm.from_json(norm) if isinstance(norm, dict) else None


def _training_record(f: Path) -> Any:
    """training.json's parsed contents, None when there is none; a corrupt one is a CheckpointError."""
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{f} is corrupt: {exc}", "delete it to use the rollout defaults, or re-run training"
        ) from None


__all__ = [
    "FROM_TRAINING",
    "TRAINING_FILE",
    "checkpoint_dir",
    "load_world_model",
    "resolve_config",
    "training_defaults",
]
