"""`causalize.json`: the recipe saved next to the weights, so a load can replay the conversion.

Loading builds the base structure from config.json, replays the pipeline stored here (module and
processor swaps keep parameter names), then assigns the saved weights.
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
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
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
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is corrupt: {exc}", "re-run `causalize convert`") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {data.get('format_version')}, this causalize reads {FORMAT_VERSION}",
                "upgrade causalize",
            )
        try:
            return cls(
                base_class=data["base_class"],
                plan=data["plan"],
                pipeline=data["pipeline"],
                passes=data["passes"],
                records=data.get("records", []),
                verification=data.get("verification"),
                source=data.get("source", ""),
                causalize_version=data.get("causalize_version", ""),
            )
        except KeyError as exc:
            raise CheckpointError(f"{path} lacks field {exc}", "re-run `causalize convert`") from None


def is_converted(directory: Path) -> bool:
    return (Path(directory) / MANIFEST).exists()
