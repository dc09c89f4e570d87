"""causal-norm: GroupNorm whose statistics span frames -> per-frame or cumulative statistics (METHOD.md §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from causalize import state
from causalize.modules.causal_norm import CausalGroupNorm
from causalize.passes.base import Pass, PassContext, Record, Site, option


def _is_plain_groupnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) and not isinstance(m, CausalGroupNorm)


class CausalNorm(Pass):
    name = "causal-norm"
    version = 1
    summary = "GroupNorm on (B, C, T, H, W) tensors -> statistics per frame, or over frames <= t"

    @dataclass(frozen=True)
    class Options:
        mode: Literal["per-frame", "cumulative"] = option(
            "per-frame", "GroupNorm statistics of each frame alone, or over frames <= t (METHOD.md §5)"
        )

    def _candidates(self, model: nn.Module, ctx: PassContext):
        return [(path, mod) for path, mod, _ in ctx.plan.iter_targets(self.name, model, _is_plain_groupnorm)]

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        return [
            Site(path, type(gn).__name__, f"statistics over (C/G, T, H, W) -> {ctx.options.mode}")
            for path, gn in self._candidates(model, ctx)
        ]

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        records = []
        for path, gn in self._candidates(model, ctx):
            new = CausalGroupNorm.from_module(gn, mode=ctx.options.mode)
            state.swap_module(model, path, new)
            records.append(Record(self.name, path, type(gn).__name__, f"CausalGroupNorm({ctx.options.mode})"))
        return records
