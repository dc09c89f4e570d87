"""Issue 14, item 5: the train CLI is complete. Every TrainConfig setting is a `causalize train`
option listed by --help that sets it (overriding the config file; an option not given keeps the
file's value), bad values are one-line errors naming the option, error hints name options that
exist, and a run resumed from a config file with relative paths compares them resolved.

The CLI tests replace the training loop and the path checks by stubs: no model is loaded and
nothing trains, so every case costs one argument parse."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from causalize.cli.app import app
from causalize.episodes import ActionSpace, create_dataset, write_episode
from causalize.training.config import TrainConfig, TrainingError, cli_option

runner = CliRunner()
BASE = ["train", "--model", "wm", "--data", "episodes", "--out", "run"]

#: (arguments, setting, value): each sets its setting to a value other than TrainConfig's default.
CASES: list[tuple[list[str], str, Any]] = [
    (["--model", "other-wm"], "model", "other-wm"),
    (["--data", "other-episodes"], "data", "other-episodes"),
    (["--out", "other-run"], "output_dir", "other-run"),
    (["--window", "8"], "window", 8),
    (["--batch-size", "3"], "batch_size", 3),
    (["--steps", "7"], "steps", 7),
    (["--lr", "0.001"], "lr", 0.001),
    (["--weight-decay", "0.5"], "weight_decay", 0.5),
    (["--adapter-lr-scale", "10"], "adapter_lr_scale", 10.0),
    (["--motion-weight", "5"], "motion_weight", 5.0),
    (["--grad-clip", "0"], "grad_clip", 0.0),
    (["--prediction-type", "epsilon"], "prediction_type", "epsilon"),
    (["--no-zero-terminal-snr"], "zero_terminal_snr", False),
    (["--action-dropout", "0.5"], "action_dropout", 0.5),
    (["--timestep-mode", "shared"], "timestep_mode", "shared"),
    (["--mixed-precision", "bf16"], "mixed_precision", "bf16"),
    (["--dtype", "fp16"], "mixed_precision", "fp16"),
    (["--device", "cpu"], "device", "cpu"),
    (["--gradient-checkpointing"], "gradient_checkpointing", True),
    (["--gradient-accumulation", "4"], "gradient_accumulation", 4),
    (["--seed", "5"], "seed", 5),
    (["--checkpoint-every", "0"], "checkpoint_every", 0),
    (["--keep-checkpoints", "2"], "keep_checkpoints", 2),
    (["--log-every", "3"], "log_every", 3),
    (["--no-log-per-frame"], "log_per_frame", False),
    (["--vae", "vae-dir"], "vae", "vae-dir"),
    (["--conditioning", "cond.safetensors"], "conditioning", "cond.safetensors"),
    (["--train-only", "adapter"], "train_only", "adapter"),
    (["--resume"], "resume", True),
    (["--resume-from", "run/checkpoints/step-2"], "resume", str(Path("run/checkpoints/step-2"))),
    (["--split", "test"], "split", "test"),
    (["--split", "all"], "split", None),
    (["--test-fraction", "0.25"], "test_fraction", 0.25),
    (["--stride", "2"], "stride", 2),
    (["--num-workers", "1"], "num_workers", 1),
    (["--no-verify-data"], "verify_data", False),
    (["--skip-short"], "skip_short", True),
]


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """The configs `causalize train` would train with; the loop and the path checks are stubs."""
    import causalize.training.loading as loading
    import causalize.training.trainer as trainer

    configs: list[TrainConfig] = []

    def fake_train(config: TrainConfig, progress: Any = None) -> dict[str, Any]:
        configs.append(config)
        return {"steps": config.steps, "steps_run": 0, "seconds": 0.0, "final_loss": 0.0, "final": "final"}

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(loading, "check_paths", lambda config: None)
    return configs


def _defaults() -> dict[str, Any]:
    return TrainConfig(model="wm", data="episodes", output_dir="run").to_json()


# ------------------------------------------------------------------------- every setting, listed


def test_every_setting_is_an_option_listed_by_help():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.M))
    for name in TrainConfig.fields():
        assert cli_option(name) in listed, (name, cli_option(name))
    assert "--resume-from" in listed and "--out" in listed


def test_every_setting_has_a_case_here():
    """A new setting must come with its option and a case above."""
    assert {name for _, name, _ in CASES} == set(TrainConfig.fields())


@pytest.mark.parametrize("args, name, value", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_each_option_sets_its_setting(captured, args, name, value):
    result = runner.invoke(app, [*BASE, *args])
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert getattr(cfg, name) == value
    defaults = _defaults()
    assert defaults[name] != value, "the case must change the setting"
    assert {k: v for k, v in cfg.to_json().items() if k != name} == {k: v for k, v in defaults.items() if k != name}


def test_options_override_the_file_and_unset_ones_keep_it(captured, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'model = "wm"\ndata = "episodes"\noutput_dir = "run"\nsteps = 5\nseed = 3\nsplit = "all"\n'
        'verify_data = false\nskip_short = true\nresume = true\nmixed_precision = "bf16"\nvae = "vae-dir"\n'
    )
    assert runner.invoke(app, ["train", str(config), "--steps", "9"]).exit_code == 0
    assert runner.invoke(app, ["train", str(config), "--no-skip-short", "--verify-data", "--no-resume"]).exit_code == 0
    assert runner.invoke(app, ["train", str(config), "--dtype", "fp32", "--split", "train"]).exit_code == 0
    kept, flipped, other = captured
    assert (kept.steps, kept.seed, kept.split, kept.verify_data, kept.skip_short) == (9, 3, None, False, True)
    assert (kept.resume, kept.mixed_precision, kept.vae) == (True, "bf16", "vae-dir")
    assert (flipped.skip_short, flipped.verify_data, flipped.resume, flipped.steps) == (False, True, False, 5)
    assert (other.mixed_precision, other.split) == ("no", "train")


# ------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--train-only", "foo"], ["train_only='foo'", "--train-only"]),
        (["--split", "bogus"], ["split='bogus'", "--split"]),
        (["--prediction-type", "x0"], ["prediction_type='x0'", "--prediction-type"]),
        (["--timestep-mode", "joint"], ["timestep_mode='joint'", "--timestep-mode"]),
        (["--mixed-precision", "fp8"], ["mixed_precision='fp8'", "--mixed-precision"]),
        (["--steps", "0"], ["steps=0", "--steps"]),
        (["--test-fraction", "2"], ["test_fraction=2.0", "--test-fraction"]),
        (["--action-dropout", "1"], ["action_dropout=1.0", "--action-dropout"]),
        (["--no-resume", "--resume-from", "run/checkpoints/step-2"], ["--no-resume", "--resume-from"]),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_option(captured, args, needles):
    result = runner.invoke(app, [*BASE, *args])
    assert_one_line_error(result, 2, *needles)
    assert not captured


def test_bad_value_in_the_file_names_option_and_key(captured, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": "wm", "data": "episodes", "output_dir": "run", "train_only": "head"}))
    result = runner.invoke(app, ["train", str(config), "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "train_only='head'" in error["message"] and "--train-only" in error["hint"] and "train_only" in error["hint"]


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from causalize.cli.app import app\n"
        "for args in (['--help'], ['train', '--help']):\n"
        "    res = CliRunner().invoke(app, args)\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- hints name options


def _episodes(root: Path, lengths: list[int]) -> Path:
    create_dataset(root, ActionSpace.continuous(2), frame_shape=(8, 8, 3))
    for i, length in enumerate(lengths):
        write_episode(
            root,
            i,
            frames=np.zeros((length, 8, 8, 3), np.uint8),
            actions=np.zeros((length, 2), np.float32),
        )
    return root


def test_the_short_episode_error_names_skip_short(tmp_path):
    """Through the real CLI and trainer: the dataset is opened (and refused) before any model is
    loaded, so a model directory holding just a manifest is enough."""
    (tmp_path / "wm").mkdir()
    (tmp_path / "wm" / "causalize.json").write_text("{}")
    data = _episodes(tmp_path / "episodes", [3, 8])
    args = ["train", "--model", str(tmp_path / "wm"), "--data", str(data), "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--window", "6", "--split", "all", "--device", "cpu"])
    assert_one_line_error(result, 2, "shorter than window=6", "--skip-short", "skip_short = true")
    assert not (tmp_path / "run").exists()
    from causalize.training.loading import open_dataset

    cfg = TrainConfig(model="wm", data=str(data), output_dir="run", window=6, split=None, skip_short=True)
    with pytest.warns(UserWarning, match="skipping 1 episode"):
        assert len(open_dataset(cfg)) == 3  # the 8-frame episode's 6-frame windows


def test_run_exists_hint_names_the_resume_options(tmp_path):
    from causalize.training.checkpoints import check_output_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(TrainingError) as e:
        check_output_dir(TrainConfig(model="wm", data="episodes", output_dir=str(tmp_path / "run")))
    assert "--resume" in e.value.hint and "resume" in e.value.hint


# ----------------------------------------------------------------------- resume: paths resolved


class _OneProcess:
    """What save_checkpoint needs of an accelerator, on one process, without its state."""

    is_main_process = True
    num_processes = 1

    def save_state(self, path: str) -> None:
        pass

    def wait_for_everyone(self) -> None:
        pass


def _toml(path: Path, **values: Any) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def test_resuming_from_a_toml_with_relative_paths_from_another_cwd_is_the_same_run(tmp_path, monkeypatch):
    """The first run started in proj/ with paths relative to it; the resumed one from proj's
    parent, its config naming the same directories as proj/...: no 'different' warning. A real
    change of dataset, VAE or conditioning still warns."""
    from causalize.training.checkpoints import resume_point, save_checkpoint

    proj = tmp_path / "proj"
    proj.mkdir()
    monkeypatch.chdir(proj)
    first = TrainConfig.from_file(
        _toml(proj / "run.toml", model="wm", data="episodes", output_dir="run", vae="vae", conditioning="c.st")
    )
    save_checkpoint(_OneProcess(), first, 2, 0.5)

    monkeypatch.chdir(tmp_path)
    paths = {"model": "proj/wm", "data": "proj/episodes", "output_dir": "proj/run", "vae": "proj/vae"}
    again = _toml(tmp_path / "again.toml", **paths, conditioning="proj/c.st", resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt, step = resume_point(TrainConfig.from_file(again), is_main=True)
    assert step == 2 and ckpt is not None and ckpt.resolve() == (proj / "run" / "checkpoints" / "step-2").resolve()
    # the same from the absolute paths the CLI passes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        absolute = {k: str(tmp_path / v) for k, v in paths.items()}
        resume_point(TrainConfig.from_file(again, **absolute), is_main=True)

    for key, other in (("data", "proj/other"), ("vae", "proj/other-vae"), ("conditioning", "proj/other.st")):
        with pytest.warns(UserWarning, match=f"different {key}"):
            resume_point(TrainConfig.from_file(again, **{key: other}), is_main=True)
