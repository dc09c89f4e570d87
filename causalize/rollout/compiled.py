"""An optional compiled current-frame step for exact streaming (issue 11, item 3).

A streaming rollout calls the model S times per generated frame (2 branches each when guided)
on the current frame alone against the caches. Once the window is full those calls are static:
same cached history length, same frame shape, same positions. `CompiledStep` runs exactly those
calls through `torch.compile` of the model's own forward (its hooks, processors and caches stay
as they are; the attention modules causalize rewired run eagerly between compiled graphs):

- The history prefill (a `write` call, once per frame) always runs eagerly: its shape changes
  while the window fills, and compiling it would recompile.
- A frame's steps run compiled only when its step key (history frames cached, the current
  frames' shape, the branch count) equals the previous frame's: while the window still grows
  every frame has a new offset, and compiling those would recompile per frame (Dynamo guards on
  the positions). From the second frame of a full window on, nothing recompiles.
- Correctness never depends on the key: Dynamo's own guards recompile if anything it traced
  changed. The key only keeps the compiler away from calls that would recompile.

Modes are `torch.compile` modes: "default"; "reduce-overhead" (CUDA graphs on CUDA: launch
overhead gone for the compiled segments; the same as "default" on CPU); "max-autotune" and
"max-autotune-no-cudagraphs". Rolling caches count positions globally, so every frame has a new
offset and nothing would ever be static: compilation needs cache='exact'.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Dynamo compiles a shared block class once per distinct shape (a UNet's resnets of each width):
# its default limit of 8 per code object would send the rest of a large UNet back to eager
RECOMPILE_LIMIT = 64
# torch.compile's backend. "eager" traces with Dynamo and runs the captured graphs as they are:
# what the tests set to check every plan cheaply (inductor's code generation costs seconds each)
BACKEND = "inductor"


class CompiledStep:
    """The model's forward compiled once per session, swapped in for the static current-frame calls.

    The attention modules whose processor causalize installed (the streaming processors and
    their caches) are swapped for `torch.compiler.disable`d forwards at the same time: Dynamo
    calls them eagerly instead of tracing into the caches' bookkeeping, and guards on nothing
    per layer (diffusers' legacy `Attention.forward` would otherwise be recompiled per layer,
    each with its own processor object)."""

    def __init__(self, model: nn.Module, mode: str, backend: str | None = None):
        self.model = model
        self.mode = mode
        self._swaps: list[tuple[nn.Module, Any, Any]] = []  # (module, its instance forward or None, stand-in)
        compiled = torch.compile(model.forward, mode=mode, backend=backend or BACKEND)
        self._swaps.append((model, vars(model).get("forward"), compiled))
        for m in model.modules():
            if _causalize_processor(getattr(m, "processor", None)):
                self._swaps.append((m, vars(m).get("forward"), torch.compiler.disable(m.forward)))
        self._previous_key: tuple | None = None
        self._key: tuple | None = None
        self.calls = 0  # model calls this session served compiled
        self.failure: str | None = None  # why compilation failed (the session then runs eagerly)
        from torch._dynamo.exc import TorchDynamoException

        self._compile_error = TorchDynamoException

    def start_frame(self, key: tuple) -> None:
        """Before a frame's steps: its step key (see the module docstring)."""
        self._previous_key, self._key = self._key, key

    @property
    def static(self) -> bool:
        """Do this frame's steps repeat the previous frame's (so the compiled forward serves them)?"""
        return self._key is not None and self._key == self._previous_key

    def run(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One current-frame call: `forward()` with the compiled forward standing in for the
        model's when the frame is static. A model Dynamo cannot compile is warned about once and
        runs eagerly from then on (a read call changes no cache, so it is simply run again)."""
        if not self.static or self.failure is not None:
            return forward()
        if self.mode == "reduce-overhead":
            # CUDA graph trees: a new step starts here, so the previous step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with self._swapped(), torch._dynamo.config.patch(**_recompile_limit()):
                out = forward()
        except self._compile_error as exc:
            self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            warnings.warn(
                f"torch.compile cannot compile this {type(self.model).__name__} ({self.failure}); "
                "its steps run eagerly (the same frames, without the speed-up)",
                stacklevel=2,
            )
            return forward()
        self.calls += 1
        return out

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        for module, _, stand_in in self._swaps:
            object.__setattr__(module, "forward", stand_in)
        try:
            yield
        finally:
            for module, original, _ in self._swaps:
                if original is None:
                    vars(module).pop("forward", None)
                else:
                    object.__setattr__(module, "forward", original)


def _recompile_limit() -> dict[str, int]:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    return {name: max(RECOMPILE_LIMIT, getattr(config, name))}


def _causalize_processor(processor: Any) -> bool:
    return processor is not None and type(processor).__module__.startswith("causalize.")


def step_key(cached_frames: int, sample: torch.Tensor, extra: Any = None) -> tuple:
    """What must repeat for a frame's steps to reuse the compiled forward: the history length in
    the caches and the current call's shape, dtype and device (and anything else the caller adds)."""
    return (cached_frames, tuple(sample.shape), sample.dtype, sample.device, extra)


__all__ = ["COMPILE_MODES", "CompiledStep", "step_key"]
