"""``--reuse``: copy another study's finished work where it is this study's too.

The shared stages (recordings, autoencoder, encodings, pretraining, scratch initialisation) are
copied when the two studies agree on what each is made from; the finished runs of every training
seed when the studies differ only in how many seeds they replicate. Also where a study finds its
recordings when they live outside it (``--data``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.atari import autoencoder as ae_mod
from benchmarks.atari import data as atari_data
from benchmarks.atari import pretrain as pt
from benchmarks.atari.runtime import log_stderr, read_json
from benchmarks.atari.scales import StudyError, normalised_identity
from benchmarks.atari.stages import DATA_LINK, linked_data

__all__ = [
    "REUSE_FREE",
    "RUNS_FREE",
    "RUN_DIRS",
    "SHARED_STAGES",
    "STAGE_OUTPUTS",
    "STAGE_SETTINGS",
    "recorded_data",
    "reuse_stages",
    "runs_lacking",
]

Log = Callable[[str], None]

#: Sections a study may change and still reuse another's shared stages (``--reuse``): they
#: concern conversion, fine-tuning and evaluation only.
REUSE_FREE = ("finetune", "eval", "replicates", "threads")
#: The shared stages' directories under a study's root, copied by ``--reuse``.
SHARED_STAGES = ("data", "autoencoder", "latent", "patch", "pretrain", "scratch_init")
#: Each training seed's runs (conversion, fine-tuning, evaluation), copied by ``--reuse`` only from a
#: study that differs in nothing but :data:`RUNS_FREE`: the study seed's runs at the root, the
#: other seeds' in ``seed<S>/``.
RUN_DIRS = ("convert", "finetune", "eval")
#: What a study may change and still reuse another's finished runs: how many seeds (and which
#: variants) are replicated, and the thread count, which the shared stages' reuse ignores too.
RUNS_FREE = ("replicates", "threads")
#: What a shared stage is made from, beyond seed and scale: the settings two studies must agree on
#: for ``--reuse`` to copy it. The recordings and the latent or patch encodings do not depend on the
#: world model, so a study of another backbone reuses them; the pretraining and the scratch
#: initialisation (not listed) depend on every setting outside :data:`REUSE_FREE`.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "autoencoder": ("data", "latent"),
    "latent": ("data", "latent"),
    "patch": ("data", "patch"),
}


#: What each shared stage leaves beside its record (sub-directories): a study kept in results/
#: commits the records and figures, not the recordings or encodings, so ``--reuse`` of it copies
#: a stage only where these are there too (the models of a few studies are committed).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": tuple(atari_data.DATASETS.values()),
    "autoencoder": (ae_mod.MODEL_DIR,),
    "latent": tuple(atari_data.DATASETS.values()),
    "patch": tuple(atari_data.DATASETS.values()),
    "pretrain": (pt.MODEL_DIR,),
    "scratch_init": (pt.MODEL_DIR,),
}


def runs_lacking(root: Path) -> list[str]:
    """What the finished runs under ``root`` (the study seed's, and each ``seed<S>/``) lack beside
    their records: a converted model, a fine-tuned ``final/``, an evaluation's frames. A study kept
    in results/ lacks them all; its runs are then trained again rather than copied."""
    needed: list[Path] = []
    for run_root in [root, *sorted(p for p in root.glob("seed*") if p.is_dir())]:
        needed += [m.with_suffix("") for m in sorted((run_root / "convert").glob("*.json"))]
        needed += [m.with_suffix("") / "final" for m in sorted((run_root / "finetune").glob("*.json"))]
        rollouts = [m for m in sorted((run_root / "eval").glob("*.json")) if "metrics" in read_json(m)]
        needed += [m.with_suffix(".npz") for m in rollouts]  # the one-step probes keep no frames
    return [str(p.relative_to(root)) for p in needed if not p.exists()]


def _differing(mine: dict[str, Any], other: dict[str, Any], keys: set[str]) -> list[str]:
    return sorted(k for k in keys if other.get(k) != mine.get(k))


def reuse_stages(out: Path, source: Path, cfg: dict[str, Any], seed: int, scale: str, log: Log) -> list[str]:
    """Copy the finished shared stages (data, autoencoder, encoded datasets, pretraining, scratch
    initialisation) of the study at ``source`` into ``out`` where ``out`` lacks them, so that a
    fine-tuning ablation skips the hour before it. A stage is copied only when the two studies
    agree on what it is made from (:data:`STAGE_SETTINGS`; the pretraining on every setting outside
    :data:`REUSE_FREE`), so another backbone reuses the recordings and the autoencoder and pretrains
    anew; from a study that differs only in its replicates, the finished runs too
    (:func:`_reuse_runs`). Refused unless they agree on seed, scale and the recordings. Returns the
    directories copied."""
    path = source / "study.json"
    if not path.is_file():
        raise StudyError(f"--reuse {source}: no study there (no study.json)")
    other = normalised_identity(read_json(path))
    mine = json.loads(json.dumps({"scale": scale, "seed": seed, "config": cfg}))
    theirs = other.get("config", {})
    everything = (set(mine["config"]) | set(theirs)) - set(REUSE_FREE)
    differs = _differing(mine, other, {"scale", "seed"}) + _differing(mine["config"], theirs, {"data"})
    if differs:
        raise StudyError(
            f"--reuse {source}: that study differs in {', '.join(differs)}: it has other recordings, "
            "so none of its stages is this study's"
        )
    copied = []
    for stage in SHARED_STAGES:
        src, dst = source / stage, out / stage
        if not src.is_dir() or dst.exists():
            continue
        stage_differs = _differing(mine["config"], theirs, set(STAGE_SETTINGS.get(stage, everything)))
        if stage_differs:
            log(f"[reuse] {stage}/ not copied: the studies differ in {', '.join(stage_differs)}")
            continue
        if lacking := [name for name in STAGE_OUTPUTS[stage] if not (src / name).is_dir()]:
            log(f"[reuse] {stage}/ not copied: its record is there but not {', '.join(lacking)} (made again)")
            continue
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
        copied.append(stage)
        log(f"[reuse] {stage}/ copied from {source}")
    return copied + _reuse_runs(out, source, mine["config"], theirs, log)


def _reuse_runs(out: Path, source: Path, mine: dict[str, Any], theirs: dict[str, Any], log: Log) -> list[str]:
    """Copy the finished runs of every training seed from ``source`` when the two studies differ
    only in :data:`RUNS_FREE` (adding seeds to a study then trains only the new ones); their
    checkpoints come too, so a budget check can continue them. Returns the directories copied."""
    differs = _differing(mine, theirs, (set(mine) | set(theirs)) - set(RUNS_FREE))
    if differs:
        log(f"[reuse] runs not copied (trained anew): the studies differ in {', '.join(differs)}")
        return []
    if lacking := runs_lacking(source):
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        log(f"[reuse] runs not copied (trained anew): their records are there but not {', '.join(lacking[:3])}{more}")
        return []
    names = list(RUN_DIRS) + sorted(p.name for p in source.glob("seed*") if p.is_dir())
    copied = [name for name in names if (source / name).is_dir() and not (out / name).exists()]
    for name in copied:
        shutil.copytree(source / name, out / name)
        log(f"[reuse] {name}/ copied from {source} (the same runs: the studies differ only in {', '.join(RUNS_FREE)})")
    return copied


def recorded_data(out: Path, reuse: Path | None = None, log: Log = log_stderr) -> Path | None:
    """Where the study at ``out``, run without ``--data``, finds its recordings: where it recorded
    them before (its :data:`DATA_LINK`), else, when ``out`` has none of its own, where the
    ``--reuse`` study's link says, else None (``out/data``). A link to recordings that are gone is
    refused, not silently replaced by a fresh recording."""
    holder = out
    linked = linked_data(out)
    if linked is None and reuse is not None and not (out / "data").is_dir() and not (reuse / "data").is_dir():
        holder, linked = reuse, linked_data(reuse)
    if linked is None:
        return None
    if not linked.is_dir():
        fix = f"delete {out / DATA_LINK}" if holder == out else "leave out --reuse"
        raise StudyError(
            f"{holder / DATA_LINK} says the recordings are in {linked}, which is gone: pass --data DIR "
            f"to record them there, or {fix} to record them into {out / 'data'}"
        )
    log(f"study: recordings in {linked} (linked; --data overrides)")
    return linked
