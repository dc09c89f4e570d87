"""UNetSpatioTemporalConditionModel (Stable Video Diffusion): input (B, F, C, H, W)."""

from __future__ import annotations

import torch

from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import UNET_PIPELINE, latent_size, mid_timestep, randn


def make_inputs(model, frames, gen):
    c, s = model.config, latent_size(model)
    return {
        "sample": randn(gen, 1, frames, c.in_channels, s, s),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, 1, c.cross_attention_dim),
        # fps, motion bucket, noise augmentation: per sample, frame-local.
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]),
    }


def image_condition(model):
    """SVD's pipeline concatenates the image's raw (unscaled) VAE latent to every frame:
    in_channels = 2 × out_channels."""
    c = model.config
    if c.in_channels != 2 * c.out_channels:
        return None
    return ImageCondition(fill="every", units="raw")


PLAN = Plan(
    name="svd",
    model_class="UNetSpatioTemporalConditionModel",
    family="unet",
    pipeline=UNET_PIPELINE,
    layout=FrameLayout(inputs={"sample": 1}, output_axis=1),
    targets={
        "causal-temporal-conv": Targets(owners=("TemporalResnetBlock",)),
        # attn1 is self-attention over frames; attn2 is cross-attention to the image context.
        "causal-temporal-attention": Targets(owners=("TemporalBasicTransformerBlock",)),
        "causal-norm": Targets(owners=("TemporalResnetBlock",)),
    },
    tiny_config=dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=16,
        projection_class_embeddings_input_dim=24,
        addition_time_embed_dim=8,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(embedding="time_embedding", time_proj="time_proj", consumers=("SpatioTemporalResBlock",)),
    streaming=Streaming(frame_index=("TransformerSpatioTemporalModel.time_proj",)),
    image_condition=image_condition,
    description="Stable Video Diffusion image-to-video UNet",
    notes=("time_pos_embed uses frame indices from 0: streaming needs global indices",),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
