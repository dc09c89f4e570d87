"""Module swaps in place of construction: a module rebuilt as a subclass that keeps its parameter
names, attributes and hooks (the torch.ao `from_float` idea without re-initialising weights).

Shared by every pass that replaces a module by a causal subclass (convolutions, norms)."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.nn as nn

M = TypeVar("M", bound=nn.Module)

# Instance attributes never carried over to a rebuilt module: an instance-level ``forward``
# (accelerate-style patching) would bypass the new class's forward and silently stay non-causal.
_NOT_COPIED = frozenset({"forward", "_old_forward"})


def rebuild_as(module: nn.Module, cls: type[M], parameters: dict[str, torch.Tensor | None]) -> M:
    """A new ``cls`` instance carrying ``module``'s attributes and hooks, with new parameters.

    ``__init__`` is bypassed (like ``copy.copy``), so any subclass works whatever its signature
    and no throwaway random weights are allocated. Container attributes are copied shallowly so
    that later edits to one module (hooks, padding lists) do not reach the other.
    """
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if key in _NOT_COPIED:
            continue
        new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, list, set)) else value
    new.__dict__["_parameters"] = {
        name: None if tensor is None else nn.Parameter(tensor, requires_grad=_requires_grad(module, name))
        for name, tensor in parameters.items()
    }
    return new


def _requires_grad(module: nn.Module, name: str) -> bool:
    param = module._parameters.get(name)
    return bool(param is not None and param.requires_grad)


_SUBCLASS_CACHE: dict[tuple[type, type], type] = {}


def causal_subclass(base: type[M], stock: type, original: type) -> type[M]:
    """``base`` for the stock class, else a cached ``type("Causal"+Name, (base, original), {})``.

    Its instances are instances of both the causal base (so passes recognise them) and the
    user's class (so isinstance checks and methods the original overrides keep working).
    """
    if original is stock or issubclass(original, base):
        return base
    key = (base, original)
    if key not in _SUBCLASS_CACHE:
        name = "Causal" + original.__name__
        attrs = {"__module__": base.__module__, "__qualname__": name}
        _SUBCLASS_CACHE[key] = type(name, (base, original), attrs)
    return _SUBCLASS_CACHE[key]


__all__ = ["causal_subclass", "rebuild_as"]
