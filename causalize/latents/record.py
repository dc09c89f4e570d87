"""The ``"latent"`` record that ``causalize encode`` writes into a latent dataset's dataset.json
(and training copies next to the trained model as ``latent.json``): which VAE made the latents,
its normalisation and frame rule, and how video actions were grouped onto latent frames. Rollout
and the environment read it to decode, and to group per-video-frame actions, the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from causalize.episodes import ActionSpace, read_info
from causalize.latents.spec import VaeError, VaeSpec

__all__ = ["RECORD_FILE", "RECORD_KEY", "LatentRecord", "read_dataset_record", "read_model_record"]

RECORD_KEY = "latent"  # the dataset.json field
RECORD_FILE = "latent.json"  # beside a trained model


@dataclass
class LatentRecord:
    """How a latent dataset was made from pixels."""

    vae: VaeSpec
    #: the video action space (one row per video frame) before grouping
    video_action_space: ActionSpace
    #: (H, W, C) of the video frames that were encoded
    pixel_shape: tuple[int, int, int]
    #: "mode" (the posterior's mean) or "sample"
    posterior: str = "mode"
    #: the VAE's dtype while encoding
    dtype: str = "float32"
    #: the pixel dataset encoded
    source: str | None = None
    #: episode index → [frames before, frames after] for episodes trimmed to the VAE's rule
    trimmed: dict[str, list[int]] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        """Video actions per latent action row."""
        return self.vae.grouping.factor

    def to_json(self) -> dict[str, Any]:
        return {
            "vae": self.vae.to_json(),
            "video_action_space": self.video_action_space.to_json(),
            "slots": self.slots,
            "alignment": "row j holds the actions producing the video frames of latent frame j+1 (docs/LATENTS.md)",
            "pixel_shape": list(self.pixel_shape),
            "posterior": self.posterior,
            "dtype": self.dtype,
            "source": self.source,
            "trimmed": self.trimmed,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> LatentRecord:
        try:
            return cls(
                vae=VaeSpec.from_json(obj["vae"]),
                video_action_space=ActionSpace.from_json(obj["video_action_space"]),
                pixel_shape=tuple(int(v) for v in obj["pixel_shape"]),
                posterior=str(obj.get("posterior", "mode")),
                dtype=str(obj.get("dtype", "float32")),
                source=obj.get("source"),
                trimmed=dict(obj.get("trimmed") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VaeError(f"{where}: malformed latent record ({type(exc).__name__}: {exc})") from None


def read_dataset_record(root: str | os.PathLike) -> LatentRecord | None:
    """The record of the dataset at ``root`` (None for pixel datasets and latents made elsewhere)."""
    info = read_info(root)
    obj = info.extra_fields.get(RECORD_KEY)
    return None if obj is None else LatentRecord.from_json(obj, str(Path(root) / "dataset.json"))


def read_model_record(model_dir: str | os.PathLike) -> LatentRecord | None:
    """The record a training run stored beside its model (None when trained on pixels)."""
    f = Path(model_dir) / RECORD_FILE
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VaeError(f"{f}: cannot read: {exc}") from None
    return LatentRecord.from_json(obj, str(f))
