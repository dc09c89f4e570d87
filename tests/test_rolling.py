"""Rolling caches (cache="rolling", sink=N): every frame pushed once, frames that left the window
dropped except the sink, positions counting globally. Approximate once the window slides, so the
tests pin what it promises: equal to exact streaming before the slide, a constant number of frame
passes and bounded cache memory after it, the sink kept, and clear refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from typer.testing import CliRunner

from causalize.errors import UsageError
from causalize.modules.linear_attention import StreamingLinearAttnProcessor
from causalize.plugin_manager import registries
from causalize.rollout import RolloutConfig, RolloutSession, rollout
from causalize.rollout.denoisers import Rolling
from causalize.rollout.streaming import Stream
from tests.world_models import tiny_world_model

ROLLING_PLANS = [p.name for p in registries().plans if p.streaming is not None]  # every streaming plan
CUMULATIVE = "causal-temporal-conv,causal-temporal-attention,causal-norm{mode=cumulative}"


def _context(wm, frames: int = 1) -> torch.Tensor:
    cond = wm.plan.conditioning
    return wm.plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(0))[cond.sample_arg]


def _frame(x: torch.Tensor, wm, i: int) -> torch.Tensor:
    return x.select(wm.plan.layout.inputs[wm.plan.conditioning.sample_arg], i)


@pytest.mark.parametrize("name", ROLLING_PLANS)
def test_rolling_equals_exact_until_the_window_slides(name):
    """1 context frame, window 4: generated frames 0..2 see the whole history in both modes and are
    bit-equal; frame 3 is the first after the slide, where exact re-prefills and rolling keeps keys
    computed under the older window (and global positions)."""
    wm = tiny_world_model(name)
    ctx, actions = _context(wm), torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(
        steps=2, window=4, guidance_scale=2.5, seed=3, history_noise=20
    )  # a history that carries the frames
    exact = rollout(wm, ctx, actions, config=config)
    rolling = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": "rolling"}))
    assert rolling.cache_mode == "rolling" and exact.cache_mode == "exact"
    for i in range(3):
        assert torch.equal(_frame(rolling.frames, wm, i), _frame(exact.frames, wm, i)), i
    assert rolling.passes_per_frame[3:] == [1, 1]  # one push per frame once slid
    assert exact.passes_per_frame[3:] == [3, 3]  # exact re-prefills the window (L − 1 = 3)


def test_rolling_differs_from_exact_after_the_slide():
    """The approximation is real (so the equality above is not vacuous): after the slide the two
    modes give different frames on Wan."""
    wm = tiny_world_model("wan")
    ctx, actions = _context(wm), torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(steps=2, window=3, guidance_scale=1.0)
    exact = rollout(wm, ctx, actions, config=config)
    rolling = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": "rolling"}))
    assert (_frame(rolling.frames, wm, 5) - _frame(exact.frames, wm, 5)).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cost_and_memory_stay_constant_over_64_frames(dtype):
    """After the slide every frame costs one push and S single-frame steps, and the caches hold at
    most sink + window − 1 history frames, over 64 generated frames (counted, not timed)."""
    wm = tiny_world_model("wan", rope_max_seq_len=128).to(dtype)
    window, sink, steps = 4, 1, 2
    session = RolloutSession(wm, RolloutConfig(steps=steps, window=window, cache="rolling", sink=sink))
    session.reset(_context(wm).to(dtype))
    stream = Stream.of(wm.model, wm.plan)
    lengths, calls = [], []
    for i in range(64):
        before = session.denoiser.model_calls
        session.step(torch.randn(1, 3, generator=torch.Generator().manual_seed(i)).to(dtype))
        calls.append(session.denoiser.model_calls - before)
        lengths.append({p.cache.length for p in stream._processors})
    assert session.passes_per_frame[window:] == [1] * (64 - window)
    assert set(calls[window:]) == {1 + steps}  # one push + S steps (both branches in one call)
    per_frame = wm.plan.make_inputs(wm.model, 1, torch.Generator())["hidden_states"].shape[-1] ** 2 // 4
    bound = (sink + window - 1) * per_frame
    assert all(max(ls) <= bound for ls in lengths)
    assert lengths[10] == lengths[63]  # constant once slid


@pytest.mark.parametrize("sink", [0, 2])
def test_the_sink_frames_stay_cached(sink):
    wm = tiny_world_model("wan", rope_max_seq_len=64)
    session = RolloutSession(wm, RolloutConfig(steps=1, window=3, cache="rolling", sink=sink, guidance_scale=1.0))
    session.reset(_context(wm, 2))
    for i in range(12):
        session.step(torch.randn(1, 3, generator=torch.Generator().manual_seed(i)))
    cache = Stream.of(wm.model, wm.plan)._processors[0].cache
    frames = sorted(set(cache.frame_ids.tolist()))
    assert frames == list(range(sink)) + [11, 12]  # the sink, then the window's L − 1 = 2 newest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attention_rolls(dtype):
    """Sana-Video's linear attention rolls: each layer records each pushed frame's own sums and
    keeps those of the sink and the window's history only, over 24 frames (bounded memory). That
    the running sums are then those frames' is tests/test_linear_attention.py's (with its negative
    control); equality with exact streaming before the slide is the parametrised test above."""
    wm = tiny_world_model("sana-video").to(dtype)
    session = RolloutSession(wm, RolloutConfig(steps=1, window=4, cache="rolling", sink=1))
    session.reset(_context(wm).to(dtype))
    linear = [p for p in Stream.of(wm.model, wm.plan)._processors if isinstance(p, StreamingLinearAttnProcessor)]
    for i in range(24):
        session.step(torch.randn(1, 3, generator=torch.Generator().manual_seed(i)).to(dtype))
        recorded = {tuple(r[0] for r in p.cache.recorded) for p in linear}
        assert len(linear) > 0 and len(recorded) == 1 and len(next(iter(recorded))) <= 1 + 3, (i, recorded)
        for p in linear:  # the running sums are the kept frames' own sums, added in order
            assert p.cache.length == len(p.cache.recorded)
            assert torch.equal(p.cache.state.kv, functools.reduce(torch.add, (kv for _, kv, _ in p.cache.recorded)))
            assert torch.equal(p.cache.state.ksum, functools.reduce(torch.add, (ks for _, _, ks in p.cache.recorded)))
    assert recorded == {(0, 21, 22, 23)}  # the sink, then the L − 1 = 3 history frames of frame 24


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cumulative_norms_roll(dtype):
    """A UNet3D with cumulative causal norms rolls: bit-equal to exact streaming until the window
    slides; after it, every norm's statistics hold the frames the attention caches hold (the sink
    and the window's history), over 24 frames. That the statistics are those of the kept frames
    is tests/test_causal_norm.py's (with its negative control)."""
    wm = tiny_world_model("unet3d", pipeline=CUMULATIVE).to(dtype)
    ctx = _context(wm).to(dtype)
    actions = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    config = RolloutConfig(steps=2, window=4, guidance_scale=2.5, seed=3, history_noise=20)
    exact = rollout(wm, ctx, actions, config=config)
    rolling = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": "rolling"}))
    for i in range(3):
        assert torch.equal(_frame(rolling.frames, wm, i), _frame(exact.frames, wm, i)), i
    session = RolloutSession(wm, RolloutConfig(steps=1, window=4, cache="rolling", sink=1))
    session.reset(ctx)
    stream = Stream.of(wm.model, wm.plan)
    for i in range(24):
        session.step(torch.randn(1, 3, generator=torch.Generator().manual_seed(i)).to(dtype))
        cached = {tuple(sorted(set(p.cache.frame_ids.tolist()))) for p in stream._processors}
        carried = {tuple(c.frames) for c in stream._norms.values()}
        assert len(stream._norms) > 0 and carried == cached, (i, carried, cached)
        for c in stream._norms.values():  # the running sums are the kept frames' own statistics merged
            assert c.count == len(c.frames) == c.frame_means.shape[-1]
            means = c.frame_means.sum(-1, keepdim=True)
            spread = (c.frame_means - means / c.count).square().sum(-1, keepdim=True)
            torch.testing.assert_close(c.mean_sum, means, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c.var_sum, c.frame_vars.sum(-1, keepdim=True) + spread, rtol=1e-4, atol=1e-4)
    assert carried == {(0, 21, 22, 23)}  # the sink, then the L − 1 = 3 history frames of frame 24


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(cache="rolling", sink=4, window=4), "smaller than the window"),
        (dict(cache="exact", sink=1), "applies to cache='rolling'"),
        (dict(cache="sliding"), "unknown cache mode"),
        (dict(cache="rolling", sink=-1), "non-negative"),
    ],
)
def test_bad_settings_are_refused_before_any_frame(settings, needle):
    with pytest.raises(UsageError, match=needle):
        RolloutConfig(**settings).validate()


def test_position_tables_that_run_out_are_a_usage_error():
    """Global positions: the tiny Wan's rotary table holds 32 frames; frame 32 is refused in words."""
    wm = tiny_world_model("wan")
    with pytest.raises(UsageError, match="position table"):
        rollout(wm, _context(wm), torch.randn(1, 40, 3), config=RolloutConfig(steps=1, window=4, cache="rolling"))


def test_cli_cache_and_sink(tmp_path):
    """--cache rolling --sink 1 rolls out and says it is approximate; --no-cache with --cache rolling is refused."""
    import numpy as np

    from causalize.api import convert
    from causalize.cli.app import app
    from tests.cli_helpers import assert_one_line_error

    plan = registries().plans.get("wan")
    torch.manual_seed(0)
    plan.build_tiny().save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "wm", action_dim=3, verify=False)
    wm = tiny_world_model("wan")
    ctx = _context(wm)[0].movedim(1, 0).numpy()  # (T, C, H, W) latents
    np.save(tmp_path / "ctx.npy", ctx.astype(np.float32))
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    base = ["rollout", tmp_path / "wm", "--context", tmp_path / "ctx.npy", "--actions", tmp_path / "acts.npy"]
    base += ["--steps", "1", "--window", "3", "--device", "cpu"]
    runner = CliRunner()
    result = runner.invoke(
        app, [str(a) for a in [*base, "--out", tmp_path / "r.npz", "--cache", "rolling", "--sink", "1"]]
    )
    assert result.exit_code == 0, result.output
    assert "rolling (approximate)" in result.stderr
    result = runner.invoke(
        app, [str(a) for a in [*base, "--out", tmp_path / "x.npz", "--cache", "rolling", "--no-cache"]]
    )
    assert_one_line_error(result, 2, "--no-cache")
    assert not (tmp_path / "x.npz").exists()


def test_rolling_denoiser_is_what_the_session_uses():
    wm = tiny_world_model("wan")
    session = RolloutSession(wm, RolloutConfig(steps=1, cache="rolling"))
    session.reset(_context(wm))
    assert isinstance(session.denoiser, Rolling)


def test_the_environment_rolls_with_the_same_settings():
    """A gymnasium env on rolling caches: steps past the window, labels the cache approximate."""
    from causalize.rollout.env import WorldModelEnv

    wm = tiny_world_model("wan", rope_max_seq_len=64)
    ctx = _context(wm)[0].movedim(1, 0).numpy()  # (T, C, H, W) latents
    env = WorldModelEnv(
        wm, RolloutConfig(steps=1, window=3, cache="rolling", sink=1), context=ctx, observation="latents"
    )
    env.reset(seed=0)
    for _ in range(8):
        obs, _, _, _, info = env.step(env.action_space.sample())
    assert info["cache"] == "rolling (approximate)" and info["frame_passes"] > 0
    assert env._session.passes_per_frame[-4:] == [1, 1, 1, 1]


@pytest.mark.parametrize("cache", ["exact", "rolling"])
def test_two_sessions_on_one_model(cache):
    """The caches live on the model. Exact streaming rebuilds its window when another session used
    them in between (same frames as alone); rolling cannot and says so."""
    wm = tiny_world_model("unet3d")
    ctx = _context(wm, 2)
    acts = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(1))
    cfg = RolloutConfig(steps=2, window=4, seed=3, cache=cache, history_noise=20)
    alone = rollout(wm, ctx, acts, config=cfg).frames
    a = RolloutSession(wm, cfg)
    a.reset(ctx)
    frames = [a.step(acts[:, 0])]
    b = RolloutSession(wm, cfg)
    b.reset(-ctx)
    b.step(-acts[:, 0])
    if cache == "rolling":
        with pytest.raises(UsageError, match="another rollout session"):
            a.step(acts[:, 1])
        return
    frames += [a.step(acts[:, i]) for i in range(1, 4)]
    torch.testing.assert_close(torch.cat(frames, 2), alone, rtol=0, atol=1e-5)
