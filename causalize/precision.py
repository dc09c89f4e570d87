"""Dtype and device: parsing the user's choice, checking it before any work, and casting a model
the way diffusers does (modules listed in `_keep_in_fp32_modules` stay fp32).

Everything the toolkit creates for a model (conditioning inputs, noise, masks, caches) follows
`model_dtype(model)` and `model_device(model)`, so a bf16 model on a GPU runs end to end.
Imports torch lazily: the CLI parses and checks names before torch is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from causalize.errors import UsageError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

#: The names `--dtype` accepts, with their aliases.
DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}
DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def check_dtype_name(name: str | None) -> str | None:
    """The canonical torch dtype name for a `--dtype` value (None: keep the checkpoint's), checked
    without importing torch."""
    if name is None or name in ("keep", "auto"):
        return None
    canonical = DTYPE_NAMES.get(str(name).lower())
    if canonical is None:
        raise UsageError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPE_CHOICES)}")
    return canonical


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name ('bf16', 'float32', ...) or a dtype; None stays None."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and not value.is_floating_point:
            raise UsageError(f"dtype {value} is not a floating-point type", f"use one of {', '.join(DTYPE_CHOICES)}")
        return value
    canonical = check_dtype_name(value)
    return None if canonical is None else getattr(torch, canonical)


def resolve_device(value: str | torch.device | None, *, default_cuda: bool = False) -> torch.device | None:
    """A device that exists on this machine, or a one-line UsageError before any work.

    None stays None unless `default_cuda` (then CUDA when available, else the CPU)."""
    import torch

    if value is None:
        if not default_cuda:
            return None
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {value!r}: {exc}", "use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {value!r} is not available: this torch has no usable CUDA device", "use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {value!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here",
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"device {value!r} is not available on this machine", "use --device cpu")
    elif device.type not in ("cpu", "meta"):
        raise UsageError(f"device type {device.type!r} is not supported", "use cpu, cuda, cuda:N or mps")
    return device


def check_dtype_on(dtype: torch.dtype | None, device: torch.device | None) -> None:
    """Refuse a dtype the device cannot compute in, with a one-line error, before any work: runs the
    operations every denoiser needs (matmul, conv, group / layer norm, SDPA) on a few elements."""
    import torch
    import torch.nn.functional as F

    if dtype is None or dtype == torch.float32:
        return
    device = device or torch.device("cpu")
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{device} does not support bf16", "use --dtype fp16 or fp32")
    try:
        x = torch.randn(1, 4, 2, 4, 4, device=device).to(dtype)
        F.conv3d(x, torch.randn(4, 4, 1, 3, 3, device=device).to(dtype), padding=(0, 1, 1))
        F.group_norm(x, 2)
        q = x.flatten(2).transpose(1, 2)[:, None]
        F.layer_norm(q, (4,))
        F.scaled_dot_product_attention(q, q, q)
        F.linear(q, torch.randn(4, 4, device=device).to(dtype))
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{name} is not supported on {device} by this torch: {first}", "use --dtype fp32 (or bf16)"
        ) from None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a model on `device`: free CUDA memory, or the host's available RAM
    (MemAvailable); None where it cannot be told."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(nbytes: int, device: torch.device | None, what: str) -> None:
    """Refuse, before any weight is read, a model whose weights alone exceed the memory free on the
    device (one-line UsageError, exit 2)."""
    import torch

    device = device or torch.device("cpu")
    free = available_bytes(device)
    if free is not None and nbytes > free:
        gib = 2**30
        raise UsageError(
            f"{what} needs {nbytes / gib:.1f} GiB for its weights, but only {free / gib:.1f} GiB is free on {device}",
            "use a device with more memory, a smaller --dtype, or `causalize verify --shrink` to check the structure",
        )


def weight_bytes(files: list, stored: torch.dtype | None = None, target: torch.dtype | None = None) -> int:
    """Bytes the weights take once loaded: the safetensors files' sizes, scaled when `target`
    changes the element size (e.g. fp32 files loaded as bf16 take half)."""
    import os

    total = sum(os.path.getsize(f) for f in files)
    if stored is not None and target is not None and stored.itemsize != target.itemsize:
        total = total * target.itemsize // stored.itemsize
    return total


def check_model_fits(md, dtype: torch.dtype | None, device: torch.device | None) -> None:
    """Weights that cannot fit the device are refused before any is read (their size from the
    safetensors headers in the target dtype, else the files' size)."""
    import math

    shapes = md.shapes if dtype is not None else None
    if shapes:
        nbytes = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    else:
        nbytes = weight_bytes(md.weight_files)
    check_fits(nbytes, device, str(md.path))


def checked_precision(torch_dtype, device):
    """The dtype and device, both checked to exist and compute here (one-line errors, before any work)."""
    dtype = parse_dtype(torch_dtype)
    dev = resolve_device(device)
    check_dtype_on(dtype, dev)
    return dtype, dev


def _keep_fp32_patterns(model: nn.Module) -> tuple[str, ...]:
    """Module-name substrings diffusers keeps in fp32 for this model (`_keep_in_fp32_modules`)."""
    import torch.nn as nn

    found: list[str] = []
    for module in model.modules() if isinstance(model, nn.Module) else ():
        patterns = getattr(module, "_keep_in_fp32_modules", None)
        if patterns:
            found.extend([patterns] if isinstance(patterns, str) else list(patterns))
    return tuple(dict.fromkeys(found))


def _kept_fp32(name: str, patterns: tuple[str, ...]) -> bool:
    """Matched by dotted name component, as diffusers' loader does."""
    parts = name.split(".")
    return any(p in parts for p in patterns)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype: the first floating parameter that diffusers does not keep in fp32 (as
    diffusers' own `ModelMixin.dtype`), float32 for a model without floating parameters."""
    import torch

    patterns = _keep_fp32_patterns(model)
    fallback = None
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        fallback = fallback or p.dtype
        if not _kept_fp32(name, patterns):
            return p.dtype
    return fallback or torch.float32


def model_device(model: nn.Module) -> torch.device:
    import torch

    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_precision(
    model: nn.Module, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Move `model` to `device` and cast its floating parameters and buffers to `dtype` in place,
    keeping diffusers' `_keep_in_fp32_modules` in fp32 when casting to half precision. None keeps
    what the model has. Returns the model."""
    import torch

    dtype = parse_dtype(dtype)
    if device is not None:
        model.to(device=torch.device(device))
    if dtype is None:
        return model
    patterns = _keep_fp32_patterns(model) if dtype in (torch.float16, torch.bfloat16) else ()
    for name, module in model.named_modules():
        for key, p in list(module._parameters.items()):
            target = torch.float32 if _kept_fp32(f"{name}.{key}", patterns) else dtype
            if p is not None and p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)
        for key, b in list(module._buffers.items()):
            target = torch.float32 if _kept_fp32(f"{name}.{key}", patterns) else dtype
            if b is not None and b.is_floating_point() and b.dtype != target:
                module._buffers[key] = b.to(target)
    return model


def follow_model(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """A floating tensor cast to the model's dtype and moved to its device; other tensors moved;
    anything else as it is."""
    import torch

    if not torch.is_tensor(value):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def describe(dtype: torch.dtype | None) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


__all__ = [
    "DTYPE_CHOICES",
    "available_bytes",
    "check_dtype_name",
    "check_dtype_on",
    "check_fits",
    "check_model_fits",
    "checked_precision",
    "describe",
    "weight_bytes",
    "follow_model",
    "model_device",
    "model_dtype",
    "parse_dtype",
    "resolve_device",
    "to_precision",
]
