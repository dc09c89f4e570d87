"""Emulated CUDA on the CPU: find device-placement bugs before a GPU is lent.

Inside ``with emulated_cuda():`` a tensor put on ``cuda`` (``.to("cuda")``, ``.to(0)``,
``device="cuda"``, ``torch.tensor(..., device=...)``, a module's ``.to``/``.cuda``) is an
:class:`OnCuda`: it reports ``device == cuda:0`` to Python, keeps its values in an ordinary CPU
tensor and is computed by the CPU kernels, so a run gives the CPU's numbers (it shows that the code
paths agree, not what a GPU computes). Every aten operation, backward passes and hooks included, is
checked with CUDA's rules on the way:

- cuda and CPU tensors may not meet in one operation, except as CUDA allows: a 0-dim CPU tensor as
  an operand of a pointwise operation or as a fill value (never as what is written into), copies,
  and CPU indices (or masks) indexing a cuda tensor, whose values must still be on its device;
- a random draw for a cuda tensor needs a cuda generator (``torch.Generator("cuda")``, whose
  ``.device`` says cuda, as diffusers' ``randn_tensor`` expects), and a CPU one a CPU generator;
- ``.numpy()`` of a cuda tensor is refused (``force=True`` copies), ``cuda:1`` does not exist.

A violation raises :class:`DeviceMismatch` where a GPU would raise, naming the operation and the
devices and shapes it was given. Moves between the CPU and cuda are followed by autograd.
``torch.cuda`` and ``torch.accelerator`` answer as one idle GPU would (available, one device, no
stream capture, the host's memory), so code that asks first (accelerate, the optimizers) takes its
CUDA path.

What it is not: CUDA. Kernels, streams, CUDA graphs, autocast on CUDA, triton and anything compiled
are not exercised; where torch's C++ reads a tensor's C++ device (the CPU, for an emulated one) it is
mapped back to cuda (``type_as``, ``Tensor.new_*``, casts with an input's options, tensors its C++
makes from nothing: told from Python's factory calls, which are checked). One emulation at a time,
in one thread; worker processes are not emulated; everything swapped is put back on exit. The
README's "Device placement without a GPU" lists what is and is not emulated.

``python -m causalize.testing.emulated_cuda -m MODULE [ARGS...]`` runs a module under it, e.g.
a study with ``--device cuda``.

The package: ``tensor`` (:class:`OnCuda`, device arguments), ``dispatch`` (the aten-level checks),
``python_side`` (what torch decides before the dispatcher), ``idle_gpu`` (what is swapped in while
it runs); this module enters and leaves it.
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections.abc import Iterator
from typing import Any

import torch

from causalize.testing.emulated_cuda.dispatch import EmulatedCuda
from causalize.testing.emulated_cuda.idle_gpu import forget_detected_devices, one_idle_gpu
from causalize.testing.emulated_cuda.python_side import PythonSide
from causalize.testing.emulated_cuda.tensor import CUDA, DeviceMismatch, OnCuda

__all__ = ["CUDA", "DeviceMismatch", "EmulatedCuda", "OnCuda", "emulated_cuda", "main", "run_module"]


class _Active:
    mode: EmulatedCuda | None = None


_INHERITED = object()  # an attribute the owner inherits rather than holds


@contextlib.contextmanager
def emulated_cuda() -> Iterator[EmulatedCuda]:
    """Run the block as if one GPU were there (see the module docstring); yields the mode, whose
    ``ops`` counts the operations checked. Everything it changes is put back on exit."""
    if _Active.mode is not None:
        raise RuntimeError("emulated_cuda is already active in this process")
    mode = EmulatedCuda()
    swaps = one_idle_gpu()
    saved = [(owner, name, owner.__dict__.get(name, _INHERITED)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    swap_params = torch.__future__.get_swap_module_params_on_conversion()
    # Module.to / .cpu swap parameters for their moved copies instead of assigning .data, which
    # cannot turn an emulated tensor into a CPU one
    torch.__future__.set_swap_module_params_on_conversion(True)
    forget_detected_devices()
    _Active.mode = mode
    try:
        with PythonSide(mode), mode:
            yield mode
    finally:
        _Active.mode = None
        torch.__future__.set_swap_module_params_on_conversion(swap_params)
        for owner, name, value in saved:
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        forget_detected_devices()


def run_module(module: str, args: list[str]) -> int:
    """``python -m module *args`` under the emulation; its exit status."""
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with emulated_cuda() as mode:
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code: Any = 0
            except SystemExit as exc:
                code = exc.code
        print(f"emulated cuda: {mode.ops} operations checked", file=sys.stderr)
    finally:
        sys.argv = argv
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "-m":
        print(
            "usage: python -m causalize.testing.emulated_cuda -m MODULE [ARGS...]\n"
            "runs MODULE as if one GPU were there: tensors on cuda are computed on the CPU and every\n"
            "operation is checked for CUDA's device rules (see causalize.testing.emulated_cuda)",
            file=sys.stderr,
        )
        return 2
    return run_module(argv[1], argv[2:])
