"""ConsisIDTransformer3DModel: CogVideoX 1.0 (joint [text ; video] attention) plus identity conditioning.

Read from diffusers' `consisid_transformer_3d.py`: the backbone is CogVideoX 1.0's — a
`CogVideoXPatchEmbed` without temporal patching (a per-frame Conv2d; sincos positions when RoPE is
off), `ConsisIDBlock`s whose only attention, `attn1` (`CogVideoXAttnProcessor2_0`), concatenates
the text in front of the video itself, `CogVideoXLayerNormZero` modulation, an `AdaLayerNorm`
norm_out. So the CogVideoX plan's attention targets, conditioning and streaming apply as they are
(plugins/cogvideox.py).

The identity path adds nothing that mixes frames: `LocalFacialExtractor` turns the face embedding
(`id_cond`) and the face ViT features (`id_vit_hidden`) into per-sample tokens (its Perceiver
attention runs over those tokens only), and every `perceiver_cross_attention` layer adds to each
video token an attention from that token to the face tokens: per token, past-free. `norm_final`
is a per-token LayerNorm over [text ; video].
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Plan, default_forward
from causalize.plugins.cogvideox import CONDITIONING, STREAMING, TARGETS, image_condition
from causalize.plugins.common import mid_timestep, randn

VIT_TOKENS = 2


def tokens(model: torch.nn.Module, kwargs: dict) -> TokenGrid:
    """(B, F, C, H, W) latents -> F token frames of (H/p)·(W/p) tokens (no temporal patching)."""
    _, frames, _, height, width = kwargs["hidden_states"].shape
    p = model.config.patch_size
    return TokenGrid(frames, (height // p) * (width // p))


def make_inputs(model: torch.nn.Module, frames: int, gen: torch.Generator) -> dict[str, Any]:
    c = model.config
    if c.use_learned_positional_embeddings:  # tied to the checkpoint's resolution
        height, width = c.sample_height, c.sample_width
    else:
        height = width = 4 * c.patch_size
    inputs = {
        "hidden_states": randn(gen, 1, frames, c.in_channels, height, width),
        # sincos position embeddings have exactly max_text_seq_length text slots
        "encoder_hidden_states": randn(gen, 1, c.max_text_seq_length, c.text_embed_dim),
        "timestep": mid_timestep(),
    }
    if c.is_train_face:  # the face embedding and one ViT feature map per scale of the facial extractor
        inputs["id_cond"] = randn(gen, 1, c.LFE_id_dim)
        inputs["id_vit_hidden"] = [randn(gen, 1, VIT_TOKENS, c.LFE_vit_dim) for _ in range(c.LFE_num_scale)]
    return inputs


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's own forward, with `id_vit_hidden` (a list, which callers cannot batch like a
    tensor) expanded to the batch of `hidden_states` when it is given at batch 1."""
    vit = inputs.get("id_vit_hidden")
    batch = inputs["hidden_states"].shape[0]
    if isinstance(vit, (list, tuple)) and batch > 1:
        inputs = {**inputs, "id_vit_hidden": [v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for v in vit]}
    return default_forward(model, inputs)


PLAN = Plan(
    name="consisid",
    model_class="ConsisIDTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 1}, output_axis=1),
    targets={"block-causal-attention": TARGETS},
    tiny_config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=13,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
        cross_attn_interval=1,
        is_kps=False,
        is_train_face=True,
        cross_attn_dim_head=1,
        cross_attn_num_heads=1,
        LFE_id_dim=2,
        LFE_vit_dim=2,
        LFE_depth=5,
        LFE_dim_head=8,
        LFE_num_heads=2,
        LFE_num_id_token=1,
        LFE_num_querie=1,
        LFE_output_dim=10,
        LFE_ff_mult=1,
        LFE_num_scale=1,
        use_rotary_positional_embeddings=True,
    ),
    make_inputs=make_inputs,
    forward=forward,
    tokens=tokens,
    conditioning=CONDITIONING,
    image_condition=image_condition,
    streaming=STREAMING,
    description="ConsisID identity-preserving text-to-video DiT (CogVideoX 1.0 backbone): frame-causal",
    notes=(
        "the CogVideoX 1.0 plan's attention rule: joint [text ; video], text rows see only text, video rows the "
        "text and their own and earlier frames",
        "identity conditioning (LocalFacialExtractor, perceiver cross-attention) is per sample / per token: untouched",
        "3-D RoPE (image_rotary_emb) is computed by the pipeline; the example inputs leave it out (RoPE never mixes "
        "frames); a streaming call given it is refused, sincos patch positions are offset by the cached frame count",
        "per-frame timesteps: CogVideoXLayerNormZero / AdaLayerNorm twins, the text keeps frame 0's timestep",
        "id_vit_hidden is a list, which callers cannot batch: the plan's forward expands batch-1 entries",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
