"""What every Atari study tool shares: JSON records, messages on stderr, deterministic torch,
the machine facts a result records, and rate-limited progress lines."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import record_text
from causalize import fs

__all__ = [
    "StageProgress",
    "determinism",
    "log_stderr",
    "machine",
    "read_json",
    "set_determinism",
    "usable_cores",
    "write_json",
]

Log = Callable[[str], None]


def write_json(path: Path, obj: Any) -> None:
    """Atomic, replacing an earlier file (a rerun redoes a stage). record_text rather than
    fs.write_json: a single-segment comparison has a NaN standard error, a perfect frame an
    infinite PSNR, and both must still be recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.write_text(path, record_text(obj, default=str), overwrite=True)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS says, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_determinism(threads: int, device: str) -> None:
    """Fixed threads and deterministic kernels. On CUDA some kernels the UNet needs (e.g. the
    nearest-upsampling backward) have no deterministic version: warn instead of failing there.
    On CUDA, fp32 matmuls and convolutions run on TF32 tensor cores (cuDNN's default already, now
    cuBLAS's too), several times fp32's rate: the gpu scale's minutes are counted at both (compute.py)."""
    torch.set_num_threads(int(threads))
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def determinism(threads: int, device: str) -> Iterator[None]:
    """:func:`set_determinism` for the block, then the process as it was (threads, deterministic
    kernels, TF32 and cuBLAS's workspace variable): tests and notebooks run studies in one process."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        set_determinism(threads, device)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3], saved[4]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


_MACHINE: dict[str, Any] = {}


def machine(device: str) -> dict[str, Any]:
    """benchmarks._common.machine_info, its slow parts (git, versions) computed once per process."""
    import datetime

    from benchmarks._common import machine_info

    if not _MACHINE:
        _MACHINE.update(machine_info())
    return {
        **_MACHINE,
        "torch_threads": torch.get_num_threads(),
        # meaningful only where CUDA runs the matmuls
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.startswith("cuda") else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


class StageProgress:
    """Rate-limited progress lines: a step counter every ``every`` seconds and at the end."""

    def __init__(self, log: Log, label: str, every: float = 30.0):
        self.log, self.label, self.every = log, label, every
        self.t0 = self.last = time.perf_counter()
        self.first: int | None = None  # the step before the first reported one (a resumed run starts late)

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = step - 1
        if step == total or now - self.last >= self.every:
            self.last = now
            rate = (now - self.t0) / max(step - self.first, 1)
            self.log(
                f"{self.label}: step {step}/{total} loss {loss:.4f} ({rate:.2f}s/step, ~{rate * (total - step) / 60:.1f} min left)"
            )
