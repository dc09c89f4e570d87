"""The models committed with the wide-DiT Atari study (issue 17): they load, they are the ones its
records describe, and ``--reuse`` of the folder copies them, so that a fresh clone (a machine that
keeps no files between sessions) skips the 100 minutes that made them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import reuse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "atari-wan-wide-latent"


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_committed_models_are_the_ones_the_study_records() -> None:
    import diffusers

    from causalize.latents.vae import load_vae

    pre = json.loads((ROOT / "pretrain" / "pretrain.json").read_text(encoding="utf-8"))
    dit = diffusers.WanTransformer3DModel.from_pretrained(ROOT / "pretrain" / "model")
    assert _parameters(dit) == pre["parameters"]
    ae = json.loads((ROOT / "autoencoder" / "autoencoder.json").read_text(encoding="utf-8"))
    vae, _ = load_vae(ROOT / "autoencoder" / "vae")
    assert _parameters(vae) == ae["parameters"]
    assert vae.config.scaling_factor == pytest.approx(1.0 / ae["latent_std"])


def test_reuse_of_the_committed_study_copies_its_models_and_makes_the_rest_again(tmp_path) -> None:
    """The control is the rest: the recordings, latents and scratch initialisation are records
    alone here, so they are not copied (the study makes them again, tested on a smoke study)."""
    ident = json.loads((ROOT / "study.json").read_text(encoding="utf-8"))
    cfg = {**ident["config"], "replicates": {**ident["config"]["replicates"], "seeds": 3}}
    logs: list[str] = []
    copied = reuse.reuse_stages(tmp_path / "w", ROOT, cfg, ident["seed"], ident["scale"], logs.append)
    assert copied == ["autoencoder", "pretrain"]
    assert (tmp_path / "w" / "pretrain" / "model" / "config.json").is_file()
    assert any(m.startswith("[reuse] data/ not copied: its record is there but not") for m in logs)
    assert any(m.startswith("[reuse] runs not copied (trained anew)") for m in logs)
