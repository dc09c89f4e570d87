"""Writing episode datasets: ``dataset.json`` and validated episode files.

Every file goes through :mod:`causalize.fs`, so a reader never sees a half-written episode, an
existing one is never replaced unless ``overwrite=True`` (also when two writers race for the same
index), a failed write leaves nothing behind, and files get the mode ``open`` would give them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from causalize import fs
from causalize.episodes.format import (
    EPISODE_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_FILE,
    ActionSpace,
    DataError,
    DatasetInfo,
    episode_path,
    read_info,
)


def _exists(path: Path) -> DataError:
    return DataError(path, "already exists; pass overwrite=True to replace it")


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
    extra: Mapping[str, Any] | None = None,
) -> DatasetInfo:
    """Create ``ROOT/dataset.json`` and ``ROOT/episodes/``; return the parsed info.

    ``frame_shape`` is (H, W, C) for ``kind="pixels"`` and (C, H, W) for ``kind="latents"``, i.e.
    the shape of one stored frame. ``extras`` names the optional per-transition arrays every
    episode must then carry (``"rewards"``, ``"dones"``). ``source`` is free-form JSON (where the
    data came from, licence, preprocessing). An existing dataset.json is an error unless
    ``overwrite=True`` (episodes are never touched). ``extra`` adds top-level fields (readers keep
    unknown fields; ``causalize encode`` records its VAE under ``"latent"``).
    """
    root = Path(root)
    info = DatasetInfo.from_json(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "observation": {
                "kind": kind,
                "shape": [int(s) for s in frame_shape] if _seq_of_ints(frame_shape) else frame_shape,
            },
            "action_space": ActionSpace.from_json(action_space).to_json(),
            "extras": list(extras),
            **({"fps": fps} if fps is not None else {}),
            **({"source": source} if source is not None else {}),
            **dict(extra or {}),
        },
        where=root / INFO_FILE,
    )
    try:
        text = json.dumps(info.to_json(), indent=2, sort_keys=False) + "\n"
    except TypeError as e:
        raise DataError(root / INFO_FILE, f"source is not JSON-serialisable: {e}") from e
    root.mkdir(parents=True, exist_ok=True)
    (root / EPISODE_DIR).mkdir(exist_ok=True)
    # fs.write_json would format differently and stringify what JSON cannot hold; keep our text.
    try:
        fs.write_bytes(root / INFO_FILE, text.encode("utf-8"), overwrite=overwrite)
    except FileExistsError:
        raise _exists(root / INFO_FILE) from None
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
    if not (isinstance(index, (int, np.integer)) and not isinstance(index, bool) and index >= 0):
        raise DataError(root, f"episode index must be a non-negative integer, got {index!r}")
    dest = episode_path(root, int(index))
    if dest.exists() and not overwrite:
        raise _exists(dest)

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
            raise bad(f"latents dtype {obs.dtype}, expected a floating dtype (stored as float32)")
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
    arrays["actions"] = _normalise_actions(_to_numpy(actions), info.action_space, T, bad)

    for name, value in (("rewards", rewards), ("dones", dones)):
        declared = name in info.extras
        if value is None:
            if declared:
                raise bad(f"dataset.json declares extra {name!r}; pass {name}=")
            continue
        if not declared:
            raise bad(f"{name}= given but dataset.json does not list {name!r} in extras")
        v = _to_numpy(value)
        if v.shape != (T,):
            raise bad(f"{name} shape {tuple(v.shape)}, expected ({T},)")
        if name == "rewards":
            if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
                raise bad(f"rewards dtype {v.dtype}, expected a real number dtype")
            v = v.astype(np.float32)
            if not np.isfinite(v).all():
                raise bad("rewards contain NaN or inf")
        else:
            if v.dtype != np.bool_ and not (np.issubdtype(v.dtype, np.integer) and np.isin(v, (0, 1)).all()):
                raise bad(f"dones must be bool or 0/1, got dtype {v.dtype}")
            v = v.astype(np.bool_)
        arrays[name] = v

    saver = np.savez_compressed if compress else np.savez
    dest.parent.mkdir(parents=True, exist_ok=True)
    # new_file (a path), not fs.write_bytes: np.savez streams into the file, where building the
    # npz in memory first would double the peak memory of a long episode.
    try:
        with fs.new_file(dest, overwrite=overwrite) as tmp:
            with open(tmp, "xb") as f:
                saver(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
    except FileExistsError:  # another writer created this index first
        raise _exists(dest) from None
    return dest


def _to_numpy(x: Any) -> np.ndarray:
    # A torch tensor can only exist if torch was imported: no need to import it here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise_actions(a: np.ndarray, space: ActionSpace, T: int, bad: Callable[[str], DataError]) -> np.ndarray:
    if space.type == "continuous":
        if a.shape != (T, space.dim):
            raise bad(f"actions shape {tuple(a.shape)}, expected (T, A) = ({T}, {space.dim}) (A from dataset.json)")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise bad(f"actions dtype {a.dtype}, expected float32")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise bad("actions contain NaN or inf")
        return a
    n = space.num_actions
    if space.multi_hot:
        if a.shape != (T, n):
            raise bad(f"actions shape {tuple(a.shape)}, expected multi-hot (T, N) = ({T}, {n}) (N from dataset.json)")
        if a.dtype != np.bool_ and not (
            (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)) and np.isin(a, (0, 1)).all()
        ):
            raise bad("multi-hot actions must contain only 0 and 1")
        return a.astype(np.uint8)
    if a.shape != (T,):
        raise bad(f"actions shape {tuple(a.shape)}, expected discrete indices (T,) = ({T},)")
    if not np.issubdtype(a.dtype, np.integer):
        raise bad(f"actions dtype {a.dtype}, expected integer indices")
    if T and (a.min() < 0 or a.max() >= n):
        raise bad(f"discrete actions out of range [0, {n}): min {a.min()}, max {a.max()}")
    return a.astype(np.int64)


__all__ = ["create_dataset", "write_episode"]
