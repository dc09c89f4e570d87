"""The Python-level half of the emulation: what torch decides in C++ before the dispatcher
(device strings, tensor constructors, moves between the CPU and cuda, numpy) and which generator a
draw uses."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from causalize.testing.emulated_cuda.dispatch import EmulatedCuda
from causalize.testing.emulated_cuda.idle_gpu import REAL_GENERATOR
from causalize.testing.emulated_cuda.tensor import (
    CPU,
    CUDA,
    OnCuda,
    check_index,
    device_arg,
    device_kwargs,
    holds_cuda,
    indexed,
    is_cuda,
    values,
)

_BACKWARD = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
_CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)


class PythonSide(torch.overrides.TorchFunctionMode):
    """The Python-level half: what torch decides in C++ before the dispatcher (device strings,
    tensor constructors, moves, numpy) and which generator a draw uses."""

    def __init__(self, dispatch: EmulatedCuda) -> None:
        super().__init__()
        self.dispatch = dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.dispatch
        saved = (state.cuda_call, state.generator_on, state.in_backward)
        state.cuda_call = any(isinstance(t, OnCuda) for t in tree_flatten((args, kwargs))[0])
        generator = kwargs.get("generator") or next((a for a in args if isinstance(a, REAL_GENERATOR)), None)
        if generator is not None:
            state.generator_on = "cuda" if getattr(generator, "emulated_cuda", False) else "cpu"
        if func in _BACKWARD:
            state.in_backward += 1
        try:
            return self._call(func, args, kwargs)
        finally:
            state.cuda_call, state.generator_on, state.in_backward = saved

    def _call(self, func, args, kwargs):
        if func is torch.device:  # torch.device("cuda", 0) stays as written
            return func(*args, **kwargs)
        first = args[0] if args else None
        if func in _CONSTRUCTORS:
            return self._construct(func, first, args[1:], kwargs)
        if func in (torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__) and holds_cuda(first):
            return CUDA if func == torch.Tensor.device.__get__ else True
        if func is torch.Tensor.type_as and isinstance(args[1], OnCuda):
            return first.to(device=CUDA, dtype=args[1].dtype)
        if func == torch.Tensor.data.__set__ and isinstance(first, OnCuda):
            return self._set_data(first, args[1])
        if func in (torch.Tensor.to, torch.Tensor.cuda) and type(first) in (torch.Tensor, torch.nn.Parameter):
            moved = self._to_device(func, first, args[1:], kwargs)
            if moved is not None:
                return moved
        if isinstance(first, OnCuda):
            handled = self._on_cuda(func, first, args[1:], kwargs)
            if handled is not None:
                return handled
        return func(*(indexed(a) for a in args), **device_kwargs(kwargs))

    @staticmethod
    def _construct(func, data, args, kwargs):
        """torch.tensor & co. build below the dispatcher's Python modes: on the CPU, then emulated."""
        if isinstance(data, torch.Tensor) and func is not torch.tensor and is_cuda(device_arg(kwargs.get("device"))):
            return data.to(device=CUDA, dtype=kwargs.get("dtype"))
        data = tree_map(values, data)  # a list of 0-dim cuda tensors gives a CPU tensor, as on CUDA
        kwargs = device_kwargs(kwargs)
        if is_cuda(kwargs.get("device")):
            return OnCuda(func(data, *args, **{**kwargs, "device": CPU}))
        return func(data, *args, **kwargs)

    @staticmethod
    def _to_device(func, t: torch.Tensor, args, kwargs) -> torch.Tensor | None:
        """A CPU tensor's .to / .cuda: 'cuda' or an int is cuda:0, .to(cuda_tensor) is cuda (its
        C++ device is the CPU), and a move that autograd follows goes through _ToDevice."""
        if func is torch.Tensor.cuda:
            device, dtype = device_arg((args[0] if args else kwargs.get("device")) or CUDA), None
        elif any(isinstance(a, OnCuda) for a in (*args, kwargs.get("other"))):
            other = kwargs.get("other", args[0] if args else None)
            device, dtype = CUDA, other.dtype
        else:
            device, dtype, _ = _parse_to(args, kwargs)
        if device is None or not is_cuda(device):
            return None
        check_index(device)
        dtype = dtype or t.dtype
        if t.requires_grad and torch.is_grad_enabled():
            return _ToDevice.apply(t, dtype)
        return OnCuda(t.detach().to(dtype=dtype, copy=True))

    @staticmethod
    def _set_data(t: OnCuda, value: torch.Tensor) -> None:
        """``param.data = value`` (a dtype change, say): the wrapper takes the new values too."""
        if not isinstance(value, OnCuda):
            raise NotImplementedError("the emulation cannot move a cuda tensor to the CPU by assigning its .data")
        torch.Tensor.data.__set__(t, value)
        t.elem = value.elem

    @staticmethod
    def _on_cuda(func, t: OnCuda, args, kwargs) -> Any:
        """Methods of an emulated tensor that torch resolves in C++; None: the dispatcher's."""
        if (func is torch.Tensor.numpy and not kwargs.get("force")) or func is torch.Tensor.__array__:
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        if func in (torch.Tensor.storage, torch.Tensor.untyped_storage, torch.Tensor.data_ptr, torch.Tensor.tolist):
            return func(t.elem, *args, **kwargs)
        if func is torch.Tensor.numpy:
            return t.elem.numpy(force=True)
        if func is torch.Tensor.get_device:
            return 0
        if func is torch.Tensor.new_tensor:
            made = torch.tensor(tree_map(values, args[0]), dtype=kwargs.get("dtype") or t.dtype)
            device = device_arg(kwargs.get("device"))
            return made if device is not None and not is_cuda(device) else OnCuda(made)
        if func is torch.Tensor.cuda:
            check_index(device_arg((args[0] if args else kwargs.get("device")) or CUDA))
            return t
        if func is torch.Tensor.cpu:
            return _to_host(t, t.dtype)
        if func is not torch.Tensor.to:
            return None
        device, dtype, memory_format = _parse_to(args, kwargs)
        if device is not None and device.type == "cpu":  # a copy to the host
            return _to_host(t, dtype or t.dtype)
        if device is not None:
            check_index(device)
        same = (dtype is None or dtype == t.dtype) and memory_format in (None, torch.preserve_format)
        return t if same and not kwargs.get("copy") else None


def _parse_to(args, kwargs) -> tuple[torch.device | None, torch.dtype | None, Any]:
    """(device, dtype, memory_format) of a ``Tensor.to`` call, ints and 'cuda' read as cuda:N."""
    plain = {k: device_arg(v) if k == "device" else v for k, v in kwargs.items() if k != "copy"}
    positional = [device_arg(a) if isinstance(a, (int, str, torch.device)) else a for a in args]
    device, dtype, _, memory_format = torch._C._nn._parse_to(*positional, **plain)
    return device, dtype, memory_format


def _to_host(t: OnCuda, dtype: torch.dtype) -> torch.Tensor:
    if t.requires_grad and torch.is_grad_enabled():
        return _ToHost.apply(t, dtype)
    return t.elem.to(dtype=dtype, copy=True)


class _ToHost(torch.autograd.Function):
    """cuda -> CPU that autograd follows: the gradient goes back to cuda."""

    @staticmethod
    def forward(ctx: Any, t: OnCuda, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = t.dtype
        return t.elem.to(dtype=dtype, copy=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return OnCuda(values(grad).to(ctx.dtype)), None


class _ToDevice(torch.autograd.Function):
    """CPU -> cuda that autograd follows: the gradient comes back to the CPU (torch's own move would
    send it with the options of the emulated tensor, whose C++ device is the CPU)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, dtype: torch.dtype) -> OnCuda:
        ctx.dtype = t.dtype
        return OnCuda(t.to(dtype=dtype, copy=True))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return values(grad).to(ctx.dtype), None
