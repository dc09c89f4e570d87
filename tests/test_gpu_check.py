"""benchmarks/gpu_check.py --quick: the GPU check runs end to end at tiny sizes on the CPU, so the
one command a lent GPU runs is known to work before the GPU is asked for."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("gpu_check")
    module.main(["--quick", "--out", str(out)])
    return json.loads((out / "gpu_check.quick.json").read_text())


def test_every_section_ran_without_errors(quick):
    assert quick["quick"] is True and "errors" not in quick, quick.get("errors")
    assert set(quick["section_seconds"]) == {"causality", "forward", "streaming", "train"}
    assert quick["table"] and quick["attention"]["backend"] in ("dense", "chunked", "flex")


def test_causality_is_exact_for_every_plan_in_fp32_and_bf16(quick):
    from causalize.plugin_manager import registries

    rows = quick["causality"]
    assert {(r["plan"], r["dtype"]) for r in rows} == {
        (p, d) for p in registries().plans.names() for d in ("float32", "bfloat16")
    }
    for r in rows:
        assert r["passed"] and r["leak_after"] == 0 and r["leak_before"] > 0, (
            r
        )  # negative control: the stock model leaks


def test_forward_paths_and_streaming_and_training_are_measured(quick):
    for path in ("stock", "flex", "chunked", "dense"):
        assert quick["forward"][path]["seconds"] > 0, quick["forward"][path]
    for path in ("flex", "chunked"):  # the three block-causal paths compute the same attention
        fwd = quick["forward"][path]
        assert fwd["max_abs_diff_vs_dense"] <= 0.05 * fwd["output_scale"], fwd
    for row in quick["streaming"]:
        assert row["streaming_frame_passes"] < row["full_frame_passes"]
        assert row["frame_pass_ideal"] > 1 and row["single_frame_step"]["flops"] > 0
        # the compiled strategy served its last frame's steps compiled, and did not fall back
        assert row["compiled_calls"] >= row["steps"] and row["compile_failure"] is None, row
    assert quick["train"]["loss_finite"] and quick["train"]["gradient_checkpointing"] is True
