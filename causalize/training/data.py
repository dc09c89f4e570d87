"""Deprecated: the episode format moved to :mod:`causalize.episodes`.

This module keeps the public names it used to define importable from here, with a
DeprecationWarning at the importing line; import them from ``causalize.episodes`` instead. It will
be removed.
"""

from __future__ import annotations

import warnings
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        warnings.warn(
            f"causalize.training.data.{name} is deprecated; import it from causalize.episodes",
            DeprecationWarning,
            stacklevel=2,
        )
        import causalize.episodes

        return getattr(causalize.episodes, name)
    raise AttributeError(f"module 'causalize.training.data' has no attribute {name!r}")
