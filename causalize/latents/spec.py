"""What the toolkit must know about a VAE, read from its class and config.json without torch:
which video frames each latent frame covers (:class:`TimeGrouping`), how its pipeline normalises
latents (:class:`LatentNorm`), its channels and spatial factor (:class:`VaeSpec`).

Why a table per class: diffusers' video VAEs differ in exactly these rules (Wan encodes the first
frame alone, then groups of 4; CogVideoX takes 1 + 8k frames although each latent frame covers 4;
LTX groups 8), and per-frame encoding with the wrong rule gives latents the denoiser never saw.
Each reader below states where its numbers come from; tests encode a real (tiny) VAE of every
supported class and check the rule against the shapes it produces.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from causalize.errors import UsageError

__all__ = [
    "SUPPORTED_VAES",
    "VIDEO_VAES",
    "LatentNorm",
    "TimeGrouping",
    "VaeError",
    "VaeSpec",
    "encodes_video",
    "find_vae_dir",
    "read_spec",
    "spec_from_config",
]


class VaeError(UsageError):
    """A VAE that cannot serve: not found, not an autoencoder, a class whose temporal rule is not
    known, or one that does not fit the model or the data. CLI exit code 2."""

    kind = "vae-error"


@dataclass(frozen=True)
class TimeGrouping:
    """How a VAE groups video frames into latent frames.

    ``factor`` video frames per latent frame (1: an image VAE, every frame on its own);
    ``first_alone``: latent frame 0 covers video frame 0 only (causal video VAEs), the others
    ``factor`` frames each; ``granule``: a clip must have ``1 + granule·m`` frames when
    ``first_alone`` (``granule`` is a multiple of ``factor``; CogVideoX encodes in batches of 8).
    """

    factor: int = 1
    first_alone: bool = False
    granule: int = 1

    @property
    def per_frame(self) -> bool:
        return self.factor == 1

    def fits(self, frames: int) -> bool:
        """Whether a clip of ``frames`` video frames follows the rule."""
        if frames < 1:
            return False
        if self.first_alone:
            return (frames - 1) % self.granule == 0
        return frames % self.granule == 0

    def rule(self) -> str:
        """The rule in words, for error messages."""
        if self.first_alone:
            return f"1 + {self.granule}k frames (1, {1 + self.granule}, {1 + 2 * self.granule}, ...)"
        return "any number of frames" if self.granule == 1 else f"a multiple of {self.granule} frames"

    def trimmed(self, frames: int) -> int:
        """The longest length ≤ ``frames`` that fits (0 if none)."""
        if frames < 1:
            return 0
        if self.first_alone:
            return 1 + (frames - 1) // self.granule * self.granule
        return frames // self.granule * self.granule

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a fitting clip of ``frames`` video frames."""
        if not self.fits(frames):
            raise ValueError(f"{frames} frames do not fit {self.rule()}")
        return 1 + (frames - 1) // self.factor if self.first_alone else frames // self.factor

    def video_frames(self, latent_frames: int) -> int:
        """Video frames that ``latent_frames`` latent frames decode to."""
        if latent_frames < 1:
            return 0
        return 1 + (latent_frames - 1) * self.factor if self.first_alone else latent_frames * self.factor

    def covers(self, j: int) -> range:
        """The video frames latent frame ``j`` covers."""
        if self.first_alone:
            return range(0, 1) if j == 0 else range(1 + (j - 1) * self.factor, 1 + j * self.factor)
        return range(j * self.factor, (j + 1) * self.factor)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TimeGrouping:
        return cls(int(obj["factor"]), bool(obj["first_alone"]), int(obj.get("granule", obj["factor"])))


@dataclass(frozen=True)
class LatentNorm:
    """The pipeline's latent normalisation, ``z_model = (z - mean) * scale / std`` per channel
    (``mean`` includes AutoencoderKL's shift_factor). Wan: mean/std from the config, scale 1;
    AutoencoderKL and CogVideoX: scale = scaling_factor; LTX: its mean/std buffers and scale."""

    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    shift: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "shift": self.shift,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LatentNorm:
        mean, std = obj.get("mean"), obj.get("std")
        return cls(
            float(obj.get("scale", 1.0)),
            None if mean is None else tuple(float(v) for v in mean),
            None if std is None else tuple(float(v) for v in std),
            float(obj.get("shift", 0.0)),
        )

    def check(self, channels: int, where: str) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != channels:
                raise VaeError(f"{where}: latents_{name} has {len(values)} values for {channels} latent channels")
        if self.std is not None and any(not (v > 0 and math.isfinite(v)) for v in self.std):
            raise VaeError(f"{where}: latents_std must be positive and finite")
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise VaeError(f"{where}: scaling factor {self.scale} cannot normalise latents")


@dataclass(frozen=True)
class VaeSpec:
    """A VAE as the toolkit sees it. ``path`` is the VAE's own directory (``vae/`` of a pipeline)."""

    class_name: str
    path: str
    pixel_channels: int
    latent_channels: int
    spatial_factor: int
    grouping: TimeGrouping
    norm: LatentNorm
    #: how decoding streams: "own-cache" (the VAE's temporal cache, one latent frame at a time),
    #: "per-frame" (an image VAE) or "whole" (no exposed cache: a clip is decoded as a whole)
    decode_stream: str = "whole"

    @property
    def video(self) -> bool:
        return not self.grouping.per_frame

    def to_json(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "path": self.path,
            "pixel_channels": self.pixel_channels,
            "latent_channels": self.latent_channels,
            "spatial_factor": self.spatial_factor,
            "grouping": self.grouping.to_json(),
            "normalisation": self.norm.to_json(),
            "decode_stream": self.decode_stream,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> VaeSpec:
        return cls(
            class_name=str(obj["class"]),
            path=str(obj["path"]),
            pixel_channels=int(obj["pixel_channels"]),
            latent_channels=int(obj["latent_channels"]),
            spatial_factor=int(obj["spatial_factor"]),
            grouping=TimeGrouping.from_json(obj["grouping"]),
            norm=LatentNorm.from_json(obj["normalisation"]),
            decode_stream=str(obj.get("decode_stream", "whole")),
        )


# ---- per-class readers ------------------------------------------------------------------------


def _levels(config: Mapping[str, Any], key: str, default: int) -> int:
    blocks = config.get(key)
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else default


def _autoencoder_kl(c: Mapping[str, Any]) -> dict[str, Any]:
    # diffusers' VaeImageProcessor / pipelines: vae_scale_factor = 2 ** (len(block_out_channels) - 1)
    return dict(
        pixel_channels=c.get("in_channels", 3),
        latent_channels=c.get("latent_channels", 4),
        spatial_factor=_levels(c, "block_out_channels", 8),
        grouping=TimeGrouping(1, False, 1),
        norm=LatentNorm(float(c.get("scaling_factor") or 1.0), shift=float(c.get("shift_factor") or 0.0)),
        decode_stream="per-frame",
    )


def _wan(c: Mapping[str, Any]) -> dict[str, Any]:
    # AutoencoderKLWan._encode: frame 0 alone, then chunks of 4 through a causal feature cache; each
    # True in temperal_downsample halves time. patch_size (Wan 2.2) folds p×p pixels into channels.
    patch = c.get("patch_size") or 1
    factor = 2 ** sum(bool(x) for x in c.get("temperal_downsample", [False, True, True]))
    return dict(
        pixel_channels=c.get("in_channels", 3) // (patch * patch),
        latent_channels=c.get("z_dim", 16),
        spatial_factor=_levels(c, "dim_mult", 8) * patch,
        grouping=TimeGrouping(factor, True, factor),
        norm=LatentNorm(1.0, _floats(c.get("latents_mean")), _floats(c.get("latents_std"))),
        decode_stream="own-cache",
    )


def _cogvideox(c: Mapping[str, Any]) -> dict[str, Any]:
    # AutoencoderKLCogVideoX._encode takes 1 or 8k(+1) frames (num_sample_frames_batch_size = 8);
    # temporal_compression_ratio frames per latent frame after the first.
    factor = int(c.get("temporal_compression_ratio", 4))
    return dict(
        pixel_channels=c.get("in_channels", 3),
        latent_channels=c.get("latent_channels", 16),
        spatial_factor=_levels(c, "block_out_channels", 8),
        grouping=TimeGrouping(factor, True, max(8, factor)),
        norm=LatentNorm(float(c.get("scaling_factor") or 1.0)),
    )


def _hunyuan(c: Mapping[str, Any]) -> dict[str, Any]:
    factor = int(c.get("temporal_compression_ratio", 4))
    return dict(
        pixel_channels=c.get("in_channels", 3),
        latent_channels=c.get("latent_channels", 16),
        spatial_factor=int(c.get("spatial_compression_ratio", 8)),
        grouping=TimeGrouping(factor, True, factor),
        norm=LatentNorm(float(c.get("scaling_factor") or 1.0)),
    )


def _ltx(c: Mapping[str, Any]) -> dict[str, Any]:
    # AutoencoderKLLTXVideo: patch_size_t · 2^(spatio-temporal stages) frames per latent frame;
    # its latents_mean / latents_std are weights (buffers), filled in by load_vae.
    scaling = c.get("spatio_temporal_scaling", (True, True, True, False))
    stages = sum(bool(x) for x in scaling)
    factor = int(c.get("temporal_compression_ratio") or c.get("patch_size_t", 1) * 2**stages)
    spatial = int(c.get("spatial_compression_ratio") or c.get("patch_size", 4) * 2**stages)
    return dict(
        pixel_channels=c.get("in_channels", 3),
        latent_channels=c.get("latent_channels", 128),
        spatial_factor=spatial,
        grouping=TimeGrouping(factor, True, factor),
        norm=LatentNorm(float(c.get("scaling_factor") or 1.0)),
    )


_READERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "AutoencoderKL": _autoencoder_kl,
    "AutoencoderKLWan": _wan,
    "AutoencoderKLCogVideoX": _cogvideox,
    "AutoencoderKLHunyuanVideo": _hunyuan,
    "AutoencoderKLLTXVideo": _ltx,
}
#: VAE classes whose temporal rule and normalisation causalize knows.
SUPPORTED_VAES: tuple[str, ...] = tuple(_READERS)


def _floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


#: diffusers video autoencoders whose encoder groups frames (the first alone, then groups of 4–8),
#: known without a reader: encoding such a VAE's frames one by one is refused, whatever causalize
#: knows of its rule.
VIDEO_VAES = (
    "AutoencoderKLAllegro",
    "AutoencoderKLCogVideoX",
    "AutoencoderKLCosmos",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKLHunyuanVideo15",
    "AutoencoderKLKVAEVideo",
    "AutoencoderKLLTX2Video",
    "AutoencoderKLLTXVideo",
    "AutoencoderKLMagvit",
    "AutoencoderKLMiniMaxH3",
    "AutoencoderKLMochi",
    "AutoencoderKLWan",
    "AutoencoderVidTok",
)


def encodes_video(config: Mapping[str, Any]) -> bool:
    """Whether the VAE of this config.json encodes video, not frames: a known video VAE (its
    encoder mixes frames through a temporal cache even where it keeps their number) or a config
    declaring temporal compression. Such latents cannot be made one frame at a time."""
    name = config.get("_class_name", "AutoencoderKL")
    ratios = [config.get(k) for k in ("scale_factor_temporal", "temporal_compression_ratio", "patch_size_t")]
    downsample = config.get("temperal_downsample") or config.get("temporal_downsample") or []
    return (
        name in VIDEO_VAES
        or any(isinstance(r, int) and r > 1 for r in ratios)
        or (isinstance(downsample, list) and any(downsample))
    )


# ---- finding and reading ----------------------------------------------------------------------


def find_vae_dir(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The VAE's own directory: ``path/subfolder`` when given, else ``path`` if it holds a
    config.json, else a pipeline's ``path/vae``. Torch-free."""
    p = Path(path)
    if not p.exists():
        raise VaeError(f"VAE not found: {p}", "give a VAE directory or a pipeline directory with vae/")
    if subfolder:
        q = p / subfolder
        if not (q / "config.json").is_file():
            raise VaeError(f"{q}: no config.json (is --subfolder right?)")
        return q
    if (p / "config.json").is_file():
        return p
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    raise VaeError(
        f"{p} is neither a VAE directory (config.json) nor a pipeline directory with vae/",
        "give the pipeline's root, its vae/ folder, or --subfolder",
    )


def read_spec(path: str | os.PathLike, subfolder: str | None = None) -> VaeSpec:
    """The spec of the VAE at ``path`` from its config.json (no weights, no torch). A class that is
    not an autoencoder, or whose temporal rule causalize does not know, is a VaeError."""
    d = find_vae_dir(path, subfolder)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VaeError(f"{d / 'config.json'}: cannot read: {exc}") from None
    if not isinstance(config, dict):
        raise VaeError(f"{d / 'config.json'}: not a JSON object")
    return spec_from_config(config, str(d.resolve()))


def spec_from_config(config: Mapping[str, Any], path: str) -> VaeSpec:
    """The spec of a VAE from its config mapping (``_class_name`` names the class)."""
    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise VaeError(f"{path}: config.json has no _class_name: not a diffusers model")
    reader = _READERS.get(name)
    if reader is None:
        kind = "a VAE causalize has no frame rule for" if name.startswith("Autoencoder") else "not a VAE"
        raise VaeError(
            f"{path}: {name} is {kind}",
            "supported VAEs: " + ", ".join(SUPPORTED_VAES),
        )
    fields = reader(config)
    spec = VaeSpec(class_name=name, path=path, **fields)
    spec.norm.check(spec.latent_channels, path)
    return spec
