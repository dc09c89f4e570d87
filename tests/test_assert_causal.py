"""assert_causal / assert_leaks on hand-written modules and on a registered tiny diffusers model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causalize.testing import CausalityCheckFailed, assert_causal, assert_leaks

C = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP spin contention (2 s vs 0.03 s a forward on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CausalConvTime(nn.Module):
    """Conv1d over time, left-padded: frame t sees frames t-k+1..t. Input (B, T, C)."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k
        self.conv = nn.Conv1d(C, C, k)

    def forward(self, x):
        h = F.pad(x.transpose(1, 2), (self.k - 1, 0))
        return self.conv(h).transpose(1, 2)


class SymmetricConvTime(nn.Module):
    """Conv1d over time padded on both sides: frame t sees t+1 (the leak)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, time_mix: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.time_mix = time_mix
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        return x + self.proj(self.time_mix(self.norm(x)))


class Net(nn.Module):
    """Per-frame Linear in, two residual blocks, per-frame Linear out. x: (B, T, C)."""

    def __init__(self, leaky: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(C, C)
        self.blocks = nn.ModuleList(
            [Block(CausalConvTime()), Block(SymmetricConvTime() if leaky else CausalConvTime(2))]
        )
        self.out = nn.Linear(C, C)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _x(frames: int = 5) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(1, frames, C, generator=torch.Generator().manual_seed(1))}


PLAIN = dict(frame_axes={"x": 1}, output_axis=1)


def test_causal_module_passes():
    report = assert_causal(Net(), _x(), **PLAIN)
    assert report.passed and report.matrix.shape == (5, 5)
    assert torch.all(report.matrix.triu(1) == 0) and torch.all(report.matrix.diagonal() > 0)


def test_inputs_may_be_a_function_of_frames():
    seen = []

    def make(frames):
        seen.append(frames)
        return _x(frames)

    report = assert_causal(Net(), make, frames=3, **PLAIN)
    assert seen == [3] and report.matrix.shape == (3, 3)


def test_leaky_module_fails_with_matrix_and_culprit():
    model = Net(leaky=True)
    with pytest.raises(AssertionError) as info:
        assert_causal(model, _x(), **PLAIN)
    msg = str(info.value)
    assert isinstance(info.value, CausalityCheckFailed)
    assert "LEAK" in msg and "out\\in" in msg and "!" in msg
    assert "blocks.1.time_mix.conv (Conv1d)" in msg
    report = info.value.report
    assert report.culprit["path"] == "blocks.1.time_mix.conv"
    # Only the immediate future leaks (kernel 3, padding 1): M[i, i+1] > 0, M[i, i+2] == 0.
    assert {(i, j) for i, j, _ in report.violations} == {(i, i + 1) for i in range(4)}
    # The model under test is untouched, and the negative control accepts it.
    assert model.blocks[1].time_mix.conv.padding == (1,)
    assert assert_leaks(model, _x(), **PLAIN).violations


def test_leaks_fails_on_a_causal_module():
    with pytest.raises(AssertionError, match="expected Net to leak"):
        assert_leaks(Net(), _x(), **PLAIN)


class PairMix(nn.Module):
    """Frames (0, 1), (2, 3), ... see each other and nothing else: causal with block size 2."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x):
        t = x.shape[1]
        h = F.pad(x, (0, 0, 0, t % 2))
        pair = h.unflatten(1, (-1, 2)).sum(2, keepdim=True).expand(-1, -1, 2, -1).flatten(1, 2)[:, :t]
        return x + self.lin(pair)


def test_block_size_semantics():
    report = assert_causal(PairMix(), _x(6), block_size=2, **PLAIN)
    assert report.block_size == 2 and report.matrix[0, 1] > 0 and report.matrix[1, 2] == 0
    with pytest.raises(AssertionError) as info:
        assert_causal(PairMix(), _x(6), block_size=1, **PLAIN)
    assert {(i, j) for i, j, _ in info.value.report.violations} == {(0, 1), (2, 3), (4, 5)}


class Delay(nn.Module):
    """out[t] = x[t-1]: causal, but perturbing frame t never moves output frame t."""

    def forward(self, x):
        return F.pad(x, (0, 0, 1, 0))[:, :-1]


class IgnoresInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return self.bias.expand_as(x).clone()


@pytest.mark.parametrize("module", [Delay(), IgnoresInput()], ids=["delay", "ignores-input"])
def test_ineffective_probe_fails(module):
    with pytest.raises(AssertionError, match="probe ineffective") as info:
        assert_causal(module, _x(4), **PLAIN)
    assert not info.value.report.violations
    # Not a leak either: the negative control refuses it too.
    with pytest.raises(AssertionError, match="expected .* to leak"):
        assert_leaks(module, _x(4), **PLAIN)


def test_explicit_forward_and_tuple_outputs():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x), "extra"

    assert_causal(TupleOut(), _x(), **PLAIN)  # first element of the tuple
    # A forward of its own: the output with its time axis moved last.
    assert_causal(Net(), _x(), frame_axes={"x": 1}, output_axis=2, forward=lambda m, kw: m(**kw).transpose(1, 2))


def test_usage_errors():
    with pytest.raises(TypeError, match="no registered causalize plan"):
        assert_causal(Net())
    with pytest.raises(TypeError, match="frame_axes"):
        assert_causal(Net(), _x())
    with pytest.raises(TypeError, match="output_axis"):
        assert_causal(Net(), _x(), frame_axes={"x": 1})
    with pytest.raises(KeyError, match="'y'"):
        assert_causal(Net(), _x(), frame_axes={"y": 1}, output_axis=1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        assert_causal(Net(), _x(1), **PLAIN)


def test_registered_tiny_diffusers_model():
    from causalize.api import convert_model
    from causalize.plugin_manager import registries

    plan = registries().plans.get("unet3d")
    model = plan.build_tiny()
    assert_leaks(model, frames=3)
    convert_model(model, plan)
    report = assert_causal(model, frames=3)
    assert report.matrix.shape == (3, 3)
