"""block-causal-linear-attention: ReLU linear self-attention over frame-major tokens (Sana-Video)
-> block-causal over frames, by prefix sums of the per-frame key statistics (BACKBONES.md §3.10).

Linear attention never calls SDPA, so `block-causal-attention`'s masks cannot reach it
(pitfall 9): the processor is replaced by one that computes the causal form of the same kernel.
Only modules whose processor is a supported linear-attention processor are sites, so a plan
cannot target softmax cross-attention by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from causalize import state
from causalize.context import install_context
from causalize.errors import PassError, UsageError
from causalize.modules.linear_attention import BlockCausalLinearAttnProcessor
from causalize.passes.base import Pass, PassContext, Record, Site, option

# Processors whose math BlockCausalLinearAttnProcessor reproduces (ReLU kernel, RoPE after the
# kernel, normaliser Σφ(k)·φ(q) + 1e-15). Sana (image)'s SanaLinearAttnProcessor2_0 differs
# (no RoPE, padded-ones normaliser) and is not a video model.
SUPPORTED = ("SanaLinearAttnProcessor3_0",)


def _is_linear_attention(m: nn.Module) -> bool:
    proc = getattr(m, "processor", None)
    if proc is None or not callable(getattr(m, "set_processor", None)):
        return False
    return isinstance(proc, BlockCausalLinearAttnProcessor) or type(proc).__name__ in SUPPORTED


class BlockCausalLinearAttention(Pass):
    name = "block-causal-linear-attention"
    version = 1
    summary = "ReLU linear self-attention over frame-major tokens -> block-causal over frames (prefix sums)"

    @dataclass(frozen=True)
    class Options:
        block_size: int = option(1, "token frames per causal block of the prefix sums")

    def _candidates(self, model: nn.Module, ctx: PassContext):
        return list(ctx.plan.iter_targets(self.name, model, _is_linear_attention))

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        sites = []
        for path, attn, _ in self._candidates(model, ctx):
            if isinstance(attn.processor, BlockCausalLinearAttnProcessor):
                note = "already block-causal"
            else:
                note = (
                    f"{type(attn.processor).__name__}: global KᵀV sums -> prefix sums over frames "
                    f"(block {ctx.options.block_size} token frame(s))"
                )
            sites.append(Site(path, type(attn).__name__, note))
        return sites

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        if ctx.plan.tokens is None:
            raise PassError(
                f"plan '{ctx.plan.name}' has no `tokens` function",
                "block-causal linear attention needs the token frames and tokens per frame of each call",
            )
        if ctx.options.block_size < 1:
            raise UsageError(f"{self.name}: block_size must be >= 1, got {ctx.options.block_size}")
        frame_ctx = install_context(model, ctx.plan.tokens)
        records = []
        for path, attn, _ in self._candidates(model, ctx):
            if isinstance(attn.processor, BlockCausalLinearAttnProcessor):
                continue
            before = type(attn.processor).__name__
            state.wrap_processor(
                model, path, BlockCausalLinearAttnProcessor(frame_ctx, block_size=ctx.options.block_size)
            )
            records.append(
                Record(
                    self.name, path, before, "BlockCausalLinearAttnProcessor", f"block_size={ctx.options.block_size}"
                )
            )
        return records
