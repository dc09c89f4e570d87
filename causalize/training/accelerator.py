"""accelerate's Accelerator for a training run: the launch's processes, the CPU where asked, and
a fresh set-up when an earlier run in the same process left another."""

from __future__ import annotations

import os
from typing import Any

import torch

from causalize.training.config import TrainConfig, TrainingError

__all__ = ["make_accelerator"]


def _forget_another_setup(cpu: bool, mixed_precision: str) -> None:
    """accelerate keeps one set-up per process: after a CPU run, a cuda run in the same process
    would silently train on the CPU (and another mixed precision is refused). One process running
    one training at a time starts afresh when the set-up it needs differs."""
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state:
        return
    same_device = (PartialState().device.type == "cpu") == cpu
    same_precision = AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) == mixed_precision
    if not (same_device and same_precision):
        AcceleratorState._reset_state(reset_partial_state=True)


def make_accelerator(config: TrainConfig) -> Any:
    """accelerate's Accelerator for this launch (one process, or every process of
    ``accelerate launch`` / torchrun), on the CPU where asked."""
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # Several processes without CUDA (torchrun on CPUs): accelerate joins them only with cpu=True.
    cpu_ddp = world > 1 and not torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device='cuda' but this torch has no usable CUDA device", "use --device cpu")
    cpu = cpu_ddp or config.device == "cpu"
    if world == 1:
        _forget_another_setup(cpu, config.mixed_precision)
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, **({"cpu": True} if cpu else {}))
    except (ValueError, RuntimeError) as exc:
        raise TrainingError(f"accelerate cannot set up mixed_precision={config.mixed_precision!r}: {exc}") from exc
    if accelerator.num_processes != world:
        raise TrainingError(
            f"{world} processes were launched but accelerate set up {accelerator.num_processes}",
            "launch with `accelerate launch` (see `accelerate config`) or torchrun",
        )
    return accelerator
