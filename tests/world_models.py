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
