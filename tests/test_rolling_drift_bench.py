"""benchmarks/rolling_drift.py --quick runs end to end and its JSON carries what the README table
reads: every mode's curves against the real episode and the exact rollout, the isolated reference,
and the push counts that make rolling cheap (one frame per generated frame once the window slides,
the window's L − 1 for exact). Counts and equalities only: wall-clock numbers are never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rolling_drift.py"
ROLLING = ("rolling-sink0", "rolling-sink1", "rolling-sink4")


def test_quick_run_writes_the_results_and_rolling_pushes_one_frame_after_the_slide(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-plots", "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "rolling_drift.quick.json").read_text())
    s = res["settings"]
    assert res["quick"] is True and res["benchmark"] == "rolling_drift"
    assert res["machine"]["cpu_model"] and res["machine"]["versions"]["torch"]
    assert res["world_model"]["verification_passed"] is True and res["world_model"]["train"]["steps"] == 2
    assert set(res["modes"]) == {"exact", "none", *ROLLING}
    n, window, slide = s["frames"], s["window"], res["slide_frame"]
    assert slide == window - s["context"] and slide < n

    for name, m in res["modes"].items():
        k = s["none_frames"] if name == "none" else n
        assert m["frames"] == k
        assert all(len(v) == k for v in m["per_frame"].values()), name
        assert all(t > 0 for t in m["per_frame"]["seconds"]) and all(t >= 0 for t in m["per_frame"]["cpu_seconds"])
        assert set(m["psnr_vs_real_by_range"]) == set(m["psnr_vs_exact_by_range"])
    exact, none = res["modes"]["exact"], res["modes"]["none"]
    assert exact["per_frame"]["pushed_frames"][slide:] == [window - 1] * (n - slide)
    assert exact["pushed_frames_per_frame_after_slide"] == [window - 1]
    assert none["cache"] == "none" and none["cache_bytes_max"] == 0
    assert none["max_abs_diff_vs_exact"] <= 1e-5  # exact streaming = full recomputation up to rounding
    assert none["first_frame_differing_from_exact"] is None

    for name in ROLLING:
        m = res["modes"][name]
        assert m["cache"] == "rolling" and m["sink"] == int(name[-1])
        pushed = m["per_frame"]["pushed_frames"]
        assert pushed[0] == s["context"]  # the context, pushed once
        assert pushed[1:] == [1] * (n - 1)  # then one frame per generated frame, slid or not
        assert m["pushed_frames_per_frame_after_slide"] == [1]
        # equal to exact until the window slides, an approximation after it
        assert m["first_frame_not_bit_equal_to_exact"] == slide
        assert all(p == 100.0 for p in m["per_frame"]["psnr_vs_exact"][:slide])
        # cache memory bounded once slid (allocated capacity may grow once, never with the rollout)
        assert m["per_frame"]["cache_bytes"][-1] == m["per_frame"]["cache_bytes"][slide + 4]
        for clock in ("cpu", "wall"):
            timing = m["timing"][clock]
            assert timing["over_reference"] > 0 and timing["speedup_vs_exact"] > 0 and timing["mean_16_to_end"] > 0
    ref = res["reference"]
    assert ref["samples"]["step"] == 2 * ref["samples"]["push"] > 0
    for clock in ("cpu", "wall"):
        assert ref["per_frame_seconds"][clock]["rolling"] > 0 and ref["per_frame_seconds"][clock]["exact"] > 0
    targets = res["targets"]
    assert targets["rolling_pushes_one_after_slide"] == dict.fromkeys(ROLLING, True)
    assert targets["exact_pushes_window_after_slide"] is True
    assert targets["exact_equals_none_within_1e-5"] is True
    for key in ("rolling_within_1.2x_of_reference", "rolling_constant_10pct_blocks"):
        assert set(targets[key]["cpu"]) == set(ROLLING)  # the values are timings: not asserted
    assert set(res["copy_last_baseline"]["per_frame"]) == {"psnr_vs_real", "ssim_vs_real"}
