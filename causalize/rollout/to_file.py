"""`rollout_to_file`, what `causalize rollout` runs: a checkpoint, a context file and an actions
file in, a clip out (reading and writing through causalize.rollout.io), with a report.

Importing this module does not import torch: paths, the output and the input files are checked
first (`check_rollout_paths`, then the readers), so that a bad input fails before torch loads."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from causalize.errors import CheckpointError, UsageError
from causalize.rollout.io import (
    DEFAULT_FPS,
    Frames,
    Kind,
    actions_to_tensor,
    check_fps,
    check_output,
    fit_channels,
    frames_to_model,
    model_to_frames,
    read_actions,
    read_frames,
    sample_geometry,
    write_frames,
)

if TYPE_CHECKING:
    import torch


ProgressFn = Callable[[int, int, float], None]


@dataclass
class RolloutFileReport:
    """What `rollout_to_file` wrote and what it took."""

    out: Path
    checkpoint: Path
    kind: Kind
    context_frames: int
    generated: int
    frames_written: int
    seconds_per_frame: list[float]
    seconds: float
    frame_passes: int
    model_calls: int
    cache_bytes: int
    config: dict[str, Any]
    config_sources: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    #: the VAE generated latents were decoded with (None: the model's frames were written as they are)
    vae: dict[str, Any] | None = None
    #: seconds to decode each latent frame (context first), once each
    decode_seconds: list[float] = field(default_factory=list)
    #: where the conditioning tensors came from: "option", "stored" (beside the model) or "zeros"
    conditioning: str = "zeros"
    #: model calls a compiled forward served (--compile: the static steps of a full window)
    compiled_calls: int = 0

    @property
    def timing(self) -> dict[str, float]:
        s = self.seconds_per_frame
        return {"mean": statistics.fmean(s), "median": statistics.median(s), "min": min(s), "max": max(s)} if s else {}

    @property
    def cache_mode(self) -> str:
        cache = self.config.get("cache")
        mode = ("exact" if cache else "none") if isinstance(cache, bool) else cache
        return {"exact": "streaming", "none": "full recompute"}.get(mode, f"{mode} (approximate)")

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "checkpoint": str(self.checkpoint),
            "kind": self.kind,
            "context_frames": self.context_frames,
            "generated": self.generated,
            "frames_written": self.frames_written,
            "seconds_per_frame": self.timing,
            "seconds_per_frame_all": self.seconds_per_frame,
            "seconds": self.seconds,
            "cache": self.cache_mode,
            "frame_passes": self.frame_passes,
            "model_calls": self.model_calls,
            "compiled_calls": self.compiled_calls,
            "cache_bytes": self.cache_bytes,
            "config": self.config,
            "config_sources": self.config_sources,
            "device": self.device,
            "vae": self.vae,
            "decode_seconds_per_frame": statistics.fmean(self.decode_seconds) if self.decode_seconds else None,
            "decode_seconds_all": self.decode_seconds,
            "conditioning": self.conditioning,
        }


def rollout_to_file(
    checkpoint: str | os.PathLike,
    context: str | os.PathLike,
    actions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    context_frames: int | None = None,
    overwrite: bool = False,
    fps: float = DEFAULT_FPS,
    include_context: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    vae: str | os.PathLike | None = None,
    vae_subfolder: str | None = None,
    conditioning: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> RolloutFileReport:
    """Roll a checkpoint out from a context file and an actions file, and write the clip to `out`.

    `options` are RolloutConfig fields; None means "not given": each field comes from the option,
    else the checkpoint's training.json (prediction_type, zero_terminal_snr, window), else the
    RolloutConfig default. The written clip holds the context frames followed by one generated
    frame per action (`include_context=False`: the generated frames only). Paths, the output and
    the input files are checked before torch is imported, the frame size by one 1-frame forward
    before the rollout (`check_frame_size`); nothing is written unless the rollout succeeds.
    `device` (None: CUDA when available) and `dtype` (None: the checkpoint's) are where and in
    what precision the model runs; frames are written from fp32.

    Latent models: `vae` (default: the VAE recorded beside a model trained on `causalize encode`
    latents) encodes pixel context and decodes the generated latents, one latent frame at a time
    where the VAE decodes causally; per-video-frame actions are grouped onto latent frames as in
    training. `conditioning` (default: the file stored with the trained model, else zeros) is
    passed to every model call (causalize.rollout.conditioning)."""
    t0 = time.perf_counter()
    out_path = check_rollout_paths(checkpoint, context, actions, out, overwrite=overwrite)
    check_fps(fps)
    clip = read_frames(context, context_frames)  # headers and sizes first, only the frames needed
    raw_actions = read_actions(actions)
    from causalize.rollout.decoded import LatentIO, find_vae
    from causalize.rollout.loading import checkpoint_dir

    choice = find_vae(checkpoint_dir(checkpoint), vae, vae_subfolder)  # config only: no torch yet
    if conditioning is not None and not Path(conditioning).is_file():
        raise UsageError(f"conditioning file not found: {conditioning}", "write one with causalize embed-prompt")
    # torch and the model only now: every input above is checked without them
    from causalize.rollout.conditioning import resolve_conditioning
    from causalize.rollout.loading import load_world_model, resolve_config
    from causalize.rollout.sampler import RolloutSession, check_frame_size, rollout

    config, sources = resolve_config(checkpoint, **options)
    wm, ckpt = load_world_model(checkpoint, device=device, dtype=dtype)
    RolloutSession(wm, config)  # refuses a model without an action adapter before any file work
    encoder = wm.action_encoder
    model_kwargs, cond_source = resolve_conditioning(ckpt, conditioning, wm)
    axis, channels = sample_geometry(wm)
    latent_io = None
    if choice is not None and channels is not None:
        latent_io = LatentIO.load(choice, device=wm.device, dtype=dtype)
        latent_io.check_model(channels)
        raw_actions = latent_io.group_actions(raw_actions, encoder.action_dim, encoder.action_type, str(actions))
    acts = actions_to_tensor(raw_actions, encoder.action_type, encoder.action_dim, str(actions))
    if channels is None:
        raise UsageError(
            f"plan '{wm.plan.name}' takes packed tokens, not a video tensor: file rollouts do not support it",
            "use causalize.rollout.rollout() with tensors in the model's layout",
        )
    pixel_clip = clip
    if latent_io is not None:
        clip = latent_io.context_latents(clip, str(context))
    block = wm.plan.layout.block_size
    if clip.count % block:
        raise UsageError(
            f"{context}: {clip.count} context frames; this model needs a multiple of {block}",
            "choose --context-frames accordingly",
        )
    clip = fit_channels(clip, channels)
    out_kind = "pixels" if latent_io is not None else clip.kind
    check_output(out_path, out_kind, overwrite, pixel_clip.channels if latent_io is not None else clip.channels)
    x = frames_to_model(clip, axis, channels, str(context), channel_axis=wm.plan.layout.channel_axis)
    check_frame_size(wm, x, str(context))  # one 1-frame forward: too small frames are a usage error
    result = rollout(wm, x, acts, config=config, model_kwargs=model_kwargs or None, progress=progress)
    generated = model_to_frames(result.frames, axis, clip.kind, channel_axis=wm.plan.layout.channel_axis)
    latents = None
    if latent_io is not None:
        latents = np.concatenate([clip.data, generated.data])
        pixels = latent_io.to_pixels(Frames(latents, "latents")).data
        n_context = latent_io.spec.grouping.video_frames(clip.count)
        context_count, generated_count = n_context, pixels.shape[0] - n_context
        data = pixels if include_context else pixels[n_context:]
        latents = latents if include_context else generated.data
    else:
        context_count, generated_count = clip.count, generated.count
        data = np.concatenate([clip.data, generated.data]) if include_context else generated.data
    report = RolloutFileReport(
        out=out_path,
        checkpoint=ckpt,
        kind=out_kind,
        context_frames=context_count if include_context else 0,
        generated=generated_count,
        frames_written=int(data.shape[0]),
        seconds_per_frame=list(result.seconds_per_frame),
        seconds=0.0,
        frame_passes=result.frame_passes,
        model_calls=result.model_calls,
        compiled_calls=result.compiled_calls,
        cache_bytes=result.cache_bytes,
        config=config.to_json(),
        config_sources=sources,
        device=str(next(wm.parameters()).device),
        vae=None
        if latent_io is None
        else {
            "path": latent_io.choice.path,
            "source": latent_io.choice.source,
            "class": latent_io.spec.class_name,
            "decode": latent_io.spec.decode_stream,
        },
        decode_seconds=[] if latent_io is None else list(latent_io.decode_seconds),
        conditioning=cond_source,
    )
    meta = {k: v for k, v in report.to_json().items() if k not in ("out", "seconds")}
    write_frames(
        out_path,
        Frames(data, out_kind),
        fps=fps,
        actions=_stored_actions(acts, encoder.action_type),
        meta=meta,
        context_frames=report.context_frames,
        overwrite=overwrite,
        extra=None if latents is None else {"latents": latents},
    )
    report.seconds = time.perf_counter() - t0
    return report


def check_rollout_paths(
    checkpoint: str | os.PathLike,
    context: str | os.PathLike,
    actions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """What `rollout_to_file` checks before reading anything: the checkpoint, context and actions
    exist, and OUT can be written (a known extension, its writer installed, not existing unless
    `overwrite`). Imports no torch, so the CLI runs it first. Returns OUT as a Path."""
    out_path = check_output(out, "pixels", overwrite)
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise CheckpointError(
            f"{ckpt} does not exist", "give a converted checkpoint (causalize convert ... --action-dim N)"
        )
    for path, what, hint in (
        (context, "context", "give frames: an episode .npz, a .npy array, or a video / image"),
        (actions, "actions", "give one action per generated frame: .npy, .npz, .json or a text file"),
    ):
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{p}: {what} file not found", hint)
        if not p.is_file():
            raise UsageError(f"{p}: not a file", hint)
    return out_path


def _stored_actions(acts: torch.Tensor, action_type: str) -> np.ndarray:
    """Actions as the episode format stores them: int64 indices, uint8 multi-hot, float32 rows."""
    a = acts[0].cpu().numpy()
    if action_type == "discrete" and a.ndim == 2:
        return a.astype(np.uint8)
    return a


__all__ = ["RolloutFileReport", "check_rollout_paths", "rollout_to_file"]
