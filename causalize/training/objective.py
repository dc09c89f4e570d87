"""The Diffusion Forcing training objective of Vid2World (METHOD.md §6, §7, §11).

Everything here is pure torch and independent of any diffusers model class, so the trainer, the
benchmark and the tests share one definition of timestep sampling (independent per frame, or
shared over frames for the plain-diffusion baseline), per-frame action dropout, and the loss
reduction (mean over C·H·W per frame, then uniform over frames and batch; no loss mask, no VLB
term; optional per-element weights, e.g. :func:`motion_weights`). The noise schedule, the
forward process and the parameterisations live in :mod:`causalize.noise`, shared with rollout.

The toolkit default parameterisation is v (§11 row 1): with zero terminal SNR, x_k = ε at the last
step, so an ε-target there says nothing about x0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, overload

import torch

from causalize.noise import check_same_shape, compute_dtype, frame_axis_index
from causalize.training.config import TIMESTEP_MODES  # defined with the settings: reading those needs no torch

__all__ = [
    "DROPOUT_MODES",
    "TIMESTEP_MODES",
    "action_keep_mask",
    "diffusion_forcing_loss",
    "motion_weights",
    "sample_frame_timesteps",
]

DROPOUT_MODES: tuple[str, ...] = ("per-frame", "per-sequence")


# --------------------------------------------------------------------------------------------
# Sampling timesteps and action dropout
# --------------------------------------------------------------------------------------------


def sample_frame_timesteps(
    batch: int,
    frames: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mode: str = "independent",
) -> torch.Tensor:
    """Per-frame noise levels k, (B, T) long in [0, K).

    "independent" (Diffusion Forcing, the method): k_t iid uniform per sample and frame, exactly
    like the reference's ``randint(0, 1000, (B, T))`` (so k = 0, i.e. clean context, is possible).
    "shared": one k per sample repeated over its frames, the plain video-diffusion baseline.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(TIMESTEP_MODES)}")
    _check_positive_int(batch, "batch")
    _check_positive_int(frames, "frames")
    _check_positive_int(num_train_timesteps, "num_train_timesteps")
    device = _resolve_device(device, generator)
    cols = frames if mode == "independent" else 1
    k = torch.randint(
        0,
        num_train_timesteps,
        (batch, cols),
        generator=generator,
        device=device,
        dtype=torch.long,
    )
    return k if mode == "independent" else k.expand(batch, frames).contiguous()


def action_keep_mask(
    batch: int,
    frames: int,
    drop_prob: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mode: str = "per-frame",
) -> torch.Tensor:
    """Action-dropout mask m, bool (B, T): True keeps frame t's action, False substitutes ∅ (§7).

    "per-frame" (default, the reference's ``action_random_drop_btw_timestep``): m_t ~ Bernoulli(1−p)
    independently per sample and frame, which is what trains the newest-frame-only unconditional
    branch of causal action guidance (§8). "per-sequence": one draw per sample, whole rows dropped.
    """
    if mode not in DROPOUT_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(DROPOUT_MODES)}")
    _check_positive_int(batch, "batch")
    _check_positive_int(frames, "frames")
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real) or not (0.0 <= float(drop_prob) < 1.0):
        raise ValueError(f"drop_prob must be a number in [0, 1), got {drop_prob!r}")
    device = _resolve_device(device, generator)
    cols = frames if mode == "per-frame" else 1
    # u ~ U[0, 1): P(u >= p) = 1 − p exactly, and p = 0 keeps everything.
    keep = torch.rand((batch, cols), generator=generator, device=device) >= drop_prob
    return keep if mode == "per-frame" else keep.expand(batch, frames).contiguous()


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@overload
def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = ...,
    *,
    weight: torch.Tensor | None = ...,
    return_per_frame: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = ...,
    *,
    weight: torch.Tensor | None = ...,
    return_per_frame: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = 1,
    *,
    weight: torch.Tensor | None = None,
    return_per_frame: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ℒ = mean_b (1/T) Σ_t mean_{C,H,W} (target − f)² (§6): the squared error is averaged over
    every axis except batch and frame, then uniformly over frames and batch. No low-noise mask and
    no VLB term. Computed in float32 (float64 if an input is float64) whatever the model dtype.

    ``weight`` (the shape of ``model_out``, e.g. :func:`motion_weights`) multiplies each squared
    error before the means. With ``return_per_frame=True`` also returns the (B, T) per-frame
    losses (still attached to the graph; detach before logging), whose mean is the scalar loss.
    """
    check_same_shape(model_out, target, "model_out", "target")
    axis = frame_axis_index(model_out, frame_axis)
    if model_out.numel() == 0:
        raise ValueError(f"cannot compute a loss over an empty tensor of shape {tuple(model_out.shape)}")
    dtype = compute_dtype(model_out, target)
    sq = (model_out.to(dtype) - target.to(dtype)).square()
    if weight is not None:
        check_same_shape(weight, model_out, "weight", "model_out")
        sq = sq * weight.to(dtype)
    b, t = sq.shape[0], sq.shape[axis]
    per_frame = sq.movedim(axis, 1).reshape(b, t, -1).mean(dim=-1)
    loss = per_frame.mean()
    return (loss, per_frame) if return_per_frame else loss


def motion_weights(x0: torch.Tensor, frame_axis: int = 1, strength: float = 1.0) -> torch.Tensor:
    """Loss weights that favour what moves: w ∝ 1 + strength · m / mean(m), scaled to mean 1 per
    sample, where m = |x0_t − x0_{t−1}| elementwise (frame 0: |x0_1 − x0_0|) on the clean clip.

    A world model's actions move small objects (a paddle, a character) over a static scene; the
    plain loss is dominated by the scene, so the gradient that ties an action to its effect is a
    small, noisy part of it. Weighting the changing elements raises that part. Training only: the
    weights come from the clean clip, never reach the model, and keep the loss's scale (mean 1).
    A clip without change (or with one frame) gets weight 1 everywhere.
    """
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength < math.inf:
        raise ValueError(f"strength must be a non-negative number, got {strength!r}")
    axis = frame_axis_index(x0, frame_axis)
    x = x0.detach().to(compute_dtype(x0, x0)).movedim(axis, 1)
    if x.shape[1] < 2 or strength == 0:
        return torch.ones_like(x0, dtype=x.dtype)
    change = (x[:, 1:] - x[:, :-1]).abs()
    m = torch.cat([change[:, :1], change], dim=1)
    mean = m.flatten(1).mean(dim=1).view(-1, *([1] * (m.dim() - 1)))
    w = 1.0 + strength * m / mean.clamp_min(torch.finfo(m.dtype).tiny)
    w = w / w.flatten(1).mean(dim=1).view_as(mean)
    return w.movedim(1, axis)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _resolve_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    """Default to the generator's device so a CUDA generator works without repeating the device."""
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")
