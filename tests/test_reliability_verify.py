"""Issue 13: the checker and the loader against hostile or broken inputs.

1. NaN / inf (in the weights, from an overflow, in the probe inputs) fails verification with its
   own message and exit 1; every JSON written stays strict JSON.
2. causalize.json is untrusted: field types, base class, pipeline coverage and sizes are checked
   before anything is built (exit 4, a CheckpointError naming the file and the field).
3. A config.json naming a pipeline or scheduler class is exit 4 before anything is built.
4. A malicious pickle under --allow-pickle is "refused as unsafe", with no advice to turn the
   protection off.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from causalize.api import load, load_any, verify_model
from causalize.errors import CheckpointError, UsageError
from causalize.manifest import MANIFEST, Manifest
from causalize.plugin_manager import registries
from causalize.verify import check_causality

runner = CliRunner()


def cli(*args: object):
    from causalize.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python's json accepts them by default)."""

    def refuse(name: str):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def tiny(plan_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return registries().plans.get(plan_name).build_tiny()


def set_first(model: torch.nn.Module, name: str, value: float) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = value


# --- 1. non-finite values fail verification ---------------------------------------------------------


@pytest.mark.parametrize(("plan_name", "param", "value"), [("wan", "proj_out.weight", float("nan"))])
def test_nan_weight_fails_with_its_own_message(plan_name, param, value):
    model = tiny(plan_name)
    set_first(model, param, value)
    report = verify_model(model, plan_name)
    assert not report.passed
    assert report.nonfinite.base_frames == [0, 1, 2, 3]
    assert report.nonfinite.params == [param] and report.nonfinite.params_total == 1
    summary = report.summary()
    assert "NON-FINITE" in summary and param in summary and "max leak 0" not in summary
    doc = report.to_json()
    text = json.dumps(doc, allow_nan=False)  # strict JSON, no bare NaN
    assert strict_json(text)["matrix"][0][0] == "nan"
    assert doc["passed"] is False and doc["nonfinite"]["weights"] == [param]
    assert "nan" in report.format_matrix()


def test_inf_weight_in_a_unet_fails():
    model = tiny("unet3d")
    set_first(model, "conv_out.weight", float("inf"))
    report = verify_model(model, "unet3d")
    assert not report.passed and report.nonfinite
    assert report.nonfinite.params == ["conv_out.weight"]
    assert "conv_out.weight" in report.summary()
    json.dumps(report.to_json(), allow_nan=False)


def test_overflow_with_finite_weights_fails_and_says_the_weights_are_finite():
    model = tiny("wan")
    with torch.no_grad():
        model.proj_out.weight.fill_(3e38)  # finite in fp32; the matmul overflows
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    report = verify_model(model, "wan")
    assert not report.passed and report.nonfinite.base_frames
    assert report.nonfinite.params == []
    assert "weights are all finite" in report.summary()


def test_nonfinite_plan_inputs_fail():
    plan = registries().plans.get("wan")
    model = tiny("wan")
    inputs = plan.make_inputs(model, 4, torch.Generator().manual_seed(0))
    inputs["encoder_hidden_states"] = torch.full_like(inputs["encoder_hidden_states"], float("nan"))
    report = check_causality(model, inputs, plan.layout, plan.forward)
    assert not report.passed
    assert report.nonfinite.inputs == ["encoder_hidden_states"]
    assert "encoder_hidden_states" in report.summary()


def test_assert_causal_and_assert_leaks_both_fail_on_nan():
    from causalize.testing import CausalityCheckFailed, assert_causal, assert_leaks

    model = tiny("wan")
    set_first(model, "proj_out.weight", float("nan"))
    with pytest.raises(CausalityCheckFailed, match="NON-FINITE"):
        assert_causal(model, plan="wan")
    with pytest.raises(CausalityCheckFailed, match="NON-FINITE"):
        assert_leaks(model, plan="wan")  # a NaN probe is no evidence of a leak either


def test_nan_tolerance_is_refused():
    with pytest.raises(UsageError, match="tolerance"):
        verify_model(tiny("wan"), "wan", tolerance=float("nan"))


def test_finite_model_still_passes_with_exact_zeros():
    from causalize.api import convert_model

    model = tiny("wan")
    convert_model(model, "wan")
    report = verify_model(model, "wan")
    assert report.passed and not report.nonfinite and report.max_leak == 0.0
    assert report.to_json()["nonfinite"] is None


def test_manifest_write_is_strict_json(tmp_path):
    m = Manifest("X", "wan", "block-causal-attention", [], verification={"max_leak": float("nan")})
    with pytest.raises(ValueError):
        m.write(tmp_path)
    assert not (tmp_path / MANIFEST).exists()


@pytest.fixture(scope="module")
def nan_wan(tmp_path_factory) -> Path:
    """A saved tiny Wan checkpoint with one NaN weight."""
    model = tiny("wan")
    set_first(model, "proj_out.weight", float("nan"))
    path = tmp_path_factory.mktemp("nan") / "wan"
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_cli_verify_nan_checkpoint_exits_1(nan_wan):
    result = cli("verify", nan_wan)
    assert result.exit_code == 1, result.output
    assert "NON-FINITE" in result.stdout and "proj_out.weight" in result.stdout
    assert "max leak 0" not in result.stdout
    as_json = cli("verify", nan_wan, "--json")
    assert as_json.exit_code == 1
    doc = strict_json(as_json.stdout)
    assert doc["passed"] is False and doc["nonfinite"]["base_output_frames"] == [0, 1, 2, 3]


def test_cli_convert_nan_checkpoint_writes_nothing_or_strict_json(nan_wan, tmp_path):
    out = tmp_path / "out"
    result = cli("convert", nan_wan, out, "--json")
    assert result.exit_code == 1, result.output
    assert strict_json(result.stdout)["verification"]["passed"] is False
    assert not out.exists() and "NOT verified" in result.stderr

    allowed = cli("convert", nan_wan, out, "--allow-leak")
    assert allowed.exit_code == 1, allowed.output
    manifest = strict_json((out / MANIFEST).read_text())
    assert manifest["verification"]["passed"] is False
    assert manifest["verification"]["matrix"][0][0] == "nan"
    assert '"passed": true' not in (out / MANIFEST).read_text()


# --- 2. causalize.json is untrusted -----------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_wan(tmp_path_factory) -> Path:
    """A converted tiny Wan world model (block-causal-attention + a 3-d action adapter)."""
    from causalize.api import convert

    root = tmp_path_factory.mktemp("wan")
    tiny("wan").save_pretrained(root / "base", safe_serialization=True)
    report = convert(root / "base", root / "causal", action_dim=3)
    assert report.written and report.passed
    return root / "causal"


@pytest.fixture
def damaged(converted_wan, tmp_path):
    """A private copy of the converted checkpoint and a function that rewrites its manifest."""
    path = Path(shutil.copytree(converted_wan, tmp_path / "copy"))

    def rewrite(edit) -> Path:
        data = json.loads((path / MANIFEST).read_text())
        data = edit(data)
        (path / MANIFEST).write_text(json.dumps(data))
        return path

    return rewrite


def _set(key, value):
    def edit(data):
        data[key] = value
        return data

    return edit


def test_intact_manifest_loads(converted_wan):
    model = load(converted_wan)
    assert type(model).__name__ == "WanTransformer3DModel"


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_set("format_version", "1"), ["format_version", "must be an integer"]),
        (_set("format_version", True), ["format_version", "must be an integer"]),
        (_set("format_version", 2), ["format_version 2", "reads 1"]),
        (lambda d: [], ["not a JSON object"]),
        (lambda d: "x", ["not a JSON object"]),
        (_set("pipeline", 5), ["field 'pipeline'", "a string"]),
        (_set("passes", {"a": 1}), ["field 'passes'", "a list"]),
        (_set("records", [1, 2]), ["field 'records'", "a list of JSON objects"]),
        (_set("verification", [1]), ["field 'verification'"]),
        (lambda d: {k: v for k, v in d.items() if k != "plan"}, ["lacks field 'plan'"]),
        (_set("plan", "no-such-plan"), ["field 'plan'", "no-such-plan"]),
        (_set("base_class", "UNet3DConditionModel"), ["base_class", "WanTransformer3DModel"]),
        (_set("pipeline", "block-causal-attention{block_size=99999999999999999999}"), ["field 'pipeline'"]),
        (_set("pipeline", "no-such-pass"), ["field 'pipeline'"]),
    ],
)
def test_bad_manifest_is_a_checkpoint_error(damaged, edit, needles):
    path = damaged(edit)
    with pytest.raises(CheckpointError) as info:
        load(path)
    for needle in [MANIFEST, *needles]:
        assert needle in str(info.value), (needle, str(info.value))
    assert_one_line_error(cli("verify", path), 4, MANIFEST)


def test_manifest_that_drops_a_pass_is_refused(damaged):
    path = damaged(_set("pipeline", "frame-conditioning{action_dim=3,action_type=continuous}"))
    with pytest.raises(CheckpointError, match="lacks block-causal-attention"):
        load(path)
    assert_one_line_error(cli("verify", path), 4, "block-causal-attention")
    assert_one_line_error(cli("inspect", path), 4, "block-causal-attention")
    assert_one_line_error(cli("verify", path, "--shrink"), 4, "block-causal-attention")


def test_manifest_that_declares_its_leak_may_drop_a_pass(damaged):
    """--allow-leak checkpoints (e.g. the Atari study's noncausal-norm ablation) stay loadable;
    verify then measures the leak (exit 1), it does not refuse the checkpoint."""

    def edit(data):
        data["pipeline"] = "frame-conditioning{action_dim=3,action_type=continuous}"
        data["verification"]["passed"] = False
        return data

    path = damaged(edit)
    load(path)
    result = cli("verify", path)
    assert result.exit_code == 1, result.output
    assert "LEAK" in result.stdout


def test_allow_leak_checkpoint_with_a_partial_pipeline_stays_verifiable(tmp_path):
    """The real --allow-leak path (no causal-norm): loadable, and `verify` reports the leak (exit 1)."""
    from causalize.api import convert

    tiny("unet3d").save_pretrained(tmp_path / "base", safe_serialization=True)
    report = convert(
        tmp_path / "base",
        tmp_path / "leaky",
        pipeline="causal-temporal-conv,causal-temporal-attention",
        allow_leak=True,
    )
    assert report.written and not report.passed
    result = cli("verify", tmp_path / "leaky", "--json")
    assert result.exit_code == 1, result.output
    assert strict_json(result.stdout)["culprit"]["class"] == "GroupNorm"


@pytest.mark.parametrize("command", [["verify"], ["verify", "--shrink"], ["inspect"]])
def test_manifest_size_is_checked_before_allocation(damaged, command):
    """An action_dim from the manifest is compared with the safetensors headers before anything is
    built: 2**40 inputs would need terabytes if allocated (that would fail with exit 3, not 4)."""
    path = damaged(_set("pipeline", f"block-causal-attention,frame-conditioning{{action_dim={2**40}}}"))
    with pytest.raises(CheckpointError, match=f"action_dim={2**40}, but the action adapter in the weights takes 3"):
        load(path)
    assert_one_line_error(cli(*command, path), 4, MANIFEST, "action_dim")


def test_manifest_adding_an_adapter_the_weights_lack_is_refused(damaged, converted_wan):
    path = damaged(_set("pipeline", "block-causal-attention,frame-conditioning{action_dim=1000000000}"))
    (path / "diffusion_pytorch_model.safetensors").unlink()
    base = converted_wan.parent / "base" / "diffusion_pytorch_model.safetensors"
    shutil.copy(base, path)  # weights without an action adapter
    with pytest.raises(CheckpointError, match="takes no actions"):
        load(path)


def test_replayed_shapes_are_compared_with_the_headers(converted_wan):
    """The general check behind `load`: any tensor of the replayed recipe whose shape differs from
    the safetensors header is refused before the weights are read."""
    from causalize import checkpoint
    from causalize.api import _check_shapes

    md = checkpoint.open_model_dir(converted_wan)
    model = load(converted_wan)
    _check_shapes(model, md)  # the real recipe fits
    with torch.no_grad():
        model.proj_out.weight = torch.nn.Parameter(torch.zeros(5, 5))
    with pytest.raises(CheckpointError, match=r"proj_out\.weight with shape \(5, 5\)"):
        _check_shapes(model, md)


def test_huge_option_in_pipeline_text_is_a_usage_error(tmp_path):
    from causalize.passes.pipeline import parse

    with pytest.raises(UsageError, match="out of range"):
        parse("block-causal-attention{block_size=99999999999999999999}", registries().passes)
    src = tmp_path / "src"
    tiny("wan").save_pretrained(src, safe_serialization=True)
    result = cli(
        "convert",
        src,
        tmp_path / "out",
        "--dry-run",
        "--pipeline",
        "block-causal-attention{block_size=99999999999999999999}",
    )
    assert_one_line_error(result, 2, "block_size", "out of range")


# --- 3. a config.json of a pipeline or scheduler -------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plainwan") / "wan"
    tiny("wan").save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("class_name", ["WanPipeline", "DDIMScheduler", "ConfigMixin", "NoSuchClass"])
@pytest.mark.parametrize("command", ["verify", "inspect", "convert"])
def test_non_model_class_is_exit_4_before_building(wan_dir, tmp_path, class_name, command):
    path = Path(shutil.copytree(wan_dir, tmp_path / class_name))
    config = json.loads((path / "config.json").read_text())
    config["_class_name"] = class_name
    (path / "config.json").write_text(json.dumps(config))
    args = [command, path] + ([tmp_path / "out"] if command == "convert" else [])
    result = cli(*args)
    assert_one_line_error(result, 4, f"{class_name} is not a diffusers model class")
    assert "were passed to" not in result.output  # diffusers' from_config warning: nothing was built


# --- 4. a malicious pickle ---------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_as_unsafe(wan_dir, tmp_path):
    path = tmp_path / "evil"
    path.mkdir()
    shutil.copy(wan_dir / "config.json", path)
    marker = tmp_path / "pwned"
    torch.save({"proj_out.weight": _Payload(marker)}, path / "diffusion_pytorch_model.bin")
    result = cli("verify", path, "--allow-pickle")
    assert_one_line_error(result, 4, "refused as unsafe", "posix.system")
    assert "weights_only=False" not in result.output and "set to `False`" not in result.output
    assert "add_safe_globals" not in result.output and "corrupt" not in result.output
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_any(path, allow_pickle=True)
    assert info.value.kind == "pickle-refused" and not marker.exists()


def test_truncated_pickle_is_still_corrupt_not_unsafe(wan_dir, tmp_path):
    path = tmp_path / "trunc"
    path.mkdir()
    shutil.copy(wan_dir / "config.json", path)
    buf = path / "diffusion_pytorch_model.bin"
    torch.save({"a": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    buf.write_bytes(buf.read_bytes()[:20])
    result = cli("verify", path, "--allow-pickle")
    assert_one_line_error(result, 4, "corrupt or truncated")
    assert "unsafe" not in result.output


@pytest.mark.parametrize(
    "tampered", ["block-causal-attention{context_sees_video=true}", "block-causal-attention{block_size=4}"]
)
def test_a_manifest_whose_options_weaken_causality_is_refused(tmp_path, tampered):
    """Negative control first: the untampered checkpoint loads; then the same recipe with a leaky
    option and a 'passed' verification is refused before anything is built."""
    import causalize
    from causalize.api import convert
    from causalize.errors import CheckpointError as _CheckpointError
    from causalize.plugin_manager import registries as _registries

    src, out = tmp_path / "src", tmp_path / "out"
    _registries().plans.get("wan").build_tiny().save_pretrained(src)
    convert(src, out)
    causalize.load(out)
    doc = json.loads((out / "causalize.json").read_text())
    doc["pipeline"] = tampered
    (out / "causalize.json").write_text(json.dumps(doc))
    with pytest.raises(_CheckpointError, match="less causal than plan 'wan'"):
        causalize.load(out)
