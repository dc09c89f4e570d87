"""Channels-last samples (Kandinsky 5 and 6: (B, T, H, W, C)): the layout names the channel axis,
so dataset frames reach the model in its own layout, the channel checks read the channels (not
the height), and file rollouts convert both ways. Negative control: without the channel axis the
old reading takes the height for the channels and training refuses the data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from world_models import tiny_world_model

from causalize.layout import from_native, sample_channel_axis, to_native
from causalize.plugin_manager import registries


@pytest.mark.parametrize(
    "frame_axis,channel_axis,shape",
    [(2, None, (2, 3, 5, 6, 7)), (1, None, (2, 5, 3, 6, 7)), (1, 4, (2, 5, 6, 7, 3))],
    ids=["BCTHW", "BTCHW", "BTHWC"],
)
def test_to_native_and_back(frame_axis, channel_axis, shape):
    x = torch.randn(2, 5, 3, 6, 7)  # (B, T, C, H, W)
    native = to_native(x, frame_axis, channel_axis)
    assert native.shape == shape
    assert native.shape[frame_axis] == 5 and native.shape[sample_channel_axis(frame_axis, channel_axis)] == 3
    assert torch.equal(from_native(native, frame_axis, channel_axis), x)


def test_the_kandinsky_plans_declare_channels_last():
    for name in ("kandinsky5", "kandinsky6"):
        plan = registries().plans.get(name)
        sample = plan.make_inputs(plan.build_tiny(), 2, torch.Generator().manual_seed(0))["hidden_states"]
        assert plan.layout.channel_axis == 4 and sample.shape[4] == plan.tiny_config["in_visual_dim"]


def test_kandinsky5_trains_on_a_latent_dataset_and_rolls_out_from_it(tmp_path):
    from causalize.api import convert
    from causalize.episodes import ActionSpace, create_dataset, write_episode
    from causalize.rollout import RolloutConfig, RolloutSession
    from causalize.rollout.io import Frames, frames_to_model, model_to_frames, sample_geometry
    from causalize.rollout.loading import load_world_model
    from causalize.training.config import TrainConfig, TrainingError
    from causalize.training.loading import check_compatible
    from causalize.training.trainer import train

    plan = registries().plans.get("kandinsky5")
    channels = plan.tiny_config["in_visual_dim"]
    torch.manual_seed(0)
    plan.build_tiny().save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "wm", action_dim=2)
    data = tmp_path / "data"
    create_dataset(data, ActionSpace.continuous(2), frame_shape=(channels, 8, 8), kind="latents")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((6, channels, 8, 8)).astype(np.float32)
    write_episode(data, 0, latents=latents, actions=rng.uniform(-1, 1, (6, 2)).astype(np.float32))
    cfg = dict(window=3, batch_size=1, steps=2, log_every=1, checkpoint_every=0, split=None, device="cpu")
    result = train(TrainConfig(model=str(tmp_path / "wm"), data=str(data), output_dir=str(tmp_path / "run"), **cfg))
    assert result["steps"] == 2 and np.isfinite(result["final_loss"])

    wm, _ = load_world_model(tmp_path / "run" / "final", device="cpu")
    axis, got = sample_geometry(wm)
    assert (axis, got) == (1, channels)
    x = frames_to_model(Frames(latents[:2], "latents"), axis, got, channel_axis=wm.plan.layout.channel_axis)
    assert x.shape == (1, 2, 8, 8, channels)
    back = model_to_frames(x, axis, "latents", channel_axis=wm.plan.layout.channel_axis)
    assert np.array_equal(back.data, latents[:2])
    session = RolloutSession(wm, RolloutConfig(steps=2, window=3, guidance_scale=1.0, cache=False))
    session.reset(x)
    assert session.step(torch.zeros(1, 2)).shape == (1, 1, 8, 8, channels)

    # negative control: the same plan without its channel axis reads the height as the channels
    wm.plan = dataclasses.replace(wm.plan, layout=dataclasses.replace(wm.plan.layout, channel_axis=None))
    info = type("Info", (), {"channels": channels, "kind": "latents", "action_space": ActionSpace.continuous(2)})()
    with pytest.raises(TrainingError, match="channel mismatch"):
        check_compatible(wm, info, None, TrainConfig(model="m", data="d", output_dir="o", window=3))


def test_a_channels_first_world_model_is_unchanged():
    wm = tiny_world_model("wan")
    assert wm.plan.layout.channel_axis is None
    assert from_native(wm.example_sample(2), 2).shape[2] == wm.model.config.in_channels
