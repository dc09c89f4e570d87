"""WorldModelEnv (causalize.rollout.env): gymnasium's env checker passes for discrete and
continuous adapters, observations have the declared shapes and dtypes, seeds reproduce
rollouts (and match the library's rollout()), truncation, latents, wrappers, bad inputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

gymnasium = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402

from causalize.api import convert, convert_model  # noqa: E402
from causalize.errors import UsageError  # noqa: E402
from causalize.plugin_manager import registries  # noqa: E402
from causalize.rollout import RolloutConfig, rollout  # noqa: E402
from causalize.rollout.env import WorldModelEnv  # noqa: E402
from causalize.rollout.io import Frames, frames_to_model, model_to_frames  # noqa: E402
from causalize.world_model import WorldModel  # noqa: E402

FAST = RolloutConfig(steps=2, window=4)
N_ACTIONS = 4


def _unet(channels: int = 3):
    from diffusers import UNet3DConditionModel

    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    return UNet3DConditionModel(**{**plan.tiny_config, "in_channels": channels, "out_channels": channels}).eval()


def _world_model(action_type: str, channels: int = 3, randomize: bool = True) -> WorldModel:
    plan = registries().plans.get("unet3d")
    model = _unet(channels)
    convert_model(
        model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={N_ACTIONS},action_type={action_type}}}"
    )
    wm = WorldModel(model, plan)
    if randomize:  # a fresh adapter's last layer is zero: give actions an effect
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in wm.action_encoder.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return wm


@pytest.fixture(scope="module")
def discrete():
    return _world_model("discrete")


@pytest.fixture(scope="module")
def continuous():
    return _world_model("continuous")


def _context(t: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, 16, 16, 3), dtype=np.uint8)


def _run(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return out


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_check_env_passes(request, kind):
    wm = request.getfixturevalue(kind)
    bounds = {"action_low": -1.0, "action_high": 1.0} if kind == "continuous" else {}
    env = WorldModelEnv(wm, FAST, context=_context(), max_steps=5, **bounds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gymnasium warning either, except the render-mode note
        warnings.filterwarnings("ignore", message=".*alternative render modes.*")
        check_env(env)
    expected = spaces.Discrete(N_ACTIONS) if kind == "discrete" else spaces.Box(-1, 1, (N_ACTIONS,), np.float32)
    assert env.action_space == expected
    assert env.observation_space == spaces.Box(0, 255, (16, 16, 3), np.uint8)


def test_reset_and_step_shapes(discrete):
    ctx = _context(3)
    env = WorldModelEnv(discrete, FAST, context=ctx)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, ctx[-1])
    assert info == {"seed": 0, "context_frames": 3, "step": 0}
    obs, reward, terminated, truncated, info = env.step(2)
    assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8 and obs in env.observation_space
    assert reward == 0.0 and terminated is False and truncated is False
    assert info["step"] == 1 and info["frame_passes"] > 0 and "seconds" not in info
    assert len(env.seconds_per_frame) == 1


def test_same_seed_same_frames_and_matches_rollout(discrete):
    env = WorldModelEnv(discrete, FAST, context=_context())
    actions = [1, 3]
    a, b, c = _run(env, actions, 7), _run(env, actions, 7), _run(env, actions, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any((x != y).any() for x, y in zip(a[1:], c[1:]))
    ref = rollout(
        discrete,
        frames_to_model(Frames(_context(), "pixels"), 2),
        torch.tensor([actions]),
        config=RolloutConfig(steps=2, window=4, seed=7),
    )
    np.testing.assert_array_equal(np.stack(a[1:]), model_to_frames(ref.frames, 2, "pixels").data)


def test_actions_change_the_frames(discrete):
    env = WorldModelEnv(discrete, FAST, context=_context())
    assert (_run(env, [0], 3)[1] != _run(env, [2], 3)[1]).any()


def test_unseeded_resets_follow_the_config_seed(discrete):
    a = WorldModelEnv(discrete, RolloutConfig(steps=2, window=4, seed=5), context=_context())
    b = WorldModelEnv(discrete, RolloutConfig(steps=2, window=4, seed=5), context=_context())
    assert a.reset()[1]["seed"] == b.reset()[1]["seed"]
    np.testing.assert_array_equal(a.step(1)[0], b.step(1)[0])


def test_truncation_and_options_context(continuous):
    env = WorldModelEnv(continuous, FAST, max_steps=2, info_timing=True, frame_shape=(16, 16, 3))
    ctx = _context(1, seed=3)
    obs, info = env.reset(seed=0, options={"context": ctx, "context_actions": np.zeros((1, N_ACTIONS), np.float32)})
    np.testing.assert_array_equal(obs, ctx[0])
    action = np.zeros(N_ACTIONS, np.float32)
    assert env.step(action)[3] is False
    _, _, _, truncated, info = env.step(action)
    assert truncated is True and info["seconds"] > 0 and info["seconds_mean"] > 0


def test_gymnasium_wrappers(discrete):
    from gymnasium.wrappers import FrameStackObservation, RecordEpisodeStatistics, TimeLimit

    env = RecordEpisodeStatistics(
        FrameStackObservation(TimeLimit(WorldModelEnv(discrete, FAST, context=_context()), 2), 2)
    )
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 16, 16, 3)
    env.step(env.action_space.sample())
    _, _, _, truncated, info = env.step(env.action_space.sample())
    assert truncated and info["episode"]["l"] == 2


def test_latent_observations():
    wm = _world_model("discrete", channels=4, randomize=False)
    ctx = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    env = WorldModelEnv(wm, FAST, context=ctx, observation="latents")
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (4, 16, 16), np.float32)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, ctx[-1])
    obs = env.step(1)[0]
    assert obs.dtype == np.float32 and obs.shape == (4, 16, 16)
    with pytest.raises(UsageError, match="latents"):
        WorldModelEnv(wm, FAST, context=ctx, observation="latents", render_mode="rgb_array")


def test_render_and_multi_hot(discrete):
    env = WorldModelEnv(discrete, FAST, context=_context(), multi_hot=True, render_mode="rgb_array")
    assert env.action_space == spaces.MultiBinary(N_ACTIONS)
    env.reset(seed=0)
    obs = env.step(np.array([1, 0, 1, 0], np.int8))[0]
    np.testing.assert_array_equal(env.render(), obs)


def test_bad_inputs(discrete, continuous):
    example = WorldModelEnv(discrete, FAST)  # no context, no frame_shape: the model's example input size
    assert len(example.observation_space.shape) == 3 and example.observation_space.shape[-1] == 3
    env = WorldModelEnv(discrete, FAST, frame_shape=(16, 16, 3))
    with pytest.raises(UsageError, match="reset"):
        env.step(0)
    with pytest.raises(UsageError, match="no context"):
        env.reset()
    with pytest.raises(UsageError, match="shape"):
        env.reset(options={"context": np.zeros((1, 8, 8, 3), np.uint8)})
    with pytest.raises(UsageError, match="uint8"):
        env.reset(options={"context": np.zeros((1, 16, 16, 3), np.float32)})
    with pytest.raises(UsageError, match="channels"):
        env.reset(options={"context": np.zeros((1, 16, 16, 2), np.uint8)})
    env.reset(options={"context": _context(1)})
    for bad in (4, -1, 1.5, np.array([0, 1])):
        with pytest.raises(UsageError):
            env.step(bad)
    cenv = WorldModelEnv(continuous, FAST, context=_context())
    cenv.reset()
    with pytest.raises(UsageError, match="shape"):
        cenv.step(np.zeros(3, np.float32))
    with pytest.raises(UsageError, match="finite"):
        cenv.step(np.full(N_ACTIONS, np.nan, np.float32))
    with pytest.raises(UsageError, match="max_steps"):
        WorldModelEnv(discrete, FAST, max_steps=0)


def test_from_pretrained_uses_training_settings(tmp_path):
    _unet().save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "wm", action_dim=N_ACTIONS, action_type="discrete", verify=False)
    (tmp_path / "wm" / "training.json").write_text(json.dumps({"config": {"prediction_type": "epsilon", "window": 3}}))
    env = WorldModelEnv.from_pretrained(tmp_path / "wm", device="cpu", context=_context(), max_steps=1)
    assert env.config.prediction_type == "epsilon" and env.config.window == 3
    env.reset(seed=0)
    assert env.step(0)[3] is True
    (tmp_path / "plain").mkdir()
    convert(
        tmp_path / "src",
        tmp_path / "noact",
        pipeline=f"{registries().plans.get('unet3d').pipeline},frame-conditioning",
        verify=False,
    )
    with pytest.raises(UsageError, match="no action adapter"):
        WorldModelEnv.from_pretrained(tmp_path / "noact", device="cpu")
