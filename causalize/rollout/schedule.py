"""Sampling schedules and single denoising steps (METHOD.md §8–§9), pure torch.

The noise levels are those of the model's training schedule (`causalize.noise.NoiseSchedule`,
ᾱ_k for k = 0..K−1); a sampler visits S of them. Two spacings:

- "trailing": K·(1 − i/S) − 1 for i = 0..S−1, i.e. 999, 979, …, 19 for K = 1000, S = 50. It starts
  at the last level, which matters with a zero-terminal-SNR schedule (ᾱ_{K−1} = 0).
- "uniform" (DDIM's and DynamiCrafter's): 1 + i·K/S, visited from the top: 981, 961, …, 21, 1.

Steps go from level k to the next visited level (or to "clean", ᾱ = 1, after the last one):

- DDIM (Song et al.): x' = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̂ + σ·z, σ = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ').
  η = 0 is deterministic; the Vid2World reference's logger uses η = 1.
- Euler: one explicit Euler step of the probability-flow ODE in the angle φ = atan2(√(1−ᾱ), √ᾱ),
  where x = cos φ·x0 + sin φ·ε and dx/dφ = v (the v-parameterisation). Well defined at zero
  terminal SNR (φ = π/2). DDIM with η = 0 is the exact rotation over the same interval, so the two
  agree to second order in the step and differ at coarse steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from causalize.errors import UsageError
from causalize.noise import NoiseSchedule, convert_prediction

Spacing = Literal["trailing", "uniform"]
SamplerKind = Literal["ddim", "euler"]
SPACINGS = ("trailing", "uniform")
SAMPLERS = ("ddim", "euler")


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The S levels a sampler visits, noisiest first."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise UsageError(f"steps must be an integer in [1, {num_train_timesteps}], got {steps!r}")
    if spacing == "trailing":
        levels = [round(num_train_timesteps * (1 - i / steps)) - 1 for i in range(steps)]
    elif spacing == "uniform":
        stride = num_train_timesteps // steps
        levels = [1 + i * stride for i in range(steps)][::-1]
        levels = [min(k, num_train_timesteps - 1) for k in levels]
    else:
        raise UsageError(f"unknown spacing {spacing!r}", f"use one of {', '.join(SPACINGS)}")
    return levels


def history_level(levels: list[int], history_noise: int | str) -> int:
    """The fixed noise level of history frames: an explicit level, or "second_to_last" (the
    reference's choice: 39 with 50 trailing steps, 21 with uniform ones; METHOD.md §9)."""
    if history_noise == "second_to_last":
        return levels[-2] if len(levels) > 1 else levels[-1]
    if isinstance(history_noise, bool) or not isinstance(history_noise, int) or history_noise < 0:
        raise UsageError(f"history_noise must be a level >= 0 or 'second_to_last', got {history_noise!r}")
    return history_noise


def _alpha_bar(schedule: NoiseSchedule, level: int | None) -> float:
    """ᾱ at a level; None is the clean end of the chain (ᾱ = 1)."""
    return 1.0 if level is None else float(schedule.alphas_cumprod[level])


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Causal action guidance on v-predictions of the frame(s) being generated (METHOD.md §8):
    v̂ = v_u + s·(v_c − v_u); with rescale φ > 0, v̂ ← φ·v̂·σ(v_c)/σ(v̂) + (1−φ)·v̂, σ the standard
    deviation over every non-batch dimension. s = 1 returns v_c unchanged."""
    if scale == 1.0 and rescale == 0.0:
        return v_cond
    guided = v_uncond + scale * (v_cond - v_uncond)
    if rescale:
        dims = tuple(range(1, guided.ndim))
        std_c = v_cond.std(dim=dims, keepdim=True)
        std_g = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        guided = rescale * guided * (std_c / std_g) + (1.0 - rescale) * guided
    return guided


def step(
    kind: SamplerKind,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    v: torch.Tensor,
    level: int,
    next_level: int | None,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step from `level` to `next_level` (None: to the clean sample) given the v-prediction.

    Computed in float64 for the coefficients and in x's dtype (float32 at least) for tensors.
    """
    a = _alpha_bar(schedule, level)
    a_next = _alpha_bar(schedule, next_level)
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, vf = x.to(dtype), v.to(dtype)
    sa, ss = math.sqrt(a), math.sqrt(1.0 - a)
    if kind == "euler":
        phi, phi_next = math.atan2(ss, sa), math.atan2(math.sqrt(1.0 - a_next), math.sqrt(a_next))
        return (xf + (phi_next - phi) * vf).to(x.dtype)
    if kind != "ddim":
        raise UsageError(f"unknown sampler {kind!r}", f"use one of {', '.join(SAMPLERS)}")
    x0 = convert_prediction(xf, vf, sa, ss, "v", "sample")
    eps = convert_prediction(xf, vf, sa, ss, "v", "epsilon")
    sigma = 0.0
    if eta and next_level is not None and a < 1.0:
        sigma = eta * math.sqrt((1.0 - a_next) / (1.0 - a)) * math.sqrt(max(0.0, 1.0 - a / a_next))
    out = math.sqrt(a_next) * x0 + math.sqrt(max(0.0, 1.0 - a_next - sigma**2)) * eps
    if sigma:
        out = out + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    return out.to(x.dtype)


__all__ = ["SAMPLERS", "SPACINGS", "guide", "history_level", "sampling_timesteps", "step"]
