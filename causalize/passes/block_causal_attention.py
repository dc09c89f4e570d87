"""block-causal-attention: full spatio-temporal attention over frame-major tokens -> block-causal
over frames, with joint text / context tokens handled from the plan's layout (METHOD.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from causalize import state
from causalize.context import install_context
from causalize.errors import PassError
from causalize.modules.block_attention import BlockCausalAttnProcessor
from causalize.passes.base import Pass, PassContext, Record, Site, option


def _has_processor(m: nn.Module) -> bool:
    return callable(getattr(m, "processor", None))


class BlockCausalAttention(Pass):
    name = "block-causal-attention"
    version = 1
    summary = (
        "DiT self / joint attention over frame-major tokens -> block-causal over frames; context rows see only context"
    )

    @dataclass(frozen=True)
    class Options:
        block_size: int = option(1, "token frames per causal block: a frame sees its whole block and every earlier one")
        context_sees_video: bool = option(
            False,
            "let text / context rows see video: a deliberate leak, only to demonstrate the context rule (METHOD.md §3)",
        )

    def _candidates(self, model: nn.Module, ctx: PassContext):
        return list(ctx.plan.iter_targets(self.name, model, _has_processor))

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        sites = []
        for path, attn, spec in self._candidates(model, ctx):
            if isinstance(attn.processor, BlockCausalAttnProcessor):
                note = "already block-causal"
            else:
                where = "video only" if spec.context == "none" else f"context {spec.context} + video"
                note = f"{type(attn.processor).__name__}: {where} -> block-causal (block {ctx.options.block_size} token frame(s))"
            sites.append(Site(path, type(attn).__name__, note))
        return sites

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        if ctx.plan.tokens is None:
            raise PassError(
                f"plan '{ctx.plan.name}' has no `tokens` function",
                "a DiT plan must say how many token frames and tokens per frame a call has",
            )
        if ctx.options.block_size < 1:
            from causalize.errors import UsageError

            raise UsageError(f"{self.name}: block_size must be >= 1, got {ctx.options.block_size}")
        frame_ctx = install_context(model, ctx.plan.tokens)
        records = []
        for path, attn, spec in self._candidates(model, ctx):
            if isinstance(attn.processor, BlockCausalAttnProcessor):
                continue
            before = type(attn.processor).__name__
            state.wrap_processor(
                model,
                path,
                BlockCausalAttnProcessor(
                    attn.processor,
                    frame_ctx,
                    block_size=ctx.options.block_size,
                    position=spec.context,
                    joint=spec.joint,
                    mask_format=spec.mask_format,
                    context_sees_video=ctx.options.context_sees_video,
                ),
            )
            records.append(Record(self.name, path, before, f"BlockCausalAttnProcessor({before})", spec.context))
        return records
