"""Pipelines with several denoisers (Wan 2.2 A14B: a high-noise `transformer` and a low-noise
`transformer_2` expert): `causalize convert` converts every expert into OUT/NAME, or nothing.

Importing this module does not import torch (the CLI asks `pipeline_experts` first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalize.errors import UsageError

if TYPE_CHECKING:
    from causalize.api import ConvertReport, Progress


def pipeline_experts(src: str | os.PathLike, subfolder: str | None = None) -> list[str]:
    """The denoiser subfolders `convert` converts together: two or more in a pipeline directory given
    without --subfolder (Wan 2.2 A14B: transformer and transformer_2), else []."""
    from causalize import checkpoint

    if subfolder or (Path(src) / "config.json").exists():
        return []
    found = checkpoint.denoiser_subfolders(src)
    return found if len(found) > 1 else []


def convert_experts(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> list[ConvertReport]:
    """Convert every denoiser of a pipeline with several (Wan 2.2 A14B's high- and low-noise experts)
    into OUT/NAME, each with its own manifest and verification. OUT appears in one step, only when
    every expert converted and verified (or with `allow_leak`); otherwise nothing is written."""
    from causalize import fs
    from causalize.api import convert, say

    names = pipeline_experts(src)
    if not names:
        raise UsageError(f"{src} is not a pipeline with several denoisers")
    if dry_run:
        return [convert(src, Path(out) / n, subfolder=n, dry_run=True, progress=progress, **options) for n in names]
    reports: list[ConvertReport] = []
    try:
        with fs.new_directory(out, overwrite=overwrite) as tmp:
            for name in names:
                say(progress, f"expert {name}")
                report = convert(src, tmp / name, subfolder=name, progress=progress, **options)
                reports.append(report)
                if not report.written:
                    raise _NotWritten
    except _NotWritten:
        pass  # the temporary directory is gone; the failing report says why
    except FileExistsError:
        raise UsageError(f"{out} exists", "pass --overwrite to replace it") from None
    for r in reports:
        r.out = str(Path(out) / Path(r.out).name)
        r.written = r.written and all(x.written for x in reports)
    return reports


class _NotWritten(Exception):
    """An expert failed verification: abandon OUT's temporary directory."""


__all__ = ["convert_experts", "pipeline_experts"]
