"""Text pipelines: `pass-a{opt=v,opt2=w},pass-b`.

A pipeline parses against the registry (unknown passes and options are errors with a
"did you mean"), prints back identically for canonical text (no spaces), and is what the
manifest stores so a conversion can be replayed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from causalize.errors import UsageError
from causalize.passes.base import Pass
from causalize.passes.registry import PassRegistry, did_you_mean, option_type

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z0-9_.+\-]+)|(?P<punct>[{},=]))")


@dataclass(frozen=True)
class Step:
    """One pass invocation: its name and the options written explicitly, in the order written."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{k}={format_value(v)}" for k, v in self.options)
        return f"{self.name}{{{body}}}"

    def resolved(self, registry: PassRegistry) -> Any:
        """The pass's Options dataclass with defaults filled in."""
        return registry.get(self.name).Options(**dict(self.options))


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def replace_options(self, name: str, **options: Any) -> Pipeline:
        """A copy where step `name` has these options set (others kept)."""
        steps = []
        for s in self.steps:
            if s.name == name:
                merged = dict(s.options)
                merged.update(options)
                s = Step(name, tuple(merged.items()))
            steps.append(s)
        return Pipeline(tuple(steps))


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def coerce(cls: type[Pass], key: str, raw: str) -> Any:
    """Convert option text to the option's declared type, or raise a UsageError that says why."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    if key not in fields:
        hint = did_you_mean(key, fields) or f" Options of '{cls.name}': {', '.join(fields) or 'none'}."
        raise UsageError(f"pass '{cls.name}' has no option '{key}'.{hint}")
    tp = option_type(cls, fields[key])
    try:
        if get_origin(tp) is Literal:
            choices = get_args(tp)
            for c in choices:
                if str(c) == raw:
                    return c
            raise ValueError(f"expected one of {', '.join(map(str, choices))}.{did_you_mean(raw, map(str, choices))}")
        if tp is bool:
            if raw not in ("true", "false"):
                raise ValueError("expected true or false")
            return raw == "true"
        if tp is int:
            value = int(raw)
            if not -(2**63) <= value < 2**63:  # torch takes int64: a larger value would crash later
                raise ValueError("out of range (a 64-bit integer)")
            return value
        if tp is float:
            return float(raw)
        return raw
    except ValueError as exc:
        raise UsageError(
            f"bad value '{raw}' for option '{key}' of pass '{cls.name}': {exc}",
            "run `causalize passes` to list the options and their values",
        ) from None


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UsageError(f"pipeline: unexpected character {text[pos]!r} at position {pos} in {text!r}")
        out.append(m.group("name") or m.group("punct"))
        pos = m.end()
    return out


def parse(text: str, registry: PassRegistry) -> Pipeline:
    """Parse and validate a pipeline against the registry."""
    toks = _tokens(text)
    if not toks:
        raise UsageError("pipeline is empty", "name at least one pass, e.g. 'causal-temporal-attention'")
    steps: list[Step] = []
    i = 0

    def expect(what: str) -> str:
        nonlocal i
        if i >= len(toks):
            raise UsageError(f"pipeline {text!r}: expected {what} at the end")
        tok = toks[i]
        i += 1
        return tok

    while True:
        name = expect("a pass name")
        if name in "{},=":
            raise UsageError(f"pipeline {text!r}: expected a pass name, found {name!r}")
        cls = registry.get(name)
        opts: list[tuple[str, Any]] = []
        if i < len(toks) and toks[i] == "{":
            i += 1
            while True:
                key = expect("an option name")
                if expect("'='") != "=":
                    raise UsageError(f"pipeline {text!r}: expected '=' after option '{key}'")
                raw = expect("a value")
                if raw in "{},=":
                    raise UsageError(f"pipeline {text!r}: missing value for option '{key}'")
                if any(k == key for k, _ in opts):
                    raise UsageError(f"pipeline {text!r}: option '{key}' given twice for '{name}'")
                opts.append((key, coerce(cls, key, raw)))
                sep = expect("',' or '}'")
                if sep == "}":
                    break
                if sep != ",":
                    raise UsageError(f"pipeline {text!r}: expected ',' or '}}', found {sep!r}")
        steps.append(Step(name, tuple(opts)))
        if i == len(toks):
            break
        if expect("','") != ",":
            raise UsageError(f"pipeline {text!r}: expected ',' between passes, found {toks[i - 1]!r}")
    names = [s.name for s in steps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"pipeline {text!r}: pass '{sorted(dup)[0]}' appears twice")
    return Pipeline(tuple(steps))
