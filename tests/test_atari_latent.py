"""The latent Atari study (issue 17) at the smoke scale: the study's own autoencoder, the datasets
encoded through causalize.latents, world models trained on latents and scored on decoded pixels,
replicate training seeds with verdicts over seeds."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("gymnasium")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import reuse, scales, seeds, study  # noqa: E402

SEED = 5


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("atari-latent") / "run"
    logs: list[str] = []
    results = study.run_study(out, scale="smoke", seed=SEED, space="latent", log=logs.append)
    return out, results, logs


def test_latent_study_trains_on_latents_and_scores_pixels(latent_run):
    out, results, _ = latent_run
    from causalize.episodes import read_info
    from causalize.latents.record import read_dataset_record

    info = read_info(out / "latent" / "heldout_train")
    record = read_dataset_record(out / "latent" / "heldout_train")
    assert info.kind == "latents" and record is not None
    assert record.vae.class_name == "AutoencoderKL" and record.slots == 1  # one latent frame per video frame
    # the world model was built for the autoencoder's latents, not for pixels
    cfg = json.loads((out / "pretrain" / "model" / "config.json").read_text())
    assert cfg["in_channels"] == scales.LATENT_SCALES["smoke"]["latent"]["latent_channels"]
    assert cfg["sample_size"] == 32 // 2  # smoke frames 32×32, one halving
    # predictions are decoded: the stored frames are pixels of the real frames' shape
    frames = np.load(out / "eval" / "extrapolative_s1_real.npz")["frames"]
    assert frames.dtype == np.uint8 and frames.shape[-3:] == (32, 32, 3)
    assert results["runs"][scales.AUTOENCODER]["actions"] == "none"
    ae = results["autoencoder"]
    assert ae["reconstruction"]["frames"] > 0 and math.isfinite(ae["latent_std"])
    # the normalisation the autoencoder was saved with makes the stored latents about unit scale
    vae_cfg = json.loads((out / "autoencoder" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(1.0 / ae["latent_std"])


def test_replicates_train_with_their_own_seed_and_share_the_rest(latent_run):
    out, results, _ = latent_run
    other = SEED + 1
    assert sorted(results["replicates"]) == sorted([str(SEED), str(other)])
    rep = out / f"seed{other}"
    assert (rep / "finetune" / "extrapolative" / "final").is_dir()
    assert not (rep / "pretrain").exists() and not (rep / "data").exists()  # shared stages stay at the root
    assert not (rep / "finetune" / "shift").exists()  # only the replicated variants
    ft = json.loads((rep / "finetune" / "extrapolative.json").read_text())
    assert ft["config"]["seed"] == other
    a = np.load(out / "eval" / "extrapolative_s1_real.npz")["frames"]
    b = np.load(rep / "eval" / "extrapolative_s1_real.npz")["frames"]
    assert a.shape == b.shape and not np.array_equal(a, b)  # another training run, another model
    claims = {c["claim"] for c in results["across_seeds"]}
    assert "pretrained transfer beats training from scratch" in claims
    assert any("paddle error" in c for c in claims)
    for c in results["across_seeds"]:
        assert c["seeds"] == [SEED, other] and c["verdict"]


def test_report_gives_claim_by_claim_verdicts(latent_run):
    out, results, _ = latent_run
    text = (out / "README.md").read_text()
    assert "## Verdicts, claim by claim" in text
    assert "over 2 training seeds" in text
    assert "first 2 generated frames" in text
    assert "autoencoded last context frame" in text
    assert "Does the model use its past?" in text
    ctx = results["context"]["extrapolative"]
    assert set(ctx) == {str(k) for k in scales.CONTEXT_LEVELS}
    assert all(set(row) == {"own", "other"} and math.isfinite(row["own"]["psnr"]) for row in ctx.values())
    assert scales.BASELINE_AE in results["runs"]
    assert "paddle row, real frames" in text
    assert (out / "rollout.gif").is_file()


def test_latent_study_resumes_without_rerunning(latent_run):
    out, results, _ = latent_run
    logs: list[str] = []
    again = study.run_study(out, scale="smoke", seed=SEED, space="latent", log=logs.append)
    assert again["stages_run_now"] == []
    assert again["runs"] == json.loads(json.dumps(results["runs"]))


def test_space_is_part_of_the_identity_and_checked(latent_run, tmp_path):
    out, _, _ = latent_run
    with pytest.raises(scales.StudyError, match="another scale, seed or configuration"):
        study.run_study(out, scale="smoke", seed=SEED, space="pixel", log=lambda m: None)
    with pytest.raises(scales.StudyError, match="unknown space"):
        scales.resolve_config("smoke", space="voxels")


def test_a_bad_attention_setting_stops_the_study_before_it_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "fastest")
    with pytest.raises(scales.StudyError, match="not an attention backend"):
        study.run_study(tmp_path / "s", scale="smoke", seed=SEED, space="latent", log=lambda m: None)
    assert not (tmp_path / "s").exists()


def test_the_results_record_which_attention_ran(latent_run, monkeypatch):
    """A resumed study re-analyses and writes its results, recording this process's attention:
    the one asked for, not a default (chunked is neither the CPU's auto choice nor the default)."""
    out, _, _ = latent_run
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "chunked")
    results = study.run_study(out, scale="smoke", seed=SEED, space="latent", log=lambda m: None)
    attention = results["study"]["attention"]
    assert attention["device"] == "cpu" and attention["requested"] == "chunked" and attention["backend"] == "chunked"


def test_wan_backbone_runs_in_latent_space(latent_run, tmp_path):
    """The small Wan DiT on the study's latents: 2x2 patches on the 16x16 grid (4x4 on pixels), its
    own variants replicated, every stage through; the budget check picks its method variant."""
    from benchmarks.atari import budget

    source, _, _ = latent_run
    for space, patch in (("latent", [1, 2, 2]), ("patch", [1, 2, 2]), ("pixel", [1, 4, 4])):
        assert scales.resolve_config("cpu", backbone="wan", space=space)["model"]["patch_size"] == patch
    assert "patch_size" not in scales.resolve_config("cpu", space="latent")["model"]  # the UNet3D keeps its own
    out = tmp_path / "wan"
    res = study.run_study(
        out, scale="smoke", seed=SEED, backbone="wan", space="latent", data_dir=source / "data", log=lambda m: None
    )
    cfg = res["study"]["config"]
    assert (cfg["backbone"], cfg["space"], cfg["replicates"]["variants"]) == ("wan", "latent", ["causal", "scratch"])
    model = json.loads((out / "pretrain" / "model" / "config.json").read_text())
    assert model["_class_name"] == "WanTransformer3DModel" and model["in_channels"] == cfg["latent"]["latent_channels"]
    assert all(v["verification"]["passed"] for v in res["variants"].values())
    assert "pretrained transfer beats training from scratch" in {c["claim"] for c in res["across_seeds"]}
    doc = budget.run(out, None, [cfg["finetune"]["steps"] + 1])
    assert doc["variant"] == "causal" and (out / "budget" / "causal" / f"step-{cfg['finetune']['steps'] + 1}").is_dir()

    # its GIF: the measured model rolled out again, checked against the measurement first
    from benchmarks.atari import budget_gif

    steps = cfg["finetune"]["steps"] + 1
    record = out / "budget" / "causal.json"
    record.write_text(json.dumps(doc))
    shown = budget_gif.write_gif(out, steps)
    assert Path(shown["gif"]) == out / "budget" / "causal" / f"step-{steps}" / "rollout.gif"
    assert Path(shown["gif"]).is_file() and shown["model"].endswith(f"step-{steps}/final")
    tampered = json.loads(json.dumps(doc))
    tampered["steps"][str(steps)]["paddle"]["real_minus_random"]["per_segment"][0] += 1.0  # negative control
    record.write_text(json.dumps(tampered))
    with pytest.raises(scales.StudyError, match="differ from the budget check"):
        budget_gif.write_gif(out, steps, out=tmp_path / "never.gif")
    assert not (tmp_path / "never.gif").exists()
    with pytest.raises(scales.StudyError, match="no budget check of 'causal' measured at 99 steps"):
        budget_gif.write_gif(out, 99)


def _as_committed(study_dir: Path, dest: Path, keep: tuple[str, ...] = ()) -> Path:
    """A copy of a finished study as git keeps one: the JSON and reports, without the recordings,
    latents, autoencoder and model weights (the results directories' .gitignore), but for the
    models in ``keep`` (a few studies commit their autoencoder and pretrained model)."""
    shutil.copytree(study_dir, dest)
    gone = ["data/*/", "latent/*/", "autoencoder/vae", "pretrain/model", "scratch_init/model"]
    gone += [f"{r}{d}/*/" for r in ("", "seed*/") for d in ("convert", "finetune")]
    for pattern in [g for g in gone if g not in keep]:
        for path in dest.glob(pattern):
            shutil.rmtree(path)
    for path in dest.rglob("*.npz"):
        path.unlink()
    return dest


def test_the_gpu_run_study_on_emulated_cuda_gives_the_cpu_numbers(latent_run, tmp_path, monkeypatch):
    """What a lent GPU will run (the Wan DiT in latent space), on emulated cuda: every stage (the
    autoencoder, encoding, pretraining, conversion, fine-tuning through accelerate, the rollouts and
    their scores) keeps its tensors on the device, and the numbers are the CPU's (dense attention on
    both, as gpu_run sets it). The device bugs the emulation catches are tested with negative
    controls in tests/test_emulated_cuda.py."""
    from causalize.testing.emulated_cuda import emulated_cuda

    monkeypatch.setenv("CAUSALIZE_ATTENTION", "dense")
    data = latent_run[0] / "data"
    kwargs = dict(scale="smoke", seed=SEED, backbone="wan", space="latent", data_dir=data, log=lambda m: None)
    cpu = study.run_study(tmp_path / "cpu", **kwargs)
    with emulated_cuda() as mode:
        gpu = study.run_study(tmp_path / "cuda", device="cuda", **kwargs)
    assert (cpu["study"]["device"], gpu["study"]["device"]) == ("cpu", "cuda") and mode.ops > 10_000
    for key in ("autoencoder", "runs", "denoising", "controllability", "comparisons", "across_seeds"):
        assert _untimed(gpu[key]) == _untimed(cpu[key]), key


def _untimed(doc):
    """A record without its wall-clock fields."""
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items() if "seconds" not in k}
    if isinstance(doc, list):
        return [_untimed(v) for v in doc]
    return doc


def test_broad_pretraining_check_remakes_gone_stages_and_pairs_with_the_study(latent_run, tmp_path):
    """benchmarks.atari.broad on a study as committed: it remakes the recordings and the autoencoder
    (and checks they are the study's), pretrains on more clips, and compares each training seed's
    model with that seed's scratch and transfer runs of the study on the same segments."""
    from benchmarks.atari import broad

    source, results, _ = latent_run
    kept = _as_committed(source, tmp_path / "study")
    assert not (kept / "autoencoder" / "vae").exists()
    per_game = results["study"]["config"]["data"]["clips_per_game"]
    doc = broad.run(kept, tmp_path / "broad", clips_per_game=2 * per_game, steps=None, seeds=2, log=lambda m: None)
    assert doc["base_stages"]["remade"] and doc["clips"]["study_clips_are_the_first"]
    assert doc["pretrain"]["windows"] > results["pretrain"]["windows"]  # more clips than the study's
    assert sorted(doc["per_seed"]) == [str(SEED), str(SEED + 1)]
    scratch = results["runs"][scales.run_name("scratch", 1.0, "real")]["metrics"]["psnr"]["overall"]
    assert doc["per_seed"][str(SEED)]["psnr"]["study_scratch"] == pytest.approx(scratch)
    claims = {row["claim"]: row for row in doc["across_seeds"]}
    assert broad.TRANSFER in claims and broad.BROAD_VS_STUDY in claims
    assert any("paddle" in row for row in claims.values())
    assert all(row["verdict"] and row["seeds"] == [SEED, SEED + 1] for row in claims.values())
    assert (tmp_path / "broad" / "broad.json").is_file() and "study scratch" in broad.table(doc)


def test_broad_check_refuses_an_autoencoder_that_does_not_reproduce(latent_run, tmp_path):
    """Negative control: a remade autoencoder that differs from the study's record is refused, so
    no run is compared with study runs made on other latents."""
    from benchmarks.atari import broad

    source, results, _ = latent_run
    kept = _as_committed(source, tmp_path / "study")
    record = kept / "autoencoder" / "autoencoder.json"
    doc = json.loads(record.read_text())
    doc["final_loss"] += 1e-6
    record.write_text(json.dumps(doc))
    per_game = results["study"]["config"]["data"]["clips_per_game"]
    with pytest.raises(scales.StudyError, match="differs from the study's in final_loss"):
        broad.run(kept, tmp_path / "broad", clips_per_game=2 * per_game, steps=None, seeds=1, log=lambda m: None)
    assert not (tmp_path / "broad" / "pretrain").exists()
    with pytest.raises(scales.StudyError, match="fewer than the study's"):
        broad.run(source, tmp_path / "fewer", clips_per_game=1, steps=None, seeds=1, log=lambda m: None)
    with pytest.raises(scales.StudyError, match="--seeds 3"):
        broad.run(source, tmp_path / "seeds", clips_per_game=2 * per_game, steps=None, seeds=3, log=lambda m: None)


def test_mean_sem_and_the_t_rule_over_seeds():
    d = seeds.mean_sem([1.0, 2.0, 3.0])
    assert d["mean"] == pytest.approx(2.0) and d["sem"] == pytest.approx(1.0 / math.sqrt(3))
    assert d["beyond"]  # 2 > 2 × 0.577
    one = seeds.mean_sem([4.0, None])
    assert one["n"] == 1 and math.isnan(one["sem"]) and not one["beyond"]
    # over 3 seeds the bar is Student's 4.30 s.e., not 2: 2 / 0.577 = 3.46 does not clear it
    s = seeds.over_seeds([1.0, 2.0, 3.0])
    assert s["critical"] == pytest.approx(4.303) and not s["beyond"]
    assert seeds.over_seeds([1.0, 1.1, 0.9])["beyond"]


def test_a_claim_over_seeds_must_also_clear_the_segments():
    """Seeds that agree on a mean driven by one segment do not make a claim: the segments' spread counts."""

    def comp(per_segment):
        m = float(np.mean(per_segment))
        d = {"mean": m, "per_segment": per_segment}
        return {"claim": "x", "a": "a", "b": "b", "psnr": d, "ssim": d}

    noisy = [9.0, -3.0, -3.0, -3.0]  # mean 0; each seed adds 1 (+ a hair), all of it from segment 0
    per_seed = {s: {"comparisons": [comp([v + 0.01 * s + 1 for v in noisy])]} for s in range(3)}
    (row,) = seeds.across_seeds(per_seed)
    assert row["psnr"]["seeds"]["beyond"]  # the seeds agree closely
    assert not row["psnr"]["segments"]["beyond"]  # one segment carries the difference
    assert seeds.verdict(row) == "no difference"
    steady = {s: {"comparisons": [comp([1.0 + 0.01 * s, 1.1, 0.9, 1.0])]} for s in range(3)}
    (row,) = seeds.across_seeds(steady)
    assert seeds.verdict(row) == "holds"


def test_across_seeds_needs_the_claim_in_every_seed():
    d = {"mean": 1.0, "per_segment": [1.0, 1.0]}
    comp = {"claim": "x", "a": "a", "b": "b", "psnr": d, "ssim": d}
    per_seed = {0: {"comparisons": [comp]}, 1: {"comparisons": [{**comp, "psnr": {**d, "mean": 3.0}}]}}
    (row,) = seeds.across_seeds(per_seed)
    assert row["psnr"]["mean"] == pytest.approx(2.0) and row["psnr"]["seeds"]["per_seed"] == [1.0, 3.0]
    per_seed[1] = {"comparisons": []}
    assert seeds.across_seeds(per_seed) == []
    assert seeds.across_seeds({0: {"comparisons": [comp]}}) == []  # one seed: nothing over seeds


def test_set_cannot_change_space_or_backbone():
    for key in ("space", "backbone"):
        with pytest.raises(scales.StudyError, match=f"use --{key}"):
            scales.resolve_config("smoke", [f"{key}=pixel"])


def test_a_study_resumes_in_its_recorded_space(latent_run):
    out, results, _ = latent_run
    again = study.run_study(out, scale="smoke", seed=SEED, log=lambda m: None)  # no space given
    assert again["study"]["config"]["space"] == "latent" and again["stages_run_now"] == []


def test_foreground_marks_pixels_off_the_background_colour():
    import torch

    from benchmarks.atari.autoencoder import foreground

    x = torch.full((2, 3, 8, 8), -0.5)
    x[0, 1, 2:5, 6] = 0.9  # a small green object on the first frame
    m = foreground(x)
    assert m.shape == (2, 1, 8, 8)
    assert m[0, 0, 2:5, 6].eq(1).all() and m[0].sum() == 3
    assert m[1].sum() == 0  # a flat frame has no foreground


def test_step_cost_times_every_space():
    from benchmarks.atari import step_cost

    rows = step_cost.measure("smoke", repeats=1)
    assert [(r["space"], r["stage"]) for r in rows] == [
        ("pixel", "pretrain"),
        ("pixel", "finetune"),
        ("latent", "autoencoder"),
        ("latent", "pretrain"),
        ("latent", "finetune"),
        ("patch", "pretrain"),
        ("patch", "finetune"),
    ]
    assert all(r["s/step"] > 0 and r["steps/s"] > 0 for r in rows)
    assert rows[3]["model input"] == "16×16" and rows[0]["model input"] == "32×32" and rows[5]["model input"] == "8×8"
    wan = step_cost.measure("smoke", repeats=1, backbone="wan")  # the DiT, on the same shapes
    assert [(r["space"], r["stage"], r["model input"]) for r in wan] == [
        (r["space"], r["stage"], r["model input"]) for r in rows
    ]


def test_reuse_copies_the_shared_stages_for_a_fine_tuning_ablation(latent_run, tmp_path):
    """--reuse: a study that changes only fine-tuning settings copies the finished shared stages
    (nothing before conversion runs again) and fine-tunes anew; a study of another backbone copies
    the recordings, autoencoder and latents only and pretrains anew (the control: a copied
    pretraining would be the UNet3D's); other recordings, or a directory without a study, are refused."""
    out, results, _ = latent_run
    logs: list[str] = []

    def ablation(dest, setting, backbone="unet3d"):
        return study.run_study(
            dest,
            scale="smoke",
            seed=SEED,
            space="latent",
            backbone=backbone,
            overrides=[setting],
            reuse=out,
            log=logs.append,
        )

    other = tmp_path / "ablation"
    res = ablation(other, "finetune.motion_weight=1")
    assert not {"data", "autoencoder", "encode", "pretrain", "scratch-init"} & set(res["stages_run_now"])
    assert "finetune extrapolative" in res["stages_run_now"]
    assert (other / "pretrain" / "pretrain.json").read_bytes() == (out / "pretrain" / "pretrain.json").read_bytes()
    assert res["study"]["config"]["finetune"]["motion_weight"] == 1
    assert (
        res["variants"]["extrapolative"]["finetune"]["final_loss"]
        != results["variants"]["extrapolative"]["finetune"]["final_loss"]
    )
    logs.clear()
    wan = ablation(tmp_path / "wan", "finetune.steps=1", backbone="wan")
    assert not {"data", "autoencoder", "encode"} & set(wan["stages_run_now"])
    assert {"pretrain", "scratch-init"} <= set(wan["stages_run_now"])
    assert any("pretrain/ not copied: the studies differ in backbone, model" in m for m in logs)
    for rel in ("autoencoder/autoencoder.json", "latent/summary.json"):
        assert (tmp_path / "wan" / rel).read_bytes() == (out / rel).read_bytes()
    with pytest.raises(scales.StudyError, match="differs in data: it has other recordings"):
        ablation(tmp_path / "bad", "data.clips_per_game=3")
    with pytest.raises(scales.StudyError, match="no study there"):
        reuse.reuse_stages(tmp_path / "x", tmp_path, results["study"]["config"], SEED, "smoke", logs.append)


def test_reuse_copies_the_finished_runs_when_only_seeds_are_added(latent_run, tmp_path):
    """--reuse from a study that differs only in its replicates: every finished run (the study
    seed's and the replicate seed's) is copied, and only the added seed trains; its results are the
    source's where they overlap. The control is the ablation above: a changed fine-tuning setting
    trains the study seed's runs anew."""
    out, results, _ = latent_run
    logs: list[str] = []
    dest = tmp_path / "three"
    res = study.run_study(
        dest, scale="smoke", seed=SEED, space="latent", overrides=["replicates.seeds=3"], reuse=out, log=logs.append
    )
    ran = res["stages_run_now"]
    assert ran and all(name.endswith(f"(seed {SEED + 2})") for name in ran), ran
    assert any("finetune/ copied" in m for m in logs) and any(f"seed{SEED + 1}/ copied" in m for m in logs)
    assert any(m.startswith(f"[finetune extrapolative (seed {SEED + 2})]: step") for m in logs)  # progress names it
    assert (dest / f"seed{SEED + 2}" / "finetune" / "extrapolative" / "final").is_dir()
    assert sorted(res["replicates"]) == sorted(str(SEED + i) for i in range(3))
    for s in (SEED, SEED + 1):
        for key in ("comparisons", "controllability"):
            assert res["replicates"][str(s)][key] == json.loads(json.dumps(results["replicates"][str(s)][key]))
    assert res["variants"]["extrapolative"]["finetune"] == results["variants"]["extrapolative"]["finetune"]


def test_ae_probe_trains_another_autoencoder_beside_the_study(latent_run, tmp_path, capsys):
    """ae_probe: the study's autoencoder with a setting changed, trained into OUT (the study's own
    is untouched), its reconstruction check printed; OUT holding one, or an unknown setting, is refused."""
    import torch

    from benchmarks.atari import ae_probe

    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        _probe_checks(ae_probe, latent_run, tmp_path, capsys)
    finally:  # main() fixes threads and deterministic kernels for the process, as a CLI may
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _probe_checks(ae_probe, latent_run, tmp_path, capsys):
    out, results, _ = latent_run
    before = (out / "autoencoder" / "autoencoder.json").read_bytes()
    probe_out = tmp_path / "probe"
    args = ["--study", str(out), "--out", str(probe_out), "--set", "latent_channels=8", "--threads", "1"]
    assert ae_probe.main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"] == {"latent_channels": 8} and 0 <= doc["reconstruction"]["paddle_found"] <= 1
    saved = json.loads((probe_out / "autoencoder.json").read_text())
    assert saved["config"]["latent_channels"] == 8 and (probe_out / "vae").is_dir()
    assert (out / "autoencoder" / "autoencoder.json").read_bytes() == before
    assert ae_probe.main(args) == 2  # OUT holds one
    assert ae_probe.main(["--study", str(out), "--out", str(tmp_path / "b"), "--set", "bogus=1"]) == 2
    assert "no latent setting bogus" in capsys.readouterr().err


def test_reuse_of_a_committed_study_copies_only_what_is_there(latent_run, tmp_path):
    """--reuse of a study kept in results/ (records, plus the autoencoder and pretrained models it
    commits): the stages whose outputs are gone are made again, not copied as records alone, and
    the runs train again; the study then reproduces the source's numbers (same seeds). The control:
    from the complete study every stage and run is copied."""
    out, results, _ = latent_run
    committed = _as_committed(out, tmp_path / "committed", keep=("autoencoder/vae", "pretrain/model"))
    assert reuse.runs_lacking(out) == [] and "finetune/extrapolative/final" in reuse.runs_lacking(committed)
    cfg, logs = results["study"]["config"], []
    copied = reuse.reuse_stages(tmp_path / "a", committed, cfg, SEED, "smoke", logs.append)
    assert copied == ["autoencoder", "pretrain"]
    assert any("data/ not copied: its record is there but not pretrain_clips" in m for m in logs)
    assert any("runs not copied (trained anew): their records are there but not" in m for m in logs)
    everything = reuse.reuse_stages(tmp_path / "b", out, cfg, SEED, "smoke", logs.append)
    assert {"data", "latent", "scratch_init", "finetune", "eval"} <= set(everything)

    logs.clear()
    again = study.run_study(tmp_path / "c", scale="smoke", seed=SEED, space="latent", reuse=committed, log=logs.append)
    assert not {"autoencoder", "pretrain"} & set(again["stages_run_now"])
    assert {"data", "encode", "scratch-init", "finetune extrapolative"} <= set(again["stages_run_now"])
    assert again["comparisons"] == json.loads(json.dumps(results["comparisons"]))


def test_gpu_run_returns_a_finished_study_and_a_stopped_one(latent_run, tmp_path, monkeypatch, capsys):
    """gpu_run on a copy of a finished study (the smoke scale and its seed passed through): the
    study resumes with nothing to do, and its record comes back; a study stopped by the limit
    comes back as that, with its log."""
    import shutil

    from benchmarks.atari import gpu_run
    from causalize.errors import UsageError

    monkeypatch.delenv("CAUSALIZE_ATTENTION", raising=False)
    out, _, _ = latent_run
    copy = tmp_path / "study"
    shutil.copytree(out, copy, symlinks=True)
    done = gpu_run.run("unet3d", 600, copy, tmp_path / "back", ["--scale", "smoke", "--seed", str(SEED)])
    assert done["finished"] and done["exit_status"] == 0 and not done["stopped_by_limit"], done
    assert done["copied"] == ["results.json", "README.md", "study.json", "rollout.gif"]
    back = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert back == sorted([*done["copied"], "gpu_run.json", "study.log"])  # at most 8 files come back
    assert json.loads((tmp_path / "back" / "gpu_run.json").read_text()) == done
    log = (tmp_path / "back" / "study.log").read_text()
    assert "study: backbone unet3d, scale smoke" in log
    # the child runs the attention gpu_run asks for (its own default would be auto)
    assert done["attention"] == "dense" and "attention dense (environment variable CAUSALIZE_ATTENTION)" in log
    with pytest.raises(UsageError, match="not one of"):
        gpu_run.run("unet3d", 600, copy, tmp_path / "never", attention="fast")
    assert not (tmp_path / "never").exists()

    stopped = gpu_run.run("unet3d", 0.5, tmp_path / "fresh", tmp_path / "cut", ["--scale", "smoke"])
    assert stopped["stopped_by_limit"] and not stopped["finished"] and stopped["copied"] == []
    assert (tmp_path / "cut" / "study.log").is_file()
    monkeypatch.setenv("CAUSALIZE_ATTENTION", " fastest")  # an exported choice is the default, checked
    with pytest.raises(UsageError, match="CAUSALIZE_ATTENTION='fastest' is not an attention backend"):
        gpu_run.run("unet3d", 600, copy, tmp_path / "never")
    assert gpu_run.main(["--out", str(copy), "--dest", str(tmp_path / "never")]) == 2
    assert "error: CAUSALIZE_ATTENTION" in capsys.readouterr().err


def test_step_ops_counts_a_fine_tuning_step_of_the_study(latent_run, tmp_path):
    """step_ops runs the study's own fine-tuning under a dispatch counter: the per-step count is the
    same whichever step counts are differenced (setup, loading and saving cancel out), and the
    optimiser's operations are told apart from the model's."""
    from benchmarks.atari import step_ops

    out, _, _ = latent_run
    first = step_ops.step_ops(out, batch=1, steps=(1, 2))
    again = step_ops.step_ops(out, batch=1, steps=(2, 3))
    assert first["ops_per_step"] == again["ops_per_step"] > 0
    assert first["optimiser_step_ops_per_step"] > 0 and first["views_per_step"] > 0
    parts = first["views_per_step"] + first["optimiser_step_ops_per_step"] + first["other_ops_per_step"]
    assert parts == first["ops_per_step"] == sum(first["by_op"].values())
    assert first["by_op"].get("mm", 0) + first["by_op"].get("addmm", 0) + first["by_op"].get("convolution", 0) > 0
    with pytest.raises(FileNotFoundError, match="no fine-tuning record of 'nope'"):
        step_ops.step_ops(out, "nope")
    assert step_ops.main(["--study", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
