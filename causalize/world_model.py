"""`WorldModel`: a converted denoiser driven with a noise level and an action per frame.

    wm = causalize.WorldModel.from_pretrained("./causal-checkpoint")
    out = wm(sample, timesteps, actions=None, action_mask=None, **model_kwargs)

`sample` is in the model's native layout, `timesteps` is (B, T), `actions` is (B, T, A) with
`actions[:, t]` the action attached to frame t — the one that produced it, a_{t−1} (METHOD.md §7);
`action_mask` (B, T) bool is True where a frame's action is used and False where it is dropped or
absent (the null action, a zero embedding; e.g. frame 0, or action dropout). The output is the denoiser output in the layout of `sample`. The diffusers model's
own forward runs; the per-frame conditioning travels in its frame context.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from causalize import precision
from causalize.context import CONTEXT_ATTR, MODULE_CONTEXT
from causalize.errors import CausalizeError, UsageError
from causalize.image_condition import ImageCondition, ImageConditionWarning, apply_image, latent_part, to_model_units
from causalize.modules.action_encoder import ADAPTER_ATTR
from causalize.plan import Plan

if TYPE_CHECKING:
    from causalize.latents.spec import LatentNorm


class WorldModel(nn.Module):
    """A converted denoiser driven with a noise level and an action per frame (see the module
    docstring). It holds the diffusers model (`.model`, still a drop-in for its pipelines) and its
    plan; `forward` sets the per-frame conditioning in the model's frame context and runs the
    model's own forward. Built from a model converted with `frame-conditioning`, or loaded with
    `WorldModel.from_pretrained(path, torch_dtype=..., device=...)`."""

    def __init__(self, model: nn.Module, plan: str | Plan | None = None):
        super().__init__()
        from causalize.api import plan_for

        self.model = model
        self.plan = plan_for(model, plan)
        #: how an image-to-video config takes its conditioning image (None: it takes none)
        self.image_condition: ImageCondition | None = self.plan.image_condition_of(model)
        #: the data's latent normalisation (set by the loaders from the latent record), used
        #: where the family's pipeline passes the image un-normalised
        self.latent_norm: LatentNorm | None = None
        self._warned_no_image = False
        if self.plan.conditioning is None or getattr(model, CONTEXT_ATTR, None) is None or not _has_conditioning(model):
            raise UsageError(
                f"this {type(model).__name__} takes no per-frame timesteps",
                "convert it with a pipeline that ends in 'frame-conditioning' (e.g. `causalize convert --action-dim N`)",
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **load_kwargs: Any,
    ) -> WorldModel:
        """Load a converted checkpoint (`causalize.load`) in `torch_dtype` on `device` (None: as stored, CPU)."""
        from pathlib import Path

        from causalize.api import load
        from causalize.manifest import Manifest

        model = load(path, torch_dtype=torch_dtype, device=device, **load_kwargs)
        return cls(model, Manifest.read(Path(path)).plan)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (modules diffusers keeps in fp32 do not count)."""
        return precision.model_dtype(self.model)

    @property
    def device(self) -> torch.device:
        return precision.model_device(self.model)

    def unconditional_inputs(
        self, batch: int, frames: int, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """The model's other inputs for an unconditional call (see `conditioning_kwargs`), in the
        model's dtype and on its device."""
        return conditioning_kwargs(self.plan, self.model, batch, frames, overrides, self.device, self.dtype)

    @property
    def action_encoder(self) -> nn.Module | None:
        return getattr(self.model, ADAPTER_ATTR, None)

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        actions: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """`image`: an image-to-video model's condition, the clean latent of the window's first
        frame (one frame in the sample's layout; causalize.image_condition); None: zeros (with a
        warning, once). Training and rollout always pass the window's first frame."""
        cond = self.plan.conditioning
        axis = self.plan.layout.inputs[cond.sample_arg]
        frames = sample.shape[axis]
        batch = sample.shape[0]
        if timesteps.shape != (batch, frames):
            raise UsageError(f"timesteps must be (batch, frames) = ({batch}, {frames}), got {tuple(timesteps.shape)}")
        ctx = getattr(self.model, CONTEXT_ATTR)
        model_sample, image_kwargs = self._with_image(sample, image, axis, ctx, model_kwargs)
        try:  # the context is cleared even when a check below refuses the call
            ctx.timesteps = timesteps if cond.mode == "delta" else None
            ctx.action_emb = self._action_embedding(actions, action_mask, batch, frames)
            inputs = {
                cond.sample_arg: model_sample,
                cond.timestep_arg: self._model_timesteps(sample, timesteps),
                **dict(cond.extra_kwargs),
                **model_kwargs,
                **image_kwargs,
            }
            return self.plan.forward(self.model, inputs)
        finally:
            ctx.timesteps = ctx.action_emb = None

    def _with_image(self, sample: torch.Tensor, image: torch.Tensor | None, axis: int, ctx: Any, given: Any):
        """(the model's sample, extra kwargs) with the image condition applied; the window frame
        index of the sample's first frame is the stream's offset when streaming. A condition
        argument the caller passes itself (I2VGenXL's image_latents) is kept when no image is
        given."""
        ic = self.image_condition
        if ic is not None and ic.arg is not None and ic.arg in given:
            if image is not None:
                raise UsageError(f"give either image= or {ic.arg}=, not both")
            return sample, {}
        if ic is None:
            if image is not None:
                raise UsageError(
                    f"this {type(self.model).__name__} config takes no conditioning image, but image= was given",
                    "drop image=, or convert an image-to-video checkpoint",
                )
            return sample, {}
        offset = ctx.stream.offset if ctx.stream is not None else 0
        channel_axis = self.plan.layout.channel_axis
        if image is None:
            if ic.fill != "none" and "image" in ic.parts and not self._warned_no_image:
                self._warned_no_image = True
                warnings.warn(
                    f"this image-to-video {type(self.model).__name__} got no image=: its image channels are zeros "
                    "(training and rollout pass the window's first frame)",
                    ImageConditionWarning,
                    stacklevel=3,
                )
            zeros = torch.zeros_like(sample.narrow(axis, 0, 1))
            return apply_image(ic, sample, zeros, axis, offset, channel_axis)
        image = to_model_units(ic, image, axis, self.latent_norm, channel_axis)
        return apply_image(ic, sample, image, axis, offset, channel_axis)

    def example_sample(self, frames: int) -> torch.Tensor:
        """The plan's example sample of `frames` frames as the world model takes it: latents only
        (an I2V config's image channels are added by `forward`)."""
        cond = self.plan.conditioning
        sample = self.plan.make_inputs(self.model, frames, torch.Generator().manual_seed(0))[cond.sample_arg]
        layout = self.plan.layout
        return latent_part(self.image_condition, sample, layout.inputs[cond.sample_arg], layout.channel_axis)

    def _model_timesteps(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        cond = self.plan.conditioning
        if cond.mode == "delta":
            # the per-sample path (the hooks replace it per frame); what remains per sample (a
            # text stream's modulation) sees the first frame's level, or in a streaming rollout
            # the level of the window's first frame, cached earlier
            stream = getattr(self.model, CONTEXT_ATTR).stream
            if stream is not None and stream.anchor_timestep is not None:
                return torch.full_like(timesteps[:, 0], stream.anchor_timestep)
            return timesteps[:, 0]
        if cond.model_timesteps is not None:
            return cond.model_timesteps(self.model, sample, timesteps)
        grid = self.plan.tokens(self.model, {cond.sample_arg: sample})
        return timesteps.repeat_interleave(grid.per_frame, dim=1)

    def _action_embedding(self, actions, action_mask, batch: int, frames: int) -> torch.Tensor | None:
        if actions is None:
            return None
        encoder = self.action_encoder
        if encoder is None:
            raise UsageError("this model has no action adapter", "convert it with --action-dim N")
        if actions.shape[:2] != (batch, frames):
            raise UsageError(
                f"actions must start with (batch, frames) = ({batch}, {frames}), got {tuple(actions.shape)}"
            )
        if actions.is_floating_point() and not torch.isfinite(actions).all():
            raise UsageError("actions contain NaN or inf")
        if action_mask is not None and action_mask.shape != (batch, frames):
            raise UsageError(
                f"action_mask must be (batch, frames) = ({batch}, {frames}), got {tuple(action_mask.shape)}"
            )
        return encoder(actions, action_mask)


def _keeps_value(name: str) -> bool:
    """Example inputs that are settings rather than content (masks, SVD's added_time_ids, fps)."""
    return "mask" in name or "time_ids" in name or name in ("fps",)


def conditioning_kwargs(
    plan: Plan,
    model: nn.Module,
    batch: int,
    frames: int,
    overrides: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The model's extra keyword arguments for an unconditional ("empty prompt") training call at
    ``batch``: the plan's example inputs without the sample and the timestep, with every
    content tensor (text embeddings, image latents, ...) zeroed, masks and settings kept, and
    ``overrides`` (tensors at batch 1, e.g. the real empty-prompt embedding) used where given.
    Expanded to the batch; an input whose frame axis is 0 folds frames into the batch
    ((B·F, ...), AnimateDiff's encoder_hidden_states) and is repeated per sample. Floating tensors
    take ``dtype`` (default: the model's compute dtype), all tensors go to ``device``."""
    cond = plan.conditioning
    dtype = dtype or precision.model_dtype(model)
    example = plan.make_inputs(model, frames, torch.Generator().manual_seed(0))
    example.pop(cond.sample_arg, None)
    example.pop(cond.timestep_arg, None)
    image = plan.image_condition_of(model)
    if image is not None and image.arg is not None:
        example.pop(image.arg, None)  # WorldModel builds it from the window's first frame
    overrides = dict(overrides or {})
    out: dict[str, Any] = {}
    for name, value in {**example, **{k: v for k, v in overrides.items() if k not in example}}.items():
        folded = plan.layout.inputs.get(name) == 0
        if name in overrides:
            value = overrides[name]
            if folded and torch.is_tensor(value) and value.shape[:1] == (1,) and frames > 1:
                value = value.repeat(frames, *([1] * (value.ndim - 1)))  # one row per frame
        elif torch.is_tensor(value) and value.is_floating_point() and not _keeps_value(name):
            value = torch.zeros_like(value)
        if torch.is_tensor(value):
            if name in cond.unbatched:
                pass  # the model's forward repeats it over the batch itself
            elif folded:
                value = value.repeat(batch, *([1] * (value.ndim - 1)))
            elif value.ndim >= 1 and value.shape[0] == 1:
                value = value.expand(batch, *value.shape[1:]).contiguous()
            if value.is_floating_point():
                value = value.to(dtype=dtype)
            if device is not None:
                value = value.to(device)
        out[name] = value
    return out


def _has_conditioning(model: nn.Module) -> bool:
    return any(hasattr(m, MODULE_CONTEXT) for m in model.modules())


__all__ = ["CausalizeError", "WorldModel", "conditioning_kwargs"]
