"""Fine-tune a converted world model with the Diffusion Forcing objective (METHOD.md §6–§7).

    from causalize.training.trainer import TrainConfig, train

    config = TrainConfig(model="./causal-wm", data="./episodes", output_dir="./run", steps=1000)
    result = train(config, progress=lambda step, total, loss: ...)

One step: a batch of windows from an :class:`~causalize.episodes.EpisodeDataset` (optionally
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

Beside it: the settings (``config``), the inputs (``loading``), run files (``checkpoints``), loss (``objective``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Sampler

from causalize.layout import to_native
from causalize.noise import NoiseSchedule, gaussian
from causalize.training import objective
from causalize.training.accelerator import make_accelerator
from causalize.training.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    METRICS_FILE,
    OutputClaim,
    RunLock,
    append_metrics,
    latest_checkpoint,
    resume_point,
    save_checkpoint,
    save_final,
    truncate_metrics,
)
from causalize.training.config import TrainConfig, TrainingError
from causalize.training.loading import (
    check_compatible,
    check_paths,
    data_latent_norm,
    enable_checkpointing,
    load_conditioning,
    load_vae,
    load_world_model,
    open_dataset,
    param_groups,
    select_trainable,
)
from causalize.training.objective import action_keep_mask, diffusion_forcing_loss, sample_frame_timesteps
from causalize.world_model import conditioning_kwargs

if TYPE_CHECKING:
    from torch import nn

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

#: progress(step, total_steps, loss) after every optimizer step (main process only).
Progress = Callable[[int, int, float], None]


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts, identical on every platform and process."""
    digest = hashlib.blake2b(":".join(map(str, ("causalize-train", *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def step_generator(
    seed: int, step: int, micro: int = 0, process: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
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


def to_native_layout(frames: torch.Tensor, frame_axis: int, channel_axis: int | None = None) -> torch.Tensor:
    """(B, T, C, H, W) dataset frames -> the denoiser's layout, frames on ``frame_axis``
    (UNet3D / DiTs: (B, C, T, H, W) with axis 2; SVD: (B, T, C, H, W) with axis 1; Kandinsky:
    channels last, ``channel_axis`` 4)."""
    return to_native(frames, frame_axis, channel_axis)


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
    timesteps = sample_frame_timesteps(
        batch, frames, schedule.num_train_timesteps, generator, device, mode=timestep_mode
    )
    noise = gaussian(x0.shape, generator, device, x0.dtype)
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
    motion_weight: float = 0.0,
    image_condition: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, StepInputs]:
    """The Diffusion Forcing loss of one micro-batch: ``x0`` in the model's native layout (frames
    on ``frame_axis``), ``model`` a :class:`causalize.WorldModel` (or anything called as
    ``model(x_k, timesteps, actions, keep, **model_kwargs)``); ``motion_weight`` > 0 weights it by
    ``objective.motion_weights(x0)``; ``image_condition``: an image-to-video model, given the
    window's first frame, clean, as its image (METHOD.md §6: the paper's recipe; None: when the
    model, or the one a wrapper holds, has an image condition). Returns (loss, per-frame losses
    (B, T), the step's draws)."""
    draws = draw_step_inputs(
        x0,
        action_mask,
        schedule=schedule,
        frame_axis=frame_axis,
        generator=generator,
        timestep_mode=timestep_mode,
        action_dropout=action_dropout,
    )
    kwargs = dict(model_kwargs or {})
    if image_condition is None:
        image_condition = getattr(getattr(model, "module", model), "image_condition", None) is not None
    if image_condition:
        kwargs["image"] = x0.narrow(frame_axis, 0, 1)
    out = model(draws.x_k, draws.timesteps, actions, draws.keep, **kwargs)
    if output_axis is not None and output_axis != frame_axis:
        out = out.movedim(output_axis, frame_axis)
    if out.shape != x0.shape:
        raise TrainingError(
            f"the model's output has shape {tuple(out.shape)} but its input sample has {tuple(x0.shape)}",
            "train a model whose out_channels equal its in_channels (no learned variance channels)",
        )
    target = schedule.target(x0, draws.noise, draws.timesteps, prediction_type, frame_axis)
    weight = objective.motion_weights(x0, frame_axis, motion_weight) if motion_weight > 0 else None
    loss, per_frame = diffusion_forcing_loss(out, target, frame_axis, weight=weight, return_per_frame=True)
    return loss, per_frame, draws


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


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a run sets up once, before its first step."""

    config: TrainConfig
    accelerator: Any
    model: nn.Module  # the WorldModel, as accelerate prepared it
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loader: Any
    sampler: EpochSampler
    per_epoch: int  # micro-batches per epoch and process
    vae: Any
    schedule: NoiseSchedule
    model_kwargs: dict[str, Any]
    frame_axis: int
    output_axis: int
    resume_from: Path | None
    start_step: int
    checkpointing: bool
    n_params: int
    lock: Any = None  # the output directory's RunLock (main process), released when the run ends
    channel_axis: int | None = None  # the sample's channel axis when the layout names one

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def samples_per_step(self) -> int:
        return self.config.batch_size * self.config.gradient_accumulation * self.accelerator.num_processes


@dataclass
class _Loop:
    """What the loop carries from one step to the next."""

    step: int
    last_loss: float = math.nan
    since_log: list[float] = field(default_factory=list)  # losses since the last metrics line
    checkpoints: list[str] = field(default_factory=list)


def train(config: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns a summary (steps, final loss, seconds, paths, ...)."""
    t_start = time.perf_counter()
    run = _set_up(config)
    try:
        loop = _Loop(step=run.start_step)
        batches = _micro_batches(run, run.start_step * config.gradient_accumulation)
        t_train = time.perf_counter()
        for step in range(run.start_step + 1, config.steps + 1):
            loop.step = step
            _train_step(run, loop, batches, progress)
        train_seconds = time.perf_counter() - t_train
        final = _finish(run, loop)
        return _summary(run, loop, final, time.perf_counter() - t_start, train_seconds)
    finally:
        if run.lock is not None:
            run.lock.release()


# ---- set-up -------------------------------------------------------------------------------


def _set_up(config: TrainConfig) -> _Run:
    """Load and check every input, start accelerate, find the checkpoint to resume from and
    choose the trainable weights; nothing is trained yet. Every check runs before the output
    directory is claimed, and a failure after the claim releases it: a run that cannot start
    writes nothing."""
    config.validate()
    check_paths(config)  # cheap, before anything is loaded
    dataset = open_dataset(config)  # every episode validated (headers, checksums, actions)
    wm = load_world_model(config)
    vae = load_vae(config.vae) if config.vae else None
    check_compatible(wm, dataset.info, vae, config)
    if wm.image_condition is not None:
        wm.latent_norm = data_latent_norm(config, vae)
    overrides = load_conditioning(config.conditioning, wm)
    accelerator = make_accelerator(config)
    is_main = accelerator.is_main_process
    resume_from, start_step = resume_point(config, is_main)
    claim = _claim_output(accelerator, config)
    try:
        run = _set_up_claimed(config, accelerator, dataset, wm, vae, overrides, resume_from, start_step)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    run.lock = getattr(claim, "lock", None)
    return run


def _claim_output(accelerator: Any, config: TrainConfig) -> OutputClaim | None:
    """The main process claims the output directory (atomically, see OutputClaim); every process
    learns whether it got it, so that the loser of a race stops everywhere."""
    claim, refusal = None, None
    if accelerator.is_main_process:
        try:
            claim = OutputClaim(config.output_dir, fresh=config.resume is False)
            try:
                claim.lock = RunLock(config.output_dir)
            except TrainingError:
                claim.release()
                raise
        except TrainingError as exc:
            refusal = (exc.message, exc.hint)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise TrainingError(*refusal)
    accelerator.wait_for_everyone()
    return claim


def _set_up_claimed(
    config: TrainConfig,
    accelerator: Any,
    dataset: Any,
    wm: Any,
    vae: Any,
    overrides: dict[str, torch.Tensor],
    resume_from: Path | None,
    start_step: int,
) -> _Run:
    is_main = accelerator.is_main_process
    schedule = NoiseSchedule.from_config(rescale_zero_terminal_snr=config.zero_terminal_snr)
    if config.prediction_type == "epsilon" and config.zero_terminal_snr and is_main:
        warnings.warn(
            "epsilon prediction with a zero-terminal-SNR schedule: the last step's target carries no information "
            "about the frame (METHOD.md §6); prefer prediction_type='v'",
            stacklevel=4,
        )
    plan = wm.plan
    model_kwargs = conditioning_kwargs(plan, wm.model, config.batch_size, config.window, overrides, accelerator.device)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in wm.parameters()):
        wm.float()  # fp32 master weights; mixed precision autocasts the forward
    wm.train()
    checkpointing = enable_checkpointing(wm.model) if config.gradient_checkpointing else False
    params = select_trainable(wm, config.train_only)
    model, optimizer, loader, sampler = _prepare(accelerator, config, wm, params, dataset, vae)
    run = _Run(
        config=config,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        params=params,
        loader=loader,
        sampler=sampler,
        per_epoch=len(loader),
        vae=vae,
        schedule=schedule,
        model_kwargs=model_kwargs,
        frame_axis=plan.layout.inputs[plan.conditioning.sample_arg],
        output_axis=plan.layout.output_axis,
        resume_from=resume_from,
        start_step=start_step,
        checkpointing=checkpointing,
        n_params=sum(p.numel() for p in wm.parameters()),
        channel_axis=plan.layout.channel_axis,
    )
    _restore(run, len(dataset))
    return run


def _prepare(
    accelerator: Any, config: TrainConfig, wm: nn.Module, params: list[torch.nn.Parameter], dataset: Any, vae: Any
) -> tuple[nn.Module, torch.optim.Optimizer, Any, EpochSampler]:
    """AdamW and the data loader (in the per-epoch seeded order), placed by accelerate."""
    groups = param_groups(wm, params, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    sampler = EpochSampler(len(dataset), config.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True, num_workers=config.num_workers
    )
    if vae is not None:
        vae.to(accelerator.device)
    model, optimizer, loader = accelerator.prepare(wm, optimizer, loader)
    return model, optimizer, loader, sampler


def _restore(run: _Run, windows: int) -> None:
    """Refuse a dataset without one batch; continue from the resumed checkpoint's state."""
    config = run.config
    if run.per_epoch == 0:
        raise TrainingError(
            f"the dataset has {windows} windows of {config.window} frames, fewer than one batch of "
            f"{config.batch_size} per process",
            "lower batch_size or window, or add episodes",
        )
    if run.resume_from is not None:
        rates = [g["lr"] for g in run.optimizer.param_groups]
        run.accelerator.load_state(str(run.resume_from))
        for group, lr in zip(run.optimizer.param_groups, rates):  # the configured rates, not the saved ones
            group["lr"] = lr
    if run.accelerator.is_main_process and config.resume is not False:
        truncate_metrics(run.out / METRICS_FILE, run.start_step)


def _micro_batches(run: _Run, start: int) -> Iterator[dict[str, Any]]:
    """The micro-batches from number ``start`` on: epoch e in the order seeded by (seed, e), so a
    resumed run reads exactly what the uninterrupted one would have."""
    epoch, skip = divmod(start, run.per_epoch)
    while True:
        run.sampler.set_epoch(epoch)
        if hasattr(run.loader, "set_epoch"):  # accelerate's loader re-applies its own epoch on iteration
            run.loader.set_epoch(epoch)
        yield from (run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader)
        epoch, skip = epoch + 1, 0


# ---- one step -----------------------------------------------------------------------------


def _train_step(run: _Run, loop: _Loop, batches: Iterator[dict[str, Any]], progress: Progress | None) -> None:
    """One optimizer step over gradient_accumulation micro-batches, then its metrics line, the
    progress call and, when due, a checkpoint."""
    t0 = time.perf_counter()
    losses, per_frame_sum = [], None
    for micro in range(run.config.gradient_accumulation):
        loss, per_frame = _micro_step(run, loop.step, micro, next(batches))
        losses.append(loss)
        per_frame_sum = per_frame if per_frame_sum is None else per_frame_sum + per_frame
    grad_norm = _apply_gradients(run)
    loop.last_loss = float(run.accelerator.gather(torch.stack(losses).mean().reshape(1)).mean())
    _log(run, loop, per_frame_sum, grad_norm, time.perf_counter() - t0, progress)
    config = run.config
    if config.checkpoint_every and (loop.step % config.checkpoint_every == 0 or loop.step == config.steps):
        loop.checkpoints.append(str(save_checkpoint(run.accelerator, config, loop.step, loop.last_loss)))


def _micro_step(run: _Run, step: int, micro: int, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch; (its loss, its per-frame losses averaged over the
    batch), detached. Gradients are synchronised across processes on the last micro-batch only."""
    config, accelerator = run.config, run.accelerator
    rank, device = accelerator.process_index, accelerator.device
    gen = step_generator(config.seed, step, micro, rank, device)
    torch.manual_seed(_derive_seed("global", config.seed, step, micro, rank))  # dropout layers, if any
    frames = batch["frames"].to(device)
    if run.vae is not None:
        frames = _encode(run.vae, frames, gen)
    x0 = to_native_layout(frames, run.frame_axis, run.channel_axis)
    last = micro == config.gradient_accumulation - 1
    with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
        loss, per_frame, _ = compute_loss(
            run.model,
            x0,
            batch["actions"],
            batch["action_mask"],
            schedule=run.schedule,
            frame_axis=run.frame_axis,
            generator=gen,
            model_kwargs=run.model_kwargs,
            prediction_type=config.prediction_type,
            timestep_mode=config.timestep_mode,
            action_dropout=config.action_dropout,
            output_axis=run.output_axis,
            motion_weight=config.motion_weight,
        )
        accelerator.backward(loss / config.gradient_accumulation)
    return loss.detach(), per_frame.detach().mean(0)


def _apply_gradients(run: _Run) -> torch.Tensor | None:
    """Clip (when configured), step and clear; the gradient norm before clipping, or None."""
    grad_norm = None
    if run.config.grad_clip:
        grad_norm = run.accelerator.clip_grad_norm_(run.params, run.config.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _log(
    run: _Run,
    loop: _Loop,
    per_frame_sum: torch.Tensor,
    grad_norm: torch.Tensor | None,
    seconds: float,
    progress: Progress | None,
) -> None:
    """A metrics line every log_every steps and at the last one; progress after every step."""
    config, accelerator = run.config, run.accelerator
    loop.since_log.append(loop.last_loss)
    should_log = loop.step % config.log_every == 0 or loop.step == config.steps
    per_frame_all = None
    if should_log and config.log_per_frame:  # every process takes part in the gather
        per_frame_all = accelerator.gather((per_frame_sum / config.gradient_accumulation)[None]).mean(0)
    if accelerator.is_main_process:
        if should_log:
            append_metrics(run.out / METRICS_FILE, _metrics_record(run, loop, grad_norm, seconds, per_frame_all))
        if progress is not None:
            progress(loop.step, config.steps, loop.last_loss)
    if should_log:
        loop.since_log = []


def _metrics_record(
    run: _Run, loop: _Loop, grad_norm: torch.Tensor | None, seconds: float, per_frame: torch.Tensor | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": loop.step,
        "loss": loop.last_loss,
        "loss_avg": sum(loop.since_log) / len(loop.since_log),
        "lr": run.optimizer.param_groups[0]["lr"],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "seconds_per_step": seconds,
        "samples_per_second": run.samples_per_step / seconds if seconds > 0 else None,
        "epoch": ((loop.step - 1) * run.config.gradient_accumulation) // run.per_epoch,
    }
    if per_frame is not None:
        record["loss_per_frame"] = [float(v) for v in per_frame]
    return record


# ---- finishing ----------------------------------------------------------------------------


def _finish(run: _Run, loop: _Loop) -> Path:
    """final/ (written by the main process once every process is done)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(run.model), run.config, loop.step, loop.last_loss, run.resume_from)
    accelerator.wait_for_everyone()
    return run.out / FINAL_DIR


def _summary(run: _Run, loop: _Loop, final: Path, seconds: float, train_seconds: float) -> dict[str, Any]:
    config, start_step = run.config, run.start_step
    steps_run = loop.step - start_step if config.steps > start_step else 0
    return {
        "output_dir": str(run.out),
        "final": str(final),
        "metrics": str(run.out / METRICS_FILE),
        "checkpoints": loop.checkpoints,
        "start_step": start_step,
        "steps": max(loop.step, start_step),
        "steps_run": steps_run,
        "final_loss": loop.last_loss,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "samples_per_second": steps_run * run.samples_per_step / train_seconds
        if steps_run and train_seconds > 0
        else None,
        "resumed_from": None if run.resume_from is None else str(run.resume_from),
        "num_processes": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
        "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": run.checkpointing,
        "parameters": run.n_params,
        "trainable_parameters": sum(p.numel() for p in run.params),
    }
