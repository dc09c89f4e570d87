"""Rollout files (causalize.rollout.io, causalize.rollout.loading): reading context frames and
actions in every supported format, model-space conversion, atomic no-clobber writes, and the
precedence of sampler settings (option > training.json > default). No model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from causalize.errors import CheckpointError, UsageError
from causalize.rollout.io import (
    Frames,
    actions_to_tensor,
    as_frames,
    check_output,
    frames_to_model,
    model_to_frames,
    read_actions,
    read_frames,
    write_frames,
)
from causalize.rollout.loading import checkpoint_dir, resolve_config

iio = pytest.importorskip("imageio.v3")


def _pixels(t=5, h=16, w=16, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, c), dtype=np.uint8)


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- context frames --------------------------------------------------------------------------


def test_episode_npz_pixels_and_latents(tmp_path):
    frames = _pixels()
    np.savez(tmp_path / "ep.npz", frames=frames, actions=np.zeros(5, np.int64))
    got = read_frames(tmp_path / "ep.npz")
    assert got.kind == "pixels" and got.data.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(got.data, frames)
    latents = np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "lat.npz", latents=latents)
    got = read_frames(tmp_path / "lat.npz", context_frames=2)
    assert got.kind == "latents" and got.count == 2 and got.channels == 4
    np.testing.assert_array_equal(got.data, latents[:2])


def test_npy_and_media_files(tmp_path):
    frames = _pixels(4)
    np.save(tmp_path / "px.npy", frames)
    np.save(tmp_path / "one.npy", frames[0])  # a single (H, W, C) frame
    np.save(tmp_path / "lat.npy", frames.astype(np.float32).transpose(0, 3, 1, 2))
    assert read_frames(tmp_path / "px.npy").data.shape == (4, 16, 16, 3)
    assert read_frames(tmp_path / "one.npy").count == 1
    assert read_frames(tmp_path / "lat.npy").kind == "latents"
    iio.imwrite(tmp_path / "a.png", frames[0])
    np.testing.assert_array_equal(read_frames(tmp_path / "a.png").data, frames[:1])  # PNG is lossless
    iio.imwrite(tmp_path / "g.png", frames[0, :, :, 0])  # grayscale -> 1 channel
    assert read_frames(tmp_path / "g.png").data.shape == (1, 16, 16, 1)
    iio.imwrite(tmp_path / "a.gif", frames, duration=100, loop=0)
    assert read_frames(tmp_path / "a.gif").count == 4
    iio.imwrite(tmp_path / "a.mp4", frames, fps=8, macro_block_size=1)
    assert read_frames(tmp_path / "a.mp4", context_frames=3).data.shape == (3, 16, 16, 3)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("missing.npz", None, "not found"),
        ("bad.npz", b"not a zip", "cannot read as .npz"),
        ("bad.gif", b"GIF89", "cannot read as .gif"),
        ("bad.npy", b"\x93NUMPY garbage", "cannot read as .npy"),
        ("clip.xyz", b"", "unknown context format"),
    ],
)
def test_unreadable_context_names_the_file(tmp_path, name, content, needle):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=needle) as info:
        read_frames(tmp_path / name)
    assert name in str(info.value)


def test_malformed_context(tmp_path):
    np.savez(tmp_path / "nokey.npz", images=_pixels())
    with pytest.raises(UsageError, match="no 'frames' or 'latents'"):
        read_frames(tmp_path / "nokey.npz")
    np.savez(tmp_path / "f32.npz", frames=_pixels().astype(np.float32))
    with pytest.raises(UsageError, match="uint8"):
        read_frames(tmp_path / "f32.npz")
    np.save(tmp_path / "nan.npy", np.full((2, 4, 8, 8), np.nan, np.float32))
    with pytest.raises(UsageError, match="NaN"):
        read_frames(tmp_path / "nan.npy")
    np.save(tmp_path / "i64.npy", _pixels().astype(np.int64))
    with pytest.raises(UsageError, match="floating point"):
        read_frames(tmp_path / "i64.npy")


def test_context_frames_selection(tmp_path):
    np.savez(tmp_path / "ep.npz", frames=_pixels(3))
    assert read_frames(tmp_path / "ep.npz", context_frames=3).count == 3
    with pytest.raises(UsageError, match=r"ep\.npz has 3 frame\(s\), fewer than the 4"):
        read_frames(tmp_path / "ep.npz", context_frames=4)
    with pytest.raises(UsageError, match=">= 1"):
        read_frames(tmp_path / "ep.npz", context_frames=0)


def test_model_space_round_trip():
    frames = Frames(_pixels(3), "pixels")
    x = frames_to_model(frames, frame_axis=2, channels=3)
    assert x.shape == (1, 3, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0, :, 1], torch.from_numpy(frames.data[1]).permute(2, 0, 1).float() / 127.5 - 1)
    np.testing.assert_array_equal(model_to_frames(x, 2, "pixels").data, frames.data)
    svd = frames_to_model(frames, frame_axis=1)  # (B, T, C, H, W)
    assert svd.shape == (1, 3, 3, 16, 16)
    clipped = model_to_frames(torch.full((1, 3, 1, 2, 2), 7.0), 2, "pixels").data
    assert clipped.dtype == np.uint8 and (clipped == 255).all()
    rgba = Frames(_pixels(2, c=4), "pixels")
    assert frames_to_model(rgba, 2, channels=3).shape[1] == 3  # alpha dropped
    with pytest.raises(UsageError, match="3 channels, the model's sample has 4"):
        frames_to_model(frames, 2, channels=4)


def test_as_frames_single_frame_and_dtype():
    assert as_frames(_pixels(1)[0], "pixels").count == 1
    assert as_frames(torch.zeros(2, 4, 8, 8), "latents").data.dtype == np.float32
    with pytest.raises(UsageError, match="uint8"):
        as_frames(np.zeros((2, 8, 8, 3), np.float32), "pixels")


# --- actions -----------------------------------------------------------------------------------


def test_action_file_formats(tmp_path):
    (tmp_path / "d.txt").write_text("# one index per line\n0\n2\n\n1\n")
    np.testing.assert_array_equal(read_actions(tmp_path / "d.txt"), [0, 2, 1])
    (tmp_path / "c.txt").write_text("0.5 -1\n0, 0.25\n")
    np.testing.assert_array_equal(read_actions(tmp_path / "c.txt"), [[0.5, -1.0], [0.0, 0.25]])
    (tmp_path / "a.json").write_text(json.dumps([[0.1, 0.2], [0.3, 0.4]]))
    assert read_actions(tmp_path / "a.json").shape == (2, 2)
    (tmp_path / "o.json").write_text(json.dumps({"actions": [1, 2, 3]}))
    assert read_actions(tmp_path / "o.json").dtype.kind == "i"
    np.save(tmp_path / "a.npy", np.arange(4))
    assert read_actions(tmp_path / "a.npy").shape == (4,)
    np.savez(tmp_path / "ep.npz", frames=_pixels(2), actions=np.ones((2, 3), np.float32))
    assert read_actions(tmp_path / "ep.npz").shape == (2, 3)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("ragged.txt", "1 2\n3\n", "line 2 has 1 values"),
        ("word.txt", "1\nleft\n", "line 2: 'left' is not a number"),
        ("empty.txt", "# nothing\n", "no actions"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("ragged.json", "[[1, 2], [3]]", "same length"),
        ("str.json", '["up", "down"]', "numbers"),
    ],
)
def test_malformed_action_files(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=needle) as info:
        read_actions(tmp_path / name)
    assert name in str(info.value)


def test_actions_checked_against_the_adapter():
    assert actions_to_tensor(np.array([0, 3]), "discrete", 4).tolist() == [[0, 3]]
    multi = actions_to_tensor(np.array([[1, 0, 1, 0]], np.uint8), "discrete", 4)
    assert multi.shape == (1, 1, 4) and multi.dtype == torch.float32
    assert actions_to_tensor(np.ones((3, 2)), "continuous", 2).shape == (1, 3, 2)
    assert actions_to_tensor(np.ones(3), "continuous", 1).shape == (1, 3, 1)
    cases = [
        (np.array([0.0, 1.0]), "discrete", 4, "integer indices"),
        (np.array([0, 4]), "discrete", 4, r"\[0, 4\)"),
        (np.array([-1]), "discrete", 4, r"\[0, 4\)"),
        (np.array([[0, 2, 0, 0]]), "discrete", 4, "0 or 1"),
        (np.ones((2, 3)), "continuous", 2, "2-dimensional.*dimension 3"),
        (np.array([[0.0, np.nan]]), "continuous", 2, "NaN"),
        (np.ones(3), "continuous", 2, "shape"),
        (np.array([True, False]), "continuous", 1, "booleans"),
        (np.zeros((0,), np.int64), "discrete", 4, "no actions"),
    ]
    for arr, kind, dim, needle in cases:
        with pytest.raises(UsageError, match=needle):
            actions_to_tensor(arr, kind, dim, "acts.txt")


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".npz"])
def test_write_frames_round_trip(tmp_path, ext):
    frames = Frames(_pixels(6), "pixels")
    out = write_frames(tmp_path / f"clip{ext}", frames, fps=4, actions=np.arange(3), meta={"a": 1}, context_frames=3)
    assert _listing(tmp_path) == [f"clip{ext}"]  # no temporary file left behind
    if ext == ".npz":
        z = np.load(out)
        np.testing.assert_array_equal(z["frames"], frames.data)
        assert int(z["context_frames"]) == 3 and json.loads(str(z["rollout"])) == {"a": 1}
    else:
        assert iio.imread(out, index=None).shape == (6, 16, 16, 3)


def test_odd_sizes_are_padded_for_mp4(tmp_path):
    out = write_frames(tmp_path / "odd.mp4", Frames(_pixels(2, 15, 9), "pixels"))
    assert iio.imread(out, index=None).shape == (2, 16, 10, 3)


def test_no_overwrite_unless_asked(tmp_path):
    dest = tmp_path / "clip.npz"
    dest.write_bytes(b"keep me")
    frames = Frames(_pixels(2), "pixels")
    with pytest.raises(UsageError, match="exists"):
        write_frames(dest, frames)
    assert dest.read_bytes() == b"keep me" and _listing(tmp_path) == ["clip.npz"]
    write_frames(dest, frames, overwrite=True)
    assert np.load(dest)["frames"].shape == (2, 16, 16, 3) and _listing(tmp_path) == ["clip.npz"]


def test_output_checks(tmp_path):
    with pytest.raises(UsageError, match="unknown output format"):
        check_output(tmp_path / "clip.avi")
    with pytest.raises(UsageError, match="latent frames cannot be written as .mp4"):
        check_output(tmp_path / "clip.mp4", "latents")
    lat = Frames(np.zeros((2, 4, 8, 8), np.float32), "latents")
    assert "latents" in np.load(write_frames(tmp_path / "lat.npz", lat)).files


# --- sampler settings from the checkpoint ------------------------------------------------------


def test_config_precedence(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config, sources = resolve_config(ckpt)
    assert config.prediction_type == "v" and config.window == 16 and set(sources.values()) == {"default"}
    (ckpt / "training.json").write_text(
        json.dumps({"config": {"prediction_type": "epsilon", "zero_terminal_snr": False, "window": 6, "lr": 1e-4}})
    )
    config, sources = resolve_config(ckpt, window=3, steps=None)
    assert (config.prediction_type, config.zero_terminal_snr, config.window, config.steps) == ("epsilon", False, 3, 50)
    assert (
        sources["prediction_type"] == "training.json"
        and sources["window"] == "option"
        and sources["steps"] == "default"
    )
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "causalize.json").write_text("{}")
    assert checkpoint_dir(run) == run / "final"
    with pytest.raises(UsageError, match="unknown rollout option"):
        resolve_config(ckpt, stepz=3)
    with pytest.raises(UsageError, match="eta"):
        resolve_config(ckpt, eta=2.0)
    (ckpt / "training.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="training.json"):
        resolve_config(ckpt)
