"""The Atari study's gpu scale on a lent GPU in one command, bounded in time, with what comes back.

    python -m benchmarks.atari.gpu_run [--backbone wan|unet3d] [--limit 480] [--attention dense] [--out DIR]
        [--dest DIR] [STUDY ARGS]

Runs ``python -m benchmarks.atari.study --out DIR --scale gpu --backbone B --space latent [STUDY
ARGS]`` (further arguments go to the study and win over these, e.g. ``--set eval.steps=5``) in a
child process that is stopped after ``--limit`` seconds (a GPU session has 15 minutes in all and
10 per command), then copies into ``--dest`` (default ``$OUT``, the folder a device call returns,
at most 8 files): ``gpu_run.json`` (device, exit status, wall seconds, whether the limit stopped
it, the stages whose records exist), the study's log, and, when the study finished,
``results.json``, ``README.md``, ``study.json`` and ``rollout.gif``. A run stopped by the limit
resumes from its finished stages when the same command is given again on the same machine.

Attention runs ``dense`` by default (``CAUSALIZE_ATTENTION`` for the child, unless exported
already): the one path the CPU rehearsals ran. On CUDA ``auto`` would compile flex attention for the 1,024-token training windows,
forward and backward, a path no run of this study has taken, whose compile costs part of the eight
minutes and whose backward, lowered at the first ``loss.backward()``, has no fallback; at these
sizes a dense mask is 1 MiB. ``benchmarks/gpu_check.py`` is the place that measures flex.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import record_text
from benchmarks.atari.reuse import RUN_DIRS, SHARED_STAGES
from causalize.errors import UsageError
from causalize.modules.attention_exec import BACKENDS, ENV_VAR, environment_backend

__all__ = ["main", "run"]

#: What the study leaves when it finished, copied back beside gpu_run.json and the log.
FINISHED = ("results.json", "README.md", "study.json", "rollout.gif")
#: The study's stage folders, in order; a stage counts as reached when its folder exists.
STAGES = (*SHARED_STAGES, *RUN_DIRS)


def _device() -> dict[str, Any]:
    """The accelerator this process sees (torch imported here only)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "torch": torch.__version__,
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def run(
    backbone: str = "wan",
    limit: float = 480.0,
    out: str | os.PathLike | None = None,
    dest: str | os.PathLike | None = None,
    study_args: Sequence[str] = (),
    attention: str | None = None,
) -> dict[str, Any]:
    """Run the study for at most ``limit`` seconds with ``attention`` (default: an exported
    CAUSALIZE_ATTENTION, else dense; see the module's note) and copy its record into ``dest``."""
    attention = attention or environment_backend() or "dense"
    if attention not in BACKENDS:
        raise UsageError(f"attention {attention!r} is not one of {', '.join(BACKENDS)}")
    out = Path(out or f"benchmarks/_work/atari-gpu-{backbone}")
    dest = Path(dest or os.environ.get("OUT") or out / "returned")
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.atari.study",
        "--out",
        str(out),
        "--scale",
        "gpu",
        "--backbone",
        backbone,
        "--space",
        "latent",
        *study_args,
    ]
    started = time.perf_counter()
    with open(dest / "study.log", "w", encoding="utf-8") as log:
        env = {**os.environ, ENV_VAR: attention}
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc, stopped = child.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            child.kill()
            rc, stopped = child.wait(), True
    copied = [name for name in FINISHED if (out / name).is_file()]
    for name in copied:
        shutil.copy2(out / name, dest / name)
    summary = {
        "command": " ".join(command[1:]),
        "device": _device(),
        "attention": attention,
        "exit_status": rc,
        "stopped_by_limit": stopped,
        "limit_s": limit,
        "wall_s": round(time.perf_counter() - started, 1),
        "stages_reached": [s for s in STAGES if (out / s).is_dir()],
        "finished": (out / "results.json").is_file() and rc == 0,
        "copied": copied,
    }
    (dest / "gpu_run.json").write_text(record_text(summary, indent=2), encoding="utf-8")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.atari.gpu_run",
        description="The Atari study's gpu scale in one bounded command; its record goes to --dest ($OUT).",
        epilog="Further arguments go to python -m benchmarks.atari.study and win over the ones set here "
        "(e.g. --set eval.steps=5).",
    )
    p.add_argument("--backbone", choices=("wan", "unet3d"), default="wan", help="wan (the wide DiT, first) or unet3d")
    p.add_argument(
        "--limit",
        type=float,
        default=480.0,
        help="seconds before the study is stopped (default 480: the scale's 8 minutes, leaving a 10-minute device call room to install and copy)",
    )
    p.add_argument(
        "--attention",
        choices=BACKENDS,
        default=None,
        help="the study's attention execution (default: $CAUSALIZE_ATTENTION if exported, else dense, "
        "the path the CPU rehearsals ran; auto would compile flex on CUDA, measured by "
        "benchmarks/gpu_check.py instead)",
    )
    p.add_argument(
        "--out", default=None, help="the study's folder, resumable (default benchmarks/_work/atari-gpu-BACKBONE)"
    )
    p.add_argument("--dest", default=None, help="where the record goes (default: $OUT, else OUT/returned)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, study_args = _parser().parse_known_args(argv)
    if args.limit <= 0:
        print("error: --limit must be positive", file=sys.stderr)
        return 2
    try:
        summary = run(args.backbone, args.limit, args.out, args.dest, study_args, args.attention)
    except UsageError as error:  # a bad exported CAUSALIZE_ATTENTION, before anything ran
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
