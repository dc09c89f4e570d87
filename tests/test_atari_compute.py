"""The study scales' compute, counted on the meta device (benchmarks/atari/compute.py, issue 17):
what the gpu scale's "under 8 minutes" rests on while no GPU has run it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import compute, scales, stages  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

#: The gpu scale's counted budget: 9 PFLOP is 6 min at 25 TFLOP/s (about an H100 without tensor
#: cores), leaving the recording (1 min 44 s on the 2-core machine) inside the 8 minutes the issue sets.
GPU_PFLOP = 9.0


@pytest.mark.parametrize("backbone", ["unet3d", "wan"])
def test_a_step_counts_per_sample_and_backward_counts_twice_forward(backbone):
    """The counter sees the model's arithmetic, not a constant: twice the batch, twice the count;
    forward and backward about three forwards (the backward's two matmuls per forward one)."""
    cfg = scales.resolve_config("smoke", backbone=backbone, space="latent")
    one = compute.count_flops(compute._diffusion_pass(cfg, 1, 4, backward=False))
    two = compute.count_flops(compute._diffusion_pass(cfg, 2, 4, backward=False))
    both = compute.count_flops(compute._diffusion_pass(cfg, 1, 4, backward=True))
    assert one > 0 and two == 2 * one
    assert 2.5 * one < both <= 3 * one


def test_rows_count_every_stage_and_every_fine_tuning_run():
    cfg = scales.resolve_config("smoke", ["finetune.steps=3"], space="latent")
    rows = compute.scale_compute(cfg, tflops=[1.0])
    assert [r["stage"] for r in rows] == ["autoencoder", "pretraining", "fine-tuning (7 runs)", "evaluation", "total"]
    by = {r["stage"]: r for r in rows}
    # 5 UNet3D variants, then the 2 replicate variants for the second seed
    assert by["fine-tuning (7 runs)"]["count"] == 7 * 3
    assert by["total"]["flop"] == sum(r["flop"] for r in rows[:-1])
    assert by["total"]["min at 1 TFLOP/s"] == pytest.approx(by["total"]["flop"] / 1e12 / 60, abs=0.01)


@pytest.mark.parametrize("name", ["atari-latent", "atari-wan-wide-latent", "atari-wan-latent-mw3200-3seeds"])
def test_rollout_passes_are_what_the_recorded_rollouts_counted(name):
    """The evaluation's frame passes, summed over every rollout of a committed study and its
    replicate seeds (streamed, guided, and the UNet3D's recomputed time-spanning-norm ablation),
    equal the passes its rollouts recorded."""
    out = RESULTS / name
    cfg = stages.read_identity(out)["config"]
    recorded = 0
    for path in [*(out / "eval").glob("*.json"), *out.glob("seed*/eval/*.json")]:
        timing = json.loads(path.read_text(encoding="utf-8")).get("timing") or {}
        recorded += timing.get("frame_passes", 0)
    assert recorded > 0 and recorded == compute._segments(cfg) * compute._rollout_passes(cfg)


@pytest.mark.parametrize("backbone", ["unet3d", "wan"])
def test_the_latent_gpu_scale_fits_its_counted_budget(backbone):
    """A guard on the configuration, not a time: the gpu scale must stay within the compute its
    README's minutes are computed from (the 52.8M pixel DiT there would count 43.7 PFLOP)."""
    rows = compute.scale_compute(scales.resolve_config("gpu", backbone=backbone, space="latent"))
    assert rows[-1]["flop"] / 1e15 <= GPU_PFLOP


def test_the_wan_gpu_scale_trains_the_dit_whose_cpu_runs_met_the_targets():
    wide = stages.read_identity(RESULTS / "atari-wan-wide-latent-seeds")["config"]
    gpu = scales.resolve_config("gpu", backbone="wan", space="latent")
    assert gpu["model"] == wide["model"] and gpu["finetune"]["motion_weight"] == wide["finetune"]["motion_weight"]
    # as many fine-tuning windows as the cpu runs' 6,400 steps of 2, in steps of 16
    assert gpu["finetune"]["steps"] * gpu["finetune"]["batch_size"] == 6400 * wide["finetune"]["batch_size"]


def test_measured_rates_only_where_a_stage_was_timed_alone():
    rows = [{"stage": s, "flop": 2e12} for s in ("autoencoder", "fine-tuning (6 runs)", "evaluation", "total")]
    timings = {"autoencoder": 2.0, "finetune_total": 4.0, "eval_total": 1.0, "stages_total": 8.0}
    compute.measured_rates(rows, {**timings, "replicates_total": 0})
    assert [r.get("TFLOP/s measured") for r in rows] == [1.0, 0.5, 2.0, 0.25]
    rows = [{k: v for k, v in r.items() if k in ("stage", "flop")} for r in rows]
    compute.measured_rates(rows, {**timings, "replicates_total": 3.0})  # replicate seeds mix the stages
    assert [r.get("TFLOP/s measured") for r in rows] == [1.0, None, None, 0.25]


def test_cli_writes_the_rows_and_refuses_what_it_cannot_count(tmp_path, capsys):
    dest = tmp_path / "c.json"
    assert compute.main(["--scale", "smoke", "--tflops", "2", "--json", str(dest)]) == 0
    doc = json.loads(dest.read_text(encoding="utf-8"))
    assert doc["assumed_tflops"] == [2.0] and doc["rows"][-1]["stage"] == "total"
    assert "| total |" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(RESULTS / "atari-wan-wide-latent" / "study.json", broken / "study.json")
    (broken / "results.json").write_text("{not json", encoding="utf-8")
    refused = {
        "unknown scale": ["--scale", "huge"],
        "must be positive": ["--tflops", "0"],
        "no study.json": ["--study", str(tmp_path)],
        "drop --scale": ["--study", str(RESULTS / "atari-latent"), "--scale", "cpu"],
        "is not JSON": ["--study", str(broken)],
        "not variants of the wan backbone": ["--backbone", "wan", "--set", 'replicates.variants=["shift"]'],
    }
    for message, argv in refused.items():
        with pytest.raises(SystemExit) as exc:
            compute.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, message
