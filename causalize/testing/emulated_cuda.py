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

# operations CUDA lets a cuda tensor meet CPU ones in: copies, and indexing with CPU indices (the
# index_put family only for the indices: its values follow the tensor, see EmulatedCuda._check)
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten._local_scalar_dense.default, aten.index.Tensor}
_REAL_GENERATOR = torch.Generator
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
        out = func(*tree_map(_values, args), **tree_map(_values, kwargs))
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
            _check_index(device)
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
                raise DeviceMismatch(f"{func}: tensors on cuda:0 and cpu ({_describe(tensors)})")
        if func is aten.index.Tensor and any(cuda) and not isinstance(args[0], OnCuda):
            raise DeviceMismatch(f"{func}: a cpu tensor indexed by cuda indices ({_describe(tensors)})")
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
            raise DeviceMismatch(f"{func}: values on another device than the tensor ({_describe(tensors)})")
        if not on_cuda and any(isinstance(i, OnCuda) for i in args[1] if i is not None):
            raise DeviceMismatch(f"{func}: a cpu tensor indexed by cuda indices ({_describe(tensors)})")


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments an operation writes into (self of an in-place op, out=)."""
    written = []
    for i, spec in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(spec.name)
        if isinstance(value, torch.Tensor) and spec.alias_info is not None and spec.alias_info.is_write:
            written.append(value)
    return written


def _values(t: Any) -> Any:
    return t.elem if isinstance(t, OnCuda) else t


_BACKWARD = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
_CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)


class _PythonSide(torch.overrides.TorchFunctionMode):
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
        generator = kwargs.get("generator") or next((a for a in args if isinstance(a, _REAL_GENERATOR)), None)
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
        if func in (torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__) and _holds_cuda(first):
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
        return func(*(_indexed(a) for a in args), **_device_kwargs(kwargs))

    @staticmethod
    def _construct(func, data, args, kwargs):
        """torch.tensor & co. build below the dispatcher's Python modes: on the CPU, then emulated."""
        if isinstance(data, torch.Tensor) and func is not torch.tensor and _is_cuda(_device_arg(kwargs.get("device"))):
            return data.to(device=CUDA, dtype=kwargs.get("dtype"))
        data = tree_map(_values, data)  # a list of 0-dim cuda tensors gives a CPU tensor, as on CUDA
        kwargs = _device_kwargs(kwargs)
        if _is_cuda(kwargs.get("device")):
            return OnCuda(func(data, *args, **{**kwargs, "device": CPU}))
        return func(data, *args, **kwargs)

    @staticmethod
    def _to_device(func, t: torch.Tensor, args, kwargs) -> torch.Tensor | None:
        """A CPU tensor's .to / .cuda: 'cuda' or an int is cuda:0, .to(cuda_tensor) is cuda (its
        C++ device is the CPU), and a move that autograd follows goes through _ToDevice."""
        if func is torch.Tensor.cuda:
            device, dtype = _device_arg((args[0] if args else kwargs.get("device")) or CUDA), None
        elif any(isinstance(a, OnCuda) for a in (*args, kwargs.get("other"))):
            other = kwargs.get("other", args[0] if args else None)
            device, dtype = CUDA, other.dtype
        else:
            device, dtype, _ = _parse_to(args, kwargs)
        if device is None or not _is_cuda(device):
            return None
        _check_index(device)
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
            made = torch.tensor(tree_map(_values, args[0]), dtype=kwargs.get("dtype") or t.dtype)
            device = _device_arg(kwargs.get("device"))
            return made if device is not None and not _is_cuda(device) else OnCuda(made)
        if func is torch.Tensor.cuda:
            _check_index(_device_arg((args[0] if args else kwargs.get("device")) or CUDA))
            return t
        if func is torch.Tensor.cpu:
            return _to_host(t, t.dtype)
        if func is not torch.Tensor.to:
            return None
        device, dtype, memory_format = _parse_to(args, kwargs)
        if device is not None and device.type == "cpu":  # a copy to the host
            return _to_host(t, dtype or t.dtype)
        if device is not None:
            _check_index(device)
        same = (dtype is None or dtype == t.dtype) and memory_format in (None, torch.preserve_format)
        return t if same and not kwargs.get("copy") else None


def _parse_to(args, kwargs) -> tuple[torch.device | None, torch.dtype | None, Any]:
    """(device, dtype, memory_format) of a ``Tensor.to`` call, ints and 'cuda' read as cuda:N."""
    plain = {k: _device_arg(v) if k == "device" else v for k, v in kwargs.items() if k != "copy"}
    positional = [_device_arg(a) if isinstance(a, (int, str, torch.device)) else a for a in args]
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
        return OnCuda(_values(grad).to(ctx.dtype)), None


class _ToDevice(torch.autograd.Function):
    """CPU -> cuda that autograd follows: the gradient comes back to the CPU (torch's own move would
    send it with the options of the emulated tensor, whose C++ device is the CPU)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, dtype: torch.dtype) -> OnCuda:
        ctx.dtype = t.dtype
        return OnCuda(t.to(dtype=dtype, copy=True))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _values(grad).to(ctx.dtype), None


def _device_arg(device: Any) -> Any:
    """A device argument: an int is a cuda index (torch's meaning), 'cuda' is cuda:0."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return _indexed(device)


def _device_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: _device_arg(v) if k == "device" else _indexed(v) for k, v in kwargs.items()}


def _check_index(device: Any) -> None:
    device = torch.device(device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise DeviceMismatch(f"{device} does not exist (the emulation has one GPU)")


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


class _GeneratorType(type(_REAL_GENERATOR)):
    """Generators made before the emulation are generators inside it too."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_GENERATOR)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _REAL_GENERATOR)


class _Generator(_REAL_GENERATOR, metaclass=_GeneratorType):  # type: ignore[misc, valid-type]
    """torch.Generator while the emulation runs: a CPU generator, marked when made for cuda."""

    def __new__(cls, device: Any = "cpu") -> _Generator:
        generator = _REAL_GENERATOR.__new__(cls)
        device = _device_arg(device)
        _check_index(device)
        generator.emulated_cuda = _is_cuda(device)
        return generator

    def __init__(self, device: Any = "cpu") -> None:
        super().__init__()

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA if self.emulated_cuda else CPU


def _one_idle_gpu() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, stand-in) for what is swapped while the emulation runs."""
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
        (torch, "Generator", _Generator),
        (torch.Tensor, "as_subclass", as_subclass),
        *((torch.cuda, name, fn) for name, fn in cuda_api.items()),
        *((torch.accelerator, name, fn) for name, fn in accelerator_api.items()),
    ]


@contextlib.contextmanager
def emulated_cuda() -> Iterator[EmulatedCuda]:
    """Run the block as if one GPU were there (see the module docstring); yields the mode, whose
    ``ops`` counts the operations checked. Everything it changes is put back on exit."""
    if _Active.mode is not None:
        raise RuntimeError("emulated_cuda is already active in this process")
    mode = EmulatedCuda()
    swaps = _one_idle_gpu()
    saved = [(owner, name, owner.__dict__.get(name, _INHERITED)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    swap_params = torch.__future__.get_swap_module_params_on_conversion()
    # Module.to / .cpu swap parameters for their moved copies instead of assigning .data, which
    # cannot turn an emulated tensor into a CPU one
    torch.__future__.set_swap_module_params_on_conversion(True)
    _forget_detected_devices()
    _Active.mode = mode
    try:
        with _PythonSide(mode), mode:
            yield mode
    finally:
        _Active.mode = None
        torch.__future__.set_swap_module_params_on_conversion(swap_params)
        for owner, name, value in saved:
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        _forget_detected_devices()


_INHERITED = object()  # an attribute the owner inherits rather than holds


def _forget_detected_devices() -> None:
    """Libraries that remember the device they found: accelerate's per-process set-up (made on
    emulated cuda inside, it would claim cuda after) and diffusers' cached device type."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    torch_utils = sys.modules.get("diffusers.utils.torch_utils")
    detect = getattr(getattr(torch_utils, "TorchDeviceBackend", None), "_detect_device_type", None)
    if hasattr(detect, "cache_clear"):
        detect.cache_clear()


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
    # the module as imported, not this __main__ copy: one OnCuda class and one active-emulation
    # flag for the program it runs and the library code that imports the module
    from causalize.testing import emulated_cuda as _module

    raise SystemExit(_module.main())
