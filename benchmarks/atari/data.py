"""Deterministic Atari recordings in the causalize episode format (``docs/EPISODES.md``).

Two kinds of dataset, both written with ``causalize.episodes.create_dataset/write_episode``:

* **clips** (:func:`record_clips`): short clips from several games, the stand-in for action-free
  "internet video" used to pretrain the bidirectional model. The format has no action-free mode,
  so each clip also stores the behaviour policy's actions, as indices into ALE's full 18-action
  set (one space for every game). They are a by-product: **pretraining must ignore them**.
* **episodes** (:func:`record_episodes`): action-labelled episodes of one held-out game; actions
  are indices into that game's minimal action set, with per-transition ``rewards``. The train and
  test sets are separate datasets recorded from disjoint random streams (``split=``).

How a game is stepped and recorded, and why it is reproducible: ``benchmarks.atari.emulator``.

``workers=N`` records in up to N processes: the clip datasets' games one per process, one emulator
per game exactly as one process does, and (:func:`record_default`) the held-out train and test
datasets one per process beside them, each one emulator's sequence. The datasets are the same for
any N (tested, against the negative control of ``benchmarks.atari.emulator``'s last point).

A dataset is recorded into a hidden temporary sibling directory and renamed into place at the
end, so a crash never leaves a half-written dataset at ``out_dir``; :func:`record_default` puts
its three in place together once all are recorded, so a failure leaves none. An existing
non-empty ``out_dir`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.atari.emulator import AtariGame, RecordSettings, check_games, check_seed, keyed_rng, record
from causalize import fs
from causalize.episodes import (
    ActionSpace,
    create_dataset,
    episode_path,
    list_episodes,
    read_info,
    write_episode,
)

__all__ = [
    "DATASETS",
    "DEFAULT_GAMES",
    "DEFAULT_HELDOUT",
    "FULL_ACTION_COUNT",
    "clip_games",
    "load_episode",
    "main",
    "record_clips",
    "record_default",
    "record_episodes",
]

#: Pretraining games: paddles, shooters, crossing, racing, top-down -- varied motion.
DEFAULT_GAMES: tuple[str, ...] = (
    "Breakout",
    "SpaceInvaders",
    "Freeway",
    "Enduro",
    "Boxing",
    "Seaquest",
)
DEFAULT_HELDOUT = "Pong"
#: ALE's full action set; clip actions are stored as indices into it.
FULL_ACTION_COUNT = 18
#: Sub-directories written by :func:`record_default`.
DATASETS = {
    "pretrain": "pretrain_clips",
    "train": "heldout_train",
    "test": "heldout_test",
}


# ------------------------------------------------------------------------------ work units


@dataclass(frozen=True)
class _Unit:
    """Every recording of one game in a dataset, made in order by one emulator (a process's work)."""

    root: str
    game: str
    keys: tuple[str, ...]  # ("clips",) or ("episodes", split): the random stream's names
    count: int  # recordings 0 .. count - 1
    first_episode: int  # episode index of recording 0
    length: int
    seed: int
    settings: RecordSettings


def _open_game(game: str, settings: RecordSettings, seed: int) -> AtariGame:
    """The game's emulator, its env seed keyed by (seed, game): the one a game's recordings share."""
    return AtariGame(game, settings, env_seed=int(keyed_rng(seed, "env", game).integers(2**31)))


def _record_with(game: AtariGame, unit: _Unit) -> None:
    """Record and write a unit's episodes with ``game``'s emulator, in order. Clips store full-set
    action ids, held-out episodes minimal-set ones and their rewards."""
    clips = unit.keys[0] == "clips"
    for i in range(unit.count):
        rec = record(game, unit.length, unit.seed, unit.keys[0], unit.game, *unit.keys[1:], i)
        if clips:
            write_episode(unit.root, unit.first_episode + i, frames=rec.frames, actions=game.full_ids[rec.actions])
        else:
            write_episode(
                unit.root, unit.first_episode + i, frames=rec.frames, actions=rec.actions, rewards=rec.rewards
            )


def _record_unit(unit: _Unit) -> tuple[float, int]:
    """:func:`_record_with` a fresh emulator of the unit's game; its seconds and the recording process."""
    t0 = time.perf_counter()
    game = _open_game(unit.game, unit.settings, unit.seed)
    try:
        _record_with(game, unit)
    finally:
        game.close()
    return time.perf_counter() - t0, os.getpid()


#: Errors a worker passes back as they are (they pickle, and callers such as the CLI catch them).
_PASSED_THROUGH = (ValueError, FileExistsError)


def _in_child(label: str, work: Callable[..., Any], *args: Any) -> Any:
    """``work(*args)`` in a worker: an error comes back as a RuntimeError naming what was being
    recorded (some, e.g. causalize's DataError, cannot be rebuilt in the parent), but
    :data:`_PASSED_THROUGH` as is."""
    try:
        return work(*args)
    except _PASSED_THROUGH:
        raise
    except Exception as exc:
        raise RuntimeError(f"recording {label}: {type(exc).__name__}: {exc}") from None


def _spawn_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` fresh processes (spawned: the parent may hold torch's threads, which a fork
    would copy in an unknown state)."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_units(
    units: Sequence[_Unit],
    workers: int,
    done: Callable[[_Unit, float, int], None],
    pool: concurrent.futures.Executor | None = None,
) -> None:
    """Record every unit, here (``workers`` <= 1 and no ``pool``) or in worker processes: ``pool``,
    or up to ``workers`` of :func:`_spawn_pool`; ``done(unit, seconds, pid)`` as each finishes.
    The first error cancels the units not started and is raised once the running ones have
    stopped, so nothing writes into the staged dataset afterwards."""
    if pool is None and (workers <= 1 or len(units) <= 1):
        for unit in units:
            done(unit, *_record_unit(unit))
        return
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(_spawn_pool(min(workers, len(units))))
        futures = {
            pool.submit(_in_child, f"{unit.game} ({' '.join(unit.keys)})", _record_unit, unit): unit for unit in units
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], *future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise


# ---------------------------------------------------------------------------------- datasets


@contextlib.contextmanager
def _staged(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` only on success.

    An existing empty ``out_dir`` is replaced like an overwrite (it holds nothing to lose); a
    non-empty one only with ``overwrite``, checked again before the swap.
    """
    out = Path(out_dir)
    _check_target(out, overwrite)
    replace = overwrite or out.is_dir()  # _check_target let through only an empty directory
    with fs.new_directory(out, overwrite=replace) as tmp:
        yield tmp
        _check_target(out, overwrite)  # someone may have written it meanwhile


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _summary(root: Path, kind: str, seconds: float, **fields: Any) -> dict[str, Any]:
    info = read_info(root)
    indices = list_episodes(root)
    size = sum(episode_path(root, i).stat().st_size for i in indices)
    return {
        "path": str(root),
        "kind": kind,
        **fields,
        "episodes": len(indices),
        "action_space": info.action_space.to_json(),
        "frame_shape": list(info.shape),
        "fps": info.fps,
        "bytes": size,
        "seconds": round(seconds, 2),
    }


def _source(settings: RecordSettings, seed: int, **fields: Any) -> dict[str, Any]:
    import ale_py

    return {
        "name": "Arcade Learning Environment",
        "ale_py": ale_py.__version__,
        "env": "ALE/<game>-v5, repeat_action_probability=0, full_action_space=False",
        "preprocessing": "max of the last two emulator frames of each step, box resize 210x160 -> size x size",
        "policy": "uniform random over the minimal action set, previous action kept with probability repeat_prob",
        "settings": settings.to_json(),
        "seed": int(seed),
        **fields,
    }


def _game_list(games: Sequence[str]) -> list[str]:
    games = list(games)
    if not games or len(set(games)) != len(games):
        raise ValueError(f"games must be a non-empty list without repeats, got {games!r}")
    return games


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def record_clips(
    games: Sequence[str],
    out_dir: str | os.PathLike,
    clips_per_game: int = 32,
    clip_len: int = 16,
    seed: int = 0,
    *,
    overwrite: bool = False,
    settings: RecordSettings | None = None,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Record ``clips_per_game`` clips of ``clip_len`` frames per game; return a JSON summary.

    Episodes are numbered game by game (game g holds ``g*clips_per_game ...``); ``source["clips"]``
    and :func:`clip_games` give the mapping. Actions are full-set indices and unused by pretraining.
    ``workers``: processes that record, one game each at a time (the same arrays for any number).
    """
    games = _game_list(games)
    _positive(clips_per_game=clips_per_game, clip_len=clip_len, workers=workers)
    check_games(games)
    settings = settings or RecordSettings()
    started = time.perf_counter()
    with _staged(out_dir, overwrite) as tmp:
        fields = _record_clips_into(tmp, games, clips_per_game, clip_len, seed, settings, log, workers)
    return _summary(Path(out_dir), "clips", time.perf_counter() - started, **fields)


def _record_clips_into(
    tmp: Path,
    games: list[str],
    clips_per_game: int,
    clip_len: int,
    seed: int,
    settings: RecordSettings,
    log: Callable[[str], None] | None,
    workers: int,
    pool: concurrent.futures.Executor | None = None,
) -> dict[str, Any]:
    """The clips dataset written into ``tmp`` (:func:`_run_units`: here, in ``workers`` processes
    or in ``pool``); the summary's fields that only the recording knows."""
    ranges = [{"game": g, "episodes": [k * clips_per_game, (k + 1) * clips_per_game]} for k, g in enumerate(games)]
    create_dataset(
        tmp,
        ActionSpace.discrete(FULL_ACTION_COUNT),
        frame_shape=(settings.size, settings.size, 3),
        fps=settings.fps,
        source=_source(
            settings,
            seed,
            role="action-free pretraining clips; actions are ALE full-set indices of the behaviour policy, NOT for training",
            clips=ranges,
        ),
    )
    units = [
        _Unit(str(tmp), g, ("clips",), clips_per_game, k * clips_per_game, clip_len, seed, settings)
        for k, g in enumerate(games)
    ]
    processes: set[int] = set()

    def done(unit: _Unit, seconds: float, pid: int) -> None:
        processes.add(pid)
        if log:
            log(f"{unit.game}: {clips_per_game} clips x {clip_len} frames in {seconds:.1f}s")

    _run_units(units, workers, done, pool)
    return {"games": games, "frames_per_episode": clip_len, "workers": workers, "processes": len(processes)}


def record_episodes(
    game: str,
    out_dir: str | os.PathLike,
    episodes: int = 32,
    length: int = 64,
    seed: int = 0,
    *,
    split: str = "train",
    overwrite: bool = False,
    settings: RecordSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Record ``episodes`` action-labelled episodes of ``length`` frames of one game.

    Actions index the game's minimal action set (``action_space`` discrete, ``num_actions`` = its
    size; meanings in ``source["action_meanings"]``); ``rewards`` is stored as an extra. ``split``
    keys the random stream, so ``split="train"`` and ``"test"`` with one seed never share episodes.
    One emulator records them in order (``benchmarks.atari.emulator``), in this process: the one
    that also gives the dataset its action set.
    """
    _positive(episodes=episodes, length=length)
    check_games([game])
    settings = settings or RecordSettings()
    with _staged(out_dir, overwrite) as tmp:
        seconds = _record_episodes_into(tmp, game, episodes, length, seed, split, settings)
    if log:
        log(_episodes_line(game, split, episodes, length, seconds))
    return _summary(Path(out_dir), "episodes", seconds, game=game, split=split, frames_per_episode=length)


def _record_episodes_into(
    tmp: Path, game: str, episodes: int, length: int, seed: int, split: str, settings: RecordSettings
) -> float:
    """The held-out dataset written into ``tmp`` by one emulator; its seconds."""
    started = time.perf_counter()
    g = _open_game(game, settings, seed)
    try:
        create_dataset(
            tmp,
            ActionSpace.discrete(g.num_actions),
            frame_shape=(settings.size, settings.size, 3),
            extras=("rewards",),
            fps=settings.fps,
            source=_source(
                settings,
                seed,
                role=f"action-labelled episodes of the held-out game ({split} split)",
                game=game,
                split=split,
                action_meanings=g.action_meanings,
                full_action_ids=g.full_ids.tolist(),
            ),
        )
        _record_with(g, _Unit(str(tmp), game, ("episodes", split), episodes, 0, length, seed, settings))
    finally:
        g.close()
    return time.perf_counter() - started


def _episodes_line(game: str, split: str, episodes: int, length: int, seconds: float) -> str:
    return f"{game} ({split}): {episodes} episodes x {length} frames in {seconds:.1f}s"


def record_default(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    games: Sequence[str] = DEFAULT_GAMES,
    heldout: str = DEFAULT_HELDOUT,
    clips_per_game: int = 32,
    clip_len: int = 16,
    train_episodes: int = 32,
    test_episodes: int = 8,
    episode_len: int = 64,
    overwrite: bool = False,
    settings: RecordSettings | None = None,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Record the study's three datasets under ``out_dir`` (names in :data:`DATASETS`): all three
    or none (each is staged, and all are put in place once every one is recorded). With
    ``workers`` > 1 in up to that many processes, the held-out train and test episodes one dataset
    each (started first), the clips one game each (the same arrays for any number).

    Pretraining clips of ``games`` and train / test episodes of ``heldout``, which must not be a
    pretraining game. All targets and counts are checked before anything is recorded.
    """
    games = _game_list(games)
    if heldout in games:
        raise ValueError(f"the held-out game {heldout!r} is also a pretraining game")
    check_games([*games, heldout])
    root = Path(out_dir)
    for name in DATASETS.values():
        _check_target(root / name, overwrite)
    counts = {"train": train_episodes, "test": test_episodes}
    _positive(
        clips_per_game=clips_per_game,
        clip_len=clip_len,
        train_episodes=train_episodes,
        test_episodes=test_episodes,
        episode_len=episode_len,
        workers=workers,
    )
    check_seed(seed)  # here, not in a worker
    settings = settings or RecordSettings()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(_staged(root / name, overwrite)) for key, name in DATASETS.items()}
        pool = stack.enter_context(_spawn_pool(min(workers, len(games) + 2))) if workers > 1 else None
        held = {split: (heldout, n, episode_len, seed, split, settings) for split, n in counts.items()}
        pending: dict[str, concurrent.futures.Future] = {}
        if pool is not None:  # submitted first, so they start at once beside the clips' games
            for split in held:
                label = f"{heldout} ({split} episodes)"
                pending[split] = pool.submit(_in_child, label, _record_episodes_into, tmp[split], *held[split])
        try:
            clips = _record_clips_into(
                tmp["pretrain"], games, clips_per_game, clip_len, seed, settings, log, workers, pool
            )
            seconds = {"pretrain": time.perf_counter() - started}
            for split in held:
                seconds[split] = pending[split].result() if pool else _record_episodes_into(tmp[split], *held[split])
                if log:
                    log(_episodes_line(heldout, split, counts[split], episode_len, seconds[split]))
        except BaseException:
            for future in pending.values():
                future.cancel()  # not started; the pool's exit waits for the running ones, then the staging goes
            raise
    # all three are in place only now
    summaries = {"pretrain": _summary(root / DATASETS["pretrain"], "clips", seconds["pretrain"], **clips)}
    for split in held:
        summaries[split] = _summary(
            root / DATASETS[split],
            "episodes",
            seconds[split],
            game=heldout,
            split=split,
            frames_per_episode=episode_len,
        )
    return {"seed": seed, "datasets": summaries}


# ----------------------------------------------------------------------------------- reading


def load_episode(root: str | os.PathLike, index: int) -> dict[str, np.ndarray]:
    """All arrays of one stored episode (frames uint8 THWC, actions as stored, extras)."""
    with np.load(episode_path(root, index), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def clip_games(root: str | os.PathLike) -> dict[int, str]:
    """Episode index -> game name for a dataset written by :func:`record_clips`."""
    out: dict[int, str] = {}
    for r in read_info(root).source["clips"]:
        lo, hi = r["episodes"]
        out.update({i: r["game"] for i in range(lo, hi)})
    return out


# ---------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.atari.data",
        description=(
            "Record the Atari study's datasets: action-free pretraining clips from several games and "
            "action-labelled train/test episodes of a held-out game, in causalize's episode format. "
            "Prints a JSON summary on stdout; progress goes to stderr."
        ),
    )
    p.add_argument("out_dir", help=f"directory that receives {', '.join(DATASETS.values())}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--games", nargs="+", default=list(DEFAULT_GAMES), help="pretraining games (ALE names)")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, help="held-out, action-labelled game")
    p.add_argument("--clips-per-game", type=int, default=32)
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--train-episodes", type=int, default=32)
    p.add_argument("--test-episodes", type=int, default=8)
    p.add_argument("--episode-len", type=int, default=64)
    d = RecordSettings()
    p.add_argument("--frameskip", type=int, default=d.frameskip)
    p.add_argument("--size", type=int, default=d.size, help="frame side in pixels")
    p.add_argument("--repeat-prob", type=float, default=d.repeat_prob, help="behaviour policy: P(keep previous action)")
    p.add_argument(
        "--warmup",
        type=int,
        nargs=2,
        default=list(d.warmup),
        metavar=("MIN", "MAX"),
        help="random warm-up steps before recording",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that record, up to N at a time: the train and the test episodes one dataset each (started "
        "first), the clips one game each (the same datasets for any number; default 1)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = RecordSettings(args.frameskip, args.size, args.repeat_prob, tuple(args.warmup))
        summary = record_default(
            args.out_dir,
            seed=args.seed,
            games=args.games,
            heldout=args.heldout,
            clips_per_game=args.clips_per_game,
            clip_len=args.clip_len,
            train_episodes=args.train_episodes,
            test_episodes=args.test_episodes,
            episode_len=args.episode_len,
            overwrite=args.overwrite,
            settings=settings,
            log=lambda m: print(m, file=sys.stderr, flush=True),
            workers=args.workers,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
