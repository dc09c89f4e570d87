"""Built-in passes (one file each) and their registration hook."""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.passes.base import Pass, PassContext, Record, Site
from causalize.passes.block_causal_attention import BlockCausalAttention
from causalize.passes.block_causal_linear_attention import BlockCausalLinearAttention
from causalize.passes.causal_norm import CausalNorm
from causalize.passes.causal_temporal_attention import CausalTemporalAttention
from causalize.passes.causal_temporal_conv import CausalTemporalConv
from causalize.passes.frame_conditioning import FrameConditioning

BUILTIN_PASSES = (
    CausalTemporalConv,
    CausalTemporalAttention,
    CausalNorm,
    BlockCausalAttention,
    BlockCausalLinearAttention,
    FrameConditioning,
)


@hookimpl
def causalize_register_passes(register) -> None:
    for cls in BUILTIN_PASSES:
        register(cls)


__all__ = ["Pass", "PassContext", "Record", "Site", *[c.__name__ for c in BUILTIN_PASSES]]
