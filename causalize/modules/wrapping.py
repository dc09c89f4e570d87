"""Shared plumbing for processor wrappers."""

from __future__ import annotations

import inspect
from typing import Any


class AdvertisedCall:
    """What `processor.__call__` returns on a wrapper: it calls the wrapper, but reports the
    wrapped processor's signature.

    diffusers' legacy `Attention.forward` (and several model-specific attention classes) keep only
    the keyword arguments named in `inspect.signature(processor.__call__)`; a wrapper whose
    `__call__` takes `*args, **kwargs` would silently lose e.g. Hunyuan's `image_rotary_emb`.
    Calling the processor itself (`processor(...)`) still goes through the class's `__call__`.
    """

    __slots__ = ("owner",)

    def __init__(self, owner: Any):
        self.owner = owner

    def __call__(self, *args, **kwargs):
        return type(self.owner).__call__(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            return inspect.signature(self.owner.inner.__call__)
        except (AttributeError, TypeError, ValueError):
            return inspect.signature(type(self.owner).__call__.__get__(self.owner))
