"""benchmarks/latent_path.py --quick runs end to end and its JSON says what the README table reads:
encode rates and memory per VAE, and a decoded rollout in which every latent frame was decoded
exactly once (counts only: wall-clock numbers are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latent_path.py"


def test_quick_run_writes_the_results_and_decodes_each_latent_frame_once(tmp_path):
    out = tmp_path / "latent_path.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not (tmp_path / "work").exists()  # scratch removed
    res = json.loads(out.read_text())
    s = res["settings"]
    assert res["quick"] is True and res["device"] == "cpu"
    assert res["machine"]["cpu_model"] and res["machine"]["versions"]["torch"]
    assert "peak RSS" in res["memory_measured"] or "VmHWM" in res["memory_measured"]

    assert set(res["encode"]) == {"wan", "image"}
    wan, image = res["encode"]["wan"], res["encode"]["image"]
    assert (wan["vae_class"], image["vae_class"]) == ("AutoencoderKLWan", "AutoencoderKL")
    frames = s["episodes"] * s["frames"]
    assert wan["video_frames"] == image["video_frames"] == frames
    assert wan["latent_frames"] == s["episodes"] * (1 + (s["frames"] - 1) // 4)
    assert image["latent_frames"] == frames
    for r in (wan, image):
        assert r["end_to_end_frames_per_second"] > 0 and r["encode_clip_frames_per_second"] > 0
        assert r["peak_rss_bytes"] > 0 and r["encode_rss_growth_bytes"] is not None
        assert r["cuda_peak_memory_bytes"] is None  # CPU run

    ro = res["rollout"]
    assert ro["decode_once_per_frame"] is True
    steps = [int(k) for k in ro["runs"]]
    assert steps == s["steps"] and len(steps) == 2
    ctx = 1 + (s["context_frames"] - 1) // 4
    gen = s["actions"] // 4
    for runs in ro["runs"].values():
        assert len(runs) == s["repeats"]
        for r in runs:
            assert r["context_latent_frames"] == ctx and r["generated_latent_frames"] == gen
            assert r["decode_calls"] == r["context_latent_frames"] + r["generated_latent_frames"]
            c = r["counted"]
            assert c["pushes"] == c["decoder_forwards"] == ctx + gen
            assert c["whole_clip_decodes"] == 0 and c["vae_encodes"] == 1  # the context, once
            assert r["decode_mode"] == "own-cache"
            assert len(r["decode_seconds_generated"]) == gen == len(r["denoise_seconds_all"])
            assert r["frames_written"] == s["context_frames"] + s["actions"]
    for v in ro["summary"].values():
        assert v["problems"] == []
        assert v["denoise_seconds_per_latent_frame"] > 0 and v["decode_seconds_per_latent_frame"] > 0
    assert "decode_growth_with_steps" in ro and "denoise_growth_with_steps" in ro
