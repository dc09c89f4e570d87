"""The transfer margin at a budget check's step counts: method − scratch from their copy-last pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.atari import transfer

SEGMENTS = 30


def _row(psnr_first: np.ndarray, psnr_all: np.ndarray, ssim_shift: float = 0.0) -> dict:
    """A budget measurement's copy-last block: the model − copy-last per segment."""
    return {
        "copy_last": {
            "first_2": {
                "psnr": {"per_segment": psnr_first.tolist()},
                "ssim": {"per_segment": (psnr_first / 100 + ssim_shift).tolist()},
            },
            "all": {
                "psnr": {"per_segment": psnr_all.tolist()},
                "ssim": {"per_segment": (psnr_all / 100 + ssim_shift).tolist()},
            },
        }
    }


def _doc(seed: int, rows: dict[str, dict]) -> dict:
    return {"training_seed": seed, "sampler": {}, "settings": {}, "steps": rows}


def _copy_gap(rng: np.random.Generator) -> np.ndarray:
    """How far a model is from copy-last on each segment: large and varied, the same for both."""
    return rng.normal(0.0, 2.0, SEGMENTS)


def test_the_margin_is_method_minus_scratch_per_segment() -> None:
    rng = np.random.default_rng(0)
    scratch_first, scratch_all = _copy_gap(rng), _copy_gap(rng)
    lift = rng.normal(0.5, 0.1, SEGMENTS)  # the method is 0.5 dB better on every segment
    method = _doc(0, {"6400": _row(scratch_first + lift, scratch_all + lift)})
    scratch = _doc(0, {"6400": _row(scratch_first, scratch_all)})
    (row,) = transfer.margins({0: (method, scratch)})
    assert row["steps"] == 6400 and row["seeds"] == [0]
    for span in transfer.SPANS:
        got = row[span]["psnr"]["per_seed"]["0"]
        np.testing.assert_allclose(got["per_segment"], lift, atol=1e-12)
        assert row[span]["psnr"]["mean"] == pytest.approx(lift.mean())
        assert row[span]["psnr"]["beyond"]
        assert row[span]["verdict"] == "holds"


def test_identical_runs_show_no_difference() -> None:
    """Negative control: the same measurement as method and scratch gives exactly zero."""
    rng = np.random.default_rng(1)
    doc = _doc(0, {"3200": _row(_copy_gap(rng), _copy_gap(rng))})
    (row,) = transfer.margins({0: (doc, doc)})
    for span in transfer.SPANS:
        assert row[span]["psnr"]["mean"] == 0.0
        assert not row[span]["psnr"]["beyond"]
        assert row[span]["verdict"] == "no difference"


def test_only_step_counts_measured_for_both_are_compared() -> None:
    rng = np.random.default_rng(2)
    r = _row(_copy_gap(rng), _copy_gap(rng))
    method = _doc(0, {"3200": r, "6400": r})
    scratch = _doc(0, {"3200": r, "9600": r, "1600": {"paddle": {}}})  # 1600: measured before copy-last
    assert [row["steps"] for row in transfer.margins({0: (method, scratch)})] == [3200]
    with pytest.raises(transfer.TransferError, match="share no step count"):
        transfer.margins({0: (_doc(0, {"6400": r}), _doc(0, {"3200": r}))})


def test_several_seeds_use_students_t_over_seeds() -> None:
    """Each seed clears 2 s.e. over its segments, but the seeds disagree: over seeds it does not hold."""
    rng = np.random.default_rng(3)
    pairs = {}
    for seed, lift in ((0, 1.0), (1, 0.6), (2, -0.2)):
        first, every = _copy_gap(rng), _copy_gap(rng)
        d = rng.normal(lift, 0.05, SEGMENTS)
        pairs[seed] = (_doc(seed, {"6400": _row(first + d, every + d)}), _doc(seed, {"6400": _row(first, every)}))
    (row,) = transfer.margins(pairs)
    psnr = row["all"]["psnr"]
    assert psnr["per_seed"]["0"]["beyond_2sem"] and psnr["per_seed"]["2"]["beyond_2sem"]
    assert psnr["over_seeds"]["critical"] == pytest.approx(4.303)
    assert psnr["mean"] == pytest.approx(np.mean([psnr["per_seed"][s]["mean"] for s in "012"]))
    assert not psnr["beyond"]
    assert row["all"]["verdict"] == "no difference"
    # control: three seeds that agree clear both bars
    agree = {s: (pairs[0][0], pairs[0][1]) for s in range(3)}
    (row,) = transfer.margins(agree)
    assert row["all"]["psnr"]["over_seeds"]["sem"] == 0.0 and row["all"]["verdict"] == "holds"


def _study(root: Path, backbone: str = "wan") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"scale": "cpu", "seed": 0, "config": {"backbone": backbone}}))


def _write(dir_: Path, variant: str, doc: dict) -> None:
    (dir_ / "budget").mkdir(parents=True, exist_ok=True)
    (dir_ / "budget" / f"{variant}.json").write_text(json.dumps(doc))


def test_collect_finds_the_replicates_and_the_cli_writes_the_rows(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    out = tmp_path / "study"
    _study(out)
    for seed, dir_ in ((0, out), (1, out / "seed1")):
        first, every = _copy_gap(rng), _copy_gap(rng)
        _write(dir_, "causal", _doc(seed, {"6400": _row(first + 0.5, every + 0.5)}))
        _write(dir_, "scratch", _doc(seed, {"6400": _row(first, every)}))
    _write(out / "seed2", "causal", _doc(2, {"6400": _row(first, every)}))  # no scratch run: left out
    assert sorted(transfer.collect(out)) == [0, 1]
    assert transfer.main(["--study", str(out)]) == 0
    written = json.loads((out / "budget" / "transfer.json").read_text())
    assert written["rows"][0]["seeds"] == [0, 1]
    assert written["rows"][0]["all"]["psnr"]["mean"] == pytest.approx(0.5)
    assert "| 6400 | 2 | +0.50" in capsys.readouterr().out


def test_collect_refuses_what_it_cannot_pair(tmp_path: Path, capsys) -> None:
    assert transfer.main(["--study", str(tmp_path / "nothing")]) == 2
    assert "no study" in capsys.readouterr().err
    out = tmp_path / "unet"
    _study(out, "unet3d")
    _write(out, "causal", _doc(0, {}))  # the wan method's name: not this backbone's
    _write(out, "scratch", _doc(0, {}))
    with pytest.raises(transfer.TransferError, match="'extrapolative' and 'scratch'"):
        transfer.collect(out)


def test_on_the_committed_wide_dit_it_gives_the_studys_own_transfer_comparison() -> None:
    """The budget checks' 3,200-step models are the study's: their pairing through copy-last must
    reproduce the study's own method − scratch comparison over all frames, segment by segment."""
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "atari-wan-wide-latent"
    rows = transfer.margins(transfer.collect(out))
    row = next(r for r in rows if r["steps"] == 3200)
    study = json.loads((out / "results.json").read_text())
    own = next(c for c in study["comparisons"] if c["claim"].startswith("pretrained transfer"))
    for m in ("psnr", "ssim"):
        got = row["all"][m]["per_seed"]["0"]["per_segment"]
        np.testing.assert_allclose(got, own[m]["per_segment"], rtol=0, atol=1e-9)
