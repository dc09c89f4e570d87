"""SkyReelsV2Transformer3DModel (SkyReels-V2 T2V / I2V / DF): Wan's DiT plus an optional native block mask.

Tokens, RoPE, AdaLN and the attn1 / attn2 split are Wan's. The differences that matter here:

- `forward` builds a dense boolean (1, 1, N, N) block-causal mask only when
  `config.num_frame_per_block > 1` (set by `_set_ar_attention(k)`), and every block hands it to
  attn1 *positionally*: `attn1(x, None, attention_mask, rotary_emb)`. With the default
  `num_frame_per_block=1` that argument is `None` and attention is full (BACKBONES pitfall 5).
- Our processor therefore builds its own frame-causal mask from the frame context and, when the
  native mask is present, ANDs the two (boolean masks stay boolean for `dispatch_attention_fn`):
  the result is never less causal than either.
"""

from __future__ import annotations

from causalize.errors import CausalizeError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import patch3d_tokens as tokens
from causalize.plugins.wan import TINY_CONFIG as WAN_TINY
from causalize.plugins.wan import image_condition, make_inputs


def model_timesteps(model, sample, timesteps):
    """Per-frame timesteps (B, T) in SkyReels-V2's diffusion-forcing format: (B, F) itself.

    With `enable_diffusion_forcing=True` the forward embeds each frame's timestep once (the time
    embedder's output is (B, F, D)) and repeats temb / timestep_proj over the frame's tokens
    itself; the (B, seq_len) Wan path does not exist here (a (B, N, 6, D) timestep_proj is read as
    (B, 6, N, D) by the blocks). F must be the token-frame count, hence p_t = 1.
    """
    if int(model.config.patch_size[0]) != 1:
        raise CausalizeError(
            f"per-frame timesteps need patch_size_t = 1, this SkyReels-V2 has {model.config.patch_size[0]}",
            "frames inside one temporal patch share a token and cannot have their own noise level",
        )
    return timesteps


PLAN = Plan(
    name="skyreels-v2",
    model_class="SkyReelsV2Transformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    # attn1: video self-attention (frame-major tokens). attn2 is cross-attention to text (and, for
    # I2V, CLIP image tokens through add_k_proj / add_v_proj): it never mixes frames.
    targets={"block-causal-attention": Targets(paths=("blocks.*.attn1",), mask_format="bool4d")},
    tiny_config=WAN_TINY,
    make_inputs=make_inputs,
    # Diffusion forcing: timestep (B, F) -> condition_embedder.time_embedder gives temb (B, F, D),
    # which feeds both time_proj (the blocks' AdaLN, repeated over each frame's tokens by forward)
    # and norm_out's shift/scale. The action embedding is added to that per-frame temb.
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder",
        mode="per-token",
        sample_arg="hidden_states",
        model_timesteps=model_timesteps,
        extra_kwargs=(("enable_diffusion_forcing", True),),
    ),
    streaming=Streaming(rope="rope"),
    tokens=tokens,
    description="SkyReels-V2 text/image-to-video and diffusion-forcing DiT (Wan architecture)",
    notes=(
        "the native num_frame_per_block=1 builds no mask (full attention); the converted model is frame-causal "
        "for any num_frame_per_block",
        "with num_frame_per_block=k>1 the native (1,1,N,N) block mask reaches attn1 positionally and is ANDed with "
        "ours: the result is frame-causal; for k-frame blocks convert with block-causal-attention{block_size=k}",
        "native num_frame_per_block>1 requires the latent frame count to be a multiple of k (its mask view fails "
        "otherwise); ours has no such constraint",
        "per-frame timesteps: enable_diffusion_forcing=True with timestep (B, F) gives per-frame AdaLN (WorldModel "
        "passes both); actions are added to the per-frame temb (B, F, D) of condition_embedder.time_embedder",
        "RoPE frame indices restart at 0 on every call: streaming needs global offsets",
    ),
    image_condition=image_condition,  # SkyReels-V2 I2V: Wan's rule (in = 2·out + 4)
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
