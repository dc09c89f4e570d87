"""Shared assertions for the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, code: int, *needles: str) -> None:
    """Exit `code`; stderr is exactly `error: ...` plus at most a `hint: ...`; no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(("error: ", "hint: ")), result.stderr
    err_lines = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err_lines) == 1, result.stderr
    assert lines.index(err_lines[0]) >= len(lines) - 2, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
