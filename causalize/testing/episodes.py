"""A toy pixel episode dataset whose actions matter: a square that an action moves, for examples
and tests of the whole path (encode, train, roll out) without downloading data.

    python -m causalize.testing.episodes ./episodes --episodes 4 --frames 13 --size 32

Actions are discrete: 0 keeps the square in place, 1 moves it right, 2 moves it down (by a
quarter of the square's side, wrapping around). Frame t+1 is frame t moved by action t, as the
episode format stores it (docs/EPISODES.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_toy_episodes"]

MOVES = {0: (0, 0), 1: (0, 1), 2: (1, 0)}


def _frame(size: int, y: int, x: int, side: int, colour: np.ndarray) -> np.ndarray:
    img = np.full((size, size, 3), 24, dtype=np.uint8)
    ys = (np.arange(side) + y) % size
    xs = (np.arange(side) + x) % size
    img[np.ix_(ys, xs)] = colour
    return img


def write_toy_episodes(
    root: str | os.PathLike, *, episodes: int = 4, frames: int = 13, size: int = 32, seed: int = 0
) -> Path:
    """Write ``episodes`` episodes of ``frames`` frames of ``size``×``size`` RGB pixels to a new
    dataset at ``root`` (an existing dataset.json is an error)."""
    from causalize.episodes import ActionSpace, create_dataset, write_episode

    if episodes < 1 or frames < 1 or size < 4:
        raise ValueError("episodes and frames must be >= 1 and size >= 4")
    create_dataset(root, ActionSpace.discrete(3), frame_shape=(size, size, 3), fps=4, source={"name": "toy squares"})
    rng = np.random.default_rng(seed)
    side, step = max(size // 4, 1), max(size // 16, 1)
    for i in range(episodes):
        actions = rng.integers(0, 3, frames)
        y, x = (int(v) for v in rng.integers(0, size, 2))
        colour = rng.integers(96, 256, 3).astype(np.uint8)
        video = []
        for t in range(frames):
            video.append(_frame(size, y, x, side, colour))
            dy, dx = MOVES[int(actions[t])]
            y, x = (y + dy * step) % size, (x + dx * step) % size
        write_episode(root, i, frames=np.stack(video), actions=actions)
    return Path(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m causalize.testing.episodes", description="Write a toy pixel episode dataset (moving squares)."
    )
    parser.add_argument("out", type=Path, help="dataset root to create")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=13, help="frames per episode (Wan's VAE wants 1 + 4k)")
    parser.add_argument("--size", type=int, default=32, help="frame height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        print(write_toy_episodes(args.out, episodes=args.episodes, frames=args.frames, size=args.size, seed=args.seed))
    except Exception as exc:  # a DataError (exists) or a bad number: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
