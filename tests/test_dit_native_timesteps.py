"""DiTs with native per-frame / per-token timesteps (BACKBONES §4): after conversion, changing only
frame j's timestep (latents identical) must leave every output frame < j bit-exact; before
conversion it leaks through self-attention.

The probe is `check_causality` with a custom perturbation: the per-frame timesteps are the only
per-frame input, `t_frames (1, F)`, and a test forward expands them into each family's native
timestep format (Wan / LTX: per token (B, N); SkyReels-V2: diffusion forcing (B, F); Cosmos:
(B, 1, F, 1, 1)) before calling the plan's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from causalize.api import convert_model, example_inputs
from causalize.layout import FrameLayout
from causalize.plugin_manager import registries
from causalize.verify import check_causality

FRAMES = 4


def _tokens_per_frame(plan, model, inputs) -> int:
    if plan.name == "ltx":  # the plan's inputs are unpacked latents; its tokens() reads the packed call
        _, _, frames, height, width = inputs["latents"].shape
        return plan.tokens(model, {"num_frames": frames, "height": height, "width": width}).per_frame
    return plan.tokens(model, inputs).per_frame


def _wan_like_per_token(plan, model, inputs, t_frames):
    return {"timestep": t_frames.repeat_interleave(_tokens_per_frame(plan, model, inputs), dim=1)}


NATIVE: dict[str, Callable[..., dict[str, Any]]] = {
    "wan": _wan_like_per_token,
    "ltx": _wan_like_per_token,
    "skyreels-v2": lambda plan, model, inputs, t: {"timestep": t, "enable_diffusion_forcing": True},
    "cosmos": lambda plan, model, inputs, t: {"timestep": t[:, None, :, None, None]},
}


def _probe(name: str):
    """(plan, inputs with t_frames, timestep-only layout, forward) for one family."""
    plan = registries().plans.get(name)

    def forward(model, inputs):
        inputs = dict(inputs)
        t_frames = inputs.pop("t_frames")
        inputs.update(NATIVE[name](plan, model, inputs, t_frames))
        return plan.forward(model, inputs)

    layout = FrameLayout(inputs={"t_frames": 1}, output_axis=plan.layout.output_axis)
    return plan, layout, forward


def _inputs(plan, model):
    inputs = example_inputs(model, plan, frames=FRAMES, seed=0)
    inputs["t_frames"] = torch.linspace(300.0, 700.0, FRAMES)[None]  # distinct noise levels per frame
    return inputs


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_per_frame_timestep_is_causal_after_conversion(name):
    plan, layout, forward = _probe(name)
    model = plan.build_tiny()
    convert_model(model, plan)
    report = check_causality(model, _inputs(plan, model), layout, forward, localize=False)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0  # bit-exact, not just small
    assert all(report.matrix[j, j] > 0 for j in range(FRAMES))  # each frame's own timestep moves it


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_per_frame_timestep_leaks_before_conversion(name):
    plan, layout, forward = _probe(name)
    model = plan.build_tiny()
    report = check_causality(model, _inputs(plan, model), layout, forward, localize=False)
    assert not report.passed
    last = report.matrix[: FRAMES - 1, FRAMES - 1]  # past frames after changing only the last timestep
    assert float(last.max()) > 0


@pytest.mark.parametrize("name", ["cosmos", "ltx", "skyreels-v2", "wan"])
def test_single_frame_conversion_is_identity(name):
    """With one frame the block-causal mask allows everything: the converted model must equal the
    base bit for bit. Guards the processor wrapper passing every argument through (Cosmos' attn1
    gets its RoPE as a keyword that diffusers' legacy Attention filters by processor signature)."""
    plan = registries().plans.get(name)
    base, converted = plan.build_tiny(), plan.build_tiny()
    convert_model(converted, plan)
    inputs = example_inputs(base, plan, frames=1, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(plan.forward(converted, inputs), plan.forward(base, inputs), rtol=0, atol=0)
