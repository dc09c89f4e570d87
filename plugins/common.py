"""Small helpers shared by the UNet plugins' example-input factories."""

from __future__ import annotations

import torch
import torch.nn as nn

from causalize.context import TokenGrid

UNET_PIPELINE = "causal-temporal-conv,causal-temporal-attention,causal-norm"


def latent_size(model: nn.Module, minimum: int = 8) -> int:
    """Smallest square latent that survives every downsampling of the UNet (at least `minimum`)."""
    levels = len(model.config.block_out_channels)
    return max(minimum, 2 ** (levels - 1) * 2)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def mid_timestep() -> torch.Tensor:
    return torch.tensor([500])


def patch3d_tokens(model: nn.Module, kwargs: dict) -> TokenGrid:
    """Token grid of a DiT whose `hidden_states` is (B, C, F, H, W) and whose config has a
    (p_t, p_h, p_w) `patch_size` (Wan, SkyReels-V2, Cosmos, Sana-Video): frame-major tokens."""
    _, _, frames, height, width = kwargs["hidden_states"].shape
    pt, ph, pw = model.config.patch_size
    return TokenGrid(frames // pt, (height // ph) * (width // pw))
