"""Weight transfer (METHOD.md §4.2, §4.3): γ table, closed forms and exactness properties.

The causal conv is applied here with a plain F.pad + F.conv1d, so these tests depend only on
``transfer_kernel`` and not on the module swap.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.modules.weight_transfer import TRANSFERS, ols_coefficients, transfer_kernel

F64 = torch.float64

GAMMA_TABLE = {
    (1, 2): [[2, -1]],
    (1, 3): [[Fraction(4, 3), Fraction(1, 3), Fraction(-2, 3)]],
    (2, 2): [[2, -1], [3, -2]],
    (2, 3): [
        [Fraction(4, 3), Fraction(1, 3), Fraction(-2, 3)],
        [Fraction(11, 6), Fraction(1, 3), Fraction(-7, 6)],
    ],
}


def _original(w: torch.Tensor, b: torch.Tensor, z: torch.Tensor, d: int) -> torch.Tensor:
    m = (w.shape[-1] - 1) // 2
    return F.conv1d(z, w, b, padding=m * d, dilation=d)


def _causal(w: torch.Tensor, b: torch.Tensor, z: torch.Tensor, d: int) -> torch.Tensor:
    return F.conv1d(F.pad(z, (d * (w.shape[-1] - 1), 0)), w, b, dilation=d)


def _ramp(channels: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(1, channels, 1, generator=gen, dtype=F64)
    c = torch.randn(1, channels, 1, generator=gen, dtype=F64)
    t = torch.arange(length, dtype=F64)
    return a + c * t, a, c


def _conv_params(channels: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(channels, channels, k, generator=gen, dtype=F64)
    return w, torch.randn(channels, generator=gen, dtype=F64)


# --------------------------------------------------------------------------- γ


@pytest.mark.parametrize(("m", "p"), sorted(GAMMA_TABLE))
def test_gamma_table(m: int, p: int) -> None:
    expected = torch.tensor([[float(v) for v in row] for row in GAMMA_TABLE[(m, p)]], dtype=F64)
    gamma = ols_coefficients(m, p)
    assert gamma.dtype == F64 and gamma.shape == (m, p)
    torch.testing.assert_close(gamma, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gamma_rows_sum_to_one(m: int) -> None:
    for p in range(1, 2 * m + 2):
        torch.testing.assert_close(ols_coefficients(m, p).sum(dim=1), torch.ones(m, dtype=F64))


def test_gamma_p1_holds_last_frame() -> None:
    assert torch.equal(ols_coefficients(3, 1), torch.ones(3, 1, dtype=F64))


def test_gamma_is_the_ols_prediction() -> None:
    """γ_i·z equals lstsq's line through the last p points evaluated i steps ahead."""
    gen = torch.Generator().manual_seed(0)
    m, p = 3, 5
    z = torch.randn(p, generator=gen, dtype=F64)  # z[j] = value at lag j
    design = torch.stack([torch.ones(p, dtype=F64), -torch.arange(p, dtype=F64)], dim=1)
    coef = torch.linalg.lstsq(design, z.unsqueeze(1)).solution.squeeze(1)
    ahead = coef[0] + coef[1] * torch.arange(1, m + 1, dtype=F64)
    torch.testing.assert_close(ols_coefficients(m, p) @ z, ahead)


@pytest.mark.parametrize(("m", "p"), [(1, 0), (1, 4), (2, 6), (3, -1), (0, 2)])
def test_p_out_of_range_raises(m: int, p: int) -> None:
    with pytest.raises(ValueError, match="p="):
        ols_coefficients(m, p)
    if m > 0:
        with pytest.raises(ValueError, match="p="):
            transfer_kernel(torch.randn(1, 1, 2 * m + 1), 2, "extrapolative", p)


# --------------------------------------------------------------------------- closed forms


def _m1_kernel() -> torch.Tensor:
    return torch.randn(5, 3, 3, 2, 2, dtype=torch.float32)


def test_m1_extrapolative_closed_form() -> None:
    w = _m1_kernel()
    out = transfer_kernel(w, 2, "extrapolative", p=2)
    w_m1, w_0, w_p1 = w[:, :, 0], w[:, :, 1], w[:, :, 2]
    torch.testing.assert_close(out[:, :, 0], torch.zeros_like(w_m1), rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 1], w_m1 - w_p1)
    torch.testing.assert_close(out[:, :, 2], w_0 + 2 * w_p1)


def test_m1_masked_and_shift_exact() -> None:
    w = _m1_kernel()
    masked = transfer_kernel(w, 2, "masked")
    expected = torch.zeros_like(w)
    expected[:, :, 1], expected[:, :, 2] = w[:, :, 0], w[:, :, 1]
    assert torch.equal(masked, expected)
    shifted = transfer_kernel(w, 2, "shift")
    assert torch.equal(shifted, w) and shifted.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("m", [1, 2, 3])
def test_masked_general_definition(m: int) -> None:
    k = 2 * m + 1
    w = torch.randn(2, 3, k, dtype=torch.float32)
    out = transfer_kernel(w, 2, "masked")
    for lag in range(k):
        expected = w[..., m - lag] if lag <= m else torch.zeros_like(w[..., 0])
        assert torch.equal(out[..., 2 * m - lag], expected)


def test_transfer_keeps_shape_dtype_and_axis() -> None:
    w = torch.randn(4, 2, 1, 1, 5, dtype=torch.bfloat16)
    out = transfer_kernel(w, -1, "extrapolative", p=3)
    assert out.shape == w.shape and out.dtype == w.dtype
    expected = transfer_kernel(w.movedim(-1, 2).float(), 2, "extrapolative", p=3).movedim(2, -1)
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float())


def test_transfer_on_meta() -> None:
    w = torch.empty(8, 4, 3, 1, 1, device="meta", dtype=torch.float16)
    for strategy in TRANSFERS:
        out = transfer_kernel(w, 2, strategy)
        assert out.is_meta and out.shape == w.shape and out.dtype == w.dtype


def test_bad_kernel_and_strategy_raise() -> None:
    with pytest.raises(ValueError, match="odd"):
        transfer_kernel(torch.randn(1, 1, 4), 2, "masked")
    with pytest.raises(ValueError, match="shift, masked, extrapolative"):
        transfer_kernel(torch.randn(1, 1, 3), 2, "mixed")


def test_size_one_kernel_unchanged() -> None:
    w = torch.randn(2, 2, 1, 3, 3)
    for strategy in TRANSFERS:
        assert torch.equal(transfer_kernel(w, 2, strategy), w)


# --------------------------------------------------------------------------- exactness (§4.3)

_valid_mp = st.integers(1, 3).flatmap(lambda m: st.tuples(st.just(m), st.integers(2, 2 * m + 1)))


@settings(max_examples=40, deadline=None)
@given(mp=_valid_mp, d=st.integers(1, 3), channels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_extrapolative_exact_on_linear_inputs(mp: tuple[int, int], d: int, channels: int, seed: int) -> None:
    m, p = mp
    gen = torch.Generator().manual_seed(seed)
    w, b = _conv_params(channels, 2 * m + 1, gen)
    lo = d * max(m, p - 1)
    length = lo + m * d + 4
    z, _, _ = _ramp(channels, length, gen)
    y = _original(w, b, z, d)
    y_causal = _causal(transfer_kernel(w, 2, "extrapolative", p), b, z, d)
    interior = slice(lo, length - m * d)
    torch.testing.assert_close(y_causal[..., interior], y[..., interior], rtol=1e-10, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3), d=st.integers(1, 3), channels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_shift_exact_on_constants_and_off_on_ramps(m: int, d: int, channels: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w, b = _conv_params(channels, 2 * m + 1, gen)
    length = 4 * m * d + 3
    z, a, alpha = _ramp(channels, length, gen)
    interior = slice(2 * m * d, length - m * d)  # both convs read only real frames
    w_shift = transfer_kernel(w, 2, "shift")
    const = a.expand(1, channels, length)
    torch.testing.assert_close(_causal(w_shift, b, const, d)[..., interior], _original(w, b, const, d)[..., interior])
    gap = _original(w, b, z, d) - _causal(w_shift, b, z, d)
    expected = m * d * (w.sum(dim=2) @ alpha.reshape(channels, 1))  # α·m·d·Σw per channel
    torch.testing.assert_close(gap[..., interior], expected.reshape(1, channels, 1).expand_as(gap[..., interior]))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3), d=st.integers(1, 3), channels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_masked_not_exact_on_constants(m: int, d: int, channels: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w, b = _conv_params(channels, 2 * m + 1, gen)
    length = 3 * m * d + 3
    c = torch.randn(1, channels, 1, generator=gen, dtype=F64).expand(1, channels, length)
    interior = slice(m * d, length - m * d)
    gap = _original(w, b, c, d) - _causal(transfer_kernel(w, 2, "masked"), b, c, d)
    expected = w[:, :, m + 1 :].sum(dim=2) @ c[0, :, :1]  # c·Σ_{i>=1} w_{+i}
    torch.testing.assert_close(gap[..., interior], expected.reshape(1, channels, 1).expand_as(gap[..., interior]))


@pytest.mark.parametrize(("m", "d"), [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_extrapolative_p2_residual_on_quadratic(m: int, d: int) -> None:
    """y - y' = (M/2)·d²·Σ_i (i² + i)·w_{+i}, constant in t (METHOD.md §4.3)."""
    gen = torch.Generator().manual_seed(m * 10 + d)
    w, b = _conv_params(1, 2 * m + 1, gen)
    curvature, length = 0.7, 4 * m * d + 4
    tau = torch.arange(length, dtype=F64)
    z = (curvature / 2 * tau**2).reshape(1, 1, length)
    gap = _original(w, b, z, d) - _causal(transfer_kernel(w, 2, "extrapolative", 2), b, z, d)
    i = torch.arange(1, m + 1, dtype=F64)
    expected = curvature / 2 * d**2 * ((i**2 + i) * w[0, 0, m + 1 :]).sum()
    interior = gap[..., d * m : length - m * d]
    torch.testing.assert_close(interior, expected.expand_as(interior))
