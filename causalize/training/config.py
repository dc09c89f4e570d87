"""The settings of a training run: :class:`TrainConfig`, read from JSON / TOML and validated.

Apart from the trainer so that the CLI, the benchmarks and the checkpoint code can read and check
a configuration without importing the training loop (accelerate, the data loader) or torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from causalize.errors import UsageError

__all__ = [
    "MIXED_PRECISION",
    "PREDICTION_TYPES",
    "TIMESTEP_MODES",
    "TRAIN_ONLY",
    "TrainConfig",
    "TrainingError",
    "cli_option",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
TRAIN_ONLY = ("all", "adapter")
#: The targets the trainer regresses: causalize.noise.PREDICTION_TYPES without "sample". Spelt out
#: here rather than imported, so that reading and checking a config (the CLI does it before
#: anything else) does not import torch; a test keeps the two in step.
PREDICTION_TYPES = ("v", "epsilon")
#: How noise levels are drawn per window (see causalize.training.objective.sample_frame_timesteps).
TIMESTEP_MODES: tuple[str, ...] = ("independent", "shared")
#: The `causalize train` options not spelt as their setting in kebab case (the rest: see cli_option).
_CLI_NAMES = {"output_dir": "--out"}


def cli_option(name: str) -> str:
    """The `causalize train` option that sets the setting ``name``, so that an error about a
    setting names what to pass on the command line as well as the config key."""
    return _CLI_NAMES.get(name, "--" + name.replace("_", "-"))


class TrainingError(UsageError):
    """A training run cannot start or continue: missing paths, a model and a dataset that do not
    fit together (channels, action dimension), a bad setting. CLI exit code 2."""

    kind = "training-error"


@dataclass
class TrainConfig:
    """Every setting of a training run. Load one from a JSON or TOML file with
    :meth:`from_file` (keyword arguments override the file); the fields are the file's keys."""

    #: Converted checkpoint with frame-conditioning and an action adapter
    #: (``causalize convert SRC OUT --action-dim N``), i.e. loadable by ``WorldModel.from_pretrained``.
    model: str
    #: Root of an episode dataset (docs/EPISODES.md).
    data: str
    #: Where metrics.jsonl, checkpoints/ and final/ are written.
    output_dir: str
    #: Frames per training window (the paper: 16).
    window: int = 16
    #: Windows per device per micro-batch; the global batch is
    #: batch_size × gradient_accumulation × number of processes.
    batch_size: int = 2
    #: Optimizer steps to reach (a resumed run continues up to this step).
    steps: int = 1000
    #: AdamW learning rate (constant; the paper: 1e-5).
    lr: float = 1e-5
    #: The action adapter's learning rate as a multiple of ``lr``. The adapter is new and starts
    #: at zero while the denoiser is pretrained: at the denoiser's rate it may barely move in a
    #: short run. 1: one rate for all (the paper). With train_only="adapter" the whole run is at
    #: lr × adapter_lr_scale. Resuming cannot switch between 1 and another value (unless only
    #: the adapter trains: then there is one rate either way).
    adapter_lr_scale: float = 1.0
    #: AdamW decoupled weight decay (torch's AdamW default).
    weight_decay: float = 1e-2
    #: Clip the global gradient norm to this value (the paper: 0.5); None or 0 disables clipping.
    grad_clip: float | None = 0.5
    #: What the denoiser predicts: "v" (v-prediction, the default and what zero terminal SNR
    #: needs) or "epsilon".
    prediction_type: str = "v"
    #: Rescale the scaled-linear schedule to zero terminal SNR (Lin et al.; METHOD.md §6).
    zero_terminal_snr: bool = True
    #: Probability of replacing a frame's action by the null action, independently per sample and
    #: frame (METHOD.md §7: 0.2). In [0, 1).
    action_dropout: float = 0.2
    #: Weight the loss towards what moves: each squared error is weighted by 1 + motion_weight ·
    #: (how much that element of the clean clip changes from the previous frame, relative to the
    #: clip's mean change), rescaled to mean 1 (objective.motion_weights). 0: the plain loss (the
    #: paper). For small controlled objects over a static scene (Atari), where the plain loss
    #: hardly sees what the actions move. The logged loss is the weighted one. Through a --vae the
    #: weights see sampled latents (posterior noise counts as change).
    motion_weight: float = 0.0
    #: "independent": a noise level per sample and frame (Diffusion Forcing); "shared": one per
    #: sample, repeated over its frames (plain video diffusion, the baseline).
    timestep_mode: str = "independent"
    #: accelerate's mixed precision: "no", "fp16" (the paper) or "bf16". Weights are trained in
    #: fp32 (a half-precision checkpoint is upcast); the loss is always computed in fp32.
    mixed_precision: str = "no"
    #: "cpu" trains on the CPU even where CUDA exists, "cuda" requires a GPU; None lets
    #: accelerate choose (CUDA when available).
    device: str | None = None
    #: Recompute activations in backward when the diffusers model supports it (its
    #: enable_gradient_checkpointing); a warning otherwise.
    gradient_checkpointing: bool = False
    #: Micro-batches per optimizer step.
    gradient_accumulation: int = 1
    #: Seed of everything random: data order, noise levels, noise, action dropout.
    seed: int = 0
    #: Save checkpoints/step-N every this many steps, and at the last step (0: never).
    checkpoint_every: int = 500
    #: Keep only the newest this many checkpoints (0: keep all).
    keep_checkpoints: int = 0
    #: Write a metrics.jsonl line every this many steps, and at the last step.
    log_every: int = 10
    #: Include the loss per frame index (mean over the batch) in every metrics line.
    log_per_frame: bool = True
    #: Optional frozen image VAE (a diffusers AutoencoderKL directory, or a pipeline directory
    #: with vae/): pixel frames are encoded per frame under no_grad and scaled by its
    #: scaling_factor (after subtracting shift_factor, if any). None: the denoiser is trained on
    #: the dataset's frames as they are (pixels for small models, or stored latents).
    vae: str | None = None
    #: Optional safetensors file of model keyword arguments at batch 1 (e.g. the base model's
    #: empty-prompt text embedding as "encoder_hidden_states"), used instead of zeros.
    conditioning: str | None = None
    #: "all": train the whole denoiser; "adapter": only the action encoder.
    train_only: str = "all"
    #: False: start fresh (output_dir must not hold a previous run); True: continue from the
    #: newest checkpoint in output_dir/checkpoints (fresh if there is none); a path: continue
    #: from that checkpoint directory.
    resume: bool | str = False
    #: Dataset split: "train", "test" or None (every episode; "all" is read as None, the
    #: spelling for TOML, which has no null); see EpisodeDataset and docs/EPISODES.md.
    split: str | None = "train"
    #: Fraction of episodes held out as the test split (split seed 0, whatever ``seed`` is).
    test_fraction: float = 0.1
    #: Step between window starts inside an episode.
    stride: int = 1
    #: DataLoader worker processes (0: load in the training process).
    num_workers: int = 0
    #: Read every episode once at the start against the checksums its file recorded
    #: (docs/EPISODES.md); false skips that read, for datasets too large to read at every start.
    verify_data: bool = True
    #: Skip episodes shorter than the window (with a warning) instead of refusing the dataset.
    skip_short: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> TrainConfig:
        """A config from a mapping of field names; unknown or missing keys are errors."""
        names = cls.fields()
        unknown = [k for k in values if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1)
            raise TrainingError(
                f"{where}: unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                "valid settings: " + ", ".join(names),
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if values.get(k) is None]
        if missing:
            raise TrainingError(
                f"{where}: missing required setting(s) {', '.join(missing)}",
                "set them in the config file or on the command line (--model, --data, --out)",
            )
        return cls(**{k: v for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) file, then apply ``overrides`` (keys whose
        value is None are ignored, so unset command-line options keep the file's value). The
        settings may sit at the top level or under a ``train`` table. ``path`` None: only the
        overrides. Relative paths in the file are taken relative to the working directory."""
        values = {} if path is None else _read_settings(Path(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values, "config" if path is None else str(Path(path)))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Check every setting (types, ranges, choices) and normalise paths to str; a bad value
        raises TrainingError naming the setting."""
        for name in ("model", "data", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise self._bad(name, "must be a path")
            setattr(self, name, str(value))
        self._validate_numbers()
        self._validate_choices()
        for name in ("zero_terminal_snr", "gradient_checkpointing", "log_per_frame", "verify_data", "skip_short"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "must be true or false")
        if isinstance(self.resume, os.PathLike):
            self.resume = str(self.resume)
        if not isinstance(self.resume, (bool, str)):
            raise self._bad("resume", "must be true, false or a checkpoint path")
        for name in ("vae", "conditioning"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise self._bad(name, "must be a path or null")
                setattr(self, name, str(value))

    def _bad(self, name: str, why: str) -> TrainingError:
        return TrainingError(
            f"{name}={getattr(self, name)!r}: {why}",
            f"set {cli_option(name)} on the command line, or {name} in the config file",
        )

    def _validate_numbers(self) -> None:
        for name in ("window", "batch_size", "steps", "gradient_accumulation", "log_every", "stride"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise self._bad(name, "must be a positive integer")
        for name in ("checkpoint_every", "keep_checkpoints", "num_workers", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise self._bad(name, "must be a non-negative integer")
        if not _is_real(self.lr) or not self.lr > 0:
            raise self._bad("lr", "must be a positive number")
        if not _is_real(self.motion_weight) or self.motion_weight < 0:
            raise self._bad("motion_weight", "must be a non-negative number")
        if not _is_real(self.adapter_lr_scale) or not self.adapter_lr_scale > 0:
            raise self._bad("adapter_lr_scale", "must be a positive number")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise self._bad("weight_decay", "must be a non-negative number")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip < 0):
            raise self._bad("grad_clip", "must be a non-negative number or null")
        if not _is_real(self.action_dropout) or not 0.0 <= self.action_dropout < 1.0:
            raise self._bad("action_dropout", "must be a number in [0, 1)")
        if not _is_real(self.test_fraction) or not 0.0 <= self.test_fraction <= 1.0:
            raise self._bad("test_fraction", "must be a number in [0, 1]")

    def _validate_choices(self) -> None:
        choices = {
            "prediction_type": PREDICTION_TYPES,
            "timestep_mode": TIMESTEP_MODES,
            "mixed_precision": MIXED_PRECISION,
            "train_only": TRAIN_ONLY,
        }
        if self.prediction_type == "v_prediction":
            self.prediction_type = "v"
        if self.split == "all":
            self.split = None
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise self._bad(name, "must be one of " + ", ".join(valid))
        if self.device not in (None, "cpu", "cuda"):
            raise self._bad("device", 'must be "cpu", "cuda" or null (accelerate places each process on its own GPU)')
        if self.split not in (None, "train", "test"):
            raise self._bad("split", 'must be "train", "test" or "all" (null)')


def adapter_has_own_group(train_only: str, adapter_lr_scale: float) -> bool:
    """Whether the optimizer gives the action adapter a parameter group of its own: the one rule
    that building the optimizer and resuming a checkpoint both follow."""
    return train_only == "all" and float(adapter_lr_scale) != 1.0


def _read_settings(p: Path) -> dict[str, Any]:
    """The settings table of a .json / .toml config file (unwrapping a lone ``train`` table)."""
    if not p.is_file():
        raise TrainingError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            raise TrainingError(f"{p}: unknown config format {p.suffix!r}", "use a .json or .toml file")
    except (ValueError, TypeError) as exc:  # JSONDecodeError, TOMLDecodeError
        raise TrainingError(f"{p}: cannot parse: {exc}") from None
    if not isinstance(values, dict):
        raise TrainingError(f"{p}: expected a table / object of settings")
    if set(values) == {"train"} and isinstance(values["train"], dict):
        values = dict(values["train"])
    return values


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
