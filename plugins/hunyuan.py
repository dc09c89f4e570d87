"""HunyuanVideoTransformer3DModel: dual-stream then single-stream joint attention over [video fm ; text].

Both kinds of block attend over the joint sequence: the dual-stream processor projects the text
with its own `add_*_proj` and concatenates it after the video, the single-stream processor gets
video and text as separate arguments and concatenates them itself. Either way the text is a
suffix that the processor appends (joint=True, context="suffix"). `forward` builds a (B,1,1,N)
boolean text-padding mask and passes it to every block; the block-causal processor ANDs its
(N,N) mask into it, so padded text stays hidden and text rows see only (valid) text.

The token refiner (`context_embedder.token_refiner`) attends over text only and is left alone.
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Plan, Targets
from causalize.plugins.common import mid_timestep, randn

TEXT_TOKENS = 12
VALID_TEXT = 9  # the example inputs pad the prompt, so the padding mask is exercised


def tokens(model, kwargs) -> TokenGrid:
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    return TokenGrid(frames // pt, (height // p) * (width // p))


def make_inputs(model, frames, gen):
    c = model.config
    mask = torch.zeros(1, TEXT_TOKENS)
    mask[:, :VALID_TEXT] = 1
    inputs = {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 8, 8),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_embed_dim),
        "encoder_attention_mask": mask,
        "pooled_projections": randn(gen, 1, c.pooled_projection_dim),
    }
    if c.guidance_embeds:
        inputs["guidance"] = torch.tensor([6000.0])
    return inputs


_JOINT = dict(context="suffix", joint=True, mask_format="bool4d")

PLAN = Plan(
    name="hunyuan",
    model_class="HunyuanVideoTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        "block-causal-attention": (
            # dual-stream: video through to_q/k/v, text through add_q/k/v_proj, [video ; text]
            Targets(paths=("transformer_blocks.*.attn",), **_JOINT),
            # single-stream: the processor concatenates [video ; text] itself
            Targets(paths=("single_transformer_blocks.*.attn",), **_JOINT),
        ),
    },
    tiny_config=dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
    ),
    make_inputs=make_inputs,
    tokens=tokens,
    description="HunyuanVideo text-to-video DiT (dual- and single-stream joint attention)",
    notes=(
        "the text-padding mask built by forward is combined with the block-causal mask (logical AND)",
        "the token refiner's text-only attention is not targeted",
        "patch_size_t > 1 couples the frames of one temporal patch: use block_size = patch_size_t",
        "image_condition_type='token_replace' only re-modulates frame 0 (t = 0): no extra frame mixing",
        "RoPE frame indices restart at 0 on every call: streaming needs global offsets",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
