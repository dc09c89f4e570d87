"""SanaVideoTransformer3DModel (Sana-Video): ReLU linear self-attention and a temporal conv in the FFN.

Two paths mix frames (BACKBONES.md §3.10), and each one alone keeps the model leaking (§7):
- attn1 is `SanaLinearAttnProcessor3_0`, global KᵀV sums over all T·P tokens. It never calls SDPA,
  so it needs its own pass: block-causal prefix sums over frames.
- `ff` is `GLUMBTempConv`, whose `conv_temp` is a `Conv2d((3,1), pad (1,0))` over (B, C, T, H·W):
  time is the first kernel axis of a Conv2d (pitfall 11). Its `conv_depth` is a per-frame 3x3
  Conv2d on (B·T, C, H, W), hence the explicit path.
attn2 is softmax cross-attention to the caption tokens (`SanaAttnProcessor2_0`): frame-local, not a
target. The patch embedding is Conv3d (1,2,2) with stride = kernel: frame-local.

Per-frame timesteps are native: `forward` embeds `timestep.flatten()` and views it as
(B, N, ·), every block reshapes it to (B, N, 6, D) and `norm_out` broadcasts `temb[:, :, None]`,
so a timestep per token (B, T·P) gives per-token AdaLN (WorldModel repeats frame t's timestep over
its P tokens). Actions are added per token to `time_embed.emb.timestep_embedder`'s (B·N, D) output,
upstream of both the blocks' 6·D modulation and norm_out's embedded timestep.
"""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens


def make_inputs(model, frames, gen):
    c = model.config
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 16, 16),
        "encoder_hidden_states": randn(gen, 1, 12, c.caption_channels),
        "timestep": mid_timestep(),
    }


PLAN = Plan(
    name="sana-video",
    model_class="SanaVideoTransformer3DModel",
    family="dit",
    pipeline="causal-temporal-conv,block-causal-linear-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        "causal-temporal-conv": Targets(paths=("transformer_blocks.*.ff.conv_temp",), conv_dims=(2,), time_axis=0),
        "block-causal-linear-attention": Targets(paths=("transformer_blocks.*.attn1",)),
    },
    tiny_config=dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=12,
        cross_attention_dim=24,
        caption_channels=16,
        mlp_ratio=2.5,
        dropout=0.0,
        attention_bias=False,
        sample_size=8,
        patch_size=(1, 2, 2),
        norm_elementwise_affine=False,
        norm_eps=1e-06,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
    make_inputs=make_inputs,
    # AdaLayerNormSingle (guidance_embeds=False, the released configs); the guidance variant
    # (SanaCombinedTimestepGuidanceEmbeddings) has no `emb` and is refused by the pass
    conditioning=Conditioning(
        embedding="time_embed.emb.timestep_embedder", mode="per-token", sample_arg="hidden_states"
    ),
    # the linear attention streams its running sums, conv_temp its last 2 input frames (both
    # installed by Stream for any plan); the Wan-style RoPE reads only the input's shape
    streaming=Streaming(rope="rope"),
    tokens=tokens,
    description="Sana-Video text-to-video DiT (linear attention + temporal conv FFN)",
    notes=(
        "both passes are needed: causal conv_temp alone or block-causal linear attention alone still leaks",
        "attn2 is frame-local cross-attention to text and is left as is",
        "RoPE frame indices restart at 0 on every call: streaming rollout offsets them by the cached frame count",
        "streaming rollout: the linear attention's running sums (LinearAttnState) are its cache (a call continues the "
        "prefix sums of the cached frames; calls must start on block boundaries), conv_temp keeps its last 2 input frames",
        "per-token timesteps: timestep (B, T·P) gives per-token AdaLN natively; actions are added to "
        "time_embed.emb.timestep_embedder's (B·N, D) output; guidance_embeds=True models are not supported",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
