"""Causal GroupNorm (METHOD.md §5): per-frame and cumulative statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from causalize.modules.causal_norm import MODES, CausalGroupNorm


def _group_norm(groups: int = 4, channels: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.GroupNorm:
    gn = nn.GroupNorm(groups, channels, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(channels, generator=gen))
        gn.bias.copy_(torch.randn(channels, generator=gen))
    return gn


def _per_frame_reference(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    return gn(frames).reshape(b, t, c, h, w).transpose(1, 2)


def _cumulative_reference(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """Float64, frame by frame: stock statistics over the prefix 0..t."""
    xd = x.double()
    b, c, t = xd.shape[:3]
    groups = xd.reshape(b, gn.num_groups, c // gn.num_groups, t, -1)
    out = []
    for frame in range(t):
        prefix = groups[:, :, :, : frame + 1]
        var, mean = torch.var_mean(prefix, dim=(2, 3, 4), correction=0, keepdim=True)
        out.append((groups[:, :, :, frame : frame + 1] - mean) / torch.sqrt(var + gn.eps))
    y = torch.cat(out, dim=3).reshape(xd.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * gn.weight.double().reshape(shape) + gn.bias.double().reshape(shape)


@given(
    history=st.integers(1, 7),
    chunk=st.integers(1, 3),
    new=st.integers(1, 3),
    cut=st.data(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None)
def test_dropped_frames_leave_the_statistics(history, chunk, new, cut, seed) -> None:
    """A rolling cache drops old frames from a cumulative norm's statistics (`NormCarry.drop`): the
    next frames are then normalised as if only the kept frames had come before them (float64
    reference on the kept frames). Negative control: with the statistics not dropped they are not
    (the dropped frames are offset, so their statistics differ)."""
    first = cut.draw(st.integers(0, history - 1))
    stop = cut.draw(st.integers(first + 1, history))
    norm = CausalGroupNorm.from_module(_group_norm(dtype=torch.float64, seed=seed % 7), mode="cumulative")
    x = torch.randn(2, 8, history + new, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, :, first:stop] += 3.0
    carry = None
    with torch.no_grad():
        for start in range(0, history, chunk):  # the history arrives over several calls
            _, carry = norm.cumulative_with(x[:, :, start : min(start + chunk, history)], carry)
        carry.frames = list(range(history))  # the global ids a streaming cache records
        kept = carry.drop(first, stop)
        assert kept.frames == [f for f in range(history) if not first <= f < stop] and kept.count == len(kept.frames)
        y, _ = norm.cumulative_with(x[:, :, history:], kept)
        reference = _cumulative_reference(norm, torch.cat([x[:, :, :first], x[:, :, stop:]], dim=2))
        torch.testing.assert_close(y, reference[:, :, -new:], rtol=0, atol=1e-9)
        stale, _ = norm.cumulative_with(x[:, :, history:], carry)
    assert (stale - reference[:, :, -new:]).abs().max() > 1e-3


def test_per_frame_equals_stock_on_frames() -> None:
    gn = _group_norm()
    norm = CausalGroupNorm.from_module(gn, mode="per-frame")
    x = torch.randn(2, 8, 5, 4, 3)
    with torch.no_grad():
        assert torch.equal(norm(x), _per_frame_reference(gn, x))


def test_cumulative_endpoints() -> None:
    gn = _group_norm()
    per_frame = CausalGroupNorm.from_module(gn, mode="per-frame")
    cumulative = CausalGroupNorm.from_module(gn, mode="cumulative")
    x = torch.randn(2, 8, 6, 4, 4) + torch.linspace(0, 3, 6).reshape(1, 1, 6, 1, 1)
    with torch.no_grad():
        y = cumulative(x)
        torch.testing.assert_close(y[:, :, 0], per_frame(x)[:, :, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(y[:, :, -1], gn(x)[:, :, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(y, _cumulative_reference(gn, x).float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_cumulative_stable_with_large_offset(offset: float) -> None:
    gn = _group_norm()
    norm = CausalGroupNorm.from_module(gn, mode="cumulative")
    x = offset + torch.randn(2, 8, 6, 4, 4) + torch.linspace(0, 1, 6).reshape(1, 1, 6, 1, 1)
    with torch.no_grad():
        y = norm(x)
    # The naive S2/N - μ² in fp32 is off by O(1) here (ulp(offset²) >> variance).
    torch.testing.assert_close(y.double(), _cumulative_reference(gn, x), rtol=0, atol=1e-4)


def test_float64_accumulates_in_float64() -> None:
    gn = _group_norm(dtype=torch.float64)
    norm = CausalGroupNorm.from_module(gn, mode="cumulative")
    x = torch.randn(1, 8, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        y = norm(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _cumulative_reference(gn, x), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    groups=st.sampled_from([1, 2, 4]),
    frames=st.integers(1, 7),
    spatial=st.lists(st.integers(1, 3), min_size=2, max_size=2),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal(mode: str, groups: int, frames: int, spatial: list[int], affine: bool, seed: int) -> None:
    gn = nn.GroupNorm(groups, 8, affine=affine)
    norm = CausalGroupNorm.from_module(gn, mode=mode)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, frames, *spatial, generator=gen)
    with torch.no_grad():
        y = norm(x)
        assert y.shape == x.shape
        for j in range(frames):
            x2 = x.clone()
            x2[:, :, j:] = 100 * torch.randn(x2[:, :, j:].shape, generator=gen)
            assert torch.equal(norm(x2)[:, :, :j], y[:, :, :j]), f"frames < {j} moved ({mode})"


@pytest.mark.parametrize("mode", MODES)
def test_time_dim_elsewhere(mode: str) -> None:
    gn = _group_norm()
    x = torch.randn(2, 8, 4, 3, 5)  # (B, C, H, W, T)
    norm = CausalGroupNorm.from_module(gn, mode=mode, time_dim=-1)
    reference = CausalGroupNorm.from_module(gn, mode=mode)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x.movedim(-1, 2)).movedim(2, -1))


@pytest.mark.parametrize("mode", MODES)
def test_4d_falls_through_to_stock(mode: str) -> None:
    gn = _group_norm()
    norm = CausalGroupNorm.from_module(gn, mode=mode)
    x = torch.randn(6, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(norm(x), gn(x))


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_and_attributes_kept(affine: bool) -> None:
    gn = nn.GroupNorm(2, 4, eps=1e-3, affine=affine, dtype=torch.float64).eval()
    if affine:
        gn.bias.requires_grad_(False)
    norm = CausalGroupNorm.from_module(gn, mode="cumulative")
    assert list(norm.state_dict()) == list(gn.state_dict())
    for key, value in gn.state_dict().items():
        assert torch.equal(norm.state_dict()[key], value)
    assert (norm.eps, norm.affine, norm.num_groups, norm.training) == (1e-3, affine, 2, False)
    if affine:
        assert norm.weight.dtype == torch.float64 and norm.weight.requires_grad
        assert not norm.bias.requires_grad and norm.weight is not gn.weight
    else:
        assert norm.weight is None and norm.bias is None
    assert "mode='cumulative'" in repr(norm) and "time_dim=2" in repr(norm)


def test_user_subclass_and_meta() -> None:
    class MyNorm(nn.GroupNorm):
        pass

    norm = CausalGroupNorm.from_module(MyNorm(2, 4), mode="cumulative")
    assert isinstance(norm, MyNorm) and isinstance(norm, CausalGroupNorm)
    assert type(norm) is type(CausalGroupNorm.from_module(MyNorm(2, 4)))
    assert type(CausalGroupNorm.from_module(nn.GroupNorm(2, 4))) is CausalGroupNorm
    meta = CausalGroupNorm.from_module(nn.GroupNorm(2, 4, device="meta"))
    assert meta.weight.is_meta


def test_weight_without_bias() -> None:
    # GroupNorm(bias=False) exists on torch 2.13, not on 2.11 (the GPU machine's): a bias removed by hand runs on both
    gn = nn.GroupNorm(2, 4)
    gn.register_parameter("bias", None)
    with torch.no_grad():
        gn.weight.normal_()
    norm = CausalGroupNorm.from_module(gn, mode="cumulative")
    x = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(norm(x)[:, :, -1], gn(x)[:, :, -1], rtol=0, atol=1e-5)


def test_bad_arguments() -> None:
    gn = nn.GroupNorm(2, 4)
    with pytest.raises(ValueError, match="per-frame, cumulative"):
        CausalGroupNorm.from_module(gn, mode="keep")
    with pytest.raises(ValueError, match="time_dim"):
        CausalGroupNorm.from_module(gn, time_dim=1)
    with pytest.raises(TypeError):
        CausalGroupNorm.from_module(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="already causal"):
        CausalGroupNorm.from_module(CausalGroupNorm.from_module(gn))
