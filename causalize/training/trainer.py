"""Fine-tune a converted world model with the Diffusion Forcing objective (METHOD.md §6–§7).

    from causalize.training.trainer import TrainConfig, train

    config = TrainConfig(model="./causal-wm", data="./episodes", output_dir="./run", steps=1000)
    result = train(config, progress=lambda step, total, loss: ...)

One step: a batch of windows from an :class:`~causalize.training.data.EpisodeDataset` (optionally
encoded per frame by a frozen VAE) is moved to the denoiser's native layout; every frame draws its
own noise level (``timestep_mode="independent"``, Diffusion Forcing; ``"shared"`` is the
plain-diffusion baseline), actions are dropped per frame with probability ``action_dropout`` (and
wherever the data has none: the first frame of an episode), the converted model predicts v (or ε)
for every frame through :class:`causalize.WorldModel`, and the loss is
:func:`~causalize.training.objective.diffusion_forcing_loss`. AdamW, gradient clipping, gradient
accumulation and mixed precision; one CPU, one GPU or many GPUs through ``accelerate launch``
without code changes (``batch_size`` is per device).

Reproducibility: every random draw of step ``s`` (timesteps, noise, action dropout, VAE latent
sampling, the global torch RNG for dropout layers) comes from a generator seeded with
``(seed, s, micro-batch, process)``, and the data order of epoch ``e`` is a permutation seeded
with ``(seed, e)``. Resuming from ``checkpoints/step-N`` therefore takes exactly the step N+1 that
an uninterrupted run would have taken.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per logged step),
``checkpoints/step-N/`` (``accelerator.save_state`` + ``trainer_state.json``, written atomically)
and ``final/`` (the trained model as a causalize checkpoint, loadable with
``WorldModel.from_pretrained``). The library prints nothing; ``progress(step, total, loss)`` is
called on the main process after every optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Sampler

from causalize.errors import UsageError
from causalize.world_model import conditioning_kwargs
from causalize.training.objective import (
    PREDICTION_TYPES,
    TIMESTEP_MODES,
    NoiseSchedule,
    action_keep_mask,
    diffusion_forcing_loss,
    sample_frame_timesteps,
)

if TYPE_CHECKING:
    from torch import nn

    from causalize.plan import Plan
    from causalize.world_model import WorldModel

__all__ = [
    "CHECKPOINT_DIR",
    "FINAL_DIR",
    "METRICS_FILE",
    "EpochSampler",
    "Progress",
    "StepInputs",
    "TrainConfig",
    "TrainingError",
    "compute_loss",
    "conditioning_kwargs",
    "draw_step_inputs",
    "latest_checkpoint",
    "step_generator",
    "to_native_layout",
    "train",
]

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
STATE_FILE = "trainer_state.json"
TRAINING_FILE = "training.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

#: progress(step, total_steps, loss) after every optimizer step (main process only).
Progress = Callable[[int, int, float], None]

MIXED_PRECISION = ("no", "fp16", "bf16")
TRAIN_ONLY = ("all", "adapter")


class TrainingError(UsageError):
    """A training run cannot start or continue: missing paths, a model and a dataset that do not
    fit together (channels, action dimension), a bad setting. CLI exit code 2."""

    kind = "training-error"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
    #: Dataset split: "train", "test" or None (every episode); see EpisodeDataset.
    split: str | None = "train"
    #: Fraction of episodes held out as the test split.
    test_fraction: float = 0.1
    #: Step between window starts inside an episode.
    stride: int = 1
    #: DataLoader worker processes (0: load in the training process).
    num_workers: int = 0

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
            raise TrainingError(f"{where}: unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                                "valid settings: " + ", ".join(names))
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if values.get(k) is None]
        if missing:
            raise TrainingError(f"{where}: missing required setting(s) {', '.join(missing)}",
                                "set them in the config file or on the command line (--model, --data, --out)")
        return cls(**{k: v for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) file, then apply ``overrides`` (keys whose
        value is None are ignored, so unset command-line options keep the file's value). The
        settings may sit at the top level or under a ``train`` table. ``path`` None: only the
        overrides. Relative paths in the file are taken relative to the working directory."""
        values: dict[str, Any] = {}
        where = "config"
        if path is not None:
            p = Path(path)
            where = str(p)
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
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values, where)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        def bad(name: str, why: str) -> TrainingError:
            return TrainingError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("model", "data", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise bad(name, "must be a path")
            setattr(self, name, str(value))
        for name in ("window", "batch_size", "steps", "gradient_accumulation", "log_every", "stride"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("checkpoint_every", "keep_checkpoints", "num_workers", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if not _is_real(self.lr) or not self.lr > 0:
            raise bad("lr", "must be a positive number")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "must be a non-negative number")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip < 0):
            raise bad("grad_clip", "must be a non-negative number or null")
        if not _is_real(self.action_dropout) or not 0.0 <= self.action_dropout < 1.0:
            raise bad("action_dropout", "must be a number in [0, 1)")
        if not _is_real(self.test_fraction) or not 0.0 <= self.test_fraction <= 1.0:
            raise bad("test_fraction", "must be a number in [0, 1]")
        choices = {
            "prediction_type": tuple(p for p in PREDICTION_TYPES if p != "sample"),
            "timestep_mode": TIMESTEP_MODES,
            "mixed_precision": MIXED_PRECISION,
            "train_only": TRAIN_ONLY,
        }
        if self.prediction_type == "v_prediction":
            self.prediction_type = "v"
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise bad(name, "must be one of " + ", ".join(valid))
        if self.device not in (None, "cpu", "cuda"):
            raise bad("device", 'must be "cpu", "cuda" or null (accelerate places each process on its own GPU)')
        if self.split not in (None, "train", "test"):
            raise bad("split", 'must be "train", "test" or null')
        for name in ("zero_terminal_snr", "gradient_checkpointing", "log_per_frame"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if isinstance(self.resume, os.PathLike):
            self.resume = str(self.resume)
        if not isinstance(self.resume, (bool, str)):
            raise bad("resume", "must be true, false or a checkpoint path")
        for name in ("vae", "conditioning"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise bad(name, "must be a path or null")
                setattr(self, name, str(value))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts, identical on every platform and process."""
    digest = hashlib.blake2b(":".join(map(str, ("causalize-train", *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw of (step, micro-batch, process): resumable by construction."""
    return torch.Generator(device=device).manual_seed(_derive_seed("step", seed, step, micro, process))


class EpochSampler(Sampler[int]):
    """A random permutation of the dataset per epoch, seeded with (seed, epoch): the data order
    depends only on the seed and the epoch, so a resumed run sees the same windows."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(_derive_seed("epoch", self.seed, self.epoch))
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


# --------------------------------------------------------------------------------------------
# One step's inputs and loss
# --------------------------------------------------------------------------------------------


def to_native_layout(frames: torch.Tensor, frame_axis: int) -> torch.Tensor:
    """(B, T, C, H, W) dataset frames -> the denoiser's layout, frames on ``frame_axis``
    (UNet3D / DiTs: (B, C, T, H, W) with axis 2; SVD: (B, T, C, H, W) with axis 1)."""
    return frames.movedim(1, frame_axis)


@dataclass
class StepInputs:
    """The random draws of one training micro-step (all on the data's device)."""

    timesteps: torch.Tensor  # (B, T) long
    noise: torch.Tensor  # like x0
    keep: torch.Tensor  # (B, T) bool: True = the frame's action is used
    x_k: torch.Tensor  # the noised sample, like x0


def draw_step_inputs(
    x0: torch.Tensor,
    action_mask: torch.Tensor | None,
    *,
    schedule: NoiseSchedule,
    frame_axis: int,
    generator: torch.Generator,
    timestep_mode: str = "independent",
    action_dropout: float = 0.2,
) -> StepInputs:
    """Per-frame noise levels, Gaussian noise, the action keep mask and x_k = q_sample, drawn in
    this fixed order from ``generator``. ``keep`` = action_keep_mask(p) & ``action_mask`` (frames
    without an action, e.g. an episode's first frame, stay dropped)."""
    batch, frames = x0.shape[0], x0.shape[frame_axis]
    device = x0.device
    timesteps = sample_frame_timesteps(batch, frames, schedule.num_train_timesteps, generator, device, mode=timestep_mode)
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    keep = action_keep_mask(batch, frames, action_dropout, generator, device)
    if action_mask is not None:
        keep = keep & action_mask.to(device=device, dtype=torch.bool)
    x_k = schedule.q_sample(x0, noise, timesteps, frame_axis)
    return StepInputs(timesteps, noise, keep, x_k)


def compute_loss(
    model: nn.Module,
    x0: torch.Tensor,
    actions: torch.Tensor | None,
    action_mask: torch.Tensor | None,
    *,
    schedule: NoiseSchedule,
    frame_axis: int,
    generator: torch.Generator,
    model_kwargs: Mapping[str, Any] | None = None,
    prediction_type: str = "v",
    timestep_mode: str = "independent",
    action_dropout: float = 0.2,
    output_axis: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, StepInputs]:
    """The Diffusion Forcing loss of one micro-batch: ``x0`` in the model's native layout (frames
    on ``frame_axis``), ``model`` a :class:`causalize.WorldModel` (or anything called as
    ``model(x_k, timesteps, actions, keep, **model_kwargs)``). Returns (loss, per-frame losses
    (B, T), the step's draws)."""
    draws = draw_step_inputs(x0, action_mask, schedule=schedule, frame_axis=frame_axis, generator=generator,
                             timestep_mode=timestep_mode, action_dropout=action_dropout)
    out = model(draws.x_k, draws.timesteps, actions, draws.keep, **dict(model_kwargs or {}))
    if output_axis is not None and output_axis != frame_axis:
        out = out.movedim(output_axis, frame_axis)
    if out.shape != x0.shape:
        raise TrainingError(
            f"the model's output has shape {tuple(out.shape)} but its input sample has {tuple(x0.shape)}",
            "train a model whose out_channels equal its in_channels (no learned variance channels)",
        )
    target = schedule.target(x0, draws.noise, draws.timesteps, prediction_type, frame_axis)
    loss, per_frame = diffusion_forcing_loss(out, target, frame_axis, return_per_frame=True)
    return loss, per_frame, draws




# --------------------------------------------------------------------------------------------
# Gradient checkpointing that keeps the frame context
# --------------------------------------------------------------------------------------------

def _enable_gradient_checkpointing(model: nn.Module) -> bool:
    from causalize.context import enable_gradient_checkpointing

    if enable_gradient_checkpointing(model):
        return True
    warnings.warn(f"{type(model).__name__} does not support gradient checkpointing; training without it", stacklevel=3)
    return False


# --------------------------------------------------------------------------------------------
# Checkpoints on disk
# --------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``output_dir/checkpoints/step-N`` (None if there is none)."""
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary directory into place (an existing dest is replaced)."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.time_ns()}"
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def _open_dataset(config: TrainConfig):
    from causalize.training.data import DataError, EpisodeDataset

    if not Path(config.data).exists():
        raise TrainingError(f"dataset not found: {config.data}", "pass the root of an episode dataset (docs/EPISODES.md)")
    try:
        return EpisodeDataset(config.data, config.window, stride=config.stride, split=config.split, test_fraction=config.test_fraction)
    except DataError as exc:
        raise TrainingError(f"cannot use dataset {config.data}: {exc}") from exc


def _load_world_model(config: TrainConfig) -> WorldModel:
    from causalize.manifest import MANIFEST
    from causalize.world_model import WorldModel

    path = Path(config.model)
    if not path.exists():
        raise TrainingError(f"model checkpoint not found: {path}", "convert one first: causalize convert SRC OUT --action-dim N")
    if not (path / MANIFEST).is_file():
        raise TrainingError(f"{path} is not a converted causalize checkpoint (no {MANIFEST})",
                            "convert it first: causalize convert SRC OUT --action-dim N")
    return WorldModel.from_pretrained(path)


def _load_vae(path: str):
    import diffusers

    p = Path(path)
    if not p.exists():
        raise TrainingError(f"VAE not found: {p}")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"
    if not (p / "config.json").is_file():
        raise TrainingError(f"{p} is not a diffusers VAE directory (no config.json)")
    class_name = json.loads((p / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "encode"):
        raise TrainingError(f"{p}: {class_name} is not a diffusers autoencoder")
    vae = cls.from_pretrained(p).eval()
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def _encode(vae: Any, frames: torch.Tensor, generator: torch.Generator, chunk: int = 16) -> torch.Tensor:
    """(B, T, C, H, W) pixels in [-1, 1] -> (B, T, c, h, w) scaled latents, each frame on its own."""
    b, t = frames.shape[:2]
    flat = frames.flatten(0, 1).to(next(vae.parameters()).dtype)
    latents = [vae.encode(x).latent_dist.sample(generator=generator) for x in flat.split(chunk)]
    z = torch.cat(latents)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = (z - shift) * vae.config.scaling_factor
    return z.float().reshape(b, t, *z.shape[1:])


def _sample_channels(plan: Plan, model: nn.Module, frames: int) -> int | None:
    """Channels of the denoiser's sample (from the plan's example input), None if not 5-D."""
    cond = plan.conditioning
    sample = plan.make_inputs(model, frames, torch.Generator().manual_seed(0))[cond.sample_arg]
    if sample.ndim != 5:
        return None
    return int(sample.movedim(plan.layout.inputs[cond.sample_arg], 1).shape[2])


def _check_compatible(wm: WorldModel, info: Any, vae: Any, config: TrainConfig) -> None:
    space = info.action_space
    encoder = wm.action_encoder
    if encoder is None:
        raise TrainingError(
            f"the model at {config.model} has no action adapter, but the dataset has {space.width}-dimensional {space.type} actions",
            f"convert it with an adapter: causalize convert SRC OUT --action-dim {space.width}",
        )
    if encoder.action_dim != space.width:
        raise TrainingError(
            f"action dimension mismatch: the dataset's action space has {space.width} dimensions ({space.type}) "
            f"but the model's action adapter expects {encoder.action_dim}",
            f"convert the model with --action-dim {space.width}, or use a dataset with {encoder.action_dim}-dimensional actions",
        )
    if encoder.action_type != space.type:
        raise TrainingError(f"action type mismatch: the dataset's actions are {space.type}, the model's adapter is {encoder.action_type}",
                            f"convert the model with --action-type {space.type}")
    data_channels = info.channels
    source = f"the dataset's {info.kind}"
    if vae is not None:
        if info.kind != "pixels":
            raise TrainingError(f"vae is set but the dataset {config.data} stores {info.kind}", "drop vae, or use a pixel dataset")
        vae_in = int(getattr(vae.config, "in_channels", data_channels))
        if vae_in != data_channels:
            raise TrainingError(f"channel mismatch: the dataset's pixels have {data_channels} channels but the VAE takes {vae_in}")
        data_channels = int(vae.config.latent_channels)
        source = "the VAE's latents"
    model_channels = _sample_channels(wm.plan, wm.model, min(config.window, 4))
    if model_channels is not None and model_channels != data_channels:
        hint = ("set vae to the base model's VAE to train on latents" if vae is None and info.kind == "pixels"
                else "train a model whose in_channels equal the data's channels")
        raise TrainingError(f"channel mismatch: {source} have {data_channels} channels but the model's sample has {model_channels}", hint)


def _select_trainable(wm: WorldModel, train_only: str) -> list[torch.nn.Parameter]:
    wm.requires_grad_(train_only == "all")
    if train_only == "adapter":
        encoder = wm.action_encoder
        if encoder is None:
            raise TrainingError("train_only='adapter' needs a model with an action adapter")
        encoder.requires_grad_(True)
    return [p for p in wm.parameters() if p.requires_grad]


def _load_overrides(path: str | None) -> dict[str, torch.Tensor]:
    if path is None:
        return {}
    if not Path(path).is_file():
        raise TrainingError(f"conditioning file not found: {path}")
    from safetensors.torch import load_file

    return load_file(path)


def _prepare_output(config: TrainConfig, is_main: bool) -> tuple[Path | None, int]:
    """(checkpoint to resume from, its step); refuses to mix a fresh run into an old one."""
    out = Path(config.output_dir)
    if config.resume is False:
        if (out / METRICS_FILE).exists() or _checkpoints(out) or (out / FINAL_DIR).exists():
            raise TrainingError(f"{out} already holds a training run",
                                "continue it with resume=True (CLI: --resume), or choose another output directory")
        return None, 0
    if config.resume is True:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            return None, 0
    else:
        ckpt = Path(config.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise TrainingError(f"not a training checkpoint: {ckpt} (no {STATE_FILE})")
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    saved = state.get("config", {})
    differs = [k for k in ("seed", "batch_size", "window", "gradient_accumulation", "timestep_mode", "action_dropout", "data", "split")
               if k in saved and saved[k] != getattr(config, k)]
    if differs and is_main:
        warnings.warn(f"resuming from {ckpt} with different {', '.join(differs)}: the run will not replay the uninterrupted one",
                      stacklevel=3)
    return ckpt, int(state["step"])


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metrics lines of steps later than the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= after_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def train(config: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (steps, final loss, seconds, paths, ...)."""
    from accelerate import Accelerator

    from causalize.manifest import Manifest

    t_start = time.perf_counter()
    config.validate()
    dataset = _open_dataset(config)
    wm = _load_world_model(config)
    vae = _load_vae(config.vae) if config.vae else None
    _check_compatible(wm, dataset.info, vae, config)
    overrides = _load_overrides(config.conditioning)

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # Several processes without CUDA (torchrun on CPUs): accelerate joins them only with cpu=True.
    cpu_ddp = world > 1 and not torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device='cuda' but this torch has no usable CUDA device", "use --device cpu")
    try:
        cpu = cpu_ddp or config.device == "cpu"
        accelerator = Accelerator(mixed_precision=config.mixed_precision, **({"cpu": True} if cpu else {}))
    except (ValueError, RuntimeError) as exc:
        raise TrainingError(f"accelerate cannot set up mixed_precision={config.mixed_precision!r}: {exc}") from exc
    if accelerator.num_processes != world:
        raise TrainingError(f"{world} processes were launched but accelerate set up {accelerator.num_processes}",
                            "launch with `accelerate launch` (see `accelerate config`) or torchrun")
    device, rank, is_main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    out = Path(config.output_dir)
    resume_from, start_step = _prepare_output(config, is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    plan = wm.plan
    cond = plan.conditioning
    frame_axis = plan.layout.inputs[cond.sample_arg]
    output_axis = plan.layout.output_axis
    schedule = NoiseSchedule.from_config(rescale_zero_terminal_snr=config.zero_terminal_snr)
    if config.prediction_type == "epsilon" and config.zero_terminal_snr and is_main:
        warnings.warn("epsilon prediction with a zero-terminal-SNR schedule: the last step's target carries no information "
                      "about the frame (METHOD.md §6); prefer prediction_type='v'", stacklevel=2)
    model_kwargs = conditioning_kwargs(plan, wm.model, config.batch_size, config.window, overrides, device)

    if any(p.is_floating_point() and p.dtype != torch.float32 for p in wm.parameters()):
        wm.float()  # fp32 master weights; mixed precision autocasts the forward
    wm.train()
    checkpointing = _enable_gradient_checkpointing(wm.model) if config.gradient_checkpointing else False
    params = _select_trainable(wm, config.train_only)
    n_params = sum(p.numel() for p in wm.parameters())
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = EpochSampler(len(dataset), config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True, num_workers=config.num_workers)
    if vae is not None:
        vae.to(device)
    model, optimizer, loader = accelerator.prepare(wm, optimizer, loader)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise TrainingError(f"the dataset has {len(dataset)} windows of {config.window} frames, fewer than one batch of "
                            f"{config.batch_size} per process", "lower batch_size or window, or add episodes")

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    if is_main and config.resume is not False:
        _truncate_metrics(out / METRICS_FILE, start_step)

    def micro_batches(start: int) -> Iterator[dict[str, Any]]:
        epoch, skip = divmod(start, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            if hasattr(loader, "set_epoch"):  # accelerate's loader re-applies its own epoch on iteration
                loader.set_epoch(epoch)
            yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
            epoch, skip = epoch + 1, 0

    accum = config.gradient_accumulation
    batches = micro_batches(start_step * accum)
    samples_per_step = config.batch_size * accum * accelerator.num_processes
    checkpoints: list[str] = []
    metrics_path = out / METRICS_FILE
    last_loss = math.nan
    since_log: list[float] = []
    t_train = time.perf_counter()
    step = start_step
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.perf_counter()
        losses, per_frame_sum = [], None
        for micro in range(accum):
            batch = next(batches)
            gen = step_generator(config.seed, step, micro, rank, device)
            torch.manual_seed(_derive_seed("global", config.seed, step, micro, rank))  # dropout layers, if any
            frames = batch["frames"].to(device)
            if vae is not None:
                frames = _encode(vae, frames, gen)
            x0 = to_native_layout(frames, frame_axis)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync:
                loss, per_frame, _ = compute_loss(
                    model, x0, batch["actions"], batch["action_mask"], schedule=schedule, frame_axis=frame_axis,
                    generator=gen, model_kwargs=model_kwargs, prediction_type=config.prediction_type,
                    timestep_mode=config.timestep_mode, action_dropout=config.action_dropout, output_axis=output_axis,
                )
                accelerator.backward(loss / accum)
            losses.append(loss.detach())
            pf = per_frame.detach().mean(0)
            per_frame_sum = pf if per_frame_sum is None else per_frame_sum + pf
        grad_norm = None
        if config.grad_clip:
            grad_norm = accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = accelerator.gather(torch.stack(losses).mean().reshape(1)).mean()
        last_loss = float(step_loss)
        seconds = time.perf_counter() - t0
        since_log.append(last_loss)
        should_log = step % config.log_every == 0 or step == config.steps
        per_frame_all = None
        if should_log and config.log_per_frame:  # every process takes part in the gather
            per_frame_all = accelerator.gather((per_frame_sum / accum)[None]).mean(0)
        if is_main:
            if should_log:
                record: dict[str, Any] = {
                    "step": step,
                    "loss": last_loss,
                    "loss_avg": sum(since_log) / len(since_log),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "seconds_per_step": seconds,
                    "samples_per_second": samples_per_step / seconds if seconds > 0 else None,
                    "epoch": ((step - 1) * accum) // per_epoch,
                }
                if per_frame_all is not None:
                    record["loss_per_frame"] = [float(v) for v in per_frame_all]
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(step, config.steps, last_loss)
        if should_log:
            since_log = []
        if config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
            checkpoints.append(str(_save_checkpoint(accelerator, out, step, last_loss, config)))
    train_seconds = time.perf_counter() - t_train

    final = out / FINAL_DIR
    accelerator.wait_for_everyone()
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        tmp = out / f".{FINAL_DIR}.tmp-{os.getpid()}-{time.time_ns()}"
        try:
            unwrapped.model.save_pretrained(tmp, safe_serialization=True)
            Manifest.read(Path(config.model)).write(tmp)
            _write_json(tmp / TRAINING_FILE, {"step": step, "final_loss": last_loss, "config": config.to_json(),
                                               "resumed_from": None if resume_from is None else str(resume_from)})
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    steps_run = step - start_step if config.steps > start_step else 0
    return {
        "output_dir": str(out),
        "final": str(final),
        "metrics": str(metrics_path),
        "checkpoints": checkpoints,
        "start_step": start_step,
        "steps": max(step, start_step),
        "steps_run": steps_run,
        "final_loss": last_loss,
        "seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "samples_per_second": steps_run * samples_per_step / train_seconds if steps_run and train_seconds > 0 else None,
        "resumed_from": None if resume_from is None else str(resume_from),
        "num_processes": accelerator.num_processes,
        "device": str(device),
        "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": checkpointing,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
    }


def _save_checkpoint(accelerator: Any, out: Path, step: int, loss: float, config: TrainConfig) -> Path:
    """accelerator.save_state into a temporary directory, then trainer_state.json, then rename."""
    root = out / CHECKPOINT_DIR
    dest = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, {"step": step, "loss": loss, "config": config.to_json()})
        _replace_dir(tmp, dest)
        if config.keep_checkpoints:
            for _, old in _checkpoints(out)[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return dest
