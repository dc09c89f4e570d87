"""The patch space of the Atari study (issue 17): frames as grids of 4×4-pixel patches, an exact
and lossless transform, datasets the trainer reads as latents, and the study run end to end in it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("ale_py")
pytest.importorskip("gymnasium")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

import torch  # noqa: E402

from benchmarks.atari import evaluate as ev  # noqa: E402
from benchmarks.atari import patches, runtime, scales, study  # noqa: E402

SEED = 3
NORM = {"size": 4, "mean": [-0.5, -0.4, -0.6], "std": [0.5, 0.25, 0.4]}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 3), cells=st.integers(1, 4))
def test_patches_decode_back_to_the_same_pixels(seed, frames, cells):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(frames, 4 * cells, 4 * cells, 3), dtype=np.uint8)
    z = patches.encode(x, NORM)
    assert z.shape == (frames, 48, cells, cells) and z.dtype == np.float32
    back = patches.decode(torch.from_numpy(z).movedim(1, 0)[None], NORM)  # (1, C, T, h, w)
    assert back.shape == (1, 3, frames, 4 * cells, 4 * cells)
    assert np.array_equal(ev.to_uint8(back)[0], x)


def test_a_patch_is_the_pixels_of_one_cell():
    """Channel layout: one latent position holds exactly its 4×4 pixels (a change there moves only it)."""
    x = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    y = x.copy()
    y[0, 5, 2] = 255  # pixel row 5, column 2: cell (1, 0)
    diff = np.abs(patches.encode(y, NORM) - patches.encode(x, NORM)).sum(1)[0]
    assert np.flatnonzero(diff).tolist() == [1 * 2 + 0]


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("atari-patch") / "run"
    logs: list[str] = []
    results = study.run_study(out, scale="smoke", seed=SEED, space="patch", log=logs.append)
    return out, results, logs


def test_patch_study_trains_on_patches_and_scores_pixels(patch_run):
    out, results, _ = patch_run
    from causalize.episodes import read_info

    train = out / "patch" / "heldout_train"
    info = read_info(train)
    assert info.kind == "latents" and info.shape == (48, 8, 8)  # smoke frames 32×32
    # the normalisation is the pretraining clips' and is recorded with every dataset
    norm = patches.read_norm(train)
    assert norm == patches.measure_norm(out / "data" / "pretrain_clips")
    assert patches.read_norm(out / "patch" / "heldout_test") == norm
    # the stored patches are the pixel episodes, exactly
    src, dst = ev.load_segments(out / "data" / "heldout_test", 2, 2, 1), out / "patch" / "heldout_test"
    z = ev.load_latent_frames(dst, src.index, 4)
    assert np.array_equal(z, np.stack([patches.encode(f, norm) for f in src.frames]))
    cfg = json.loads((out / "pretrain" / "model" / "config.json").read_text())
    assert cfg["in_channels"] == cfg["out_channels"] == 48 and cfg["sample_size"] == 8
    frames = np.load(out / "eval" / "extrapolative_s1_real.npz")["frames"]
    assert frames.dtype == np.uint8 and frames.shape[-3:] == (32, 32, 3)
    # no autoencoder: nothing trained, no autoencoder references
    assert results["autoencoder"] is None and not (out / "autoencoder").exists()
    assert scales.AUTOENCODER not in results["runs"] and scales.BASELINE_AE not in results["runs"]


def test_patch_study_resumes_in_its_space(patch_run):
    out, _, _ = patch_run
    logs: list[str] = []
    again = study.run_study(out, scale="smoke", seed=SEED, log=logs.append)  # no space given: the recorded one
    assert again["stages_run_now"] == [] and again["study"]["config"]["space"] == "patch"
    with pytest.raises(scales.StudyError, match="another scale, seed or configuration"):
        study.run_study(out, scale="smoke", seed=SEED, space="latent", log=lambda m: None)


def test_encoding_refuses_an_existing_dataset(patch_run, tmp_path):
    out, _, _ = patch_run
    dst = tmp_path / "p"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        patches.encode_dataset(out / "data" / "heldout_test", dst, NORM)
    assert (dst / "keep.txt").read_text() == "mine"


def test_patch_space_has_the_latent_model_and_budgets_without_the_autoencoder():
    for backbone in ("unet3d", "wan"):  # the Wan DiT patches the 16x16 grid 2x2 in both spaces
        cfg = scales.resolve_config("cpu", backbone=backbone, space="patch")
        latent = scales.resolve_config("cpu", backbone=backbone, space="latent")
        assert cfg["model"] == latent["model"] and cfg["finetune"] == latent["finetune"] and cfg["latent"] is None


def test_action_moves_averages_each_actions_paddle_moves():
    from benchmarks.atari import control

    before = np.array([[10.0, 10.0, np.nan, 20.0]])
    after = np.array([[8.0, 13.0, 5.0, 19.0]])
    actions = np.array([[2, 3, 2, 2]])
    moves = control.action_moves(before, after, actions, 4)
    assert [m["n"] for m in moves] == [0, 0, 2, 1]  # the pair without a paddle is left out
    assert moves[2]["mean"] == pytest.approx(-1.5) and moves[3]["mean"] == pytest.approx(3.0)
    assert moves[0]["mean"] is None and moves[3]["sem"] is None
    with pytest.raises(ValueError, match="share a shape"):
        control.action_moves(before, after[:, :2], actions, 4)


def test_action_check_sees_an_adapter_only_when_it_acts(patch_run):
    """Negative control: a freshly converted model's action adapter ends in zeros, so its
    predictions cannot depend on the action (equal outputs: a spread at rounding level); once that
    layer is non-zero they do."""
    from causalize.rollout.loading import load_world_model

    out, results, _ = patch_run
    cfg = results["study"]["config"]
    segments = ev.load_segments(out / "data" / "heldout_test", cfg["eval"]["context"], 2, 1)
    segments.latents = ev.load_latent_frames(out / "patch" / "heldout_test", segments.index, segments.frames.shape[1])
    wm, _ = load_world_model(out / "convert" / "extrapolative", device="cpu")
    blind = ev.action_check(wm, segments, [500], 0, paddle=False)["500"]
    assert blind["action_rms"] < 1e-6 and blind["past_rms"] > 1e-3  # equal predictions up to the mean's rounding
    encoder = [m for n, m in wm.named_modules() if n.endswith("causalize_action_encoder")][0]
    with torch.no_grad():
        torch.nn.init.normal_(encoder.out[-1].weight, std=1.0)
    assert ev.action_check(wm, segments, [500], 0, paddle=False)["500"]["action_rms"] > 1e-3


def test_study_reports_the_action_check_and_the_real_moves(patch_run):
    out, results, _ = patch_run
    act = results["action"]
    assert set(act["variants"]) == set(results["variants"])
    for levels in act["variants"].values():
        assert set(levels) == {str(k) for k in scales.CONTEXT_LEVELS}
        for row in levels.values():
            assert row["action_rms"] >= 0 and row["past_rms"] >= 0
            assert [m["action"] for m in row["moves"]] == list(range(results["segments"]["num_actions"]))
    assert len(act["real_moves"]) == results["segments"]["num_actions"]
    assert "one-step action check" in (out / "README.md").read_text()


def test_budget_refuses_a_variant_whose_fine_tuning_has_not_finished(patch_run, tmp_path):
    from benchmarks.atari import budget

    out, results, _ = patch_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    shutil.rmtree(copy / "finetune" / "scratch" / "final")
    base = results["study"]["config"]["finetune"]["steps"]
    with pytest.raises(scales.StudyError, match="not finished fine-tuning 'scratch'"):
        budget.run(copy, "scratch", [base])


def test_budget_continues_a_study_that_was_moved(patch_run, tmp_path):
    """A study made in one place and moved (to results/) records its old paths: the continued
    fine-tuning trains from where the study is now. The copy's records name a folder that is gone."""
    from benchmarks.atari import budget

    out, results, _ = patch_run
    copy = tmp_path / "moved"
    shutil.copytree(out, copy, symlinks=True)
    record = copy / "finetune" / "extrapolative.json"
    record.write_text(record.read_text().replace(str(out), str(tmp_path / "gone")))
    assert str(tmp_path / "gone") in json.loads(record.read_text())["config"]["model"]
    base = results["study"]["config"]["finetune"]["steps"]
    doc = budget.run(copy, "extrapolative", [base + 1])
    assert (copy / "budget" / "extrapolative" / f"step-{base + 1}" / "final").is_dir() and doc["steps"][str(base + 1)]


def test_budget_continues_fine_tuning_and_measures_each_step_count(patch_run):
    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    with pytest.raises(scales.StudyError, match="at least the study's own"):
        budget.run(out, "extrapolative", [base - 1])
    only = budget.run(out, "extrapolative", [base])  # the study's own count: measured, nothing trained
    assert list(only["steps"]) == [str(base)]
    assert not (out / "budget" / "extrapolative").exists()
    doc = budget.run(out, "extrapolative", [base + 2])
    timing = {"seconds", "measure_seconds"}
    assert {k: v for k, v in doc["steps"][str(base)].items() if k not in timing} == {
        k: v for k, v in only["steps"][str(base)].items() if k not in timing
    }
    assert list(doc["steps"]) == [str(base), str(base + 2)]
    assert (out / "budget" / "extrapolative" / f"step-{base + 2}" / "final").is_dir()
    for row in doc["steps"].values():
        assert set(row["action_check"]) == {str(k) for k in scales.CONTEXT_LEVELS}
        assert row["paddle"]["verdict"] and "mean" in row["paddle"]["real_minus_random"]
        d = row["paddle"]["real_minus_random"]  # per segment too; their mean is the overall one
        assert len(d["per_segment"]) == d["n"] or None in d["per_segment"]
        assert np.nanmean([np.nan if v is None else v for v in d["per_segment"]]) == pytest.approx(d["mean"])
    # the study's own step count is measured on the study's model: its rollout matches the study's
    assert doc["steps"][str(base)]["psnr_real"] == pytest.approx(
        results["runs"]["extrapolative_s1_real"]["metrics"]["psnr"]["overall"]
    )
    # ... and its copy-last comparison on the first frames is the study's own
    first = next(c for c in results["comparisons"] if c["claim"].endswith("generated frames") and c["b"] == "copy-last")
    mine = doc["steps"][str(base)]["copy_last"]
    span = next(k for k in mine if k != "all")
    assert first["a"] == "extrapolative_s1_real" and span == f"first_{scales.FIRST_FRAMES}"
    assert mine[span]["psnr"]["mean"] == pytest.approx(first["psnr"]["mean"])
    assert mine[span]["ssim"]["per_segment"] == pytest.approx(first["ssim"]["per_segment"])
    assert "| fine-tuning steps |" in budget.table(doc)


def test_budget_runs_on_a_replicate_seed(patch_run):
    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    doc = budget.run(out, "extrapolative", [base + 1], replicate=1)
    assert doc["training_seed"] == SEED + 1 and doc["out"] == str(out / f"seed{SEED + 1}")
    assert (out / f"seed{SEED + 1}" / "budget" / "extrapolative" / f"step-{base + 1}" / "final").is_dir()
    with pytest.raises(scales.StudyError, match="no fine-tuned variant 'noncausal-norm'"):
        budget.run(out, "noncausal-norm", [base + 1], replicate=1)  # the ablation is not replicated
    with pytest.raises(scales.StudyError, match="no replicate 7"):
        budget.open_study(out, 7)


def test_a_shared_only_study_is_fine_tuned_run_by_run_by_the_budget_check(patch_run, tmp_path):
    """``--shared-only`` stops after the shared stages; ``budget --fine-tune-missing`` then makes a
    seed's run with the study's own stages: the same weights as the full study's (same seeds). The
    controls: without the flag the missing run is refused, and without the shared models too."""
    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    part = tmp_path / "part"
    done = study.run_study(part, scale="smoke", seed=SEED, space="patch", data_dir=out / "data", shared_only=True)
    assert done["shared_only"] and "pretrain" in done["stages_run_now"]
    assert (part / "pretrain" / "model").is_dir() and not (part / "finetune").exists()
    with pytest.raises(scales.StudyError, match="--fine-tune-missing fine-tunes it"):
        budget.run(part, "extrapolative", [base])
    doc = budget.run(part, "extrapolative", [base], fine_tune_missing=True)
    final = "finetune/extrapolative/final"
    assert budget._fingerprint(part / final) == budget._fingerprint(out / final)
    assert doc["steps"][str(base)]["psnr_real"] == pytest.approx(
        results["runs"]["extrapolative_s1_real"]["metrics"]["psnr"]["overall"]
    )
    shutil.rmtree(part / "scratch_init" / "model")
    with pytest.raises(scales.StudyError, match=r"no scratch_init/model.*--shared-only"):
        budget.run(part, "scratch", [base], fine_tune_missing=True)


@pytest.fixture
def study_threads(patch_run):
    """The study's torch threads and deterministic kernels, as ``budget``'s command line sets them
    (bit-equal weights need the same thread count), restored afterwards."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    runtime.set_determinism(patch_run[1]["study"]["threads"], "cpu")
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1])


def test_budget_with_settings_fine_tunes_afresh_from_the_converted_model(patch_run, study_threads):
    """--set trains the variant again from its converted checkpoint with the study's settings so
    changed. Control: a setting at its default value reproduces the study's own fine-tuned weights
    bit for bit; a higher adapter rate gives other weights, in the adapter as well."""
    from safetensors.torch import load_file

    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    weights = "diffusion_pytorch_model.safetensors"
    study_w = load_file(out / "finetune" / "extrapolative" / "final" / weights)
    same = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 1.0})
    assert same["name"] == "extrapolative+adapter_lr_scale=1.0" and list(same["steps"]) == [str(base)]
    again = load_file(out / "budget" / same["name"] / f"step-{base}" / "final" / weights)
    assert all(torch.equal(study_w[k], again[k]) for k in study_w)
    faster = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    other = load_file(out / "budget" / faster["name"] / f"step-{base}" / "final" / weights)
    adapter = [k for k in study_w if k.startswith("causalize_action_encoder.")]
    assert adapter and any(not torch.equal(study_w[k], other[k]) for k in adapter)
    assert faster["settings"] == {"adapter_lr_scale": 30.0} and "| fine-tuning steps |" in budget.table(faster)


def test_budget_keeps_measurements_for_the_same_weights_only(patch_run, monkeypatch):
    """A rerun with one more step count (30, given as an int: the same run as 30.0) continues from
    the last run and measures only the new model; a kept measurement whose weights no longer match
    (the control: a retrained model) is measured again."""
    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    first = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    measured = []
    original = budget.measure
    monkeypatch.setattr(budget, "measure", lambda *a: measured.append(a[2]) or original(*a))
    more = budget.run(out, "extrapolative", [base, base + 1], overrides={"adapter_lr_scale": 30})
    assert more["name"] == first["name"] and [p.parent.name for p in measured] == [f"step-{base + 1}"]
    kept, again = ({k: v for k, v in d["steps"][str(base)].items() if k != "seconds"} for d in (more, first))
    assert json.dumps(kept, sort_keys=True) == json.dumps(again, sort_keys=True)
    path = out / "budget" / first["name"] / f"step-{base}" / budget.MEASURE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "weights_sha256": "another model"}))
    measured.clear()
    budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    assert [p.parent.name for p in measured] == [f"step-{base}"]
    # a kept row from before the copy-last comparison existed is measured again
    row = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "copy_last"}))
    measured.clear()
    again = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    assert [p.parent.name for p in measured] == [f"step-{base}"] and "copy_last" in again["steps"][str(base)]
    # ... and one from before the per-segment paddle differences
    row = json.loads(path.read_text())
    del row["paddle"]["real_minus_random"]["per_segment"]
    path.write_text(json.dumps(row))
    measured.clear()
    again = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    assert [p.parent.name for p in measured] == [f"step-{base}"]
    assert "per_segment" in again["steps"][str(base)]["paddle"]["real_minus_random"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"steps": 5}, "cannot change steps"),
        ({"prediction_type": "epsilon"}, "cannot change prediction_type"),
        ({"bogus": 1}, "bogus"),
        ({"adapter_lr_scale": 0}, "adapter_lr_scale"),
    ],
)
def test_budget_refuses_bad_settings(patch_run, overrides, needle):
    from benchmarks.atari import budget

    out, _, _ = patch_run
    with pytest.raises(scales.StudyError, match=needle):
        budget.run(out, "extrapolative", [1], overrides=overrides)


def test_budget_parses_settings():
    from benchmarks.atari import budget

    assert budget.parse_settings(["adapter_lr_scale=10", "train_only=adapter"]) == {
        "adapter_lr_scale": 10,
        "train_only": "adapter",
    }
    with pytest.raises(scales.StudyError, match="KEY=VALUE"):
        budget.parse_settings(["adapter_lr_scale"])


def test_budget_refuses_a_directory_without_a_study(tmp_path):
    from benchmarks.atari import budget

    with pytest.raises(scales.StudyError, match="no study"):
        budget.open_study(tmp_path)


def test_budget_measures_the_same_models_with_another_sampler(patch_run):
    """--sampler changes the measurement's rollouts, not the models: with the study's own history
    level (the control) the study's rollout comes back; with another one the rollouts differ, and
    a budget run's kept measurement is kept per sampler (the plain one stays as it was)."""
    from benchmarks.atari import budget

    out, results, _ = patch_run
    base = results["study"]["config"]["finetune"]["steps"]
    own = results["study"]["config"]["eval"]["history_noise"]
    study_psnr = results["runs"]["extrapolative_s1_real"]["metrics"]["psnr"]["overall"]
    same = budget.run(out, "extrapolative", [base], sampler={"history_noise": own})
    assert same["steps"][str(base)]["psnr_real"] == pytest.approx(study_psnr)
    other = budget.run(out, "extrapolative", [base], sampler={"history_noise": own + 400})
    assert other["name"] == f"extrapolative@history_noise={own + 400}" and other["sampler"] == {
        "history_noise": own + 400
    }
    assert other["steps"][str(base)]["psnr_real"] != pytest.approx(study_psnr)
    assert "Rolled out with history_noise=" in budget.table(other)
    plain = budget.run(out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0})
    noised = budget.run(
        out, "extrapolative", [base], overrides={"adapter_lr_scale": 30.0}, sampler={"history_noise": 500}
    )
    run_dir = out / "budget" / plain["name"] / f"step-{base}"
    assert json.loads((run_dir / "measure@history_noise=500.json").read_text())["sampler"] == {"history_noise": 500}
    assert (
        json.loads((run_dir / budget.MEASURE_FILE).read_text())["psnr_real"] == plain["steps"][str(base)]["psnr_real"]
    )
    assert noised["steps"][str(base)]["psnr_real"] != pytest.approx(plain["steps"][str(base)]["psnr_real"])


@pytest.mark.parametrize(
    "sampler, needle",
    [
        ({"guidance_scale": 2.0}, "cannot change guidance_scale"),
        ({"history_noise": -1}, "history_noise must be"),
        ({"steps": 0}, "steps must be"),
        ({"window": 1}, "window must be"),
    ],
)
def test_budget_refuses_bad_sampler_settings(patch_run, sampler, needle):
    from benchmarks.atari import budget

    out, results, _ = patch_run
    with pytest.raises(scales.StudyError, match=needle):
        budget.run(out, "extrapolative", [results["study"]["config"]["finetune"]["steps"]], sampler=sampler)
