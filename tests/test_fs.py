"""causalize.fs: atomic, no-clobber writes of files, JSON and directories, and stale clean-up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import pytest

from causalize import fs


def test_files_are_written_once_and_never_clobbered(tmp_path):
    target = tmp_path / "a.json"
    fs.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    with pytest.raises(FileExistsError):
        fs.write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 1}
    fs.write_json(target, {"x": 3}, overwrite=True)
    assert json.loads(target.read_text()) == {"x": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporaries left


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        fs.write_json(tmp_path / "bad.json", {"leak": math.nan})
    assert not list(tmp_path.iterdir())


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = fs.write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_directory_swap_is_atomic_and_no_clobber(tmp_path):
    out = tmp_path / "out"
    with fs.new_directory(out) as tmp:
        (tmp / "w").write_text("first")
    assert (out / "w").read_text() == "first"
    with pytest.raises(FileExistsError):
        with fs.new_directory(out) as tmp:
            (tmp / "w").write_text("second")
    assert (out / "w").read_text() == "first"
    with fs.new_directory(out, overwrite=True) as tmp:
        (tmp / "w").write_text("third")
    assert (out / "w").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_existing_directory_is_not_replaced(tmp_path):
    """os.rename would silently replace an empty directory; the no-clobber rename does not."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError):
        with fs.new_directory(out) as tmp:
            (tmp / "w").write_text("x")
    assert out.is_dir() and not list(out.iterdir())


def test_a_dangling_symlink_counts_as_existing(tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        with fs.new_directory(out):
            pass
    with fs.new_directory(out, overwrite=True) as tmp:
        (tmp / "w").write_text("x")
    assert (out / "w").read_text() == "x" and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .causalize-old link left


def test_an_error_leaves_the_target_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fs.new_directory(out) as tmp:
            (tmp / "w").write_text("x")
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_concurrent_writers_one_wins_the_others_fail(tmp_path):
    out = tmp_path / "out"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        try:
            with fs.new_directory(out) as tmp:
                (tmp / "who").write_text(str(i))
                barrier.wait()
            results.append(f"won {i}")
        except FileExistsError:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == 7
    assert (out / "who").read_text() == winners[0].split()[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.causalize-tmp-{pid}-123"
    stale.mkdir()
    mine = tmp_path / f".out.causalize-tmp-{os.getpid()}-5"
    mine.mkdir()
    foreign = tmp_path / ".out.someone-else"
    foreign.mkdir()
    other = tmp_path / f".other.causalize-tmp-{pid}-1"
    other.mkdir()
    assert fs.clean_stale(tmp_path / "out") == [stale]
    assert not stale.exists() and mine.exists() and foreign.exists() and other.exists()


def test_convert_loses_a_race_for_out_without_clobbering_it(tmp_path, monkeypatch):
    """OUT appears while the conversion runs (another writer): the winner's files stay, the loser
    is a usage error (exit 2), and no temporary is left."""
    from typer.testing import CliRunner

    from causalize.cli.app import app
    from causalize.plugin_manager import registries

    src, out = tmp_path / "src", tmp_path / "out"
    registries().plans.get("wan").build_tiny().save_pretrained(src)
    real = fs.new_directory

    def racing(target, **kw):
        target.mkdir()
        (target / "winner").write_text("first")
        return real(target, **kw)

    monkeypatch.setattr(fs, "new_directory", racing)
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--no-verify"])
    assert result.exit_code == 2 and "created by someone else" in result.output
    assert [p.name for p in out.iterdir()] == ["winner"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_stale_file_temporaries_with_a_suffix_are_found(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.causalize-tmp-{int(dead.stdout)}-9.pt"
    stale.write_bytes(b"x")
    assert fs.clean_stale(tmp_path / "checkpoint.pt") == [stale]
