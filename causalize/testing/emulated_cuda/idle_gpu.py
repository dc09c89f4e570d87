"""What the emulation swaps in while it runs: ``torch.cuda`` / ``torch.accelerator`` answering as
one idle GPU, a ``torch.Generator`` that can be made for cuda, and the libraries' remembered devices
forgotten on the way in and out."""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import torch
import torch.utils._triton

from causalize.testing.emulated_cuda.tensor import CPU, CUDA, check_index, device_arg, is_cuda, values

REAL_GENERATOR = torch.Generator


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes: the emulated device's memory is the host's."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _properties(device: Any = None) -> types.SimpleNamespace:
    """``torch.cuda.get_device_properties``: the host's memory, compute capability 9.0 (the lent
    H100 / H200's), one multiprocessor."""
    device = device_arg(0 if device is None else device)
    if not is_cuda(device):
        raise ValueError(f"Expected a cuda device, but got: {device}")
    check_index(device)
    return types.SimpleNamespace(
        name="emulated CUDA (CPU)",
        major=9,
        minor=0,
        total_memory=_host_memory()[1],
        multi_processor_count=1,
        is_integrated=False,
        is_multi_gpu_board=False,
    )


class _Stream:
    """What torch's optimizers ask of the current stream."""

    def is_capturing(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


class _GeneratorType(type(REAL_GENERATOR)):
    """Generators made before the emulation are generators inside it too."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, REAL_GENERATOR)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, REAL_GENERATOR)


class _Generator(REAL_GENERATOR, metaclass=_GeneratorType):  # type: ignore[misc, valid-type]
    """torch.Generator while the emulation runs: a CPU generator, marked when made for cuda."""

    def __new__(cls, device: Any = "cpu") -> _Generator:
        generator = REAL_GENERATOR.__new__(cls)
        device = device_arg(device)
        check_index(device)
        generator.emulated_cuda = is_cuda(device)
        return generator

    def __init__(self, device: Any = "cpu") -> None:
        super().__init__()

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA if self.emulated_cuda else CPU


def one_idle_gpu() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, stand-in) for what is swapped while the emulation runs."""
    real_as_subclass = torch.Tensor.as_subclass

    def as_subclass(self: torch.Tensor, cls: type) -> torch.Tensor:
        # torch runs as_subclass below the modes: a subclass view of an emulated tensor views its
        # CPU values (a subclass that keeps the emulated tensor says cuda: holds_cuda)
        return real_as_subclass(values(self), cls)

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
        "get_device_properties": _properties,
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
        # triton kernels do not run here: a CUDA build of torch has triton, and would compile for it
        (torch.utils._triton, "has_triton", lambda: False),
    ]


def forget_detected_devices() -> None:
    """Libraries that remember the device they found: accelerate's per-process set-up (made on
    emulated cuda inside, it would claim cuda after) and diffusers' cached device type."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    torch_utils = sys.modules.get("diffusers.utils.torch_utils")
    detect = getattr(getattr(torch_utils, "TorchDeviceBackend", None), "_detect_device_type", None)
    if hasattr(detect, "cache_clear"):
        detect.cache_clear()
