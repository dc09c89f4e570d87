"""WanVACETransformer3DModel (Wan 2.1 VACE): Wan's DiT plus a control branch that adds hints.

What differs from Wan, read from its forward:

- `control_hidden_states` (B, C_vace, F, H, W) is a second frame-aligned video: patchified by its own
  Conv3d (p_t = 1), zero-padded at the end to Wan's token count, run through `vace_blocks`
  (Wan blocks whose first one adds the noisy tokens, `proj_in(c) + x`), and each block's
  `proj_out` hint is added, per token, after the main block of `vace_layers[i]`. The hint blocks'
  `attn1` is full self-attention over the control video with the same RoPE: it mixes frames exactly
  like the main `attn1` and gets the same block-causal mask. Everything else in the branch is per
  token, so frame j of the control video reaches no earlier output once both masks are in place.
- The forward takes one timestep per sample only: it calls the condition embedder without
  `timestep_seq_len` and unflattens `timestep_proj` as (B, 6, D), so Wan 2.2's per-token
  `timestep (B, N)` fails there (Timesteps asserts a 1-D input). Per-frame timesteps therefore go
  the per-sample DiTs' way (mode "delta"): the condition embedder becomes a twin that returns temb
  and timestep_proj as FrameTensors (causalize.modules.frame_tensor), whose per-frame values meet
  the tokens where the blocks and norm_out broadcast them; the forward's own arithmetic runs.
"""

from __future__ import annotations

import torch.nn as nn
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding

from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.modules.frame_modulation import frame_tensor
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens
from causalize.plugins.wan import TINY_CONFIG as WAN_TINY


def frame_modulated_embedding(parent: type[nn.Module]) -> type[nn.Module]:
    """The frame-modulated twin of a Wan condition embedder class (`forward(timestep, text, image,
    timestep_seq_len)` -> temb, timestep_proj, text, image with `timestep_proj = time_proj(act_fn(temb))`).

    Inside a per-frame WorldModel call, temb becomes a FrameTensor (frame t: temb + delta_t, the
    delta hook's per-frame embedding plus action) and timestep_proj is the module's own time_proj
    and act_fn applied to it, so both the blocks' AdaLN and norm_out see frame t's embedding on
    frame t's tokens. Otherwise (direct calls, or the native per-token path) it is the original.
    Diffusers copies this class per model file (Wan, Wan-Animate), hence a factory.
    """

    def forward(self, timestep, encoder_hidden_states, encoder_hidden_states_image=None, timestep_seq_len=None):
        temb, proj, text, image = parent.forward(
            self, timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len
        )
        frames = None if timestep_seq_len is not None else frame_tensor(self, temb)
        if frames is None:
            return temb, proj, text, image
        return frames, self.time_proj(self.act_fn(frames)), text, image

    def supports(cls, module: nn.Module) -> str | None:
        return None

    return type(
        f"Frame{parent.__name__}",
        (parent,),
        {"forward": forward, "supports": classmethod(supports), "__module__": __name__, "__doc__": parent.__doc__},
    )


FrameWanTimeTextImageEmbedding = frame_modulated_embedding(WanTimeTextImageEmbedding)


def make_inputs(model, frames, gen):
    c = model.config
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 16, 16),
        "encoder_hidden_states": randn(gen, 1, 12, c.text_dim),
        "control_hidden_states": randn(gen, 1, c.vace_in_channels, frames, 16, 16),
        "timestep": mid_timestep(),
    }


PLAN = Plan(
    name="wan-vace",
    model_class="WanVACETransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    # the control video is frame-aligned with the latents: the probe perturbs both at frame j
    layout=FrameLayout(inputs={"hidden_states": 2, "control_hidden_states": 2}, output_axis=2),
    targets={
        "block-causal-attention": Targets(paths=("blocks.*.attn1", "vace_blocks.*.attn1")),
        "frame-conditioning": Targets(paths=("condition_embedder",)),
    },
    tiny_config=WAN_TINY
    | dict(
        num_layers=3,
        vace_layers=[0, 2],
        vace_in_channels=8,
    ),
    make_inputs=make_inputs,
    # timestep (B,) -> condition_embedder: time_embedder gives temb (B, D) -> time_proj(SiLU) the
    # blocks' (B, 6, D) AdaLN (main and hint blocks) and temb norm_out's shift / scale. The delta hook
    # on time_embedder gives each frame's embedding (+ action); the condition embedder's twin turns
    # temb and timestep_proj into FrameTensors carrying them.
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder",
        time_proj="condition_embedder.timesteps_proj",
        sample_arg="hidden_states",
        modulation=("WanTimeTextImageEmbedding",),
    ),
    streaming=Streaming(rope="rope"),
    tokens=tokens,
    description="Wan 2.1 VACE all-in-one video creation / editing DiT (Wan + control hint blocks)",
    notes=(
        "block-causal attn1 in the main blocks and in the VACE hint blocks (vace_blocks.*.attn1), which attend over "
        "the control video with the same RoPE; control_hidden_states must be frame-aligned with hidden_states (the "
        "forward zero-pads missing control tokens at the end, i.e. missing last frames)",
        "per-frame timesteps: the forward takes (B,) only (no Wan 2.2 per-token path: it unflattens timestep_proj "
        "as (B, 6, D)); frame-conditioning runs in delta mode with a frame-modulated condition embedder whose temb / "
        "timestep_proj are FrameTensors, so every block (main and hint) and norm_out modulate frame t with t_t",
        "RoPE frame indices restart at 0 on every call: streaming offsets them by the cached frame count; the hint "
        "blocks' attention is cached like the main blocks'",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)


@hookimpl
def causalize_register_twins(register):
    register("WanTimeTextImageEmbedding", FrameWanTimeTextImageEmbedding)
