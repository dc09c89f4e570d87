"""An optional compiled current-frame step for exact streaming (issue 11, item 3).

A streaming rollout calls the model S times per generated frame (2 branches each when guided)
on the current frame alone against the caches. Once the window is full those calls are static:
same cached history length, same frame shape, same positions. `CompiledStep` runs exactly those
calls through `torch.compile` of the model's own forward (its hooks, processors and caches stay
as they are; the attention modules causalize rewired run eagerly between compiled graphs):

- The history prefill (a `write` call, once per frame) always runs eagerly: its shape changes
  while the window fills, and compiling it would recompile.
- A frame's steps run compiled only when its step key (history frames cached, the call's shape
  (branches included), dtype and device, the anchor level) equals the previous frame's: while the window still grows
  every frame has a new offset, and compiling those would recompile per frame (Dynamo guards on
  the positions). From the second frame of a full window on, nothing recompiles.
- Correctness never depends on the key: Dynamo's own guards recompile if anything it traced
  changed. The key only keeps the compiler away from calls that would recompile.
- A model Dynamo cannot trace (or a disabled Dynamo) is warned about once and runs eagerly, the
  same frames; the failure is kept on the model, so later sessions do not trace it again.

Modes are `torch.compile` modes: "default"; "reduce-overhead" (CUDA graphs on CUDA: launch
overhead gone for the compiled segments; the same as "default" on CPU); "max-autotune" and
"max-autotune-no-cudagraphs". Rolling caches count positions globally, so every frame has a new
offset and nothing would ever be static: compilation needs cache='exact'.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
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
FAILURE_ATTR = "_causalize_compile_failure"


class CompiledStep:
    """The model's forward compiled once, swapped in for the static current-frame calls.

    `eager` are the modules Dynamo must not trace: the attention modules whose processors read
    the streaming caches (`Stream.attention_modules()`). They are swapped for
    `torch.compiler.disable`d forwards at the same time, so Dynamo calls them eagerly instead of
    tracing into the caches' bookkeeping, and guards on nothing per layer (diffusers' legacy
    `Attention.forward` would otherwise be recompiled per layer, each with its own processor).

    With a CUDA-graph mode ("reduce-overhead", "max-autotune") the tensor `run()` returns lives in
    the graphs' memory and is overwritten by the next compiled call: use it before the next step
    (the sampler turns it into the next sample at once)."""

    def __init__(self, model: nn.Module, mode: str, eager: Iterable[nn.Module] = (), backend: str | None = None):
        from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

        self.model = model
        self.mode = mode
        forward = model.forward
        self._stand_ins: list[tuple[nn.Module, Callable]] = [
            (model, torch.compile(forward, mode=mode, backend=backend or BACKEND))
        ]
        self._stand_ins += [(m, torch.compiler.disable(m.forward)) for m in eager]
        self._compile_errors = (TorchDynamoException, FailOnRecompileLimitHit)
        self._previous_key: tuple | None = None
        self._key: tuple | None = None
        self._checked = False  # has Dynamo been seen enabled and compiling
        # model calls run through the compiled forward, with Dynamo enabled and no error: its
        # graphs serve them, and the parts it cannot capture (the eager modules among them) run
        # eagerly between the graphs
        self.calls = 0
        # why this model cannot be compiled (then every call runs eagerly); kept on the model, so
        # that later sessions (each env reset) do not trace it again
        self.failure: str | None = compile_failure(model)

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
        if self.mode in ("reduce-overhead", "max-autotune"):
            # CUDA graph trees: a new step starts here, so the previous step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with self._swapped(), torch._dynamo.config.patch(**_dynamo_settings()):
                out = forward()
        except self._compile_errors as exc:
            self._fail(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            return forward()
        if not self._checked:
            # Dynamo runs everything eagerly, without raising, when it is disabled: no graph then
            if torch._dynamo.config.disable or not _graphs_compiled():
                self._fail("Dynamo compiled nothing (torch._dynamo is disabled: TORCHDYNAMO_DISABLE?)")
                return out  # it ran eagerly: a valid result, not counted
            self._checked = True
        self.calls += 1
        return out

    def _fail(self, reason: str) -> None:
        self.failure = reason
        object.__setattr__(self.model, FAILURE_ATTR, reason)
        warnings.warn(
            f"torch.compile cannot compile this {type(self.model).__name__} ({reason}); its steps run eagerly "
            "(the same frames, without the speed-up)",
            stacklevel=3,
        )

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        # the forwards in place now (instance attributes, e.g. hooks added since) are put back after
        saved = [(module, vars(module).get("forward")) for module, _ in self._stand_ins]
        for module, stand_in in self._stand_ins:
            object.__setattr__(module, "forward", stand_in)
        try:
            yield
        finally:
            for module, original in saved:
                if original is None:
                    vars(module).pop("forward", None)
                else:
                    object.__setattr__(module, "forward", original)


def compile_failure(model: nn.Module) -> str | None:
    """Why a CompiledStep found `model` cannot be compiled (its steps then run eagerly), or None."""
    return vars(model).get(FAILURE_ATTR)


def _dynamo_settings() -> dict[str, Any]:
    """Dynamo settings while a compiled step runs: a recompile limit high enough for a UNet's
    blocks of several widths (never lowering a user's), reached as an error instead of a silent
    fall back to eager (the step then says so)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    settings: dict[str, Any] = {name: max(RECOMPILE_LIMIT, getattr(config, name))}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    return settings


def _graphs_compiled() -> bool:
    """Has Dynamo compiled any graph in this process (since its last reset)?"""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"] > 0


def step_key(cached_frames: int, sample: torch.Tensor, extra: Any = None) -> tuple:
    """What must repeat for a frame's steps to reuse the compiled forward: the history length in
    the caches and the current call's shape, dtype and device (and anything else the caller adds)."""
    return (cached_frames, tuple(sample.shape), sample.dtype, sample.device, extra)


__all__ = ["COMPILE_MODES", "CompiledStep", "compile_failure", "step_key"]
