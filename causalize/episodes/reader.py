"""Reading an episode ``.npz``: array headers without data, and arrays without copying them.

Why not just ``np.load``: an ``NpzFile`` has no memory mapping (``mmap_mode`` is ignored for
``.npz``), so reading one member decompresses or copies the whole array. A training item needs
``window`` frames of an episode that may hold thousands, so stored (uncompressed) members, the
default of ``np.savez`` and ``write_episode``, are opened with ``np.memmap``: an item touches only
its window's pages, DataLoader workers share them through the page cache, and nothing is read at
dataset construction. Compressed members (``np.savez_compressed``) cannot be mapped and are loaded
whole with ``np.load``.

Only public, maintained APIs are used:

* the zip directory and every member's bytes come from :mod:`zipfile`;
* ``.npy`` headers are parsed by ``numpy.lib.format.read_magic`` and
  ``read_array_header_1_0`` / ``read_array_header_2_0``. Version 3.0 headers (numpy writes them
  only for structured dtypes with non-Latin-1 field names, which the episode format refuses anyway)
  are version 2.0 headers in UTF-8 (NEP 1); they are parsed here with ``ast.literal_eval`` and
  ``numpy.lib.format.descr_to_dtype``, as numpy documents them.

Where a stored member's bytes start in the file: :mod:`zipfile` has no public attribute for it
(``ZipExtFile`` seeks a stored member by reading forward up to Python 3.11, and the data offset
lives only in private attributes). So the offset is ``ZipInfo.header_offset`` (public) plus the
documented fixed-size local file header (PKWARE APPNOTE 4.3.7: 30 bytes, then the file name and
the extra field, whose lengths the header gives; ZIP64 extras included). ``ZipFile.open`` has
already checked that local header's signature and name before we use it, and the computed
position is checked to hold the ``.npy`` magic, so a misplaced offset is an error, never wrong data.
"""

from __future__ import annotations

import ast
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from causalize.episodes.format import DataError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (fixed fields), name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER_SIZE = 10000  # numpy's default limit on a header it will literal_eval
#: How :func:`verify_crc` words a damaged member (the dataset recognises it to choose its hint).
CHECKSUM_MISMATCH = "does not match its checksum"
#: What a damaged, truncated or foreign file raises while it is read; reported as a DataError.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError)


@dataclass(frozen=True)
class ArrayHeader:
    """One array of an ``.npz`` as its header describes it, without its data.

    ``offset`` is the byte position of the raw array data in the ``.npz`` when the member can be
    memory-mapped (stored uncompressed, not encrypted, no object dtype), else None.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int | None

    @property
    def mappable(self) -> bool:
        return self.offset is not None


def read_headers(path: str | os.PathLike) -> dict[str, ArrayHeader]:
    """Shape, dtype and data offset of every array in an ``.npz``, keyed like ``np.load``.

    Reads the zip directory and a few hundred bytes per array (only the header of a compressed
    member is decompressed). A corrupt, truncated or non-zip file raises :class:`DataError`.
    """
    path = Path(path)
    try:
        return _read_headers(path)
    except _READ_ERRORS as e:
        raise DataError(path, f"corrupt or unreadable npz ({type(e).__name__}: {e})") from e


def _read_headers(path: Path) -> dict[str, ArrayHeader]:
    out: dict[str, ArrayHeader] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:
                shape, fortran_order, dtype = _read_npy_header(member)
                header_len = member.tell()
            offset = None
            encrypted = bool(info.flag_bits & 0x1)
            if info.compress_type == zipfile.ZIP_STORED and not encrypted and not dtype.hasobject:
                offset = _stored_data_start(raw, info) + header_len
            out[info.filename[:-4]] = ArrayHeader(tuple(shape), dtype, bool(fortran_order), offset)
    return out


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` stream ``f``, left at the start of the data."""
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    if version == (3, 0):
        return _read_array_header_3_0(f)
    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")


def _read_array_header_3_0(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """A version 3.0 header: a 4-byte little-endian length, then a UTF-8 Python dict literal."""
    (length,) = struct.unpack("<I", _read_exact(f, 4))
    if length > _MAX_HEADER_SIZE:
        raise ValueError(f".npy header of {length} bytes is larger than {_MAX_HEADER_SIZE}")
    text = _read_exact(f, length).decode("utf-8")
    try:
        d = ast.literal_eval(text)  # literals only: never executes code
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse .npy header {text!r}") from e
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f".npy header is not a dict with descr, fortran_order, shape: {d!r}")
    shape, fortran_order = d["shape"], d["fortran_order"]
    if not (isinstance(shape, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in shape)):
        raise ValueError(f".npy header shape is not a tuple of ints: {shape!r}")
    if not isinstance(fortran_order, bool):
        raise ValueError(f".npy header fortran_order is not a bool: {fortran_order!r}")
    try:
        dtype = npy_format.descr_to_dtype(d["descr"])
    except TypeError as e:
        raise ValueError(f".npy header descr is not a valid dtype: {d['descr']!r}") from e
    return shape, fortran_order, dtype


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"expected {n} bytes, got {len(data)}")
    return data


def _stored_data_start(raw: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Byte position of a stored member's first data byte (see the module docstring)."""
    raw.seek(info.header_offset)
    local = raw.read(_LOCAL_HEADER.size)
    if len(local) != _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"truncated local header for {info.filename}")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(local)
    if signature != _LOCAL_SIGNATURE:
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    raw.seek(start)
    if raw.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
        raise zipfile.BadZipFile(f"{info.filename}: no .npy data where the local header says")
    return start


def load_arrays(
    path: str | os.PathLike,
    headers: Mapping[str, ArrayHeader],
    names: Iterable[str],
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` whose ``headers`` were read by :func:`read_headers`.

    Mappable members come back as read-only ``np.memmap`` (no data is read until indexed); the
    others are loaded whole with ``np.load`` (``allow_pickle=False``). An array whose shape differs
    from its header (the file was replaced since) or an unreadable file raises :class:`DataError`.
    """
    path = Path(path)
    names = list(names)
    arrays: dict[str, np.ndarray] = {}
    try:
        for n in names:
            h = headers[n]
            if h.offset is not None:
                arrays[n] = np.memmap(
                    path,
                    dtype=h.dtype,
                    mode="r",
                    offset=h.offset,
                    shape=h.shape,
                    order="F" if h.fortran_order else "C",
                )
        rest = [n for n in names if n not in arrays]
        if rest:
            with np.load(path, allow_pickle=False) as z:
                arrays.update({n: z[n] for n in rest})
    except _READ_ERRORS as e:
        raise DataError(path, f"corrupt or unreadable npz ({type(e).__name__}: {e})") from e
    for n in names:
        if arrays[n].shape != headers[n].shape:
            raise DataError(path, f"array {n!r} changed on disk since the dataset was opened")
    return arrays


def read_arrays(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``load_arrays(path, read_headers(path), names)``; every array when ``names`` is None."""
    headers = read_headers(path)
    return load_arrays(path, headers, headers if names is None else names)


def read_leading(path: str | os.PathLike, name: str, header: ArrayHeader, rows: int) -> np.ndarray:
    """The first ``rows`` rows (along axis 0) of array ``name``, reading no more of the file than
    they take, as an in-memory copy.

    Why: a small compressed ``.npz`` can claim gigabytes (a zip bomb), and a context needs only its
    first frames. Stored C-order members are sliced from a memory map; compressed ones are
    decompressed only up to the last row needed; Fortran-order arrays (rows not contiguous) are
    read whole, so check ``header`` against a size bound first. Errors are :class:`DataError`.
    """
    path = Path(path)
    shape = tuple(header.shape)
    rows = max(0, min(int(rows), shape[0] if shape else 0))
    try:
        if not shape:
            return np.array(load_arrays(path, {name: header}, [name])[name])
        if header.fortran_order or header.dtype.hasobject:
            return np.array(load_arrays(path, {name: header}, [name])[name][:rows])
        if header.offset is not None:
            mapped = np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset, shape=shape)
            return np.array(mapped[:rows])
        count = rows * int(np.prod(shape[1:], dtype=np.int64))
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as member:
            _read_npy_header(member)
            data = _read_exact(member, count * header.dtype.itemsize)
        return np.frombuffer(data, dtype=header.dtype, count=count).reshape((rows, *shape[1:])).copy()
    except _READ_ERRORS as e:
        raise DataError(path, f"corrupt or unreadable npz ({type(e).__name__}: {e})") from e


def verify_crc(path: str | os.PathLike, chunk: int = 1 << 24) -> list[str]:
    """Problems found by reading every member of an ``.npz`` once and checking it against the
    CRC-32 that the zip writer (``np.savez``) recorded for it; empty when the file is intact.

    The memory-mapped reads of :func:`load_arrays` bypass :mod:`zipfile` and so never check that
    checksum: a flipped bit in stored data would otherwise be trained on silently. This costs one
    sequential read of the file (zipfile checks the CRC when a member is read to its end).
    """
    problems = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                try:
                    with zf.open(info) as member:
                        while member.read(chunk):
                            pass
                except (zipfile.BadZipFile, zlib.error) as e:
                    problems.append(f"member {info.filename!r} {CHECKSUM_MISMATCH} ({e}): the file is damaged")
    except _READ_ERRORS as e:
        problems.append(f"corrupt or unreadable npz ({type(e).__name__}: {e})")
    return problems


__all__ = [
    "CHECKSUM_MISMATCH",
    "ArrayHeader",
    "load_arrays",
    "read_arrays",
    "read_headers",
    "read_leading",
    "verify_crc",
]
