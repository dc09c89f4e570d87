"""AllegroTransformer3DModel: full 3-D self-attention over frame-major tokens, cross-attention to text.

`attn1` is self-attention over every token of every frame; `attn2` is cross-attention to the text
(a separate sequence: no frame mixing) and stays as is. Both use `AllegroAttnProcessor2_0`, which
calls `attn.prepare_attention_mask` ("heads3d").

`forward`'s `attention_mask` is a 4-D video key-padding mask (B, F, H, W) that the model max-pools
to tokens and turns into a (B, 1, N) additive bias (-10000 on padded keys) for `attn1`. The
block-causal processor adds its own (B·heads, N, N) bias to that one, so both apply. The example
inputs carry such a mask (the right-most latent columns padded) so that every probe exercises the
combination, and the probe perturbs it per frame together with the latents.

Per-frame timesteps: Allegro's modulation is AdaLN-single, computed INLINE — every block does
`(scale_shift_table[None] + temb.reshape(B, 6, -1)).chunk(6, dim=1)` and multiplies the chunks
with its (B, N, D) tokens, and `forward` does the same for the final layer with
`embedded_timestep[:, None]`. No module returns the modulation, so no module can be swapped for
a per-token one. Instead `adaln_single.emb` (the timestep embedding both come from) returns a
FrameTensor (causalize.modules.frame_tensor): it has the per-sample shape those reshapes expect and
carries each frame's embedding (the delta hook's τ(k_t) − τ(k_0) + e_t) through `linear`,
`reshape`, `+ table`, `chunk`, until it meets the video tokens, where frame f's tokens get frame f's
modulation. No forward is copied; an operation it does not know raises.
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn


def tokens(model, kwargs) -> TokenGrid:
    """(B, C, F, H, W) latents, a per-frame 2-D patch embedding -> F token frames of (H/p)·(W/p) tokens."""
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p = model.config.patch_size
    return TokenGrid(frames, (height // p) * (width // p))


def make_inputs(model, frames, gen):
    c = model.config
    size = 4 * c.patch_size
    mask = torch.ones(1, frames, size, size)
    mask[..., -c.patch_size :] = 0  # the last token column of every frame is padding
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, size, size),
        "encoder_hidden_states": randn(gen, 1, 16, c.caption_channels),
        "timestep": mid_timestep(),
        "attention_mask": mask,
    }


PLAN = Plan(
    name="allegro",
    model_class="AllegroTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2, "attention_mask": 1}, output_axis=2),
    targets={"block-causal-attention": Targets(paths=("transformer_blocks.*.attn1",), mask_format="heads3d")},
    tiny_config=dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=16,
        sample_width=8,
        sample_height=8,
        sample_frames=4,
        caption_channels=8,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="adaln_single.emb.timestep_embedder",
        time_proj="adaln_single.emb.time_proj",
        sample_arg="hidden_states",
        modulation=("PixArtAlphaCombinedTimestepSizeEmbeddings",),
    ),
    # The patch embedding adds no positions (pos_embed_type=None): Allegro's only positions are the
    # 3-D RoPE its pipeline passes as image_rotary_emb for the whole clip; the rollout passes none
    # and a streaming call that gets one is refused. The video key-padding bias is cached with the keys.
    streaming=Streaming(caller_positions=("image_rotary_emb",)),
    tokens=tokens,
    description="Allegro text-to-video DiT: full 3-D self-attention (attn1) -> block-causal; attn2 is cross-attention to text",
    notes=(
        "the video key-padding mask of forward() (attention_mask) is kept: the causal bias is added to it",
        "3-D RoPE (image_rotary_emb) is computed by the pipeline; the example inputs leave it out (RoPE never mixes frames)",
        "streaming rollout: without image_rotary_emb the model has no positions to offset (a streaming call passed one is "
        "refused); the video key-padding bias of the history keys is cached with them",
        "per-frame timesteps: adaln_single.emb returns a FrameTensor, so the inline AdaLN-single modulation of every "
        "block and of the final layer is per frame",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
