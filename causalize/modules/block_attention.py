"""Block-causal attention over frame-major tokens, for DiTs with full spatio-temporal attention.

The processor wraps the model's own processor and hands it a mask it builds itself from the frame
context (Wan-style blocks pass `None` as the mask). Context tokens (text, image) get frame id −1:
context rows see only context (otherwise they would carry future frames into the next layer),
video rows see the context plus their own and earlier frame blocks (METHOD.md §3).

Execution: a dense boolean / additive mask through SDPA on CPU; on CUDA, for processors that go
through diffusers' `dispatch_attention_fn`, a flex-attention `BlockMask` so that masked blocks
are skipped (same results).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed

ContextPosition = Literal["none", "prefix", "suffix"]
MaskFormat = Literal["bool4d", "heads3d"]


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


class BlockCausalAttnProcessor:
    """Wraps an attention processor of a DiT: self- or joint attention becomes block-causal over frames.

    joint: the processor concatenates `encoder_hidden_states` (context) with the video tokens
        itself (CogVideoX, Hunyuan); otherwise a call with `encoder_hidden_states` is
        cross-attention and passes through unchanged.
    position: where context tokens sit in the joint sequence; "none" means video only.
    mask_format: "bool4d" for processors that hand the mask to `dispatch_attention_fn`;
        "heads3d" for legacy ones that call `attn.prepare_attention_mask` first.
    """

    def __init__(self, inner: Any, context: FrameContext, *, block_size: int = 1, position: ContextPosition = "none",
                 joint: bool = False, mask_format: MaskFormat = "bool4d", context_sees_video: bool = False):
        self.inner = inner
        self.context = context
        self.block_size = block_size
        self.position = position
        self.joint = joint
        self.mask_format = mask_format
        self.context_sees_video = context_sees_video
        self._cache: tuple[tuple, Any] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and not self.joint:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
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
            raise CausalizeError(
                f"attention sequence of {length} tokens does not fit {grid.frames} frames x {grid.per_frame} tokens"
                + ("" if self.position == "none" else f" + {self.position} context"),
                "the plan's token layout is wrong for this model: fix its `tokens` function",
            )
        return token_frame_ids(grid, context_len, self.position, hidden_states.device)

    def _dense(self, fid, attn, hidden_states, attention_mask):
        key = ("dense", fid.numel(), int((fid < 0).sum()), hidden_states.device, hidden_states.dtype)
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

    def _call_flex(self, fid, attn, hidden_states, encoder_hidden_states, *args, **kwargs):
        key = ("flex", fid.numel(), int((fid < 0).sum()), hidden_states.device)
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
                f"position={self.position}, joint={self.joint})")
