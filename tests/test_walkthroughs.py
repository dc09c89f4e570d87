"""The README's latent-path walkthroughs, run as written: each block after a
`<!-- walkthrough: NAME -->` marker goes through bash in an empty directory, exactly as a reader
would paste it, and what it promises is checked on the files it leaves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- walkthrough: {name} -->\n```bash\n(.*?)\n```", text, re.S)
    assert m, f"README has no walkthrough {name!r}"
    return m.group(1)


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # causalize, python
    env.setdefault("COLUMNS", "160")
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def _check_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]


@pytest.mark.slow
def test_wan_walkthrough(tmp_path):
    result = run_block(walkthrough("wan"), tmp_path)
    _check_ran(result)
    final = tmp_path / "run" / "final"
    assert (final / "latent.json").is_file() and (final / "conditioning.safetensors").is_file()
    import imageio.v3 as iio

    clip = iio.imread(tmp_path / "clip.mp4")
    assert clip.shape == (13, 32, 32, 3)  # 5 context + 8 generated video frames, decoded
    assert "MultiDiscrete([3 3 3 3]) (32, 32, 3) (4, 32, 32, 3)" in result.stdout
    assert (
        "decoded with" in result.stderr and "(own-cache)" in result.stderr and "conditioning: stored" in result.stderr
    )
    assert np.load(tmp_path / "latents" / "episodes" / "000000.npz")["latents"].shape == (4, 4, 4, 4)


@pytest.mark.slow
def test_unet3d_walkthrough(tmp_path):
    result = run_block(walkthrough("unet3d"), tmp_path)
    _check_ran(result)
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "clip.gif")
    assert frames.shape[1:] == (32, 32, 3) and 1 <= frames.shape[0] <= 5  # GIFs merge identical frames
    assert "Discrete(3) (32, 32, 3)" in result.stdout
    assert "(per-frame)" in result.stderr


@pytest.mark.slow
def test_wan_i2v_walkthrough(tmp_path):
    result = run_block(walkthrough("wan-i2v"), tmp_path)
    _check_ran(result)
    assert "as channels mask + image on the window's first frame, zeros after (latents units)" in result.stdout
    import json

    import imageio.v3 as iio

    clip = iio.imread(tmp_path / "clip.mp4")
    assert clip.shape == (13, 32, 32, 3)  # 5 context + 8 generated video frames, decoded
    config = json.loads((tmp_path / "wm" / "config.json").read_text())
    assert config["in_channels"] == 12 and config["out_channels"] == 4  # the I2V transformer
    assert np.load(tmp_path / "latents" / "episodes" / "000000.npz")["latents"].shape == (4, 4, 4, 4)
