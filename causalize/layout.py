"""Frame layout descriptors: where the frame axis is in a model's inputs and outputs.

The causality checker and the passes never guess a layout from shapes (a temporal sequence of
length T collides with a spatial one of H·W = T); the plan of each model class declares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FrameLayout:
    """Frame axes of a denoiser's per-frame inputs and of its output, in its native layout.

    inputs: keyword argument name -> frame axis, for every input tensor that carries one entry per
        latent frame (the noisy latents, per-frame image latents, ...). The probe runs at batch 1,
        so an axis that folds frames into the batch (B·T, ...) is a frame axis too.
    output_axis: frame axis of the output tensor.
    block_size: frames that must stay mutually visible (temporal patch size); 1 = frame-causal.
    channel_axis: channels of the 5-D sample (and output) when not next to the frames: Kandinsky's
        channels-last (B, T, H, W, C) is 4; None = (B, C, T, H, W) or (B, T, C, H, W) by the frame axis.
    """

    inputs: dict[str, int] = field(default_factory=lambda: {"sample": 2})
    output_axis: int = 2
    block_size: int = 1
    channel_axis: int | None = None

    def num_frames(self, kwargs: dict) -> int:
        name, axis = next(iter(self.inputs.items()))
        return int(kwargs[name].shape[axis])


def sample_channel_axis(frame_axis: int, channel_axis: int | None = None) -> int:
    """The channel axis of a 5-D video sample: `channel_axis` when the layout names one, else the
    axis beside the frames ((B, T, C, H, W) or (B, C, T, H, W))."""
    if channel_axis is not None:
        return channel_axis
    return 2 if frame_axis == 1 else 1


def to_native(x: torch.Tensor, frame_axis: int, channel_axis: int | None = None) -> torch.Tensor:
    """(B, T, C, H, W) -> the model's layout (frames on `frame_axis`, channels on its channel axis)."""
    return x.movedim((1, 2), (frame_axis, sample_channel_axis(frame_axis, channel_axis)))


def from_native(x: torch.Tensor, frame_axis: int, channel_axis: int | None = None) -> torch.Tensor:
    """The inverse of `to_native`: the model's layout -> (B, T, C, H, W)."""
    return x.movedim((frame_axis, sample_channel_axis(frame_axis, channel_axis)), (1, 2))


def per_frame_max_abs(x: torch.Tensor, axis: int) -> torch.Tensor:
    """max |x| over everything but the frame axis -> (T,) float64."""
    moved = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    return moved.abs().amax(dim=1).double()


def causal_block_allowed(q_frames: torch.Tensor, k_frames: torch.Tensor, block_size: int = 1) -> torch.Tensor:
    """Boolean (Lq, Lk) mask, True where query frame may see key frame: fid(k)//b <= fid(q)//b.

    Frame ids of -1 (text / context tokens) are treated as block -1, i.e. before every frame,
    so context rows see only context and every frame row sees the context.
    """
    qb = torch.div(q_frames, block_size, rounding_mode="floor")
    kb = torch.div(k_frames, block_size, rounding_mode="floor")
    qb = torch.where(q_frames < 0, torch.full_like(qb, -1), qb)
    kb = torch.where(k_frames < 0, torch.full_like(kb, -1), kb)
    return kb[None, :] <= qb[:, None]


def tile_history(t: torch.Tensor, batch: int, what: str = "history cache") -> torch.Tensor:
    """A streaming cache of batch b for a call of batch m·b (both guidance branches batched in one
    forward share one history): the cache repeated m times along the batch."""
    cached = t.shape[0]
    if cached == batch:
        return t
    if batch % cached:
        from causalize.errors import CausalizeError

        raise CausalizeError(f"a call of batch {batch} cannot share a {what} of batch {cached}")
    return t.repeat(batch // cached, *([1] * (t.ndim - 1)))
