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


def test_negative_control_torch_draws_bf16_normals_from_another_stream():
    """Why gaussian exists: torch's own bf16 draw of 1,000 values is not the float32 draw cast
    (torch 2.13 past a multiple of 16 values; torch 2.11 already at 16)."""
    bf16 = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    cast = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert not torch.equal(bf16, cast)
