"""Episode format and loader (causalize.episodes, docs/EPISODES.md)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from causalize.episodes import (
    ActionSpace,
    DataError,
    DataWarning,
    EpisodeDataset,
    create_dataset,
    episode_path,
    list_episodes,
    read_info,
    split_episodes,
    write_episode,
)

H, W, C = 4, 5, 3


def _frames(T, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(T, H, W, C), dtype=np.uint8)


def _arange_actions(T, A=2):
    # row t = (t, 100 + t, ...): the stored a_t is recognisable from its value.
    return np.stack([np.arange(T, dtype=np.float32) + 100 * j for j in range(A)], axis=1)


def _pixel_dataset(root, lengths, A=2, extras=()):
    create_dataset(
        root,
        {"type": "continuous", "dim": A},
        frame_shape=(H, W, C),
        fps=4,
        source={"test": True},
        extras=extras,
    )
    for i, T in enumerate(lengths):
        kw = {}
        if "rewards" in extras:
            kw["rewards"] = np.arange(T, dtype=np.float32) * 10
        if "dones" in extras:
            kw["dones"] = np.arange(T) == T - 2
        write_episode(root, i, frames=_frames(T, seed=i), actions=_arange_actions(T, A), **kw)
    return root


# ------------------------------------------------------------------------------------- round trip


def test_round_trip_shapes_dtypes_range(tmp_path):
    root = _pixel_dataset(tmp_path / "ds", [6, 9])
    info = read_info(root)
    assert info.kind == "pixels" and info.shape == (H, W, C) and info.fps == 4 and info.source == {"test": True}
    assert info.action_space == ActionSpace.continuous(2)
    assert list_episodes(root) == [0, 1]
    assert episode_path(root, 1).name == "000001.npz"

    ds = EpisodeDataset(root, window=4)
    item = ds[0]
    assert set(item) == {"frames", "actions", "action_mask", "episode", "start"}
    assert item["frames"].shape == (4, C, H, W) and item["frames"].dtype == torch.float32
    assert item["actions"].shape == (4, 2) and item["actions"].dtype == torch.float32
    assert item["action_mask"].dtype == torch.bool and item["action_mask"].shape == (4,)
    assert item["frames"].min() >= -1 and item["frames"].max() <= 1
    # exact pixel mapping and THWC -> TCHW
    raw = _frames(6, seed=0)[:4]
    expect = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["frames"], expect, rtol=0, atol=1e-6)
    # 0 and 255 land on the ends of the range
    ds2 = tmp_path / "ends"
    create_dataset(ds2, ActionSpace.continuous(1), frame_shape=(H, W, C))
    fr = np.zeros((2, H, W, C), np.uint8)
    fr[1] = 255
    write_episode(ds2, 0, frames=fr, actions=np.zeros((2, 1), np.float32))
    f = EpisodeDataset(ds2, window=2)[0]["frames"]
    assert f[0].eq(-1).all() and f[1].eq(1).all()


def test_action_alignment_start_zero_and_later(tmp_path):
    root = _pixel_dataset(tmp_path / "ds", [7])
    ds = EpisodeDataset(root, window=3)
    assert len(ds) == 5
    # window at s = 0: frame 0 has no action; frame t gets a_{t-1}
    it = ds[0]
    assert it["start"] == 0 and it["episode"] == 0
    assert it["action_mask"].tolist() == [False, True, True]
    assert it["actions"][:, 0].tolist() == [0.0, 0.0, 1.0]
    assert it["actions"][:, 1].tolist() == [0.0, 100.0, 101.0]
    # window at s = 2: row 0 is a_1 and is valid
    it = ds[2]
    assert it["start"] == 2
    assert it["action_mask"].tolist() == [True, True, True]
    assert it["actions"][:, 0].tolist() == [1.0, 2.0, 3.0]
    # the last window never reads the final action row a_{T-1}
    it = ds[-1]
    assert it["start"] == 4 and it["actions"][:, 0].tolist() == [3.0, 4.0, 5.0]
    # frames are the stored ones at [s, s + window)
    raw = _frames(7, seed=0)
    torch.testing.assert_close(it["frames"], torch.from_numpy(raw[4:7]).permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_extras_shift_like_actions(tmp_path):
    root = _pixel_dataset(tmp_path / "ds", [5], extras=("rewards", "dones"))
    ds = EpisodeDataset(root, window=5)
    it = ds[0]
    assert it["rewards"].dtype == torch.float32 and it["dones"].dtype == torch.bool
    assert it["rewards"].tolist() == [0.0, 0.0, 10.0, 20.0, 30.0]
    # dones[T-2] (the transition into the terminal frame) marks the last frame
    assert it["dones"].tolist() == [False, False, False, False, True]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    window=st.integers(1, 6),
    stride=st.integers(1, 4),
)
def test_window_count_and_positions(tmp_path_factory, lengths, window, stride):
    root = tmp_path_factory.mktemp("ds")
    create_dataset(root, ActionSpace.continuous(1), frame_shape=(1, 1, 1))
    for i, T in enumerate(lengths):
        write_episode(
            root,
            i,
            frames=np.zeros((T, 1, 1, 1), np.uint8),
            actions=np.arange(T, dtype=np.float32)[:, None],
        )
    usable = [T for T in lengths if T >= window]
    if not usable:
        with pytest.raises(DataError), warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            EpisodeDataset(root, window, stride=stride, skip_short=True)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = EpisodeDataset(root, window, stride=stride, skip_short=True)
    assert len(ds) == sum((T - window) // stride + 1 for T in usable)
    expected = [(i, s) for i, T in enumerate(lengths) if T >= window for s in range(0, T - window + 1, stride)]
    assert [ds.window_at(k) for k in range(len(ds))] == expected
    for k in range(len(ds)):
        it = ds[k]
        s = it["start"]
        want = np.arange(s - 1, s + window - 1, dtype=np.float32)
        mask = want >= 0
        assert it["action_mask"].numpy().tolist() == mask.tolist()
        assert it["actions"][:, 0].numpy().tolist() == np.where(mask, want, 0).tolist()


def test_deterministic_indexing(tmp_path):
    root = _pixel_dataset(tmp_path / "ds", [6, 8, 5])
    a = EpisodeDataset(root, window=3, stride=2)
    b = EpisodeDataset(root, window=3, stride=2)
    assert len(a) == len(b) == 2 + 3 + 2
    for k in range(len(a)):
        x, y = a[k], b[k]
        assert (x["episode"], x["start"]) == (y["episode"], y["start"])
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["actions"], y["actions"])
    # reading out of order (cache evictions) gives the same items
    c = EpisodeDataset(root, window=3, stride=2, cache_size=1)
    for k in reversed(range(len(a))):
        assert torch.equal(c[k]["frames"], a[k]["frames"])
    with pytest.raises(IndexError):
        a[len(a)]


# ------------------------------------------------------------------------------------------ split


def test_split_deterministic_disjoint(tmp_path):
    root = _pixel_dataset(tmp_path / "ds", [4] * 20)
    train, test = split_episodes(root, 0.25, seed=3)
    assert (train, test) == split_episodes(root, 0.25, seed=3)
    assert len(test) == 5 and not set(train) & set(test) and sorted(train + test) == list(range(20))
    assert split_episodes(root, 0.25, seed=4) != (train, test)
    tr = EpisodeDataset(root, 2, split="train", test_fraction=0.25, seed=3)
    te = EpisodeDataset(root, 2, split="test", test_fraction=0.25, seed=3)
    assert tr.episodes == train and te.episodes == test
    # a growing dataset keeps each episode's score: old test episodes stay in test or cross the
    # boundary, the split is never reshuffled
    for i in range(20, 40):
        write_episode(root, i, frames=_frames(4), actions=_arange_actions(4))
    _, test2 = split_episodes(root, 0.25, seed=3)
    assert len(test2) == 10 and set(test) <= set(test2)
    # edge cases
    assert split_episodes(root, 0.0)[1] == [] and split_episodes(root, 1.0)[0] == []
    assert len(split_episodes(root, 0.001)[1]) == 1
    assert EpisodeDataset(root, 2, split=[3, 1]).episodes == [1, 3]
    with pytest.raises(DataError, match="do not exist"):
        EpisodeDataset(root, 2, split=[999])


# -------------------------------------------------------------------------------- action spaces


def test_discrete_single(tmp_path):
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.discrete(5), frame_shape=(H, W, C))
    write_episode(root, 0, frames=_frames(6), actions=np.array([4, 0, 3, 1, 2, 2], dtype=np.int32))
    ds = EpisodeDataset(root, window=4)
    it = ds[0]
    assert it["action_index"].tolist() == [-1, 4, 0, 3]
    assert it["actions"].shape == (4, 5)
    assert it["actions"][0].eq(0).all()
    assert it["actions"].argmax(1)[1:].tolist() == [4, 0, 3] and it["actions"].sum(1).tolist() == [0, 1, 1, 1]
    assert ds[2]["action_index"].tolist() == [0, 3, 1, 2] and ds[2]["action_mask"].all()
    with pytest.raises(DataError, match="out of range"):
        write_episode(root, 1, frames=_frames(2), actions=np.array([0, 5]))
    with pytest.raises(DataError, match="integer"):
        write_episode(root, 1, frames=_frames(2), actions=np.array([0.0, 1.0]))


def test_discrete_multi_hot(tmp_path):
    root = tmp_path / "ds"
    create_dataset(
        root,
        {"type": "discrete", "num_actions": 4, "multi_hot": True},
        frame_shape=(H, W, C),
    )
    acts = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=bool)
    write_episode(root, 0, frames=_frames(4), actions=acts)
    ds = EpisodeDataset(root, window=4)
    it = ds[0]
    assert "action_index" not in it
    assert it["actions"].dtype == torch.float32
    assert it["actions"].tolist() == [
        [0, 0, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 0],
        [1, 1, 1, 1],
    ]
    assert it["action_mask"].tolist() == [False, True, True, True]
    with pytest.raises(DataError, match="only 0 and 1"):
        write_episode(root, 1, frames=_frames(1), actions=np.array([[0, 2, 0, 0]]))


def test_latents(tmp_path):
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.continuous(3), frame_shape=(4, 2, 3), kind="latents")
    lat = np.random.default_rng(0).normal(size=(5, 4, 2, 3)) * 3  # float64, unbounded: stored as float32
    write_episode(root, 0, latents=lat, actions=np.zeros((5, 3)), compress=True)
    ds = EpisodeDataset(root, window=5)
    it = ds[0]
    assert it["frames"].dtype == torch.float32 and it["frames"].shape == (5, 4, 2, 3)
    torch.testing.assert_close(it["frames"], torch.from_numpy(lat.astype(np.float32)))
    with pytest.raises(DataError, match="frames="):
        write_episode(root, 1, frames=_frames(5), actions=np.zeros((5, 3)))


# ----------------------------------------------------------------------------------- malformed


def _raw_episode(root, index, **arrays):
    np.savez(episode_path(root, index), **arrays)
    return episode_path(root, index)


@pytest.fixture
def empty_ds(tmp_path):
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.continuous(2), frame_shape=(H, W, C))
    write_episode(root, 0, frames=_frames(5), actions=_arange_actions(5))
    return root


@pytest.mark.parametrize(
    "arrays, match",
    [
        (
            {
                "frames": np.zeros((5, H, W, 4), np.uint8),
                "actions": np.zeros((5, 2), np.float32),
            },
            "frames shape",
        ),
        (
            {
                "frames": np.zeros((5, H, W), np.uint8),
                "actions": np.zeros((5, 2), np.float32),
            },
            "frames shape",
        ),
        (
            {
                "frames": np.zeros((5, H, W, C), np.float32),
                "actions": np.zeros((5, 2), np.float32),
            },
            "frames dtype",
        ),
        (
            {
                "frames": np.zeros((5, H, W, C), np.uint8),
                "actions": np.zeros((4, 2), np.float32),
            },
            "length mismatch",
        ),
        (
            {
                "frames": np.zeros((5, H, W, C), np.uint8),
                "actions": np.zeros((5, 3), np.float32),
            },
            "action dim 2",
        ),
        (
            {
                "frames": np.zeros((5, H, W, C), np.uint8),
                "actions": np.zeros((5, 2), np.float64),
            },
            "actions dtype",
        ),
        ({"frames": np.zeros((5, H, W, C), np.uint8)}, "missing array 'actions'"),
        (
            {
                "latents": np.zeros((5, C, H, W), np.float32),
                "actions": np.zeros((5, 2), np.float32),
            },
            "missing array 'frames'",
        ),
    ],
)
def test_malformed_episode_names_file(empty_ds, arrays, match):
    bad = _raw_episode(empty_ds, 7, **arrays)
    with pytest.raises(DataError, match=match) as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(bad) in str(e.value) and e.value.path == str(bad)


def test_several_bad_files_are_all_listed(empty_ds):
    b1 = _raw_episode(
        empty_ds,
        3,
        frames=np.zeros((5, H, W, C), np.uint8),
        actions=np.zeros((4, 2), np.float32),
    )
    b2 = _raw_episode(
        empty_ds,
        4,
        frames=np.zeros((5, H, W, 1), np.uint8),
        actions=np.zeros((5, 2), np.float32),
    )
    with pytest.raises(DataError) as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(b1) in str(e.value) and str(b2) in str(e.value)
    assert [p for p, _ in e.value.problems] == [str(b1), str(b2)]


def test_corrupt_npz(empty_ds):
    bad = episode_path(empty_ds, 1)
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="corrupt") as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(bad) in str(e.value)
    # truncated real npz
    good = episode_path(empty_ds, 0).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt") as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(bad) in str(e.value)


def test_nan_actions_and_latents(empty_ds, tmp_path):
    a = _arange_actions(5)
    a[3, 1] = np.nan
    bad = _raw_episode(empty_ds, 1, frames=_frames(5), actions=a)
    with pytest.raises(DataError, match="NaN") as e:  # headers are fine; actions are checked at open
        EpisodeDataset(empty_ds, window=2)
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="NaN") as e:
        EpisodeDataset(empty_ds, window=2, check_values=True)
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="NaN"):
        write_episode(empty_ds, 2, frames=_frames(5), actions=a)

    root = tmp_path / "lat"
    create_dataset(root, ActionSpace.continuous(1), frame_shape=(1, 2, 2), kind="latents")
    lat = np.zeros((3, 1, 2, 2), np.float32)
    lat[2, 0, 1, 1] = np.nan
    bad = _raw_episode(root, 0, latents=lat, actions=np.zeros((3, 1), np.float32))
    ds = EpisodeDataset(root, window=2)
    ds[0]
    with pytest.raises(DataError, match="latents contain NaN") as e:
        ds[1]
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="NaN"):
        write_episode(root, 1, latents=lat, actions=np.zeros((3, 1), np.float32))


def test_too_short_error_and_skip(empty_ds):
    s1 = _raw_episode(empty_ds, 1, frames=_frames(2), actions=_arange_actions(2))
    s2 = _raw_episode(empty_ds, 2, frames=_frames(3), actions=_arange_actions(3))
    with pytest.raises(DataError, match="shorter than window=4") as e:
        EpisodeDataset(empty_ds, window=4)
    assert str(s1) in str(e.value) and str(s2) in str(e.value) and "skip_short=True" in str(e.value)
    with pytest.warns(DataWarning, match="skipping 2 episode") as w:
        ds = EpisodeDataset(empty_ds, window=4, skip_short=True)
    assert str(s1) in str(w[0].message)
    assert ds.episodes == [0] and len(ds) == 2


def test_missing_or_bad_dataset_json(tmp_path, empty_ds):
    root = tmp_path / "nojson"
    (root / "episodes").mkdir(parents=True)
    with pytest.raises(DataError, match="missing dataset.json") as e:
        EpisodeDataset(root, window=2)
    assert str(root / "dataset.json") in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        EpisodeDataset(tmp_path / "nowhere", window=2)

    info = empty_ds / "dataset.json"
    good = info.read_text()
    info.write_text("{not json")
    with pytest.raises(DataError, match="corrupt dataset.json") as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(info) in str(e.value)
    obj = json.loads(good)
    for mutate, match in [
        (lambda o: o.update(action_space={"type": "continuous", "dim": 0}), "dim"),
        (lambda o: o.update(action_space={"type": "joystick"}), "continuous"),
        (lambda o: o.update(version=99), "newer"),
        (lambda o: o.pop("observation"), "observation"),
        (lambda o: o.update(extras=["value"]), "extras"),
    ]:
        o = json.loads(good)
        mutate(o)
        info.write_text(json.dumps(o))
        with pytest.raises(DataError, match=match) as e:
            read_info(empty_ds)
        assert str(info) in str(e.value)
    info.write_text(json.dumps(obj))
    assert read_info(empty_ds).action_space.dim == 2


def test_bad_episode_names_and_empty(tmp_path, empty_ds):
    bad = empty_ds / "episodes" / "12.npz"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="zero-padded") as e:
        EpisodeDataset(empty_ds, window=2)
    assert str(bad) in str(e.value)
    root = tmp_path / "empty"
    create_dataset(root, ActionSpace.continuous(1), frame_shape=(1, 1, 1))
    with pytest.raises(DataError, match="no episodes"):
        EpisodeDataset(root, window=1)


# ------------------------------------------------------------------------------------- writing


def test_write_refuses_overwrite_and_validates(tmp_path, empty_ds):
    p = episode_path(empty_ds, 0)
    before = p.read_bytes()
    with pytest.raises(DataError, match="already exists") as e:
        write_episode(empty_ds, 0, frames=_frames(3), actions=_arange_actions(3))
    assert str(p) in str(e.value) and p.read_bytes() == before
    write_episode(empty_ds, 0, frames=_frames(3), actions=_arange_actions(3), overwrite=True)
    assert EpisodeDataset(empty_ds, window=1).episode_lengths == {0: 3}
    # no temporaries left behind, also after a failed write
    with pytest.raises(DataError):
        write_episode(empty_ds, 5, frames=_frames(3), actions=_arange_actions(2))
    assert sorted(x.name for x in (empty_ds / "episodes").iterdir()) == ["000000.npz"]

    with pytest.raises(DataError, match="already exists"):
        create_dataset(empty_ds, ActionSpace.continuous(2), frame_shape=(H, W, C))
    with pytest.raises(DataError, match="frames dtype"):
        write_episode(
            empty_ds,
            1,
            frames=_frames(3).astype(np.float32),
            actions=_arange_actions(3),
        )
    with pytest.raises(DataError, match="frames shape"):
        write_episode(empty_ds, 1, frames=_frames(3)[..., :2], actions=_arange_actions(3))
    with pytest.raises(DataError, match=r"\(T, A\)"):
        write_episode(empty_ds, 1, frames=_frames(3), actions=_arange_actions(3, A=3))
    with pytest.raises(DataError, match="extras"):
        write_episode(
            empty_ds,
            1,
            frames=_frames(3),
            actions=_arange_actions(3),
            rewards=np.zeros(3),
        )
    with pytest.raises(DataError, match="does not exist"):
        write_episode(tmp_path / "nowhere-ds", 0, frames=_frames(3), actions=_arange_actions(3))
    (tmp_path / "no-json").mkdir()
    with pytest.raises(DataError, match="missing dataset.json"):
        write_episode(tmp_path / "no-json", 0, frames=_frames(3), actions=_arange_actions(3))
    with pytest.raises(DataError, match="index"):
        write_episode(empty_ds, -1, frames=_frames(3), actions=_arange_actions(3))
    # torch tensors are accepted
    write_episode(
        empty_ds,
        1,
        frames=torch.from_numpy(_frames(3)),
        actions=torch.zeros(3, 2, dtype=torch.float64),
    )
    assert list_episodes(empty_ds) == [0, 1]


# ---------------------------------------------------------------------------------- DataLoader


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_collates(tmp_path, workers):
    root = _pixel_dataset(tmp_path / "ds", [6, 7], extras=("rewards", "dones"))
    ds = EpisodeDataset(root, window=4)
    loader = DataLoader(
        ds,
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
    )
    batches = list(loader)
    b = batches[0]
    assert b["frames"].shape == (3, 4, C, H, W) and b["actions"].shape == (3, 4, 2)
    assert b["action_mask"].shape == (3, 4) and b["action_mask"].dtype == torch.bool
    assert b["rewards"].shape == (3, 4) and b["dones"].dtype == torch.bool
    assert b["episode"].dtype == torch.int64 and b["start"].shape == (3,)
    seen = sorted((int(e), int(s)) for bb in batches for e, s in zip(bb["episode"], bb["start"]))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    # mask is False exactly where the window starts at an episode's first frame
    for bb in batches:
        assert torch.equal(~bb["action_mask"][:, 0], bb["start"] == 0)


def test_written_files_get_ordinary_permissions(tmp_path):
    """Writes go through a private temporary (0600); dataset.json and episodes end up with
    0666 & ~umask, like open() gives."""
    import os
    import stat

    for umask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            root = tmp_path / f"ds{umask:o}"
            create_dataset(root, ActionSpace.continuous(2), frame_shape=(H, W, C))
            ep = write_episode(root, 0, frames=_frames(3), actions=_arange_actions(3))
        finally:
            os.umask(old)
        for p in (root / "dataset.json", ep):
            assert stat.S_IMODE(p.stat().st_mode) == want, p
