"""causal-temporal-attention: self-attention over a frame axis gets a frame-causal mask (METHOD.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from causalize import state
from causalize.modules.frame_attention import CausalFrameAttnProcessor, is_wrapped
from causalize.passes.base import Pass, PassContext, Record, Site, option


def _is_attention(m: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(m, Attention)


class CausalTemporalAttention(Pass):
    name = "causal-temporal-attention"
    version = 1
    summary = "self-attention whose sequence is frames -> frame-causal mask (both self-attentions of double-self-attention blocks); no weight change"

    @dataclass(frozen=True)
    class Options:
        block_size: int = option(1, "frames per causal block: a frame attends to its block and every earlier frame")

    def _candidates(self, model: nn.Module, ctx: PassContext):
        return [(path, mod) for path, mod, _ in ctx.plan.iter_targets(self.name, model, _is_attention)]

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        sites = []
        for path, attn in self._candidates(model, ctx):
            if attn.is_cross_attention:
                note = "cross-attention to context: frame-local, left as is"
            elif is_wrapped(attn.processor):
                note = "already causal"
            else:
                note = f"self-attention over frames -> causal mask (block {ctx.options.block_size})"
            sites.append(Site(path, type(attn).__name__, note))
        return sites

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        if ctx.options.block_size < 1:
            from causalize.errors import UsageError

            raise UsageError(f"{self.name}: block_size must be >= 1, got {ctx.options.block_size}")
        records = []
        for path, attn in self._candidates(model, ctx):
            if attn.is_cross_attention or is_wrapped(attn.processor):
                continue
            before = type(attn.processor).__name__
            state.wrap_processor(model, path, CausalFrameAttnProcessor(attn.processor, ctx.options.block_size))
            records.append(Record(self.name, path, before, f"CausalFrameAttnProcessor({before})"))
        return records
