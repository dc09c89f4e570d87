"""On-disk episode datasets (frames + actions) for world-model fine-tuning.

The format is specified in ``docs/EPISODES.md``; in short::

    ROOT/
      dataset.json            format, version, observation kind + shape, action space, extras, ...
      episodes/000000.npz     one uncompressed (or compressed) npz per episode
      episodes/000001.npz

Each episode holds exactly one of
  * ``frames``  uint8   (T, H, W, C)  RGB-like pixels, 0..255, or
  * ``latents`` float32 (T, C, H, W)  scaled VAE latents as the denoiser consumes them,
chosen once per dataset by ``dataset.json["observation"]["kind"]`` (``"pixels"`` / ``"latents"``),
plus ``actions`` with one row per frame, where ``actions[t]`` is the action executed AFTER
observing frame t (METHOD.md §1: a_t produces frame t+1; the last row is never consumed):
  * continuous             float32 (T, A)
  * discrete (single)      int64   (T,)    indices in [0, N)
  * discrete (multi-hot)   uint8 or bool (T, N), values 0/1
and optional per-transition ``rewards`` float32 (T,) / ``dones`` bool (T,) when dataset.json lists
them under ``"extras"`` (``rewards[t]``/``dones[t]`` result from taking a_t in frame t).

:class:`EpisodeDataset` serves every fixed-length window whose frames lie inside one episode, with
the actions re-indexed to what the model consumes: ``item["actions"][t]`` is the action that
PRODUCED frame t, i.e. a_{s+t-1} for a window starting at s. Only the first frame of an episode has
no such action; it gets a zero row and ``action_mask[0] = False``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from causalize.errors import UsageError
import torch
from torch.utils.data import Dataset

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ActionSpace",
    "DataError",
    "DataWarning",
    "DatasetInfo",
    "EpisodeDataset",
    "create_dataset",
    "episode_path",
    "list_episodes",
    "read_info",
    "split_episodes",
    "write_episode",
]

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

    def __init__(
        self,
        path: str | os.PathLike | None,
        problem: str,
        *,
        problems: Sequence[tuple[str, str]] = (),
    ):
        self.path = None if path is None else str(path)
        self.problems = list(problems) or [(self.path or "", problem)]
        UsageError.__init__(self, f"{path}: {problem}" if path is not None else problem)


class DataWarning(UserWarning):
    """Emitted when episodes are skipped (``skip_short=True``)."""


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
        return cls.from_json(
            {"type": "discrete", "num_actions": num_actions, "multi_hot": multi_hot}
        )

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
        space = ActionSpace.from_json(
            obj["action_space"], where=None if where is None else str(where)
        )
        obs = obj.get("observation")
        if not isinstance(obs, Mapping):
            raise bad(
                'missing "observation": {"kind": "pixels"|"latents", "shape": [...]}'
            )
        kind = obs.get("kind")
        if kind not in ("pixels", "latents"):
            raise bad(f'"observation.kind" must be "pixels" or "latents", got {kind!r}')
        shape = obs.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 3
            and all(_is_pos_int(s) for s in shape)
        ):
            order = "[H, W, C]" if kind == "pixels" else "[C, H, W]"
            raise bad(
                f'"observation.shape" must be {order} of positive integers, got {shape!r}'
            )
        extras = obj.get("extras", [])
        if not (
            isinstance(extras, list)
            and all(e in EXTRAS for e in extras)
            and len(set(extras)) == len(extras)
        ):
            raise bad(
                f'"extras" must be a list drawn from {list(EXTRAS)}, got {extras!r}'
            )
        fps = obj.get("fps")
        if fps is not None and not (
            isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0
        ):
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


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def read_info(root: str | os.PathLike) -> DatasetInfo:
    """Parse and validate ``ROOT/dataset.json``; :class:`DataError` names it when missing or bad."""
    path = Path(root) / INFO_FILE
    if not Path(root).is_dir():
        raise DataError(root, "dataset directory does not exist")
    if not path.is_file():
        raise DataError(
            path,
            "missing dataset.json (create the dataset with causalize.training.data.create_dataset)",
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"corrupt dataset.json: {e}") from e
    return DatasetInfo.from_json(obj, where=path)


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


# ------------------------------------------------------------------------------------------ writing


def _atomic_write_bytes(
    dest: Path, write: Callable[[Any], None], *, overwrite: bool
) -> None:
    """Write to a temporary file in dest's directory, fsync, then move it into place.

    Without ``overwrite`` the final step is ``os.link`` (fails if dest exists, atomically), so two
    writers can never both believe they created the same episode.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise DataError(
                    dest, "already exists; pass overwrite=True to replace it"
                ) from None
            except OSError:  # filesystems without hard links
                if dest.exists():
                    raise DataError(
                        dest, "already exists; pass overwrite=True to replace it"
                    ) from None
                os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def create_dataset(
    root: str | os.PathLike,
    action_space: ActionSpace | Mapping[str, Any],
    *,
    frame_shape: Sequence[int],
    kind: str = "pixels",
    extras: Iterable[str] = (),
    fps: float | None = None,
    source: Any = None,
    overwrite: bool = False,
) -> DatasetInfo:
    """Create ``ROOT/dataset.json`` and ``ROOT/episodes/``; return the parsed info.

    ``frame_shape`` is (H, W, C) for ``kind="pixels"`` and (C, H, W) for ``kind="latents"``, i.e.
    the shape of one stored frame. ``extras`` names the optional per-transition arrays every
    episode must then carry (``"rewards"``, ``"dones"``). ``source`` is free-form JSON (where the
    data came from, licence, preprocessing). An existing dataset.json is an error unless
    ``overwrite=True`` (episodes are never touched).
    """
    root = Path(root)
    info = DatasetInfo.from_json(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "observation": {
                "kind": kind,
                "shape": [int(s) for s in frame_shape]
                if _seq_of_ints(frame_shape)
                else frame_shape,
            },
            "action_space": ActionSpace.from_json(action_space).to_json(),
            "extras": list(extras),
            **({"fps": fps} if fps is not None else {}),
            **({"source": source} if source is not None else {}),
        },
        where=root / INFO_FILE,
    )
    try:
        text = json.dumps(info.to_json(), indent=2, sort_keys=False) + "\n"
    except TypeError as e:
        raise DataError(
            root / INFO_FILE, f"source is not JSON-serialisable: {e}"
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    (root / EPISODE_DIR).mkdir(exist_ok=True)
    _atomic_write_bytes(
        root / INFO_FILE, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite
    )
    return info


def _seq_of_ints(x: Any) -> bool:
    try:
        return all(int(s) == s for s in x)
    except (TypeError, ValueError):
        return False


def write_episode(
    root: str | os.PathLike,
    index: int,
    *,
    actions: Any,
    frames: Any = None,
    latents: Any = None,
    rewards: Any = None,
    dones: Any = None,
    overwrite: bool = False,
    compress: bool = False,
) -> Path:
    """Validate one episode against ``ROOT/dataset.json`` and write ``episodes/{index:06d}.npz``.

    Pass ``frames`` (uint8 (T, H, W, C)) for a pixel dataset or ``latents`` (float (T, C, H, W),
    stored as float32) for a latent dataset. ``actions[t]`` is the action taken after frame t
    (T rows; the last one is never consumed, store zeros if unknown): float (T, A) for continuous
    spaces, integer (T,) for discrete, 0/1 (T, N) for multi-hot (stored as uint8). ``rewards`` /
    ``dones`` (T,) are required exactly when dataset.json lists them in ``extras``.

    The write is atomic (temporary file, then rename); an existing episode is an error unless
    ``overwrite=True``. ``compress=True`` saves space but disables memory-mapped window reads.
    Returns the episode path.
    """
    info = read_info(root)
    if not (
        isinstance(index, (int, np.integer))
        and not isinstance(index, bool)
        and index >= 0
    ):
        raise DataError(
            root, f"episode index must be a non-negative integer, got {index!r}"
        )
    dest = episode_path(root, int(index))
    if dest.exists() and not overwrite:
        raise DataError(dest, "already exists; pass overwrite=True to replace it")

    def bad(msg: str) -> DataError:
        return DataError(dest, msg)

    # observations
    other = "latents" if info.kind == "pixels" else "frames"
    if (frames if other == "frames" else latents) is not None:
        raise bad(f"dataset stores {info.kind} (key {info.key!r}); got {other}=")
    obs = frames if info.kind == "pixels" else latents
    if obs is None:
        raise bad(f"missing {info.key}= (dataset stores {info.kind})")
    obs = _to_numpy(obs)
    if info.kind == "pixels":
        if obs.dtype != np.uint8:
            raise bad(
                f"frames dtype {obs.dtype}, expected uint8 pixels 0..255 (convert explicitly; floats are not rescaled)"
            )
    else:
        if not np.issubdtype(obs.dtype, np.floating):
            raise bad(
                f"latents dtype {obs.dtype}, expected a floating dtype (stored as float32)"
            )
        obs = obs.astype(np.float32, copy=False)
        if not np.isfinite(obs).all():
            raise bad("latents contain NaN or inf")
    order = "(T, H, W, C)" if info.kind == "pixels" else "(T, C, H, W)"
    if obs.ndim != 4 or tuple(obs.shape[1:]) != info.shape:
        raise bad(
            f"{info.key} shape {tuple(obs.shape)}, expected {order} with per-frame shape {info.shape} from dataset.json"
        )
    T = obs.shape[0]
    if T < 1:
        raise bad("episode has no frames")

    arrays: dict[str, np.ndarray] = {info.key: np.ascontiguousarray(obs)}
    arrays["actions"] = _normalise_actions(
        _to_numpy(actions), info.action_space, T, bad
    )

    for name, value in (("rewards", rewards), ("dones", dones)):
        declared = name in info.extras
        if value is None:
            if declared:
                raise bad(f"dataset.json declares extra {name!r}; pass {name}=")
            continue
        if not declared:
            raise bad(
                f"{name}= given but dataset.json does not list {name!r} in extras"
            )
        v = _to_numpy(value)
        if v.shape != (T,):
            raise bad(f"{name} shape {tuple(v.shape)}, expected ({T},)")
        if name == "rewards":
            if not (
                np.issubdtype(v.dtype, np.floating)
                or np.issubdtype(v.dtype, np.integer)
            ):
                raise bad(f"rewards dtype {v.dtype}, expected a real number dtype")
            v = v.astype(np.float32)
            if not np.isfinite(v).all():
                raise bad("rewards contain NaN or inf")
        else:
            if v.dtype != np.bool_ and not (
                np.issubdtype(v.dtype, np.integer) and np.isin(v, (0, 1)).all()
            ):
                raise bad(f"dones must be bool or 0/1, got dtype {v.dtype}")
            v = v.astype(np.bool_)
        arrays[name] = v

    saver = np.savez_compressed if compress else np.savez
    _atomic_write_bytes(dest, lambda f: saver(f, **arrays), overwrite=overwrite)
    return dest


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise_actions(
    a: np.ndarray, space: ActionSpace, T: int, bad: Callable[[str], DataError]
) -> np.ndarray:
    if space.type == "continuous":
        if a.shape != (T, space.dim):
            raise bad(
                f"actions shape {tuple(a.shape)}, expected (T, A) = ({T}, {space.dim}) (A from dataset.json)"
            )
        if not (
            np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
        ):
            raise bad(f"actions dtype {a.dtype}, expected float32")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise bad("actions contain NaN or inf")
        return a
    n = space.num_actions
    if space.multi_hot:
        if a.shape != (T, n):
            raise bad(
                f"actions shape {tuple(a.shape)}, expected multi-hot (T, N) = ({T}, {n}) (N from dataset.json)"
            )
        if a.dtype != np.bool_ and not (
            (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))
            and np.isin(a, (0, 1)).all()
        ):
            raise bad("multi-hot actions must contain only 0 and 1")
        return a.astype(np.uint8)
    if a.shape != (T,):
        raise bad(
            f"actions shape {tuple(a.shape)}, expected discrete indices (T,) = ({T},)"
        )
    if not np.issubdtype(a.dtype, np.integer):
        raise bad(f"actions dtype {a.dtype}, expected integer indices")
    if T and (a.min() < 0 or a.max() >= n):
        raise bad(
            f"discrete actions out of range [0, {n}): min {a.min()}, max {a.max()}"
        )
    return a.astype(np.int64)


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Member:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: (
        int | None
    )  # byte offset of the raw array data in the npz file; None when compressed


def _read_npz_headers(path: Path) -> dict[str, _Member]:
    """Shapes and dtypes of every array in an npz, from the zip directory and the .npy headers.

    Reads a few hundred bytes per array, decompressing only the header of compressed members.
    """
    out: dict[str, _Member] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    shape, fortran, dtype = np.lib.format._read_array_header(f, version)
                header_len = f.tell()
            offset = None
            if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                offset = info.header_offset + 30 + name_len + extra_len + header_len
            out[info.filename[:-4]] = _Member(
                tuple(shape), dtype, bool(fortran), offset
            )
    return out


@dataclass(frozen=True)
class _Episode:
    index: int
    path: Path
    length: int
    members: dict


def _check_episode(
    path: Path, index: int, info: DatasetInfo
) -> tuple[_Episode | None, list[str]]:
    """Header-level validation: keys, dtypes, shapes, lengths. Returns (episode, problems)."""
    try:
        members = _read_npz_headers(path)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        return None, [f"corrupt or unreadable npz ({type(e).__name__}: {e})"]
    problems: list[str] = []
    key = info.key
    other = "latents" if key == "frames" else "frames"
    if key not in members:
        hint = (
            f" (it has {other!r}; dataset.json says kind={info.kind!r})"
            if other in members
            else ""
        )
        problems.append(f"missing array {key!r}{hint}; found {sorted(members)}")
    if "actions" not in members:
        problems.append(f"missing array 'actions'; found {sorted(members)}")
    for name in info.extras:
        if name not in members:
            problems.append(f"missing array {name!r} (listed in dataset.json extras)")
    for name, m in members.items():
        if m.dtype.hasobject:
            problems.append(
                f"array {name!r} has object dtype (pickled data is refused)"
            )
    if problems:
        return None, problems

    obs = members[key]
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

    act = members["actions"]
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
            problems.append(
                f"actions dtype {act.dtype}, expected uint8 or bool multi-hot"
            )
        if len(act.shape) != 2 or act.shape[1] != space.num_actions:
            problems.append(
                f"actions shape {act.shape}, expected multi-hot (T, {space.num_actions}): num_actions from dataset.json"
            )
    else:
        if act.dtype != np.int64:
            problems.append(f"actions dtype {act.dtype}, expected int64 indices")
        if len(act.shape) != 1:
            problems.append(
                f"actions shape {act.shape}, expected discrete indices (T,)"
            )
    if act.shape and act.shape[0] != T:
        problems.append(
            f"length mismatch: {T} {key} but {act.shape[0]} actions (need one action row per frame)"
        )
    for name in info.extras:
        m = members[name]
        want = np.float32 if name == "rewards" else np.bool_
        if m.dtype != want or m.shape != (T,):
            problems.append(
                f"{name} has dtype {m.dtype} and shape {m.shape}, expected {np.dtype(want)} ({T},)"
            )
    if T < 1 and not problems:
        problems.append("episode has no frames")
    if problems:
        return None, problems
    return _Episode(index, path, int(T), members), []


def _split_score(seed: int, index: int) -> int:
    h = hashlib.blake2b(
        f"causalize-split:{int(seed)}:{int(index)}".encode(), digest_size=8
    )
    return int.from_bytes(h.digest(), "big")


def split_episodes(
    root: str | os.PathLike, test_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Deterministic train/test split of the episodes in ROOT; returns ``(train, test)`` index lists.

    Each episode index i gets a score ``blake2b(f"causalize-split:{seed}:{i}")``, independent of
    the other episodes, of file order and of the platform. The test set is the
    ``round(test_fraction * n)`` episodes with the lowest scores — at least one when
    ``test_fraction > 0`` and at most ``n - 1`` when ``test_fraction < 1`` (for n >= 2). Adding
    episodes therefore only moves episodes across the boundary; it never reshuffles the split.
    Only file names are read, so the split does not depend on ``window`` or ``skip_short``.
    """
    if not (isinstance(test_fraction, (int, float)) and 0.0 <= test_fraction <= 1.0):
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    indices = list_episodes(root)
    n = len(indices)
    k = math.floor(test_fraction * n + 0.5)
    if n >= 2:
        if test_fraction > 0:
            k = max(k, 1)
        if test_fraction < 1:
            k = min(k, n - 1)
    ranked = sorted(indices, key=lambda i: (_split_score(seed, i), i))
    test = sorted(ranked[:k])
    test_set = set(test)
    return [i for i in indices if i not in test_set], test


class EpisodeDataset(Dataset):
    """Every fixed-length window of ``window`` consecutive frames inside one episode.

    Windows start at ``s = 0, stride, 2*stride, ...`` while ``s + window <= T``, so an episode of
    length T contributes ``(T - window) // stride + 1`` windows. Item ``i`` is the i-th window in
    (episode index, start) order: indexing is deterministic, shuffling is the sampler's job
    (``DataLoader(shuffle=True, generator=...)``).

    Each item is a dict:

    * ``frames``: float32 (window, C, H, W). Pixels are mapped uint8 → ``x / 127.5 - 1`` ∈ [-1, 1];
      latents are returned as stored.
    * ``actions``: float32 (window, A). **``actions[t]`` is the action that PRODUCED frame t**, i.e.
      the stored a_{s+t-1} (METHOD.md §1, §7: frame t is conditioned on a_{t-1}). For a window
      starting at s > 0 every row is valid, including row 0 (= a_{s-1}). For s = 0, row 0 is all
      zeros and ``action_mask[0]`` is False: the first frame of an episode has no action.
      Discrete single actions are one-hot rows; multi-hot rows are returned as 0./1.
    * ``action_mask``: bool (window,), False only at the first frame of an episode.
    * ``action_index``: int64 (window,), only for single discrete spaces: the index, -1 where masked.
    * ``rewards`` float32 / ``dones`` bool (window,), when dataset.json lists them: shifted like the
      actions, so ``rewards[t]`` is the reward of the transition that produced frame t (0 / False
      at the first frame of an episode).
    * ``episode``, ``start``: ints, the episode index and s.

    ``split`` is None (all episodes), ``"train"`` / ``"test"`` (from
    :func:`split_episodes` with ``test_fraction`` and ``seed``) or an explicit list of episode
    indices.

    Construction validates dataset.json and every selected episode's npz headers (keys, dtypes,
    shapes, lengths) without loading arrays, and raises one :class:`DataError` listing every bad
    file. Episodes shorter than ``window`` are an error, or skipped with a :class:`DataWarning`
    when ``skip_short=True``. Values (NaN/inf, action ranges) are checked when an item is read, or
    for everything up front with ``check_values=True``.

    Memory: uncompressed npz members are memory-mapped, so an item reads only its window; compressed
    episodes are loaded whole. Up to ``cache_size`` episodes' arrays are kept (LRU, per worker).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        window: int,
        *,
        stride: int = 1,
        split: str | Sequence[int] | None = None,
        seed: int = 0,
        test_fraction: float = 0.1,
        skip_short: bool = False,
        check_values: bool = False,
        cache_size: int = 4,
        transform: Callable[[dict], dict] | None = None,
    ):
        if not _is_pos_int(window):
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not _is_pos_int(stride):
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        self.root = Path(root)
        self.window = window
        self.stride = stride
        self.seed = seed
        self.transform = transform
        self.cache_size = max(0, int(cache_size))
        self.info = read_info(self.root)

        present = list_episodes(self.root)
        if split is None:
            chosen = present
        elif isinstance(split, str):
            if split not in ("train", "test"):
                raise ValueError(
                    f'split must be None, "train", "test" or a list of episode indices, got {split!r}'
                )
            train, test = split_episodes(self.root, test_fraction, seed)
            chosen = train if split == "train" else test
        else:
            chosen = sorted({int(i) for i in split})
            missing = sorted(set(chosen) - set(present))
            if missing:
                raise DataError(
                    self.root / EPISODE_DIR,
                    f"split names episodes that do not exist: {missing[:20]}",
                )
        if not present:
            raise DataError(
                self.root / EPISODE_DIR,
                "no episodes (expected files like episodes/000000.npz)",
            )

        episodes: list[_Episode] = []
        problems: list[tuple[str, str]] = []
        short: list[tuple[str, int]] = []
        for idx in chosen:
            path = episode_path(self.root, idx)
            ep, probs = _check_episode(path, idx, self.info)
            problems += [(str(path), p) for p in probs]
            if ep is None:
                continue
            if ep.length < window:
                short.append((str(path), ep.length))
                continue
            episodes.append(ep)
        if problems:
            raise _many(problems)
        if short:
            listing = ", ".join(f"{p} (T={t})" for p, t in short[:20]) + (
                f", ... ({len(short)} in all)" if len(short) > 20 else ""
            )
            if not skip_short:
                raise DataError(
                    short[0][0],
                    f"episode shorter than window={window}: {listing}; pass skip_short=True to skip short episodes",
                    problems=[
                        (p, f"episode length {t} < window {window}") for p, t in short
                    ],
                )
            warnings.warn(
                f"skipping {len(short)} episode(s) shorter than window={window}: {listing}",
                DataWarning,
                stacklevel=2,
            )
        if not episodes:
            raise DataError(
                self.root, f"no usable episodes for window={window} in split {split!r}"
            )

        self._episodes = episodes
        counts = np.array(
            [(e.length - window) // stride + 1 for e in episodes], dtype=np.int64
        )
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        if check_values:
            for k in range(len(episodes)):
                self._check_values(k, self._arrays(k), 0, episodes[k].length)

    # ---------------------------------------------------------------------------- introspection

    @property
    def action_space(self) -> ActionSpace:
        return self.info.action_space

    @property
    def episodes(self) -> list[int]:
        """Episode indices served, sorted."""
        return [e.index for e in self._episodes]

    @property
    def episode_lengths(self) -> dict[int, int]:
        return {e.index: e.length for e in self._episodes}

    def window_at(self, i: int) -> tuple[int, int]:
        """(episode index, start frame) of item i."""
        k, s = self._locate(i)
        return self._episodes[k].index, s

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"dataset indices must be integers, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} windows")
        i = int(i) % n
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return k, int(i - self._offsets[k]) * self.stride

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return (
            f"EpisodeDataset({str(self.root)!r}, window={self.window}, stride={self.stride}, "
            f"episodes={len(self._episodes)}, windows={len(self)}, kind={self.info.kind!r}, "
            f"action_space={self.info.action_space.to_json()})"
        )

    # ----------------------------------------------------------------------------------- loading

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # never ship memory maps / arrays to workers
        return state

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        ep = self._episodes[k]
        names = [self.info.key, "actions", *self.info.extras]
        try:
            if all(ep.members[n].offset is not None for n in names):
                arrays = {
                    n: np.memmap(
                        ep.path,
                        dtype=ep.members[n].dtype,
                        mode="r",
                        offset=ep.members[n].offset,
                        shape=ep.members[n].shape,
                        order="F" if ep.members[n].fortran else "C",
                    )
                    for n in names
                }
            else:
                with np.load(ep.path, allow_pickle=False) as z:
                    arrays = {n: z[n] for n in names}
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
            raise DataError(
                ep.path, f"corrupt or unreadable npz ({type(e).__name__}: {e})"
            ) from e
        for n in names:
            if arrays[n].shape != ep.members[n].shape:
                raise DataError(
                    ep.path, f"array {n!r} changed on disk since the dataset was opened"
                )
        if self.cache_size:
            self._cache[k] = arrays
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arrays

    def _check_values(
        self, k: int, arrays: dict[str, np.ndarray], lo: int, hi: int
    ) -> None:
        """Value checks on frames [lo, hi) and the actions rows that feed them."""
        ep = self._episodes[k]
        if (
            self.info.kind == "latents"
            and not np.isfinite(arrays["latents"][lo:hi]).all()
        ):
            raise DataError(
                ep.path, f"latents contain NaN or inf in frames [{lo}, {hi})"
            )
        a = np.asarray(arrays["actions"][max(lo - 1, 0) : max(hi - 1, 0)])
        space = self.info.action_space
        if space.type == "continuous":
            if not np.isfinite(a).all():
                raise DataError(
                    ep.path,
                    f"actions contain NaN or inf in rows [{max(lo - 1, 0)}, {hi - 1})",
                )
        elif space.multi_hot:
            if a.size and a.max() > 1:
                raise DataError(
                    ep.path, "multi-hot actions contain values other than 0 and 1"
                )
        elif a.size and (a.min() < 0 or a.max() >= space.num_actions):
            raise DataError(
                ep.path,
                f"discrete actions out of range [0, {space.num_actions}): min {a.min()}, max {a.max()}",
            )
        if (
            "rewards" in arrays
            and not np.isfinite(
                arrays["rewards"][max(lo - 1, 0) : max(hi - 1, 0)]
            ).all()
        ):
            raise DataError(ep.path, "rewards contain NaN or inf")

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, s = self._locate(i)
        index = self._episodes[k].index
        arrays = self._arrays(k)
        W = self.window
        self._check_values(k, arrays, s, s + W)

        obs = np.array(arrays[self.info.key][s : s + W])  # copy out of the memory map
        if self.info.kind == "pixels":
            frames = (
                torch.from_numpy(obs)
                .permute(0, 3, 1, 2)
                .float()
                .div_(127.5)
                .sub_(1.0)
                .contiguous()
            )
        else:
            frames = torch.from_numpy(obs)

        # Row t of the item = stored action a_{s+t-1}; row 0 of an episode has none.
        first = 1 if s == 0 else 0
        src = np.asarray(arrays["actions"][s - 1 + first : s + W - 1])
        mask = torch.ones(W, dtype=torch.bool)
        mask[:first] = False
        space = self.info.action_space
        item: dict[str, Any] = {"frames": frames}
        actions = torch.zeros(W, space.width, dtype=torch.float32)
        if space.type == "continuous" or space.multi_hot:
            actions[first:] = torch.from_numpy(src.astype(np.float32))
            item["actions"] = actions
        else:
            idx = torch.full((W,), -1, dtype=torch.int64)
            idx[first:] = torch.from_numpy(src.astype(np.int64))
            actions[torch.arange(first, W), idx[first:]] = 1.0
            item["actions"] = actions
            item["action_index"] = idx
        item["action_mask"] = mask
        for name in self.info.extras:
            dtype = torch.float32 if name == "rewards" else torch.bool
            out = torch.zeros(W, dtype=dtype)
            out[first:] = torch.from_numpy(
                np.array(arrays[name][s - 1 + first : s + W - 1])
            )
            item[name] = out
        item["episode"] = index
        item["start"] = s
        return self.transform(item) if self.transform is not None else item


def _many(problems: list[tuple[str, str]]) -> DataError:
    if len(problems) == 1:
        p, msg = problems[0]
        return DataError(p, msg, problems=problems)
    shown = "\n".join(f"  {p}: {msg}" for p, msg in problems[:20])
    more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 20 else ""
    return DataError(
        problems[0][0],
        f"{len(problems)} problems in episode files:\n{shown}{more}",
        problems=problems,
    )
