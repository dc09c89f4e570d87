"""Block-causal attention over frame-major tokens, for DiTs with full spatio-temporal attention.

The processor wraps the model's own processor. Context tokens (text, image) get frame id −1:
context rows see only context (otherwise they would carry future frames into the next layer),
video rows see the context plus their own and earlier frame blocks (METHOD.md §3).

Execution (`causalize.modules.attention_exec` chooses and runs it):
- "dense" (CPU default): the processor builds the mask and hands it to the model's processor
  ("bool4d": a (1, 1, L, L) boolean for `dispatch_attention_fn`; "heads3d": a (B·heads, L, L)
  bias for legacy processors that call `attn.prepare_attention_mask` first).
- "chunked" / "flex" (CUDA default): the model's processor runs with its own mask untouched inside
  an SDPA scope, and the self-attention SDPA call over the joint sequence runs per frame block
  (chunked) or as compiled flex attention, with no (L, L) mask.

The SDPA scope: while the wrapped processor runs, and only then,
`torch.nn.functional.scaled_dot_product_attention` is routed through a wrapper that handles each
call with Lq == Lk >= T·P from that call's own length L (L − T·P context tokens). Mode
"sdpa-scope" serves processors that take no usable mask at all (Mochi: a Python loop over the
batch keeps each sample's valid text tokens and calls SDPA without a mask) with every backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F

from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed
from causalize.modules import attention_exec
from causalize.modules.wrapping import AdvertisedCall, call_processor, takes_attention_mask

ContextPosition = Literal["none", "prefix", "suffix"]
MaskFormat = Literal["bool4d", "heads3d", "sdpa-scope", "scope"]
MASK_FORMATS = ("bool4d", "heads3d", "sdpa-scope", "scope")
SCOPED_FORMATS = ("sdpa-scope", "scope")  # always masked in the SDPA scope, never handed a mask
# diffusers attention backends that end in torch.nn.functional.scaled_dot_product_attention
SDPA_DISPATCH_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def token_frame_ids(
    grid: TokenGrid, context_len: int = 0, position: ContextPosition = "none", device=None
) -> torch.Tensor:
    """Frame id of every token of the joint sequence: −1 for context, t for tokens of frame t."""
    video = torch.arange(grid.frames, device=device).repeat_interleave(grid.per_frame)
    if context_len == 0:
        return video
    before, after = grid.context_split(context_len, position)
    if after < 0:
        raise CausalizeError(
            f"{context_len} context tokens cannot hold the {grid.leading_context} the model puts before the video",
            "the plan's token layout is wrong for this model: fix its `tokens` function",
        )
    ctx = torch.full((context_len,), -1, dtype=video.dtype, device=device)
    return torch.cat([ctx[:before], video, ctx[before:]])


def block_causal_mask(fid: torch.Tensor, block_size: int = 1, context_sees_video: bool = False) -> torch.Tensor:
    """Boolean (L, L): True where query token may attend to key token."""
    allowed = causal_block_allowed(fid, fid, block_size)
    if context_sees_video:  # deliberately leaky: only for demonstrating the text-row rule
        allowed = allowed | (fid < 0)[:, None]
    return allowed


def flex_block_mask(fid: torch.Tensor, block_size: int = 1, context_sees_video: bool = False):
    """The same rule as `block_causal_mask`, as a flex-attention BlockMask (built per tile)."""
    blocks = attention_exec.block_ids(fid, block_size, queries=True, context_sees_video=context_sees_video)
    return attention_exec.build_block_mask(blocks, attention_exec.block_ids(fid, block_size))


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

    def __init__(self, processor: BlockCausalAttnProcessor, grid: TokenGrid):
        self.processor = processor
        self.grid = grid
        self.masked_calls: list[int] = []  # joint lengths of the calls that were masked

    def run(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        """Make calls whose query and key lengths are equal and at least the video token count
        (the self-attention over the joint sequence) block-causal; pass all others through."""
        length = query.shape[-2]
        if key.shape[-2] != length or length < self.grid.video_tokens:
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        options = attention_exec.sdpa_options(args, kwargs)
        if options is None or attention_exec.active_backend(query.device, length) == "dense":
            attn_mask = self.mask_for(length, query, attn_mask, is_causal)
            attention_exec.record_execution("dense")
            return original(query, key, value, attn_mask, dropout_p, False, *args, **kwargs)
        fid, layout_key = self.processor._scoped_frame_ids(self.grid, length, query.device)
        self.masked_calls.append(length)
        return attention_exec.block_causal_attention(
            query,
            key,
            value,
            fid,
            block_size=self.processor.block_size,
            context_sees_video=self.processor.context_sees_video,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            sdpa=original,
            layout_key=layout_key,
            **options,
        )

    def mask_for(self, length: int, query: torch.Tensor, attn_mask, is_causal: bool):
        """The call's own mask combined with the block-causal one (bool, or additive if it was)."""
        allowed = self.processor._scoped_allowed(self.grid, length, query.device)
        if is_causal:  # SDPA forbids a mask together with is_causal: fold the tril in
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        self.masked_calls.append(length)
        return attention_exec.combine_masks(attn_mask, allowed)


def _dispatch_backend(inner: Any) -> str | None:
    """The diffusers attention backend a processor dispatches to, or None if it has none (it calls
    attention itself, e.g. legacy processors that call F.scaled_dot_product_attention)."""
    if not hasattr(inner, "_attention_backend"):
        return None
    backend = inner._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        except (ImportError, AttributeError):
            return None
    return str(getattr(backend, "value", backend))


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
    mask_format: how the dense backend hands the processor its mask: "bool4d" for processors that
        pass it to `dispatch_attention_fn`; "heads3d" for legacy ones that call
        `attn.prepare_attention_mask` first; "sdpa-scope" for processors that call
        `F.scaled_dot_product_attention` with no usable mask (Mochi), which always run in the SDPA
        scope (per-sample lengths work); "scope" for processors that turn the mask they receive into
        their own (HunyuanVideo 1.5 pads a text key mask to (B, 1, L, L)), which also always run in
        the scope, their `attention_mask` untouched, with one batched SDPA call (streaming keeps one
        cache, not one per sample). With the chunked and flex backends every format runs in
        the scope, `attention_mask` passed through untouched. A scoped call that handled no SDPA
        call is an error: the processor did not go through SDPA, so it would have stayed
        non-causal. So is a diffusers attention backend that does not end in SDPA (flash, sage…).
    """

    def __init__(
        self,
        inner: Any,
        context: FrameContext,
        *,
        block_size: int = 1,
        position: ContextPosition = "none",
        joint: bool = False,
        mask_format: MaskFormat = "bool4d",
        context_sees_video: bool = False,
    ):
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
        self._scoped_cache: dict[tuple, torch.Tensor] = {}  # dense masks of scoped calls
        self._fid_cache: dict[tuple, torch.Tensor] = {}  # frame ids of scoped calls (chunked, flex)
        self.__call__ = AdvertisedCall(self)  # keyword arguments the inner processor names get through

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and not self.joint:
            return call_processor(
                self.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        self._check_dispatch()
        # a processor that takes no mask (Kandinsky 5) is masked in the SDPA scope, like sdpa-scope
        if self.mask_format not in SCOPED_FORMATS and takes_attention_mask(self.inner):
            length = self._joint_length(hidden_states, encoder_hidden_states)
            if attention_exec.active_backend(hidden_states.device, length) == "dense":
                fid = self._frame_ids(hidden_states, encoder_hidden_states)
                mask = self._dense(fid, attn, hidden_states, attention_mask)
                attention_exec.record_execution("dense")
                return self.inner(attn, hidden_states, encoder_hidden_states, mask, *args, **kwargs)
        return self._call_scoped(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def _joint_length(self, hidden_states, encoder_hidden_states) -> int:
        length = hidden_states.shape[1]
        if self.joint and encoder_hidden_states is not None:
            length += encoder_hidden_states.shape[1]
        return length

    def _frame_ids(self, hidden_states, encoder_hidden_states) -> torch.Tensor:
        grid = self.context.current()
        length = self._joint_length(hidden_states, encoder_hidden_states)
        context_len = length - grid.video_tokens
        if context_len < 0 or (context_len > 0 and self.position == "none"):
            self._misfit(length, grid)
        return token_frame_ids(grid, context_len, self.position, hidden_states.device)

    def _check_dispatch(self) -> None:
        """The scope and the masks reach attention only through SDPA: refuse a diffusers attention
        backend that ends elsewhere (it would drop or reject the mask), and context parallelism."""
        if getattr(self.inner, "_parallel_config", None) is not None:
            raise CausalizeError(
                "block-causal attention does not support diffusers context parallelism",
                "run the converted model without a parallel config",
            )
        backend = _dispatch_backend(self.inner)
        if backend is not None and backend not in SDPA_DISPATCH_BACKENDS:
            raise CausalizeError(
                f"{type(self.inner).__name__} uses the diffusers attention backend '{backend}', which does not call "
                "torch.nn.functional.scaled_dot_product_attention, so block-causal attention cannot apply its mask",
                f"use one of {', '.join(SDPA_DISPATCH_BACKENDS)} (model.set_attention_backend('native') before converting, "
                "or unset DIFFUSERS_ATTN_BACKEND); causalize picks the kernel itself ($CAUSALIZE_ATTENTION)",
            )

    @staticmethod
    def _mask_key(kind: str, fid: torch.Tensor, *extra) -> tuple:
        """Length, context count and frame count fix the token grid (two grids with the same T·P differ)."""
        return (kind, fid.numel(), int((fid < 0).sum()), int(fid.max()), *extra)

    def _dense(self, fid, attn, hidden_states, attention_mask):
        lead = self.context.current().leading_context
        key = self._mask_key("dense", fid, hidden_states.device, hidden_states.dtype, lead)
        if self._cache and self._cache[0] == key:
            allowed, bias = self._cache[1]
        else:
            allowed = block_causal_mask(fid, self.block_size, self.context_sees_video)
            bias = torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
                ~allowed, float("-inf")
            )
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
            attention_mask = torch.zeros(attention_mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        prepared = attn.prepare_attention_mask(attention_mask, n, batch)
        return prepared + bias

    def _call_scoped(self, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs):
        grid = self.context.current()
        length = self._joint_length(hidden_states, encoder_hidden_states)
        if length < grid.video_tokens:
            self._misfit(length, grid)
        with sdpa_scope(SdpaScope(self, grid)) as scope:
            out = call_processor(
                self.inner, attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if not scope.masked_calls:
            hint = (
                "use mask_format 'bool4d' or 'heads3d' for it"
                if self.mask_format in SCOPED_FORMATS
                else f"set {attention_exec.ENV_VAR}=dense: the mask then goes through the processor"
            )
            raise CausalizeError(
                f"{type(self.inner).__name__} made no scaled_dot_product_attention call over the {grid.video_tokens} video "
                "tokens, so the SDPA scope masked nothing and the attention stayed bidirectional",
                f"this processor does not call torch.nn.functional.scaled_dot_product_attention: {hint}",
            )
        return out

    def _scoped_frame_ids(self, grid: TokenGrid, length: int, device) -> tuple[torch.Tensor, tuple]:
        """Frame ids of one SDPA call of joint length L, and the key naming their layout (cached)."""
        context_len = length - grid.video_tokens
        if context_len < 0 or (context_len > 0 and self.position == "none"):
            self._misfit(length, grid)
        layout_key = ("grid", grid.frames, grid.per_frame, context_len, self.position, grid.leading_context)
        key = (*layout_key, str(device))
        fid = self._fid_cache.get(key)
        if fid is None:
            if len(self._fid_cache) >= 32:
                self._fid_cache.clear()
            fid = self._fid_cache[key] = token_frame_ids(grid, context_len, self.position, device)
        return fid, layout_key

    def _scoped_allowed(self, grid: TokenGrid, length: int, device) -> torch.Tensor:
        """Boolean (L, L) block-causal mask for one SDPA call of joint length L (cached per shape)."""
        context_len = length - grid.video_tokens
        if context_len < 0 or (context_len > 0 and self.position == "none"):
            self._misfit(length, grid)
        key = (length, context_len, grid.frames, grid.per_frame, grid.leading_context, str(device))
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

    def __repr__(self) -> str:
        return (
            f"BlockCausalAttnProcessor(inner={type(self.inner).__name__}, block_size={self.block_size}, "
            f"position={self.position}, joint={self.joint}"
            + (f", mask_format={self.mask_format})" if self.mask_format != "bool4d" else ")")
        )
