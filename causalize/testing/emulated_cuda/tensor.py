"""The emulated device's tensors and device arguments: :class:`OnCuda` (a cuda:0 tensor whose
values are a CPU tensor) and the small helpers every half of the emulation reads devices with."""

from __future__ import annotations

from typing import Any

import torch

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


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


def indexed(x: Any) -> Any:
    """'cuda' -> cuda:0: torch's C++ would ask the absent CUDA runtime for the current device."""
    if (isinstance(x, str) and x.strip() == "cuda") or (
        isinstance(x, torch.device) and x.type == "cuda" and x.index is None
    ):
        return CUDA
    return x


def is_cuda(device: Any) -> bool:
    return device is not None and torch.device(indexed(device)).type == "cuda"


def holds_cuda(t: Any) -> bool:
    """An emulated tensor, or a tensor subclass that keeps one (causalize's FrameTensor)."""
    if isinstance(t, OnCuda):
        return True
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and any(
        isinstance(v, OnCuda) for v in getattr(t, "__dict__", {}).values()
    )


def describe(tensors: list[torch.Tensor]) -> str:
    return ", ".join(f"{'cuda' if isinstance(t, OnCuda) else 'cpu'} {tuple(t.shape)}" for t in tensors)


def values(t: Any) -> Any:
    return t.elem if isinstance(t, OnCuda) else t


def device_arg(device: Any) -> Any:
    """A device argument: an int is a cuda index (torch's meaning), 'cuda' is cuda:0."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return indexed(device)


def device_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: device_arg(v) if k == "device" else indexed(v) for k, v in kwargs.items()}


def check_index(device: Any) -> None:
    device = torch.device(device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise DeviceMismatch(f"{device} does not exist (the emulation has one GPU)")
