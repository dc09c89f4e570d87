"""The pass registry: name -> Pass class, validated at registration."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Literal, get_args, get_origin

from causalize.errors import UsageError
from causalize.passes.base import NAME_RE, Pass

_ALLOWED_SCALARS = (int, float, bool, str)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def option_type(cls: type[Pass], fld: dataclasses.Field) -> object:
    """The resolved annotation of an option field (annotations may be strings)."""
    hints = typing.get_type_hints(cls.Options)
    return hints[fld.name]


def _validate_option_types(cls: type[Pass]) -> None:
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"pass '{cls.name}': Options must be a dataclass")
    for fld in dataclasses.fields(cls.Options):
        if not NAME_RE.match(fld.name.replace("_", "-")):
            raise TypeError(f"pass '{cls.name}': option name '{fld.name}' is not lower_snake_case")
        tp = option_type(cls, fld)
        ok = tp in _ALLOWED_SCALARS or (
            get_origin(tp) is Literal and all(isinstance(a, (str, int)) for a in get_args(tp))
        )
        if not ok:
            raise TypeError(f"pass '{cls.name}': option '{fld.name}' has unsupported type {tp!r}")
        if fld.default is dataclasses.MISSING:
            raise TypeError(f"pass '{cls.name}': option '{fld.name}' needs a default")


class PassRegistry:
    """Holds the registered passes. Registration validates names, versions and option types."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}

    def register(self, cls: type[Pass]) -> type[Pass]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise TypeError(f"pass name {name!r} must be kebab-case, e.g. 'causal-temporal-conv'")
        if name in self._passes and self._passes[name] is not cls:
            raise ValueError(f"pass '{name}' is already registered by {self._passes[name].__module__}")
        if not isinstance(cls.version, int) or cls.version < 1:
            raise TypeError(f"pass '{name}': version must be a positive int")
        _validate_option_types(cls)
        self._passes[name] = cls
        return cls

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise UsageError(
                f"unknown pass '{name}'.{did_you_mean(name, self._passes)}",
                "run `causalize passes` to list them",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._passes)

    def __contains__(self, name: str) -> bool:
        return name in self._passes

    def __iter__(self):
        return iter(self._passes[n] for n in self.names())
