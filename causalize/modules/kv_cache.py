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

A key mask that the model itself hands SDPA (one row for every query, e.g. Allegro's video
key-padding bias) is cached with the keys: the history keys keep the columns they were written
with, as in a full-window call. Processors that call SDPA once per sample (Mochi's loop over the
batch, "sdpa-scope") get one cache per sample (`SampleKVCaches`, `PerSampleKVCacheScope`).
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed, tile_history
from causalize.modules.block_attention import BlockCausalAttnProcessor, sdpa_scope, token_frame_ids
from causalize.modules.frame_attention import CausalFrameAttnProcessor
from causalize.modules.wrapping import AdvertisedCall


class KVCache:
    """Keys and values (B, H, L, d) of the history video tokens of one attention module, with
    their frame ids (L,)."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.frame_ids: torch.Tensor | None = None
        # (…, 1, L): the model's own key-mask columns of the cached keys, or None (all allowed)
        self.mask_columns: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.mask_columns) if t is not None)

    def append(self, key: torch.Tensor, value: torch.Tensor, frame_ids: torch.Tensor,
               mask_columns: torch.Tensor | None = None) -> None:
        history = self.length
        if self.key is None:
            self.key, self.value, self.frame_ids = key, value, frame_ids
        else:
            if key.shape[0] != self.key.shape[0]:
                raise CausalizeError(f"history written with batch {key.shape[0]}, the cache holds batch {self.key.shape[0]}")
            self.key = torch.cat([self.key, key], dim=-2)
            self.value = torch.cat([self.value, value], dim=-2)
            self.frame_ids = torch.cat([self.frame_ids, frame_ids])
        if mask_columns is None and self.mask_columns is None:
            return
        # one side without a mask: its columns are "allowed" (what no mask means)
        old = self.mask_columns if self.mask_columns is not None else _allowed_columns(mask_columns, history)
        new = mask_columns if mask_columns is not None else _allowed_columns(old, key.shape[-2])
        old, new = _same_kind(old, new)
        lead = torch.broadcast_shapes(old.shape[:-1], new.shape[:-1])
        self.mask_columns = torch.cat([old.expand(*lead, old.shape[-1]), new.expand(*lead, new.shape[-1])], dim=-1)


def _allowed_columns(like: torch.Tensor, n: int) -> torch.Tensor:
    """n key columns that mask nothing, shaped and typed like the key mask `like` (…, 1, ·)."""
    shape = (*like.shape[:-1], n)
    if like.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two masks in one convention: both boolean, or both additive (a boolean one becomes 0 / −inf)."""
    if a.dtype == b.dtype:
        return a, b
    if a.dtype == torch.bool:
        return _as_additive(a, b.dtype), b
    if b.dtype == torch.bool:
        return a, _as_additive(b, a.dtype)
    return a, b.to(a.dtype)


def _key_mask_columns(attn_mask: torch.Tensor | None, key_length: int) -> bool:
    """Is `attn_mask` a pure key mask (one row shared by every query) over the call's keys?"""
    return attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == 1 and attn_mask.shape[-1] == key_length


def _extend_mask(attn_mask: torch.Tensor, history: int) -> torch.Tensor:
    """The call's own (…, L, L) mask with `history` always-allowed key columns in front."""
    shape = (*attn_mask.shape[:-1], history)
    if attn_mask.dtype == torch.bool:
        front = torch.ones(shape, dtype=torch.bool, device=attn_mask.device)
    else:
        front = torch.zeros(shape, dtype=attn_mask.dtype, device=attn_mask.device)
    return torch.cat([front, attn_mask], dim=-1)


def _with_history_columns(attn_mask: torch.Tensor, cached: torch.Tensor, batch: int) -> torch.Tensor:
    """The call's mask (…, 1 or Lq, L) with the cached keys' own columns (…, 1, H) in front."""
    if cached.shape[0] != 1:
        cached = tile_history(cached, batch)
    cached, attn_mask = _same_kind(cached, attn_mask)
    lead = torch.broadcast_shapes(cached.shape[:-1], attn_mask.shape[:-1])
    return torch.cat([cached.expand(*lead, cached.shape[-1]), attn_mask.expand(*lead, attn_mask.shape[-1])], dim=-1)


def attend_with_cache(original, cache: KVCache, fid: torch.Tensor, block_size: int, write: bool,
                      query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
    """One self-attention SDPA call of tokens with frame ids `fid` against the cached history:
    [cache ; own] keys, masked by global frame index (and by the call's own mask, whose key columns
    the cached keys keep when it is a key mask); in write calls the video tokens are appended."""
    if is_causal:
        raise CausalizeError("streaming does not support processors that call SDPA with is_causal=True")
    fid = fid.to(query.device)
    keys, values, key_ids = key, value, fid
    history = cache.length
    if history:
        keys = torch.cat([tile_history(cache.key, key.shape[0]), key], dim=-2)
        values = torch.cat([tile_history(cache.value, value.shape[0]), value], dim=-2)
        key_ids = torch.cat([cache.frame_ids.to(fid.device), fid])
    allowed = causal_block_allowed(fid, key_ids, block_size)
    key_mask = _key_mask_columns(attn_mask, key.shape[-2])
    video = fid >= 0
    if attn_mask is None and cache.mask_columns is None:
        mask = allowed
    else:
        if attn_mask is None:  # the history keys carry a mask, this call none: its keys are all allowed
            attn_mask = _allowed_columns(cache.mask_columns, key.shape[-2])
            key_mask = True
        own = attn_mask
        if history:
            if cache.mask_columns is not None:
                attn_mask = _with_history_columns(attn_mask, cache.mask_columns, query.shape[0])
            else:
                attn_mask = _extend_mask(attn_mask, history)
        if attn_mask.dtype == torch.bool:
            mask = attn_mask & allowed
        else:
            mask = attn_mask.masked_fill(~allowed, float("-inf"))
        attn_mask = own
    if write:
        columns = attn_mask[..., video] if key_mask else None
        cache.append(key[..., video, :], value[..., video, :], fid[video], columns)
    return original(query, keys, values, mask, dropout_p, False, *args, **kwargs)


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
        self.calls += 1
        return attend_with_cache(original, self.cache, self.frame_ids, self.block_size, self.write,
                                 query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)


class SampleKVCaches:
    """One KVCache per sample, for processors that call SDPA once per sample (Mochi). Sample i of
    a call reads cache i mod (cached samples): the same tiling as a batched cache."""

    def __init__(self) -> None:
        self.samples: list[KVCache] = []

    @property
    def length(self) -> int:
        return self.samples[0].length if self.samples else 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.samples)

    def prepare_write(self, batch: int) -> None:
        """Before a write call of `batch` samples: one cache per sample (the batch must not change)."""
        if self.length and len(self.samples) != batch:
            raise CausalizeError(f"history written with batch {batch}, the cache holds batch {len(self.samples)}")
        while len(self.samples) < batch:
            self.samples.append(KVCache())

    def for_sample(self, index: int, write: bool) -> KVCache:
        if write:
            if index >= len(self.samples):
                raise CausalizeError(f"self-attention call {index + 1} of a write call of batch {len(self.samples)}")
            return self.samples[index]
        if not self.samples:
            return KVCache()
        return self.samples[index % len(self.samples)]


class PerSampleKVCacheScope:
    """One wrapped processor call of a per-sample SDPA loop: the k-th self-attention call is sample
    k's, of joint length T·P + that sample's context (at `position`); each gets its own frame ids
    and its sample's cache."""

    def __init__(self, caches: SampleKVCaches, grid: Any, position: str, offset: int, block_size: int, write: bool):
        self.caches = caches
        self.grid = grid
        self.position = position
        self.offset = offset
        self.block_size = block_size
        self.write = write
        self.calls = 0

    def run(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        length = query.shape[-2]
        if key.shape[-2] != length or length < self.grid.video_tokens:
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        context_len = length - self.grid.video_tokens
        if context_len and self.position == "none":
            raise CausalizeError(f"an attention call of {length} tokens does not fit {self.grid.frames} frames x "
                                 f"{self.grid.per_frame} tokens")
        fid = token_frame_ids(self.grid, context_len, self.position, query.device)
        fid = torch.where(fid >= 0, fid + self.offset, fid)
        cache = self.caches.for_sample(self.calls, self.write)
        self.calls += 1
        return attend_with_cache(original, cache, fid, self.block_size, self.write,
                                 query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)


class StreamingAttnProcessor:
    """Wraps an installed causal processor (CausalFrameAttnProcessor or BlockCausalAttnProcessor):
    outside a streaming call it is that processor; inside one, its inner (the model's own)
    processor runs with the KV cache of this module."""

    def __init__(self, causal: Any, context: Any):
        if not isinstance(causal, (CausalFrameAttnProcessor, BlockCausalAttnProcessor)):
            raise CausalizeError(f"cannot stream through {type(causal).__name__}")
        self.causal = causal
        self.context = context
        self.per_sample = isinstance(causal, BlockCausalAttnProcessor) and causal.mask_format == "sdpa-scope"
        self.cache = SampleKVCaches() if self.per_sample else KVCache()
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
        if self.per_sample:
            return self._per_sample(stream, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
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

    def _per_sample(self, stream, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        """A processor that loops over the batch and calls SDPA once per sample (sdpa-scope)."""
        grid = self.context.current()
        if stream.mode == "write":
            self.cache.prepare_write(hidden_states.shape[0])
        scope = PerSampleKVCacheScope(self.cache, grid, self.causal.position, stream.offset, self.causal.block_size,
                                      stream.mode == "write")
        with sdpa_scope(scope):
            out = self.causal.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if scope.calls != hidden_states.shape[0]:
            raise CausalizeError(
                f"{type(self.causal.inner).__name__} made {scope.calls} self-attention scaled_dot_product_attention "
                f"calls for a batch of {hidden_states.shape[0]}; per-sample streaming needs one per sample",
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


__all__ = ["KVCache", "KVCacheScope", "PerSampleKVCacheScope", "SampleKVCaches", "StreamingAttnProcessor", "attend_with_cache"]
