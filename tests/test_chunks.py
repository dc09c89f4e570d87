"""Chunked generation (RolloutConfig.chunk): frames denoised together, causal among themselves;
what lets CogVideoX 1.5 (causal over blocks of 2 latent frames) roll out block by block."""

from __future__ import annotations

import pytest
import torch

from causalize.errors import UsageError
from causalize.rollout import RolloutConfig, rollout
from tests.world_models import tiny_world_model


def _context(wm, frames: int = 2) -> torch.Tensor:
    cond = wm.plan.conditioning
    return wm.plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(0))[cond.sample_arg]


def _axis(wm) -> int:
    return wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]


@pytest.mark.parametrize("name", ["wan", "unet3d"])
def test_chunked_streaming_equals_chunked_recomputation(name):
    wm = tiny_world_model(name)
    ctx, actions = _context(wm), torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(steps=2, window=5, chunk=2, seed=2)
    streamed = rollout(wm, ctx, actions, config=config)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": "none"}))
    assert streamed.frames.shape[_axis(wm)] == 6
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", ["exact", "none"])
def test_a_chunk_is_causal_inside(cache):
    """The chunk's first frame does not depend on the action of its second frame; negative control:
    it does depend on its own action."""
    wm = tiny_world_model("wan")
    ctx = _context(wm)
    base = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(steps=2, window=4, chunk=2, cache=cache, guidance_scale=1.0)

    def first_frame(actions):
        return rollout(wm, ctx, actions, config=config).frames.select(_axis(wm), 0)

    later, own = base.clone(), base.clone()
    later[:, 1] += 3.0
    own[:, 0] += 3.0
    torch.testing.assert_close(first_frame(later), first_frame(base), rtol=0, atol=1e-6)
    assert (first_frame(own) - first_frame(base)).abs().max() > 1e-3


def test_cogvideox15_rolls_out_block_by_block():
    wm = tiny_world_model("cogvideox15")
    ctx = _context(wm, 2)
    out = rollout(wm, ctx, torch.randn(1, 4, 3), config=RolloutConfig(steps=1, window=4, chunk=2, cache="none"))
    assert out.frames.shape[_axis(wm)] == 4
    assert torch.isfinite(out.frames).all()


@pytest.mark.parametrize(
    "settings, actions, needle",
    [
        (dict(chunk=1, cache="none", window=4), 4, "chunk=1 would feed it partial blocks"),
        (dict(chunk=2, cache="exact", window=4), 4, "cache='none'"),
        (dict(chunk=2, cache="none", window=5), 4, "whole blocks"),
        (dict(chunk=2, cache="none", window=4), 3, "multiple of 2 actions"),
    ],
)
def test_block_plans_refuse_partial_blocks_before_any_frame(settings, actions, needle):
    wm = tiny_world_model("cogvideox15")
    with pytest.raises(UsageError, match=needle):
        rollout(wm, _context(wm, 2), torch.randn(1, actions, 3), config=RolloutConfig(steps=1, **settings))


def test_chunk_must_leave_room_for_history():
    with pytest.raises(UsageError, match="does not fit the window"):
        RolloutConfig(window=4, chunk=4).validate()
    with pytest.raises(UsageError, match="positive integer"):
        RolloutConfig(chunk=0).validate()


def test_the_environment_refuses_chunks():
    from causalize.rollout.env import WorldModelEnv

    wm = tiny_world_model("wan")
    with pytest.raises(UsageError, match="one frame per step"):
        WorldModelEnv(wm, RolloutConfig(chunk=2, window=4), observation="latents")
