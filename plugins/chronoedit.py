"""ChronoEditTransformer3DModel (ChronoEdit-14B): Wan 2.1's DiT with a "temporal reasoning" RoPE.

The model file is Wan's (same blocks, processors, condition embedder, and the Wan 2.2 per-token
`timestep (B, N)` path), except `ChronoEditRotaryPosEmbed`: for a clip of exactly 2 frames it puts
frame 1 at temporal position `rope_temporal_skip_len - 1` (default 7), the editing mode (input
image, then the edit with reasoning frames imagined in between); any other clip length gets
positions 0..F-1. So frame 1's position, and its output, depend on whether a frame 2 exists. The
probe cannot see this (it perturbs values, never the frame count), but a causal model must not know
how many frames follow: a 2-frame window of a rollout would disagree with the 3-frame window that
extends it, and streaming (history cached at one length, read at another) would not match full
recomputation. The plan's pipeline therefore adds `stable-frame-positions`, which sets the rotary
module's `temporal_skip_len` to 2: the 2-frame case then takes rows [0, 1] of the table, exactly
the positions of every other length. Only the attribute changes (no weight; recorded, so
`unconvert` restores it), and the converted model gives up the 2-frame editing positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from causalize import state
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.passes.base import Pass, PassContext, Record, Site
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import patch3d_tokens as tokens
from causalize.plugins.wan import TINY_CONFIG as WAN_TINY
from causalize.plugins.wan import make_inputs

SKIP_ATTR = "temporal_skip_len"
#: a skip of 2 makes the 2-frame rows `freqs[:2][[0, -1]]` = [0, 1], the positions of any other length
STABLE_SKIP = 2


def _has_skip(module: nn.Module) -> bool:
    return isinstance(getattr(module, SKIP_ATTR, None), int)


class StableFramePositions(Pass):
    name = "stable-frame-positions"
    version = 1
    summary = (
        "RoPE frame positions 0..F-1 for every clip length: ChronoEdit's 2-frame temporal-reasoning skip "
        "(frame 1 at position rope_temporal_skip_len - 1) made frame 1 depend on the clip length"
    )

    @dataclass(frozen=True)
    class Options:
        pass

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        return [
            Site(path, type(m).__name__, f"{SKIP_ATTR} {getattr(m, SKIP_ATTR)} -> {STABLE_SKIP}")
            for path, m, _ in ctx.plan.iter_targets(self.name, model, _has_skip)
        ]

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        records = []
        for path, m, _ in ctx.plan.iter_targets(self.name, model, _has_skip):
            before = getattr(m, SKIP_ATTR)
            state.set_attribute(model, path, SKIP_ATTR, STABLE_SKIP)
            records.append(Record(self.name, path, f"{SKIP_ATTR}={before}", f"{SKIP_ATTR}={STABLE_SKIP}"))
        return records


PLAN = Plan(
    name="chronoedit",
    model_class="ChronoEditTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention,stable-frame-positions",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        "block-causal-attention": Targets(paths=("blocks.*.attn1",)),
        "stable-frame-positions": Targets(paths=("rope",)),
    },
    tiny_config=WAN_TINY
    | dict(
        rope_temporal_skip_len=8,  # the released default: the 2-frame skip is live in the tiny model
    ),
    make_inputs=make_inputs,
    # Wan 2.2's path: timestep (B, N) -> per-token temb / timestep_proj; actions are added to
    # condition_embedder.time_embedder's per-token output.
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder", mode="per-token", sample_arg="hidden_states"
    ),
    streaming=Streaming(rope="rope"),
    tokens=tokens,
    description="ChronoEdit image-editing DiT (Wan 2.1 architecture, temporal-reasoning RoPE)",
    notes=(
        "the stock RoPE puts frame 1 of a 2-frame clip at position rope_temporal_skip_len - 1 and at 1 otherwise: "
        "frame 1 depends on the clip length; stable-frame-positions (in the default pipeline) sets the rotary "
        "module's temporal_skip_len to 2, i.e. positions 0..F-1 for every length (the 2-frame editing positions "
        "are given up); without it streaming does not match full recomputation",
        "per-frame timesteps: Wan 2.2's per-token path, timestep (B, N), works unchanged in this model file",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",
    ),
)


@hookimpl
def causalize_register_passes(register):
    register(StableFramePositions)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
