"""The episode dataset format (docs/EPISODES.md), shared by training, rollout, encoding and the
benchmarks: ``format`` (dataset.json, file names, validation), ``writer`` (create_dataset,
write_episode), ``reader`` (array headers, memory-mapped arrays) and ``dataset`` (the torch
EpisodeDataset and train/test splits).

The torch part loads on first use, so writing or reading episodes does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from causalize.episodes.format import (
    EPISODE_DIR,
    EXTRAS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_FILE,
    ActionSpace,
    ArrayLike,
    DataError,
    DatasetInfo,
    DataWarning,
    episode_path,
    episode_problems,
    list_episodes,
    read_info,
)
from causalize.episodes.reader import ArrayHeader, load_arrays, read_arrays, read_headers, read_leading, verify_crc
from causalize.episodes.writer import create_dataset, write_episode

if TYPE_CHECKING:
    from causalize.episodes.dataset import EpisodeDataset, split_episodes

_LAZY = {"EpisodeDataset", "split_episodes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from causalize.episodes import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'causalize.episodes' has no attribute {name!r}")


__all__ = [
    "EPISODE_DIR",
    "EXTRAS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INFO_FILE",
    "ActionSpace",
    "ArrayHeader",
    "ArrayLike",
    "DataError",
    "DataWarning",
    "DatasetInfo",
    "EpisodeDataset",
    "create_dataset",
    "episode_path",
    "episode_problems",
    "list_episodes",
    "load_arrays",
    "read_arrays",
    "read_headers",
    "read_info",
    "read_leading",
    "split_episodes",
    "verify_crc",
    "write_episode",
]
