"""UNet3DConditionModel (ModelScope / Zeroscope): temporal attention, temporal convs, 5-D GroupNorm."""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import UNET_PIPELINE, latent_size, mid_timestep, randn


def make_inputs(model, frames, gen):
    c, s = model.config, latent_size(model)
    return {
        "sample": randn(gen, 1, c.in_channels, frames, s, s),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, 4, c.cross_attention_dim),
    }


PLAN = Plan(
    name="unet3d",
    model_class="UNet3DConditionModel",
    family="unet",
    pipeline=UNET_PIPELINE,
    layout=FrameLayout(inputs={"sample": 2}, output_axis=2),
    targets={
        "causal-temporal-conv": Targets(owners=("TemporalConvLayer",)),
        # transformer_in and every temp_attentions block; attn2 is self-attention too.
        "causal-temporal-attention": Targets(owners=("TransformerTemporalModel",)),
        "causal-norm": Targets(owners=("TransformerTemporalModel", "TemporalConvLayer")),
    },
    tiny_config=dict(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=16,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(embedding="time_embedding", time_proj="time_proj", consumers=("ResnetBlock2D",)),
    streaming=Streaming(),
    description="ModelScope / Zeroscope text-to-video UNet",
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
