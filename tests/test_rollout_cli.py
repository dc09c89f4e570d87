"""`causalize rollout`: writes .mp4 / .gif / .npz clips with the right frame counts from a tiny
checkpoint made here, takes sampler defaults from training.json, refuses to overwrite, and turns
every bad input into exit code 2 with a one-line message and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from causalize.api import convert
from causalize.cli.app import app
from causalize.plugin_manager import registries

iio = pytest.importorskip("imageio.v3")
runner = CliRunner()
N_ACTIONS, CONTEXT = 4, 3
FAST = ("--steps", "2", "--window", "4")


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Checkpoints (discrete adapter, continuous adapter, no adapter) and input files."""
    from diffusers import UNet3DConditionModel

    root = tmp_path_factory.mktemp("rollout-cli")
    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    UNet3DConditionModel(**{**plan.tiny_config, "in_channels": 3, "out_channels": 3}).save_pretrained(root / "src")
    convert(root / "src", root / "wm", action_dim=N_ACTIONS, action_type="discrete", verify=False)
    convert(root / "src", root / "wm-cont", action_dim=2, verify=False)
    convert(root / "src", root / "noact", pipeline=f"{plan.pipeline},frame-conditioning", verify=False)
    convert(root / "src", root / "plain", verify=False)
    inputs = root / "inputs"
    inputs.mkdir()
    frames = np.random.default_rng(0).integers(0, 256, (CONTEXT + 2, 16, 16, 3), dtype=np.uint8)
    np.savez(inputs / "ep.npz", frames=frames, actions=np.zeros(CONTEXT + 2, np.int64))
    iio.imwrite(inputs / "start.png", frames[0])
    (inputs / "acts.txt").write_text("0\n3\n")
    (inputs / "acts.json").write_text(json.dumps([[0.5, -0.5], [0.0, 1.0]]))
    return root


def _out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".npz"])
def test_writes_each_format(work, tmp_path, ext):
    out = tmp_path / f"clip{ext}"
    result = cli(
        "rollout",
        work / "wm",
        "--context",
        work / "inputs/ep.npz",
        "--context-frames",
        CONTEXT,
        "--actions",
        work / "inputs/acts.txt",
        "--out",
        out,
        *FAST,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert (
        "seconds per frame: mean" in result.stderr
        and "cache: streaming" in result.stderr
        and "frame passes" in result.stderr
    )
    if ext == ".npz":
        z = np.load(out)
        assert z["frames"].shape == (CONTEXT + 2, 16, 16, 3) and z["frames"].dtype == np.uint8
        assert z["actions"].tolist() == [0, 3] and int(z["context_frames"]) == CONTEXT
        meta = json.loads(str(z["rollout"]))
        assert meta["config"]["steps"] == 2 and len(meta["seconds_per_frame_all"]) == 2
    else:
        assert iio.imread(out, index=None).shape[0] == CONTEXT + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_json_summary_and_training_defaults(work, tmp_path):
    ckpt = tmp_path / "trained"
    shutil.copytree(work / "wm", ckpt)
    (ckpt / "training.json").write_text(
        json.dumps({"config": {"prediction_type": "epsilon", "window": 3, "zero_terminal_snr": False}})
    )
    out = tmp_path / "gen.npz"
    result = cli(
        "rollout",
        ckpt,
        "--context",
        work / "inputs/start.png",
        "--actions",
        work / "inputs/acts.txt",
        "--out",
        out,
        "--steps",
        "2",
        "--window",
        "5",
        "--no-cache",
        "--generated-only",
        "--seed",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["generated"] == 2 and doc["frames_written"] == 2 and doc["context_frames"] == 0
    assert doc["cache"] == "full recompute" and set(doc["seconds_per_frame"]) == {"mean", "median", "min", "max"}
    cfg, src = doc["config"], doc["config_sources"]
    assert (cfg["prediction_type"], cfg["zero_terminal_snr"], cfg["window"], cfg["seed"]) == ("epsilon", False, 5, 3)
    assert src["prediction_type"] == "training.json" and src["window"] == "option" and src["eta"] == "default"
    assert np.load(out)["frames"].shape == (2, 16, 16, 3)


def test_compiled_steps_from_the_command_line(work, tmp_path, monkeypatch):
    """--compile: the full window's steps are served compiled (Dynamo alone here, to keep it cheap:
    tests/test_compiled_step.py covers inductor) and the report says how many."""
    from causalize.rollout import compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    out = tmp_path / "c.npz"
    acts = tmp_path / "acts.txt"
    acts.write_text("0\n3\n1\n")
    base = ("rollout", work / "wm", "--context", work / "inputs/ep.npz", "--context-frames", CONTEXT)
    result = cli(*base, "--actions", acts, "--out", out, *FAST, "--compile", "default", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # window 4, 3 context frames: the history is full from frame 1, so frames 2 and 3 run compiled
    assert doc["config"]["compile"] == "default" and doc["compiled_calls"] == 2 * 2, doc


def test_continuous_actions_from_json(work, tmp_path):
    out = tmp_path / "c.npz"
    result = cli(
        "rollout",
        work / "wm-cont",
        "--context",
        work / "inputs/ep.npz",
        "--actions",
        work / "inputs/acts.json",
        "--out",
        out,
        *FAST,
        "--guidance-scale",
        "1",
    )
    assert result.exit_code == 0, result.output
    z = np.load(out)
    assert z["frames"].shape[0] == CONTEXT + 2 + 2 and z["actions"].dtype == np.float32


def test_refuses_to_overwrite(work, tmp_path):
    out = tmp_path / "clip.gif"
    out.write_bytes(b"precious")
    args = (
        "rollout",
        work / "wm",
        "--context",
        work / "inputs/ep.npz",
        "--actions",
        work / "inputs/acts.txt",
        "--out",
        out,
        *FAST,
    )
    assert_one_line_error(cli(*args), 2, "exists")
    assert out.read_bytes() == b"precious"
    result = cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert iio.imread(out, index=None).shape[0] == CONTEXT + 2 + 2


def _bad_inputs(d: Path, good: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (context file, actions file, expected message part); bad files are written to d,
    the good counterpart of each comes from `good`."""
    (d / "floats.txt").write_text("0.5\n1.5\n")
    (d / "range.txt").write_text("0\n4\n")
    (d / "two.txt").write_text("0 1\n1 0\n")
    (d / "nan.json").write_text("[0, NaN]")
    (d / "empty.txt").write_text("")
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    (d / "ragged.json").write_text("[[1], [2, 3]]")
    np.savez(d / "nokey.npz", pictures=np.zeros((2, 16, 16, 3), np.uint8))
    np.savez(d / "float.npz", frames=np.zeros((2, 16, 16, 3), np.float32))
    np.save(d / "gray.npy", np.zeros((2, 16, 16, 1), np.uint8))
    ep, acts = str(good / "ep.npz"), str(good / "acts.txt")
    return {
        "float actions for a discrete adapter": (ep, str(d / "floats.txt"), "integer indices"),
        "index out of range": (ep, str(d / "range.txt"), "[0, 4)"),
        "wrong dimension": (ep, str(d / "two.txt"), "multi-hot"),
        "NaN": (ep, str(d / "nan.json"), "NaN"),
        "no actions": (ep, str(d / "empty.txt"), "no actions"),
        "ragged json": (ep, str(d / "ragged.json"), "ragged.json"),
        "missing actions": (ep, str(d / "nope.txt"), "not found"),
        "corrupt context": (str(d / "corrupt.npz"), acts, "corrupt.npz"),
        "context without frames": (str(d / "nokey.npz"), acts, "no 'frames' or 'latents'"),
        "float pixels": (str(d / "float.npz"), acts, "uint8"),
        "wrong channels": (str(d / "gray.npy"), acts, "1 channels"),
        "missing context": (str(d / "nope.npz"), acts, "not found"),
    }


def test_bad_inputs_exit_2_and_write_nothing(work, tmp_path):
    cases = _bad_inputs(tmp_path, work / "inputs")
    out_dir = _out_dir(tmp_path)
    for context, actions, needle in cases.values():
        result = cli(
            "rollout", work / "wm", "--context", context, "--actions", actions, "--out", out_dir / "x.npz", *FAST
        )
        assert_one_line_error(result, 2, needle)
    assert list(out_dir.iterdir()) == []


def test_bad_options_exit_2(work, tmp_path):
    out_dir = _out_dir(tmp_path)
    base = ("rollout", work / "wm", "--context", work / "inputs/ep.npz", "--actions", work / "inputs/acts.txt")
    assert_one_line_error(
        cli(*base, "--out", out_dir / "x.npz", "--context-frames", "9"), 2, "fewer than the 9 context frames"
    )
    assert_one_line_error(cli(*base, "--out", out_dir / "x.avi"), 2, "unknown output format")
    assert_one_line_error(cli(*base, "--out", out_dir / "x.npz", "--sampler", "heun"), 2, "unknown sampler")
    assert_one_line_error(cli(*base, "--out", out_dir / "x.npz", "--history-noise", "lots"), 2, "history_noise")
    assert_one_line_error(cli(*base, "--out", out_dir / "x.npz", "--compile", "fastest"), 2, "unknown compile mode")
    assert_one_line_error(
        cli(*base, "--out", out_dir / "x.npz", "--compile", "default", "--no-cache"), 2, "needs cache='exact'"
    )
    result = cli(*base, "--out", out_dir / "x.npz", "--eta", "3", "--json")
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["kind"] == "usage-error"
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("ckpt, needle", [("noact", "no action adapter"), ("plain", "no per-frame timesteps")])
def test_checkpoint_without_action_adapter_is_refused(work, tmp_path, ckpt, needle):
    out_dir = _out_dir(tmp_path)
    result = cli(
        "rollout",
        work / ckpt,
        "--context",
        work / "inputs/ep.npz",
        "--actions",
        work / "inputs/acts.txt",
        "--out",
        out_dir / "x.mp4",
        *FAST,
    )
    assert_one_line_error(result, 2, needle)
    assert list(out_dir.iterdir()) == []


def test_missing_checkpoint_exit_4(work, tmp_path):
    result = cli(
        "rollout",
        tmp_path / "nowhere",
        "--context",
        work / "inputs/ep.npz",
        "--actions",
        work / "inputs/acts.txt",
        "--out",
        tmp_path / "x.npz",
    )
    assert result.exit_code == 4, result.output


def test_help_teaches_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from causalize.cli.app import app\n"
        "r = CliRunner()\n"
        "for args in ([], ['rollout']):\n"
        "    res = r.invoke(app, args + ['--help'])\n"
        "    assert res.exit_code == 0, res.output\n"
        "    print(res.output)\n"
        "assert 'torch' not in sys.modules and 'gymnasium' not in sys.modules and 'imageio' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rollout" in proc.stdout and "Examples:" in proc.stdout and "causalize rollout ./run/final" in proc.stdout
    for option in (
        "--context-frames",
        "--steps",
        "--history-noise",
        "--guidance-rescale",
        "--no-cache",
        "--seed",
        "--overwrite",
        "--json",
    ):
        assert option in proc.stdout, option
