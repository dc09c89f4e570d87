"""causal-temporal-conv: symmetric temporal convolutions -> left-padded causal ones (METHOD.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from causalize import state
from causalize.errors import PassError
from causalize.modules.causal_conv import (
    is_causal_conv,
    is_temporal_conv,
    make_causal_conv,
    temporal_conv_problem,
    transferred_parameters,
)
from causalize.passes.base import Pass, PassContext, Record, Site, option

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _kernel_desc(conv: nn.Module, axis: int) -> str:
    return f"k_t={conv.kernel_size[axis]} d={conv.dilation[axis]}"


def _is_patch_embed(conv: nn.Module, axis: int) -> bool:
    """Stride == kernel along time with no padding: it groups frames into temporal patches."""
    pad = conv.padding if isinstance(conv.padding, str) else conv.padding[axis]
    return conv.stride[axis] == conv.kernel_size[axis] and pad in (0, "valid")


class CausalTemporalConv(Pass):
    name = "causal-temporal-conv"
    version = 1
    summary = "temporal convolutions -> causal (left-padded) with shift / masked / extrapolative weight transfer"

    @dataclass(frozen=True)
    class Options:
        transfer: Literal["shift", "masked", "extrapolative"] = option(
            "extrapolative",
            "how the future taps move into the past: shift the kernel, drop them (masked), or fold them "
            "onto past taps through a linear extrapolation over the last p frames (METHOD.md §4.2)",
        )
        p: int = option(2, "frames the extrapolative transfer fits its line through (2 <= p <= kernel size)")

    def _candidates(self, model: nn.Module, ctx: PassContext) -> list[tuple[str, nn.Module, int]]:
        found = []
        for spec in ctx.plan.targets_for(self.name):
            kinds = tuple(_CONVS[d] for d in spec.conv_dims)

            def leaf(m: nn.Module, kinds=kinds, axis=spec.time_axis) -> bool:
                return isinstance(m, kinds) and not is_causal_conv(m) and is_temporal_conv(m, axis)

            found += [(path, conv, spec.time_axis) for path, conv in spec.iter_modules(model, leaf)]
        return found

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        sites = []
        for path, conv, axis in self._candidates(model, ctx):
            if _is_patch_embed(conv, axis):
                note = f"temporal patch embedding ({_kernel_desc(conv, axis)}): groups frames, left as is"
            else:
                problem = temporal_conv_problem(conv, axis)
                note = (
                    f"cannot convert: {problem}"
                    if problem
                    else f"{_kernel_desc(conv, axis)} -> causal, transfer={ctx.options.transfer}"
                )
            sites.append(Site(path, type(conv).__name__, note))
        return sites

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        records = []
        for path, conv, axis in self._candidates(model, ctx):
            if _is_patch_embed(conv, axis):
                continue
            problem = temporal_conv_problem(conv, axis)
            if problem:
                raise PassError(f"{path}: {problem}", "exclude it in the plan's targets, or write a pass for it")
            new = make_causal_conv(conv, time_axis=axis, transfer=ctx.options.transfer, p=ctx.options.p)
            state.swap_module(model, path, new, weights_changed=transferred_parameters(new))
            records.append(Record(self.name, path, type(conv).__name__, type(new).__name__, _kernel_desc(conv, axis)))
        return records
