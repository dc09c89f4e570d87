"""The probe's primitives: what a perturbation of frame j is, how inputs meet the model's dtype,
and the re-randomisation that keeps zero-initialised layers from hiding leaks. Shared by the
influence matrix and the leak localisation (neither imports the other's internals)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from causalize.layout import FrameLayout

Forward = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def rerandomize_zero_params(model: nn.Module, std: float = 0.05, seed: int = 0) -> list[str]:
    """Give every all-zero parameter random values (in place); returns their names."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not p.is_meta and torch.count_nonzero(p) == 0:
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * std).to(p))
                names.append(name)
    return names


def perturb_frame(inputs: dict[str, Any], layout: FrameLayout, j: int, gen: torch.Generator) -> dict[str, Any]:
    """A copy of the inputs where every per-frame input changes at frame j only: N(0,1) is added to
    float inputs; integer inputs (per-frame timesteps, discrete actions) move by a random nonzero
    offset modulo 1000 (diffusion timesteps; for discrete actions use a float multi-hot instead)."""
    out = dict(inputs)
    for name, axis in layout.inputs.items():
        x = inputs[name].clone()
        sl = x.narrow(axis, j, 1)
        if sl.is_floating_point():
            sl.add_(torch.randn(sl.shape, generator=gen).to(sl))
        else:
            sl.copy_((sl + torch.randint(1, 500, sl.shape, generator=gen).to(sl.device)) % 1000)
        out[name] = x
    return out


def slice_frames(inputs: dict[str, Any], layout: FrameLayout, frames: int) -> dict[str, Any]:
    """The inputs restricted to the first `frames` frames (used to find frame axes by shape)."""
    out = dict(inputs)
    for name, axis in layout.inputs.items():
        out[name] = inputs[name].narrow(axis, 0, frames).clone()
    return out


def as_model_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Floating inputs in the model's compute dtype, every tensor on its device."""
    from causalize.precision import follow_model, model_device, model_dtype

    dtype, device = model_dtype(model), model_device(model)
    return {k: follow_model(v, dtype, device) for k, v in inputs.items()}


__all__ = ["Forward", "as_model_inputs", "perturb_frame", "rerandomize_zero_params", "slice_frames"]
