"""Pipelines with several denoisers (Wan 2.2 A14B: a high-noise `transformer` and a low-noise
`transformer_2`): `convert` converts every expert into OUT/NAME, or nothing."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from causalize.checkpoint import denoiser_subfolders
from causalize.cli.app import app
from causalize.plugin_manager import registries
from tests.cli_helpers import assert_one_line_error

runner = CliRunner()


def _two_expert_pipeline(root):
    plan = registries().plans.get("wan")
    for i, name in enumerate(("transformer", "transformer_2")):
        plan.build_tiny(seed=i).save_pretrained(root / name)
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_both_experts_are_converted_and_verified(tmp_path):
    pipe = _two_expert_pipeline(tmp_path / "pipe")
    assert denoiser_subfolders(pipe) == ["transformer", "transformer_2"]
    result = runner.invoke(app, ["convert", str(pipe), str(tmp_path / "out"), "--action-dim", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [e["out"] for e in doc["experts"]] == [str(tmp_path / "out" / n) for n in ("transformer", "transformer_2")]
    for name in ("transformer", "transformer_2"):
        manifest = json.loads((tmp_path / "out" / name / "causalize.json").read_text())
        assert manifest["verification"]["passed"] and manifest["verification"]["max_leak"] == 0
    from causalize import WorldModel

    a, b = (WorldModel.from_pretrained(tmp_path / "out" / n) for n in ("transformer", "transformer_2"))
    assert not torch.equal(next(a.parameters()), next(b.parameters()))  # two experts, not one twice


def test_one_expert_by_subfolder_and_verify_asks_which(tmp_path):
    pipe = _two_expert_pipeline(tmp_path / "pipe")
    result = runner.invoke(app, ["convert", str(pipe), str(tmp_path / "one"), "--subfolder", "transformer_2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one" / "causalize.json").is_file()
    result = runner.invoke(app, ["verify", str(pipe)])
    assert_one_line_error(result, 4, "several denoisers: transformer, transformer_2", "--subfolder")


def test_a_leaking_expert_writes_nothing(tmp_path):
    """--pipeline that converts nothing causal: verification fails for the first expert, OUT is not
    created (no half-converted pipeline)."""
    pipe = _two_expert_pipeline(tmp_path / "pipe")
    result = runner.invoke(app, ["convert", str(pipe), str(tmp_path / "out"), "--pipeline", "frame-conditioning"])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out").exists()
