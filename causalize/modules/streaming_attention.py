"""The streaming attention processors: they wrap a converted model's causal attention processors
during a streaming rollout and route its SDPA calls through the KV caches (causalize.modules.kv_cache)
— one cache per module (`KVCacheScope`), or one per sample for processors that loop over the
batch (`SampleKVCaches`, `PerSampleKVCacheScope`). Inert outside a rollout (METHOD.md §10)."""

from __future__ import annotations

from typing import Any

import torch

from causalize.errors import CausalizeError
from causalize.modules.block_attention import BlockCausalAttnProcessor, sdpa_scope
from causalize.modules.frame_attention import CausalFrameAttnProcessor
from causalize.modules.kv_cache import CallTokens, KVCache, attend_with_cache, frame_tokens, grid_tokens
from causalize.modules.wrapping import AdvertisedCall, call_processor


class KVCacheScope:
    """One wrapped processor call: handles its self-attention SDPA call (length = call.length)."""

    def __init__(self, cache: KVCache, call: CallTokens | torch.Tensor, block_size: int, write: bool):
        self.cache = cache
        self.call = call if isinstance(call, CallTokens) else CallTokens.from_ids(call)
        self.block_size = block_size
        self.write = write
        self.calls = 0

    @property
    def frame_ids(self) -> torch.Tensor:
        return self.call.ids

    def run(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        length = query.shape[-2]
        if key.shape[-2] != length or length != self.call.length:
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        self.calls += 1
        return attend_with_cache(
            original,
            self.cache,
            self.call,
            self.block_size,
            self.write,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            *args,
            **kwargs,
        )


class SampleKVCaches:
    """One KVCache per sample, for processors that call SDPA once per sample (Mochi). Sample i of
    a call reads cache i mod (cached samples): the same tiling as a batched cache."""

    def __init__(self) -> None:
        self.samples: list[KVCache] = []

    @property
    def length(self) -> int:
        return self.samples[0].length if self.samples else 0

    @property
    def mask_columns(self) -> torch.Tensor | None:
        return self.samples[0].mask_columns if self.samples else None

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.samples)

    def reset(self) -> None:
        """Forget the history, keep every sample's buffers."""
        for c in self.samples:
            c.reset()

    def evict(self, first: int, stop: int) -> int:
        """Drop frames first .. stop−1 from every sample's cache (KVCache.evict)."""
        return sum(c.evict(first, stop) for c in self.samples)

    def prepare_write(self, batch: int) -> None:
        """Before a write call of `batch` samples: one cache per sample (the batch must not change)."""
        if self.length and len(self.samples) != batch:
            raise CausalizeError(f"history written with batch {batch}, the cache holds batch {len(self.samples)}")
        del self.samples[batch:]  # a new window of fewer samples (emptied caches only)
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
            raise CausalizeError(
                f"an attention call of {length} tokens does not fit {self.grid.frames} frames x "
                f"{self.grid.per_frame} tokens"
            )
        call = grid_tokens(self.grid, context_len, self.position, self.offset, query.device)
        cache = self.caches.for_sample(self.calls, self.write)
        self.calls += 1
        return attend_with_cache(
            original,
            cache,
            call,
            self.block_size,
            self.write,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            *args,
            **kwargs,
        )


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
            return call_processor(
                self.causal.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if self.per_sample:
            return self._per_sample(stream, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        call = self._tokens(hidden_states, encoder_hidden_states, stream.offset)
        scope = KVCacheScope(self.cache, call, self.causal.block_size, stream.mode == "write")
        with sdpa_scope(scope):
            out = call_processor(
                self.causal.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if scope.calls != 1:
            raise CausalizeError(
                f"{type(self.causal.inner).__name__} made {scope.calls} scaled_dot_product_attention calls over its "
                f"{call.length} tokens; streaming needs exactly one",
                "run the rollout with cache=False (full recomputation) for this model",
            )
        return out

    def _per_sample(self, stream, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        """A processor that loops over the batch and calls SDPA once per sample (sdpa-scope)."""
        grid = self.context.current()
        if stream.mode == "write":
            self.cache.prepare_write(hidden_states.shape[0])
        scope = PerSampleKVCacheScope(
            self.cache, grid, self.causal.position, stream.offset, self.causal.block_size, stream.mode == "write"
        )
        with sdpa_scope(scope):
            out = call_processor(
                self.causal.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if scope.calls != hidden_states.shape[0]:
            raise CausalizeError(
                f"{type(self.causal.inner).__name__} made {scope.calls} self-attention scaled_dot_product_attention "
                f"calls for a batch of {hidden_states.shape[0]}; per-sample streaming needs one per sample",
                "run the rollout with cache=False (full recomputation) for this model",
            )
        return out

    def _tokens(self, hidden_states, encoder_hidden_states, offset: int) -> CallTokens:
        """The call's tokens, built once per (grid, lengths, offset) and shared by the layers."""
        if isinstance(self.causal, CausalFrameAttnProcessor):  # the sequence axis is frames
            return frame_tokens(hidden_states.shape[1], offset, hidden_states.device)
        grid = self.context.current()
        length = hidden_states.shape[1]
        if self.causal.joint and encoder_hidden_states is not None:
            length += encoder_hidden_states.shape[1]
        context_len = length - grid.video_tokens
        position = self.causal.position
        if context_len < 0 or (context_len > 0 and position == "none"):
            raise CausalizeError(
                f"attention sequence of {length} tokens does not fit {grid.frames} frames x {grid.per_frame} tokens"
                + ("" if position == "none" else f" + {position} context"),
                "the plan's token layout is wrong for this model: fix its `tokens` function",
            )
        return grid_tokens(grid, context_len, position, offset, hidden_states.device)

    def __repr__(self) -> str:
        return f"StreamingAttnProcessor({self.causal!r})"


__all__ = ["KVCacheScope", "PerSampleKVCacheScope", "SampleKVCaches", "StreamingAttnProcessor"]
