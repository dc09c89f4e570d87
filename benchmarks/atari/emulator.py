"""One ALE game stepped, observed and recorded the study's way (``benchmarks.atari.data`` makes
datasets of such recordings).

Recording, and why it is reproducible:

* Sticky actions are off (``repeat_action_probability=0``). With them off the ALE emulator is
  deterministic: the same action sequence from a reset gives the same pixels whatever the env
  seed (checked for Pong, Breakout, Enduro and SpaceInvaders). The env seed is still set.
* Each agent step repeats its action for ``frameskip`` emulator frames (4: 60 Hz -> 15 fps). The
  observation is the pixel-wise max of the last two emulator frames, which removes sprite flicker
  (as in DQN), then a box (area-average) resize from 210x160 to ``size`` x ``size`` (64; the aspect
  ratio is not kept). Area averaging keeps 1-2 pixel objects such as Pong's ball as a fainter pixel
  instead of dropping them as point sampling may.
* Behaviour policy: random with persistence, so motion is visible and controllable -- each step
  keeps the previous action with probability ``repeat_prob`` and otherwise draws uniformly from
  the game's minimal action set. The default 0.5 (holds last 2 steps on average) is a compromise
  measured on Pong (16 episodes of 64 frames): with 0.75 the agent's paddle sits against the top
  wall in 38% of frames and moves in 41% of them, with 0.5 27% / 54%, with 0 17% / 67%; a
  pinned paddle makes actions invisible, while longer holds give longer coherent motions.
* Every recording starts with a random warm-up of W policy steps, W uniform in ``warmup``, so
  recordings show varied game states rather than the start screen. A game over during warm-up or
  recording discards the attempt and redraws it.
* Every clip / episode draws its own generator (policy, warm-up) from ``(seed, kind, game,
  split, index, attempt)``. The emulator is another matter: a reset re-randomises the console's
  RAM from the env's own generator, seeded once per game, and some games read it, so a
  recording's pixels can depend on the resets before it in the same emulator. Measured at the
  gpu scale's warm-up of up to 400 steps: Seaquest's clips 1-9 of its first 12 differ when each
  is recorded from a fresh emulator, and 58 of the 768 clips (Seaquest 35, Boxing 13, Freeway 10;
  none of Breakout, SpaceInvaders, Enduro, nor Pong's episodes) when each game's 128 clips are
  recorded in runs of 32 from fresh emulators. So one emulator records a game's clips, or a
  dataset's episodes, in order.
"""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "RAW_FPS",
    "AtariGame",
    "RecordSettings",
    "Recording",
    "StickyRandomPolicy",
    "check_games",
    "check_seed",
    "downsample",
    "keyed_rng",
    "record",
]

#: The emulator's frame rate; a recording keeps one frame in ``frameskip``.
RAW_FPS = 60.0


@dataclass(frozen=True)
class RecordSettings:
    """How frames are produced; recorded in each dataset's ``source``."""

    frameskip: int = 4
    size: int = 64
    repeat_prob: float = 0.5
    warmup: tuple[int, int] = (0, 200)
    max_attempts: int = 20

    def __post_init__(self) -> None:
        if self.frameskip < 1 or self.size < 1 or self.max_attempts < 1:
            raise ValueError(f"frameskip, size and max_attempts must be >= 1: {self}")
        if not 0.0 <= self.repeat_prob < 1.0:
            raise ValueError(f"repeat_prob must be in [0, 1): {self.repeat_prob}")
        lo, hi = self.warmup
        if not 0 <= lo <= hi:
            raise ValueError(f"warmup must be (min, max) with 0 <= min <= max: {self.warmup}")

    @property
    def fps(self) -> float:
        return RAW_FPS / self.frameskip

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warmup"] = list(self.warmup)
        return d


# ------------------------------------------------------------------------------ environment


def _gym() -> Any:
    try:
        import ale_py
        import gymnasium
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("recording Atari needs ale-py and gymnasium: pip install ale-py gymnasium") from e
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # its banner goes to stdout
    gymnasium.register_envs(ale_py)
    return gymnasium


def check_games(games: Sequence[str]) -> None:
    """Raise ValueError naming the first unknown game, before any recording starts."""
    registry = _gym().registry
    known = sorted(k[4:-3] for k in registry if k.startswith("ALE/") and k.endswith("-v5"))
    for game in games:
        if f"ALE/{game}-v5" not in registry:
            close = difflib.get_close_matches(game, known, n=3)
            raise ValueError(f"unknown Atari game {game!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _make_env(game: str) -> Any:
    check_games([game])
    return _gym().make(
        f"ALE/{game}-v5",
        frameskip=1,  # skipping is done here, to max-pool the last two frames
        repeat_action_probability=0.0,
        full_action_space=False,
    )


def downsample(frame: np.ndarray, size: int = 64) -> np.ndarray:
    """Area-average an RGB uint8 frame (H, W, 3) to (size, size, 3) uint8."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))


class AtariGame:
    """One ALE game stepped at ``frameskip`` with flicker max-pooling and downsampling."""

    def __init__(self, game: str, settings: RecordSettings, env_seed: int = 0):
        self.name = game
        self.settings = settings
        self.env = _make_env(game)
        self.env.reset(seed=int(env_seed))
        actions = self.env.unwrapped.ale.getMinimalActionSet()
        self.num_actions = len(actions)
        #: minimal-set index -> full-set (0..17) index
        self.full_ids = np.array([a.value for a in actions], dtype=np.int64)
        self.action_meanings = list(self.env.unwrapped.get_action_meanings())

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset()
        return downsample(obs, self.settings.size)

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        """Repeat ``action`` for ``frameskip`` frames: (frame, summed reward, game over)."""
        prev = last = None
        reward, over = 0.0, False
        for _ in range(self.settings.frameskip):
            obs, r, terminated, truncated, _ = self.env.step(int(action))
            reward += float(r)
            prev, last = last, obs
            if terminated or truncated:
                over = True
                break
        raw = last if prev is None else np.maximum(prev, last)
        return downsample(raw, self.settings.size), reward, over

    def close(self) -> None:
        self.env.close()


class StickyRandomPolicy:
    """Uniform random actions held for a geometric number of steps (mean ``1/(1-repeat_prob)``)."""

    def __init__(self, num_actions: int, repeat_prob: float, rng: np.random.Generator):
        self.num_actions = num_actions
        self.repeat_prob = repeat_prob
        self.rng = rng
        self.action: int | None = None

    def __call__(self) -> int:
        if self.action is None or self.rng.random() >= self.repeat_prob:
            self.action = int(self.rng.integers(self.num_actions))
        return self.action


def check_seed(seed: Any) -> None:
    """Refuse a seed :func:`keyed_rng` cannot key by (callers check before handing work to workers)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def keyed_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator keyed by the seed and names, independent of any other recording."""
    check_seed(seed)
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(words)


@dataclass
class Recording:
    frames: np.ndarray  # (T, size, size, 3) uint8
    actions: np.ndarray  # (T,) int64 minimal-set indices; the last row is padding (0)
    rewards: np.ndarray  # (T,) float32
    warmup: int
    attempt: int


def _record_once(game: AtariGame, rng: np.random.Generator, length: int) -> Recording | None:
    """Warm up, then record ``length`` frames; None on a game over."""
    s = game.settings
    policy = StickyRandomPolicy(game.num_actions, s.repeat_prob, rng)
    warm = int(rng.integers(s.warmup[0], s.warmup[1] + 1))
    frame = game.reset()
    for _ in range(warm):
        frame, _, over = game.step(policy())
        if over:
            return None
    frames, actions, rewards = [frame], [], []
    for _ in range(length - 1):
        a = policy()
        frame, r, over = game.step(a)
        if over:
            return None
        frames.append(frame)
        actions.append(a)
        rewards.append(r)
    actions.append(0)  # a_{T-1} is never executed (EPISODES.md: padding row)
    rewards.append(0.0)
    return Recording(
        np.stack(frames),
        np.asarray(actions, dtype=np.int64),
        np.asarray(rewards, dtype=np.float32),
        warm,
        0,
    )


def record(game: AtariGame, length: int, seed: int, *keys: str | int) -> Recording:
    """One recording keyed by ``keys``; redrawn (next attempt) after a game over."""
    for attempt in range(game.settings.max_attempts):
        rec = _record_once(game, keyed_rng(seed, *keys, attempt), length)
        if rec is not None:
            rec.attempt = attempt
            return rec
    raise RuntimeError(
        f"{game.name}: game over in all {game.settings.max_attempts} attempts to record {length} frames "
        f"after up to {game.settings.warmup[1]} warm-up steps; use shorter recordings or warm-up"
    )
