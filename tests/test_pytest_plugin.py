"""The pytest plugin, through pytester: fixture, marker, options, header, failure output.

The plugin is not passed with -p: these runs rely on the pytest11 entry point of the installed
package, so they also check that the entry point is wired. Runs are in-process (torch is already
imported by then, which keeps them fast); the import-lightness check uses a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEADER = "causalize 0.1.0: causality checks available (fixture 'causality', marker 'causal')"

MODULES = '''
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

C = 3


class TimeConv(nn.Module):
    """Conv1d over the time axis of (B, T, C); causal = left padding only."""

    def __init__(self, causal):
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv1d(C, C, 3)

    def forward(self, x):
        h = x.transpose(1, 2)
        h = F.pad(h, (2, 0) if self.causal else (1, 1))
        return self.conv(h).transpose(1, 2)


class Net(nn.Module):
    def __init__(self, causal=True):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(C, C)
        self.stages = nn.ModuleList([TimeConv(True), TimeConv(causal)])
        self.out = nn.Linear(C, C)

    def forward(self, x):
        h = self.inp(x)
        for s in self.stages:
            h = h + s(h)
        return self.out(h)


class ExactlySix(Net):
    def forward(self, x):
        assert x.shape[1] == 6, f"ExactlySix got {x.shape[1]} frames"
        return super().forward(x)


def frames_of(n):
    return {"x": torch.randn(1, n, C, generator=torch.Generator().manual_seed(0))}


PLAIN = dict(frame_axes={"x": 1}, output_axis=1)
'''


@pytest.fixture(scope="module")
def _warm():
    """Import everything a check imports before the in-process runs.

    pytester restores sys.modules after each in-process run, dropping modules first imported
    inside it; re-importing torch's extension modules in a later run can crash the interpreter.
    Running one leaky check here (with localisation) imports them all up front.
    """
    import torch

    from causalize.testing import assert_leaks

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: avoids OpenMP spin contention on a busy machine

    def forward(model, kw):
        return model(kw["x"] + kw["x"].mean(1, keepdim=True))

    assert_leaks(
        torch.nn.Linear(2, 2),
        {"x": torch.randn(1, 3, 2)},
        frame_axes={"x": 1},
        output_axis=1,
        forward=forward,
        localize=True,
    )
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _autoload(monkeypatch, _warm):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


def _write(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_models=MODULES + textwrap.dedent(body))


def test_plugin_import_is_light():
    code = (
        "import sys, causalize.testing, causalize.testing.pytest_plugin as p\n"
        "heavy = [m for m in ('torch', 'diffusers', 'causalize.api', 'causalize.testing.asserts') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(p.causality) and hasattr(p, 'pytest_report_header')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fixture_passes_fails_and_shows_matrix_and_culprit(pytester: pytest.Pytester):
    _write(
        pytester,
        """
        def test_defaults(causality):
            assert (causality.frames, causality.tolerance, causality.block_size) == (4, 0.0, None)

        def test_causal(causality):
            report = causality.check(Net(), frames_of(causality.frames), **PLAIN)
            assert report.passed

        def test_leaky(causality):
            causality.check(Net(causal=False), frames_of(5), **PLAIN)

        def test_negative_control(causality):
            causality.leaks(Net(causal=False), frames_of(5), **PLAIN)

        def test_inputs_from_frames(causality):
            assert causality.check(Net(), frames_of, **PLAIN).matrix.shape == (4, 4)
    """,
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=4, failed=1)
    out = result.stdout.str()
    assert HEADER in out
    result.stdout.fnmatch_lines(
        [
            "*test_leaky*",
            "*CausalityCheckFailed: Net is not causal: LEAK: output frame * moves by * when input frame * changes*",
            "*out\\in *0 *1 *2 *3 *4",
            "*culprit: stages.1 (TimeConv)*",
        ]
    )
    assert "!" in out
    # Every check's verdict is a user property of its test report (shown by --junitxml).
    props = {
        r.nodeid.split("::")[-1]: r.user_properties
        for r in result.reprec.getreports("pytest_runtest_logreport")
        if r.when == "call"
    }
    assert props["test_causal"] == [("causalize.assert_causal", props["test_causal"][0][1])]
    assert props["test_causal"][0][1].startswith("causal:")
    assert props["test_leaky"][0][1].startswith("LEAK")
    assert props["test_defaults"] == []


def test_marker_overrides_and_strict_markers(pytester: pytest.Pytester):
    _write(
        pytester,
        """
        @pytest.mark.causal(frames=6, tolerance=1e-3, block_size=2, seed=3)
        def test_marker_settings(causality):
            assert (causality.frames, causality.tolerance, causality.block_size, causality.seed) == (6, 1e-3, 2, 3)

        @pytest.mark.causal(frames=6)
        def test_six_frames(causality):
            causality.check(ExactlySix(), frames_of, **PLAIN)

        def test_default_frames_are_not_six(causality):
            causality.check(ExactlySix(), frames_of, **PLAIN)

        @pytest.mark.causal(frames=6)
        class TestClassMarker:
            def test_six(self, causality):
                causality.check(ExactlySix(), frames_of, **PLAIN)

        @pytest.mark.causal(block_size=2)
        def test_block_size_forgives_leaks_within_pairs(causality):
            # Kernel 3, padding 1 leaks one frame ahead: with blocks of 2, frame 0 may see 1 but 1 not 2.
            report = causality.leaks(Net(causal=False), frames_of(4), **PLAIN)
            assert {(i, j) for i, j, _ in report.violations} == {(1, 2)}

        @pytest.mark.causal(frame=6)
        def test_typo(causality):
            pass
    """,
    )
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=4, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_typo*",
            "*unknown @pytest.mark.causal argument(s) [[]'frame'[]]*",
            "*test_default_frames_are_not_six*",
            "*ExactlySix got 4 frames*",
        ]
    )
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.causal(frames=None, tolerance=None, block_size=None, seed=None):*"])


def test_command_line_options(pytester: pytest.Pytester):
    _write(
        pytester,
        """
        def test_options(causality):
            assert (causality.frames, causality.tolerance, causality.seed) == (6, 1e-6, 7)
            causality.check(ExactlySix(), frames_of, **PLAIN)

        @pytest.mark.causal(frames=3)
        def test_marker_beats_command_line(causality):
            assert (causality.frames, causality.tolerance) == (3, 1e-6)
    """,
    )
    result = pytester.runpytest("--causalize-frames", "6", "--causalize-tolerance", "1e-6", "--causalize-seed", "7")
    result.assert_outcomes(passed=2)
    result = pytester.runpytest("--causalize-frames", "1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--causalize-frames must be at least 2*"])
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*causality checks (causalize)*", "*--causalize-frames=N*", "*--causalize-tolerance=X*"]
    )


def test_plugin_can_be_disabled(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(causality): pass")
    result = pytester.runpytest("-p", "no:causalize")
    result.assert_outcomes(errors=1)
    assert HEADER not in result.stdout.str()
    result.stdout.fnmatch_lines(["*fixture 'causality' not found*"])
