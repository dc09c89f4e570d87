"""The one set of x0 / ε / v conversions in causalize.noise (METHOD.md §6): every pair of
parameterisations, with tensor (per-frame) and float (sampler) coefficients."""

from __future__ import annotations

import math

import pytest
import torch

from causalize.noise import NoiseSchedule, convert_prediction, prediction_target

KINDS = ("v", "epsilon", "sample")


@pytest.mark.parametrize("source", KINDS)
@pytest.mark.parametrize("target", KINDS)
def test_every_pair_agrees_with_the_targets(source, target):
    """Converting the exact `source` prediction at x_k gives the exact `target` prediction."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
    )
    alpha = torch.rand(2, 5, 1, generator=g, dtype=torch.float64).clamp(0.05, 0.95)
    sigma = (1 - alpha**2).sqrt()
    x_k = alpha * x0 + sigma * eps
    pred = prediction_target(x0, eps, alpha, sigma, source)
    out = convert_prediction(x_k, pred, alpha, sigma, source, target)
    torch.testing.assert_close(out, prediction_target(x0, eps, alpha, sigma, target), rtol=0, atol=1e-12)


def test_float_coefficients_match_tensor_ones_exactly():
    """The sampler passes Python floats; the result is the same as with 0-d float64 tensors."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 3, 1, 4, 4, generator=g), torch.randn(1, 3, 1, 4, 4, generator=g)
    a_bar = 0.3
    sa, ss = math.sqrt(a_bar), math.sqrt(1 - a_bar)
    for target in ("sample", "epsilon"):
        by_float = convert_prediction(x, v, sa, ss, "v", target)
        assert by_float.dtype == torch.float32
        assert torch.equal(by_float, (sa * x - ss * v) if target == "sample" else (ss * x + sa * v))


def test_schedule_convert_keeps_the_input_dtype_and_validates():
    schedule = NoiseSchedule.from_config()
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    ts = torch.tensor([[0, 500, 998], [1, 2, 3]])
    assert schedule.convert(x, x, ts, "epsilon", "v").dtype == torch.bfloat16
    assert torch.equal(schedule.convert(x, x, ts, "v_prediction", "v"), x)
    with pytest.raises(ValueError, match=r"x_k.*\(2, 3, 4\).*model_out.*\(2, 3, 5\)"):
        schedule.convert(x, torch.zeros(2, 3, 5), ts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(15,), (16,), (1000,), (1, 4, 3, 16, 16)])
def test_gaussian_noise_is_the_float32_draw_in_every_dtype(shape, dtype):
    """The same seed gives the same noise whatever the model's dtype (float64 draws its own)."""
    from causalize.noise import gaussian

    noise = gaussian(shape, torch.Generator().manual_seed(3), "cpu", dtype)
    assert noise.dtype == dtype and noise.shape == shape
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=draw).to(dtype)
    assert torch.equal(noise, expected)


def test_gaussian_noise_needs_a_floating_dtype():
    from causalize.noise import gaussian

    with pytest.raises(ValueError, match="floating-point"):
        gaussian((3,), None, "cpu", torch.int64)


def _half_draws(monkeypatch) -> list:
    """Spy on torch.randn: the half-precision dtypes it is asked to draw in."""
    real, asked = torch.randn, []

    def spy(*args, **kwargs):
        asked.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    return asked


def _bf16_rollout() -> None:
    from world_models import tiny_world_model

    from causalize import precision
    from causalize.rollout.sampler import RolloutConfig, rollout

    wm = tiny_world_model("wan")
    cond = wm.plan.conditioning
    context = wm.plan.make_inputs(wm.model, 2, torch.Generator().manual_seed(0))[cond.sample_arg]
    actions = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(1))
    precision.to_precision(wm.model, torch.bfloat16)
    rollout(wm, context, actions, config=RolloutConfig(steps=2, window=3))


def test_a_bf16_rollout_and_a_bf16_training_draw_take_their_noise_in_float32(monkeypatch):
    """Whatever torch's bf16 stream is on a given version (torch 2.13 matches float32 for the test
    models' frame sizes, 2.11 does not), the sampler and the trainer never draw in half precision."""
    from causalize.noise import NoiseSchedule
    from causalize.training.trainer import draw_step_inputs

    asked = _half_draws(monkeypatch)
    _bf16_rollout()
    x0 = torch.zeros(2, 4, 3, 8, 8, dtype=torch.bfloat16)
    inputs = draw_step_inputs(
        x0, None, schedule=NoiseSchedule.from_config(), frame_axis=2, generator=torch.Generator().manual_seed(0)
    )
    assert inputs.noise.dtype == torch.bfloat16
    assert asked and not [d for d in asked if d in (torch.bfloat16, torch.float16)], asked


def test_negative_control_the_spy_sees_a_sampler_that_draws_in_bf16(monkeypatch):
    """The old sampler drew in the model's dtype: put back, the check above would fail."""
    from causalize.rollout import sampler

    monkeypatch.setattr(
        sampler,
        "gaussian",
        lambda shape, gen, device, dtype: torch.randn(shape, generator=gen, device=device, dtype=dtype),
    )
    asked = _half_draws(monkeypatch)
    _bf16_rollout()
    assert torch.bfloat16 in asked
