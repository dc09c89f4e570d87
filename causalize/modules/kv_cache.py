"""Key/value caches for causal attention during streaming rollout (METHOD.md §10).

While a streaming rollout runs, the causal attention processors installed by the passes are
wrapped by `StreamingAttnProcessor`. It runs the model's own processor (projections, norms,
RoPE, output projection: its own code) inside an SDPA scope (`KVCacheScope`, the same re-routing
of `F.scaled_dot_product_attention` that serves Mochi's masks), which receives q, k, v of the
current call's tokens and

- prepends the cached keys / values of earlier frames (after the processor's norms and RoPE),
- masks by global frame index: query frame t sees keys of frames <= t (its block), context
  tokens (text, frame id −1) see only context,
- in "write" calls (history prefill / append) appends the new video tokens' keys and values.

Cached history is shared by every batch copy of a call: a call whose batch is m times the cache
batch (both guidance branches batched in one forward) sees the cache tiled m times.
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed
from causalize.modules.block_attention import BlockCausalAttnProcessor, sdpa_scope
from causalize.modules.frame_attention import CausalFrameAttnProcessor
from causalize.modules.wrapping import AdvertisedCall


class KVCache:
    """Keys and values (B, H, L, d) of the history video tokens of one attention module, with
    their frame ids (L,)."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.frame_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)

    def append(self, key: torch.Tensor, value: torch.Tensor, frame_ids: torch.Tensor) -> None:
        if self.key is None:
            self.key, self.value, self.frame_ids = key, value, frame_ids
            return
        if key.shape[0] != self.key.shape[0]:
            raise CausalizeError(f"history written with batch {key.shape[0]}, the cache holds batch {self.key.shape[0]}")
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
        self.frame_ids = torch.cat([self.frame_ids, frame_ids])


def _tiled(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise CausalizeError(f"a call of batch {batch} cannot share a history cache of batch {t.shape[0]}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def _extend_mask(attn_mask: torch.Tensor, history: int) -> torch.Tensor:
    """The call's own (…, L, L) mask with `history` always-allowed key columns in front."""
    shape = (*attn_mask.shape[:-1], history)
    if attn_mask.dtype == torch.bool:
        front = torch.ones(shape, dtype=torch.bool, device=attn_mask.device)
    else:
        front = torch.zeros(shape, dtype=attn_mask.dtype, device=attn_mask.device)
    return torch.cat([front, attn_mask], dim=-1)


class KVCacheScope:
    """One wrapped processor call: handles its self-attention SDPA call (length = len(frame_ids))."""

    def __init__(self, cache: KVCache, frame_ids: torch.Tensor, block_size: int, write: bool):
        self.cache = cache
        self.frame_ids = frame_ids
        self.block_size = block_size
        self.write = write
        self.calls = 0

    def run(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        length = query.shape[-2]
        if key.shape[-2] != length or length != self.frame_ids.numel():
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        if is_causal:
            raise CausalizeError("streaming does not support processors that call SDPA with is_causal=True")
        self.calls += 1
        fid = self.frame_ids.to(query.device)
        keys, values, key_ids = key, value, fid
        history = self.cache.length
        if history:
            keys = torch.cat([_tiled(self.cache.key, key.shape[0]), key], dim=-2)
            values = torch.cat([_tiled(self.cache.value, value.shape[0]), value], dim=-2)
            key_ids = torch.cat([self.cache.frame_ids.to(fid.device), fid])
        allowed = causal_block_allowed(fid, key_ids, self.block_size)
        if attn_mask is None:
            mask = allowed
        else:
            attn_mask = _extend_mask(attn_mask, history) if history else attn_mask
            if attn_mask.dtype == torch.bool:
                mask = attn_mask & allowed
            else:
                mask = attn_mask.masked_fill(~allowed, float("-inf"))
        if self.write:
            video = fid >= 0
            self.cache.append(key[..., video, :], value[..., video, :], fid[video])
        return original(query, keys, values, mask, dropout_p, False, *args, **kwargs)


class StreamingAttnProcessor:
    """Wraps an installed causal processor (CausalFrameAttnProcessor or BlockCausalAttnProcessor):
    outside a streaming call it is that processor; inside one, its inner (the model's own)
    processor runs with the KV cache of this module."""

    def __init__(self, causal: Any, context: Any):
        if not isinstance(causal, (CausalFrameAttnProcessor, BlockCausalAttnProcessor)):
            raise CausalizeError(f"cannot stream through {type(causal).__name__}")
        self.causal = causal
        self.context = context
        self.cache = KVCache()
        self.__call__ = AdvertisedCall(self)

    @property
    def inner(self) -> Any:
        return self.causal.inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        stream = self.context.stream
        if stream is None:
            return self.causal(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        joint = isinstance(self.causal, BlockCausalAttnProcessor) and self.causal.joint
        if encoder_hidden_states is not None and not joint:  # cross-attention: frame-local queries
            return self.causal.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        fid = self._frame_ids(hidden_states, encoder_hidden_states, stream.offset)
        scope = KVCacheScope(self.cache, fid, self.causal.block_size, stream.mode == "write")
        with sdpa_scope(scope):
            out = self.causal.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if scope.calls != 1:
            raise CausalizeError(
                f"{type(self.causal.inner).__name__} made {scope.calls} scaled_dot_product_attention calls over its "
                f"{fid.numel()} tokens; streaming needs exactly one",
                "run the rollout with cache=False (full recomputation) for this model",
            )
        return out

    def _frame_ids(self, hidden_states, encoder_hidden_states, offset: int) -> torch.Tensor:
        if isinstance(self.causal, CausalFrameAttnProcessor):  # the sequence axis is frames
            return torch.arange(hidden_states.shape[1], device=hidden_states.device) + offset
        fid = self.causal._frame_ids(hidden_states, encoder_hidden_states)
        return torch.where(fid >= 0, fid + offset, fid)

    def __repr__(self) -> str:
        return f"StreamingAttnProcessor({self.causal!r})"


__all__ = ["KVCache", "KVCacheScope", "StreamingAttnProcessor"]
