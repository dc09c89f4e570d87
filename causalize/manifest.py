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


#: The key causalize adds to a converted checkpoint's config.json. Plain diffusers loading does not
#: expect it and logs it in its "config attributes ... will be ignored" warning, so a user who loads
#: the folder with `from_pretrained` (a model that is NOT causal) sees why; causalize.load drops it.
CONFIG_MARKER = "causalize"
CONFIG_MARKER_TEXT = (
    "CAUSAL CHECKPOINT: load it with causalize.load(path); plain diffusers from_pretrained builds the "
    "stock, non-causal model from these weights (for temporal-conv models, one that is neither)"
)


def mark_config(directory: Path) -> None:
    """Add the marker to `directory/config.json` (written by diffusers' save_config)."""
    from causalize import fs

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[CONFIG_MARKER] = CONFIG_MARKER_TEXT
    fs.write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n", overwrite=True)


class SavesRecipe:
    """A converted model's `save_pretrained` (an instance attribute recorded by causalize.state,
    removed by `unconvert`): diffusers' own save, then causalize.json with the conversion's plan
    and pipeline beside the weights and the marker in config.json, so `causalize.load` of the saved
    folder gives the causal model back. Pipelines' `save_pretrained` calls it for their denoiser."""

    def __init__(self, model: Any, plan: str, pipelines: list[str]):
        self.model, self.plan, self.pipelines = model, plan, pipelines

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        from causalize import __version__

        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        manifest = Manifest(
            base_class=type(self.model).__name__,
            plan=self.plan,
            pipeline=",".join(self.pipelines),
            passes=[],
            causalize_version=__version__,
        )
        manifest.write(Path(save_directory))
        mark_config(Path(save_directory))
        return result
