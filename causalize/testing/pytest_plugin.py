"""pytest plugin (entry point ``pytest11``): the ``causality`` fixture and the ``causal`` marker.

    def test_my_model_is_causal(causality):
        causality.check(model)                       # registered diffusers model
        causality.check(m, {"x": x}, frame_axes={"x": 1}, output_axis=1)
        causality.leaks(unconverted)                 # negative control

    @pytest.mark.causal(frames=6, tolerance=1e-6, block_size=2)
    def test_with_other_settings(causality): ...

Settings, lowest to highest precedence: defaults (frames 4, tolerance 0), the command line
(``--causalize-frames``, ``--causalize-tolerance``, ``--causalize-seed``), the ``causal`` marker,
keyword arguments of ``check`` / ``leaks``. A failed check raises an AssertionError whose message
holds the verdict, the influence matrix and the leaking module, which is what pytest prints.

This module is loaded in every pytest run of an environment where causalize is installed, so it
imports neither torch nor diffusers: they are imported when a check runs.
"""

from __future__ import annotations

from typing import Any

import pytest

DEFAULT_FRAMES = 4
DEFAULT_TOLERANCE = 0.0
DEFAULT_SEED = 0
MARKER_KWARGS = ("frames", "tolerance", "block_size", "seed")
_REPORTS_KEY = pytest.StashKey[list]()


class Causality:
    """What the ``causality`` fixture returns: assert_causal / assert_leaks with this test's settings."""

    def __init__(
        self,
        frames: int = DEFAULT_FRAMES,
        tolerance: float = DEFAULT_TOLERANCE,
        block_size: int | None = None,
        seed: int = DEFAULT_SEED,
        reports: list | None = None,
    ):
        self.frames = frames
        self.tolerance = tolerance
        self.block_size = block_size
        self.seed = seed
        self.reports: list = [] if reports is None else reports

    def settings(self, **overrides: Any) -> dict[str, Any]:
        kw = {"frames": self.frames, "tolerance": self.tolerance, "seed": self.seed}
        if self.block_size is not None:
            kw["block_size"] = self.block_size
        kw.update(overrides)
        return kw

    def check(self, model: Any, inputs: Any = None, **kw: Any):
        """`causalize.testing.assert_causal` with this test's settings; returns the report."""
        __tracebackhide__ = True
        from causalize.testing.asserts import assert_causal

        return self._run(assert_causal, model, inputs, kw)

    def leaks(self, model: Any, inputs: Any = None, **kw: Any):
        """`causalize.testing.assert_leaks` (negative control) with this test's settings."""
        __tracebackhide__ = True
        from causalize.testing.asserts import assert_leaks

        return self._run(assert_leaks, model, inputs, kw)

    def _run(self, fn, model, inputs, kw):
        __tracebackhide__ = True
        try:
            report = fn(model, inputs, **self.settings(**kw))
        except AssertionError as exc:
            report = getattr(exc, "report", None)
            if report is not None:
                self.reports.append((fn.__name__, report))
            raise
        self.reports.append((fn.__name__, report))
        return report

    def __repr__(self) -> str:
        return (
            f"Causality(frames={self.frames}, tolerance={self.tolerance}, "
            f"block_size={self.block_size}, seed={self.seed})"
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("causalize", "causality checks (causalize)")
    group.addoption(
        "--causalize-frames",
        type=int,
        default=None,
        metavar="N",
        dest="causalize_frames",
        help=f"frames of the example inputs of the 'causality' fixture (default {DEFAULT_FRAMES})",
    )
    group.addoption(
        "--causalize-tolerance",
        type=float,
        default=None,
        metavar="X",
        dest="causalize_tolerance",
        help="largest |change| of a past output frame still counted as no influence (default 0: exact)",
    )
    group.addoption(
        "--causalize-seed",
        type=int,
        default=None,
        metavar="S",
        dest="causalize_seed",
        help=f"seed of the example inputs and perturbations (default {DEFAULT_SEED})",
    )


def pytest_configure(config: pytest.Config) -> None:
    frames = config.getoption("causalize_frames", None)
    if frames is not None and frames < 2:
        raise pytest.UsageError(f"--causalize-frames must be at least 2, got {frames}")
    tolerance = config.getoption("causalize_tolerance", None)
    if tolerance is not None and not tolerance >= 0:
        raise pytest.UsageError(f"--causalize-tolerance must be >= 0, got {tolerance}")
    config.addinivalue_line(
        "markers",
        "causal(frames=None, tolerance=None, block_size=None, seed=None): settings of the 'causality' "
        "fixture for this test (override --causalize-frames / --causalize-tolerance)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    from causalize import __version__  # the package __init__ is import-light

    return f"causalize {__version__}: causality checks available (fixture 'causality', marker 'causal')"


def _settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    opt = request.config.getoption
    frames = opt("causalize_frames", None)
    tolerance = opt("causalize_tolerance", None)
    seed = opt("causalize_seed", None)
    kw: dict[str, Any] = {
        "frames": DEFAULT_FRAMES if frames is None else frames,
        "tolerance": DEFAULT_TOLERANCE if tolerance is None else tolerance,
        "seed": DEFAULT_SEED if seed is None else seed,
        "block_size": None,
    }
    marker = request.node.get_closest_marker("causal")
    if marker is not None:
        if marker.args:
            pytest.fail(
                f"@pytest.mark.causal takes keyword arguments only ({', '.join(MARKER_KWARGS)}), got {marker.args!r}",
                pytrace=False,
            )
        unknown = sorted(set(marker.kwargs) - set(MARKER_KWARGS))
        if unknown:
            pytest.fail(
                f"unknown @pytest.mark.causal argument(s) {unknown}; expected {', '.join(MARKER_KWARGS)}", pytrace=False
            )
        kw.update(marker.kwargs)
    if kw["frames"] < 2:
        pytest.fail(f"causality checks need at least 2 frames, got {kw['frames']}", pytrace=False)
    return kw


@pytest.fixture
def causality(request: pytest.FixtureRequest) -> Causality:
    """Causality assertions (``.check``, ``.leaks``) with the command line and ``causal`` marker applied."""
    reports = request.node.stash.setdefault(_REPORTS_KEY, [])
    return Causality(reports=reports, **_settings(request))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Record each check's verdict as a user property (shows up in --junitxml)."""
    rep = yield
    if call.when == "call":
        for kind, report in item.stash.get(_REPORTS_KEY, []):
            rep.user_properties.append((f"causalize.{kind}", report.summary()))
    return rep
