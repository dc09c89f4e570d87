"""Actions on compressed latents: latent frame j carries the actions of the video frames it covers.

Stored convention (docs/EPISODES.md): ``actions[t]`` is the action taken after frame t, producing
frame t+1. A latent episode keeps it, one row per latent frame: row j holds, concatenated slot by
slot, the actions that produce the video frames of latent frame j+1, in frame order:

    row j = [a_{s-1}, a_s, ..., a_{e-2}]   where latent frame j+1 covers video frames s .. e-1

With a causal video VAE (first frame alone, then groups of k) that is ``a_{kj}, ..., a_{kj+k-1}``;
with an image VAE (k = 1) the rows are the video's own. The loader's shift by one then gives
latent frame j exactly the actions that produced its k frames, and latent frame 0 (the episode's
first frame, or first group) the null action, as for pixel episodes. Every row a model reads is
complete, so no slot needs a mask. The last row would produce a latent frame past the episode:
never read, its missing slots are zeros.

Slot encodings follow the episode loader: a continuous space of A dimensions becomes k·A
dimensions; a discrete space of N actions becomes a multi-hot space of k·N (each slot one-hot);
a multi-hot space of N becomes one of k·N. Rewards add up over a row's transitions, dones are any.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from causalize.episodes import ActionSpace
from causalize.latents.spec import TimeGrouping

__all__ = ["group_actions", "group_rows", "latent_action_space", "slot_rows"]


def latent_action_space(space: ActionSpace, slots: int) -> ActionSpace:
    """The action space of a latent episode whose rows hold ``slots`` video actions each."""
    if slots == 1:
        return space
    if space.type == "continuous":
        return ActionSpace.continuous(space.width * slots)
    return ActionSpace.discrete(space.width * slots, multi_hot=True)


def slot_rows(actions: np.ndarray, space: ActionSpace) -> np.ndarray:
    """Stored actions (T,) or (T, A) as float rows (T, width): discrete indices one-hot."""
    a = np.asarray(actions)
    if space.type == "discrete" and not space.multi_hot:
        rows = np.zeros((a.shape[0], space.width), dtype=np.float32)
        rows[np.arange(a.shape[0]), a.astype(np.int64)] = 1.0
        return rows
    return a.reshape(a.shape[0], -1).astype(np.float32)


def group_rows(rows: np.ndarray, grouping: TimeGrouping, latent_frames: int) -> np.ndarray:
    """Per-video-frame rows (T, w) → per-latent-frame rows (J, k·w) by the rule in the module
    docstring (zeros where a slot lies past the episode)."""
    k, width = grouping.factor, rows.shape[1]
    out = np.zeros((latent_frames, k * width), dtype=rows.dtype)
    for j in range(latent_frames):
        for slot, t in enumerate(grouping.covers(j + 1)):
            if 0 <= t - 1 < rows.shape[0]:
                out[j, slot * width : (slot + 1) * width] = rows[t - 1]
    return out


def group_actions(actions: np.ndarray, space: ActionSpace, grouping: TimeGrouping, latent_frames: int) -> np.ndarray:
    """A video episode's stored actions → the latent episode's, in the dtype its space stores
    (float32 continuous, uint8 multi-hot). With ``factor == 1`` the actions come back as stored."""
    if grouping.factor == 1:
        return np.asarray(actions)[:latent_frames]
    grouped = group_rows(slot_rows(actions, space), grouping, latent_frames)
    return grouped if space.type == "continuous" else grouped.astype(np.uint8)


def group_extras(values: Any, grouping: TimeGrouping, latent_frames: int, how: str) -> np.ndarray:
    """Rewards ("sum") or dones ("any") of the transitions in each latent row."""
    v = np.asarray(values)
    if grouping.factor == 1:
        return v[:latent_frames]
    rows = group_rows(v.reshape(-1, 1).astype(np.float32), grouping, latent_frames)
    return rows.sum(axis=1).astype(np.float32) if how == "sum" else rows.any(axis=1)
