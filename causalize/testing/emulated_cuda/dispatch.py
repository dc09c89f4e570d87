"""The aten-level half of the emulation: each operation runs on the CPU values, checked first
against CUDA's device rules."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from causalize.testing.emulated_cuda.tensor import (
    CPU,
    DeviceMismatch,
    OnCuda,
    check_index,
    describe,
    values,
)

aten = torch.ops.aten

# operations CUDA lets a cuda tensor meet CPU ones in: copies, and indexing with CPU indices (the
# index_put family only for the indices: its values follow the tensor, see EmulatedCuda._check)
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten._local_scalar_dense.default, aten.index.Tensor}
_INDEX_PUT = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
# a 0-dim CPU tensor may meet cuda ones as an input of a pointwise (TensorIterator) operation, as
# on CUDA; these take one as their fill value too
_SCALAR_VALUE = {aten.fill_.Tensor, aten.masked_fill.Tensor, aten.masked_fill_.Tensor}
_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Tensor}
# operations given an explicit device that torch's C++ took from the input's options (the CPU, for an
# emulated input): Tensor.new_*, and _to_copy (a Python .to("cpu") / .cpu() of an emulated tensor is
# answered before the dispatcher, so one reaching it with the CPU comes from C++: type_as, rms_norm)
_OPTIONS_OF_INPUT = {
    aten._to_copy.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
}


class EmulatedCuda(TorchDispatchMode):
    """The aten-level half: runs each operation on the CPU values and checks CUDA's device rules."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0  # operations checked
        self.generator_on: str | None = None  # device of the generator of the call in progress
        self.cuda_call = False  # the torch call in progress was given an emulated tensor
        self.in_backward = 0  # backward passes in progress

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        target = self._target(func, args, kwargs, tensors)
        self._check(func, args, kwargs, tensors, target)
        originals = {id(t.elem): t for t in tensors if isinstance(t, OnCuda)}
        out = func(*tree_map(values, args), **tree_map(values, kwargs))
        if func is aten._local_scalar_dense.default:
            return out
        if target is None:  # the inputs decide; a copy lands where it is written
            deciding = [args[0]] if func is aten.copy_.default else tensors
            target = "cuda" if any(isinstance(t, OnCuda) for t in deciding) else "cpu"

        def wrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in originals:  # an in-place or out= result: the caller's own tensor
                return originals[id(t)]
            return OnCuda(t) if target == "cuda" else t

        return tree_map(wrap, out)

    def _target(self, func, args, kwargs, tensors) -> str | None:
        """The device an explicit ``device=`` asks for (None: the inputs decide); kwargs get the CPU."""
        if kwargs.get("device") is None:
            return None
        device = torch.device(kwargs["device"])
        if device.type == "cuda":
            check_index(device)
            kwargs["device"] = CPU
            return "cuda"
        if func in _OPTIONS_OF_INPUT and isinstance(args[0], OnCuda):
            return "cuda"
        if not tensors and "pin_memory" not in kwargs and (self.cuda_call or self.in_backward):
            # made from nothing by torch's C++ (Python's factories pass pin_memory), with the options
            # of an emulated tensor, so its C++ device: F.one_hot's arange, autograd's zero gradients
            return "cuda"
        return "cpu"

    def _check(self, func, args, kwargs, tensors, target) -> None:
        cuda = [isinstance(t, OnCuda) for t in tensors]
        if func in _INDEX_PUT:
            self._check_index_put(func, args, tensors)
        elif func not in _CROSS_DEVICE and any(cuda) and not all(cuda):
            cpu = [t for t, c in zip(tensors, cuda) if not c]
            if any(t.dim() > 0 for t in cpu) or not self._takes_cpu_scalars(func, args, kwargs, cpu):
                raise DeviceMismatch(f"{func}: tensors on cuda:0 and cpu ({describe(tensors)})")
        if func is aten.index.Tensor and any(cuda) and not isinstance(args[0], OnCuda):
            raise DeviceMismatch(f"{func}: a cpu tensor indexed by cuda indices ({describe(tensors)})")
        if kwargs.get("generator") is not None and self.generator_on is not None:
            wanted = target or ("cuda" if any(cuda) else "cpu")
            if self.generator_on != wanted:
                raise DeviceMismatch(f"{func}: a {self.generator_on} generator draws for a {wanted} tensor")

    @staticmethod
    def _takes_cpu_scalars(func, args, kwargs, cpu: list[torch.Tensor]) -> bool:
        """0-dim CPU tensors beside cuda ones: inputs of a pointwise operation (not what it writes
        into: ``total += loss`` with a CPU ``total`` fails on CUDA), or a fill value."""
        written = _written(func, args, kwargs)
        if any(t is w for t in cpu for w in written):
            return False
        if func in _SCALAR_VALUE:
            return all(t is args[-1] for t in cpu)
        if func in _MASKED_FILL:  # its mask follows the tensor
            return all(t is not args[1] for t in cpu)
        return torch.Tag.pointwise in func.tags

    @staticmethod
    def _check_index_put(func, args, tensors) -> None:
        """CPU indices may index a cuda tensor; the values must be on its device (or 0-dim)."""
        target, values = args[0], args[2]
        on_cuda = isinstance(target, OnCuda)
        if isinstance(values, OnCuda) != on_cuda and values.dim() > 0:
            raise DeviceMismatch(f"{func}: values on another device than the tensor ({describe(tensors)})")
        if not on_cuda and any(isinstance(i, OnCuda) for i in args[1] if i is not None):
            raise DeviceMismatch(f"{func}: a cpu tensor indexed by cuda indices ({describe(tensors)})")


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments an operation writes into (self of an in-place op, out=)."""
    written = []
    for i, spec in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(spec.name)
        if isinstance(value, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write:
            written.append(value)
    return written
