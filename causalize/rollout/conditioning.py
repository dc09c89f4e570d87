"""Which conditioning tensors (prompt embeddings and the like) a rollout passes to the model.

A model is rolled out under the inputs it was trained with: ``--conditioning FILE`` when given,
else the copy training stored beside the model (``conditioning.safetensors``), else zeros (what
training used when it had no file). A mismatch with what training used is warned about, not
silently accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from causalize.errors import UsageError

if TYPE_CHECKING:
    import torch

    from causalize.world_model import WorldModel

__all__ = ["CONDITIONING_FILE", "ConditioningWarning", "resolve_conditioning", "trained_conditioning"]

CONDITIONING_FILE = "conditioning.safetensors"  # written by training beside the final model


class ConditioningWarning(UserWarning):
    """The rollout's conditioning differs from what the model was trained with."""


def trained_conditioning(checkpoint_dir: str | os.PathLike) -> tuple[Path | None, bool]:
    """(the stored copy or None, whether training used a conditioning file at all)."""
    d = Path(checkpoint_dir)
    stored = d / CONDITIONING_FILE
    used = stored.is_file()
    f = d / "training.json"
    if f.is_file():
        try:
            used = used or bool(json.loads(f.read_text(encoding="utf-8")).get("config", {}).get("conditioning"))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass  # rollout/loading reports a corrupt training.json
    return (stored if stored.is_file() else None), used


def resolve_conditioning(
    checkpoint_dir: str | os.PathLike, given: str | os.PathLike | None, wm: WorldModel | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors to pass (``{}``: zeros) and where they came from ("option", "stored" or
    "zeros"), checked against ``wm`` when given; warns (ConditioningWarning) when training used
    something else."""
    from causalize.prompt import check_conditioning, load_conditioning_file

    stored, used = trained_conditioning(checkpoint_dir)
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise UsageError(f"conditioning file not found: {p}", "give a file written by causalize embed-prompt")
        tensors, source = load_conditioning_file(p), "option"
        if wm is not None and tensors:  # a file that cannot serve is refused before any warning
            check_conditioning(tensors, wm, str(p))
        if stored is not None and _digest(p) != _digest(stored):
            _warn(f"{p} differs from the conditioning the model was trained with ({stored})")
        elif stored is None and not used and _has_training(checkpoint_dir):
            _warn(f"the model was trained without conditioning (zeros), but {p} is given")
    elif stored is not None:
        tensors, source = load_conditioning_file(stored), "stored"
    else:
        if used:
            _warn("the model was trained with a conditioning file that was not stored with it: zeros are used")
        tensors, source = {}, "zeros"
    if wm is not None and tensors and source == "stored":
        check_conditioning(tensors, wm, str(stored))
    return tensors, source


def _has_training(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / "training.json").is_file()


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _warn(message: str) -> None:
    warnings.warn(message, ConditioningWarning, stacklevel=3)
