"""Diffusion Forcing objective (METHOD.md §6, §7): schedule, per-frame forward process,
parameterisation round trips, timestep sampling, action dropout statistics and the loss reduction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.noise import NoiseSchedule, rescale_zero_terminal_snr
from causalize.training.objective import (
    action_keep_mask,
    diffusion_forcing_loss,
    motion_weights,
    sample_frame_timesteps,
)

K = 1000


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config()


def _layout(b: int, t: int, axis: int, extra: tuple[int, ...]) -> tuple[int, ...]:
    """Shape with batch b at axis 0, frames t at `axis` (>= 1), the other dims from `extra`."""
    rest = list(extra)
    rest.insert(axis - 1, t)
    return (b, *rest)


# ---------------------------------------------------------------- schedule


def test_rescale_zero_terminal_snr_endpoints():
    base = NoiseSchedule.from_config(rescale_zero_terminal_snr=False)
    resc = NoiseSchedule.from_config()
    assert resc.alphas_cumprod.dtype == torch.float64 and resc.num_train_timesteps == K
    assert abs(resc.sqrt_alphas_cumprod[-1].item()) < 1e-12
    assert resc.sqrt_alphas_cumprod[0].item() == pytest.approx(base.sqrt_alphas_cumprod[0].item(), abs=1e-15)
    assert resc.snr[-1].item() == 0.0
    # monotone: noise level increases with k
    assert bool((resc.alphas_cumprod[1:] <= resc.alphas_cumprod[:-1]).all())
    # the function agrees with the formula of METHOD.md §6 everywhere
    s = base.sqrt_alphas_cumprod
    expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    torch.testing.assert_close(rescale_zero_terminal_snr(base.alphas_cumprod), expected, rtol=0, atol=1e-15)


def test_unrescaled_terminal_alpha():
    base = NoiseSchedule.from_config(rescale_zero_terminal_snr=False)
    assert base.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=5e-5)


def test_linear_schedule_and_betas_round_trip():
    lin = NoiseSchedule.from_config(
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        rescale_zero_terminal_snr=False,
    )
    torch.testing.assert_close(lin.betas, torch.linspace(1e-4, 0.02, K, dtype=torch.float64))


def test_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    ours = NoiseSchedule.from_config()
    assert torch.allclose(ours.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=0, atol=1e-6)
    adopted = NoiseSchedule.from_diffusers(ddim)
    assert torch.equal(adopted.alphas_cumprod, ddim.alphas_cumprod.double())

    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_diffusers(object())


# ---------------------------------------------------------------- forward process


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    extra=st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
    axis_choice=st.integers(0, 10),
    negative=st.booleans(),
    pred=st.sampled_from(["v", "epsilon", "v_prediction"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_per_frame(schedule, b, t, extra, axis_choice, negative, pred, seed):
    ndim = 2 + len(extra)
    axis = 1 + axis_choice % (ndim - 1)
    shape = _layout(b, t, axis, extra)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    # ε-prediction cannot recover x0 at ᾱ = 0 (the zero-SNR step), so stay below it there
    hi = K if pred != "epsilon" else K - 1
    ts = torch.randint(0, hi, (b, t), generator=g)
    if t > 1:
        ts[:, 0], ts[:, -1] = 0, hi - 1  # frames at different levels, incl. both ends
    fa = axis - ndim if negative else axis

    x_k = schedule.q_sample(x0, noise, ts, frame_axis=fa)
    tgt = schedule.target(x0, noise, ts, prediction_type=pred, frame_axis=fa)
    x0_hat = schedule.convert(x_k, tgt, ts, pred, "sample", frame_axis=fa)
    eps_hat = schedule.convert(x_k, tgt, ts, pred, "epsilon", frame_axis=fa)
    atol = 1e-9 if pred != "epsilon" else 1e-6  # ε: x̂0 divides by √ᾱ, tiny near the end
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=atol)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-9)
    v = schedule.convert(x_k, tgt, ts, pred, "v", frame_axis=fa)
    torch.testing.assert_close(v, schedule.target(x0, noise, ts, "v", fa), rtol=0, atol=1e-6)

    # explicit formulas of METHOD.md §6, frame by frame
    a = schedule.sqrt_alphas_cumprod[ts]  # (B, T)
    s = schedule.sqrt_one_minus_alphas_cumprod[ts]
    for bi in range(b):
        for ti in range(t):
            xb, nb = (
                x0.select(0, bi).select(axis - 1, ti),
                noise.select(0, bi).select(axis - 1, ti),
            )
            kb = x_k.select(0, bi).select(axis - 1, ti)
            torch.testing.assert_close(kb, a[bi, ti] * xb + s[bi, ti] * nb)


def test_round_trip_float32_and_sample(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(2, 4, 3, 5, 5, generator=g),
        torch.randn(2, 4, 3, 5, 5, generator=g),
    )
    ts = torch.tensor([[0, 300, 700, 999], [999, 10, 500, 1]])
    x_k = schedule.q_sample(x0, noise, ts)
    assert x_k.dtype == torch.float32
    v = schedule.target(x0, noise, ts)
    torch.testing.assert_close(schedule.convert(x_k, v, ts, "v", "sample"), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(schedule.convert(x_k, v, ts, "v", "epsilon"), noise, rtol=0, atol=1e-5)
    # at the zero-SNR step the noisy input is pure noise and v = -x0
    torch.testing.assert_close(x_k[0, 3], noise[0, 3])
    torch.testing.assert_close(v[0, 3], -x0[0, 3])
    # sample parameterisation
    assert torch.equal(schedule.target(x0, noise, ts, "sample"), x0)
    ts2 = ts.clamp(max=998)
    x_k2 = schedule.q_sample(x0.double(), noise.double(), ts2)
    eps = schedule.convert(x_k2, x0.double(), ts2, "sample", "epsilon")
    torch.testing.assert_close(eps, noise.double(), rtol=0, atol=1e-9)
    # half-precision inputs keep their dtype
    assert schedule.q_sample(x0.half(), noise.half(), ts).dtype == torch.float16


def test_per_frame_independence(schedule):
    g = torch.Generator().manual_seed(1)
    b, t = 2, 6
    for axis, shape in ((1, (b, t, 4, 3, 3)), (2, (b, 4, t, 3, 3)), (-1, (b, 4, 3, t))):
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ts = torch.randint(0, K, (b, t), generator=g)
        base = schedule.q_sample(x0, noise, ts, frame_axis=axis)
        base_v = schedule.target(x0, noise, ts, frame_axis=axis)
        for j in range(t):
            ts2 = ts.clone()
            ts2[:, j] = (ts2[:, j] + 137) % K
            out = schedule.q_sample(x0, noise, ts2, frame_axis=axis)
            out_v = schedule.target(x0, noise, ts2, frame_axis=axis)
            for i in range(t):
                same_x = torch.equal(out.select(axis, i), base.select(axis, i))
                same_v = torch.equal(out_v.select(axis, i), base_v.select(axis, i))
                assert same_x == (i != j) and same_v == (i != j), (axis, i, j)


# ---------------------------------------------------------------- timestep sampling


def test_sample_frame_timesteps_modes():
    g = torch.Generator().manual_seed(0)
    ind = sample_frame_timesteps(64, 16, generator=g)
    assert ind.shape == (64, 16) and ind.dtype == torch.long
    assert int(ind.min()) >= 0 and int(ind.max()) < K
    # frames of one sample differ (iid over 1000 values: a constant row has prob ~1e-45)
    assert all(len(set(row.tolist())) > 1 for row in ind)
    assert int(ind.min()) < 50 and int(ind.max()) > 950  # covers the range
    small = sample_frame_timesteps(500, 8, num_train_timesteps=3, generator=g)
    assert set(small.unique().tolist()) == {0, 1, 2}  # k = 0 possible, K excluded

    sh = sample_frame_timesteps(64, 16, generator=g, mode="shared")
    assert sh.shape == (64, 16) and sh.dtype == torch.long
    assert bool((sh == sh[:, :1]).all())
    assert len(set(sh[:, 0].tolist())) > 1  # but differs across samples

    # reproducible with a seeded generator
    a = sample_frame_timesteps(4, 4, generator=torch.Generator().manual_seed(7))
    b = sample_frame_timesteps(4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- action dropout


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_action_dropout_rate_and_independence(p):
    b, t = 4000, 16
    keep = action_keep_mask(b, t, drop_prob=p, generator=torch.Generator().manual_seed(3))
    assert keep.shape == (b, t) and keep.dtype == torch.bool
    drop = (~keep).double()
    n = drop.numel()
    rate = drop.mean().item()
    if p == 0.0:
        assert rate == 0.0
        return
    se = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 4 * se, (rate, p, se)
    # per-frame rates also match: dropout does not depend on the frame index
    per_frame = drop.mean(0)
    se_f = math.sqrt(p * (1 - p) / b)
    assert bool(((per_frame - p).abs() < 5 * se_f).all())
    # consecutive frames: joint drop frequency ≈ p² (independence across frames)
    joint = (drop[:, 1:] * drop[:, :-1]).mean().item()
    m = b * (t - 1)
    se_j = math.sqrt(p * p * (1 - p * p) / m) * 2  # pairs overlap; double the iid standard error
    assert abs(joint - p * p) < 4 * se_j, (joint, p * p, se_j)
    # and rows are not all-or-nothing, unlike per-sequence dropout
    row_frac = drop.mean(1)
    assert bool(((row_frac > 0) & (row_frac < 1)).any())


def test_action_dropout_per_sequence():
    b, t, p = 4000, 8, 0.3
    keep = action_keep_mask(
        b,
        t,
        drop_prob=p,
        generator=torch.Generator().manual_seed(5),
        mode="per-sequence",
    )
    assert keep.shape == (b, t) and keep.dtype == torch.bool
    assert bool((keep == keep[:, :1]).all())  # whole rows
    rate = (~keep[:, 0]).double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / b)


# ---------------------------------------------------------------- loss


def test_loss_hand_computation():
    g = torch.Generator().manual_seed(2)
    out, tgt = (
        torch.randn(2, 3, 4, 2, 2, generator=g),
        torch.randn(2, 3, 4, 2, 2, generator=g),
    )
    loss, per_frame = diffusion_forcing_loss(out, tgt, frame_axis=1, return_per_frame=True)
    assert per_frame.shape == (2, 3) and loss.ndim == 0
    hand = torch.zeros(2, 3)
    for bi in range(2):
        for ti in range(3):
            d = (out[bi, ti] - tgt[bi, ti]).flatten()
            hand[bi, ti] = sum(x * x for x in d.tolist()) / d.numel()
    torch.testing.assert_close(per_frame, hand)
    torch.testing.assert_close(loss, hand.sum() / 6)
    torch.testing.assert_close(per_frame.mean(), loss)
    # equal per-frame element counts: identical to plain MSE, and the layout does not matter
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, tgt))
    _, pf2 = diffusion_forcing_loss(out.movedim(1, 2), tgt.movedim(1, 2), frame_axis=2, return_per_frame=True)
    torch.testing.assert_close(pf2, per_frame)
    torch.testing.assert_close(diffusion_forcing_loss(out, tgt), loss)
    # computed in float32 for half inputs; gradients flow
    assert diffusion_forcing_loss(out.half(), tgt.half()).dtype == torch.float32
    o = out.clone().requires_grad_()
    diffusion_forcing_loss(o, tgt).backward()
    torch.testing.assert_close(o.grad, 2 * (out - tgt) / out.numel())


# ---------------------------------------------------------------- validation


def test_bad_inputs_raise(schedule):
    x = torch.zeros(2, 3, 4)
    ts = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
        schedule.q_sample(x, torch.zeros(2, 3, 5), ts)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        schedule.q_sample(x, x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"out of range.*\[1000, 1000\].*\[0, 999\]"):
        schedule.q_sample(x, x, torch.full((2, 3), 1000))
    with pytest.raises(ValueError, match=r"out of range.*-1"):
        schedule.q_sample(x, x, torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="integer"):
        schedule.q_sample(x, x, ts.float())
    with pytest.raises(ValueError, match="v, epsilon, sample"):
        schedule.target(x, x, ts, prediction_type="x0")
    with pytest.raises(ValueError, match="v, epsilon, sample"):
        schedule.convert(x, x, ts, "eps", "sample")
    with pytest.raises(ValueError, match="v, epsilon, sample"):
        schedule.convert(x, x, ts, "v", "x0")
    with pytest.raises(ValueError, match="batch axis"):
        schedule.q_sample(x, x, ts, frame_axis=0)
    with pytest.raises(ValueError, match="out of range"):
        schedule.q_sample(x, x, ts, frame_axis=3)
    with pytest.raises(ValueError, match="independent, shared"):
        sample_frame_timesteps(2, 3, mode="per-frame")
    with pytest.raises(ValueError, match="per-frame, per-sequence"):
        action_keep_mask(2, 3, mode="shared")
    for p in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"drop_prob.*\[0, 1\)"):
            action_keep_mask(2, 3, drop_prob=p)
    with pytest.raises(ValueError, match="batch"):
        sample_frame_timesteps(0, 3)
    with pytest.raises(ValueError, match=r"model_out.*\(2, 3, 4\).*target.*\(2, 4, 3\)"):
        diffusion_forcing_loss(x, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="beta_schedule.*scaled_linear, linear"):
        NoiseSchedule.from_config(beta_schedule="cosine")


# ---------------------------------------------------------------------------- motion weights


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    t=st.integers(2, 5),
    axis=st.sampled_from([1, 2]),
    strength=st.floats(0.1, 50.0),
)
def test_motion_weights_have_mean_one_and_follow_the_change(seed, b, t, axis, strength):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, t, 4, 4, generator=g) if axis == 2 else torch.randn(b, t, 3, 4, 4, generator=g)
    w = motion_weights(x, axis, strength)
    assert w.shape == x.shape and bool((w > 0).all())
    torch.testing.assert_close(w.flatten(1).mean(1), torch.ones(b), rtol=1e-5, atol=1e-5)
    xf, wf = x.movedim(axis, 1), w.movedim(axis, 1)
    change = (xf[:, 1:] - xf[:, :-1]).abs()
    # within a sample, a larger change never gets a smaller weight (frame t >= 1 against t - 1)
    for i in range(b):
        c, v = change[i].flatten(), wf[i, 1:].flatten()
        order = torch.argsort(c)
        assert bool((v[order][1:] >= v[order][:-1] - 1e-6).all())
    torch.testing.assert_close(wf[:, 0], wf[:, 1])  # frame 0 is weighted by its change to frame 1


def test_motion_weights_favour_the_moving_object_and_leave_a_static_clip_alone():
    """A 1-pixel object moving over a static scene gets most of the weight; a static clip, one
    frame, or strength 0 gets weight 1 everywhere (the control: nothing to favour)."""
    x = torch.zeros(1, 1, 4, 8, 8)  # (B, C, T, H, W)
    for t in range(4):
        x[0, 0, t, 2, t] = 1.0  # the object moves one column per frame
    w = motion_weights(x, 2, 10.0)
    moving = torch.zeros_like(x, dtype=torch.bool)
    for t in range(4):
        moving[0, 0, t, 2, t] = True
        moving[0, 0, t, 2, max(t - 1, 0) if t else 1] = True
    assert float(w[moving].min()) > 10 * float(w[~moving].max())
    ones = torch.ones_like(x)
    static = torch.zeros(1, 1, 4, 8, 8) + 0.3
    assert torch.equal(motion_weights(static, 2, 10.0), ones)
    assert torch.equal(motion_weights(x, 2, 0.0), ones)
    assert torch.equal(motion_weights(x[:, :, :1], 2, 10.0), torch.ones_like(x[:, :, :1]))
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="strength"):
            motion_weights(x, 2, bad)


def test_weighted_loss_is_the_weighted_mean_of_squared_errors():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    w = torch.rand(2, 3, 4, 5, generator=g)
    loss, per_frame = diffusion_forcing_loss(out, target, 1, weight=w, return_per_frame=True)
    torch.testing.assert_close(per_frame, ((out - target).square() * w).flatten(2).mean(2))
    torch.testing.assert_close(loss, per_frame.mean())
    assert torch.equal(
        diffusion_forcing_loss(out, target, 1, weight=torch.ones_like(w)), diffusion_forcing_loss(out, target, 1)
    )
    with pytest.raises(ValueError):
        diffusion_forcing_loss(out, target, 1, weight=w[:, :2])
