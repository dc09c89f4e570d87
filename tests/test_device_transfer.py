"""A lent GPU's device call sends the working tree (tracked and untracked-not-ignored files) and the
paths it carries, 64 MiB in all. The prepared GPU runs carry ``.whl/`` (the wheels the machine
lacks), so the tree must leave room for them, or the one prepared run is refused before it starts.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What one device call may send (the device tool's limit).
TRANSFER_LIMIT = 64 * 2**20
#: ``bash ../shared/gpu/prepare.sh ale-py`` (2026-12-07): diffusers 0.42.1 (6,355,908 bytes), ale-py
#: 0.12.1 cp312 (3,110,030), gymnasium 1.4.0 (476,306), farama-notifications 0.0.6 (2,897).
WHEELS = 9_945_141


def _travelling_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_the_tree_leaves_room_for_the_gpu_wheels():
    files = _travelling_files()
    assert files, "git listed no files"
    tree = sum(p.stat().st_size for p in files if p.is_file())
    biggest = sorted(((p.stat().st_size, str(p.relative_to(ROOT))) for p in files if p.is_file()), reverse=True)[:5]
    assert tree + WHEELS <= TRANSFER_LIMIT, (
        f"the tree ({tree / 2**20:.1f} MiB) and the GPU run's wheels ({WHEELS / 2**20:.1f} MiB) exceed the "
        f"{TRANSFER_LIMIT / 2**20:.0f} MiB one device call sends; the largest files: {biggest}"
    )
