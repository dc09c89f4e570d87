"""Committed benchmark records are written by ``benchmarks._common.record_text``: the same content
as ``json.dumps`` gives, with lists of plain values on one line (records travel with every device
call, which sends at most 64 MiB)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks._common import record_text  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
_keys = st.text(max_size=4) | st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none()
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values, st.sampled_from([1, 2]))
def test_a_record_holds_what_json_dumps_holds(value, indent) -> None:
    # compared as JSON text after one load: NaN is not equal to itself as a float
    expected = json.dumps(json.loads(json.dumps(value)))
    assert json.dumps(json.loads(record_text(value, indent=indent))) == expected
    assert record_text(value, indent=indent).endswith("\n")


def test_lists_of_plain_values_take_one_line_and_nesting_stays_indented() -> None:
    record = {"curve": [1.5, 2.0, float("nan")], "rows": [{"name": "a", "psnr": [30.1, 29.4]}], "empty": {}}
    text = record_text(record)
    assert text == (
        '{\n "curve": [1.5, 2.0, NaN],\n "rows": [\n  {\n   "name": "a",\n   "psnr": [30.1, 29.4]\n  }\n ],\n'
        ' "empty": {}\n}\n'
    )
    # control: the indented json.dumps this replaces takes a line per number, and so more bytes
    plain = json.dumps(record, indent=1) + "\n"
    assert plain.count("\n") > text.count("\n") and len(plain) > len(text)


def test_json_dumps_options_reach_the_values() -> None:
    with pytest.raises(ValueError):
        record_text({"x": [math.inf]}, allow_nan=False)
    assert json.loads(record_text({"p": Path("a/b")}, default=str)) == {"p": "a/b"}
    with pytest.raises(TypeError):
        record_text({"p": Path("a/b")})
    with pytest.raises(TypeError):
        record_text({"a": 1}, sort_keys=True)  # an option it would not honour is refused, not ignored
    for indent in (None, -1, True):
        with pytest.raises(ValueError, match="indent"):
            record_text({"a": 1}, indent=indent)


def _indent(text: str) -> int:
    second = text.split("\n")[1]
    return len(second) - len(second.lstrip(" "))


def test_the_committed_records_are_written_this_way() -> None:
    """Every committed record (not diffusers' model configs) is exactly what record_text writes of
    its content: so a writer left on the old indented dump shows here once its output is committed."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    other = []
    for path in sorted(results.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if path.name == "config.json" or text.count("\n") < 2:  # diffusers' own, or one line
            continue
        if record_text(json.loads(text), indent=_indent(text)) != text:
            other.append(str(path.relative_to(results)))
    assert not other, other


def test_negative_control_an_indented_dump_is_not_a_record() -> None:
    record = {"curve": [1.0, 2.0], "rows": [{"a": [3]}]}
    old = json.dumps(record, indent=1) + "\n"
    assert record_text(json.loads(old), indent=_indent(old)) != old
