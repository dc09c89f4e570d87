"""The torch view of an episode dataset: train/test splits and fixed-length windows.

:class:`EpisodeDataset` serves every fixed-length window whose frames lie inside one episode, with
the actions re-indexed to what the model consumes: ``item["actions"][t]`` is the action that
PRODUCED frame t, i.e. a_{s+t-1} for a window starting at s. Only the first frame of an episode has
no such action; it gets a zero row and ``action_mask[0] = False`` (docs/EPISODES.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from causalize.episodes.format import (
    EPISODE_DIR,
    ActionSpace,
    DataError,
    DatasetInfo,
    DataWarning,
    episode_path,
    episode_problems,
    list_episodes,
    read_info,
)
from causalize.episodes.reader import CHECKSUM_MISMATCH, ArrayHeader, load_arrays, read_headers, verify_crc


def _split_score(seed: int, index: int) -> int:
    h = hashlib.blake2b(f"causalize-split:{int(seed)}:{int(index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def split_episodes(root: str | os.PathLike, test_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
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


@dataclass(frozen=True)
class _Episode:
    index: int
    path: Path
    length: int
    members: dict[str, ArrayHeader]


def _check_episode(path: Path, index: int, info: DatasetInfo) -> tuple[_Episode | None, list[str]]:
    """Header-level validation: keys, dtypes, shapes, lengths. Returns (episode, problems)."""
    try:
        members = read_headers(path)
    except DataError as e:
        return None, [problem for _, problem in e.problems]
    T, problems = episode_problems(members, info)
    if problems:
        return None, problems
    return _Episode(index, path, T, members), []


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


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

    Construction validates everything a training run needs before its first step, and raises one
    :class:`DataError` listing every bad file: dataset.json; every selected episode's npz headers
    (keys, dtypes, shapes, lengths); with ``verify=True`` (the default) every episode read once in
    full against the CRC-32 checksums its zip recorded at write time (the memory-mapped item reads
    skip them, so a flipped bit would otherwise train silently); and the values of the small
    arrays, actions and rewards (NaN/inf, action ranges, multi-hot 0/1). Episodes shorter than
    ``window`` are an error, or skipped with a :class:`DataWarning` when ``skip_short=True``.
    Latents are checked for NaN/inf when an item is read, or up front with ``check_values=True``.

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
        verify: bool = True,
        cache_size: int = 4,
        transform: Callable[[dict], dict] | None = None,
    ):
        if not _positive_int(window):
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not _positive_int(stride):
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
                raise ValueError(f'split must be None, "train", "test" or a list of episode indices, got {split!r}')
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
            if ep is not None and verify:
                probs = verify_crc(path)
            problems += [(str(path), p) for p in probs]
            if ep is None or probs:
                continue
            if ep.length < window:
                short.append((str(path), ep.length))
                continue
            episodes.append(ep)
        if problems:
            damaged = any(CHECKSUM_MISMATCH in problem for _, problem in problems)
            raise _many(problems, "restore the damaged files or write those episodes again" if damaged else None)
        if short:
            listing = ", ".join(f"{p} (T={t})" for p, t in short[:20]) + (
                f", ... ({len(short)} in all)" if len(short) > 20 else ""
            )
            if not skip_short:
                raise DataError(
                    short[0][0],
                    f"episode shorter than window={window}: {listing}; pass --skip-short to skip short episodes (skip_short = true in a config file; skip_short=True in Python)",
                    problems=[(p, f"episode length {t} < window {window}") for p, t in short],
                )
            warnings.warn(
                f"skipping {len(short)} episode(s) shorter than window={window}: {listing}",
                DataWarning,
                stacklevel=2,
            )
        if not episodes:
            raise DataError(self.root, f"no usable episodes for window={window} in split {split!r}")

        self._episodes = episodes
        counts = np.array([(e.length - window) // stride + 1 for e in episodes], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        # Values now, not mid-run: actions and rewards are small, latents only when asked.
        small = ["actions", *(n for n in self.info.extras if n == "rewards")]
        value_problems: list[tuple[str, str]] = []
        for k, ep in enumerate(episodes):
            arrays = self._arrays(k) if check_values else load_arrays(ep.path, ep.members, small)
            try:
                self._check_values(k, arrays, 0, ep.length, latents=check_values)
            except DataError as e:
                value_problems += e.problems
        if value_problems:
            raise _many(value_problems)

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
        arrays = load_arrays(ep.path, ep.members, [self.info.key, "actions", *self.info.extras])
        if self.cache_size:
            self._cache[k] = arrays
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arrays

    def _check_values(self, k: int, arrays: dict[str, np.ndarray], lo: int, hi: int, latents: bool = True) -> None:
        """Value checks on frames [lo, hi) and the actions rows that feed them."""
        ep = self._episodes[k]
        if latents and self.info.kind == "latents" and not np.isfinite(arrays["latents"][lo:hi]).all():
            raise DataError(ep.path, f"latents contain NaN or inf in frames [{lo}, {hi})")
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
                raise DataError(ep.path, "multi-hot actions contain values other than 0 and 1")
        elif a.size and (a.min() < 0 or a.max() >= space.num_actions):
            raise DataError(
                ep.path,
                f"discrete actions out of range [0, {space.num_actions}): min {a.min()}, max {a.max()}",
            )
        if "rewards" in arrays and not np.isfinite(arrays["rewards"][max(lo - 1, 0) : max(hi - 1, 0)]).all():
            raise DataError(ep.path, "rewards contain NaN or inf")

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, s = self._locate(i)
        index = self._episodes[k].index
        arrays = self._arrays(k)
        W = self.window
        self._check_values(k, arrays, s, s + W)

        obs = np.array(arrays[self.info.key][s : s + W])  # copy out of the memory map
        if self.info.kind == "pixels":
            frames = torch.from_numpy(obs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
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
            out[first:] = torch.from_numpy(np.array(arrays[name][s - 1 + first : s + W - 1]))
            item[name] = out
        item["episode"] = index
        item["start"] = s
        return self.transform(item) if self.transform is not None else item


def _many(problems: list[tuple[str, str]], hint: str | None = None) -> DataError:
    if len(problems) == 1:
        p, msg = problems[0]
        return DataError(p, msg, problems=problems, hint=hint)
    shown = "\n".join(f"  {p}: {msg}" for p, msg in problems[:20])
    more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > 20 else ""
    return DataError(
        problems[0][0],
        f"{len(problems)} problems in episode files:\n{shown}{more}",
        problems=problems,
        hint=hint,
    )


__all__ = ["EpisodeDataset", "split_episodes"]
