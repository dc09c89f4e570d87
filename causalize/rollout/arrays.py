"""Input arrays (rollout context frames, actions) read within a size bound.

A small compressed `.npz` can claim gigabytes (a zip bomb) and a long episode holds far more frames
than a context needs, so the size is checked from the `.npy` header before any data is read, and
only the leading rows asked for are read (causalize.episodes.reader.read_leading). Every problem
is a UsageError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from causalize.episodes.format import DataError
from causalize.episodes.reader import ArrayHeader, read_headers, read_leading
from causalize.errors import UsageError

#: The most bytes one input array may take once read (only the context frames asked for count).
MAX_ARRAY_BYTES = 4 * 2**30


def npz_headers(p: Path) -> dict[str, ArrayHeader]:
    """Every array's shape and dtype from the .npz headers, no data read; object arrays (pickles)
    are refused."""
    try:
        headers = read_headers(p)
    except DataError as exc:
        raise UsageError(f"{p}: cannot read as .npz: {exc.problems[0][1]}", "write it with numpy.savez") from None
    for name, h in headers.items():
        if h.dtype.hasobject:
            raise UsageError(f"{p}: array {name!r} holds Python objects", "only numeric arrays are read (no pickles)")
    return headers


def read_rows(p: Path, key: str, header: ArrayHeader, rows: int) -> np.ndarray:
    """The first `rows` rows of array `key`, decompressing or mapping no more than they take."""
    try:
        return read_leading(p, key, header, rows)
    except DataError as exc:
        raise UsageError(f"{p}: cannot read array {key!r}: {exc.problems[0][1]}", "the file is damaged") from None


def rows_within_bound(p: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, rows: int | None, what: str) -> int:
    """How many leading rows of an array to read: `rows` (None: all), refused when they would take
    more than MAX_ARRAY_BYTES."""
    total = shape[0] if shape else 1
    n = total if rows is None else min(rows, total)
    row_bytes = int(np.prod(shape[1:], dtype=object)) * dtype.itemsize if shape else dtype.itemsize
    need = n * row_bytes
    if need > MAX_ARRAY_BYTES:
        hint = (
            f"pass --context-frames K to read only the first K frames ({row_bytes / 2**20:.3g} MiB each)"
            if what == "context frames" and row_bytes <= MAX_ARRAY_BYTES
            else "split the input into smaller files"
        )
        raise UsageError(
            f"{p}: {key!r} of shape {tuple(shape)} {dtype} would take {need / 2**30:.3g} GiB as {what}, "
            f"more than the {MAX_ARRAY_BYTES / 2**30:.3g} GiB allowed",
            hint,
        )
    return n


def load_npy(p: Path, rows: int | None = None, what: str = "actions") -> np.ndarray:
    """The first `rows` rows (None: all) of a .npy file, memory-mapped first so that only they are
    read and their size is checked from the header."""
    try:
        mapped = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise UsageError(
            f"{p}: cannot read as .npy: {short_error(exc)}", "write it with numpy.save (numeric arrays only)"
        ) from None
    n = rows_within_bound(p, "array", tuple(mapped.shape), mapped.dtype, rows, what)
    return np.array(mapped[:n] if mapped.ndim else mapped)


def short_error(exc: BaseException) -> str:
    """An exception as one line of at most 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = ["MAX_ARRAY_BYTES", "load_npy", "npz_headers", "read_rows", "rows_within_bound", "short_error"]
