"""Emulated CUDA on the CPU: find device-placement bugs before a GPU is lent.

Inside ``with emulated_cuda():`` a tensor put on ``cuda`` (``.to("cuda")``, ``device="cuda"``,
``torch.tensor(..., device=...)``, a module's ``.to``/``.cuda``) is a :class:`OnCuda`: it reports
``device == cuda:0`` to Python, keeps its values in an ordinary CPU tensor and is computed by the CPU
kernels, so a run gives the CPU's numbers. Every aten operation is checked with CUDA's rules on the
way: cuda and CPU tensors may not meet in one operation (a 0-dim CPU tensor may, as on CUDA; copies
and indexing with CPU indices may), a random draw for a cuda tensor needs a cuda generator,
``.numpy()`` of a cuda tensor is refused. A violation raises :class:`DeviceMismatch` where a GPU
would raise, naming the operation and the devices and shapes it was given. ``torch.cuda`` and
``torch.accelerator`` answer as one idle GPU would (available, one device, no stream capture), so
code that asks first (accelerate, the optimizers) takes its CUDA path.

What it is not: CUDA. Kernels, streams, CUDA graphs, autocast on CUDA, flex attention's triton
kernels and anything compiled are not exercised; the memory counters say 0. It checks where
tensors live on the code paths that run. Three of torch's C++ paths read a tensor's C++ device,
which is the CPU for an emulated tensor; they are mapped back to cuda: ``Tensor.type_as``,
``Tensor.new_*`` (also the copies autograd makes with them), and tensors made from nothing inside a
torch call that was given an emulated tensor (``F.one_hot``'s ``arange``, autograd's zero gradients
in a backward pass): taken to be cuda, so such a call that builds a CPU tensor on purpose is missed.
One emulation at a time per process: it swaps process-wide attributes (``torch.Generator``,
``torch.cuda.*``, ``Tensor.as_subclass``) and puts them back on exit.

``python -m causalize.testing.emulated_cuda -m MODULE [ARGS...]`` runs a module under it, e.g.
a study with ``--device cuda``; worker processes it spawns are not emulated.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# operations CUDA lets a cuda tensor meet CPU ones in (copies, CPU indices, reading a scalar)
_CROSS_DEVICE = {
    aten.copy_.default,
    aten._to_copy.default,
    aten._local_scalar_dense.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
}
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


class DeviceMismatch(RuntimeError):
    """A cuda tensor met a CPU one (or a generator of the other device) where CUDA would refuse."""


class OnCuda(torch.Tensor):
    """A tensor on the emulated ``cuda:0``: its values are the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnCuda:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=CPU,  # the C++ device; Python is told cuda:0 below
            requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        # a traceable wrapper: Module.to swaps parameters for it instead of assigning .data
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: Any, size: Any, stride: Any) -> OnCuda:
        return OnCuda(inner["elem"])

    def __reduce_ex__(self, protocol: int) -> Any:
        # torch.save of cuda state (an optimizer's, in a checkpoint) saves the CPU values: loading
        # needs no emulation (nor weights_only=False), and load_state_dict moves them to the device
        return self.elem.__reduce_ex__(protocol)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return f"OnCuda({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an emulated cuda tensor outside causalize.testing.emulated_cuda")


class _Active:
    mode: EmulatedCuda | None = None


def _indexed(x: Any) -> Any:
    """'cuda' -> cuda:0: torch's C++ would ask the absent CUDA runtime for the current device."""
    if (isinstance(x, str) and x.strip() == "cuda") or (
        isinstance(x, torch.device) and x.type == "cuda" and x.index is None
    ):
        return CUDA
    return x


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(_indexed(device)).type == "cuda"


def _holds_cuda(t: Any) -> bool:
    """An emulated tensor, or a tensor subclass that keeps one (causalize's FrameTensor)."""
    if isinstance(t, OnCuda):
        return True
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and any(
        isinstance(v, OnCuda) for v in getattr(t, "__dict__", {}).values()
    )


def _describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{'cuda' if isinstance(t, OnCuda) else 'cpu'} {tuple(t.shape)}" for t in tensors)


class EmulatedCuda(TorchDispatchMode):
    """The aten-level half: runs each operation on the CPU values and checks CUDA's device rules."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0  # operations checked
        self.cuda_generators: dict[int, torch.Generator] = {}
        self.generator_on: str | None = None  # device of the generator of the call in progress
        self.cuda_calls = 0  # torch calls in progress that were given an emulated tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        target = self._target(func, args, kwargs, tensors)
        self._check(func, args, kwargs, tensors, target)
        originals = {id(t.elem): t for t in tensors if isinstance(t, OnCuda)}
        out = func(*tree_map(_values, args), **tree_map(_values, kwargs))
        if func is aten._local_scalar_dense.default:
            return out
        if target is None:
            cuda_in = args[0] if func is aten.copy_.default else None
            target = (
                "cuda"
                if (isinstance(cuda_in, OnCuda) if cuda_in is not None else any(isinstance(t, OnCuda) for t in tensors))
                else "cpu"
            )

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
            if device.index not in (None, 0):
                raise DeviceMismatch(f"{func}: {device} does not exist (the emulation has one GPU)")
            kwargs["device"] = CPU
            return "cuda"
        if func in _OPTIONS_OF_INPUT and isinstance(args[0], OnCuda):
            return "cuda"
        if self.cuda_calls and not tensors:
            # a tensor made from nothing inside a torch call given an emulated tensor: torch's C++
            # made it with that tensor's C++ device (F.one_hot's arange, autograd's zero gradients)
            return "cuda"
        return "cpu"

    def _check(self, func, args, kwargs, tensors, target) -> None:
        cuda = [isinstance(t, OnCuda) for t in tensors]
        if func not in _CROSS_DEVICE and any(cuda) and not all(cuda):
            if any(not c and t.dim() > 0 for t, c in zip(tensors, cuda)):
                raise DeviceMismatch(f"{func}: tensors on cuda:0 and cpu ({_describe(tensors)})")
        if func is aten.index.Tensor and any(cuda) and not isinstance(args[0], OnCuda):
            raise DeviceMismatch(f"{func}: a cpu tensor indexed by cuda indices ({_describe(tensors)})")
        if kwargs.get("generator") is not None and self.generator_on is not None:
            wanted = target or ("cuda" if any(cuda) else "cpu")
            if self.generator_on != wanted:
                raise DeviceMismatch(f"{func}: a {self.generator_on} generator draws for a {wanted} tensor")


def _values(t: Any) -> Any:
    return t.elem if isinstance(t, OnCuda) else t


class _PythonSide(torch.overrides.TorchFunctionMode):
    """The Python-level half: what torch decides in C++ before the dispatcher (device strings,
    tensor constructors, moves, numpy) and which generator a draw uses."""

    def __init__(self, dispatch: EmulatedCuda) -> None:
        super().__init__()
        self.dispatch = dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, OnCuda) for t in tree_flatten((args, kwargs))[0]):
            return self._inside_cuda_call(func, args, kwargs)
        return self._with_generator(func, args, kwargs)

    def _inside_cuda_call(self, func, args, kwargs):
        self.dispatch.cuda_calls += 1
        try:
            return self._with_generator(func, args, kwargs)
        finally:
            self.dispatch.cuda_calls -= 1

    def _with_generator(self, func, args, kwargs):
        generator = kwargs.get("generator")
        if generator is None:
            return self._call(func, args, kwargs)
        previous = self.dispatch.generator_on
        self.dispatch.generator_on = "cuda" if id(generator) in self.dispatch.cuda_generators else "cpu"
        try:
            return self._call(func, args, kwargs)
        finally:
            self.dispatch.generator_on = previous

    def _call(self, func, args, kwargs):
        if func is torch.device:  # torch.device("cuda", 0) stays as written
            return func(*args, **kwargs)
        first = args[0] if args else None
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_cuda(kwargs.get("device")):
            if isinstance(first, torch.Tensor) and func is not torch.tensor:
                return first.to(device=CUDA, dtype=kwargs.get("dtype"))
            # torch builds these below the dispatcher's Python modes: build on the CPU, then emulate
            return OnCuda(func(*args, **{**kwargs, "device": CPU}))
        if func in (torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__) and _holds_cuda(first):
            return CUDA if func == torch.Tensor.device.__get__ else True
        if func is torch.Tensor.type_as and isinstance(args[1], OnCuda):
            return first.to(device=CUDA, dtype=args[1].dtype)
        if func is torch.Tensor.cuda:
            return first.to(CUDA, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.to and any(isinstance(a, OnCuda) for a in (*args[1:], kwargs.get("other"))):
            other = kwargs.get("other", args[1] if len(args) > 1 else None)  # .to(other): its C++ device is the CPU
            return first.to(device=CUDA, dtype=other.dtype, non_blocking=kwargs.get("non_blocking", False))
        if func == torch.Tensor.data.__set__ and isinstance(first, OnCuda):
            return self._set_data(first, args[1])
        if isinstance(first, OnCuda):
            handled = self._on_cuda(func, first, args[1:], kwargs)
            if handled is not None:
                return handled
        return func(*(_indexed(a) for a in args), **{k: _indexed(v) for k, v in kwargs.items()})

    @staticmethod
    def _set_data(t: OnCuda, value: torch.Tensor) -> None:
        """``param.data = value`` (a dtype change, say): the wrapper takes the new values too."""
        if not isinstance(value, OnCuda):
            raise DeviceMismatch("the emulation cannot move a cuda tensor to the CPU by assigning its .data")
        torch.Tensor.data.__set__(t, value)
        t.elem = value.elem

    @staticmethod
    def _on_cuda(func, t: OnCuda, args, kwargs) -> Any:
        """Methods of an emulated tensor that torch resolves in C++; None: the dispatcher's."""
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        if func in (torch.Tensor.storage, torch.Tensor.untyped_storage, torch.Tensor.data_ptr, torch.Tensor.tolist):
            return func(t.elem, *args, **kwargs)
        if func is torch.Tensor.cpu:
            return t.elem.clone()
        if func is not torch.Tensor.to:
            return None
        plain = {k: _indexed(v) for k, v in kwargs.items() if k != "copy"}
        device, dtype, _, memory_format = torch._C._nn._parse_to(*(_indexed(a) for a in args), **plain)
        if device is not None and device.type == "cpu":  # a copy to the host
            return t.elem.to(dtype=dtype or t.dtype, memory_format=memory_format or torch.preserve_format, copy=True)
        same = (dtype is None or dtype == t.dtype) and memory_format in (None, torch.preserve_format)
        return t if same and not kwargs.get("copy") else None


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes: the emulated device's memory is the host's."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


class _Stream:
    """What torch's optimizers ask of the current stream."""

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def _one_idle_gpu(mode: EmulatedCuda) -> list[tuple[Any, str, Any]]:
    """(owner, attribute, stand-in) for what is swapped while the emulation runs."""
    real_generator = torch.Generator

    class Generator(real_generator):  # type: ignore[misc, valid-type]
        """A CPU generator, counted as a cuda one when made for cuda."""

        def __new__(cls, device: Any = "cpu") -> Generator:
            generator = real_generator.__new__(cls)
            if _is_cuda(device):
                mode.cuda_generators[id(generator)] = generator
            return generator

        def __init__(self, device: Any = "cpu") -> None:
            super().__init__()

    real_as_subclass = torch.Tensor.as_subclass

    def as_subclass(self: torch.Tensor, cls: type) -> torch.Tensor:
        # torch runs as_subclass below the modes: a subclass view of an emulated tensor views its
        # CPU values (a subclass that keeps the emulated tensor says cuda: _holds_cuda)
        return real_as_subclass(_values(self), cls)

    stream = _Stream()
    cuda_api = {
        "_lazy_init": lambda: None,
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "is_bf16_supported": lambda including_emulation=True: True,
        "get_device_name": lambda device=None: "emulated CUDA (CPU)",
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "get_rng_state_all": lambda: [],
        "set_rng_state_all": lambda states: None,
        "mem_get_info": lambda device=None: _host_memory(),
        "max_memory_allocated": lambda device=None: 0,
        "memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "current_stream": lambda device=None: stream,
        "is_current_stream_capturing": lambda: False,
    }
    accelerator_api = {
        "current_accelerator": lambda check_available=False: torch.device("cuda"),
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device_index": lambda: 0,
        "current_stream": lambda device=None: stream,
    }
    return [
        (torch, "Generator", Generator),
        (torch.Tensor, "as_subclass", as_subclass),
        *((torch.cuda, name, fn) for name, fn in cuda_api.items()),
        *((torch.accelerator, name, fn) for name, fn in accelerator_api.items()),
    ]


@contextlib.contextmanager
def emulated_cuda() -> Iterator[EmulatedCuda]:
    """Run the block as if one GPU were there (see the module docstring); yields the mode, whose
    ``ops`` counts the operations checked."""
    if _Active.mode is not None:
        raise RuntimeError("emulated_cuda is already active in this process")
    mode = EmulatedCuda()
    swaps = _one_idle_gpu(mode)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    swap_params = torch.__future__.get_swap_module_params_on_conversion()
    # Module.to / .cpu swap parameters for their moved copies instead of assigning .data, which
    # cannot turn an emulated tensor into a CPU one
    torch.__future__.set_swap_module_params_on_conversion(True)
    _Active.mode = mode
    try:
        with _PythonSide(mode), mode:
            yield mode
    finally:
        _Active.mode = None
        torch.__future__.set_swap_module_params_on_conversion(swap_params)
        for owner, name, value in saved:
            setattr(owner, name, value)


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


if __name__ == "__main__":
    # the module as imported (not this __main__ copy), so that saved tensors name its OnCuda
    from causalize.testing import emulated_cuda as _module

    raise SystemExit(_module.main())
