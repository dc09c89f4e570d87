"""Operations one fine-tuning step of a study's converted model dispatches (issue 17), counted.

    python -m benchmarks.atari.step_ops --study DIR [--variant V] [--batch 2] [--json PATH]

The gpu scale's "under 8 minutes" rests on a FLOP count at an assumed throughput (``compute.py``).
Its models are small (5M parameters), so on a GPU a step may instead be bound by how many kernels
it launches. This counts the aten operations the study's own fine-tuning (``causalize`` trainer,
converted model, action adapter, optimiser) dispatches per step: ``train()`` is run twice from the
study's recorded fine-tuning configuration, for a few steps and for more, under a dispatch
counter, and the difference is divided by the extra steps (setup, data loading and saving cancel
out). Counted on this machine's device (the CPU here). The count hardly depends on the batch (data
loading adds about 16 operations per sample), but some of it depends on the device: on CUDA the
optimiser step runs as a few foreach kernels instead of several operations per parameter, and
views launch no kernel on any device, so the table splits both out. Seconds are not measured: an
operation's cost on a GPU is not known here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._common import record_text
from benchmarks.atari.runtime import read_json

#: Operations that only make a new view of a tensor's memory (no kernel on any device).
VIEWS = frozenset(
    {"view", "_unsafe_view", "t", "detach", "permute", "unsqueeze", "squeeze", "expand", "slice", "select"}
    | {"transpose", "as_strided", "alias", "split", "split_with_sizes", "unbind", "reshape", "chunk"}
)
#: Key under which the operations inside ``optimizer.step()`` are counted together.
OPTIMISER = "optimizer.step"


class _Counter(TorchDispatchMode):
    """Counts operations by name, those inside an optimiser step under :data:`OPTIMISER`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.in_step = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        self.ops[OPTIMISER if self.in_step else func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):  # noqa: ANN204
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [
            register_optimizer_step_pre_hook(lambda *_: setattr(self, "in_step", True)),
            register_optimizer_step_post_hook(lambda *_: setattr(self, "in_step", False)),
        ]
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)


def _run_counted(config: dict[str, Any], steps: int, batch: int, work: Path) -> Counter[str]:
    from causalize.training.trainer import TrainConfig, train

    out = work / f"steps{steps}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = {"output_dir": str(out), "steps": steps, "batch_size": batch, "resume": False}
    overrides |= {"checkpoint_every": 0, "log_every": 10**9}
    with _Counter() as counter:
        train(TrainConfig(**{**config, **overrides}))
    return counter.ops


def step_ops(study: str | Path, variant: str | None = None, batch: int = 2, steps: tuple[int, int] = (2, 6)) -> dict:
    """Aten operations per fine-tuning step of ``variant`` (default: the first with a record)."""
    records = sorted((Path(study) / "finetune").glob("*.json"))
    if variant is not None:
        records = [r for r in records if r.stem == variant]
    if not records:
        raise FileNotFoundError(f"no fine-tuning record{f' of {variant!r}' if variant else ''} in {study}/finetune")
    config = read_json(records[0])["config"]
    few, many = steps
    if not 0 < few < many or batch < 1:
        raise ValueError(f"steps must be 0 < few < many and batch >= 1, got {steps}, {batch}")
    with tempfile.TemporaryDirectory() as work:
        counts = [_run_counted(config, n, batch, Path(work)) for n in steps]
    per_op = {op: (counts[1][op] - counts[0][op]) / (many - few) for op in counts[1]}
    per_op = {op: n for op, n in sorted(per_op.items(), key=lambda kv: -kv[1]) if n > 0}
    total = sum(per_op.values())
    views = sum(n for op, n in per_op.items() if op in VIEWS)
    optimiser = per_op.get(OPTIMISER, 0)
    return {
        "study": str(study),
        "variant": records[0].stem,
        "device": torch.device(config.get("device") or "cpu").type,
        "batch": batch,
        "steps": list(steps),
        "ops_per_step": total,
        "views_per_step": views,
        "optimiser_step_ops_per_step": optimiser,
        "other_ops_per_step": total - views - optimiser,
        "by_op": per_op,
    }


def table(doc: dict[str, Any], top: int = 12) -> str:
    rows = [("all operations", doc["ops_per_step"]), ("views (no kernel)", doc["views_per_step"])]
    rows += [("inside optimizer.step() (views too)", doc["optimiser_step_ops_per_step"])]
    rows += [("the rest", doc["other_ops_per_step"])]
    rows += [(op, n) for op, n in doc["by_op"].items() if op != OPTIMISER][:top]
    lines = [f"| per fine-tuning step ({doc['variant']}, {doc['device']}) | operations |", "|---|---:|"]
    return "\n".join(lines + [f"| {name} | {n:,.0f} |" for name, n in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.step_ops", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="a study folder whose fine-tuning stage has run")
    p.add_argument("--variant", default=None, help="the fine-tuned variant (default: the first recorded)")
    p.add_argument("--batch", type=int, default=2, help="batch of the counted steps (the count does not depend on it)")
    p.add_argument("--json", default=None, help="also write the counts here")
    args = p.parse_args(argv)
    try:
        doc = step_ops(args.study, args.variant, args.batch)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(doc))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(record_text(doc), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
