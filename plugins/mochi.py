"""MochiTransformer3DModel: asymmetric joint attention over [video fm ; valid text], built per sample.

`MochiAttnProcessor2_0` loops over the batch in Python: for each sample it keeps only the valid
text tokens (`encoder_attention_mask`), concatenates them AFTER the video tokens
(`cat([query[idx], valid_encoder_query])`) and calls `F.scaled_dot_product_attention` with no
mask. A mask argument therefore never reaches attention; the block-causal processor runs in its
"sdpa-scope" mode instead: during the processor call each SDPA call gets the block-causal mask
of its own length L = T·P + that sample's valid text (context = L − T·P, a suffix).

The text attention pool in `time_embed` (query length 1) mixes text only and runs outside the
blocks' processor calls, so it is never masked.

Per-frame timesteps: temb (B, D) = timestep embedding + text pool, one per sample. The delta hook
embeds each frame's timestep with `time_embed.timestep_embedder`. Each block's video `norm1`
(MochiRMSNormZero) returns gates / the MLP scale that the block broadcasts itself
(`torch.tanh(gate_msa).unsqueeze(1)`, `1 + scale_mlp.unsqueeze(1)`); its twin hands the original
forward a FrameTensor temb (causalize.modules.frame_tensor), so they are per frame where they meet
the video tokens. `norm1_context` (the text stream, the same class) keeps the per-sample temb
(frame 0's timestep, in every frame's past), hence path targets; `norm_out`
(AdaLayerNormContinuous) is per frame.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_mochi import MochiRMSNormZero

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.modules.frame_modulation import frame_tensor
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn


class FrameMochiRMSNormZero(MochiRMSNormZero):
    """MochiRMSNormZero of the video stream with per-frame scale and gates (FrameTensor temb)."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, hidden_states, emb):
        frames = frame_tensor(self, emb, hidden_states)
        return super().forward(hidden_states, emb if frames is None else frames)


@hookimpl
def causalize_register_twins(register):
    register("MochiRMSNormZero", FrameMochiRMSNormZero)


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
            paths=("transformer_blocks.*.attn1",),
            context="suffix",
            joint=True,
            mask_format="sdpa-scope",
        ),
        # the video stream's modulation (norm1_context, the text stream's, is the same class)
        "frame-conditioning": Targets(paths=("transformer_blocks.*.norm1", "norm_out")),
    },
    tiny_config=dict(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="time_embed.timestep_embedder",
        time_proj="time_embed.time_proj",
        sample_arg="hidden_states",
        modulation=("MochiRMSNormZero", "AdaLayerNormContinuous"),
    ),
    # `rope(pos_frequencies, num_frames, height, width, ...)` returns (cos, sin) of (T·H·W, heads, ·);
    # attention streams with one KV cache per sample (the processor's per-sample SDPA loop)
    streaming=Streaming(rope="rope", rope_frames_arg=1, rope_token_axis=0),
    tokens=tokens,
    description="Mochi 1 text-to-video DiT (asymmetric joint attention, per-sample valid text)",
    notes=(
        "the processor calls SDPA per sample with no mask: masked through the sdpa-scope mode "
        "(torch.nn.functional.scaled_dot_product_attention is re-routed only during each attn1 call)",
        "the per-sample joint length is T·P + that sample's valid text; text is a suffix",
        "RoPE positions restart at frame 0 on every call: streaming rollout offsets them by the cached frame count",
        "streaming rollout keeps one KV cache per sample (each per-sample SDPA call of the loop attends to its sample's "
        "cached video keys and its own valid text)",
        "per-frame timesteps: the video stream's norm1 and norm_out are per frame; the text stream keeps frame 0's "
        "timestep",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
