"""The paddle controllability metric (benchmarks/atari/control.py).

The detector is checked on real Pong frames recorded like the study's: it finds the agent's paddle
where the emulator draws it, follows it when the agent moves it, scores 0 against the same frames
(the floor) and exactly the shift against shifted ones; noise has no paddle, and a paddle painted
at another height is found there. Then the statistics: missing paddles, pairing, verdicts, and the
wiring into ``evaluate.score``, the study's pairing of runs and the report table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ale_py")
pytest.importorskip("gymnasium")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

from benchmarks.atari import control, emulator
from benchmarks.atari import data as atari
from benchmarks.atari import evaluate as ev

BG = np.array(control.BACKGROUND_RGB, np.uint8)
GREEN = np.array(control.PADDLE_RGB, np.uint8)
ROWS, COLS = control.paddle_band(64, 64)


def _raw_truth(raw: np.ndarray, size: int = 64) -> float:
    """The emulator's paddle centre mapped to row indices of the downsampled frame; NaN when absent.
    In a max-pooled frame every paddle pixel of either emulator frame has the paddle's green (186)."""
    rows = np.flatnonzero((raw[34:194, 140:144, 1] == GREEN[1]).any(1)) + 34
    return (rows.min() + rows.max() + 1) / 2 * size / 210 - 0.5 if len(rows) else math.nan


@pytest.fixture(scope="module")
def played():
    """300 steps of the study's behaviour policy at 64x64, with the raw frames each step pooled."""
    raws: list[np.ndarray] = []
    real_downsample = emulator.downsample
    emulator.downsample = lambda frame, size=64: (raws.append(frame), real_downsample(frame, size))[1]
    try:
        game = emulator.AtariGame("Pong", emulator.RecordSettings())
        policy = emulator.StickyRandomPolicy(game.num_actions, 0.5, np.random.default_rng(7))
        frames = [game.reset()]
        for _ in range(300):
            frame, _, over = game.step(policy())
            frames.append(game.reset() if over else frame)
        game.close()
    finally:
        emulator.downsample = real_downsample
    return np.stack(frames), np.array([_raw_truth(r) for r in raws])


@pytest.fixture(scope="module")
def test_frames(tmp_path_factory):
    """Frames 1..16 of ten Pong test episodes recorded with the cpu scale's settings (the study's
    evaluation segments: 4 context + 12 generated frames)."""
    root = tmp_path_factory.mktemp("pong") / "test"
    atari.record_episodes(
        "Pong", root, episodes=10, length=17, seed=0, split="test", settings=emulator.RecordSettings()
    )
    return np.stack([atari.load_episode(root, e)["frames"][1:] for e in range(10)])


# ---- the detector on real frames ----------------------------------------------------------------


def test_finds_the_paddle_where_the_emulator_draws_it(played):
    frames, truth = played
    y = control.detect_paddle(frames)
    assert y.shape == truth.shape
    assert np.array_equal(np.isnan(y), np.isnan(truth))  # found exactly when drawn (a reset frame has none)
    assert np.isnan(truth).sum() <= 2
    err = np.abs(y - truth)[~np.isnan(truth)]
    assert err.mean() < 0.15 and err.max() < 0.6  # measured 0.09 / 0.43 px


def test_finds_the_paddle_in_the_study_test_segments(test_frames):
    y = control.detect_paddle(test_frames)
    assert y.shape == (10, 16)
    assert np.mean(~np.isnan(y)) >= 0.98  # measured: all 160
    # the floor: the same frames score 0 at every step, no paddle missing
    s = control.score_paddle(test_frames[:, 4:], test_frames[:, 4:])
    assert s["real_visible"] >= 0.98 and s["missing"]["overall"] == 0.0
    assert all(m == 0.0 for m in s["mean"]) and s["overall"]["mean"] == 0.0
    assert s["penalty"] == control.miss_penalty(64) == 49.0


def _shift(frames: np.ndarray, k: int) -> np.ndarray:
    """Frames moved down by k rows (up for k < 0), the uncovered rows filled with background."""
    out = np.empty_like(frames)
    out[...] = BG
    if k >= 0:
        out[..., k:, :, :] = frames[..., : frames.shape[-3] - k, :, :]
    else:
        out[..., :k, :, :] = frames[..., -k:, :, :]
    return out


@pytest.mark.parametrize("k", [-3, -1, 2, 3])
def test_error_against_shifted_frames_is_the_shift(test_frames, k):
    y = control.detect_paddle(test_frames)
    inside = (y >= 20) & (y <= 48)  # the shifted paddle and its neighbour rows stay in the band
    assert inside.sum() >= 40
    frames = test_frames[inside][None]  # (1, n, H, W, 3): one "segment"
    s = control.score_paddle(_shift(frames, k), frames)
    assert s["mean"] == pytest.approx([abs(k)] * frames.shape[1], abs=1e-9)
    assert control.detect_paddle(_shift(frames, k)) == pytest.approx(y[inside][None] + k, abs=1e-9)


def test_paddle_follows_the_agent_up_and_down():
    game = emulator.AtariGame("Pong", emulator.RecordSettings())
    up, down = game.action_meanings.index("RIGHT"), game.action_meanings.index("LEFT")  # Pong's names
    game.reset()
    frames = [game.step(0)[0] for _ in range(3)]
    frames += [game.step(up)[0] for _ in range(8)]
    frames += [game.step(down)[0] for _ in range(14)]
    game.close()
    y = control.detect_paddle(np.stack(frames))
    assert not np.isnan(y).any()
    rise, fall = np.diff(y[2:11]), np.diff(y[10:])
    assert (rise <= 1e-9).all() and y[10] < y[2] - 15  # UP: the row index only decreases, by > 15 px
    assert (fall >= -1e-9).all() and y[-1] > y[10] + 30  # DOWN: it only increases, to the bottom wall
    assert y.min() >= ROWS.start and y.max() <= ROWS.stop - 1


# ---- negative controls ----------------------------------------------------------------------------


def test_noise_has_no_paddle():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    around_bg = np.clip(BG + rng.normal(0, 20, (200, 64, 64, 3)), 0, 255).astype(np.uint8)
    assert np.isnan(control.detect_paddle(uniform)).all()
    assert np.isnan(control.detect_paddle(around_bg)).all()
    strong = np.clip(BG + rng.normal(0, 40, (300, 64, 64, 3)), 0, 255).astype(np.uint8)
    assert np.mean(~np.isnan(control.detect_paddle(strong))) <= 0.03  # measured 1-2%
    real = np.broadcast_to(_painted(30), (2, 3, 64, 64, 3))
    s = control.score_paddle(uniform[:6].reshape(2, 3, 64, 64, 3), real)
    assert s["missing"]["overall"] == 1.0 and s["found"]["overall"] is None
    assert s["mean"] == [49.0, 49.0, 49.0]  # a missing paddle costs the largest possible error


def _painted(y0: int, *, base: np.ndarray | None = None, rows: int = 5) -> np.ndarray:
    """A frame whose band holds only a paddle-coloured block of ``rows`` rows from row y0."""
    frame = np.empty((64, 64, 3), np.uint8) if base is None else base.copy()
    if base is None:
        frame[:] = BG
    frame[ROWS, COLS] = BG  # erase whatever paddle was there
    frame[y0 : y0 + rows, 56:58] = GREEN
    return frame


def test_a_paddle_painted_elsewhere_is_found_there(test_frames):
    base = test_frames[0, 0]
    for y0 in (10, 22, 41, 55):
        assert control.detect_paddle(_painted(y0, base=base)) == pytest.approx(y0 + 2)
    assert math.isnan(control.detect_paddle(np.zeros((64, 64, 3), np.uint8)))  # nothing there
    two = _painted(15, base=base)
    two[40:45, 56:58] = GREEN
    assert math.isnan(control.detect_paddle(two))  # two paddles: ambiguous, not found
    assert math.isnan(control.detect_paddle(_painted(15, base=base, rows=20)))  # a stripe, not a paddle
    assert math.isnan(control.detect_paddle(_painted(30, base=base, rows=0)))


def _screen(top: int) -> tuple[np.ndarray, float]:
    """A raw Pong screen with the right paddle's top row at ``top`` (clipped by the walls as the
    game clips it), and the centre of its visible rows."""
    raw = np.empty((210, 160, 3), np.uint8)
    raw[:] = BG
    raw[24:34] = raw[194:] = 236  # the walls
    lo, hi = max(top, 34), min(top + 16, 194)
    raw[lo:hi, 140:144] = GREEN
    return raw, (lo + hi) / 2


def test_a_paddle_drawn_at_screen_resolution_lands_at_its_downsampled_centre():
    """Every height the game allows (at least 4 rows visible): found at 64x64, within 0.6 px (rows
    mixed with a wall pull the centroid by up to half a pixel; 0.06 px on average)."""
    errors = []
    for top in range(22, 191):
        raw, centre = _screen(top)
        y = control.detect_paddle(emulator.downsample(raw, 64))
        errors.append(abs(y - (centre * 64 / 210 - 0.5)))
    assert not np.isnan(errors).any()
    assert max(errors) < 0.6 and np.mean(errors) < 0.1
    for top in (70, 100, 140):  # 32x32 (the smoke scale): away from the walls
        raw, centre = _screen(top)
        assert control.detect_paddle(emulator.downsample(raw, 32)) == pytest.approx(centre * 32 / 210 - 0.5, abs=0.35)


def test_bad_frames_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        control.detect_paddle(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        control.detect_paddle(np.zeros((64, 64), np.uint8))


# ---- statistics and verdicts ----------------------------------------------------------------------


def test_paddle_error_statistics():
    nan = math.nan
    real = np.array([[10.0, 12.0, nan], [20.0, 20.0, 20.0]])
    pred = np.array([[11.0, nan, 5.0], [20.0, 23.0, 26.0]])
    s = control.paddle_error(pred, real, penalty=49.0)
    # segment 0: errors 1, 49 (missing), step 2 left out (no real paddle); segment 1: 0, 3, 6
    assert s["mean"] == pytest.approx([0.5, 26.0, 6.0])
    assert s["n_per_step"] == [2, 2, 1] and s["sem"][2] is None
    assert s["per_sample"] == pytest.approx([25.0, 3.0])
    assert s["overall"]["mean"] == pytest.approx(14.0) and s["overall"]["sem"] == pytest.approx(11.0)
    assert s["missing"]["mean"] == pytest.approx([0.0, 0.5, 0.0]) and s["missing"]["overall"] == pytest.approx(0.2)
    assert s["found"]["overall"] == pytest.approx(10 / 4) and s["found"]["mean"] == pytest.approx([0.5, 3.0, 6.0])
    assert s["real_visible"] == pytest.approx(5 / 6)
    assert s["positions"]["real"][0][2] is None and s["positions"]["pred"][0][1] is None  # JSON: no NaN


def test_paired_steps():
    a = [[1.0, 2.0], [3.0, None], [5.0, 7.0]]
    b = [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    d = control.paired_steps(a, b)
    assert d["mean"] == pytest.approx([7 / 3, 4.0]) and d["n_per_step"] == [3, 2]
    assert d["per_sample"] == pytest.approx([1.5, 2.0, 5.0])
    assert d["overall"]["mean"] == pytest.approx(17 / 6) and d["overall"]["n"] == 3
    assert d["overall"]["sem"] == pytest.approx(np.std([1.5, 2.0, 5.0], ddof=1) / math.sqrt(3))


def test_verdicts():
    v = control.follows_verdict
    assert v({"mean": -3.0, "sem": 1.0, "n": 10}, lower_is_better=True) == "follows its actions"
    assert v({"mean": 3.0, "sem": 1.0, "n": 10}, lower_is_better=True) == "reversed"
    assert v({"mean": -2.0, "sem": 1.0, "n": 10}, lower_is_better=True) == "no difference"  # not beyond 2 s.e.
    assert v({"mean": 0.0, "sem": 0.0, "n": 10}, lower_is_better=True) == "no difference"  # both always missing
    assert v({"mean": 0.5, "sem": 0.1, "n": 10}, lower_is_better=False) == "follows its actions"
    assert v({"mean": 0.5, "sem": None, "n": 1}, lower_is_better=False).startswith("undetermined")


def _metrics(pred_y, real_y, psnr_values):
    psnr = np.asarray(psnr_values, dtype=np.float64)
    return {
        "psnr": {"values": psnr.tolist(), "per_sample": psnr.mean(1).tolist()},
        "ssim": {"values": (psnr / 100).tolist(), "per_sample": (psnr / 100).mean(1).tolist()},
        "paddle": control.paddle_error(np.asarray(pred_y), np.asarray(real_y), 49.0),
    }


def test_controllability_of_a_model_that_follows_and_of_one_that_does_not():
    rng = np.random.default_rng(1)
    real_y = rng.uniform(15, 55, (8, 6))
    psnr = rng.uniform(20, 30, (8, 6))
    follows = control.controllability(
        _metrics(real_y + rng.normal(0, 0.5, real_y.shape), real_y, psnr + 1.0),
        _metrics(real_y + rng.normal(0, 8.0, real_y.shape), real_y, psnr),
    )
    assert follows["verdict"] == follows["paddle"]["verdict"] == "follows its actions"
    assert follows["paddle"]["real_minus_random"]["overall"]["mean"] < 0
    assert follows["delta_psnr"]["mean"] == pytest.approx([1.0] * 6)  # per horizon step
    assert follows["delta_psnr"]["verdict"] == "follows its actions"
    blind = np.full_like(real_y, math.nan)  # draws no paddle, whatever the actions
    none = control.controllability(_metrics(blind, real_y, psnr), _metrics(blind, real_y, psnr))
    assert none["verdict"] == "no difference"
    assert none["paddle"]["real"]["missing"]["overall"] == 1.0
    assert none["delta_psnr"]["overall"]["mean"] == 0.0
    with pytest.raises(ValueError, match="different real frames"):
        control.controllability(_metrics(blind, real_y, psnr), _metrics(blind, real_y + 1, psnr))
    old = {k: {"per_sample": v["per_sample"]} for k, v in _metrics(blind, real_y, psnr).items() if k != "paddle"}
    d = control.controllability(old, old)  # runs scored before per-frame values: overall only, no paddle
    assert "paddle" not in d and "mean" not in d["delta_psnr"] and d["delta_psnr"]["overall"]["n"] == 8


# ---- wiring: evaluate.score, the study's pairing of runs, the report ---------------------------------


def test_score_carries_per_frame_values_and_the_paddle(test_frames):
    real = test_frames[:4, 4:]  # (4 segments, 12 steps, 64, 64, 3)
    perfect = ev.score(ev.model_space(real), real)
    assert np.array(perfect["psnr"]["values"]).shape == (4, 12)
    assert min(min(v) for v in perfect["psnr"]["values"]) > 60  # equal up to float rounding
    assert np.mean(perfect["psnr"]["values"]) == pytest.approx(perfect["psnr"]["overall"])
    assert perfect["paddle"]["overall"]["mean"] == 0.0 and perfect["paddle"]["missing"]["overall"] == 0.0
    last = torch.from_numpy(test_frames[:4, 3:4]).expand(-1, 12, -1, -1, -1).numpy()  # copy-last
    copy = ev.score(ev.model_space(last), real)
    assert copy["paddle"]["overall"]["mean"] > 1.0  # the paddle moves within 12 steps
    assert copy["ssim"]["values"][1] == pytest.approx(
        ev.score(ev.model_space(last[1:2]), real[1:2])["ssim"]["values"][0]
    )
    assert "paddle" not in ev.score(ev.model_space(real), real, paddle=False)


def test_study_pairs_every_random_run_with_its_real_run_and_reports_it(test_frames):
    from benchmarks.atari import report, verdicts

    real = test_frames[:4, 4:]
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    runs = {
        name: {"variant": v, "guidance": 1.0, "actions": a, "metrics": ev.score(ev.model_space(frames), real)}
        for name, v, a, frames in [
            ("m_s1_real", "m", "real", real),
            ("m_s1_random", "m", "random", noise),
            ("n_s1_real", "n", "real", noise),  # no random run: nothing to pair
        ]
    }
    ctrl = verdicts.controllability(runs)
    assert list(ctrl) == ["m_s1"]
    c = ctrl["m_s1"]
    assert (c["real"], c["random"]) == ("m_s1_real", "m_s1_random")
    assert c["paddle"]["real"]["overall"]["mean"] == 0.0 and c["paddle"]["random"]["missing"]["overall"] == 1.0
    assert c["verdict"] == "follows its actions" and c["delta_psnr"]["verdict"] == "follows its actions"
    assert len(c["delta_ssim"]["mean"]) == 12
    table = report.controllability_table(ctrl)
    assert table.startswith("| model | paddle err real (px) |") and "| m_s1 |" in table
    assert "follows its actions" in table and "0% / 100%" in table


def test_a_run_evaluated_before_the_new_metrics_gets_them_from_its_stored_frames(test_frames, tmp_path):
    from benchmarks.atari import scales, stages

    seg = ev.Segments(test_frames[:3], np.zeros((3, 4), np.int64), np.zeros((3, 12), np.int64), 4, [(0, 1)] * 3, 6)
    pred = ev.model_space(np.repeat(test_frames[:3, 3:4], 12, axis=1))  # copy-last, as a rollout would give
    marker = tmp_path / "eval" / "m_s1_random.json"
    marker.parent.mkdir()
    np.savez_compressed(marker.with_suffix(".npz"), frames=ev.to_uint8(pred))
    fresh = ev.score(pred, seg.real_future)
    old = {"name": "m_s1_random", "metrics": {k: dict(fresh[k]) for k in ("psnr", "ssim")}}
    for k in ("psnr", "ssim"):
        del old["metrics"][k]["values"]
    s = stages.Study(tmp_path, scales.resolve_config("smoke", space="pixel"), 0, scale="smoke", log=lambda m: None)
    doc = s._add_new_metrics(old, marker, seg)
    assert doc["added_from_stored_frames"] == ["psnr", "ssim", "paddle"]
    assert doc["metrics"]["paddle"] == fresh["paddle"]  # detected on the same uint8 frames
    assert np.allclose(doc["metrics"]["psnr"]["values"], fresh["psnr"]["values"], atol=0.05)
    assert doc["metrics"]["psnr"]["overall"] == fresh["psnr"]["overall"]  # existing numbers stay
    assert json.loads(marker.read_text()) == doc
    assert s._add_new_metrics(doc, marker, seg) is doc  # nothing left to add
