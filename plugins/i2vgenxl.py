"""I2VGenXLUNet: UNet3D blocks plus a temporal self-attention over the image latents."""

from __future__ import annotations

import torch

from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import UNET_PIPELINE, latent_size, mid_timestep, randn


def make_inputs(model, frames, gen):
    c, s = model.config, latent_size(model)
    image_latents = torch.zeros(1, c.in_channels, frames, s, s)
    image_latents[:, :, 0] = randn(gen, 1, c.in_channels, s, s)
    return {
        "sample": randn(gen, 1, c.in_channels, frames, s, s),
        "timestep": mid_timestep(),
        "fps": torch.tensor([8]),
        "image_latents": image_latents,
        "image_embeddings": randn(gen, 1, c.cross_attention_dim),
        "encoder_hidden_states": randn(gen, 1, 4, c.cross_attention_dim),
    }


# The deprecated pipeline fills frames 1..F−1 of `image_latents` with (i+1)/(F−1), a value that
# depends on the clip length, so no world model can keep it. The forward also reads the call's
# frame 0 of `image_latents` as the image for its cross-attention context: a streamed call on the
# current frame alone must carry the image on its own frame. So the image goes on every frame.
IMAGE_CONDITION = ImageCondition(fill="every", arg="image_latents")


PLAN = Plan(
    name="i2vgenxl",
    model_class="I2VGenXLUNet",
    family="unet",
    pipeline=UNET_PIPELINE,
    layout=FrameLayout(inputs={"sample": 2, "image_latents": 2}, output_axis=2),
    targets={
        "causal-temporal-conv": Targets(owners=("TemporalConvLayer",)),
        "causal-temporal-attention": Targets(owners=("TransformerTemporalModel", "I2VGenXLTransformerTemporalEncoder")),
        "causal-norm": Targets(owners=("TransformerTemporalModel", "TemporalConvLayer")),
    },
    tiny_config=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        num_attention_heads=None,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(embedding="time_embedding", time_proj="time_proj", consumers=("ResnetBlock2D",)),
    streaming=Streaming(),
    description="I2VGen-XL image-to-video UNet",
    notes=(
        "the deprecated pipeline fills image_latents frames 1.. with (i+1)/(F-1), which depends on the "
        "clip length; the world model passes the window's first frame as the image on every frame",
    ),
    image_condition=lambda model: IMAGE_CONDITION,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
