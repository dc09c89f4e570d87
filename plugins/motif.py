"""MotifVideoTransformer3DModel: HunyuanVideo-like dual-stream then single-stream joint attention over [video fm ; context].

Read from diffusers' `transformer_motif_video.py`:
- `x_embedder` is a Conv3d (p_t, p, p) with stride = kernel: frame-major tokens, one token frame per
  latent frame at p_t = 1 (released configs);
- dual-stream blocks (`transformer_blocks.*.attn`, `MotifVideoAttention` with `add_*_proj`) project
  the context with their own weights and concatenate it after the video; single-stream blocks get
  video and context as separate arguments and the processor (no `add_q_proj`) concatenates them
  itself. Either way the context (image-embedding tokens, then text) is a suffix the processor
  appends (joint=True, context="suffix"); `forward` pads `encoder_attention_mask` into a
  (B, 1, 1, N) boolean key mask, which the block-causal mask is ANDed into;
- the optional text cross-attention (`cross_attn`, `enable_text_cross_attention_*`) has video
  queries and text-only keys: per token, never mixes frames, left alone;
- RoPE (`rope`) covers the video tokens only and restarts at frame 0 on every call.

Per-frame timesteps: temb (B, D) is the timestep embedding alone (`time_text_embed`), one per
sample, modulating both streams as in HunyuanVideo (plugins/hunyuan.py): the video stream's
`norm1` (AdaLayerNormZero), the single-stream `norm` over [video ; context] (AdaLayerNormZeroSingle:
video tokens per frame, the context suffix per sample = frame 0's timestep, in every frame's past)
and `norm_out` become FrameTensor twins; the context stream's `norm1_context` keeps the per-sample
temb (path targets).

Refused configuration: `num_decoder_layers > 0`. Its last single-stream blocks attend over
[decoder video ; encoder output], where the "context" suffix is itself T·P video tokens (the main
stream's output, frame-major), which the block-causal layout (context = frame −1) would let every
frame see in full.
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.errors import UsageError
from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.hunyuan import TARGETS as HUNYUAN_TARGETS

TEXT_TOKENS = 12
VALID_TEXT = 9  # the example inputs pad the prompt, so the key-padding mask is exercised
IMAGE_TOKENS = 3


def tokens(model: torch.nn.Module, kwargs: dict) -> TokenGrid:
    """(B, C, F, H, W) latents -> F / p_t token frames of (H/p)·(W/p) tokens; refuses decoder layers."""
    c = model.config
    if c.num_decoder_layers:
        raise UsageError(
            f"MotifVideoTransformer3DModel with num_decoder_layers={c.num_decoder_layers} is not supported: its "
            "decoder blocks attend over [decoder video ; encoder video], a second frame-major video stream in the "
            "context slot, which the block-causal layout would show to every frame in full",
            "convert a configuration with num_decoder_layers=0",
        )
    _, _, frames, height, width = kwargs["hidden_states"].shape
    return TokenGrid(frames // c.patch_size_t, (height // c.patch_size) * (width // c.patch_size))


def make_inputs(model: torch.nn.Module, frames: int, gen: torch.Generator) -> dict:
    c = model.config
    mask = torch.zeros(1, TEXT_TOKENS)
    mask[:, :VALID_TEXT] = 1
    inputs = {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 8, 8),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_embed_dim),
        "encoder_attention_mask": mask,
    }
    if c.image_embed_dim is not None:  # image-to-video: vision tokens before the text
        inputs["image_embeds"] = randn(gen, 1, IMAGE_TOKENS, c.image_embed_dim)
    return inputs


def image_condition(model):
    """[latents ; the image's latent on frame 0, zeros after ; 1 mask channel]: in = 2·out + 1.
    One checkpoint serves both pipelines (T2V passes zeros there); the world model conditions on
    the window's first frame, as the I2V pipeline does."""
    c = model.config
    if c.in_channels != 2 * (c.out_channels or c.in_channels) + 1:
        return None
    return ImageCondition(fill="first", parts=("image", "mask"), mask_channels=1)


PLAN = Plan(
    name="motif",
    model_class="MotifVideoTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets=HUNYUAN_TARGETS,  # the same dual / single-stream layout, [video ; context]
    tiny_config=dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        num_single_layers=1,
        num_decoder_layers=0,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        norm_type="layer_norm",
        text_embed_dim=16,
        image_embed_dim=8,
        rope_theta=256.0,
        rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="time_text_embed.timestep_embedder",
        time_proj="time_text_embed.time_proj",
        sample_arg="hidden_states",
        modulation=("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"),
    ),
    streaming=Streaming(rope="rope", rope_token_axis=0),
    tokens=tokens,
    description="Motif-Video text/image-to-video DiT (dual- and single-stream joint attention, [video ; context])",
    notes=(
        "joint attention over [video ; image tokens ; text]: context rows see only context, video rows the context "
        "and their own and earlier frames; the text-padding key mask built by forward is ANDed in",
        "the text cross-attention (enable_text_cross_attention_*) has video queries and text keys: per token, untouched",
        "num_decoder_layers > 0 is refused: the decoder blocks' context slot holds the encoder's video tokens",
        "patch_size_t > 1 couples the frames of one temporal patch (released configs use 1)",
        "the released checkpoints take 33 input channels (noisy latents ; image-condition latents ; mask, per frame "
        "on channels): per-frame inputs, no frame mixing; the tiny config uses 4 in / 4 out",
        "per-frame timesteps: the video stream's AdaLN (norm1, single-stream norm, norm_out) is per frame, the "
        "context stream keeps frame 0's timestep",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",
    ),
    image_condition=image_condition,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
