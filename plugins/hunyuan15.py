"""HunyuanVideo15Transformer3DModel: dual-stream joint attention over [video fm ; context].

Read from diffusers' `transformer_hunyuan_video15.py`:
- `x_embedder` is a Conv3d (p_t, p, p), stride = kernel (released: p_t = p = 1): frame-major tokens;
- the context is built per sample from three sources, all per sample: SigLIP image tokens
  (`image_embedder`; all masked out when `image_embeds` is zero, text-to-video), ByT5 glyph tokens
  (`context_embedder_2`) and the MLLM text through the token refiner (`context_embedder`, text-only
  attention, left alone), reordered [valid image, valid ByT5, valid text, padding];
- every block is dual-stream (`transformer_blocks.*.attn`): the processor projects the context with
  `add_*_proj` and concatenates it after the video (joint=True, context="suffix"); there are no
  single-stream blocks. RoPE covers the video tokens only and restarts at frame 0 on every call.

The mask: unlike HunyuanVideo 1.0, `HunyuanVideo15AttnProcessor2_0` receives the context key mask
(B, N_ctx) and itself pads it over the video and expands it to (B, 1, L, L), so a ready (L, L) mask
cannot be handed to it. The block-causal processor runs in the "scope" mask format: the model's
processor keeps its own mask, and its one SDPA call over [video ; context] gets the block-causal
mask ANDed in (padded context rows stay fully masked, as in the stock model).

Per-frame timesteps: temb (B, D) = the timestep embedding (+ the MeanFlow `timestep_r` embedding,
per sample), modulating both streams as in HunyuanVideo 1.0 (plugins/hunyuan.py): the video
stream's `norm1` (AdaLayerNormZero) and `norm_out` (AdaLayerNormContinuous) become FrameTensor
twins; the context stream's `norm1_context` and the token refiner keep the per-sample timestep
(frame 0's, in every frame's past).

The forward takes the timestep in the latents' dtype (its pipeline casts it so): `time_embed`
casts the sinusoidal projection to the timestep's dtype, so an integer timestep would break it;
the plan's forward casts one.
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets, default_forward
from causalize.plugins.common import randn

TEXT_TOKENS, VALID_TEXT = 6, 4  # padded prompts: the context mask is exercised
GLYPH_TOKENS, VALID_GLYPH = 4, 3
IMAGE_TOKENS = 3


def tokens(model: torch.nn.Module, kwargs: dict) -> TokenGrid:
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    return TokenGrid(frames // pt, (height // p) * (width // p))


def make_inputs(model: torch.nn.Module, frames: int, gen: torch.Generator) -> dict[str, Any]:
    c = model.config
    mask = torch.zeros(1, TEXT_TOKENS)
    mask[:, :VALID_TEXT] = 1
    mask_2 = torch.zeros(1, GLYPH_TOKENS)
    mask_2[:, :VALID_GLYPH] = 1
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 8, 8),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_embed_dim),
        "encoder_attention_mask": mask,
        "encoder_hidden_states_2": randn(gen, 1, GLYPH_TOKENS, c.text_embed_2_dim),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": randn(gen, 1, IMAGE_TOKENS, c.image_embed_dim),  # zeros: text-to-video
    }


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's own forward, given its timesteps in the latents' dtype as its pipeline does
    (WorldModel and the rollout pass integer levels)."""
    dtype = inputs["hidden_states"].dtype
    cast = {
        name: inputs[name].to(dtype)
        for name in ("timestep", "timestep_r")
        if torch.is_tensor(inputs.get(name)) and not inputs[name].is_floating_point()
    }
    return default_forward(model, {**inputs, **cast} if cast else inputs)


def image_condition(model):
    """[latents ; the image's latent on frame 0, zeros after ; 1 mask channel]: in = 2·out + 1.
    The T2V pipeline feeds the same channels as zeros (`task_type="t2v"`)."""
    c = model.config
    if c.in_channels != 2 * (c.out_channels or c.in_channels) + 1:
        return None
    fill = "none" if getattr(c, "task_type", "i2v") == "t2v" else "first"
    return ImageCondition(fill=fill, parts=("image", "mask"), mask_channels=1)


PLAN = Plan(
    name="hunyuan15",
    model_class="HunyuanVideo15Transformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        # the processor pads / expands its own context mask: masked in the SDPA scope ("scope")
        "block-causal-attention": Targets(
            paths=("transformer_blocks.*.attn",), context="suffix", joint=True, mask_format="scope"
        ),
        # the video stream's modulation (not norm1_context, the context stream's AdaLayerNormZero)
        "frame-conditioning": Targets(paths=("transformer_blocks.*.norm1", "norm_out")),
    },
    tiny_config=dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    ),
    make_inputs=make_inputs,
    forward=forward,
    conditioning=Conditioning(
        embedding="time_embed.timestep_embedder",
        time_proj="time_embed.time_proj",
        sample_arg="hidden_states",
        modulation=("AdaLayerNormZero", "AdaLayerNormContinuous"),
    ),
    streaming=Streaming(rope="rope", rope_token_axis=0),
    tokens=tokens,
    description="HunyuanVideo 1.5 text/image-to-video DiT (dual-stream joint attention, MLLM + ByT5 + SigLIP context)",
    notes=(
        "joint attention over [video ; image, ByT5 and MLLM tokens]: context rows see only context, video rows the "
        "context and their own and earlier frames; the processor's own context mask is ANDed with the block-causal "
        "one inside the SDPA scope (mask_format 'scope': the processor builds its (L, L) mask from a context mask)",
        "the token refiner's text-only attention and the per-sample context embedders are not targeted",
        "patch_size_t > 1 couples the frames of one temporal patch (released configs use 1)",
        "the released checkpoints take 65 input channels (noisy latents ; condition latents ; mask, per frame on "
        "channels): per-frame inputs, no frame mixing; the tiny config uses 4 in / 4 out",
        "per-frame timesteps: norm1 and norm_out of the video stream are per frame; the context stream, the token "
        "refiner and MeanFlow's timestep_r embedding stay per sample (frame 0's timestep)",
        "integer timesteps are cast to the latents' dtype by the plan's forward (time_embed needs a float timestep)",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",
    ),
    image_condition=image_condition,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
