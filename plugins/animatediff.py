"""UNetMotionModel (AnimateDiff): motion modules only (no temporal convs)."""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import latent_size, mid_timestep, randn


def make_inputs(model, frames, gen):
    c, s = model.config, latent_size(model)
    return {
        "sample": randn(gen, 1, c.in_channels, frames, s, s),
        "timestep": mid_timestep(),
        # UNetMotionModel expects the text already repeated per frame: (B*F, L, D).
        "encoder_hidden_states": randn(gen, 1, 4, c.cross_attention_dim).repeat(frames, 1, 1),
    }


PLAN = Plan(
    name="animatediff",
    model_class="UNetMotionModel",
    family="unet",
    pipeline="causal-temporal-attention,causal-norm",
    # encoder_hidden_states is (B*F, L, D); with the probe's batch of 1 its axis 0 is a frame axis.
    layout=FrameLayout(inputs={"sample": 2, "encoder_hidden_states": 0}, output_axis=2),
    targets={
        "causal-temporal-attention": Targets(owners=("AnimateDiffTransformer3D",)),
        "causal-norm": Targets(owners=("AnimateDiffTransformer3D",)),
    },
    tiny_config=dict(
        block_out_channels=(16, 32),
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=16,
        num_attention_heads=2,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=16,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(embedding="time_embedding", time_proj="time_proj", consumers=("ResnetBlock2D",)),
    streaming=Streaming(pe_tables=("SinusoidalPositionalEmbedding",)),
    description="AnimateDiff motion UNet (also used by SparseCtrl)",
    notes=("sinusoidal temporal position encoding is limited to temporal_max_seq_length frames (32)",),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
