"""Atari recordings (benchmarks/atari/data.py): determinism, episode format, loader, overwrite rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("gymnasium")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import data as atari
from benchmarks.atari import emulator
from causalize.episodes import EpisodeDataset, list_episodes, read_info

TINY = emulator.RecordSettings(warmup=(0, 12))
GAMES = ["Breakout", "Freeway"]


def _clips(root: Path, seed: int = 0, **kw) -> dict:
    return atari.record_clips(GAMES, root, clips_per_game=2, clip_len=5, seed=seed, settings=TINY, **kw)


def _episodes(root: Path, seed: int = 0, split: str = "train", **kw) -> dict:
    return atari.record_episodes("Pong", root, episodes=3, length=8, seed=seed, split=split, settings=TINY, **kw)


def _arrays(root: Path) -> dict[int, dict[str, np.ndarray]]:
    return {i: atari.load_episode(root, i) for i in list_episodes(root)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(np.array_equal(a[i][k], b[i][k]) for k in a[i]) for i in a
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("atari")
    _clips(base / "clips")
    _episodes(base / "train")
    return {"clips": base / "clips", "train": base / "train", "base": base}


def test_same_seed_same_arrays_other_seed_or_split_differs(recorded, tmp_path):
    _clips(tmp_path / "clips")
    _episodes(tmp_path / "train")
    assert _same(_arrays(recorded["clips"]), _arrays(tmp_path / "clips"))
    assert _same(_arrays(recorded["train"]), _arrays(tmp_path / "train"))
    _episodes(tmp_path / "seed1", seed=1)
    _episodes(tmp_path / "test", split="test")
    for other in ("seed1", "test"):
        got = _arrays(tmp_path / other)
        assert not any(np.array_equal(got[i]["frames"], _arrays(recorded["train"])[i]["frames"]) for i in got)


def test_recording_does_not_depend_on_the_others(recorded, tmp_path):
    """Clip c of a game is keyed by (seed, game, c): recording fewer games or clips gives the same clip."""
    atari.record_clips(["Freeway"], tmp_path / "one", clips_per_game=1, clip_len=5, seed=0, settings=TINY)
    alone = atari.load_episode(tmp_path / "one", 0)
    full = atari.load_episode(recorded["clips"], 2)  # Freeway's first clip in the two-game dataset
    assert np.array_equal(alone["frames"], full["frames"])


def test_episode_format_and_shapes(recorded):
    info = read_info(recorded["train"])
    assert info.kind == "pixels" and info.shape == (64, 64, 3)
    assert info.action_space.to_json() == {"type": "discrete", "num_actions": 6, "multi_hot": False}
    assert info.extras == ("rewards",) and info.fps == 15.0
    assert info.source["action_meanings"][:2] == ["NOOP", "FIRE"]
    eps = _arrays(recorded["train"])
    assert sorted(eps) == [0, 1, 2]
    for ep in eps.values():
        assert ep["frames"].dtype == np.uint8 and ep["frames"].shape == (8, 64, 64, 3)
        assert ep["actions"].dtype == np.int64 and ep["actions"].shape == (8,)
        assert ep["rewards"].dtype == np.float32 and ep["rewards"].shape == (8,)
        assert 0 <= ep["actions"].min() and ep["actions"].max() < 6
        assert ep["actions"][-1] == 0  # padding row, never executed
        assert ep["frames"].std(axis=0).max() > 0  # something moves


def test_clip_dataset_maps_games_and_full_action_ids(recorded):
    info = read_info(recorded["clips"])
    assert info.action_space.num_actions == atari.FULL_ACTION_COUNT and info.extras == ()
    assert atari.clip_games(recorded["clips"]) == {0: "Breakout", 1: "Breakout", 2: "Freeway", 3: "Freeway"}
    allowed = {"Breakout": {0, 1, 3, 4}, "Freeway": {0, 2, 5}}  # minimal sets as full-set indices
    for i, game in atari.clip_games(recorded["clips"]).items():
        ep = atari.load_episode(recorded["clips"], i)
        assert ep["frames"].shape == (5, 64, 64, 3)
        assert set(ep["actions"].tolist()) <= allowed[game]


def test_loads_with_causalize_loader(recorded):
    ds = EpisodeDataset(recorded["train"], window=4, check_values=True)
    assert len(ds) == 3 * (8 - 4 + 1)
    item = ds[1]
    assert item["frames"].shape == (4, 3, 64, 64)
    assert float(item["frames"].min()) >= -1 and float(item["frames"].max()) <= 1
    assert item["actions"].shape == (4, 6) and item["action_mask"].all()
    assert ((item["action_index"] >= 0) & (item["action_index"] < 6)).all()
    clips = EpisodeDataset(recorded["clips"], window=5, check_values=True)
    assert len(clips) == 4 and clips[0]["actions"].shape == (5, 18)


def test_refuses_to_overwrite(recorded, tmp_path):
    before = _arrays(recorded["train"])
    with pytest.raises(FileExistsError, match="overwrite"):
        _episodes(recorded["train"], seed=5)
    assert _same(before, _arrays(recorded["train"]))
    (tmp_path / "empty").mkdir()
    _episodes(tmp_path / "empty")  # an empty directory is fine
    target = tmp_path / "ow"
    _episodes(target)
    (target / "stray.txt").write_text("old")
    _episodes(target, seed=5, overwrite=True)
    assert not (target / "stray.txt").exists()
    assert not _same(_arrays(target), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ow"]  # no temporaries left


def test_failed_recording_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="did you mean Pong"):
        atari.record_clips(["Freeway", "Pongg"], tmp_path / "bad", clips_per_game=1, clip_len=3, settings=TINY)
    real_write, calls = atari.write_episode, []

    def failing_write(*args, **kwargs):  # the second episode fails after the first was written
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(atari, "write_episode", failing_write)
    with pytest.raises(OSError, match="disk full"):
        atari.record_clips(["Freeway"], tmp_path / "bad", clips_per_game=2, clip_len=3, settings=TINY)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="held-out"):
        atari.record_default(tmp_path / "d", games=["Pong"], heldout="Pong")


def test_cli_records_and_prints_json(tmp_path, capsys):
    argv = [
        str(tmp_path),
        "--games",
        "Freeway",
        "--clips-per-game",
        "1",
        "--clip-len",
        "3",
        "--train-episodes",
        "2",
        "--test-episodes",
        "1",
        "--episode-len",
        "4",
        "--warmup",
        "0",
        "5",
    ]
    assert atari.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["datasets"]["pretrain"]["episodes"] == 1
    assert summary["datasets"]["train"]["episodes"] == 2 and summary["datasets"]["test"]["episodes"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(atari.DATASETS.values())
    assert atari.main(argv) == 2  # exists: refused
    assert "overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        atari.main(["--help"])
    assert "held-out" in capsys.readouterr().out


def _ball_frame(y: int, x: int) -> np.ndarray:
    frame = np.empty((210, 160, 3), np.uint8)
    frame[:] = (144, 72, 17)  # Pong's background
    frame[y : y + 4, x : x + 2] = 236  # the ball: 2 wide, 4 tall
    return frame


def test_downsampling_keeps_a_pong_sized_ball():
    """At every sub-pixel offset the 2x4 ball leaves a pixel with over 30% of its contrast (measured: >= 33.5%)."""
    bg = np.array([144, 72, 17])
    full = np.abs(236 - bg).sum()
    worst = min(
        np.abs(emulator.downsample(_ball_frame(100 + dy, 80 + dx)).astype(int) - bg).sum(-1).max() / full
        for dy in range(7)  # covers a whole period of the 210/64 and 160/64 grids
        for dx in range(5)
    )
    assert worst > 0.3


def test_recording_in_several_processes_writes_the_same_datasets(tmp_path):
    """Seaquest reads the RAM an emulator reset randomises, so a clip recorded from a fresh
    emulator differs from the same clip recorded after the others (the negative control: units
    smaller than a game would change the data); workers=2 keeps one emulator per game and writes
    the datasets (arrays and dataset.json) of one process."""
    settings = emulator.RecordSettings(warmup=(0, 400))
    game = atari._open_game("Seaquest", settings, 0)
    try:
        in_order = [emulator.record(game, 5, 0, "clips", "Seaquest", c).frames for c in range(3)]
    finally:
        game.close()
    fresh = atari._open_game("Seaquest", settings, 0)
    try:
        alone = emulator.record(fresh, 5, 0, "clips", "Seaquest", 2).frames
    finally:
        fresh.close()
    assert not np.array_equal(alone, in_order[2])

    summaries = [
        atari.record_clips(
            ["Seaquest", "Breakout"],
            tmp_path / f"w{workers}",
            clips_per_game=3,
            clip_len=5,
            settings=settings,
            workers=workers,
        )
        for workers in (1, 2)
    ]
    assert [d["processes"] for d in summaries] == [1, 2]  # the second one did run in two workers
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert np.array_equal(atari.load_episode(one, 2)["frames"], in_order[2])
    assert _same(_arrays(one), _arrays(two))
    assert json.loads((one / "dataset.json").read_text()) == json.loads((two / "dataset.json").read_text())
    with pytest.raises(ValueError, match="workers"):
        _clips(tmp_path / "bad", workers=0)


def test_record_default_in_workers_records_the_held_out_episodes_beside_the_clips(tmp_path, monkeypatch):
    """With workers > 1 every emulator runs in a worker, the held-out train and test datasets one
    each beside the clips' games, and the three datasets are those of one process. The parent's
    emulator openings are counted (a worker's are not): one process opens them all itself."""
    opened: list[str] = []
    real_open = atari._open_game

    def counting_open(game, settings, seed):
        opened.append(game)
        return real_open(game, settings, seed)

    monkeypatch.setattr(atari, "_open_game", counting_open)
    sizes = {"clips_per_game": 2, "clip_len": 5, "train_episodes": 2, "test_episodes": 1, "episode_len": 6}
    seen = {}
    for workers in (1, 3):
        opened.clear()
        logged: list[str] = []
        summary = atari.record_default(
            tmp_path / f"w{workers}", games=["Breakout"], settings=TINY, workers=workers, log=logged.append, **sizes
        )
        seen[workers] = list(opened)
        assert list(summary["datasets"]) == ["pretrain", "train", "test"]
        assert any(m.startswith("Pong (train): 2 episodes x 6 frames") for m in logged)
    assert seen == {1: ["Breakout", "Pong", "Pong"], 3: []}
    for name in atari.DATASETS.values():
        one, three = tmp_path / "w1" / name, tmp_path / "w3" / name
        assert _same(_arrays(one), _arrays(three)), name
        assert json.loads((one / "dataset.json").read_text()) == json.loads((three / "dataset.json").read_text())
    for bad in ({**sizes, "episode_len": 0}, {**sizes, "games": ["Breakout", "Breakout"]}):
        with pytest.raises(ValueError, match="episode_len|repeats"):  # refused before any worker starts
            atari.record_default(tmp_path / "bad", **{"games": ["Breakout"], **bad}, workers=3)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("workers", "games", "heldout", "error"),
    [
        (3, ["Breakout"], "Freeway", r"recording Breakout \(clips\): RuntimeError: Breakout: game over"),
        (
            3,
            ["Freeway"],
            "Breakout",
            r"recording Breakout \((train|test) episodes\): RuntimeError: Breakout: game over",
        ),
        (1, ["Freeway"], "Breakout", r"^Breakout: game over"),
    ],
)
def test_record_default_records_all_three_datasets_or_none(tmp_path, workers, games, heldout, error):
    """Breakout ends within a 1,500-step warm-up, Freeway (a 2,040-step game) does not: one failing
    dataset, in a worker or here, whether the clips or the held-out episodes, leaves none of the
    three (the others recorded fine), nor a temporary sibling; the error names the game."""
    doomed = emulator.RecordSettings(warmup=(1500, 1500), max_attempts=1)
    with pytest.raises(RuntimeError, match=error):
        atari.record_default(
            tmp_path / "d",
            games=games,
            heldout=heldout,
            clips_per_game=1,
            clip_len=5,
            train_episodes=1,
            test_episodes=1,
            episode_len=5,
            settings=doomed,
            workers=workers,
        )
    assert [p.name for p in tmp_path.rglob("*")] == ["d"]  # the datasets' parent, empty


def test_a_failing_worker_leaves_nothing_and_says_which_game(tmp_path):
    """A game over in every attempt (one attempt, a warm-up longer than a Breakout game) inside a
    worker: the error names the game (whichever fails first), and neither the dataset nor its temporary sibling is left."""
    doomed = emulator.RecordSettings(warmup=(3000, 3000), max_attempts=1)
    with pytest.raises(RuntimeError, match=r"recording (Breakout|Freeway) \(clips\): RuntimeError: \1: game over"):
        atari.record_clips(
            ["Freeway", "Breakout"], tmp_path / "d", clips_per_game=1, clip_len=5, settings=doomed, workers=2
        )
    assert list(tmp_path.iterdir()) == []
