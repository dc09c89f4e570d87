"""The study's two backbones: which diffusers model is pretrained, and which variants are compared.

* ``unet3d`` (the default): a ``UNet3DConditionModel``, the architecture family of the paper's
  DynamiCrafter. Frames mix in temporal convolutions, temporal attention and time-spanning
  GroupNorms, so it carries every ablation: weight transfer (extrapolative / shift / masked),
  causal norm against the norm left as is, and transfer against scratch.
* ``wan``: a small ``WanTransformer3DModel`` (the DiT family most new video models follow). Frames
  mix only in its full 3-D self-attention, so causalizing it is one pass (a frame-causal mask) and
  there is no weight transfer or norm to ablate: the comparison is transfer against scratch (plus
  guidance and controllability).

A variant is ``{"init": "pretrained" | "random", "causal": bool, ...}``; ``causal`` is False for a
conversion left deliberately leaky (converted with ``allow_leak``, rolled out by full
recomputation, never streamed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BACKBONES", "Backbone", "get_backbone"]


@dataclass(frozen=True)
class Backbone:
    """One pretraining architecture and the conversion variants the study compares on it."""

    name: str
    #: the causalize plan that converts it (and gives the training call's conditioning inputs)
    plan: str
    #: the diffusers class built for pretraining (in/out channels and sample size added by build)
    model_class: str
    variants: dict[str, dict[str, Any]]
    #: the method's variant (guidance sweep, controllability, the GIF)
    main: str
    #: ``pipeline(plan, variant_spec) -> str``: the conversion pipeline of a variant
    pipeline: Callable[[Any, dict[str, Any]], str]
    #: keyword arguments of the model class for the frame channels and size
    io_kwargs: Callable[[int, int], dict[str, Any]]

    def build(self, model_kwargs: dict[str, Any], channels: int, size: int, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the init depends only on ``seed`` (shared with the scratch
        baseline, which must be the same architecture at its random init)."""
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, self.model_class)(**self.io_kwargs(channels, size), **model_kwargs)


def _unet3d_pipeline(plan: Any, spec: dict[str, Any]) -> str:
    """The plan's default pipeline with the variant's weight transfer, without causal-norm for the
    time-spanning-norm ablation (the frame-conditioning pass is added by convert)."""
    from causalize.api import parse_pipeline
    from causalize.passes.pipeline import Pipeline

    pipe = parse_pipeline(plan.pipeline, plan)
    for name in ("causal-temporal-conv", "causal-norm"):
        if name not in pipe.names():
            raise ValueError(f"the {plan.name} pipeline {plan.pipeline!r} has no {name} pass")
    pipe = pipe.replace_options("causal-temporal-conv", transfer=spec["transfer"])
    if not spec["causal"]:
        pipe = Pipeline(tuple(s for s in pipe.steps if s.name != "causal-norm"))
    return str(pipe)


def _default_pipeline(plan: Any, spec: dict[str, Any]) -> str:
    return plan.pipeline


UNET3D = Backbone(
    name="unet3d",
    plan="unet3d",
    model_class="UNet3DConditionModel",
    variants={  # the one non-causal UNet3D variant is the one whose GroupNorms stay time-spanning
        "extrapolative": {"init": "pretrained", "transfer": "extrapolative", "causal": True},
        "shift": {"init": "pretrained", "transfer": "shift", "causal": True},
        "masked": {"init": "pretrained", "transfer": "masked", "causal": True},
        "noncausal-norm": {"init": "pretrained", "transfer": "extrapolative", "causal": False},
        "scratch": {"init": "random", "transfer": "extrapolative", "causal": True},
    },
    main="extrapolative",
    pipeline=_unet3d_pipeline,
    io_kwargs=lambda channels, size: {"in_channels": channels, "out_channels": channels, "sample_size": size},
)

WAN = Backbone(
    name="wan",
    plan="wan",
    model_class="WanTransformer3DModel",
    variants={
        "causal": {"init": "pretrained", "causal": True},
        "scratch": {"init": "random", "causal": True},
    },
    main="causal",
    pipeline=_default_pipeline,
    io_kwargs=lambda channels, size: {"in_channels": channels, "out_channels": channels},
)

BACKBONES: dict[str, Backbone] = {b.name: b for b in (UNET3D, WAN)}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_of(cfg: dict[str, Any]) -> Backbone:
    """The configuration's backbone (studies recorded before backbones existed are UNet3D ones)."""
    return get_backbone(cfg.get("backbone", UNET3D.name))
