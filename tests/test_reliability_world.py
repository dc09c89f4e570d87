"""Issue 13, the world-model commands: bad rollout inputs are one-line usage errors before any
model work, writers never clobber and check before working, episode datasets are validated when
they are opened (checksums, action values) so that training fails before it creates anything,
and every one-line error carries its hint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

import causalize.rollout.arrays as arrays_mod
import causalize.rollout.io as rio
import causalize.rollout.sampler as sampler_mod
from causalize.api import convert
from causalize.cli.app import app
from causalize.episodes import (
    ActionSpace,
    DataError,
    EpisodeDataset,
    create_dataset,
    episode_path,
    read_headers,
    write_episode,
)
from causalize.plugin_manager import registries
from causalize.training.checkpoints import METRICS_FILE, OutputClaim
from causalize.training.trainer import TrainConfig, TrainingError, train

runner = CliRunner()
N_ACTIONS = 4
FAST = ("--steps", "1", "--window", "4", "--device", "cpu")


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_usage_error(result, *needles: str) -> None:
    """Exit 2, `error:` and `hint:` lines only (no progress bar, no traceback)."""
    assert_one_line_error(result, 2, *needles)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: "), result.stderr


# ------------------------------------------------------------------------------------- fixtures


def _unet(root: Path, name: str, **extra) -> Path:
    from diffusers import UNet3DConditionModel

    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    UNet3DConditionModel(**{**plan.tiny_config, "in_channels": 3, "out_channels": 3, **extra}).save_pretrained(
        root / name
    )
    return root / name


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A discrete (4 actions) and a continuous (2-D) world model, one with a 4-level UNet that
    cannot take 1×1 frames, and good input files."""
    root = tmp_path_factory.mktemp("reliability-world")
    src = _unet(root, "src")
    convert(src, root / "wm", action_dim=N_ACTIONS, action_type="discrete", verify=False)
    convert(src, root / "wm-cont", action_dim=2, verify=False)
    deep = _unet(
        root,
        "src-deep",
        block_out_channels=(4, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    )
    convert(deep, root / "wm-deep", action_dim=N_ACTIONS, action_type="discrete", verify=False)
    inputs = root / "inputs"
    inputs.mkdir()
    np.savez(inputs / "ep.npz", frames=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    (inputs / "acts.txt").write_text("0\n3\n")
    return root


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _rollout(work: Path, out: Path, *extra: object, ckpt: str = "wm", context=None, actions=None):
    return cli(
        "rollout",
        work / ckpt,
        "--context",
        context or work / "inputs/ep.npz",
        "--actions",
        actions or work / "inputs/acts.txt",
        "--out",
        out,
        *FAST,
        *extra,
    )


# ------------------------------------------------------------- 1. bad rollout inputs: exit 2


def test_bad_rollout_inputs_are_one_line_usage_errors(work, tmp_path, out_dir):
    d = tmp_path
    (d / "huge.txt").write_text("99999999999999999999999\n")
    (d / "huge.json").write_text("[0, 99999999999999999999999]")
    np.savez(d / "flat.npz", frames=np.zeros((3, 0, 16, 3), np.uint8))
    np.savez(d / "tiny.npz", latents=np.zeros((2, 3, 1, 1), np.float32))
    cases = [
        ((), {"actions": d / "huge.txt"}, "does not fit in a 64-bit integer"),
        ((), {"actions": d / "huge.json"}, "does not fit in a 64-bit integer"),
        ((), {"context": d / "flat.npz"}, "empty dimension"),
        ((), {"context": d / "tiny.npz", "ckpt": "wm-deep"}, "frames of 1×1 do not fit this model"),
        (("--seed", "1e23"), {}, "--seed must be an integer"),
        (("--seed", "1.5"), {}, "--seed must be an integer"),
        (("--seed", "+-5"), {}, "--seed must be an integer"),
        (("--seed", "-1"), {}, "seed must be an integer from 0 to 2**64 - 1"),
        (("--seed", str(10**23)), {}, "seed must be an integer from 0 to 2**64 - 1"),
    ]
    for extra, kw, needle in cases:
        assert_usage_error(_rollout(work, out_dir / "x.npz", *extra, **kw), needle)
    assert list(out_dir.iterdir()) == []


def test_frame_size_probe_passes_sizes_that_work_and_names_the_size(work, out_dir):
    """The probe costs one 1-frame forward; 3×3 passes through the 4-level UNet, 2×2 does not,
    and 16×16 (the plan's example size) is suggested."""
    np.savez(out_dir.parent / "three.npz", latents=np.zeros((2, 3, 3, 3), np.float32))
    np.savez(out_dir.parent / "two.npz", latents=np.zeros((2, 3, 2, 2), np.float32))
    ok = _rollout(work, out_dir / "ok.npz", ckpt="wm-deep", context=out_dir.parent / "three.npz")
    assert ok.exit_code == 0, ok.output
    bad = _rollout(work, out_dir / "bad.npz", ckpt="wm-deep", context=out_dir.parent / "two.npz")
    assert_usage_error(bad, "frames of 2×2", "16×16 works")
    assert [p.name for p in out_dir.iterdir()] == ["ok.npz"]


def test_a_model_bug_is_not_reported_as_a_bad_size(work, monkeypatch):
    """Negative control: when the probe fails at the plan's own example size too, the original
    error propagates (an internal error), it is not dressed up as a usage error."""
    from causalize.rollout.loading import load_world_model

    wm, _ = load_world_model(work / "wm", device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(type(wm), "forward", broken)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        sampler_mod.check_frame_size(wm, torch.zeros(1, 3, 1, 4, 4))


def _bomb(path: Path, key: str, shape: tuple[int, ...], dtype=np.uint8, written: int | None = None) -> Path:
    """A deflated .npz member whose header claims `shape`; `written` bytes of zeros follow (all of
    them by default: a real zip bomb, tiny on disk)."""
    arr_header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize if written is None else written
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, arr_header)
            zero = bytes(1 << 20)
            for start in range(0, nbytes, len(zero)):
                f.write(zero[: min(len(zero), nbytes - start)])
    return path


def test_zip_bomb_context_is_refused_from_its_header(work, tmp_path, out_dir):
    """A 12 GiB context claimed by a file of a few KiB: refused from the .npy header, before any
    data is read (the file holds only 1 MiB, so reading would fail differently)."""
    bomb = _bomb(tmp_path / "bomb.npz", "frames", (1 << 16, 256, 256, 3), written=1 << 20)
    assert bomb.stat().st_size < 64 * 1024
    assert_usage_error(_rollout(work, out_dir / "x.npz", context=bomb), "GiB", "more than the 4 GiB allowed")
    acts = _bomb(tmp_path / "acts.npz", "actions", (1 << 31, 4), dtype=np.int64, written=1 << 20)
    assert_usage_error(_rollout(work, out_dir / "x.npz", actions=acts), "would take", "GiB")
    assert list(out_dir.iterdir()) == []


def test_only_the_context_frames_asked_for_are_read(tmp_path, monkeypatch):
    """A real bomb (64 MiB of zeros in ~64 KiB): with the bound at 16 MiB, all frames are refused
    and the hint names --context-frames; 4 frames are read by decompressing only them."""
    monkeypatch.setattr(arrays_mod, "MAX_ARRAY_BYTES", 16 << 20)
    bomb = _bomb(tmp_path / "bomb.npz", "frames", (1024, 128, 128, 4))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(rio.UsageError, match="would take") as e:
        rio.read_frames(bomb)
    assert "--context-frames" in e.value.hint
    tracemalloc.start()
    try:
        frames = rio.read_frames(bomb, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames.count == 4 and frames.data.shape == (4, 128, 128, 4)
    assert peak < 4 << 20, peak  # 4 frames are 256 KiB; the whole array would be 64 MiB
    npy = tmp_path / "big.npy"
    np.save(npy, np.zeros((300, 128, 128, 4), np.uint8))  # 18.75 MiB on disk
    with pytest.raises(rio.UsageError, match="would take"):
        rio.read_frames(npy)
    assert rio.read_frames(npy, 2).count == 2


# -------------------------------------------------------- 2. writers never clobber, check first


def test_out_appearing_during_the_rollout_is_kept(work, out_dir, monkeypatch):
    """OUT created by someone else while the frames are generated: exit 2, their file intact,
    no temporary left; also when it appears between the last check and the final rename."""
    out = out_dir / "clip.npz"
    original = sampler_mod.rollout

    def rollout_then_race(*args, **kwargs):
        result = original(*args, **kwargs)
        out.write_bytes(b"the other writer's clip")
        return result

    monkeypatch.setattr(sampler_mod, "rollout", rollout_then_race)
    assert_one_line_error(_rollout(work, out), 2, "exists")
    assert out.read_bytes() == b"the other writer's clip"
    assert [p.name for p in out_dir.iterdir()] == ["clip.npz"]

    monkeypatch.setattr(sampler_mod, "rollout", original)
    out2 = out_dir / "clip2.npz"
    write_npz = rio._write_npz

    def write_then_race(tmp, *args):
        write_npz(tmp, *args)
        out2.write_bytes(b"theirs")  # after fs.new_file checked, before its no-clobber rename

    monkeypatch.setattr(rio, "_write_npz", write_then_race)
    assert_one_line_error(_rollout(work, out2), 2, "exists")
    assert out2.read_bytes() == b"theirs"
    assert sorted(p.name for p in out_dir.iterdir()) == ["clip.npz", "clip2.npz"]


@pytest.mark.parametrize(
    "ext, blocked", [(".gif", ("imageio",)), (".mp4", ("imageio",)), (".mp4", ("imageio_ffmpeg", "av"))]
)
def test_missing_video_writer_is_found_before_any_model_work(work, out_dir, monkeypatch, ext, blocked):
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the output cannot be written")

    import causalize.rollout.loading as loading

    monkeypatch.setattr(loading, "load_world_model", never)
    assert_usage_error(_rollout(work, out_dir / f"clip{ext}"), "needs imageio" if "imageio" in blocked else "ffmpeg")
    assert list(out_dir.iterdir()) == []


def test_train_claims_its_output_dir_atomically():
    """Eight runs claim one directory at the same moment: exactly one gets it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        won, lost = [], []
        barrier = threading.Barrier(8)

        def claim():
            barrier.wait()
            try:
                won.append(OutputClaim(out, fresh=True))
            except TrainingError as exc:
                lost.append(exc)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 7
        assert all("already holds a training run" in e.message for e in lost)
        assert out.is_dir() and (out / METRICS_FILE).is_file()


# --------------------------------------------------------------------------- training fixtures


@pytest.fixture(scope="module")
def train_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-train")
    src = _unet(root, "src")
    convert(src, root / "wm", action_dim=2, verify=False)
    data = root / "data"
    create_dataset(data, ActionSpace.continuous(2), frame_shape=(16, 16, 3))
    rng = np.random.default_rng(0)
    for e in range(2):
        frames = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
        write_episode(data, e, frames=frames, actions=rng.uniform(-1, 1, (6, 2)).astype(np.float32))
    return {"root": root, "model": root / "wm", "data": data}


def _config(train_work, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(train_work["model"]),
        data=str(train_work["data"]),
        output_dir=str(out),
        window=4,
        batch_size=2,
        steps=1,
        log_every=1,
        checkpoint_every=0,
        split=None,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _train_cli(train_work, out: Path, data: Path | None = None, *extra: str):
    return cli(
        "train",
        "--model",
        train_work["model"],
        "--data",
        data or train_work["data"],
        "--out",
        out,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--window",
        "4",
        "--device",
        "cpu",
        *extra,
    )


def _copy_dataset(train_work, dest: Path) -> Path:
    import shutil

    shutil.copytree(train_work["data"], dest)
    return dest


def test_the_loser_of_a_race_for_the_output_dir_exits_2_and_loses_nothing(train_work, tmp_path, monkeypatch):
    """Another run claims OUT after this one's checks, before its claim: exit 2, no bar, the
    other run's files and directory untouched."""
    import causalize.training.trainer as trainer_mod

    out = tmp_path / "run"
    original = trainer_mod.resume_point

    def other_run_claims_first(config, is_main):
        point = original(config, is_main)
        OutputClaim(out, fresh=True)
        (out / METRICS_FILE).write_text('{"step": 1, "loss": 0.5}\n')
        return point

    monkeypatch.setattr(trainer_mod, "resume_point", other_run_claims_first)
    result = _train_cli(train_work, out)
    assert_usage_error(result, "already holds a training run (another run claimed it first)", "--resume")
    assert sorted(p.name for p in out.iterdir()) == [METRICS_FILE]
    assert (out / METRICS_FILE).read_text() == '{"step": 1, "loss": 0.5}\n'


def test_a_run_that_fails_after_its_claim_leaves_nothing(train_work, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(_config(train_work, out, batch_size=64))
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(_config(train_work, existing, batch_size=64))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------- 3. episodes validated when opened


def _flip_bit(path: Path, key: str = "frames", at: int = 10) -> None:
    offset = read_headers(path)[key].offset
    raw = bytearray(path.read_bytes())
    raw[offset + at] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_found_when_the_dataset_opens(train_work, tmp_path):
    data = _copy_dataset(train_work, tmp_path / "data")
    bad = episode_path(data, 1)
    _flip_bit(bad)
    with pytest.raises(DataError, match="does not match its checksum") as e:
        EpisodeDataset(data, window=4)
    assert e.value.path == str(bad) and "damaged" in str(e.value)
    assert len(EpisodeDataset(data, window=4, verify=False)) == 6  # the opt-out reads only headers
    out = tmp_path / "run"
    result = _train_cli(train_work, out, data)
    assert_usage_error(result, "does not match its checksum", str(bad), "restore the damaged files")
    assert not out.exists()
    assert train(_config(train_work, out, data=str(data), verify_data=False))["steps"] == 1  # the opt-out


def test_plain_numpy_and_compressed_episodes_are_verified_too(tmp_path):
    """No checksum field to write: every .npz carries the CRC-32 of each member, so datasets
    written before this check, or with plain np.savez, are covered; so are compressed ones."""
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.discrete(3), frame_shape=(4, 4, 1))
    frames = np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4, 1)
    np.savez(episode_path(root, 0), frames=frames, actions=np.zeros(5, np.int64))
    np.savez_compressed(episode_path(root, 1), frames=frames, actions=np.zeros(5, np.int64))
    assert len(EpisodeDataset(root, window=2)) == 8
    _flip_bit(episode_path(root, 0))
    with zipfile.ZipFile(episode_path(root, 1)) as zf:
        info = zf.getinfo("frames.npy")
    raw = bytearray(episode_path(root, 1).read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    data_start = info.header_offset + 30 + name_len + extra_len
    raw[data_start + info.compress_size - 8] ^= 0x10  # near the end of the deflated frames
    episode_path(root, 1).write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        EpisodeDataset(root, window=2)
    assert [p for p, _ in e.value.problems] == [str(episode_path(root, 0)), str(episode_path(root, 1))]


@pytest.mark.parametrize("what", ["nan", "range"])
def test_bad_action_values_fail_training_before_the_output_dir_exists(train_work, tmp_path, what):
    data = tmp_path / "data"
    if what == "nan":
        create_dataset(data, ActionSpace.continuous(2), frame_shape=(16, 16, 3))
        actions = np.zeros((6, 2), np.float32)
        actions[4, 1] = np.nan
    else:
        create_dataset(data, ActionSpace.discrete(2), frame_shape=(16, 16, 3))
        actions = np.array([0, 1, 7, 0, 1, 0], np.int64)
    np.savez(episode_path(data, 0), frames=np.zeros((6, 16, 16, 3), np.uint8), actions=actions)
    with pytest.raises(DataError, match="NaN" if what == "nan" else r"out of range \[0, 2\)"):
        EpisodeDataset(data, window=4)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="NaN" if what == "nan" else "out of range"):
        train(_config(train_work, out, data=str(data)))
    assert not out.exists()


# -------------------------------------------------------------------------------- 4. messages


def test_wrong_action_dimension_has_a_hint(work, tmp_path, out_dir):
    (tmp_path / "three.txt").write_text("0.1 0.2 0.3\n")
    result = _rollout(work, out_dir / "x.npz", ckpt="wm-cont", actions=tmp_path / "three.txt")
    assert_usage_error(result, "2-dimensional continuous actions", "one row of 2 numbers")


def test_probe_frames_and_pass_option_messages(work, tmp_path):
    assert_usage_error(cli("verify", work / "wm", "--frames", "1"), "--frames must be at least 2", "--frames 4")
    assert_usage_error(
        cli("convert", work / "src", tmp_path / "o", "--no-verify", "--frames", "1"), "--frames must be at least 2"
    )
    result = cli(
        "convert",
        work / "src",
        tmp_path / "o",
        "--pipeline",
        "causal-temporal-conv,causal-temporal-attention,causal-norm{mode=cumulatve}",
    )
    assert_usage_error(result, "expected one of per-frame, cumulative. Did you mean 'cumulative'?", "causalize passes")
    assert not (tmp_path / "o").exists()


def test_an_error_without_its_own_hint_points_at_help(work, out_dir):
    result = _rollout(work, out_dir / "x.npz", "--history-noise", "5000")
    assert_usage_error(result, "history_noise", "see `causalize rollout --help`")


def test_train_errors_print_no_progress_bar(train_work, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("")
    result = _train_cli(train_work, run)
    assert_usage_error(result, "already holds a training run")  # two lines: no "training 0/?" bar
    result = _train_cli(train_work, tmp_path / "other", tmp_path / "no-data")
    assert_usage_error(result, "dataset not found")


def test_path_errors_come_before_torch_is_imported(work, train_work, tmp_path):
    """`causalize rollout` / `train` check their paths (and that OUT is free) before importing
    torch, so a typo costs a fraction of a second, not the seconds torch takes."""
    exists = tmp_path / "exists.npz"
    exists.write_bytes(b"mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("")
    ctx, acts, wm = work / "inputs/ep.npz", work / "inputs/acts.txt", work / "wm"
    calls = [
        (["rollout", wm, "--context", tmp_path / "nope.npz", "--actions", acts, "--out", tmp_path / "a.npz"], 2),
        (["rollout", wm, "--context", ctx, "--actions", tmp_path / "nope.txt", "--out", tmp_path / "a.npz"], 2),
        (["rollout", wm, "--context", ctx, "--actions", acts, "--out", exists], 2),
        (["rollout", tmp_path / "nowhere", "--context", ctx, "--actions", acts, "--out", tmp_path / "a.npz"], 4),
        (["train", "--model", tmp_path / "nowhere", "--data", train_work["data"], "--out", tmp_path / "r"], 2),
        (["train", "--model", train_work["model"], "--data", tmp_path / "nowhere", "--out", tmp_path / "r"], 2),
        (["train", "--model", train_work["model"], "--data", train_work["data"], "--out", run], 2),
    ]
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from causalize.cli.app import app\n"
        f"calls = json.loads({json.dumps(json.dumps([[list(map(str, a)), c] for a, c in calls]))})\n"
        "for args, want in calls:\n"
        "    res = CliRunner().invoke(app, args)\n"
        "    assert res.exit_code == want, (args, res.exit_code, res.output)\n"
        "    assert 'hint: ' in res.stderr, res.stderr\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exists.read_bytes() == b"mine"


def test_trainer_choices_match_the_library():
    """config.py spells the choices out (no torch import); they must match the modules using them."""
    from causalize.noise import PREDICTION_TYPES
    from causalize.training import config, objective

    assert config.PREDICTION_TYPES == tuple(p for p in PREDICTION_TYPES if p != "sample")
    assert objective.TIMESTEP_MODES is config.TIMESTEP_MODES


def test_a_video_context_is_decoded_within_a_bound(tmp_path, monkeypatch):
    """A video decodes frame by frame: past the bound it is refused (exit 2 in the CLI), and with
    --context-frames only those frames are decoded (negative control: the same bound passes)."""
    import numpy as _np
    import pytest as _pytest

    iio = _pytest.importorskip("imageio.v3")
    from causalize.errors import UsageError as _UsageError
    from causalize.rollout import io as rio

    clip = tmp_path / "clip.gif"
    iio.imwrite(clip, _np.arange(6, dtype=_np.uint8)[:, None, None, None].repeat(16, 1).repeat(16, 2).repeat(3, 3) * 40)
    monkeypatch.setattr(rio, "MAX_ARRAY_BYTES", 3 * 16 * 16 * 3)
    with _pytest.raises(_UsageError, match="GiB allowed for context frames"):
        rio.read_frames(clip)
    assert rio.read_frames(clip, context_frames=2).count == 2


def test_the_library_rollout_and_the_env_refuse_frames_too_small_for_the_model():
    """The frame-size check runs in RolloutSession.reset, so rollout() and WorldModelEnv get it too
    (negative control: the plan's own frame size rolls out)."""
    import pytest as _pytest
    import torch as _torch
    from world_models import tiny_world_model

    from causalize.errors import UsageError as _UsageError
    from causalize.rollout.sampler import RolloutConfig, rollout

    wm = tiny_world_model(
        "unet3d",
        block_out_channels=(4, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    )
    config = RolloutConfig(steps=1, window=2)
    ok = _torch.randn(1, 4, 1, 16, 16)
    rollout(wm, ok, _torch.randn(1, 1, 3), config=config)
    with _pytest.raises(_UsageError, match="frames of 1×1 do not fit this model"):
        rollout(wm, _torch.randn(1, 4, 1, 1, 1), _torch.randn(1, 1, 3), config=config)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_lives(tmp_path):
    """Resumed runs too: the run lock holds a live PID; a stale lock (dead PID) is taken over."""
    import os as _os
    import subprocess as _subprocess
    import sys as _sys

    import pytest as _pytest

    from causalize.training.checkpoints import RunLock
    from causalize.training.config import TrainingError

    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    assert (out / RunLock.NAME).read_text() == str(_os.getpid())
    child = _subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / RunLock.NAME).write_text(str(child.pid))  # a live run holds it
        with _pytest.raises(TrainingError, match=f"being trained by another run \\(pid {child.pid}\\)"):
            RunLock(out)
    finally:
        child.kill()
        child.wait()
    again = RunLock(out)  # the holder is gone: stale, taken over
    assert (out / RunLock.NAME).read_text() == str(_os.getpid())
    again.release()
    lock.release()
    assert not (out / RunLock.NAME).exists()


def test_a_time_compressing_vae_is_refused_for_per_frame_training(tmp_path):
    """The AutoencoderKLWan of a Wan pipeline used to crash training with an AttributeError (exit 3);
    it compresses time, so per-frame encoding is refused with a usage error. A per-frame image VAE
    (negative control) loads and reports its latent channels."""
    import pytest as _pytest
    from diffusers import AutoencoderKL, AutoencoderKLWan

    from causalize.training.config import TrainingError
    from causalize.training.loading import latent_channels, load_vae

    AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True]
    ).save_pretrained(tmp_path / "wan-vae")
    with _pytest.raises(TrainingError, match="AutoencoderKLWan encodes video, not frames"):
        load_vae(str(tmp_path / "wan-vae"))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "image-vae")
    assert latent_channels(load_vae(str(tmp_path / "image-vae"))) == 4
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(
        tmp_path / "pipe" / "vae"
    )
    assert latent_channels(load_vae(str(tmp_path / "pipe"))) == 4  # a pipeline's vae/, found as inference finds it


def test_a_missing_or_empty_vae_path_is_a_training_error_with_a_hint(tmp_path):
    """Training resolves --vae by inference's rule (causalize.latents.spec.find_vae_dir) but reports
    its failures as training errors (exit 2), with inference's hint."""
    import pytest as _pytest

    from causalize.training.config import TrainingError
    from causalize.training.loading import load_vae

    with _pytest.raises(TrainingError, match="VAE not found") as missing:
        load_vae(str(tmp_path / "nowhere"))
    assert missing.value.hint and "vae/" in missing.value.hint
    (tmp_path / "empty").mkdir()
    with _pytest.raises(TrainingError, match="neither a VAE directory"):
        load_vae(str(tmp_path / "empty"))


def test_short_episodes_hint_names_an_option_that_exists_and_train_takes_it(tmp_path):
    """The short-episode error names --skip-short, which `causalize train` accepts."""
    from typer.testing import CliRunner

    from causalize.cli.app import app

    result = CliRunner().invoke(app, ["train", "--help"])
    assert "--skip-short" in result.output
    from causalize.training.config import TrainConfig

    assert TrainConfig(model="m", data="d", output_dir="o", skip_short=True).skip_short is True


def test_resuming_with_a_relative_data_path_is_the_same_dataset(tmp_path, monkeypatch):
    from causalize.training.checkpoints import _REPLAY_SETTINGS

    assert "data" in _REPLAY_SETTINGS
    import causalize.training.checkpoints as ck

    monkeypatch.chdir(tmp_path)
    assert ck._same_setting("data", str(tmp_path / "episodes"), "episodes")
    assert not ck._same_setting("data", str(tmp_path / "episodes"), "other")  # negative control
