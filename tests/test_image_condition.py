"""Image-to-video models as world models (causalize.image_condition): the conditioning image is
the window's first frame, clean, passed the way each family's pipeline passes it (extra channels
or an argument), in training and rollout. Checked per I2V plan in fp32 and bf16: the inputs equal
the pipeline's rule written out by hand; the future does not reach the past (negative control:
an image taken from the last frame leaks); streaming equals full recomputation over a sliding
window; training feeds the window's first frame; bad inputs are clear errors."""

from __future__ import annotations

import pytest
import torch
from world_models import I2V_CONFIGS, tiny_world_model

from causalize import precision
from causalize.errors import UsageError
from causalize.image_condition import ImageConditionWarning, to_model_units
from causalize.latents.spec import LatentNorm
from causalize.noise import NoiseSchedule
from causalize.plugin_manager import registries
from causalize.rollout import RolloutConfig, RolloutSession, rollout
from causalize.training.trainer import compute_loss

I2V_PLANS = sorted(I2V_CONFIGS)
FRAMES = 4


def _wm(name: str, dtype=torch.float32):
    wm = tiny_world_model(name, **I2V_CONFIGS[name])
    precision.to_precision(wm.model, dtype)  # keeps the modules diffusers runs in fp32
    return wm


def _axis(wm) -> int:
    return wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]


def _sample(wm, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    x = wm.example_sample(frames)
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(wm.dtype)


def _call(wm, x, image, ts=None, **extra):
    ts = torch.full((x.shape[0], x.shape[_axis(wm)]), 400) if ts is None else ts
    actions = torch.randn(x.shape[0], x.shape[_axis(wm)], 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return wm(
            x, ts, actions.to(wm.dtype), None, image=image, **extra, **wm.unconditional_inputs(x.shape[0], ts.shape[1])
        )


def test_every_plan_with_an_image_condition_has_a_tiny_i2v_config():
    declared = {p.name for p in registries().plans if p.image_condition is not None}
    assert declared == set(I2V_CONFIGS)
    for name in I2V_PLANS:  # and the tiny I2V configs are I2V configs; the stock tiny ones are not (except I2VGenXL)
        assert _wm(name).image_condition is not None
        plain = registries().plans.get(name)
        if name != "i2vgenxl":
            assert plain.image_condition_of(plain.build_tiny()) is None


def _by_hand(name: str, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Each pipeline's construction, written out (diffusers 0.42 pipelines)."""
    f = FRAMES
    if name == "svd":  # (B, F, C, H, W): the image latent repeated over frames, channel axis 2
        return torch.cat([x, img.repeat(1, f, 1, 1, 1)], dim=2), {}
    if name == "kandinsky5":  # (B, F, H, W, C): zeros and a frame-0 mask on the last axis
        mask = torch.zeros_like(x[..., :1])
        mask[:, 0] = 1
        return torch.cat([x, torch.zeros_like(x), mask], dim=-1), {}
    if name in ("cogvideox", "cogvideox15", "consisid"):  # (B, F, C, H, W): image on frame 0, zero padding after
        return torch.cat([x, torch.cat([img, torch.zeros_like(x[:, 1:])], dim=1)], dim=2), {}
    first = torch.cat([img, torch.zeros_like(x[:, :, 1:])], dim=2)  # (B, C, F, H, W)
    mask = torch.zeros_like(x[:, :1])
    mask[:, :, 0] = 1
    if name in ("wan", "skyreels-v2"):  # [latents ; mask (4 channels) ; image]
        return torch.cat([x, mask.repeat(1, 4, 1, 1, 1), first], dim=1), {}
    if name in ("hunyuan", "hunyuan15", "motif"):  # [latents ; image ; mask]
        return torch.cat([x, first, mask], dim=1), {}
    assert name == "i2vgenxl"  # the image on every frame (the forward reads frame 0 as the context)
    return x, {"image_latents": img.repeat(1, 1, f, 1, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", I2V_PLANS)
def test_the_inputs_are_the_pipelines_rule(name, dtype):
    wm = _wm(name, dtype)
    x = _sample(wm)
    img = x.narrow(_axis(wm), 0, 1) * 0.5 + 0.1  # any clean frame, not the noisy sample's own
    if wm.image_condition.units != "latents":
        wm.latent_norm = LatentNorm()  # identity: SVD's raw and CogVideoX 1.5's inverse units equal the data's here
    out = _call(wm, x, img)
    by_hand, kwargs = _by_hand(name, x, img)
    cond = wm.image_condition
    wm.image_condition = None  # the same world model, fed the hand-built inputs
    try:
        ref = _call(wm, by_hand, None, **kwargs)
    finally:
        wm.image_condition = cond
    assert out.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # and the condition matters (a control that the comparison is not vacuous): the image, or
    # Kandinsky's frame-0 mask (its image is the latents' own frame 0)
    if "image" in cond.parts:
        assert not torch.equal(_call(wm, x, img * 0 + 1), out)
    else:
        wm.image_condition = None
        try:
            zero_mask = by_hand.clone()
            zero_mask[..., -1] = 0
            assert not torch.equal(_call(wm, zero_mask, None), out)
        finally:
            wm.image_condition = cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", I2V_PLANS)
def test_the_future_does_not_reach_the_past(name, dtype):
    """Perturb frame k ≥ 1 of the clean clip (the image is frame 0, so it does not move): the
    outputs of the blocks before k's stay bit-equal (CogVideoX 1.5: 2-frame blocks). Negative
    control: an image taken from the last frame carries it into frame 0 (Kandinsky 5 takes no
    image, only a frame-0 mask: its leak controls are the registry's own, tests/test_plugins.py)."""
    wm = _wm(name, dtype)
    wm.latent_norm = LatentNorm()
    axis, block = _axis(wm), wm.plan.layout.block_size
    x = _sample(wm)
    base = _call(wm, x, x.narrow(axis, 0, 1))
    for k in range(1, FRAMES):
        y = x.clone()
        y.narrow(axis, k, 1).add_(3.0)
        out = _call(wm, y, y.narrow(axis, 0, 1))
        out_axis, past = wm.plan.layout.output_axis, k - k % block
        assert torch.equal(out.narrow(out_axis, 0, past), base.narrow(out_axis, 0, past)), f"frame {k} reached the past"
        assert not torch.equal(out.narrow(out_axis, k, 1), base.narrow(out_axis, k, 1))
    if "image" not in wm.image_condition.parts:
        return
    last = FRAMES - 1
    y = x.clone()
    y.narrow(axis, last, 1).add_(3.0)
    leaky = _call(wm, y, y.narrow(axis, last, 1))
    ref = _call(wm, x, x.narrow(axis, last, 1))
    out_axis = wm.plan.layout.output_axis
    assert not torch.equal(leaky.narrow(out_axis, 0, 1), ref.narrow(out_axis, 0, 1))


STREAMING_I2V = [n for n in I2V_PLANS if registries().plans.get(n).streaming is not None]


@pytest.mark.parametrize("name", STREAMING_I2V)
def test_streaming_equals_full_recomputation_over_a_sliding_window(name):
    """6 frames through a window of 4: the window's first frame (the image) changes as it slides;
    streaming re-prefills then, and on frames after the first the image part is zeros / a 0 mask,
    counted across streaming calls."""
    wm = _wm(name)
    wm.latent_norm = LatentNorm()
    ctx = _sample(wm, frames=2, seed=4)
    actions = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(2))
    config = RolloutConfig(steps=3, window=4, guidance_scale=2.0, eta=0.5, seed=3)
    streamed = rollout(wm, ctx, actions, config=config)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    assert streamed.frames.abs().max() > 0.1
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)
    # control: the rollout depends on the context's first frame through the image
    other = ctx.clone()
    other.narrow(_axis(wm), 0, 1).mul_(-1)
    assert not torch.allclose(rollout(wm, other, actions, config=config).frames, streamed.frames, atol=1e-3)


def test_cogvideox15_rolls_out_block_by_block_with_its_image():
    wm = _wm("cogvideox15")
    wm.latent_norm = LatentNorm(scale=0.7)
    ctx = _sample(wm, frames=2, seed=4)
    actions = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    config = RolloutConfig(steps=2, window=6, chunk=2, guidance_scale=1.0, seed=3, cache=False)
    out = rollout(wm, ctx, actions, config=config).frames
    other = ctx.clone()
    other[:, :1].mul_(-1)
    assert torch.isfinite(out).all() and out.shape[1] == 4
    assert not torch.allclose(rollout(wm, other, actions, config=config).frames, out, atol=1e-3)


@pytest.mark.parametrize("name", ["wan", "svd"])
def test_a_bf16_rollout_streams_like_recomputation(name):
    wm = _wm(name, torch.bfloat16)
    wm.latent_norm = LatentNorm()
    ctx = _sample(wm, frames=2, seed=4)
    actions = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    config = RolloutConfig(steps=2, window=3, guidance_scale=1.0, seed=3)
    streamed = rollout(wm, ctx, actions, config=config).frames.float()
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False})).frames.float()
    assert torch.isfinite(streamed).all()
    assert (streamed - full).abs().max() <= 0.25 * full.std()  # bf16 order of operations differs


@pytest.mark.parametrize("name", ["cogvideox", "i2vgenxl"])
def test_training_gives_the_window_first_frame_as_the_image(name, monkeypatch):
    wm = _wm(name).train()
    axis = _axis(wm)
    x0 = _sample(wm, frames=FRAMES, seed=5).repeat(2, *([1] * 4))
    seen = {}
    forward = type(wm).forward

    def spy(self, sample, timesteps, actions=None, action_mask=None, image=None, **kw):
        seen["image"] = image
        return forward(self, sample, timesteps, actions, action_mask, image=image, **kw)

    monkeypatch.setattr(type(wm), "forward", spy)
    loss, _, _ = compute_loss(
        wm,
        x0,
        torch.randn(2, FRAMES, 3),
        None,
        schedule=NoiseSchedule.from_config(),
        frame_axis=axis,
        generator=torch.Generator().manual_seed(0),
        model_kwargs=wm.unconditional_inputs(2, FRAMES),
        output_axis=wm.plan.layout.output_axis,
        image_condition=True,
    )
    assert torch.equal(seen["image"], x0.narrow(axis, 0, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wm.parameters())


def test_bad_images_are_usage_errors():
    wm = _wm("wan")
    x = _sample(wm)
    with pytest.warns(ImageConditionWarning, match="got no image="):
        no_image = _call(wm, x, None)
    torch.testing.assert_close(no_image, _call(wm, x, torch.zeros_like(x[:, :, :1])), rtol=0, atol=0)
    with pytest.raises(UsageError, match="one frame"):
        _call(wm, x, x)  # the whole clip, not one frame
    with pytest.raises(UsageError, match="does not match"):
        _call(wm, x, x.narrow(2, 0, 1)[:, :, :, :8])
    t2v = tiny_world_model("wan")
    with pytest.raises(UsageError, match="takes no conditioning image"):
        _call(t2v, _sample(t2v), _sample(t2v).narrow(2, 0, 1))


def test_raw_units_undo_the_normalisation_or_warn():
    svd = _wm("svd").image_condition
    z = torch.randn(1, 1, 4, 8, 8)  # (B, F, C, H, W)
    norm = LatentNorm(scale=0.5, shift=0.25)
    raw = to_model_units(svd, z, 1, norm)
    torch.testing.assert_close(raw, z / 0.5 + 0.25)
    with pytest.warns(ImageConditionWarning, match="normalisation is unknown"):
        assert torch.equal(to_model_units(svd, z, 1, None), z)
    cog15 = _wm("cogvideox15").image_condition  # the pipeline passes raw / s while the data is raw · s
    assert cog15.units == "inverse" and _wm("cogvideox").image_condition.units == "latents"
    torch.testing.assert_close(to_model_units(cog15, z, 1, LatentNorm(scale=0.7)), z / 0.7**2)
    latents = _wm("wan").image_condition
    assert to_model_units(latents, z, 2, norm) is z  # "latents" units pass through


@pytest.mark.parametrize("name", ["wan", "svd"])
def test_rolling_keeps_the_first_frame_as_image_and_equals_exact_until_the_slide(name):
    wm = _wm(name)
    wm.latent_norm = LatentNorm()
    ctx = _sample(wm, frames=1, seed=4)
    actions = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(steps=2, window=4, guidance_scale=2.5, seed=3, history_noise=20)
    exact = rollout(wm, ctx, actions, config=config).frames
    session = RolloutSession(wm, RolloutConfig(**{**config.to_json(), "cache": "rolling", "sink": 1}))
    session.reset(ctx)
    rolling = torch.cat([session.step(actions[:, i]) for i in range(5)], dim=_axis(wm))
    axis = _axis(wm)
    assert torch.equal(rolling.narrow(axis, 0, 3), exact.narrow(axis, 0, 3))
    assert torch.isfinite(rolling).all()
    assert session.denoiser.stream.cached_frames > 4  # it slid ...
    kept = session.denoiser.stream._processors[0].cache
    assert 0 in kept.frame_ids, "the sink frame (the image's frame) was evicted"  # ... and kept frame 0
    if wm.image_condition.fill == "first":  # without a sink frame 0, the only one with the image, would go
        with pytest.raises(UsageError, match="need sink >= 1"):
            RolloutSession(wm, RolloutConfig(**{**config.to_json(), "cache": "rolling"}))


def test_an_i2v_dit_trains_on_data_with_the_latent_channels_and_rolls_out(tmp_path):
    """End to end through `train` and `load_world_model`: a Wan I2V config (in = 2·3 + 4, out = 3)
    trains on 3-channel frames (the sample's channel check counts latents only) and rolls out."""
    import numpy as np

    from causalize.api import convert
    from causalize.episodes import ActionSpace, create_dataset, write_episode
    from causalize.rollout.loading import load_world_model
    from causalize.rollout.sampler import RolloutSession
    from causalize.training.config import TrainConfig
    from causalize.training.trainer import train

    plan = registries().plans.get("wan")
    torch.manual_seed(0)
    src, ckpt = tmp_path / "src", tmp_path / "wm"
    plan.model_cls()(**{**plan.tiny_config, "in_channels": 10, "out_channels": 3}).save_pretrained(src)
    convert(src, ckpt, action_dim=2)
    data = tmp_path / "data"
    create_dataset(data, ActionSpace.continuous(2), frame_shape=(16, 16, 3))
    rng = np.random.default_rng(0)
    for e in range(2):
        write_episode(
            data,
            e,
            frames=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
            actions=rng.uniform(-1, 1, (8, 2)).astype(np.float32),
        )
    out = tmp_path / "run"
    cfg = dict(window=4, batch_size=2, steps=2, lr=1e-3, log_every=1, checkpoint_every=0, split=None, device="cpu")
    result = train(TrainConfig(model=str(ckpt), data=str(data), output_dir=str(out), **cfg))
    assert result["steps"] == 2
    wm, _ = load_world_model(out / "final", device="cpu")
    assert wm.image_condition is not None and wm.image_condition.mask_channels == 4
    session = RolloutSession(wm, RolloutConfig(steps=2, window=3, guidance_scale=1.0))
    session.reset(torch.randn(1, 3, 2, 16, 16))
    frame = session.step(torch.zeros(1, 2))
    assert frame.shape == (1, 3, 1, 16, 16) and torch.isfinite(frame).all()


def test_inspect_names_the_image_condition(tmp_path):
    from typer.testing import CliRunner

    from causalize.cli.app import app

    plan = registries().plans.get("wan")
    torch.manual_seed(0)
    plan.model_cls()(**{**plan.tiny_config, **I2V_CONFIGS["wan"]}).save_pretrained(tmp_path / "i2v")
    plan.build_tiny().save_pretrained(tmp_path / "t2v")
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(tmp_path / "i2v")])
    assert res.exit_code == 0, res.output
    assert (
        "image-to-video: the window's first frame, clean, as channels mask + image on the window's first frame"
        in res.output
    )
    res = runner.invoke(app, ["inspect", str(tmp_path / "t2v")])
    assert res.exit_code == 0 and "image-to-video" not in res.output  # control: a T2V config


def test_a_t2v_config_of_an_i2v_architecture_feeds_zeros():
    """HunyuanVideo 1.5 T2V has the I2V channels (in = 2·out + 1) and its pipeline fills them with
    zeros: the data has the latent channels, any image is ignored."""
    wm = tiny_world_model("hunyuan15", in_channels=9, task_type="t2v")
    assert wm.image_condition.fill == "none"
    x = _sample(wm)
    assert x.shape[1] == 4  # (B, C, F, H, W): the latents only
    zeros = _call(wm, x, None)
    torch.testing.assert_close(_call(wm, x, x[:, :, :1] + 5), zeros, rtol=0, atol=0)
    cond = wm.image_condition
    wm.image_condition = None
    try:
        ref = _call(wm, torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], dim=1), None)
    finally:
        wm.image_condition = cond
    torch.testing.assert_close(zeros, ref, rtol=0, atol=0)
    i2v = tiny_world_model("hunyuan15", in_channels=9, task_type="i2v")  # control: the I2V config uses it
    with pytest.warns(ImageConditionWarning, match="got no image="):
        assert not torch.equal(_call(i2v, x, x[:, :, :1] + 5), _call(i2v, x, None))


def test_the_channel_check_counts_latents_only():
    from types import SimpleNamespace

    from causalize.training.config import TrainConfig, TrainingError
    from causalize.training.loading import check_compatible

    wm = _wm("wan")  # in 12 = 4 latents + 4 mask + 4 image
    config = TrainConfig(model="m", data="d", output_dir="o", window=4)
    info = SimpleNamespace(channels=4, kind="latents", action_space=SimpleNamespace(width=3, type="continuous"))
    check_compatible(wm, info, None, config)  # 4 latent channels fit
    with pytest.raises(TrainingError, match="has 4 latent channels"):
        check_compatible(wm, SimpleNamespace(**{**vars(info), "channels": 12}), None, config)


def test_compiled_steps_take_the_moving_image_without_recompiling(monkeypatch):
    """Dynamo alone (backend "eager"): a Wan I2V rollout whose window slides every frame (a new
    image each frame) gives the eager frames and compiles its steps once."""
    from torch._dynamo.utils import counters

    from causalize.rollout import compiled as compiled_module

    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        wm = _wm("wan")
        ctx = _sample(wm, frames=2, seed=4)
        actions = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(2))
        config = dict(steps=2, window=3, guidance_scale=1.0, seed=3)
        eager = rollout(wm, ctx, actions, config=RolloutConfig(**config))
        compiled = rollout(wm, ctx, actions, config=RolloutConfig(**config, compile="default"))
        graphs = counters["stats"]["unique_graphs"]
        assert compiled.compiled_calls > 0 and graphs > 0
        torch.testing.assert_close(compiled.frames, eager.frames, rtol=0, atol=1e-5)
        other = ctx.clone()
        other[:, :, :1].mul_(-1)  # another first frame: new image values, same shapes
        rollout(wm, other, actions, config=RolloutConfig(**config, compile="default"))
        assert counters["stats"]["unique_graphs"] == graphs, "a new image recompiled"
    finally:
        torch._dynamo.reset()
        counters.clear()


def test_svd_trained_through_a_vae_rolls_out_with_the_units_it_trained_with(tmp_path):
    """SVD passes its image un-normalised: training with --vae undoes the VAE's scaling factor,
    and training.json carries it to rollout (no latent record for a --vae run)."""
    import numpy as np
    from world_models import tiny_image_vae

    from causalize.api import convert
    from causalize.episodes import ActionSpace, create_dataset, write_episode
    from causalize.rollout.loading import load_world_model
    from causalize.training.config import TrainConfig
    from causalize.training.trainer import train

    tiny_image_vae(scaling_factor=0.18215).save_pretrained(tmp_path / "vae")
    plan = registries().plans.get("svd")
    plan.model_cls()(**{**plan.tiny_config, **I2V_CONFIGS["svd"]}).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "wm", action_dim=2)
    data = tmp_path / "data"
    create_dataset(data, ActionSpace.continuous(2), frame_shape=(16, 16, 3))
    rng = np.random.default_rng(0)
    write_episode(
        data, 0, frames=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), actions=np.zeros((6, 2), np.float32)
    )
    cfg = dict(window=3, batch_size=1, steps=1, log_every=1, checkpoint_every=0, split=None, device="cpu")
    train(
        TrainConfig(
            model=str(tmp_path / "wm"),
            data=str(data),
            output_dir=str(tmp_path / "run"),
            vae=str(tmp_path / "vae"),
            **cfg,
        )
    )
    wm, _ = load_world_model(tmp_path / "run" / "final", device="cpu")
    assert wm.latent_norm is not None and wm.latent_norm.scale == pytest.approx(0.18215)
    assert not (tmp_path / "run" / "final" / "latent.json").exists()  # it came from training.json
