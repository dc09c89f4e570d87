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

Cost per denoising step (the hot path: S calls per generated frame against a fixed history):

- the cache is a preallocated buffer (`KVCache`): a call writes its own keys right after the
  history and attends over a view of the buffer, so the history is never copied per call;
- a call of m·b samples against a cache of batch b (guidance) runs as m SDPA calls of b samples
  on the same buffer instead of tiling the history m times (memory stays that of one cache);
- every history key precedes every frame of the call, so the block-causal mask depends only on
  the call's token layout and the history length: none at all when the call is one frame block
  without context tokens (the current frame of a DiT without joint text: SDPA without a mask
  gives exactly what the all-True mask gave), otherwise built once per (layout, history length)
  and reused (`_structure`);
- writes over several frames (the prefill) go through the project's block-causal execution
  (`attention_exec`: chunked SDPA or compiled flex where selected, no (Lq, Lk) mask); where that
  selection is the dense mask (CPU, short sequences) the mask path above runs, unchanged;
- the call's frame ids and token layout are built once per (grid, offset) (`CallTokens`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed
from causalize.modules import attention_exec
from causalize.modules.block_attention import token_frame_ids

GROWTH = 1.5  # capacity growth factor when a write or a call does not fit


@dataclass(frozen=True, eq=False)
class CallTokens:
    """The tokens of one self-attention SDPA call as the cache needs them: frame ids on the device
    (−1 for context) and, as Python numbers so that no call waits on the device, where the video
    tokens sit (one contiguous run), the frames they span and the global index of the first.

    `layout` identifies the id pattern up to the global offset (None: not reusable), the key
    under which masks built for it are reused."""

    ids: torch.Tensor
    video_start: int
    video_len: int
    frames: int
    first_frame: int
    layout: tuple | None = None

    @property
    def length(self) -> int:
        return self.ids.numel()

    @property
    def context(self) -> int:
        return self.length - self.video_len

    @property
    def per_frame(self) -> int:
        return self.video_len // self.frames if self.frames else 0

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> CallTokens:
        """From bare frame ids (reads them back: for callers outside a stream's hot path). The video
        tokens must be one contiguous run of consecutive, non-decreasing frames."""
        video = (ids >= 0).nonzero().flatten().tolist()
        if not video:
            return cls(ids, 0, 0, 0, 0)
        start, stop = video[0], video[-1] + 1
        frames = ids[start:stop]
        if len(video) != stop - start or bool((frames.diff() < 0).any()):
            raise CausalizeError("streaming attention needs the video tokens of a call in one run, frame-major")
        first, last = int(frames[0]), int(frames[-1])
        return cls(ids, start, stop - start, last - first + 1, first)


def grid_tokens(grid: Any, context_len: int, position: str, offset: int, device) -> CallTokens:
    """The tokens of a call over `grid` (frame-major) with `context_len` context tokens at
    `position`, its first frame at global index `offset` (built once per pattern, shared)."""
    memo_key = ("grid", grid.frames, grid.per_frame, grid.leading_context, context_len, position, offset, str(device))
    call = _TOKENS.get(memo_key)
    if call is None:
        ids = token_frame_ids(grid, context_len, position, device)
        ids = torch.where(ids >= 0, ids + offset, ids)
        start = grid.context_split(context_len, position)[0]
        layout = (ids.numel(), start, grid.video_tokens, grid.frames)
        call = _TOKENS.put(memo_key, CallTokens(ids, start, grid.video_tokens, grid.frames, offset, layout))
    return call


def frame_tokens(frames: int, offset: int, device) -> CallTokens:
    """The tokens of a call whose sequence axis is frames (temporal attention: one token a frame)."""
    memo_key = ("frames", frames, offset, str(device))
    call = _TOKENS.get(memo_key)
    if call is None:
        ids = torch.arange(frames, device=device) + offset
        call = _TOKENS.put(memo_key, CallTokens(ids, 0, frames, frames, offset, (frames, 0, frames, frames)))
    return call


class _Memo:
    """A small least-recently-used map (frame ids, masks) shared by every layer of every model:
    the layers of one forward make the same calls. `budget`: the most tensor elements it holds
    (an entry larger than that is built per call)."""

    def __init__(self, entries: int, budget: int | None = None):
        self.entries = entries
        self.budget = budget
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value):
        if self.budget is not None and value.numel() > self.budget:
            return value
        self.items[key] = value
        while len(self.items) > self.entries or (self.budget is not None and self._held() > self.budget):
            self.items.popitem(last=False)
        return value

    def _held(self) -> int:
        return sum(v.numel() for v in self.items.values())

    def clear(self) -> None:
        self.items.clear()


_TOKENS = _Memo(64)
_STRUCTURES = _Memo(8, budget=1 << 27)  # block-causal masks: at most 128 M entries (128 MiB as bool)


def _sees_every_key(call: CallTokens, block_size: int) -> bool:
    """A call of one frame block without context tokens: every key (history, own) is visible."""
    if not call.frames or call.context:
        return False
    return call.first_frame // block_size == (call.first_frame + call.frames - 1) // block_size


def _structure(call: CallTokens, history: int, block_size: int) -> torch.Tensor | None:
    """The block-causal mask (Lq, history + Lq) of a call over [history ; own] keys, or None when
    every key is allowed. The cached frames precede every frame of the call, so every video row
    sees all of them and context rows none: the mask depends on the call's layout and the history
    length only. A call of one frame block without context allows every key."""
    if _sees_every_key(call, block_size):
        return None
    key = None
    if call.layout is not None:
        key = (call.layout, history, block_size, call.first_frame % block_size, str(call.ids.device))
        mask = _STRUCTURES.get(key)
        if mask is not None:
            return mask
    own = causal_block_allowed(call.ids, call.ids, block_size)
    if history:
        past = (call.ids >= 0)[:, None].expand(call.length, history)
        own = torch.cat([past, own], dim=1)
    return own if key is None else _STRUCTURES.put(key, own)


class KVCache:
    """Keys and values (B, H, L, d) of the history video tokens of one attention module, with their
    frame ids (L,) and, when the model hands SDPA a key mask, its columns (…, 1, L).

    The storage is preallocated (capacity grows by `GROWTH` when a write does not fit, and is kept
    across `reset`), written in place; `key`, `value`, `frame_ids` and `mask_columns` are views of
    the first `length` entries. Buffers take the dtype and device of the keys written."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._columns: torch.Tensor | None = None  # allocated when a key mask first arrives
        self._has_columns = False
        self._hint = 0
        self.length = 0
        self.next_frame = 0  # global index after the last cached frame
        # (first frame, frames, tokens per frame) of every write, naming the cached frame ids
        # without reading them back; None once entries of unknown layout were appended
        self.signature: tuple | None = ()

    # --- views ---------------------------------------------------------------------------------

    @property
    def key(self) -> torch.Tensor | None:
        return self._key.narrow(-2, 0, self.length) if self.length else None

    @property
    def value(self) -> torch.Tensor | None:
        return self._value.narrow(-2, 0, self.length) if self.length else None

    @property
    def frame_ids(self) -> torch.Tensor | None:
        return self._ids.narrow(0, 0, self.length) if self.length else None

    @property
    def mask_columns(self) -> torch.Tensor | None:
        """(…, 1, length): the model's own key-mask columns of the cached keys, or None (all allowed)."""
        return self._columns.narrow(-1, 0, self.length) if self.length and self._has_columns else None

    @property
    def capacity(self) -> int:
        return 0 if self._key is None else self._key.shape[-2]

    @property
    def batch(self) -> int | None:
        """The batch the history was written with (None while empty)."""
        return self._key.shape[0] if self.length else None

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated capacity, not only the cached length)."""
        held = (self._key, self._value, self._ids, self._columns)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # --- writing -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the history, keep the buffers (the next window has the same shapes)."""
        self.length = 0
        self.next_frame = 0
        self.signature = ()
        self._has_columns = False

    def evict(self, first: int, stop: int) -> int:
        """Drop the entries of frames first .. stop−1 (a rolling cache: the frames between the sink
        and the window), moving the later ones down in place; returns the entries dropped. Entries
        are in frame order, so the dropped ones are one run."""
        if not self.length or stop <= first:
            return 0
        ids = self.frame_ids
        before = int((ids < first).sum())
        after = int((ids >= stop).sum())
        start, n = self.length - after, after
        dropped = start - before
        if dropped <= 0:
            return 0
        for buffer, axis in ((self._key, -2), (self._value, -2), (self._ids, 0)):
            buffer.narrow(axis, before, n).copy_(buffer.narrow(axis, start, n).clone())
        if self._has_columns:
            self._columns.narrow(-1, before, n).copy_(self._columns.narrow(-1, start, n).clone())
        self.length = before + n
        self.signature = None  # the kept frames no longer follow the writes' pattern
        return dropped

    def reserve(self, tokens: int) -> None:
        """Capacity for at least `tokens` entries (now, or at the first write)."""
        self._hint = max(self._hint, tokens)
        if self._key is not None and tokens > self.capacity:
            self._grow(tokens)

    def append(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        frame_ids: torch.Tensor,
        mask_columns: torch.Tensor | None = None,
        headroom: int = 0,
    ) -> None:
        """Add m entries: key (B, …, m, d), value (B, …, m, d_v), frame_ids (m,), the model's key-mask
        columns (…, 1, m) or None (allowed). `headroom`: entries to keep free after them when the
        buffers must grow (the next call's own tokens)."""
        self.signature = None
        self._append(key, value, frame_ids, mask_columns, headroom)

    def _append(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        frame_ids: torch.Tensor,
        mask_columns: torch.Tensor | None,
        headroom: int,
    ) -> None:
        self._check_batch(key)
        n, m = self.length, key.shape[-2]
        self._prepare(key, value, n + m, headroom)
        self._key.narrow(-2, n, m).copy_(key.detach())
        self._value.narrow(-2, n, m).copy_(value.detach())
        self._advance(frame_ids, mask_columns)

    def _check_batch(self, key: torch.Tensor) -> None:
        if self.length and key.shape[0] != self._key.shape[0]:
            raise CausalizeError(
                f"history written with batch {key.shape[0]}, the cache holds batch {self._key.shape[0]}"
            )

    def _advance(self, frame_ids: torch.Tensor, mask_columns: torch.Tensor | None) -> None:
        """Commit m entries whose keys and values are already in place at [length, length + m)."""
        n, m = self.length, frame_ids.numel()
        self._ids.narrow(0, n, m).copy_(frame_ids)
        self._write_columns(mask_columns, n, m)
        self.length = n + m

    def _prepare(self, key: torch.Tensor, value: torch.Tensor, need: int, headroom: int) -> None:
        """Buffers shaped, typed and placed like key / value with room for `need` entries."""
        if self._key is None or not (_fits(self._key, key) and _fits(self._value, value)):
            if self.length:
                if (
                    self._key.shape[:-2] != key.shape[:-2]
                    or self._key.shape[-1] != key.shape[-1]
                    or self._value.shape[:-2] != value.shape[:-2]
                    or self._value.shape[-1] != value.shape[-1]
                ):
                    raise CausalizeError(f"keys of shape {tuple(key.shape)} for a cache of {tuple(self.key.shape)}")
                # the same history in another dtype / on another device: moved, not dropped
                self._key = self._key.to(device=key.device, dtype=key.dtype)
                self._value = self._value.to(device=value.device, dtype=value.dtype)
                self._ids = self._ids.to(key.device)
                if self._columns is not None:
                    self._columns = self._columns.to(key.device)
            else:
                capacity = max(need + headroom, self._hint, self.capacity if self._key is not None else 0)
                self._allocate(key, value, capacity)
                return
        if need > self.capacity:
            self._grow(max(need + headroom, math.ceil(self.capacity * GROWTH)))

    def _allocate(self, key: torch.Tensor, value: torch.Tensor, capacity: int) -> None:
        self._key = key.new_empty((*key.shape[:-2], capacity, key.shape[-1]))
        self._value = value.new_empty((*value.shape[:-2], capacity, value.shape[-1]))
        self._ids = torch.empty(capacity, dtype=torch.long, device=key.device)
        self._columns = None
        self._has_columns = False

    def _grow(self, capacity: int) -> None:
        """Larger buffers holding the same first `length` entries."""
        n = self.length
        key = self._key.new_empty((*self._key.shape[:-2], capacity, self._key.shape[-1]))
        value = self._value.new_empty((*self._value.shape[:-2], capacity, self._value.shape[-1]))
        ids = self._ids.new_empty(capacity)
        key.narrow(-2, 0, n).copy_(self._key.narrow(-2, 0, n))
        value.narrow(-2, 0, n).copy_(self._value.narrow(-2, 0, n))
        ids.narrow(0, 0, n).copy_(self._ids.narrow(0, 0, n))
        self._key, self._value, self._ids = key, value, ids
        if self._columns is not None:
            columns = self._columns.new_empty((*self._columns.shape[:-1], capacity))
            columns.narrow(-1, 0, n).copy_(self._columns.narrow(-1, 0, n))
            self._columns = columns

    def _write_columns(self, columns: torch.Tensor | None, n: int, m: int) -> None:
        """Mask columns [n, n + m): `columns`, or "allowed" when None; a cache without any stays None.
        The first columns make the earlier ones "allowed" (what no mask means); columns of the
        other kind (bool / additive) convert the stored ones to the additive convention."""
        if columns is None and not self._has_columns:
            return
        if columns is None:
            target = self._columns.narrow(-1, n, m)
            target.fill_(True if target.dtype == torch.bool else 0)
            return
        if not self._has_columns:
            if not (
                self._columns is not None
                and self._columns.shape[:-1] == columns.shape[:-1]
                and self._columns.dtype == columns.dtype
                and self._columns.device == columns.device
            ):
                self._columns = columns.new_empty((*columns.shape[:-1], self.capacity))
            front = self._columns.narrow(-1, 0, n)
            front.fill_(True if columns.dtype == torch.bool else 0)
            self._has_columns = True
        stored, columns = _same_kind(self._columns, columns)
        lead = torch.broadcast_shapes(stored.shape[:-1], columns.shape[:-1])
        if stored is not self._columns or lead != stored.shape[:-1]:
            widened = stored.new_empty((*lead, self.capacity))
            widened.narrow(-1, 0, n).copy_(stored.narrow(-1, 0, n).expand(*lead, n))
            stored = widened
        self._columns = stored
        self._columns.narrow(-1, n, m).copy_(columns.expand(*lead, m))

    # --- attending -----------------------------------------------------------------------------

    def joined(
        self, key: torch.Tensor, value: torch.Tensor, headroom: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """[history ; key] and [history ; value] along the sequence axis, for keys of the cache's
        batch. Without gradients the call's keys are written right after the history and the
        result is a view of the buffers (no copy of the history); the flag says so."""
        n = self.length
        if not n:
            return key, value, False
        self._check_batch(key)
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            return torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2), False
        m = key.shape[-2]
        self._prepare(key, value, n + m, headroom)
        self._key.narrow(-2, n, m).copy_(key)
        self._value.narrow(-2, n, m).copy_(value)
        return self._key.narrow(-2, 0, n + m), self._value.narrow(-2, 0, n + m), True

    def joined_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[history ids ; ids], written after the history like `joined` writes keys (call it after
        an in-place `joined` of the same call)."""
        n, m = self.length, ids.numel()
        self._ids.narrow(0, n, m).copy_(ids)
        return self._ids.narrow(0, 0, n + m)

    def _record(self, call: CallTokens) -> None:
        """After a write of `call`'s video tokens."""
        self.next_frame = call.first_frame + call.frames
        if self.signature is not None:
            self.signature = (*self.signature, (call.first_frame, call.frames, call.per_frame))

    def layout_key(self, call: CallTokens) -> tuple | None:
        """A name for the frame ids of [history ; call] (the block-causal executor caches its layout
        under it), or None when they are not known without reading them."""
        if call.layout is None or self.signature is None:
            return None
        return ("causalize.kv_cache", call.layout, call.first_frame, self.signature)


def _fits(buffer: torch.Tensor, t: torch.Tensor) -> bool:
    """Can `buffer` hold entries of `t` (same shape apart from the sequence axis, dtype, device)?"""
    return (
        buffer.shape[:-2] == t.shape[:-2]
        and buffer.shape[-1] == t.shape[-1]
        and buffer.dtype == t.dtype
        and buffer.device == t.device
    )


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
    return (
        attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == 1 and attn_mask.shape[-1] == key_length
    )


def _extend_mask(attn_mask: torch.Tensor, history: int) -> torch.Tensor:
    """The call's own (…, L, L) mask with `history` always-allowed key columns in front."""
    shape = (*attn_mask.shape[:-1], history)
    if attn_mask.dtype == torch.bool:
        front = torch.ones(shape, dtype=torch.bool, device=attn_mask.device)
    else:
        front = torch.zeros(shape, dtype=attn_mask.dtype, device=attn_mask.device)
    return torch.cat([front, attn_mask], dim=-1)


def _with_history_columns(attn_mask: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """The call's mask (…, 1 or Lq, L) with the cached keys' own columns (…, 1, H) in front
    (both of the cache's batch, or broadcast)."""
    cached, attn_mask = _same_kind(cached, attn_mask)
    lead = torch.broadcast_shapes(cached.shape[:-1], attn_mask.shape[:-1])
    return torch.cat([cached.expand(*lead, cached.shape[-1]), attn_mask.expand(*lead, attn_mask.shape[-1])], dim=-1)


def _model_mask(
    attn_mask: torch.Tensor | None, cached: torch.Tensor | None, history: int, own_length: int
) -> torch.Tensor | None:
    """The model's own masking over [history ; own] keys: the call's mask and the cached keys'
    mask columns (None when neither masks anything)."""
    if attn_mask is None and cached is None:
        return None
    if attn_mask is None:  # the history keys carry a mask, this call none: its keys are all allowed
        attn_mask = _allowed_columns(cached, own_length)
    if history:
        attn_mask = _with_history_columns(attn_mask, cached) if cached is not None else _extend_mask(attn_mask, history)
    return attn_mask


def _with_structure(mask: torch.Tensor | None, structure: torch.Tensor | None) -> torch.Tensor | None:
    """A model mask with the block-causal structure applied (bool AND, or −inf where not allowed)."""
    if structure is None or mask is None:
        return structure if mask is None else mask
    if mask.dtype == torch.bool:
        return mask & structure
    return mask.masked_fill(~structure, float("-inf"))


def _batch_rows(attn_mask: torch.Tensor | None, rows: slice, batch: int, ndim: int) -> torch.Tensor | None:
    """The part of the call's mask for the samples `rows` (masks without a batch axis are shared)."""
    if attn_mask is None or attn_mask.ndim < ndim or attn_mask.shape[0] == 1:
        return attn_mask
    if attn_mask.shape[0] != batch:
        raise CausalizeError(f"an attention mask of batch {attn_mask.shape[0]} for a call of batch {batch}")
    return attn_mask[rows]


def attend_with_cache(
    original,
    cache: KVCache,
    call: CallTokens | torch.Tensor,
    block_size: int,
    write: bool,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    *args,
    **kwargs,
):
    """One self-attention SDPA call of the tokens `call` (or bare frame ids) against the cached
    history: [cache ; own] keys, masked by global frame index (and by the call's own mask, whose
    key columns the cached keys keep when it is a key mask); in write calls the video tokens are
    appended. A call of m·b samples against a cache of batch b runs as m calls of b samples."""
    if is_causal:
        raise CausalizeError("streaming does not support processors that call SDPA with is_causal=True")
    if torch.is_tensor(call):
        call = CallTokens.from_ids(call.to(query.device))
    history = cache.length
    if history and call.frames and call.first_frame < cache.next_frame:
        raise CausalizeError(
            f"a streaming call starting at frame {call.first_frame} after {cache.next_frame} cached "
            "frames: the history must precede the call (reset the stream for a new window)"
        )
    batch = query.shape[0]
    if write:
        cache._check_batch(key)
    rows = cache.batch or batch
    if batch % rows:
        raise CausalizeError(f"a call of batch {batch} cannot share a history cache of batch {rows}")
    key_mask = _key_mask_columns(attn_mask, key.shape[-2])
    # a write over several frames (the prefill) or with context runs through the project's
    # block-causal execution (chunked / flex: no (Lq, Lk) mask) unless that is a dense mask anyway
    options = None if _sees_every_key(call, block_size) or not write else attention_exec.sdpa_options(args, kwargs)
    executor = options is not None and attention_exec.active_backend(query.device, query.shape[-2]) != "dense"
    structure = None if executor else _structure(call, history, block_size)
    cached_columns = cache.mask_columns
    headroom = call.per_frame + call.context  # room for a call of one more frame
    outs, in_place = [], False
    for start in range(0, batch, rows):
        part = slice(start, start + rows)
        whole = rows == batch
        q, k, v = (query, key, value) if whole else (query[part], key[part], value[part])
        keys, values, in_place = cache.joined(k, v, headroom)
        own = attn_mask if whole else _batch_rows(attn_mask, part, batch, query.ndim)
        model_mask = _model_mask(own, cached_columns, history, key.shape[-2])
        if executor:
            key_ids = (
                cache.joined_ids(call.ids)
                if in_place
                else torch.cat([cache.frame_ids, call.ids])
                if history
                else call.ids
            )
            outs.append(
                attention_exec.block_causal_attention(
                    q,
                    keys,
                    values,
                    call.ids,
                    key_ids,
                    block_size=block_size,
                    attn_mask=model_mask,
                    dropout_p=dropout_p,
                    sdpa=original,
                    layout_key=cache.layout_key(call),
                    **options,
                )
            )
        else:
            mask = _with_structure(model_mask, structure)
            outs.append(original(q, keys, values, mask, dropout_p, False, *args, **kwargs))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if write:
        s, m = call.video_start, call.video_len
        columns = attn_mask.narrow(-1, s, m) if key_mask else None
        ids = call.ids.narrow(0, s, m)
        if in_place and s == 0:  # the video tokens were written in place by `joined`
            cache._advance(ids, columns)
        else:
            cache._append(key.narrow(-2, s, m), value.narrow(-2, s, m), ids, columns, headroom)
        cache._record(call)
    return out


__all__ = ["GROWTH", "CallTokens", "KVCache", "attend_with_cache", "frame_tokens", "grid_tokens"]
