"""Which autoencoder keeps Pong's paddle? (issue 17)

    python -m benchmarks.atari.ae_probe --study DIR --out OUT [--set KEY=VALUE ...] [--threads 2]

The latent study's autoencoder drops the agent's 2-pixel paddle from ~42 % of the frames it
reconstructs, so its world models cannot see what their actions move. Trying another
autoencoder in a full study costs the whole study; this trains one alone: the study's latent
settings with ``--set`` overrides (``latent_channels=8``, ``steps=3600``, ``foreground_weight=100``),
on the study's own recordings, with its seed, into ``OUT/`` (``vae/`` and ``autoencoder.json``),
and prints the reconstruction check of the Pong test frames as JSON: PSNR and the share of frames
where the paddle detector still finds the paddle. The study is not touched; a setting that helps is
then given to a new study as ``--set latent.KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import record_text
from benchmarks.atari import autoencoder as ae
from benchmarks.atari.budget import add_settings_option, open_study, parse_settings
from benchmarks.atari.runtime import StageProgress, set_determinism
from benchmarks.atari.scales import StudyError


def probe(study_dir: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Train the study's autoencoder with ``settings`` changed into ``out``; its summary."""
    study = open_study(study_dir)
    if not study.latent:
        raise StudyError(f"{study_dir} is a {study.space} study; the autoencoder belongs to latent studies")
    cfg = dict(study.cfg["latent"])
    unknown = sorted(set(settings) - set(cfg))
    if unknown:
        raise StudyError(f"--set: no latent setting {', '.join(unknown)} (known: {', '.join(cfg)})")
    if (out / ae.SUMMARY_FILE).exists():
        raise StudyError(f"{out} holds an autoencoder already; use another --out")
    cfg.update(settings)
    roots = [study.pixel_dataset("pretrain")] + ([study.pixel_dataset("train")] if cfg["heldout_train_frames"] else [])
    doc = ae.train_autoencoder(
        roots, study.pixel_dataset("test"), out, cfg, study.seed, progress=StageProgress(study.log, "[ae_probe]")
    )
    doc["config"], doc["study"], doc["settings"] = cfg, str(study_dir), settings
    (out / ae.SUMMARY_FILE).write_text(record_text(doc), encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.ae_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="a latent study's output directory (its recordings and settings)")
    p.add_argument("--out", required=True, help="where the autoencoder and its summary go (refused if it holds one)")
    add_settings_option(p, "a setting of the study's latent section (JSON value), e.g. latent_channels=8; repeatable")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    set_determinism(args.threads, "cpu")
    try:
        doc = probe(Path(args.study), Path(args.out), parse_settings(args.settings))
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"settings": doc["settings"], "reconstruction": doc["reconstruction"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
