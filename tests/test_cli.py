"""The `causalize` CLI: exit codes, stdout/stderr discipline, --json documents, bad inputs.

Every command runs in-process through typer's CliRunner (one torch import for the whole file);
the tiny checkpoints are built once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from causalize.cli.app import app, main

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
LEAKY_PIPELINE = "causal-temporal-conv,causal-temporal-attention"  # no causal-norm: GroupNorm leaks
runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def as_json(result) -> dict:
    return json.loads(result.stdout)


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny unconverted UNet3DConditionModel checkpoint (config.json + safetensors)."""
    from causalize.plugin_manager import registries

    path = tmp_path_factory.mktemp("tiny") / "unet3d"
    registries().plans.get("unet3d").build_tiny().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """`causalize convert tiny OUT --json`, run once: (OUT, result, SRC before, SRC after)."""
    before = snapshot(tiny)
    out = tmp_path_factory.mktemp("converted") / "causal"
    result = cli("convert", tiny, out, "--json")
    return out, result, before, snapshot(tiny)


@pytest.fixture
def src_copy(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "src"))


# --- convert / verify: the happy path and the negative control ------------------------------


def test_convert_writes_a_causal_checkpoint_and_leaves_src_alone(converted):
    out, result, before, after = converted
    assert result.exit_code == 0, result.output
    report = as_json(result)
    assert report["written"] is True and report["dry_run"] is False
    assert report["verification"]["passed"] is True
    assert report["plan"] == "unet3d" and report["model_class"] == "UNet3DConditionModel"
    assert {p["name"] for p in report["passes"]} == {"causal-temporal-conv", "causal-temporal-attention", "causal-norm"}
    assert all(p["sites"] > 0 for p in report["passes"])
    for name in (CONFIG, WEIGHTS, "causalize.json"):
        assert (out / name).is_file(), name
    assert before == after, "SRC was modified"
    assert "verification: causal" in result.stderr  # the summary goes to stderr


def test_convert_without_json_prints_out_path_on_stdout(tiny, tmp_path):
    out = tmp_path / "o"
    result = cli("convert", tiny, out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "causal-temporal-conv" in result.stderr and "skipped" in result.stderr


def test_verify_converted_is_causal(converted):
    out = converted[0]
    result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.output
    doc = as_json(result)
    assert doc["passed"] is True and doc["path"] == str(out) and doc["culprit"] is None
    human = cli("verify", out)
    assert human.exit_code == 0
    assert human.stdout.startswith("causal") and "out\\in" in human.stdout


def test_verify_unconverted_leaks(tiny):
    result = cli("verify", tiny, "--json")
    assert result.exit_code == 1, result.output
    doc = as_json(result)
    assert doc["passed"] is False and doc["culprit"] is not None and doc["max_leak"] > 0


def test_convert_leak_writes_nothing_unless_allowed(tiny, tmp_path):
    out = tmp_path / "leaky"
    result = cli("convert", tiny, out, "--pipeline", LEAKY_PIPELINE, "--json")
    assert result.exit_code == 1, result.output
    report = as_json(result)
    assert report["written"] is False and not out.exists()
    assert report["verification"]["culprit"]["class"] == "GroupNorm"
    assert "nothing written" in result.stderr and "--allow-leak" in result.stderr

    allowed = cli("convert", tiny, out, "--pipeline", LEAKY_PIPELINE, "--allow-leak", "--json")
    assert allowed.exit_code == 1, allowed.output  # written, but still not causal
    assert as_json(allowed)["written"] is True
    manifest = json.loads((out / "causalize.json").read_text())
    assert manifest["verification"]["passed"] is False


def test_dry_run_writes_nothing(tiny, tmp_path):
    out = tmp_path / "dry"
    result = cli("convert", tiny, out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = as_json(result)
    assert report["dry_run"] is True and report["written"] is False
    assert len(report["records"]) == sum(p["sites"] for p in report["passes"]) > 0
    assert not out.exists()
    assert "nothing written" in result.stderr


# --- bad inputs: exit code, one line, nothing written --------------------------------------


def _missing_config(src: Path) -> None:
    (src / CONFIG).unlink()


def _corrupt_config(src: Path) -> None:
    (src / CONFIG).write_text('{"_class_name": "UNet3DConditionModel", ')


def _missing_weights(src: Path) -> None:
    (src / WEIGHTS).unlink()


def _corrupt_weights(src: Path) -> None:
    (src / WEIGHTS).write_bytes(os.urandom(4096))


def _mismatched_weights(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / WEIGHTS))
    state.pop(sorted(state)[0])
    save_file(state, str(src / WEIGHTS))


BAD_SOURCES = {
    "missing-config": (_missing_config, 4, ["error: no config.json"]),
    "corrupt-config": (_corrupt_config, 4, ["not valid JSON"]),
    "missing-weights": (_missing_weights, 4, ["no weights"]),
    "corrupt-weights": (_corrupt_weights, 4, ["cannot read weights"]),
    "mismatched-weights": (_mismatched_weights, 4, ["do not match config.json"]),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(case, src_copy, tmp_path):
    damage, code, needles = BAD_SOURCES[case]
    damage(src_copy)
    out = tmp_path / "out"
    result = cli("convert", src_copy, out)
    assert_one_line_error(result, code, *needles)
    assert not out.exists()
    assert result.stdout == ""


def test_pickle_weights_refused_then_allowed(src_copy, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(src_copy / WEIGHTS))
    (src_copy / WEIGHTS).unlink()
    torch.save(state, src_copy / "diffusion_pytorch_model.bin")
    out = tmp_path / "out"
    result = cli("convert", src_copy, out, "--json")
    assert_one_line_error(result, 4, "pickle", "--allow-pickle")
    assert as_json(result)["error"]["kind"] == "pickle-refused"
    assert not out.exists()

    ok = cli("convert", src_copy, out, "--allow-pickle", "--no-verify")
    assert ok.exit_code == 0, ok.output
    assert (out / WEIGHTS).is_file() and not (out / "diffusion_pytorch_model.bin").exists()


def test_unsupported_class_lists_plans_and_mentions_plugins(tmp_path):
    import diffusers

    src = tmp_path / "unet2d"
    torch.manual_seed(0)
    diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(src, safe_serialization=True)
    result = cli("convert", src, tmp_path / "out", "--json")
    assert_one_line_error(result, 4, "UNet2DModel", "UNet3DConditionModel (unet3d)", "plugin")
    err = as_json(result)["error"]
    assert err["kind"] == "no-plan" and err["code"] == 4 and "plugin" in err["hint"]
    assert not (tmp_path / "out").exists()


def test_src_does_not_exist(tmp_path):
    result = cli("convert", tmp_path / "nope", tmp_path / "out", "--json")
    assert_one_line_error(result, 4, "does not exist")
    err = as_json(result)["error"]
    assert err == {"kind": "bad-checkpoint", "message": err["message"], "hint": err["hint"], "code": 4}
    assert not (tmp_path / "out").exists()


def test_unreadable_src(src_copy, tmp_path):
    src_copy.chmod(0)
    try:
        if os.access(src_copy, os.R_OK):
            pytest.skip("permissions do not block reads here (running as root)")
        result = cli("convert", src_copy, tmp_path / "out")
        assert_one_line_error(result, 4, "not readable")
        assert not (tmp_path / "out").exists()
    finally:
        src_copy.chmod(0o755)


def test_out_exists_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli("convert", tiny, out)
    assert_one_line_error(result, 2, "already exists", "--overwrite")
    assert (out / "old.txt").exists()

    ok = cli("convert", tiny, out, "--overwrite", "--no-verify")
    assert ok.exit_code == 0, ok.output
    assert not (out / "old.txt").exists() and (out / "causalize.json").is_file()


def test_out_inside_src(src_copy):
    result = cli("convert", src_copy, src_copy / "causal")
    assert_one_line_error(result, 2, "inside SRC")
    assert not (src_copy / "causal").exists()


def test_bad_pipeline_says_did_you_mean(tiny, tmp_path):
    result = cli("convert", tiny, tmp_path / "out", "--pipeline", "causal-temporal-atention", "--json")
    assert_one_line_error(result, 2, "Did you mean 'causal-temporal-attention'")
    assert as_json(result)["error"]["kind"] == "usage-error"
    assert not (tmp_path / "out").exists()


def test_unknown_option_is_a_usage_error(tiny):
    result = cli("convert", tiny, "x", "--frobnicate")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_pipeline_directory_is_accepted(tiny, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe / "unet")
    (pipe / "model_index.json").write_text(
        json.dumps({"_class_name": "TextToVideoSDPipeline", "unet": ["diffusers", "UNet3DConditionModel"]})
    )
    out = tmp_path / "out"
    result = cli("convert", pipe, out, "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    assert as_json(result)["model_class"] == "UNet3DConditionModel"
    assert (out / "causalize.json").is_file()
    inside = cli("convert", pipe, pipe / "causal")  # OUT inside the pipeline dir is refused too
    assert_one_line_error(inside, 2, "inside SRC")


# --- internal errors and the entry point ---------------------------------------------------


def test_internal_error_is_exit_3_and_one_line(tiny, tmp_path, monkeypatch):
    import causalize.api

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(causalize.api, "convert", boom)
    result = cli("convert", tiny, tmp_path / "out")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == "internal error: RuntimeError: boom second line"
    assert "Traceback" not in result.output
    debug = cli("--debug", "convert", tiny, tmp_path / "out", "--json")
    assert debug.exit_code == 3
    assert "Traceback" in debug.stderr
    assert as_json(debug)["error"]["kind"] == "internal-error"


def test_main_maps_exit_codes(capsys):
    for argv, code in ((["passes", "--json"], 0), (["--frobnicate"], 2), (["verify", "/no/such/dir"], 4)):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == code, argv
    assert "Traceback" not in capsys.readouterr().err


# --- listing commands ----------------------------------------------------------------------


def test_passes_json():
    result = cli("passes", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in as_json(result)["passes"]}
    assert {"causal-temporal-conv", "causal-temporal-attention", "causal-norm"} <= set(rows)
    mode = next(o for o in rows["causal-norm"]["options"] if o["name"] == "mode")
    assert "cumulative" in mode["choices"] and mode["default"] in mode["choices"]
    human = cli("passes")
    assert human.exit_code == 0 and "causal-norm" in human.stdout


def test_plugins_json():
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    doc = as_json(result)
    assert any(r["name"] == "causalize.plugins.unet3d" for r in doc["plugins"])
    plans = {p["name"]: p for p in doc["plans"]}
    assert plans["unet3d"]["model_class"] == "UNet3DConditionModel" and plans["unet3d"]["block_size"] >= 1
    assert cli("plugins").exit_code == 0


def test_env_json():
    result = cli("env", "--json")
    assert result.exit_code == 0, result.output
    doc = as_json(result)
    for key in (
        "causalize",
        "python",
        "torch",
        "diffusers",
        "peft",
        "pluggy",
        "accelerate",
        "cuda_available",
        "platform",
    ):
        assert key in doc, key
    assert doc["torch"] and isinstance(doc["cuda_available"], bool)


def test_inspect_unconverted(tiny):
    result = cli("inspect", tiny, "--json")
    assert result.exit_code == 0, result.output
    doc = as_json(result)
    assert set(doc["sites"]) == {"causal-temporal-conv", "causal-temporal-attention", "causal-norm"}
    assert all(doc["sites"].values())
    assert doc["uncovered"] == []
    assert doc["block_size"] == 1 and doc["plan"] == "unet3d"
    human = cli("inspect", tiny, "--pipeline", "causal-temporal-attention")
    assert human.exit_code == 0, human.output
    assert "causal-temporal-attention:" in human.stdout and "uncovered: " in human.stdout
    assert "warning: uncovered" in human.stderr  # convs and norms are left to no pass


# --- --help must stay light; the demo -------------------------------------------------------


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from causalize.cli.app import app\n"
        "r = CliRunner()\n"
        "for args in ([], ['convert'], ['verify'], ['inspect'], ['passes'], ['plugins'], ['env'], ['demo'],\n"
        "             ['train'], ['rollout'], ['encode'], ['embed-prompt']):\n"
        "    res = r.invoke(app, args + ['--help'])\n"
        "    assert res.exit_code == 0, (args, res.output)\n"
        "    assert 'Exit codes' in res.output, args\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_demo_every_family_becomes_causal(tmp_path):
    result = cli("demo", "--workdir", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = as_json(result)
    assert doc["passed"] is True and len(doc["rows"]) >= 4
    for row in doc["rows"]:
        assert row["causal"] is True, row
        assert row["unconverted_max_leak"] > 0 and row["converted_max_leak"] == 0
