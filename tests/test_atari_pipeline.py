"""The Atari study (benchmarks/atari/study.py) end to end at the smoke scale.

One fresh run, a second fresh run with the same seed (identical numbers), and a resume of the
second after one evaluation was removed (only that evaluation runs again).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("ale_py")
pytest.importorskip("gymnasium")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import runtime, scales, stages, study  # noqa: E402

SEED = 3


def _numbers(results: dict) -> dict:
    """Everything that must be reproducible (timings and paths excluded)."""
    return {
        "runs": results["runs"],
        "comparisons": results["comparisons"],
        "pretrain_loss": results["pretrain"]["final_loss"],
        "finetune_loss": {v: d["finetune"]["final_loss"] for v, d in results["variants"].items()},
        "verification": {v: d["verification"] for v, d in results["variants"].items()},
        "best": results["best_main_guidance"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("atari-study")
    logs: list[str] = []
    first = study.run_study(root / "a", scale="smoke", space="pixel", seed=SEED, log=logs.append)
    second = study.run_study(root / "b", scale="smoke", space="pixel", seed=SEED, log=logs.append)
    return {"root": root, "first": first, "second": second, "logs": logs}


def test_every_stage_writes_its_outputs(runs):
    out = runs["root"] / "a"
    for path in [
        "study.json",
        "data/summary.json",
        "pretrain/pretrain.json",
        "pretrain/model/config.json",
        "pretrain/metrics.jsonl",
        "scratch_init/model/config.json",
        "results.json",
        "README.md",
        "rollout.gif",
        "rollout_grid.png",
        "plots/variants_psnr.png",
        "plots/variants_ssim.png",
        "plots/guidance_psnr.png",
        "plots/controllability_psnr.png",
        "plots/finetune_loss.png",
    ]:
        assert (out / path).is_file(), path
    for v in scales.VARIANTS:
        assert (out / "convert" / v / "causalize.json").is_file()
        assert (out / "finetune" / v / "final" / "causalize.json").is_file()
    for v in scales.VARIANTS:
        assert (out / "eval" / f"denoise_{v}.json").is_file()
    for run in scales.eval_runs(scales.resolve_config("smoke", space="pixel")):
        assert (out / "eval" / f"{run['name']}.json").is_file()
        assert (out / "eval" / f"{run['name']}.npz").is_file()
    assert not (out / "pretrain" / "checkpoint.pt").exists()


def test_results_cover_every_variant_run_and_metric(runs):
    res = json.loads((runs["root"] / "a" / "results.json").read_text())
    cfg = res["study"]["config"]
    assert set(res["variants"]) == set(scales.VARIANTS)
    expected = {r["name"] for r in scales.eval_runs(cfg)} | {scales.BASELINE}
    assert set(res["runs"]) == expected
    horizon = cfg["eval"]["horizon"]
    for name, run in res["runs"].items():
        for metric in ("psnr", "ssim"):
            m = run["metrics"][metric]
            assert len(m["mean"]) == horizon and m["n"] == res["segments"]["count"], name
            assert all(x == x for x in m["mean"]), name  # no NaN
    assert {r["guidance"] for r in res["runs"].values() if r["variant"] == scales.MAIN and r["actions"] == "real"} == {
        1.0,
        1.5,
        2.5,
    }
    assert any(r["actions"] == "random" for r in res["runs"].values())
    # the time-spanning norm is not causal, and the verification says so; every other variant is causal
    ver = {v: d["verification"]["passed"] for v, d in res["variants"].items()}
    assert ver == {v: spec["causal"] for v, spec in scales.VARIANTS.items()}
    assert "causal-norm" not in res["variants"]["noncausal-norm"]["pipeline"]
    assert "transfer=shift" in res["variants"]["shift"]["pipeline"]
    # the one-step denoising check: every variant, every level; no denoising scores worse at
    # higher noise (the noisy input carries less of the frame)
    assert set(res["denoising"]) == set(scales.VARIANTS)
    for v, levels in res["denoising"].items():
        assert [int(k) for k in levels] == list(scales.DENOISE_LEVELS)
        inputs = [levels[k]["input"] for k in levels]
        assert inputs == sorted(inputs, reverse=True), (v, inputs)
        assert all(d["x0"] == d["x0"] for d in levels.values())
    claims = {c["claim"] for c in res["comparisons"]}
    assert "pretrained transfer beats training from scratch" in claims
    assert all(c["verdict"] for c in res["comparisons"])
    text = (runs["root"] / "a" / "README.md").read_text()
    assert "| run |" in text and "Paired comparisons" in text


def test_same_seed_same_numbers(runs):
    assert _numbers(runs["first"]) == _numbers(runs["second"])


def test_resume_reruns_only_what_is_missing(runs):
    out = runs["root"] / "b"
    name = scales.run_name("scratch", 1.0, "random")
    (out / "eval" / f"{name}.json").unlink()
    logs: list[str] = []
    again = study.run_study(out, scale="smoke", space="pixel", seed=SEED, log=logs.append)
    assert again["stages_run_now"] == [f"eval {name}"]
    assert any("skipped" in line for line in logs)
    assert _numbers(again) == _numbers(runs["second"])


def test_refuses_a_directory_of_another_study(runs):
    with pytest.raises(scales.StudyError, match="another scale, seed or configuration"):
        study.run_study(runs["root"] / "a", scale="smoke", space="pixel", seed=SEED + 1, log=lambda m: None)


def test_pretraining_resumes_exactly(runs, tmp_path):
    """An interrupted pretraining continues from its checkpoint to the same weights."""
    import torch

    from benchmarks.atari import pretrain as pt

    cfg = scales.resolve_config("smoke", space="pixel")
    settings = {**cfg["pretrain"], "steps": 4, "checkpoint_every": 1}
    data = str(runs["root"] / "a" / "data" / "pretrain_clips")

    def config(name: str) -> pt.PretrainConfig:
        return pt.PretrainConfig(data=data, output_dir=str(tmp_path / name), model=cfg["model"], seed=SEED, **settings)

    def stop_at_2(step: int, total: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    pt.pretrain(config("whole"))
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(config("cut"), progress=stop_at_2)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = pt.pretrain(config("cut"))
    assert resumed["start_step"] == 2  # the checkpoint of step 2 was written before the interruption
    weights = "model/diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / weights), load_file(tmp_path / "cut" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the Wan (DiT) backbone -------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_run(runs):
    """The smoke study on the small Wan DiT, reusing the UNet run's recordings (same data settings)."""
    out = runs["root"] / "wan"
    res = study.run_study(
        out, scale="smoke", seed=SEED, backbone="wan", data_dir=runs["root"] / "a" / "data", log=lambda m: None
    )
    return out, res


def test_wan_backbone_runs_transfer_against_scratch(wan_run):
    out, res = wan_run
    assert res["study"]["config"]["backbone"] == "wan"
    assert (
        json.loads((out / "pretrain" / "model" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    )
    assert set(res["variants"]) == {"causal", "scratch"}
    for v, d in res["variants"].items():
        assert d["verification"]["passed"] is True, v  # the frame-causal mask leaves nothing to leak
        assert d["pipeline"].startswith("block-causal-attention"), d["pipeline"]
    claims = {c["claim"] for c in res["comparisons"]}
    assert "pretrained transfer beats training from scratch" in claims
    assert not any("shift" in c or "norm" in c for c in claims)  # the UNet-only ablations are not invented
    assert {r["guidance"] for r in res["runs"].values() if r["variant"] == "causal" and r["actions"] == "real"} == {
        1.0,
        1.5,
        2.5,
    }
    assert "backbone `wan`" in (out / "README.md").read_text()
    # its recordings lie in another study's OUT/data: the tools that open it find them there
    from benchmarks.atari import budget

    assert budget.open_study(out).data_root == (out.parent / "a" / "data").resolve()


def test_a_resume_without_data_keeps_its_linked_recordings(runs, wan_run):
    """A study run with --data and resumed without it finds its recordings where it put them (it
    used to record them afresh into OUT/data and drop the link); a link to recordings that are
    gone, its own or a --reuse study's, is refused rather than replaced."""
    from benchmarks.atari import budget

    out, res = wan_run
    logs: list[str] = []
    again = study.run_study(out, scale="smoke", seed=SEED, backbone="wan", log=logs.append)
    assert not (out / "data").exists()  # nothing recorded again
    assert stages.linked_data(out) == (runs["root"] / "a" / "data").resolve()
    assert any("(linked; --data overrides)" in m for m in logs)
    assert again["runs"] == res["runs"]
    gone = runs["root"] / "gone"
    gone.mkdir()
    (gone / stages.DATA_LINK).write_text(json.dumps({"data": str(runs["root"] / "nowhere")}))
    with pytest.raises(scales.StudyError, match=r"which is gone: .* delete .*data\.json"):
        study.run_study(gone, scale="smoke", space="pixel", seed=SEED, log=lambda m: None)
    with pytest.raises(scales.StudyError, match="which is gone: .* leave out --reuse"):
        study.run_study(runs["root"] / "fresh", scale="smoke", space="pixel", seed=SEED, reuse=gone, log=lambda m: None)
    assert not (runs["root"] / "fresh" / "data").exists()
    (runs["root"] / "own" / "data").mkdir(parents=True)  # a study with recordings of its own ignores --reuse's link
    with pytest.raises(scales.StudyError, match="no study there"):  # got past the data, to --reuse's own check
        study.run_study(runs["root"] / "own", scale="smoke", space="pixel", seed=SEED, reuse=gone, log=lambda m: None)
    (gone / "study.json").write_text((out / "study.json").read_text())  # a finished study whose recordings went
    with pytest.raises(scales.StudyError, match="which is gone"):
        budget.open_study(gone)


def test_a_directory_of_one_backbone_refuses_the_other(runs, wan_run):
    with pytest.raises(scales.StudyError, match="another scale, seed or configuration"):
        study.run_study(
            wan_run[0], scale="smoke", space="pixel", seed=SEED, log=lambda m: None
        )  # unet3d into the wan study


def test_studies_recorded_before_backbones_resume_as_unet3d(tmp_path):
    cfg = scales.resolve_config("smoke", space="pixel")
    # recorded before backbones (issue 6) and before spaces and replicates (issue 17)
    old = {k: v for k, v in cfg.items() if k not in ("backbone", "space", "latent", "replicates")}
    # and before the fine-tuning settings motion_weight and adapter_lr_scale
    old["finetune"] = {k: v for k, v in cfg["finetune"].items() if k not in ("motion_weight", "adapter_lr_scale")}
    (tmp_path / "study.json").write_text(json.dumps({"scale": "smoke", "seed": SEED, "config": old}))
    stages.Study(tmp_path, cfg, SEED, scale="smoke").check_identity()  # accepted, not refused
    # the control: a study recorded with another fine-tuning setting is another study
    other = scales.resolve_config("smoke", ["finetune.motion_weight=1"], space="pixel")
    with pytest.raises(scales.StudyError, match="another scale, seed or configuration"):
        stages.Study(tmp_path, other, SEED, scale="smoke").check_identity()


def test_finetune_settings_reach_the_trainer(tmp_path, monkeypatch):
    """--set finetune.motion_weight / adapter_lr_scale reach TrainConfig; by default the plain loss
    and one learning rate (the trainer's defaults)."""
    import causalize.training.trainer as trainer

    captured = []
    monkeypatch.setattr(trainer, "train", lambda config, progress=None: captured.append(config) or {})
    assert {k: scales.resolve_config("smoke")["finetune"][k] for k in ("motion_weight", "adapter_lr_scale")} == {
        "motion_weight": 0.0,
        "adapter_lr_scale": 1.0,
    }
    cfg = scales.resolve_config("smoke", ["finetune.motion_weight=2", "finetune.adapter_lr_scale=5"], space="pixel")
    stages.Study(tmp_path, cfg, SEED, scale="smoke").finetune("extrapolative")
    assert (captured[0].motion_weight, captured[0].adapter_lr_scale) == (2, 5)
    # the latent gpu scale fine-tunes motion-weighted (the cpu budget check's lever); the cpu
    # scale and the pixel gpu scale keep the plain loss, and --set still overrides the scale
    weight = {
        (s, sp): scales.resolve_config(s, space=sp)["finetune"]["motion_weight"]
        for s in ("cpu", "gpu")
        for sp in ("latent", "pixel")
    }
    assert weight == {("cpu", "latent"): 0.0, ("cpu", "pixel"): 0.0, ("gpu", "latent"): 1.0, ("gpu", "pixel"): 0.0}
    assert scales.resolve_config("gpu", ["finetune.motion_weight=0"], space="latent")["finetune"]["motion_weight"] == 0


def test_finetune_episodes_trains_every_variant_and_seed_on_the_same_subset(runs, tmp_path, monkeypatch):
    """--set finetune.episodes=K fine-tunes on exactly K of the recorded training episodes, the
    same K for every variant and training seed; by default (null) on all of them."""
    import causalize.training.trainer as trainer
    from causalize.episodes import EpisodeDataset

    captured = []
    monkeypatch.setattr(trainer, "train", lambda config, progress=None: captured.append(config) or {})
    data = runs["root"] / "a" / "data"
    recorded = scales.resolve_config("smoke")["data"]["train_episodes"]

    def chosen(config):
        return EpisodeDataset(
            config.data, config.window, split=config.split, test_fraction=config.test_fraction
        ).episodes

    cfg = scales.resolve_config("smoke", ["finetune.episodes=2"], space="pixel")
    base = stages.Study(tmp_path / "k2", cfg, SEED, scale="smoke", data_dir=data)
    base.finetune("extrapolative")
    base.finetune("scratch")
    base.replica(1).finetune("extrapolative")
    subsets = [chosen(c) for c in captured]
    assert len(subsets[0]) == 2 and subsets == [subsets[0]] * 3
    # the control: without the setting, every recorded episode
    captured.clear()
    stages.Study(
        tmp_path / "all", scales.resolve_config("smoke", space="pixel"), SEED, scale="smoke", data_dir=data
    ).finetune("extrapolative")
    assert captured[0].split is None and len(chosen(captured[0])) == recorded
    for bad in (0, recorded + 1, 1.5, True):
        # refused when the configuration is resolved, before any stage runs ...
        with pytest.raises(scales.StudyError, match="finetune.episodes must be an integer"):
            scales.resolve_config("smoke", [f"finetune.episodes={json.dumps(bad)}"], space="pixel")
        # ... and by the fine-tuning stage against the recordings there (a Study made directly)
        cfg = scales.resolve_config("smoke", space="pixel")
        cfg["finetune"]["episodes"] = bad
        with pytest.raises(scales.StudyError, match="finetune.episodes must be an integer"):
            stages.Study(tmp_path / "bad", cfg, SEED, scale="smoke", data_dir=data).finetune("extrapolative")


def test_unknown_backbone_and_foreign_variants_are_refused():
    with pytest.raises(scales.StudyError, match="unknown backbone"):
        scales.resolve_config("smoke", backbone="vqgan")
    with pytest.raises(scales.StudyError, match="not a variant of the wan backbone"):
        scales.eval_runs(scales.resolve_config("smoke", ['eval.random_variants=["shift"]'], backbone="wan"))


def test_denoising_check_does_not_depend_on_the_batch(runs):
    from benchmarks.atari import evaluate as ev
    from causalize.rollout.loading import load_world_model

    out = runs["root"] / "a"
    wm, _ = load_world_model(out / "finetune" / "scratch" / "final")
    e = scales.resolve_config("smoke", space="pixel")["eval"]
    segments = ev.load_segments(out / "data" / "heldout_test", e["context"], e["horizon"], e["segments_per_episode"])
    whole = ev.denoising_psnr(wm, segments, [20, 999], SEED)
    one_by_one = ev.denoising_psnr(wm, segments, [20, 999], SEED, batch_size=1)
    assert whole.keys() == one_by_one.keys()
    for k in whole:
        for name in ("x0", "input"):
            assert abs(whole[k][name] - one_by_one[k][name]) < 1e-3, (k, name)
    assert whole["20"]["input"] > whole["999"]["input"]
    assert json.loads((out / "eval" / "denoise_scratch.json").read_text())["levels"]["20"] == pytest.approx(
        ev.denoising_psnr(wm, segments, list(scales.DENOISE_LEVELS), SEED)["20"]
    )


def _process_settings() -> tuple:
    import torch

    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


def test_determinism_leaves_the_process_as_it_was(monkeypatch):
    """The CUDA settings (TF32, cuBLAS's workspace variable, warn-only determinism) and the thread
    count hold inside the block only; the bare setter, the negative control, leaves them behind."""
    import torch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "x")  # recorded, so monkeypatch restores it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads != 2 else 1)
    before = _process_settings()
    try:
        with runtime.determinism(threads, "cuda"):
            inside = _process_settings()
            assert inside[0] == threads and inside[2] and inside[3] and inside[5] == ":4096:8"
        assert _process_settings() == before
        runtime.set_determinism(threads, "cuda")
        assert _process_settings() != before
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[3], before[4]


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("scale", "asked", "expected"),
    [("smoke", None, 1), ("gpu", None, min(8, runtime.usable_cores())), ("smoke", 3, 3)],
)
def test_recording_workers_reach_the_recorder(tmp_path, monkeypatch, scale, asked, expected):
    """The gpu scale records in one process per core (at most 8), the others in one, unless asked."""
    seen = {}

    def record_default(*args, workers, **kw):
        seen["workers"] = workers
        raise _Stop

    monkeypatch.setattr(stages.atari_data, "record_default", record_default)
    with pytest.raises(_Stop):
        study.run_study(tmp_path / "s", scale=scale, record_workers=asked, log=lambda m: None)
    assert seen["workers"] == expected
    with pytest.raises(scales.StudyError, match="record_workers must be a positive integer"):
        study.run_study(tmp_path / "t", scale=scale, record_workers=0, log=lambda m: None)
