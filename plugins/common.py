"""Small helpers shared by the UNet plugins' example-input factories."""

from __future__ import annotations

import torch
import torch.nn as nn

UNET_PIPELINE = "causal-temporal-conv,causal-temporal-attention,causal-norm"


def latent_size(model: nn.Module, minimum: int = 8) -> int:
    """Smallest square latent that survives every downsampling of the UNet (at least `minimum`)."""
    levels = len(model.config.block_out_channels)
    return max(minimum, 2 ** (levels - 1) * 2)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def mid_timestep() -> torch.Tensor:
    return torch.tensor([500])
