"""A processor wrapper that makes attention over a frame axis causal.

It wraps whatever processor the `Attention` module already had, and on self-attention calls
hands it a frame-causal mask it builds itself (Wan-style callers pass `None` positionally, so it
cannot rely on receiving one). Weights are untouched; the module's own forward is reused.
"""

from __future__ import annotations

import torch

from causalize.layout import causal_block_allowed
from causalize.modules.wrapping import AdvertisedCall


def frame_causal_bias(
    num_frames: int, *, block_size: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """Additive (T, T) bias: 0 where key frame <= query frame (per block), -inf elsewhere."""
    fid = torch.arange(num_frames, device=device)
    allowed = causal_block_allowed(fid, fid, block_size)
    bias = torch.zeros(num_frames, num_frames, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, float("-inf"))


class CausalFrameAttnProcessor:
    """Wraps a legacy diffusers attention processor whose sequence axis is frames.

    On self-attention (no `encoder_hidden_states`), the query/key sequence is the T frames of one
    spatial location; query frame t may attend to key frames <= t (or to its causal block).
    Cross-attention calls pass through unchanged: their keys are context, not frames.
    """

    def __init__(self, inner: object, block_size: int = 1):
        self.inner = inner
        self.block_size = block_size
        self.__call__ = AdvertisedCall(self)  # keyword arguments the inner processor names get through

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None and hidden_states.ndim == 3:
            attention_mask = self._mask(attn, hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    def _mask(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, frames, _ = hidden_states.shape
        bias = frame_causal_bias(
            frames, block_size=self.block_size, dtype=hidden_states.dtype, device=hidden_states.device
        )
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=bias.dtype).masked_fill(
                    ~attention_mask, float("-inf")
                )
            return attention_mask + bias
        # (batch*heads, T, T) as a zero-copy expand: prepare_attention_mask then neither repeats
        # nor copies it, and the processor's view to (batch, heads, T, T) keeps stride 0.
        return bias.expand(batch * attn.heads, frames, frames)

    def __repr__(self) -> str:
        return f"CausalFrameAttnProcessor(inner={type(self.inner).__name__}, block_size={self.block_size})"


def is_wrapped(processor: object) -> bool:
    return isinstance(processor, CausalFrameAttnProcessor)
