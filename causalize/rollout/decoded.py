"""Rolling out a latent world model in pixels: its VAE (the one `causalize encode` recorded, or
``--vae``), pixel context encoded through it, per-video-frame actions grouped onto latent frames as
in training, and generated latents decoded once each, one latent frame at a time (a file rollout
decodes after generating; the environment decodes each step's frame as it comes).

The torch-free part (:func:`find_vae`) runs before the model loads, so a bad ``--vae`` fails fast.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from causalize.errors import UsageError
from causalize.latents.record import LatentRecord, read_model_record
from causalize.latents.spec import VaeError, VaeSpec, read_spec
from causalize.rollout.io import Frames

if TYPE_CHECKING:
    import torch

__all__ = ["VaeChoice", "find_vae", "LatentIO"]


@dataclass
class VaeChoice:
    """Which VAE a rollout decodes with, and why (``source``: "option" or "latent.json")."""

    path: str
    subfolder: str | None
    source: str
    spec: VaeSpec
    record: LatentRecord | None


def find_vae(
    checkpoint_dir: str | os.PathLike, vae: str | os.PathLike | None, subfolder: str | None = None
) -> VaeChoice | None:
    """The VAE to use: ``vae`` when given, else the one recorded beside the model (``latent.json``,
    written by training on an encoded dataset), else None (the model's own frames are written)."""
    record = read_model_record(checkpoint_dir)
    if vae is not None:
        spec = read_spec(vae, subfolder)
        if record is not None:
            _check_same_vae(spec, record.vae)
        return VaeChoice(str(vae), subfolder, "option", spec, record)
    if record is None:
        return None
    recorded = Path(record.vae.path)
    if not (recorded / "config.json").is_file():
        raise VaeError(
            f"the model was trained on latents of {recorded}, which no longer exists",
            "pass --vae with that VAE (its pipeline directory or vae/ folder)",
        )
    return VaeChoice(str(recorded), None, "latent.json", read_spec(recorded), record)


def _check_same_vae(given: VaeSpec, recorded: VaeSpec) -> None:
    """--vae on a model trained on encoded latents must be that VAE (it may have moved): the same
    class, frame rule, channels, spatial factor and normalisation."""
    fields = ("class_name", "grouping", "latent_channels", "spatial_factor", "norm", "pixel_channels")
    differs = [f for f in fields if getattr(given, f) != getattr(recorded, f)]
    if differs:
        f = differs[0]
        raise VaeError(
            f"--vae {given.path} differs from the VAE the model was trained on ({recorded.path}): "
            f"{f} {getattr(given, f)} vs {getattr(recorded, f)}",
            "give the VAE recorded in the model's latent.json (or leave --vae out)",
        )


@dataclass
class LatentIO:
    """A loaded VAE serving one rollout: encode context, group actions, decode frames."""

    choice: VaeChoice
    vae: Any
    spec: VaeSpec
    decode_seconds: list[float] = field(default_factory=list)

    @classmethod
    def load(cls, choice: VaeChoice, device: Any = None, dtype: Any = None) -> LatentIO:
        from causalize.latents.vae import load_vae

        vae, spec = load_vae(choice.path, choice.subfolder, device=device, dtype=dtype)
        return cls(choice, vae, spec)

    def check_model(self, channels: int) -> None:
        """The VAE's latents have the model's channels (a pixel-space model is refused)."""
        spec = self.spec
        if channels != spec.latent_channels:
            what = "works on pixels" if channels == spec.pixel_channels else f"takes {channels}-channel samples"
            raise VaeError(
                f"{spec.class_name} makes {spec.latent_channels}-channel latents but the model {what}",
                "drop --vae for a pixel-space model, or give the VAE of the model's pipeline",
            )

    def context_latents(self, frames: Frames, where: str) -> Frames:
        """Pixel context → latents through the VAE (a clip following its frame rule); latent
        context as it is."""
        import torch

        from causalize.latents.vae import encode_clip

        if frames.kind == "latents":
            return frames
        rule = self.spec.grouping
        if not rule.fits(frames.count):
            raise UsageError(
                f"{where}: {frames.count} context frames do not fit {self.spec.class_name}'s frame rule, {rule.rule()}",
                f"give {max(rule.trimmed(frames.count), 1)} context frames (CLI: --context-frames N)",
            )
        clip = torch.from_numpy(np.ascontiguousarray(frames.data)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        z = encode_clip(self.vae, self.spec, clip)
        return Frames(z[0].movedim(1, 0).cpu().numpy().copy(), "latents")

    def group_actions(self, raw: np.ndarray, model_width: int, action_type: str, where: str) -> np.ndarray:
        """Per-video-frame actions → one row per generated latent frame (docs/LATENTS.md): rows
        i·k .. i·k+k−1 become latent frame i's row. Rows already of the model's width pass."""
        from causalize.latents.actions import slot_rows

        record, k = self.choice.record, self.spec.grouping.factor
        if record is None and k > 1:
            warnings.warn(
                f"the model has no latent.json (it was not trained on `causalize encode` data): each action row "
                f"conditions one latent frame ({k} video frames); per-video-frame actions are not grouped",
                UserWarning,
                stacklevel=3,
            )
        if record is None or k == 1:
            return raw
        space = record.video_action_space
        video_rows = raw.ndim == 1 if space.type == "discrete" and not space.multi_hot else raw.shape[-1] == space.width
        if not video_rows or (raw.ndim == 2 and raw.shape[-1] == model_width):
            return raw
        if raw.shape[0] % k:
            raise UsageError(
                f"{where}: {raw.shape[0]} video-frame actions; each generated latent frame takes {k}",
                f"give a multiple of {k} actions (one per video frame)",
            )
        rows = slot_rows(raw, space).reshape(raw.shape[0] // k, k * space.width)
        return rows if action_type == "continuous" else rows.astype(np.uint8)

    def decoder(self) -> Any:
        from causalize.latents.vae import StreamingDecoder

        return StreamingDecoder(self.vae, self.spec)

    def decode_stream(self, latents: torch.Tensor, decoder: Any) -> list[torch.Tensor]:
        """Push each latent frame of (1, C, n, h, w) once; the pixel clips it adds."""
        out = []
        for j in range(latents.shape[2]):
            t0 = time.perf_counter()
            out.append(decoder.push(latents[:, :, j]))
            self.decode_seconds.append(time.perf_counter() - t0)
        return out

    def to_pixels(self, latents: Frames) -> Frames:
        """All latent frames of a rollout (context first) as uint8 pixels: streamed one latent frame
        at a time where the VAE decodes causally, else one decode of the whole clip (exact)."""
        import torch

        from causalize.latents.vae import decode_clip

        z = torch.from_numpy(latents.data).movedim(0, 1)[None]  # (1, C, J, h, w)
        if self.spec.decode_stream == "whole":
            t0 = time.perf_counter()
            pixels = decode_clip(self.vae, self.spec, z)
            self.decode_seconds.append(time.perf_counter() - t0)
        else:
            pixels = torch.cat(self.decode_stream(z, self.decoder()), dim=2)
        return Frames(to_uint8(pixels[0]), "pixels")


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] → uint8 (T, H, W, C)."""
    import torch

    x = ((clip.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
