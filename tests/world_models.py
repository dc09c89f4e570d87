"""Tiny converted world models for the rollout / streaming tests."""

from __future__ import annotations

import torch

from causalize.api import convert_model
from causalize.plugin_manager import registries
from causalize.world_model import WorldModel


def tiny_world_model(
    name: str,
    *,
    action_dim: int = 3,
    action_type: str = "continuous",
    seed: int = 0,
    pipeline: str | None = None,
    **config,
) -> WorldModel:
    """The plan's tiny model (config overrides allowed), converted with frame-conditioning and an
    action adapter. Zero-initialised layers and tables (the adapter's last layer, UNet3D's last
    temporal conv, Cosmos' learnable positions) would hide what they carry: they get weights, as
    the causality probe does."""
    plan = registries().plans.get(name)
    torch.manual_seed(seed)
    model = plan.model_cls()(**{**plan.tiny_config, **config}).eval()
    pipeline = pipeline or plan.pipeline
    convert_model(model, plan, f"{pipeline},frame-conditioning{{action_dim={action_dim},action_type={action_type}}}")
    wm = WorldModel(model, plan)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in wm.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.3)
    return wm


# Tiny image-to-video configs: the plan's tiny config with the I2V input channels (4 latent
# channels in every tiny config). Every plan that declares an image condition needs one here.
I2V_CONFIGS: dict[str, dict] = {
    "svd": dict(in_channels=8),  # [latents ; image on every frame]
    "wan": dict(in_channels=12),  # [latents ; 4 mask ; image on frame 0]
    "cogvideox": dict(in_channels=8),  # [latents ; image on frame 0]
    "cogvideox15": dict(in_channels=8),  # the same, in 2-frame blocks
    "consisid": dict(in_channels=8),
    "hunyuan": dict(in_channels=9, image_condition_type="latent_concat"),  # [latents ; image ; 1 mask]
    "i2vgenxl": {},  # image_latents is an argument of its own
    "skyreels-v2": dict(in_channels=12),  # Wan's rule
    "motif": dict(in_channels=9),  # [latents ; image on frame 0 ; 1 mask]
    "hunyuan15": dict(in_channels=9, task_type="i2v"),  # the same
    "kandinsky5": dict(visual_cond=True),  # channels last: [latents ; zeros ; 1 mask]
}


def tiny_image_vae(**config):
    """A tiny per-frame AutoencoderKL: 16×16×3 pixels -> 4×8×8 latents (seeded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "block_out_channels": (8, 8),
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 16,
            **config,
        }
    )
