"""Shared helpers for the benchmark scripts: machine description, JSON output, plain-text tables.

Imported as a sibling module (`python benchmarks/NAME.py` puts benchmarks/ on sys.path).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from causalize import fs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = HERE / "_work"

#: Wan2.1-T2V-1.3B's transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json), written
#: out from the published numbers: benchmarks build it with random weights, nothing is downloaded.
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """Where and with what the benchmark ran (recorded in every results file)."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": _mem_total_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in ("torch", "diffusers", "accelerate", "safetensors", "causalize")},
        "cuda_available": torch.cuda.is_available(),
        "git": _git(),
    }


def machine_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    return (
        f"{info['cpu_model']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads), "
        f"{info['memory_total_gib']} GiB RAM, {info['platform']}, python {info['python']}, "
        f"torch {v['torch']}, diffusers {v['diffusers']}, load avg {info['load_average']}, {info['date']}"
    )


def _rounded(x: Any, digits: int) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def record_text(
    obj: Any, indent: int = 1, *, default: Callable[[Any], Any] | None = None, allow_nan: bool = True
) -> str:
    """JSON for a committed record: indented like ``json.dumps(obj, indent=indent)``, but a list of
    numbers or strings stays on one line. The same content (``json.loads`` gives the same object)
    in about a third less space: records travel with the tree, and a device call sends at most
    64 MiB. ``default`` and ``allow_nan`` are json.dumps's, for the values."""
    if isinstance(indent, bool) or not isinstance(indent, int) or indent < 0:
        raise ValueError(f"indent must be a non-negative integer, got {indent!r}")
    return _record(obj, indent, 0, {"default": default, "allow_nan": allow_nan}) + "\n"


def _record(obj: Any, indent: int, depth: int, dumps: dict[str, Any]) -> str:
    if isinstance(obj, tuple):
        obj = list(obj)
    if isinstance(obj, dict) and obj:
        inner = " " * (indent * (depth + 1))
        items = [f"{inner}{json.dumps(_key(k))}: {_record(v, indent, depth + 1, dumps)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * (indent * depth) + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        inner = " " * (indent * (depth + 1))
        items = [inner + _record(v, indent, depth + 1, dumps) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * (indent * depth) + "]"
    return json.dumps(obj, **dumps)


def _key(key: Any) -> str:
    """json.dumps's own key rule: strings as they are, numbers, booleans and None as JSON spells them."""
    return key if isinstance(key, str) else json.dumps(key)


def write_json(name: str, payload: dict[str, Any], digits: int = 6) -> Path:
    """results/NAME.json, floats rounded to `digits` significant digits, written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    # record_text rather than fs.write_json: a measurement may be NaN or infinite, and is recorded as such
    fs.write_text(path, record_text(_rounded(payload, digits)), overwrite=True)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table (also valid Markdown). `align`: one 'l'/'r' per column (default: l then r)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])
