"""`causalize.json`: the recipe saved next to the weights, so a load can replay the conversion.

Loading builds the base structure from config.json, replays the pipeline stored here (module and
processor swaps keep parameter names), then assigns the saved weights.

The file is untrusted input: `read` type-checks every field (a wrong type is a CheckpointError
naming the file and the field, never a crash), and `causalize.api.load` checks it against the
checkpoint (base class, pipeline coverage, tensor shapes) before building anything real.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from causalize.errors import CheckpointError

MANIFEST = "causalize.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    base_class: str
    plan: str
    pipeline: str
    passes: list[dict[str, Any]]
    records: list[dict[str, str]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    source: str = ""
    causalize_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "causalize_version": self.causalize_version,
            "base_class": self.base_class,
            "plan": self.plan,
            "pipeline": self.pipeline,
            "passes": self.passes,
            "verification": self.verification,
            "source": self.source,
            "records": self.records,
        }

    def write(self, directory: Path) -> Path:
        """Strict JSON: a NaN or infinity anywhere is a ValueError, never an unreadable file."""
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{directory} has no {MANIFEST}: it is not a causalize checkpoint",
                "convert it first with `causalize convert`",
            ) from None
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path} is corrupt: {exc}", "re-run `causalize convert`") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is not a JSON object (it holds a {type(data).__name__})", _RECONVERT)
        version = _field(path, data, "format_version", int)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {version}, this causalize reads {FORMAT_VERSION}",
                "upgrade causalize" if version > FORMAT_VERSION else _RECONVERT,
            )
        return cls(
            base_class=_field(path, data, "base_class", str),
            plan=_field(path, data, "plan", str),
            pipeline=_field(path, data, "pipeline", str),
            passes=_field(path, data, "passes", list, items=dict),
            records=_field(path, data, "records", list, items=dict, default=[]),
            verification=_field(path, data, "verification", dict, default=None, nullable=True),
            source=_field(path, data, "source", str, default=""),
            causalize_version=_field(path, data, "causalize_version", str, default=""),
        )

    def declares_leak(self) -> bool:
        """True when the recorded verification failed (written with --allow-leak): the checkpoint
        says itself that it is not causal."""
        return isinstance(self.verification, dict) and self.verification.get("passed") is False


_RECONVERT = "re-run `causalize convert`"
_MISSING = object()


def _field(
    path: Path,
    data: dict[str, Any],
    name: str,
    kind: type,
    *,
    items: type | None = None,
    default: Any = _MISSING,
    nullable: bool = False,
) -> Any:
    """data[name], checked to be a `kind` (a list: of `items`); bool never passes for int."""
    if name not in data:
        if default is _MISSING:
            raise CheckpointError(f"{path} lacks field '{name}'", _RECONVERT)
        return default
    value = data[name]
    if value is None and nullable:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and items is not None:
        ok = all(isinstance(v, items) for v in value)
    if not ok:
        want = f"a list of {_KINDS[items][1]}" if items is not None else _KINDS[kind][0]
        raise CheckpointError(f"{path}: field '{name}' must be {want}, got {_preview(value)}", _RECONVERT)
    return value


_KINDS = {
    int: ("an integer", "integers"),
    str: ("a string", "strings"),
    list: ("a list", "lists"),
    dict: ("a JSON object", "JSON objects"),
}


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def is_converted(directory: Path) -> bool:
    return (Path(directory) / MANIFEST).exists()
