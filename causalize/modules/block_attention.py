"""Block-causal attention over frame-major tokens, for DiTs with full spatio-temporal attention.

The processor wraps the model's own processor and hands it a mask it builds itself from the frame
context (Wan-style blocks pass `None` as the mask). Context tokens (text, image) get frame id −1:
context rows see only context (otherwise they would carry future frames into the next layer),
video rows see the context plus their own and earlier frame blocks (METHOD.md §3).

Execution: a dense boolean / additive mask through SDPA on CPU; on CUDA, for processors that go
through diffusers' `dispatch_attention_fn`, a flex-attention `BlockMask` so that masked blocks
are skipped (same results).

A third mode, "sdpa-scope", serves processors that take no usable mask at all (Mochi: a Python
loop over the batch keeps each sample's valid text tokens and calls SDPA without a mask). While
the wrapped processor runs, and only then, `torch.nn.functional.scaled_dot_product_attention`
is routed through a wrapper that builds the block-causal mask of each call from that call's own
length (`sdpa_scope`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F

from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed
from causalize.modules.wrapping import AdvertisedCall

ContextPosition = Literal["none", "prefix", "suffix"]
MaskFormat = Literal["bool4d", "heads3d", "sdpa-scope"]
MASK_FORMATS = ("bool4d", "heads3d", "sdpa-scope")


def token_frame_ids(grid: TokenGrid, context_len: int = 0, position: ContextPosition = "none", device=None) -> torch.Tensor:
    """Frame id of every token of the joint sequence: −1 for context, t for tokens of frame t."""
    video = torch.arange(grid.frames, device=device).repeat_interleave(grid.per_frame)
    if context_len == 0:
        return video
    ctx = torch.full((context_len,), -1, dtype=video.dtype, device=device)
    return torch.cat([ctx, video]) if position == "prefix" else torch.cat([video, ctx])


def block_causal_mask(fid: torch.Tensor, block_size: int = 1, context_sees_video: bool = False) -> torch.Tensor:
    """Boolean (L, L): True where query token may attend to key token."""
    allowed = causal_block_allowed(fid, fid, block_size)
    if context_sees_video:  # deliberately leaky: only for demonstrating the text-row rule
        allowed = allowed | (fid < 0)[:, None]
    return allowed


def flex_block_mask(fid: torch.Tensor, block_size: int = 1, context_sees_video: bool = False):
    """The same rule as `block_causal_mask`, as a flex-attention BlockMask (CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    blk = torch.where(fid < 0, torch.full_like(fid, -1), torch.div(fid, block_size, rounding_mode="floor"))

    def mask_mod(b, h, q, kv):
        ok = blk[kv] <= blk[q]
        return ok | (blk[q] < 0) if context_sees_video else ok

    n = fid.numel()
    return create_block_mask(mask_mod, None, None, n, n, device=fid.device)


# --- sdpa-scope: a scoped, re-entrant re-routing of F.scaled_dot_product_attention -------------

class _SdpaRouting:
    """Process-wide install state of the masking SDPA wrapper (reference-counted over scopes)."""

    lock = threading.Lock()
    depth = 0
    original: Any = None
    local = threading.local()  # .stack: the scopes active in this thread, innermost last


def _scope_stack() -> list:
    stack = getattr(_SdpaRouting.local, "stack", None)
    if stack is None:
        stack = _SdpaRouting.local.stack = []
    return stack


def _original_sdpa():
    return _SdpaRouting.original if _SdpaRouting.original is not None else F.scaled_dot_product_attention


def _masked_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
    """Stand-in for F.scaled_dot_product_attention while a scope is active: the innermost scope
    of the calling thread handles the call; calls from other threads or outside any scope pass
    through untouched."""
    original = _original_sdpa()
    stack = getattr(_SdpaRouting.local, "stack", None)
    if not stack:  # another thread, or a call outside any scope
        return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
    return stack[-1].run(original, query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)


class SdpaScope:
    """The masking state of one wrapped processor call: its frame grid and mask builder."""

    def __init__(self, processor: "BlockCausalAttnProcessor", grid: TokenGrid):
        self.processor = processor
        self.grid = grid
        self.masked_calls: list[int] = []  # joint lengths of the calls that were masked

    def run(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        """Mask calls whose query and key lengths are equal and at least the video token count
        (the self-attention over the joint sequence); pass all others through."""
        length = query.shape[-2]
        if key.shape[-2] != length or length < self.grid.video_tokens:
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        attn_mask = self.mask_for(length, query, attn_mask, is_causal)
        return original(query, key, value, attn_mask, dropout_p, False, *args, **kwargs)

    def mask_for(self, length: int, query: torch.Tensor, attn_mask, is_causal: bool):
        """The call's own mask combined with the block-causal one (bool, or additive if it was)."""
        allowed = self.processor._scoped_allowed(self.grid, length, query.device)
        if is_causal:  # SDPA forbids a mask together with is_causal: fold the tril in
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        self.masked_calls.append(length)
        if attn_mask is None:
            return allowed
        if attn_mask.dtype == torch.bool:
            return attn_mask & allowed
        return attn_mask + torch.zeros(allowed.shape, dtype=attn_mask.dtype, device=attn_mask.device).masked_fill(~allowed, float("-inf"))


@contextmanager
def sdpa_scope(scope: SdpaScope) -> Iterator[SdpaScope]:
    """Route F.scaled_dot_product_attention through the masking wrapper for the duration.

    Re-entrant (nested scopes stack; the innermost masks) and thread-aware (the function is
    swapped once per process and restored when the last scope exits, even on error; calls from a
    thread with no active scope pass through untouched).
    """
    with _SdpaRouting.lock:
        if _SdpaRouting.depth == 0:
            current = F.scaled_dot_product_attention
            _SdpaRouting.original = current if current is not _masked_sdpa else None
            F.scaled_dot_product_attention = _masked_sdpa
        _SdpaRouting.depth += 1
    stack = _scope_stack()
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.pop()
        with _SdpaRouting.lock:
            _SdpaRouting.depth -= 1
            if _SdpaRouting.depth == 0:
                if F.scaled_dot_product_attention is _masked_sdpa and _SdpaRouting.original is not None:
                    F.scaled_dot_product_attention = _SdpaRouting.original
                _SdpaRouting.original = None


class BlockCausalAttnProcessor:
    """Wraps an attention processor of a DiT: self- or joint attention becomes block-causal over frames.

    joint: the processor concatenates `encoder_hidden_states` (context) with the video tokens
        itself (CogVideoX, Hunyuan); otherwise a call with `encoder_hidden_states` is
        cross-attention and passes through unchanged.
    position: where context tokens sit in the joint sequence; "none" means video only.
    mask_format: "bool4d" for processors that hand the mask to `dispatch_attention_fn`;
        "heads3d" for legacy ones that call `attn.prepare_attention_mask` first;
        "sdpa-scope" for processors that call `F.scaled_dot_product_attention` with no usable
        mask (Mochi): `attention_mask` is passed through untouched, and during the call every SDPA
        call with Lq == Lk >= T·P gets the block-causal mask of its own length L, with
        L − T·P context tokens at `position` (per-sample lengths work). A call that masks nothing
        is an error: the processor did not go through SDPA, so it would have stayed non-causal.
    """

    def __init__(self, inner: Any, context: FrameContext, *, block_size: int = 1, position: ContextPosition = "none",
                 joint: bool = False, mask_format: MaskFormat = "bool4d", context_sees_video: bool = False):
        if mask_format not in MASK_FORMATS:
            raise CausalizeError(f"unknown mask_format '{mask_format}'", f"use one of {', '.join(MASK_FORMATS)}")
        self.inner = inner
        self.context = context
        self.block_size = block_size
        self.position = position
        self.joint = joint
        self.mask_format = mask_format
        self.context_sees_video = context_sees_video
        self._cache: tuple[tuple, Any] | None = None
        self._scoped_cache: dict[tuple, torch.Tensor] = {}
        self.__call__ = AdvertisedCall(self)  # keyword arguments the inner processor names get through

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and not self.joint:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.mask_format == "sdpa-scope":
            return self._call_scoped(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        fid = self._frame_ids(hidden_states, encoder_hidden_states)
        if hidden_states.is_cuda and attention_mask is None and self.mask_format == "bool4d" and hasattr(self.inner, "_attention_backend"):
            return self._call_flex(fid, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        mask = self._dense(fid, attn, hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, mask, *args, **kwargs)

    def _frame_ids(self, hidden_states, encoder_hidden_states) -> torch.Tensor:
        grid = self.context.current()
        length = hidden_states.shape[1]
        if self.joint and encoder_hidden_states is not None:
            length += encoder_hidden_states.shape[1]
        context_len = length - grid.video_tokens
        if context_len < 0 or (context_len > 0 and self.position == "none"):
            self._misfit(length, grid)
        return token_frame_ids(grid, context_len, self.position, hidden_states.device)

    @staticmethod
    def _mask_key(kind: str, fid: torch.Tensor, *extra) -> tuple:
        """Length, context count and frame count fix the token grid (two grids with the same T·P differ)."""
        return (kind, fid.numel(), int((fid < 0).sum()), int(fid.max()), *extra)

    def _dense(self, fid, attn, hidden_states, attention_mask):
        key = self._mask_key("dense", fid, hidden_states.device, hidden_states.dtype)
        if self._cache and self._cache[0] == key:
            allowed, bias = self._cache[1]
        else:
            allowed = block_causal_mask(fid, self.block_size, self.context_sees_video)
            bias = torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(~allowed, float("-inf"))
            self._cache = (key, (allowed, bias))
        batch, n = hidden_states.shape[0], fid.numel()
        if self.mask_format == "bool4d":
            if attention_mask is None:
                return allowed[None, None]
            if attention_mask.dtype == torch.bool:
                return attention_mask & allowed
            return attention_mask + bias
        # heads3d: (batch*heads, L, L), which prepare_attention_mask neither repeats nor pads.
        if attention_mask is None:
            return bias.expand(batch * attn.heads, n, n)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~attention_mask, float("-inf"))
        prepared = attn.prepare_attention_mask(attention_mask, n, batch)
        return prepared + bias

    def _call_scoped(self, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        grid = self.context.current()
        length = hidden_states.shape[1]
        if self.joint and encoder_hidden_states is not None:
            length += encoder_hidden_states.shape[1]
        if length < grid.video_tokens:
            self._misfit(length, grid)
        with sdpa_scope(SdpaScope(self, grid)) as scope:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if not scope.masked_calls:
            raise CausalizeError(
                f"{type(self.inner).__name__} made no scaled_dot_product_attention call over the {grid.video_tokens} video "
                "tokens, so sdpa-scope masked nothing and the attention stayed bidirectional",
                "this processor does not call torch.nn.functional.scaled_dot_product_attention: use mask_format "
                "'bool4d' or 'heads3d' for it",
            )
        return out

    def _scoped_allowed(self, grid: TokenGrid, length: int, device) -> torch.Tensor:
        """Boolean (L, L) block-causal mask for one SDPA call of joint length L (cached per shape)."""
        context_len = length - grid.video_tokens
        if context_len < 0 or (context_len > 0 and self.position == "none"):
            self._misfit(length, grid)
        key = (length, context_len, grid.frames, grid.per_frame, str(device))
        allowed = self._scoped_cache.get(key)
        if allowed is None:
            if len(self._scoped_cache) >= 32:
                self._scoped_cache.clear()
            fid = token_frame_ids(grid, context_len, self.position, device)
            allowed = self._scoped_cache[key] = block_causal_mask(fid, self.block_size, self.context_sees_video)
        return allowed

    def _misfit(self, length: int, grid: TokenGrid):
        raise CausalizeError(
            f"attention sequence of {length} tokens does not fit {grid.frames} frames x {grid.per_frame} tokens"
            + ("" if self.position == "none" else f" + {self.position} context"),
            "the plan's token layout is wrong for this model: fix its `tokens` function",
        )

    def _call_flex(self, fid, attn, hidden_states, encoder_hidden_states, *args, **kwargs):
        key = self._mask_key("flex", fid, hidden_states.device)
        if self._cache and self._cache[0] == key:
            block_mask = self._cache[1]
        else:
            block_mask = flex_block_mask(fid, self.block_size, self.context_sees_video)
            self._cache = (key, block_mask)
        previous = self.inner._attention_backend
        self.inner._attention_backend = "flex"
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, block_mask, *args, **kwargs)
        finally:
            self.inner._attention_backend = previous

    def __repr__(self) -> str:
        return (f"BlockCausalAttnProcessor(inner={type(self.inner).__name__}, block_size={self.block_size}, "
                f"position={self.position}, joint={self.joint}"
                + (f", mask_format={self.mask_format})" if self.mask_format != "bool4d" else ")"))
