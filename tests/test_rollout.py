"""Autoregressive rollout: streaming caches reproduce full recomputation (METHOD.md §10) for a UNet
and a DiT family over rollouts longer than the window, with and without guidance; causal action
guidance drops only the newest action; schedules and steps follow METHOD.md §9.
Negative controls: streaming without the conv buffers or the RoPE offsets diverges."""

from __future__ import annotations

import math

import pytest
import torch
from world_models import tiny_world_model

from causalize.api import convert_model
from causalize.errors import UsageError
from causalize.noise import NoiseSchedule
from causalize.plugin_manager import registries
from causalize.rollout import RolloutConfig, RolloutSession, rollout
from causalize.rollout import schedule as sched
from causalize.rollout.denoisers import FullRecompute, branches
from causalize.rollout.streaming import Stream
from causalize.world_model import WorldModel

ACTION_DIM = 3
STREAMING_PLANS = [p.name for p in registries().plans if p.streaming is not None]


def _world_model(name: str, action_type: str = "continuous", seed: int = 0, pipeline: str | None = None) -> WorldModel:
    return tiny_world_model(name, action_dim=ACTION_DIM, action_type=action_type, seed=seed, pipeline=pipeline)


def _context(wm: WorldModel, frames: int = 2) -> torch.Tensor:
    cond = wm.plan.conditioning
    return wm.plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(0))[cond.sample_arg]


def _actions(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, n, ACTION_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=STREAMING_PLANS)
def wm(request):
    return _world_model(request.param)


def test_a_unet_and_a_dit_family_stream():
    families = {registries().plans.get(n).family for n in STREAMING_PLANS}
    assert {"unet", "dit"} <= families


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_streaming_equals_full_recomputation(wm, scale):
    """6 generated frames through a window of 4 (it grows, then slides), eta > 0 so the noise
    stream is exercised too."""
    config = RolloutConfig(steps=3, window=4, guidance_scale=scale, eta=0.5, seed=3)
    ctx, actions = _context(wm), _actions(6)
    streamed = rollout(wm, ctx, actions, config=config)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    assert streamed.frames.shape == full.frames.shape
    assert streamed.frames.abs().max() > 0.1
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)
    assert streamed.frame_passes < full.frame_passes
    assert streamed.cache_bytes > 0 and full.cache_bytes == 0


def test_streaming_without_conv_buffers_diverges():
    """Negative control (UNet): the temporal convs padding with zeros at every call instead of
    prepending the cached frames gives different frames."""
    wm = _world_model("unet3d")
    config = RolloutConfig(steps=2, window=4, guidance_scale=1.0)
    ctx, actions = _context(wm), _actions(3)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    Stream.of(wm.model, wm.plan)
    for m in wm.model.modules():
        vars(m).pop("_pad_time", None)
    broken = rollout(wm, ctx, actions, config=config)
    assert (broken.frames - full.frames).abs().max() > 1e-3


def test_streaming_without_rope_offsets_diverges():
    """Negative control (DiT): RoPE positions restarting at 0 for the current frame give different frames."""
    wm = _world_model("wan")
    config = RolloutConfig(steps=2, window=4, guidance_scale=1.0)
    ctx, actions = _context(wm), _actions(3)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    stream = Stream.of(wm.model, wm.plan)
    rope = wm.model.get_submodule(wm.plan.streaming.rope)
    rope._forward_hooks.clear()
    broken = rollout(wm, ctx, actions, config=config)
    assert stream is Stream.of(wm.model, wm.plan)
    assert (broken.frames - full.frames).abs().max() > 1e-3


def test_streaming_is_inert_outside_a_rollout(wm):
    """Installing the caches changes nothing for ordinary calls."""
    cond = wm.plan.conditioning
    inputs = wm.plan.make_inputs(wm.model, 3, torch.Generator().manual_seed(5))
    sample = inputs.pop(cond.sample_arg)
    inputs.pop(cond.timestep_arg)
    ts = torch.tensor([[10, 500, 990]])
    with torch.no_grad():
        before = wm(sample, ts, _actions(3), **inputs)
        Stream.of(wm.model, wm.plan)
        after = wm(sample, ts, _actions(3), **inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_guidance_scale_one_is_the_conditional_branch():
    v_c, v_u = torch.randn(2, 4, 1, 3, 3), torch.randn(2, 4, 1, 3, 3)
    assert sched.guide(v_c, v_u, 1.0) is v_c
    torch.testing.assert_close(sched.guide(v_c, v_u, 2.5), v_u + 2.5 * (v_c - v_u))
    rescaled = sched.guide(v_c, v_u, 2.5, rescale=1.0)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3, 4)), v_c.std(dim=(1, 2, 3, 4)))


def test_unconditional_branch_drops_only_the_newest_action():
    """The batched forward's two halves: the conditional one equals an unbatched call with every
    action; the unconditional one equals a call with only the newest action masked, and differs
    from the conditional one."""
    wm = _world_model("unet3d")
    ctx = _context(wm, 3)
    den = FullRecompute(wm, None)
    frames = list(ctx.split(1, dim=2))
    history, current = frames[:2], frames[2]
    acts = _actions(3)
    mask = torch.tensor([[False, True]])
    den.set_history(history, acts[:, :2], mask, 0, 39)
    with torch.no_grad():
        both = den(current, 500, acts[:, 2:], guided=True)
        cond = den(current, 500, acts[:, 2:], guided=False)
        sample = torch.cat(frames, dim=2)
        ts = torch.tensor([[39, 39, 500]])
        kwargs = den.kwargs(1, 3, sample)
        dropped = wm(sample, ts, acts, torch.tensor([[False, True, False]]), **kwargs)[:, :, 2:]
        older_dropped = wm(sample, ts, acts, torch.tensor([[False, False, True]]), **kwargs)[:, :, 2:]
    torch.testing.assert_close(both[:1], cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], dropped, rtol=0, atol=1e-5)
    assert (both[1:] - both[:1]).abs().max() > 1e-4
    assert (older_dropped - dropped).abs().max() > 1e-4  # older actions are kept in the unconditional branch


def test_branches_layout():
    x = torch.randn(2, 4, 1, 3, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    actions = torch.randn(2, 3, 5)
    sample, ts, acts, m = branches(x, 7, actions, mask, True)
    assert sample.shape[0] == 4 and torch.equal(sample[:2], x) and torch.equal(sample[2:], x)
    assert ts.tolist() == [[7]] * 4
    assert m[:2].all() and m[2:, :2].all() and not m[2:, 2].any()
    assert torch.equal(acts[2:], actions)


def test_sampling_timesteps_follow_the_reference():
    trailing = sched.sampling_timesteps(1000, 50, "trailing")
    assert trailing[:3] == [999, 979, 959] and trailing[-2:] == [39, 19] and len(trailing) == 50
    uniform = sched.sampling_timesteps(1000, 50, "uniform")
    assert uniform[:2] == [981, 961] and uniform[-2:] == [21, 1]
    assert sched.history_level(trailing, "second_to_last") == 39
    assert sched.history_level(uniform, "second_to_last") == 21
    assert sched.history_level(trailing, 20) == 20
    with pytest.raises(UsageError):
        sched.sampling_timesteps(1000, 0)
    with pytest.raises(UsageError):
        sched.sampling_timesteps(1000, 10, "cosine")


def test_ddim_with_the_true_v_lands_on_x0():
    schedule = NoiseSchedule.from_config()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    for level in (999, 500, 19):
        a = float(schedule.alphas_cumprod[level])
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        torch.testing.assert_close(sched.step("ddim", schedule, x, v, level, None), x0)
        # and to an intermediate level: exactly the same x0 and eps re-mixed
        b = float(schedule.alphas_cumprod[9])
        torch.testing.assert_close(
            sched.step("ddim", schedule, x, v, level, 9), math.sqrt(b) * x0 + math.sqrt(1 - b) * eps
        )


def test_euler_agrees_with_ddim_to_second_order():
    schedule = NoiseSchedule.from_config()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 16, generator=g, dtype=torch.float64)
    a = float(schedule.alphas_cumprod[600])
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
    errors = []
    for nxt in (599, 590, 500):
        d = (
            (sched.step("euler", schedule, x, v, 600, nxt) - sched.step("ddim", schedule, x, v, 600, nxt))
            .abs()
            .max()
            .item()
        )
        errors.append(d)
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < 1e-5 and errors[2] > 1e-4  # O(Δφ²): a different integrator, not a copy


def test_euler_rollout_runs_at_zero_terminal_snr():
    wm = _world_model("wan")
    out = rollout(wm, _context(wm), _actions(2), config=RolloutConfig(steps=3, sampler="euler", guidance_scale=1.0))
    assert torch.isfinite(out.frames).all()


def test_same_seed_same_frames_other_seed_other_frames():
    wm = _world_model("wan")
    ctx, actions = _context(wm), _actions(2)
    cfg = RolloutConfig(steps=2, window=3, guidance_scale=1.0, seed=5)
    a = rollout(wm, ctx, actions, config=cfg).frames
    b = rollout(wm, ctx, actions, config=cfg).frames
    c = rollout(wm, ctx, actions, config=RolloutConfig(**{**cfg.to_json(), "seed": 6})).frames
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_session_matches_rollout():
    wm = _world_model("wan")
    ctx, actions = _context(wm), _actions(3)
    cfg = RolloutConfig(steps=2, window=3)
    whole = rollout(wm, ctx, actions, config=cfg).frames
    session = RolloutSession(wm, cfg)
    session.reset(ctx)
    stepped = torch.cat([session.step(actions[:, i]) for i in range(3)], dim=2)
    torch.testing.assert_close(stepped, whole, rtol=0, atol=0)


def test_discrete_actions():
    wm = _world_model("wan", "discrete")
    out = rollout(wm, _context(wm), torch.tensor([[0, 2, 1]]), config=RolloutConfig(steps=2, window=3))
    assert out.frames.shape[2] == 3
    with pytest.raises(UsageError, match="integer"):
        rollout(wm, _context(wm), torch.tensor([[0.5, 1.0]]), config=RolloutConfig(steps=2))
    with pytest.raises(UsageError, match=r"\[0, 3\)"):
        rollout(wm, _context(wm), torch.tensor([[0, 3]]), config=RolloutConfig(steps=2))


def test_bad_inputs_are_refused():
    wm = _world_model("wan")
    ctx = _context(wm)
    cfg = RolloutConfig(steps=2)
    with pytest.raises(UsageError, match="dimension"):
        rollout(wm, ctx, torch.randn(1, 2, ACTION_DIM + 1), config=cfg)
    with pytest.raises(UsageError, match="NaN"):
        rollout(wm, ctx, torch.full((1, 2, ACTION_DIM), float("nan")), config=cfg)
    with pytest.raises(UsageError, match="finite"):
        rollout(wm, ctx * float("nan"), _actions(2), config=cfg)
    with pytest.raises(UsageError, match="batch"):
        rollout(wm, ctx, torch.randn(2, 2, ACTION_DIM), config=cfg)
    with pytest.raises(UsageError, match="window"):
        rollout(wm, ctx, _actions(2), config=RolloutConfig(window=1))
    with pytest.raises(UsageError, match="sampler"):
        rollout(wm, ctx, _actions(2), config=RolloutConfig(sampler="heun"))


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("steps", 0, "steps must be"), ("steps", 2.0, "steps must be"), ("history_noise", -1, "history_noise must be")],
)
def test_a_bad_step_count_or_history_level_is_refused_by_the_config_itself(field, value, needle):
    """Refused by validate(), so a tool can check a config before it loads a model or rolls out."""
    RolloutConfig(**{field: {"steps": 3, "history_noise": 100}[field]}).validate()  # control: a good value passes
    with pytest.raises(UsageError, match=needle):
        RolloutConfig(**{field: value}).validate()


def test_a_model_without_an_action_adapter_is_refused():
    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning")
    with pytest.raises(UsageError, match="action adapter"):
        RolloutSession(WorldModel(model, plan))


def test_a_plan_without_streaming_says_to_recompute():
    plan = next(p for p in registries().plans if p.streaming is None and p.conditioning is not None)
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=2}}")
    with pytest.raises(UsageError, match="cache=False"):
        Stream(model, plan)


def test_cumulative_norms_stream_with_running_statistics():
    """Cumulative causal norms carry (Σ means, Σ variances + Chan terms, frame-0 shift) across
    calls: streaming equals full recomputation; without the carry (each call normalising by its
    own frames) it does not."""
    pipeline = registries().plans.get("unet3d").pipeline.replace("causal-norm", "causal-norm{mode=cumulative}")
    wm = _world_model("unet3d", pipeline=pipeline)
    config = RolloutConfig(steps=2, window=4, guidance_scale=2.5)
    ctx, actions = _context(wm), _actions(5)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    streamed = rollout(wm, ctx, actions, config=config)
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)
    for m in wm.model.modules():
        vars(m).pop("_cumulative", None)
    broken = rollout(wm, ctx, actions, config=config)
    assert (broken.frames - full.frames).abs().max() > 1e-3


def test_context_action_mask_selects_known_context_actions():
    """A masked context action is the null action: equal to giving no actions for that frame."""
    wm = _world_model("wan")
    ctx, actions = _context(wm, 2), _actions(2)
    cfg = RolloutConfig(steps=2, window=3, guidance_scale=1.0)
    ctx_actions = _actions(2, seed=7)
    masked = rollout(
        wm, ctx, actions, context_actions=ctx_actions, context_action_mask=torch.tensor([False, False]), config=cfg
    )
    none = rollout(wm, ctx, actions, config=cfg)
    known = rollout(wm, ctx, actions, context_actions=ctx_actions, config=cfg)
    torch.testing.assert_close(masked.frames, none.frames, rtol=0, atol=0)
    assert (known.frames - none.frames).abs().max() > 1e-4
    with pytest.raises(UsageError, match="entries"):
        rollout(wm, ctx, actions, context_actions=ctx_actions, context_action_mask=torch.tensor([True]), config=cfg)


def test_block_causal_plans_refuse_frame_by_frame_rollouts_with_a_reason():
    """Frame by frame would feed partial blocks; tests/test_chunks.py rolls them out block by block."""
    plan = next(p for p in registries().plans if p.layout.block_size > 1 and p.conditioning is not None)
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=2}}")
    wm = WorldModel(model, plan)
    ctx = plan.make_inputs(model, 2 * plan.layout.block_size, torch.Generator().manual_seed(0))[
        plan.conditioning.sample_arg
    ]
    with pytest.raises(UsageError, match="partial blocks"):
        rollout(wm, ctx, torch.randn(1, 2, 2), config=RolloutConfig(steps=2, cache=False))


@pytest.mark.parametrize(
    "name", [p.name for p in registries().plans if p.conditioning is not None and p.layout.block_size == 1]
)
def test_every_plan_rolls_out_with_full_recomputation(name):
    """Every frame-causal plan rolls out (guided: both branches batched), e.g. Cosmos' unbatched
    padding mask and Latte's learned-variance output."""
    wm = _world_model(name)
    out = rollout(wm, _context(wm), _actions(2), config=RolloutConfig(steps=2, window=3, cache=False))
    ctx = _context(wm)
    axis = wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]
    assert out.frames.shape[axis] == 2 and out.frames.shape[:axis] == ctx.shape[:axis]
    assert torch.isfinite(out.frames).all()
