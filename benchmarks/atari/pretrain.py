"""Plain bidirectional video diffusion pretraining of a small pixel-space model on action-free clips.

This is the stand-in for an "internet video" model (Vid2World's DynamiCrafter): a diffusers
``UNet3DConditionModel`` (or a small ``WanTransformer3DModel`` DiT, see ``backbones.py``) over RGB
frames in [-1, 1], trained as an ordinary video diffusion model so that ``causalize.api.convert``
has a real bidirectional checkpoint to causalize.

What one step does, and why it matches the fine-tuning that follows:

* a batch of ``window``-frame windows of the clips dataset; **its actions are ignored** (the clips
  only carry the behaviour policy's actions because the episode format has no action-free mode);
* **one noise level per clip** (``timestep_mode="shared"``: plain video diffusion, not Diffusion
  Forcing), drawn uniformly in [0, 1000);
* v-prediction on the zero-terminal-SNR scaled-linear schedule (``NoiseSchedule.from_config()``),
  the same schedule and target the Diffusion-Forcing trainer uses (METHOD.md §6);
* the model's other inputs are exactly what the trainer passes (``conditioning_kwargs`` of the
  backbone's plan: an all-zero ``encoder_hidden_states``, the "empty prompt"), so the cross-attention
  sees the same constant input before and after conversion;
* AdamW with a linear warm-up then a constant learning rate, gradient clipping.

Reproducibility: the model is initialised from ``torch.manual_seed(seed)``; every step draws its
timesteps and noise from the trainer's ``step_generator(seed, step)``, reseeds the global RNG (for
the model's dropout layers) from ``(seed, step)``, and reads its windows in the trainer's per-epoch
order (``EpochSampler``). A checkpoint (model + optimizer + step) is written every
``checkpoint_every`` steps, and a resumed run takes exactly the steps an uninterrupted run would.

Outputs in ``output_dir``: ``model/`` (``save_pretrained``, safetensors), ``metrics.jsonl`` (loss
per logged step), ``pretrain.json`` (config, parameter count, timings; written last, so its
presence means the run finished) and, while running, ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks._common import record_text
from benchmarks.atari.backbones import get_backbone
from causalize import fs
from causalize.episodes import EpisodeDataset
from causalize.noise import NoiseSchedule, gaussian
from causalize.training.objective import sample_frame_timesteps
from causalize.training.trainer import EpochSampler, conditioning_kwargs, step_generator

__all__ = ["MODEL_DIR", "SUMMARY_FILE", "PretrainConfig", "build_model", "pretrain", "pretrain_step", "save_model"]

MODEL_DIR = "model"
SUMMARY_FILE = "pretrain.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
#: ``progress(step, total, loss)`` after every step.
Progress = Callable[[int, int, float], None]


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (recorded in ``pretrain.json``)."""

    data: str
    output_dir: str
    #: the model class's keyword arguments other than in/out channels and sample size.
    model: dict[str, Any] = field(default_factory=dict)
    #: ``unet3d`` or ``wan`` (``benchmarks.atari.backbones``)
    backbone: str = "unet3d"
    window: int = 8
    stride: int = 4
    batch_size: int = 4
    steps: int = 500
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_model(
    model_kwargs: dict[str, Any], channels: int, size: int, seed: int, backbone: str = "unet3d"
) -> torch.nn.Module:
    """A freshly initialised model of the backbone; the init depends only on ``seed``."""
    return get_backbone(backbone).build(model_kwargs, channels, size, seed)


def _plan(backbone: str):
    from causalize.plugin_manager import registries

    return registries().plans.get(get_backbone(backbone).plan)


def pretrain_step(
    model: torch.nn.Module,
    frames: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator,
    model_kwargs: dict[str, Any],
) -> torch.Tensor:
    """The loss of one batch: (B, T, C, H, W) frames in [-1, 1], one noise level per clip, v target."""
    x0 = frames.movedim(1, 2)  # the UNet3D and Wan layout (B, C, T, H, W)
    batch, t = x0.shape[0], x0.shape[2]
    k = sample_frame_timesteps(batch, t, schedule.num_train_timesteps, generator, x0.device, mode="shared")
    noise = gaussian(x0.shape, generator, x0.device, x0.dtype)  # drawn in fp32: the same noise in any dtype
    x_k = schedule.q_sample(x0, noise, k, frame_axis=2)
    target = schedule.target(x0, noise, k, "v", frame_axis=2)
    out = model(x_k, k[:, 0], **model_kwargs).sample
    return (out.float() - target.float()).square().mean()


def _lr_at(step: int, config: PretrainConfig) -> float:
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, step / config.warmup_steps)


def _batches(loader: DataLoader, sampler: EpochSampler, start: int) -> Iterator[dict[str, Any]]:
    """The windows of steps start+1, start+2, ...: epoch e in the order seeded by (seed, e)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def _save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """checkpoint.pt, replacing the previous one in one step (a crash keeps the older, whole one)."""
    with fs.new_file(out / CHECKPOINT_FILE, overwrite=True) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)


def _resume(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load checkpoint.pt if there is one (dropping later metrics lines); the step it reached."""
    ckpt = out / CHECKPOINT_FILE
    metrics = out / METRICS_FILE
    if not ckpt.is_file():
        metrics.unlink(missing_ok=True)
        return 0
    state = torch.load(ckpt, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    if metrics.is_file():
        keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        fs.write_text(metrics, "".join(ln + "\n" for ln in keep), overwrite=True)
    return step


def _global_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


def pretrain(config: PretrainConfig, progress: Progress | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) on ``device`` and save the model; returns the summary also written to
    pretrain.json."""
    t_start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = EpisodeDataset(config.data, config.window, stride=config.stride, split=None)
    channels, size = dataset.info.channels, dataset.info.frame_shape_chw[1]
    model = build_model(config.model, channels, size, config.seed, config.backbone).to(device)
    plan = _plan(config.backbone)
    model_kwargs = conditioning_kwargs(plan, model, config.batch_size, config.window, device=device)
    schedule = NoiseSchedule.from_config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = EpochSampler(len(dataset), config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} windows of {config.window} frames: fewer than one batch of {config.batch_size}"
        )
    start = _resume(out, model, optimizer)
    model.train()
    batches = _batches(loader, sampler, start)
    step_seconds: list[float] = []
    since_log: list[float] = []
    loss_value = math.nan
    t_train = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        frames = next(batches)["frames"].to(device)  # first: a new loader iterator draws from the global RNG
        torch.manual_seed(_global_seed(config.seed, step))  # the model's dropout layers
        loss = pretrain_step(model, frames, schedule, step_generator(config.seed, step, device=device), model_kwargs)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        step_seconds.append(time.perf_counter() - t0)
        since_log.append(loss_value)
        if step % config.log_every == 0 or step == config.steps:
            record = {
                "step": step,
                "loss": loss_value,
                "loss_avg": sum(since_log) / len(since_log),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "seconds_per_step": step_seconds[-1],
            }
            with (out / METRICS_FILE).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            since_log = []
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            _save_checkpoint(out, model, optimizer, step)
        if progress is not None:
            progress(step, config.steps, loss_value)
    train_seconds = time.perf_counter() - t_train
    save_model(model.cpu(), out / MODEL_DIR)
    summary = {
        "config": config.to_json(),
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "frames": [channels, size, size],
        "windows": len(dataset),
        "episodes": len(dataset.episodes),
        "start_step": start,
        "steps": config.steps,
        "final_loss": loss_value,
        "seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "median_seconds_per_step": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None,
        "model_kwargs": {k: list(v.shape) for k, v in model_kwargs.items() if torch.is_tensor(v)},
    }
    # record_text, not fs.write_json: a resumed run that had nothing left to do has a NaN final_loss
    fs.write_text(out / SUMMARY_FILE, record_text(summary, indent=2), overwrite=True)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return summary


def save_model(model: torch.nn.Module, dest: Path) -> None:
    """save_pretrained into a temporary sibling, then rename (a crash leaves no half model); an
    earlier model at ``dest`` is replaced."""
    fs.clean_stale(dest)  # temporaries of a killed run
    with fs.new_directory(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
