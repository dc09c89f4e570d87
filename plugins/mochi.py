"""MochiTransformer3DModel: asymmetric joint attention over [video fm ; valid text], built per sample.

`MochiAttnProcessor2_0` loops over the batch in Python: for each sample it keeps only the valid
text tokens (`encoder_attention_mask`), concatenates them AFTER the video tokens
(`cat([query[idx], valid_encoder_query])`) and calls `F.scaled_dot_product_attention` with no
mask. A mask argument therefore never reaches attention; the block-causal processor runs in its
"sdpa-scope" mode instead: during the processor call each SDPA call gets the block-causal mask
of its own length L = T·P + that sample's valid text (context = L − T·P, a suffix).

The text attention pool in `time_embed` (query length 1) mixes text only and runs outside the
blocks' processor calls, so it is never masked.
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Plan, Targets
from causalize.plugins.common import mid_timestep, randn

TEXT_TOKENS = 16
VALID_TEXT = 11  # the example inputs pad the prompt, so the per-sample text length is exercised


def tokens(model, kwargs) -> TokenGrid:
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p = model.config.patch_size
    return TokenGrid(frames, (height // p) * (width // p))


def make_inputs(model, frames, gen):
    c = model.config
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, :VALID_TEXT] = 1
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 16, 16),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_embed_dim),
        "timestep": mid_timestep(),
        "encoder_attention_mask": mask,
    }


PLAN = Plan(
    name="mochi",
    model_class="MochiTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        "block-causal-attention": Targets(
            paths=("transformer_blocks.*.attn1",), context="suffix", joint=True, mask_format="sdpa-scope",
        ),
    },
    tiny_config=dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ),
    make_inputs=make_inputs,
    tokens=tokens,
    description="Mochi 1 text-to-video DiT (asymmetric joint attention, per-sample valid text)",
    notes=(
        "the processor calls SDPA per sample with no mask: masked through the sdpa-scope mode "
        "(torch.nn.functional.scaled_dot_product_attention is re-routed only during each attn1 call)",
        "the per-sample joint length is T·P + that sample's valid text; text is a suffix",
        "RoPE positions restart at frame 0 on every call: streaming needs global offsets",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
