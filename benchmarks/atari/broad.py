"""Does a broader pretraining make pretrained transfer pay? (issue 17)

    python -m benchmarks.atari.broad --study benchmarks/results/atari-latent-mw3200 --out DIR
        [--clips-per-game 320] [--steps N] [--seeds 3] [--threads 2] [--json PATH]

In the finished study DIR the pretrained model saw 240 clips of six games (3,840 frames, about
twice the Pong training frames), and its transfer scored the same as training from scratch. This
asks whether a broader pretraining pays. It:

0. takes the study's recordings, autoencoder and encoded Pong episodes; where they are gone (the
   results in git keep only the JSON), it makes them again in ``OUT/base`` with the study's own
   stages, seed and settings (deterministic), and refuses to go on unless the autoencoder's
   recorded loss, latent statistics and test reconstruction come out as the study's (to 1e-9);
1. records ``--clips-per-game`` clips of each of the study's pretraining games with the study's
   seed and settings (a clip's content depends only on (seed, game, index), so the study's clips
   are the first ones of each game: checked and recorded), and encodes them with that autoencoder;
2. pretrains the study's architecture on them from the study's random initialisation for
   ``--steps`` steps (default: the study's; same batch, window, learning rate, warm-up), in
   ``OUT/pretrain``;
3. converts, fine-tunes and evaluates the study's method variant from it, with the study's
   fine-tuning and evaluation settings, for each of the first ``--seeds`` training seeds
   (``OUT``, ``OUT/seed<S>``, as the study lays out replicates);
4. compares each seed's model, paired over the same test segments with the same sampler noise and
   random actions, with that seed's scratch and transfer runs of the study, and aggregates the
   claims over seeds with the study's rules (``benchmarks.atari.seeds``).

Every stage is resumable (the study's markers). A table goes to stdout, everything to
``OUT/broad.json`` (or ``--json``); progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import record_text
from benchmarks.atari import budget
from benchmarks.atari import data as atari_data
from benchmarks.atari import seeds as seeds_mod
from benchmarks.atari.emulator import RecordSettings
from benchmarks.atari.runtime import set_determinism
from benchmarks.atari.scales import BASELINE, StudyError, eval_runs, run_name
from benchmarks.atari.stages import Study
from benchmarks.atari.verdicts import comparisons, controllability

#: The shared stages taken over from the finished study as they are.
_COPIED = ("autoencoder", "latent/heldout_train", "latent/heldout_test")
#: Where the broader pixel clips are recorded, under OUT.
CLIPS_DIR = "clips"
#: The claim the study could not show, asked again of the broader pretraining.
TRANSFER = "pretrained transfer beats training from scratch"
BROAD_VS_STUDY = "broader pretraining beats the study's pretraining (transfer against transfer)"


def open_study(path: Path) -> Study:
    """The finished latent study at ``path``, opened as the budget check opens one."""
    study = budget.open_study(path)
    if study.space != "latent":
        raise StudyError(f"--study {path}: a {study.space} study; this check needs a latent one")
    return study


def study_threads(path: Path) -> int:
    """The torch threads the study ran with (results.json), else its scale's: float sums, and so
    a remade autoencoder, depend on it."""
    results = path / "results.json"
    if results.is_file():
        return int(json.loads(results.read_text())["study"]["threads"])
    return int(open_study(path).cfg["threads"])


def broad_config(cfg: dict[str, Any], clips_per_game: int, steps: int | None) -> dict[str, Any]:
    """The study's configuration with the broader clips (and another pretraining length)."""
    if clips_per_game < cfg["data"]["clips_per_game"]:
        raise StudyError(f"--clips-per-game {clips_per_game}: fewer than the study's {cfg['data']['clips_per_game']}")
    if steps is not None and steps < 1:
        raise StudyError(f"--steps {steps}: must be at least 1")
    out = copy.deepcopy(cfg)
    out["data"]["clips_per_game"] = int(clips_per_game)
    if steps is not None:
        out["pretrain"]["steps"] = int(steps)
    return out


def _has_artifacts(study: Study) -> bool:
    return (
        study.vae_dir().is_dir()
        and all((study.root / rel).is_dir() for rel in _COPIED[1:])
        and (study.pixel_dataset("test").is_dir())
    )


#: What must come out the same for a remade autoencoder to be the study's.
_AE_FACTS = ("final_loss", "reconstruction", "latent_std")


def _same(a: Any, b: Any, rel: float = 1e-9) -> bool:
    """Equal JSON values, floats to ``rel``: a metric's last digits may follow the CPU's summation
    order (the paddle error differs at 2e-16 between machines whose losses agree to every bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
    return a == b


def base_stages(src: Study, out: Path) -> tuple[Study, dict[str, Any]]:
    """The study's recordings, autoencoder and latents: the study's own, or made again in OUT/base
    and checked against the study's autoencoder.json."""
    if _has_artifacts(src):
        return src, {"remade": False}
    base = Study(out / "base", src.cfg, src.seed, scale=src.scale, device=src.device, log=src.log)
    base.root.mkdir(parents=True, exist_ok=True)
    base.check_identity()
    base.data()
    made = base.autoencoder() or {}
    base.encode()
    theirs = json.loads((src.root / "autoencoder" / "autoencoder.json").read_text())
    differ = [k for k in _AE_FACTS if not _same(made.get(k), theirs.get(k))]
    if differ:
        raise StudyError(
            f"the remade autoencoder ({base.root / 'autoencoder'}) differs from the study's in {', '.join(differ)}: "
            "its runs cannot be compared with the study's (another machine or library version?)"
        )
    return base, {"remade": True, "identical": list(_AE_FACTS)}


def _copy_shared(src: Study, dest: Study) -> None:
    for rel in _COPIED:
        if not (dest.root / rel).exists():
            shutil.copytree(src.root / rel, dest.root / rel)
            dest.log(f"[broad] {rel}/ copied from {src.root}")


def _same_clips(base: Study, clips: Path, per_game: int) -> bool:
    """Whether the study's clips are the first clips of each game in the broader recording."""
    ours = base.cfg["data"]["clips_per_game"]
    for k in range(len(base.cfg["data"]["games"])):
        for c in (0, ours - 1):
            a = atari_data.load_episode(base.pixel_dataset("pretrain"), k * ours + c)["frames"]
            b = atari_data.load_episode(clips, k * per_game + c)["frames"]
            if not np.array_equal(a, b):
                return False
    return True


def record_and_encode(base: Study, dest: Study) -> dict[str, Any]:
    """The broader clips (pixels under ``OUT/clips``), encoded by the study's autoencoder (which
    ``dest`` holds a copy of); ``base`` holds the study's own recordings."""
    from causalize.latents.encode import encode_episodes

    marker = dest.root / "broad_clips.json"
    if dest._skip(marker, "broad clips"):
        return json.loads(marker.read_text())
    d = dest.cfg["data"]
    settings = RecordSettings(warmup=tuple(d["warmup"]), size=int(d["size"]))
    clips = dest.root / CLIPS_DIR
    t0 = time.perf_counter()
    summary = atari_data.record_clips(
        d["games"],
        clips,
        d["clips_per_game"],
        d["clip_len"],
        dest.seed,
        overwrite=True,
        settings=settings,
        log=lambda m: dest.log(f"[broad clips] {m}"),
    )
    latent = dest.dataset("pretrain")
    if latent.exists():
        shutil.rmtree(latent)  # an interrupted encoding of an earlier recording
    report = encode_episodes(clips, latent, dest.vae_dir(), batch_size=256, device=dest.device)
    doc = {
        "clips": summary,
        "latent_frames": report.latent_frames,
        "study_clips_are_the_first": _same_clips(base, clips, d["clips_per_game"]),
        "seconds": time.perf_counter() - t0,
    }
    marker.write_text(record_text(doc, indent=2))
    return doc


def _runs_of(study: Study, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        path = study.out / "eval" / f"{name}.json"
        if not path.is_file():
            raise StudyError(f"{path}: the study has no such run (was it run with these replicates?)")
        out[name] = json.loads(path.read_text())
    return out


def seed_runs(src: Study, dest: Study, replicate: int, segments: Any) -> dict[str, Any]:
    """One training seed: the broad model's runs beside the study's scratch and transfer runs."""
    mine, theirs = dest.replica(replicate), src.replica(replicate)
    main = dest.backbone.main
    mine.convert(main)
    ft = mine.finetune(main)
    todo = [r for r in eval_runs(dest.cfg) if r["variant"] == main and r["guidance"] == 1.0]
    runs = {r["name"]: mine.evaluate(r, segments) for r in todo}
    real = run_name(main, 1.0, "real")
    study_runs = _runs_of(theirs, [run_name("scratch", 1.0, "real"), real])
    runs[run_name("scratch", 1.0, "real")] = study_runs[run_name("scratch", 1.0, "real")]
    runs[BASELINE] = dest.baseline(segments)
    comps = comparisons(runs, dest.cfg)
    x = {m: np.asarray(runs[real]["metrics"][m]["per_sample"]) for m in ("psnr", "ssim")}
    y = {m: np.asarray(study_runs[real]["metrics"][m]["per_sample"]) for m in ("psnr", "ssim")}
    comps.append(
        {"claim": BROAD_VS_STUDY, "a": real, "b": f"study:{real}"}
        | {m: seeds_mod.paired(x[m] - y[m]) for m in ("psnr", "ssim")}
    )
    for c in comps:
        c["verdict"] = seeds_mod.metrics_verdict(c["psnr"], c["ssim"], "beyond_2sem", none="no difference")
    return {
        "train_seed": mine.train_seed,
        "final_loss": ft.get("final_loss"),
        "psnr": {
            "broad": runs[real]["metrics"]["psnr"]["overall"],
            "study_transfer": study_runs[real]["metrics"]["psnr"]["overall"],
            "study_scratch": runs[run_name("scratch", 1.0, "real")]["metrics"]["psnr"]["overall"],
        },
        "comparisons": comps,
        "controllability": controllability(runs),
    }


def run(study_dir: Path, out: Path, clips_per_game: int, steps: int | None, seeds: int, log=None) -> dict[str, Any]:
    """The whole check (see the module docstring); returns what ``OUT/broad.json`` holds."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    src = open_study(study_dir)
    src.log = log
    n_seeds = int(src.cfg["replicates"]["seeds"])
    if not 1 <= seeds <= n_seeds:
        raise StudyError(f"--seeds {seeds}: the study has runs for 1 to {n_seeds} training seeds")
    cfg = broad_config(src.cfg, clips_per_game, steps)
    out.mkdir(parents=True, exist_ok=True)
    base, remade = base_stages(src, out)
    dest = Study(out, cfg, src.seed, scale=src.scale, data_dir=base.data_root, device=src.device, log=log)
    dest.check_identity()
    _copy_shared(base, dest)
    clips = record_and_encode(base, dest)
    pre = dest.pretrain()
    segments = dest.segments()
    per_seed = {}
    for r in range(seeds):
        per_seed[src.seed + r] = seed_runs(src, dest, r, segments)
    across = seeds_mod.across_seeds(per_seed)
    for row in across:
        row["verdict"] = seeds_mod.verdict(row)
    doc = {
        "study": str(study_dir),
        "config": {"clips_per_game": clips_per_game, "pretrain_steps": cfg["pretrain"]["steps"], "seeds": seeds},
        "base_stages": remade,
        "clips": clips,
        "pretrain": {
            k: pre.get(k) for k in ("steps", "windows", "final_loss", "train_seconds", "median_seconds_per_step")
        },
        "study_pretrain": json.loads((src.root / "pretrain" / "pretrain.json").read_text()).get("final_loss"),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "across_seeds": across,
    }
    (out / "broad.json").write_text(record_text(doc, indent=2))
    return doc


def table(doc: dict[str, Any]) -> str:
    """Per seed PSNR of the three models, then each claim over seeds."""
    lines = ["seed  broad PSNR  study transfer  study scratch", "----  ----------  --------------  -------------"]
    for s, v in doc["per_seed"].items():
        p = v["psnr"]
        lines.append(f"{s:>4}  {p['broad']:10.2f}  {p['study_transfer']:14.2f}  {p['study_scratch']:13.2f}")
    lines.append("")
    for row in doc["across_seeds"]:
        m = row.get("paddle") or row["psnr"]
        unit = "px" if "paddle" in row else "dB"
        lines.append(f"{row['claim']}: {m['mean']:+.2f} ± {m['sem']:.2f} {unit} over seeds -> {row['verdict']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.atari.broad",
        description="Pretrain a finished latent study's model afresh on more clips of its games, then "
        "fine-tune and evaluate its method variant per training seed and compare it with the study's "
        "scratch and transfer runs (issue 17).",
    )
    p.add_argument("--study", required=True, help="a finished latent study (its replicates' runs are compared)")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds this check)")
    p.add_argument("--clips-per-game", type=int, default=320, help="pretraining clips per game (default 320)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the study's)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds to fine-tune (default 3)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the study's; the remade stages need it)"
    )
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    study_dir, out = Path(args.study), Path(args.out)
    if out.resolve() == study_dir.resolve():
        print("--out must not be the study itself", file=sys.stderr)
        return 2
    try:
        set_determinism(args.threads or study_threads(study_dir), "cpu")
        doc = run(study_dir, out, args.clips_per_game, args.steps, args.seeds)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(record_text(doc, indent=2))
    print(table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
