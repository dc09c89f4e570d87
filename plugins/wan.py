"""WanTransformer3DModel (Wan 2.1 / 2.2): full self-attention over frame-major tokens, 3-D RoPE.

Only attn1 mixes frames; attn2 is cross-attention to text (and CLIP image tokens for I2V). The
block calls `attn1(x, None, None, rotary_emb)`, so the processor builds its mask itself.
"""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens

#: The tiny Wan the tests build; Wan-derived plugins start from it.
TINY_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def make_inputs(model, frames, gen):
    c = model.config
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 16, 16),
        "encoder_hidden_states": randn(gen, 1, 12, c.text_dim),
        "timestep": mid_timestep(),
    }


def image_condition(model):
    """Wan I2V (2.1 I2V, 2.2 I2V-A14B): [latents ; 4 mask channels (1 on the image's frame) ; the
    image's latent on frame 0, zeros after]: in_channels = 2 × out_channels + 4. The pipeline
    encodes [image, zero frames] (mid-grey in [-1, 1]) with its causal VAE, so its later frames
    hold the latents of grey frames, not zeros; the world model passes zeros there. Wan 2.2 TI2V-5B
    (`expand_timesteps`, in = out) conditions by the first frame itself: no extra channels."""
    c = model.config
    if c.in_channels != 2 * c.out_channels + 4:
        return None
    return ImageCondition(fill="first", parts=("mask", "image"), mask_channels=4)


PLAN = Plan(
    name="wan",
    model_class="WanTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={"block-causal-attention": Targets(paths=("blocks.*.attn1",))},
    tiny_config=TINY_CONFIG,
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder", mode="per-token", sample_arg="hidden_states"
    ),
    streaming=Streaming(rope="rope"),
    tokens=tokens,
    description="Wan 2.1 / 2.2 text- and image-to-video DiT",
    notes=("RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",),
    image_condition=image_condition,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
