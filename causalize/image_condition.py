"""Image conditioning of image-to-video denoisers (SVD, Wan and SkyReels-V2 I2V, CogVideoX 1.0 /
1.5 I2V, ConsisID, HunyuanVideo and HunyuanVideo 1.5 I2V, Motif, I2VGenXL): how the conditioning
image's latent reaches the model, per family.

An I2V model takes, besides the noisy latents, the clean latent of a conditioning image: as extra
input channels concatenated to the sample (most), or as a separate argument (I2VGenXL's
``image_latents``). A world model keeps the method's rule (docs/METHOD.md §6, §9): **the image is
the window's first frame**, clean. Frame 0 of the window is in the past of every frame, so the
condition carries no future into the past; where a family puts the image only on frame 0 (and
zeros, with a 0 mask, on later frames), "frame 0" is the window's first frame, counted across
streaming calls by the stream's offset, so a streamed frame gets what it would get in the full
window.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from causalize.errors import UsageError
from causalize.layout import sample_channel_axis

if TYPE_CHECKING:
    from causalize.latents.spec import LatentNorm

__all__ = [
    "ImageCondition",
    "ImageConditionWarning",
    "apply_image",
    "extra_channels",
    "latent_part",
    "to_model_units",
]


class ImageConditionWarning(UserWarning):
    """The image condition is passed in other units than the base pipeline passes it."""


@dataclass(frozen=True)
class ImageCondition:
    """How one I2V family takes its conditioning image.

    fill: "every" (the image on every frame: SVD, I2VGenXL), "first" (the image on the
        window's first frame, zeros after: CogVideoX, Wan, HunyuanVideo, Motif) or "none" (the
        channels are always zero: a text-to-video config of an I2V architecture, HunyuanVideo
        1.5 T2V, whose pipeline passes zeros; any image is ignored).
    parts: the order of the extra channels after the sample: "image" (the latent, as many
        channels as the sample), "zeros" (as many channels, always zero: Kandinsky 5, whose I2V
        pipeline puts the image into the latents' frame 0 itself) and "mask" (`mask_channels`
        channels, 1 on the image's frame, 0 elsewhere: Wan's 4, HunyuanVideo's and Kandinsky's 1).
    arg: a model argument that takes the condition (I2VGenXL's ``image_latents``) instead of
        channels concatenated to the sample.
    units: "latents" (the normalised latents the denoiser diffuses: most pipelines), "raw" (the
        VAE's un-normalised latents: SVD's pipeline passes ``latent_dist.mode()`` unscaled) or
        "inverse" (raw / scaling_factor: CogVideoX 1.5's pipeline, whose VAE sets
        ``invert_scale_latents``, divides the image latent by the factor the video latents are
        multiplied by).
    """

    fill: Literal["every", "first", "none"] = "first"
    parts: tuple[str, ...] = ("image",)
    mask_channels: int = 0
    arg: str | None = None
    units: Literal["latents", "raw", "inverse"] = "latents"

    def __post_init__(self) -> None:
        if self.fill not in ("every", "first", "none"):
            raise ValueError(f"ImageCondition.fill must be every, first or none, got {self.fill!r}")
        if not self.parts or any(p not in ("image", "zeros", "mask") for p in self.parts):
            raise ValueError(f"ImageCondition.parts must name 'image', 'zeros' and 'mask' only, got {self.parts!r}")
        if ("mask" in self.parts) != (self.mask_channels > 0):
            raise ValueError("ImageCondition: a 'mask' part needs mask_channels > 0, and mask_channels a 'mask' part")
        if self.units not in ("latents", "raw", "inverse"):
            raise ValueError(f"ImageCondition.units must be latents, raw or inverse, got {self.units!r}")

    def describe(self) -> str:
        """One line for `causalize inspect`."""
        where = f"argument {self.arg}" if self.arg else "channels " + " + ".join(self.parts)
        if self.fill == "none":
            return f"text-to-video config of an I2V architecture: {where} fed zeros"
        on = "every frame" if self.fill == "every" else "the window's first frame, zeros after"
        return f"image-to-video: the window's first frame, clean, as {where} on {on} ({self.units} units)"

    def to_json(self) -> dict[str, Any]:
        return {
            "fill": self.fill,
            "parts": list(self.parts),
            "mask_channels": self.mask_channels,
            "arg": self.arg,
            "units": self.units,
            "describe": self.describe(),
        }


def extra_channels(cond: ImageCondition | None, in_channels: int) -> int:
    """Channels of a sample with `in_channels` that are image condition, not latents: the
    latents fill `in_channels − extra` and the image part has as many."""
    if cond is None or cond.arg is not None:
        return 0
    n_image = sum(p in ("image", "zeros") for p in cond.parts)
    latent = (in_channels - cond.mask_channels * sum(p == "mask" for p in cond.parts)) // (1 + n_image)
    return in_channels - latent


def apply_image(
    cond: ImageCondition,
    sample: torch.Tensor,
    image: torch.Tensor,
    frame_axis: int,
    offset: int = 0,
    channel_axis: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the model's sample, extra keyword arguments) for `sample` (latents, native layout) whose
    frames are window frames offset .. offset+F−1, and `image` (one clean frame in the same
    layout, batch 1 or the sample's, or a divisor of it: guidance branches repeat it)."""
    if image.ndim != sample.ndim or image.shape[frame_axis] != 1:
        raise UsageError(
            f"image must be one frame in the sample's layout (frame axis {frame_axis} of size 1), "
            f"got {tuple(image.shape)} for a sample of {tuple(sample.shape)}"
        )
    axis_c = sample_channel_axis(frame_axis, channel_axis)
    like = [d for i, d in enumerate(sample.shape) if i not in (0, frame_axis)]
    got = [d for i, d in enumerate(image.shape) if i not in (0, frame_axis)]
    if like != got:
        raise UsageError(f"image frame {tuple(got)} does not match the sample's frames {tuple(like)}")
    batch = sample.shape[0]
    if image.shape[0] != batch:
        if batch % image.shape[0]:
            raise UsageError(f"image batch {image.shape[0]} does not divide the sample's batch {batch}")
        image = image.repeat(batch // image.shape[0], *([1] * (image.ndim - 1)))
    frames = sample.shape[frame_axis]
    image = image.to(dtype=sample.dtype, device=sample.device).expand_as(sample)
    first = (torch.arange(offset, offset + frames, device=sample.device) == 0).to(sample.dtype)
    if cond.fill == "none":
        first, image = torch.zeros_like(first), torch.zeros_like(image)
    shape = [1] * sample.ndim
    shape[frame_axis] = frames
    first = first.view(shape)
    parts = []
    for part in cond.parts:
        if part == "image":
            parts.append(image * first if cond.fill == "first" else image)
        elif part == "zeros":
            parts.append(torch.zeros_like(image))
        else:
            size = list(sample.shape)
            size[axis_c] = cond.mask_channels
            parts.append(first.expand(size))
    extra = torch.cat(parts, dim=axis_c)
    if cond.arg is not None:
        return sample, {cond.arg: extra}
    return torch.cat([sample, extra], dim=axis_c), {}


def to_model_units(
    cond: ImageCondition,
    image: torch.Tensor,
    frame_axis: int,
    norm: LatentNorm | None,
    channel_axis: int | None = None,
) -> torch.Tensor:
    """The image in the units the family's pipeline passes: unchanged for "latents"; for "raw",
    the normalisation undone with `norm` (the latent record, or training's `--vae`); for
    "inverse", that divided by the scaling factor once more; unchanged, with a warning, when the
    data's normalisation is not known."""
    if cond.units == "latents":
        return image
    if norm is None:
        warnings.warn(
            f"this model's pipeline passes the image in {cond.units} units (not the normalised latents), but "
            "the data's normalisation is unknown (no latent record, no --vae): the normalised latents are "
            "passed as they are",
            ImageConditionWarning,
            stacklevel=3,
        )
        return image
    from causalize.latents.vae import denormalise

    axis_c = sample_channel_axis(frame_axis, channel_axis)
    raw = denormalise(image.float().movedim(axis_c, 1), norm).movedim(1, axis_c)
    if cond.units == "inverse":
        raw = raw / norm.scale
    return raw.to(image.dtype)


def latent_part(
    cond: ImageCondition | None, sample: torch.Tensor, frame_axis: int, channel_axis: int | None = None
) -> torch.Tensor:
    """The latent channels of a model-input `sample` (a plan's example): the sample without the
    image condition's channels."""
    if cond is None or cond.arg is not None or sample.ndim != 5:
        return sample
    axis_c = sample_channel_axis(frame_axis, channel_axis)
    total = sample.shape[axis_c]
    return sample.narrow(axis_c, 0, total - extra_channels(cond, total))
