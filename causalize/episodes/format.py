"""The episode format (docs/EPISODES.md): dataset.json, episode file names, array validation.

Pure description and validation: nothing here reads array data or imports torch, so the reader,
the writer, the torch Dataset, rollout and the benchmarks can all share it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from causalize.errors import UsageError

FORMAT_NAME = "causalize-episodes"
FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
EPISODE_DIR = "episodes"
EXTRAS = ("rewards", "dones")
_EPISODE_NAME = re.compile(r"^(\d{6,})\.npz$")


class DataError(UsageError, ValueError):
    """A dataset file is missing, corrupt or does not match the format.

    The message starts with the offending file. ``path`` is that file (the first one when several
    are reported); ``problems`` lists ``(path, problem)`` pairs. A UsageError, so the CLI reports
    it in one line with exit code 2; still a ValueError for plain Python callers.
    """

    kind = "bad-data"
    #: What the CLI prints under the one-line error when the raiser gives no better hint.
    DEFAULT_HINT = "the episode format is described in docs/EPISODES.md"

    def __init__(
        self,
        path: str | os.PathLike | None,
        problem: str,
        *,
        problems: Sequence[tuple[str, str]] = (),
        hint: str | None = None,
    ):
        self.path = None if path is None else str(path)
        self.problems = list(problems) or [(self.path or "", problem)]
        UsageError.__init__(self, f"{path}: {problem}" if path is not None else problem, hint or self.DEFAULT_HINT)

    def __str__(self) -> str:
        return self.message  # plain Python callers see the problem; the hint is for the CLI


class DataWarning(UserWarning):
    """Emitted when episodes are skipped (``skip_short=True``)."""


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# --------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ActionSpace:
    """``type`` is ``"continuous"`` (``dim`` = A) or ``"discrete"`` (``num_actions`` = N, ``multi_hot``).

    ``width`` is the number of columns of the float ``actions`` tensor the loader yields: A, or N
    (one-hot for single discrete actions, multi-hot otherwise).
    """

    type: str
    dim: int | None = None
    num_actions: int | None = None
    multi_hot: bool = False

    @classmethod
    def continuous(cls, dim: int) -> ActionSpace:
        return cls.from_json({"type": "continuous", "dim": dim})

    @classmethod
    def discrete(cls, num_actions: int, multi_hot: bool = False) -> ActionSpace:
        return cls.from_json({"type": "discrete", "num_actions": num_actions, "multi_hot": multi_hot})

    @property
    def width(self) -> int:
        return int(self.dim if self.type == "continuous" else self.num_actions)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        if self.type == "continuous":
            return {"type": "continuous", "dim": self.dim}
        return {
            "type": "discrete",
            "num_actions": self.num_actions,
            "multi_hot": self.multi_hot,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str | None = None) -> ActionSpace:
        if isinstance(obj, ActionSpace):
            return obj

        def bad(msg: str) -> DataError:
            return DataError(where, f"invalid action_space {obj!r}: {msg}")

        if not isinstance(obj, Mapping):
            raise bad("expected an object")
        kind = obj.get("type")
        if kind == "continuous":
            dim = obj.get("dim")
            if not _is_pos_int(dim):
                raise bad('"dim" must be a positive integer')
            extra = set(obj) - {"type", "dim"}
            if extra:
                raise bad(f"unknown keys {sorted(extra)}")
            return cls("continuous", dim=int(dim))
        if kind == "discrete":
            n = obj.get("num_actions")
            if not _is_pos_int(n):
                raise bad('"num_actions" must be a positive integer')
            mh = obj.get("multi_hot", False)
            if not isinstance(mh, bool):
                raise bad('"multi_hot" must be true or false')
            extra = set(obj) - {"type", "num_actions", "multi_hot"}
            if extra:
                raise bad(f"unknown keys {sorted(extra)}")
            return cls("discrete", num_actions=int(n), multi_hot=mh)
        raise bad('"type" must be "continuous" or "discrete"')


@dataclass(frozen=True)
class DatasetInfo:
    """The parsed ``dataset.json``.

    ``kind`` is ``"pixels"`` (episodes hold ``frames`` uint8 of ``shape`` = (H, W, C)) or
    ``"latents"`` (episodes hold ``latents`` float32 of ``shape`` = (C, H, W)).
    """

    action_space: ActionSpace
    kind: str
    shape: tuple[int, int, int]
    extras: tuple[str, ...] = ()
    fps: float | None = None
    source: Any = None
    version: int = FORMAT_VERSION
    extra_fields: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The npz key that holds the observations: ``"frames"`` or ``"latents"``."""
        return "frames" if self.kind == "pixels" else "latents"

    @property
    def channels(self) -> int:
        return self.shape[2] if self.kind == "pixels" else self.shape[0]

    @property
    def frame_shape_chw(self) -> tuple[int, int, int]:
        """Shape of one frame as the loader yields it, (C, H, W)."""
        if self.kind == "pixels":
            h, w, c = self.shape
            return (c, h, w)
        return self.shape

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": self.version,
            "observation": {"kind": self.kind, "shape": list(self.shape)},
            "action_space": self.action_space.to_json(),
            "extras": list(self.extras),
        }
        if self.fps is not None:
            out["fps"] = self.fps
        if self.source is not None:
            out["source"] = self.source
        out.update(self.extra_fields)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str | os.PathLike | None = None) -> DatasetInfo:
        def bad(msg: str) -> DataError:
            return DataError(where, msg)

        if not isinstance(obj, Mapping):
            raise bad("expected a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise bad(f'"format" is {obj.get("format")!r}, expected {FORMAT_NAME!r}')
        version = obj.get("version")
        if not _is_pos_int(version):
            raise bad(f'"version" must be a positive integer, got {version!r}')
        if version > FORMAT_VERSION:
            raise bad(
                f"format version {version} is newer than this causalize reads ({FORMAT_VERSION}); upgrade causalize"
            )
        if "action_space" not in obj:
            raise bad('missing "action_space"')
        space = ActionSpace.from_json(obj["action_space"], where=None if where is None else str(where))
        obs = obj.get("observation")
        if not isinstance(obs, Mapping):
            raise bad('missing "observation": {"kind": "pixels"|"latents", "shape": [...]}')
        kind = obs.get("kind")
        if kind not in ("pixels", "latents"):
            raise bad(f'"observation.kind" must be "pixels" or "latents", got {kind!r}')
        shape = obs.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_pos_int(s) for s in shape)):
            order = "[H, W, C]" if kind == "pixels" else "[C, H, W]"
            raise bad(f'"observation.shape" must be {order} of positive integers, got {shape!r}')
        extras = obj.get("extras", [])
        if not (isinstance(extras, list) and all(e in EXTRAS for e in extras) and len(set(extras)) == len(extras)):
            raise bad(f'"extras" must be a list drawn from {list(EXTRAS)}, got {extras!r}')
        fps = obj.get("fps")
        if fps is not None and not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0):
            raise bad(f'"fps" must be a positive number, got {fps!r}')
        known = {
            "format",
            "version",
            "observation",
            "action_space",
            "extras",
            "fps",
            "source",
        }
        return cls(
            action_space=space,
            kind=kind,
            shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
            extras=tuple(extras),
            fps=fps,
            source=obj.get("source"),
            version=int(version),
            extra_fields={k: v for k, v in obj.items() if k not in known},
        )


def read_info(root: str | os.PathLike) -> DatasetInfo:
    """Parse and validate ``ROOT/dataset.json``; :class:`DataError` names it when missing or bad."""
    path = Path(root) / INFO_FILE
    if not Path(root).is_dir():
        raise DataError(root, "dataset directory does not exist")
    if not path.is_file():
        raise DataError(
            path,
            "missing dataset.json (create the dataset with causalize.episodes.create_dataset)",
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"corrupt dataset.json: {e}") from e
    return DatasetInfo.from_json(obj, where=path)


# ---------------------------------------------------------------------------------- episode files


def episode_path(root: str | os.PathLike, index: int) -> Path:
    """``ROOT/episodes/{index:06d}.npz``."""
    return Path(root) / EPISODE_DIR / f"{int(index):06d}.npz"


def list_episodes(root: str | os.PathLike) -> list[int]:
    """Sorted episode indices found in ``ROOT/episodes`` (names only; contents are not read).

    Other ``.npz`` names (``ep1.npz``, ``0123.npz``, ``0000123.npz``) are errors; hidden files and
    non-npz files (e.g. write temporaries) are ignored.
    """
    d = Path(root) / EPISODE_DIR
    if not d.is_dir():
        raise DataError(d, "missing episodes/ directory")
    out = []
    for p in d.iterdir():
        if p.name.startswith(".") or not p.name.endswith(".npz"):
            continue
        m = _EPISODE_NAME.match(p.name)
        if m is None or p.name != f"{int(m.group(1)):06d}.npz":
            raise DataError(
                p,
                "episode files must be named by their index, zero-padded to 6 digits (e.g. 000123.npz)",
            )
        out.append(int(m.group(1)))
    return sorted(out)


class ArrayLike(Protocol):
    """What validation needs to know of a stored array: its shape and dtype (not its data)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def episode_problems(arrays: Mapping[str, ArrayLike], info: DatasetInfo) -> tuple[int, list[str]]:
    """Check an episode's arrays (name -> shape and dtype) against dataset.json.

    Returns ``(T, problems)``: the number of frames and every mismatch found (keys, dtypes, shapes,
    lengths, object arrays), empty when the episode is valid. Works on headers only (see
    :func:`causalize.episodes.read_headers`), so validating a dataset reads no array data.
    """
    problems: list[str] = []
    key = info.key
    other = "latents" if key == "frames" else "frames"
    if key not in arrays:
        hint = f" (it has {other!r}; dataset.json says kind={info.kind!r})" if other in arrays else ""
        problems.append(f"missing array {key!r}{hint}; found {sorted(arrays)}")
    if "actions" not in arrays:
        problems.append(f"missing array 'actions'; found {sorted(arrays)}")
    for name in info.extras:
        if name not in arrays:
            problems.append(f"missing array {name!r} (listed in dataset.json extras)")
    for name, m in arrays.items():
        if m.dtype.hasobject:
            problems.append(f"array {name!r} has object dtype (pickled data is refused)")
    if problems:
        return 0, problems

    obs = arrays[key]
    if info.kind == "pixels":
        if obs.dtype != np.uint8:
            problems.append(f"frames dtype {obs.dtype}, expected uint8")
        if len(obs.shape) != 4 or obs.shape[1:] != info.shape:
            problems.append(
                f"frames shape {obs.shape}, expected (T, H, W, C) with (H, W, C) = {info.shape} from dataset.json"
            )
    else:
        if obs.dtype != np.float32:
            problems.append(f"latents dtype {obs.dtype}, expected float32")
        if len(obs.shape) != 4 or obs.shape[1:] != info.shape:
            problems.append(
                f"latents shape {obs.shape}, expected (T, C, H, W) with (C, H, W) = {info.shape} from dataset.json"
            )
    T = obs.shape[0] if obs.shape else 0

    act = arrays["actions"]
    space = info.action_space
    if space.type == "continuous":
        if act.dtype != np.float32:
            problems.append(f"actions dtype {act.dtype}, expected float32")
        if len(act.shape) != 2 or act.shape[1] != space.dim:
            problems.append(
                f"actions shape {act.shape}, expected (T, {space.dim}): action dim {space.dim} from dataset.json"
            )
    elif space.multi_hot:
        if act.dtype not in (np.dtype(np.uint8), np.dtype(np.bool_)):
            problems.append(f"actions dtype {act.dtype}, expected uint8 or bool multi-hot")
        if len(act.shape) != 2 or act.shape[1] != space.num_actions:
            problems.append(
                f"actions shape {act.shape}, expected multi-hot (T, {space.num_actions}): num_actions from dataset.json"
            )
    else:
        if act.dtype != np.int64:
            problems.append(f"actions dtype {act.dtype}, expected int64 indices")
        if len(act.shape) != 1:
            problems.append(f"actions shape {act.shape}, expected discrete indices (T,)")
    if act.shape and act.shape[0] != T:
        problems.append(f"length mismatch: {T} {key} but {act.shape[0]} actions (need one action row per frame)")
    for name in info.extras:
        m = arrays[name]
        want = np.float32 if name == "rewards" else np.bool_
        if m.dtype != want or m.shape != (T,):
            problems.append(f"{name} has dtype {m.dtype} and shape {m.shape}, expected {np.dtype(want)} ({T},)")
    if T < 1 and not problems:
        problems.append("episode has no frames")
    return int(T), problems


__all__ = [
    "EPISODE_DIR",
    "EXTRAS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INFO_FILE",
    "ActionSpace",
    "ArrayLike",
    "DataError",
    "DataWarning",
    "DatasetInfo",
    "episode_path",
    "episode_problems",
    "list_episodes",
    "read_info",
]
