"""EasyAnimateTransformer3DModel (EasyAnimate V5 / V5.1): joint [text ; video] attention, 3-D RoPE.

Every block has one attention, `attn1`, and its processor (`EasyAnimateAttnProcessor2_0`) builds
the joint sequence itself, with the text in front:
- MMDiT blocks (the first `mmdit_layers`) project text with their own add_q/k/v projections and
  concatenate [text ; video] along the sequence after the projections;
- the remaining blocks concatenate `encoder_hidden_states` in front of `hidden_states` before the
  shared projections.
Either way the sequence is [text (+ T5 text) ; video frame-major], the block passes no mask, and the
processor hands `attention_mask` to SDPA unchanged (so a (1, 1, L, L) boolean mask: "bool4d").
RoPE is recomputed from the latent shape inside `forward` and applied to the video part only.

Per-frame timesteps: one temb per sample feeds every block's two `EasyAnimateLayerNormZero`s,
which modulate video AND text with it and return gates the block broadcasts itself
(`gate.unsqueeze(1) * attn_hidden_states`). Their twin (below) runs the original forward twice:
once for the video stream with a FrameTensor temb (per-frame shift / scale / gate, see
causalize.modules.frame_tensor) and an empty text sequence, once for the text stream with the
per-sample temb (frame 0's timestep, in every frame's past) and an empty video sequence. So the
text never depends on which sequence is which length. `norm_out` is an AdaLayerNorm(chunk_dim=1)
on the video tokens (FrameAdaLayerNorm).
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_easyanimate import EasyAnimateLayerNormZero

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.modules.frame_modulation import frame_tensor
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn


class FrameEasyAnimateLayerNormZero(EasyAnimateLayerNormZero):
    """EasyAnimateLayerNormZero with per-frame video modulation and per-sample text modulation."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, hidden_states, encoder_hidden_states, temb):
        frames = frame_tensor(self, temb, hidden_states)
        if frames is None:
            return super().forward(hidden_states, encoder_hidden_states, temb)
        video, _, gate, _ = super().forward(hidden_states, encoder_hidden_states[:, :0], frames)
        _, text, _, text_gate = super().forward(hidden_states[:, :0], encoder_hidden_states, temb)
        return video, text, gate, text_gate


@hookimpl
def causalize_register_twins(register):
    register("EasyAnimateLayerNormZero", FrameEasyAnimateLayerNormZero)


def tokens(model, kwargs) -> TokenGrid:
    """(B, C, F, H, W) latents, a per-frame Conv2d patch embedding -> F token frames of (H/p)·(W/p) tokens."""
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p = model.config.patch_size
    return TokenGrid(frames, (height // p) * (width // p))


def make_inputs(model, frames, gen):
    c = model.config
    latent = c.out_channels or c.in_channels
    size = 8 * c.patch_size
    inputs = {
        "hidden_states": randn(gen, 1, latent, frames, size, size),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, 16, c.text_embed_dim),
    }
    if c.text_embed_dim_t5 is not None:
        inputs["encoder_hidden_states_t5"] = randn(gen, 1, 8, c.text_embed_dim_t5)
    if c.in_channels > latent:  # inpaint / control variants: the extra channels arrive as separate latents
        inputs["inpaint_latents"] = randn(gen, 1, c.in_channels - latent, frames, size, size)
    return inputs


PLAN = Plan(
    name="easyanimate",
    model_class="EasyAnimateTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        "block-causal-attention": Targets(
            paths=("transformer_blocks.*.attn1",),
            context="prefix",
            joint=True,
            mask_format="bool4d",
        )
    },
    tiny_config=dict(
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        mmdit_layers=2,
        num_layers=2,
        out_channels=4,
        patch_size=2,
        sample_height=60,
        sample_width=90,
        text_embed_dim=16,
        time_embed_dim=8,
        time_position_encoding_type="3d_rope",
        timestep_activation_fn="silu",
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="time_embedding",
        time_proj="time_proj",
        sample_arg="hidden_states",
        modulation=("EasyAnimateLayerNormZero", "AdaLayerNorm"),
    ),
    streaming=Streaming(rope="rope_embedding", rope_token_axis=0),
    tokens=tokens,
    description="EasyAnimate V5 / V5.1 DiT: joint [text ; video] attention (MMDiT and shared-projection blocks)",
    notes=(
        "joint attention over [text ; video]: text rows see only text, video rows see the text, their own and earlier frames",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count",
        "inpaint / control variants: the example inputs' inpaint_latents are not perturbed per frame by the probe",
        "per-frame timesteps: every EasyAnimateLayerNormZero and norm_out become per-frame twins (video tokens per "
        "frame, text per sample = frame 0's timestep); timestep_cond is not supported with per-frame timesteps",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
