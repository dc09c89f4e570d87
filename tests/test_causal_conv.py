"""Causal temporal convs (METHOD.md §4.1, §4.4): causality, shapes, weights, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from causalize.modules.causal_conv import (
    CausalConv1d,
    CausalConv2d,
    CausalConv3d,
    is_temporal_conv,
    make_causal_conv,
    temporal_conv_problem,
)
from causalize.modules.weight_transfer import TRANSFERS, transfer_kernel

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CAUSAL = {1: CausalConv1d, 2: CausalConv2d, 3: CausalConv3d}


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    """A random symmetric "same" temporal conv, a valid transfer and an input."""
    ndim = draw(st.sampled_from([1, 2, 3]))
    time_axis = draw(st.integers(0, ndim - 1)) if ndim == 3 else 0
    k = draw(st.sampled_from([3, 5, 7]))
    d = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    spatial_k = draw(st.sampled_from([1, 3]))
    kernel = [spatial_k] * ndim
    kernel[time_axis] = k
    dilation = [1] * ndim
    dilation[time_axis] = d
    padding = [(s - 1) // 2 for s in kernel]
    padding[time_axis] = d * (k - 1) // 2
    transfer = draw(st.sampled_from(TRANSFERS))
    m = (k - 1) // 2
    p = draw(st.integers(1, 2 * m + 1)) if transfer == "extrapolative" else 2
    conv = CONV[ndim](
        cin,
        cout,
        tuple(kernel),
        padding=tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "replicate"])),
    )
    frames = draw(st.integers(1, 9))
    shape = [2, cin] + [3] * ndim
    shape[2 + time_axis] = frames
    return {
        "conv": conv,
        "time_axis": time_axis,
        "transfer": transfer,
        "p": p,
        "shape": shape,
        "seed": draw(st.integers(0, 2**16)),
    }


def _perturb_from(x: torch.Tensor, dim: int, j: int, gen: torch.Generator) -> torch.Tensor:
    x2 = x.clone()
    index = [slice(None)] * x.ndim
    index[dim] = slice(j, None)
    x2[tuple(index)] = torch.randn(x2[tuple(index)].shape, generator=gen)
    return x2


def _frames(y: torch.Tensor, dim: int, stop: int) -> torch.Tensor:
    return y.narrow(dim, 0, stop)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_causal_and_same_shape(case: dict) -> None:
    conv, time_axis = case["conv"], case["time_axis"]
    causal = make_causal_conv(conv, time_axis=time_axis, transfer=case["transfer"], p=case["p"])
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=gen)
    with torch.no_grad():
        y = causal(x)
        assert y.shape == conv(x).shape
        dim = 2 + time_axis
        for j in range(x.shape[dim]):
            y2 = causal(_perturb_from(x, dim, j, gen))
            assert torch.equal(_frames(y2, dim, j), _frames(y, dim, j)), f"frame < {j} moved"


@settings(max_examples=30, deadline=None)
@given(case=conv_cases())
def test_state_dict_and_transfer_none(case: dict) -> None:
    conv, time_axis = case["conv"], case["time_axis"]
    causal = make_causal_conv(conv, time_axis=time_axis, transfer=None)
    assert list(causal.state_dict()) == list(conv.state_dict())
    for key, value in conv.state_dict().items():
        assert torch.equal(causal.state_dict()[key], value)
    transferred = make_causal_conv(conv, time_axis=time_axis, transfer=case["transfer"], p=case["p"])
    expected = transfer_kernel(conv.weight.detach(), 2 + time_axis, case["transfer"], case["p"])
    assert torch.equal(transferred.weight, expected)
    reloaded = make_causal_conv(conv, time_axis=time_axis, transfer=None)
    reloaded.load_state_dict(transferred.state_dict())
    x = torch.randn(case["shape"])
    with torch.no_grad():
        assert torch.equal(reloaded(x), transferred(x))


@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_shift_delays_output_by_m_d(case: dict) -> None:
    """Shift transfer: y'_t = y_{t-m·d} for every t >= m·d, for zero and replicate padding alike
    (both convs then read the same padded frames). Bit-exact on CPU in practice; asserted up to
    float64 reassociation since conv backends do not promise it."""
    conv, time_axis = case["conv"].double(), case["time_axis"]
    causal = make_causal_conv(conv, time_axis=time_axis, transfer="shift")
    dim = 2 + time_axis
    delay = conv.dilation[time_axis] * (conv.kernel_size[time_axis] - 1) // 2
    shape = list(case["shape"])
    shape[dim] = max(shape[dim], delay + 1)
    x = torch.randn(shape, dtype=torch.float64)
    frames = shape[dim]
    with torch.no_grad():
        y, y_causal = conv(x), causal(x)
    torch.testing.assert_close(
        y_causal.narrow(dim, delay, frames - delay), y.narrow(dim, 0, frames - delay), rtol=1e-12, atol=1e-12
    )


def test_non_first_time_axis() -> None:
    conv = nn.Conv3d(2, 3, (1, 1, 3), padding=(0, 0, 1))
    causal = make_causal_conv(conv, time_axis=2)
    assert causal.padding == (0, 0, 0) and causal.left_pad == 2 and causal.time_axis == 2
    x = torch.randn(1, 2, 4, 4, 6)
    with torch.no_grad():
        y = causal(x)
        y2 = causal(_perturb_from(x, 4, 3, torch.Generator().manual_seed(0)))
    assert y.shape == conv(x).shape
    assert torch.equal(y[..., :3], y2[..., :3]) and not torch.equal(y[..., 3:], y2[..., 3:])


def test_conv2d_over_frames_by_tokens() -> None:
    """Sana-Video's Conv2d((3, 1)) over (B, C, T, H·W)."""
    conv = nn.Conv2d(4, 4, (3, 1), padding=(1, 0))
    causal = make_causal_conv(conv)
    assert isinstance(causal, CausalConv2d) and causal.padding == (0, 0)
    x = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        assert causal(x).shape == x.shape


def test_replicate_padding_repeats_first_frame() -> None:
    conv = nn.Conv1d(2, 3, 5, padding=4, dilation=2, padding_mode="replicate")
    causal = make_causal_conv(conv, transfer="masked")
    x = torch.randn(1, 2, 6)
    padded = torch.cat([x[..., :1].expand(1, 2, 8), x], dim=-1)
    expected = F.conv1d(padded, causal.weight, causal.bias, dilation=2)
    with torch.no_grad():
        torch.testing.assert_close(causal(x), expected)


def test_replicate_3d_with_spatial_padding() -> None:
    conv = nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate")
    causal = make_causal_conv(conv)
    x = torch.randn(1, 2, 5, 4, 4)
    time_padded = torch.cat([x[:, :, :1].expand(1, 2, 2, 4, 4), x], dim=2)
    full = F.pad(time_padded, (1, 1, 1, 1, 0, 0), mode="replicate")
    expected = F.conv3d(full, causal.weight, causal.bias)
    with torch.no_grad():
        torch.testing.assert_close(causal(x), expected)


def test_padding_same_string() -> None:
    conv = nn.Conv3d(2, 2, (5, 3, 3), padding="same", dilation=(2, 1, 1))
    causal = make_causal_conv(conv, transfer="shift")
    assert causal.padding == (0, 1, 1) and causal.left_pad == 8
    x = torch.randn(1, 2, 9, 4, 4)
    with torch.no_grad():
        y, y_causal = conv(x), causal(x)
    torch.testing.assert_close(y_causal[:, :, 4:], y[:, :, :5])


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"), "future"),
        (nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular"), "future"),
        (nn.Conv3d(2, 2, (4, 1, 1), padding=(2, 0, 0)), "even"),
        (nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0), stride=(2, 1, 1)), "stride"),
        (nn.Conv3d(2, 2, (3, 1, 1), padding=(0, 0, 0)), "padding"),
        (nn.Conv3d(2, 2, (3, 1, 1), padding=(2, 0, 0)), "padding"),
        (nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0), dilation=(2, 1, 1)), "padding"),
        (nn.Conv3d(2, 2, (3, 1, 1), padding="valid"), "padding"),
        (nn.Conv2d(2, 2, (3, 2), padding="same"), "asymmetric"),
        (nn.Conv3d(2, 2, (1, 3, 3), padding=1), "padding"),
    ],
)
def test_refused(conv: nn.Module, match: str) -> None:
    problem = temporal_conv_problem(conv)
    assert problem is not None and match in problem
    with pytest.raises(ValueError, match=match):
        make_causal_conv(conv)


def test_refusals_for_type_axis_and_already_causal() -> None:
    conv = nn.Conv3d(2, 2, 3, padding=1)
    assert "time_axis" in temporal_conv_problem(conv, time_axis=3)
    with pytest.raises(ValueError, match="time_axis"):
        make_causal_conv(conv, time_axis=3)
    with pytest.raises(ValueError, match="transfer"):
        make_causal_conv(conv, transfer="mixed")
    with pytest.raises(ValueError, match="p="):
        make_causal_conv(conv, p=4)
    causal = make_causal_conv(conv)
    assert "already causal" in temporal_conv_problem(causal)
    with pytest.raises(ValueError, match="already causal"):
        make_causal_conv(causal)
    with pytest.raises(TypeError):
        make_causal_conv(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        CausalConv3d.from_module(nn.Conv2d(2, 2, 3, padding=1))
    assert "not an nn.Conv" in temporal_conv_problem(nn.ConvTranspose3d(2, 2, 3, padding=1))


def test_is_temporal_conv() -> None:
    assert is_temporal_conv(nn.Conv3d(2, 2, (3, 1, 1)))
    assert is_temporal_conv(nn.Conv3d(2, 2, (4, 1, 1)))  # temporal, though it cannot be converted
    assert not is_temporal_conv(nn.Conv3d(2, 2, (1, 3, 3)))
    assert is_temporal_conv(nn.Conv3d(2, 2, (1, 1, 3)), time_axis=2)
    assert not is_temporal_conv(nn.Conv3d(2, 2, 3), time_axis=3)
    assert not is_temporal_conv(nn.Linear(2, 2))


def test_frame_local_conv_converts_trivially() -> None:
    conv = nn.Conv3d(2, 2, (1, 3, 3), padding=(0, 1, 1))
    assert temporal_conv_problem(conv) is None
    causal = make_causal_conv(conv)
    x = torch.randn(1, 2, 3, 4, 4)
    with torch.no_grad():
        assert causal.left_pad == 0 and torch.equal(causal(x), conv(x))


def test_keeps_device_dtype_grad_training_and_hooks() -> None:
    conv = nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0), dtype=torch.float64).eval()
    conv.bias.requires_grad_(False)
    calls: list[int] = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    causal = make_causal_conv(conv)
    assert not causal.training and causal.weight.dtype == torch.float64
    assert causal.weight.device == conv.weight.device
    assert causal.weight.requires_grad and not causal.bias.requires_grad
    assert isinstance(causal.weight, nn.Parameter) and causal.weight is not conv.weight
    causal(torch.randn(1, 2, 3, 1, 1, dtype=torch.float64))
    assert calls == [1]
    assert conv.padding == (1, 0, 0)  # the original is left alone


def test_user_subclass_stays_instance() -> None:
    class MyConv3d(nn.Conv3d):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return super().forward(x) * scale

    conv = MyConv3d(2, 2, (3, 1, 1), padding=(1, 0, 0))
    a, b = make_causal_conv(conv), CausalConv3d.from_module(conv, transfer="masked")
    assert isinstance(a, MyConv3d) and isinstance(a, CausalConv3d)
    assert type(a) is type(b) and type(a).__name__ == "CausalMyConv3d"
    assert type(make_causal_conv(nn.Conv3d(2, 2, 3, padding=1))) is CausalConv3d
    x = torch.randn(1, 2, 4, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x, scale=2.0), 2 * a(x))


def test_meta_device() -> None:
    conv = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), device="meta")
    causal = make_causal_conv(conv)
    assert causal.weight.is_meta
    y = causal(torch.empty(2, 4, 5, 3, 3, device="meta"))
    assert y.shape == (2, 4, 5, 3, 3)


def test_direct_construction_and_repr() -> None:
    conv = CausalConv3d(2, 2, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1))
    assert conv.padding == (0, 0, 0) and conv.left_pad == 4 and conv.transfer is None
    with pytest.raises(ValueError, match="padding"):
        CausalConv3d(2, 2, (3, 1, 1))
    text = repr(make_causal_conv(nn.Conv1d(2, 2, 3, padding=1), transfer="masked"))
    for part in ("time_axis=0", "transfer='masked'", "p=2", "left_pad=2"):
        assert part in text
