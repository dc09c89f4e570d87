"""HunyuanVideoTransformer3DModel: dual-stream then single-stream joint attention over [video fm ; text].

Both kinds of block attend over the joint sequence: the dual-stream processor projects the text
with its own `add_*_proj` and concatenates it after the video, the single-stream processor gets
video and text as separate arguments and concatenates them itself. Either way the text is a
suffix that the processor appends (joint=True, context="suffix"). `forward` builds a (B,1,1,N)
boolean text-padding mask and passes it to every block; the block-causal processor ANDs its
(N,N) mask into it, so padded text stays hidden and text rows see only (valid) text.

The token refiner (`context_embedder.token_refiner`) attends over text only and is left alone.

Per-frame timesteps: temb (B, D) = timestep + guidance + pooled-text embeddings, one per sample.
The delta hook embeds each frame's timestep with `time_text_embed.timestep_embedder`; the video
stream's modulation becomes per frame through FrameTensor twins (causalize.modules.frame_tensor),
which hand the original norm forwards a temb that is per frame wherever it meets the tokens:
- dual-stream blocks: `norm1` (video, AdaLayerNormZero) -> per-frame shift / scale and the gates /
  MLP shift / scale the block broadcasts; `norm1_context` (text, the same class) is NOT swapped,
  hence path targets;
- single-stream blocks: `norm` (AdaLayerNormZeroSingle) over [video ; text]: video tokens per
  frame, the text suffix per sample (frame 0's timestep, in every frame's past);
- `norm_out` (AdaLayerNormContinuous, video tokens only).
The token refiner embeds the per-sample timestep (frame 0's) for the text: past, so causal.
`image_condition_type="token_replace"` blocks use other norm classes and are refused.
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
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
#: Where HunyuanVideo-style dual / single-stream MMDiTs mix frames and modulate per frame (Motif shares it).
TARGETS = {
    "block-causal-attention": (
        # dual-stream: video through to_q/k/v, text through add_q/k/v_proj, [video ; text]
        Targets(paths=("transformer_blocks.*.attn",), **_JOINT),
        # single-stream: the processor concatenates [video ; text] itself
        Targets(paths=("single_transformer_blocks.*.attn",), **_JOINT),
    ),
    # the video stream's modulation modules (not norm1_context, the text stream's AdaLayerNormZero)
    "frame-conditioning": (
        Targets(paths=("transformer_blocks.*.norm1", "norm_out")),
        Targets(paths=("single_transformer_blocks.*.norm",), context="suffix"),
    ),
}
#: The tiny HunyuanVideo the tests build; FramePack starts from it.
TINY_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=1,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 4, 4),
    image_condition_type=None,
)


def image_condition(model):
    """HunyuanVideo I2V with `image_condition_type="latent_concat"`: [latents ; the image's
    latent on frame 0, zeros after ; 1 mask channel]. ("token_replace" is refused by the
    frame-conditioning pass.)"""
    if getattr(model.config, "image_condition_type", None) != "latent_concat":
        return None
    return ImageCondition(fill="first", parts=("image", "mask"), mask_channels=1)


PLAN = Plan(
    name="hunyuan",
    model_class="HunyuanVideoTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets=TARGETS,
    tiny_config=TINY_CONFIG,
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="time_text_embed.timestep_embedder",
        time_proj="time_text_embed.time_proj",
        sample_arg="hidden_states",
        modulation=("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"),
    ),
    streaming=Streaming(rope="rope", rope_token_axis=0),
    tokens=tokens,
    description="HunyuanVideo text-to-video DiT (dual- and single-stream joint attention)",
    notes=(
        "the text-padding mask built by forward is combined with the block-causal mask (logical AND)",
        "the token refiner's text-only attention is not targeted",
        "patch_size_t > 1 couples the frames of one temporal patch: use block_size = patch_size_t",
        "image_condition_type='token_replace' only re-modulates frame 0 (t = 0): no extra frame mixing",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",
        "per-frame timesteps: the video stream's AdaLN (norm1, single-stream norm, norm_out) is per frame, the text "
        "stream keeps frame 0's timestep; image_condition_type='token_replace' is not supported",
    ),
    image_condition=image_condition,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
