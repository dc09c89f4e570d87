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


_TAKES_MASK: dict[type, bool] = {}  # per processor class


def takes_attention_mask(processor: Any) -> bool:
    """Does `processor.__call__` take the diffusers-standard `attention_mask` (4th argument)?

    Some model processors do not: Kandinsky 5's is `(attn, hidden_states, encoder_hidden_states,
    rotary_emb, sparse_params)`, so a mask passed 4th would land in `rotary_emb`. Wrappers call
    those without it (`call_processor`) and mask inside an SDPA scope instead.
    """
    kind = type(processor)
    if kind not in _TAKES_MASK:
        try:
            params = inspect.signature(processor.__call__).parameters
        except (TypeError, ValueError):
            return True
        _TAKES_MASK[kind] = "attention_mask" in params or any(p.kind is p.VAR_POSITIONAL for p in params.values())
    return _TAKES_MASK[kind]


def call_processor(inner: Any, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
    """Call a wrapped processor with the wrapper-standard arguments; one that takes no
    `attention_mask` (see `takes_attention_mask`) is called without it, which must then be None."""
    if takes_attention_mask(inner):
        return inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
    if attention_mask is not None or args:
        raise TypeError(f"{type(inner).__name__} takes no attention_mask: it cannot be given one")
    return inner(attn, hidden_states, encoder_hidden_states, **kwargs)
