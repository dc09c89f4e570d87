"""The one place that writes results to disk: atomic, no-clobber files, JSON and directories.

Every writer in causalize (converted checkpoints, training runs, rollout clips, episode datasets,
benchmark JSON) goes through these functions, so the guarantees hold everywhere:

- A reader never sees a half-written file or directory: content goes to a temporary sibling
  (named `.NAME.causalize-tmp-PID-NS`) and is renamed into place.
- Without `overwrite`, an existing target is never replaced, also when two writers race: the final
  step is an atomic "rename unless the target exists" (Linux `renameat2(RENAME_NOREPLACE)`, or a
  hard link for files); the loser gets `FileExistsError` and its temporary is removed.
- With `overwrite`, the old target is moved aside first and restored if the swap fails.
- Temporaries left by a killed writer (our naming, a process that no longer runs) are removed by
  `clean_stale`, never anyone else's files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = ".causalize-tmp-"
OLD_TAG = ".causalize-old-"
_STALE = re.compile(r"^\.(?P<name>.+)\.causalize-(?:tmp|old)-(?P<pid>\d+)-\d+(?P<suffix>\.[^.]+)?$")


def _tag() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def temp_sibling(path: Path, kind: str = TMP_TAG) -> Path:
    """A fresh hidden name beside `path`, recognisable as ours (see `clean_stale`)."""
    return path.parent / f".{path.name}{kind}{_tag()}"


# ------------------------------------------------------------------------ rename without clobber


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """True when the kernel did the no-clobber rename; False when renameat2 is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):  # e.g. a filesystem without it
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` atomically, failing with FileExistsError if `dst` exists (a file, a
    directory, empty or not, or a dangling symlink)."""
    if _renameat2_noreplace(src, dst):
        return
    if src.is_dir() and not src.is_symlink():
        # Fallback without renameat2: an exclusive lock beside dst makes check + rename one step
        # among causalize writers (os.rename would replace an empty directory).
        lock = dst.parent / f".{dst.name}.causalize-lock"
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            os.rename(src, dst)
        finally:
            os.close(fd)
            os.unlink(lock)
        return
    os.link(src, dst)  # fails if dst exists, atomically
    os.unlink(src)


# --------------------------------------------------------------------------------------- files


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically; without `overwrite` an existing file is kept (FileExistsError).

    The file gets `mode` (default 0o666 masked by the umask, as `open` would give)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit_file(tmp, path, overwrite, mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _commit_file(tmp: Path, path: Path, overwrite: bool, mode: int | None) -> None:
    """Give the finished temporary its mode and put it at `path` (replacing only with `overwrite`)."""
    os.chmod(tmp, _file_mode(mode))
    if overwrite:
        os.replace(tmp, path)
    else:
        rename_noreplace(tmp, path)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = False, indent: int | None = 1) -> Path:
    """Strict JSON (NaN and infinity are refused: they are not JSON) written atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, default=str) + "\n"
    return write_text(path, text, overwrite=overwrite)


@contextlib.contextmanager
def new_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path to write to (by a library that wants a file name, e.g. imageio or
    safetensors); moved to `path` on success, removed on error."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "exists", str(path))
    tmp = path.parent / f".{path.stem}{TMP_TAG}{_tag()}{path.suffix}"
    try:
        yield tmp
        _commit_file(tmp, path, overwrite, None)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _file_mode(mode: int | None) -> int:
    if mode is not None:
        return mode
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --------------------------------------------------------------------------------- directories


@contextlib.contextmanager
def new_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Fill a temporary sibling directory, then put it at `out` in one step.

    Without `overwrite`, an `out` that exists when the swap happens is kept and FileExistsError is
    raised (a concurrent writer won); with it, the old `out` is moved aside, replaced, then deleted
    (restored if the swap fails). On any error the temporary is removed and `out` is unchanged."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and os.path.lexists(out):
            _swap(tmp, out)
        else:
            rename_noreplace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, out: Path) -> None:
    old = temp_sibling(out, OLD_TAG)
    os.replace(out, old)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        if not os.path.lexists(out):
            os.replace(old, out)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- clean-up


def process_alive(pid: int) -> bool:
    """Is a process with this PID running (ours counts)?"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `target` left by causalize writers that no longer run (named
    `.NAME.causalize-tmp-PID-NS` / `-old-`); returns what was removed. Nothing else is touched."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = _STALE.match(entry.name)
        names = (target.name,) if m is None or not m.group("suffix") else (target.stem,)
        if not m or m.group("name") not in names or process_alive(int(m.group("pid"))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


__all__ = [
    "clean_stale",
    "process_alive",
    "new_directory",
    "new_file",
    "rename_noreplace",
    "temp_sibling",
    "write_bytes",
    "write_json",
    "write_text",
]
