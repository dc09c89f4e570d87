"""Pass registry and text pipelines: validation, round trips, helpful errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.errors import UsageError
from causalize.passes.base import Pass
from causalize.passes.pipeline import Pipeline, Step, parse
from causalize.passes.registry import PassRegistry
from causalize.plugin_manager import registries


@pytest.fixture(scope="module")
def reg() -> PassRegistry:
    return registries().passes


def test_builtin_passes_registered(reg):
    assert {"causal-temporal-conv", "causal-temporal-attention", "causal-norm"} <= set(reg.names())


@pytest.mark.parametrize(
    "text",
    [
        "causal-temporal-conv",
        "causal-temporal-conv{transfer=masked}",
        "causal-temporal-conv{transfer=extrapolative,p=3},causal-temporal-attention,causal-norm{mode=cumulative}",
        "causal-temporal-attention{block_size=2}",
        "causal-norm{mode=per-frame},causal-temporal-conv{p=2,transfer=shift}",
    ],
)
def test_round_trip(reg, text):
    pipe = parse(text, reg)
    assert str(pipe) == text
    assert parse(str(pipe), reg) == pipe


def test_whitespace_is_normalised(reg):
    assert str(parse(" causal-norm { mode = cumulative } , causal-temporal-attention ", reg)) == (
        "causal-norm{mode=cumulative},causal-temporal-attention"
    )


def test_options_are_typed_and_defaulted(reg):
    step = parse("causal-temporal-conv{p=3}", reg).steps[0]
    opts = step.resolved(reg)
    assert opts.p == 3 and isinstance(opts.p, int)
    assert opts.transfer == "extrapolative"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("causal-temporal-atention", "Did you mean 'causal-temporal-attention'"),
        ("causal-norm{mdoe=cumulative}", "Did you mean 'mode'"),
        ("causal-norm{mode=cumulativ}", "Did you mean 'cumulative'"),
        ("causal-temporal-conv{p=two}", "bad value 'two'"),
        ("causal-temporal-conv{p=2", "expected"),
        ("causal-norm,causal-norm", "appears twice"),
        ("causal-norm{mode=per-frame,mode=cumulative}", "given twice"),
        ("", "empty"),
        ("causal-norm;x", "unexpected character"),
        ("causal-norm{=x}", "expected"),
    ],
)
def test_errors(reg, text, fragment):
    with pytest.raises(UsageError) as exc:
        parse(text, reg)
    assert fragment in str(exc.value)


_NAMES = st.sampled_from(["causal-temporal-conv", "causal-temporal-attention", "causal-norm"])


@st.composite
def pipelines(draw):
    names = draw(st.lists(_NAMES, min_size=1, max_size=3, unique=True))
    parts = []
    for n in names:
        opts = []
        if n == "causal-temporal-conv":
            if draw(st.booleans()):
                opts.append(f"transfer={draw(st.sampled_from(['shift', 'masked', 'extrapolative']))}")
            if draw(st.booleans()):
                opts.append(f"p={draw(st.integers(1, 7))}")
        elif n == "causal-norm" and draw(st.booleans()):
            opts.append(f"mode={draw(st.sampled_from(['per-frame', 'cumulative']))}")
        elif n == "causal-temporal-attention" and draw(st.booleans()):
            opts.append(f"block_size={draw(st.integers(1, 8))}")
        if draw(st.booleans()):
            opts.reverse()
        parts.append(n + ("{" + ",".join(opts) + "}" if opts else ""))
    return ",".join(parts)


@settings(max_examples=200, deadline=None)
@given(pipelines())
def test_round_trip_property(text):
    reg = registries().passes
    pipe = parse(text, reg)
    assert str(pipe) == text
    assert parse(str(pipe), reg) == pipe


def test_replace_options(reg):
    pipe = parse("causal-temporal-conv,causal-norm", reg).replace_options("causal-norm", mode="cumulative")
    assert str(pipe) == "causal-temporal-conv,causal-norm{mode=cumulative}"
    assert isinstance(pipe, Pipeline) and pipe.steps[1] == Step("causal-norm", (("mode", "cumulative"),))


class _Good(Pass):
    name = "my-pass"

    @dataclass(frozen=True)
    class Options:
        k: int = 1
        how: Literal["a", "b"] = "a"


def test_registration_validates():
    r = PassRegistry()
    r.register(_Good)
    assert "my-pass" in r
    r.register(_Good)  # idempotent for the same class

    class Clash(_Good):
        pass

    with pytest.raises(ValueError, match="already registered"):
        r.register(Clash)

    class BadName(_Good):
        name = "My_Pass"

    with pytest.raises(TypeError, match="kebab-case"):
        r.register(BadName)

    class BadType(_Good):
        name = "bad-type"

        @dataclass(frozen=True)
        class Options:
            k: list = None

    with pytest.raises(TypeError, match="unsupported type"):
        r.register(BadType)

    class NoDefault(_Good):
        name = "no-default"

        @dataclass(frozen=True)
        class Options:
            k: int

    with pytest.raises(TypeError, match="needs a default"):
        r.register(NoDefault)
