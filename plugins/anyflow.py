"""AnyFlow (Wan 2.1 backbone distilled into a flow map Φ_{r←t}): the bidirectional model gets a
plan; the FAR variant is causal by construction and is verified, not converted.

AnyFlowTransformer3DModel: input (B, F, C, H, W), patchified (1, 2, 2) by a Conv3d (per frame),
frame-major tokens. Only `blocks.*.attn1` mixes frames (full self-attention, RoPE); `attn2` is
cross-attention to text (+ CLIP image tokens). Timesteps are native per frame: `timestep` and
`r_timestep` are (B, F); the condition embedder embeds each frame's (t, r) and repeats the
modulation over that frame's tokens, so per-frame conditioning is the model's own path and the
action embedding is added, per frame, to `condition_embedder.time_embedder`'s output. The target
`r_timestep` (B, F) stays an ordinary input of the caller (the WorldModel passes `timestep`).
The RoPE module takes a `layout_cfg` dict (frame count inside), not a tensor: streaming offsets it
with a hook that computes offset + F frames and keeps the last F.

AnyFlowFARTransformer3DModel: already causal. Its self-attention (AnyFlowCausalAttnProcessor,
flex backend only) uses a BlockMask built from chunk ids (`frame_idx[q] >= frame_idx[kv]`, one id
per chunk of `chunk_partition`), older chunks are compressed (1, 4, 4) per frame, and it has a KV
cache of its own. Nothing to convert: it is refused for conversion with that reason, and
`FAR_PLAN` (not registered: the registry's tests require a stock model to leak) lets `verify`
confirm it unconverted (tests/test_new_families_misc.py); with one frame per chunk its mask equals
causalize's frame-causal mask on the same grid, with k-frame chunks the block-causal one.
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Refusal, Streaming, Targets
from causalize.plugins.common import randn

TEXT_TOKENS = 12
HEIGHT = WIDTH = 16


def tokens(model, kwargs) -> TokenGrid:
    _, frames, _, height, width = kwargs["hidden_states"].shape
    pt, ph, pw = model.config.patch_size
    return TokenGrid(frames // pt, (height // ph) * (width // pw))


def make_inputs(model, frames, gen):
    c = model.config
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, HEIGHT, WIDTH).transpose(1, 2).contiguous(),
        "timestep": torch.full((1, frames), 500),
        "r_timestep": torch.full((1, frames), 250),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_dim),
    }


def per_frame(inputs: dict[str, Any]) -> dict[str, Any]:
    """A per-sample `timestep` / `r_timestep` (B,) or scalar, as other DiTs take, repeated over the
    frames: the model itself only takes (B, F)."""
    batch, frames = inputs["hidden_states"].shape[:2]
    out = dict(inputs)
    for name in ("timestep", "r_timestep"):
        t = out.get(name)
        if torch.is_tensor(t) and t.dim() < 2:
            out[name] = t.reshape(-1, 1).expand(batch, frames)
    return out


def forward(model, inputs) -> torch.Tensor:
    return model(**per_frame(inputs), return_dict=False)[0]


def per_frame_timesteps(model, sample, timesteps):
    """The model takes one timestep per frame, (B, F), as the WorldModel's timesteps are."""
    return timesteps


def install_rope_offset(model, stream) -> None:
    """Streaming: rotary positions of frames offset..offset+F−1. The module reads the frame count
    from its `layout_cfg` argument; the hook recomputes it for offset + F frames and keeps the
    last F frames' tokens (its output is frame-major on axis 2)."""
    rope = model.rope
    state_of = stream.state_of
    stream.attach(rope)

    def offset(module, args, kwargs, output):
        state = state_of(module)
        if state is None or state.offset == 0:
            return None
        cfg = kwargs["layout_cfg"] if "layout_cfg" in kwargs else args[0]
        device = kwargs["device"] if "device" in kwargs else args[1]
        longer = {**cfg, "total_frames": cfg["total_frames"] + state.offset}
        full = type(module).forward(module, layout_cfg=longer, device=device)  # the module's own forward, no hooks
        skip = state.offset * cfg["full_frame_shape"][0] * cfg["full_frame_shape"][1]
        return {k: v[:, :, skip:] for k, v in full.items()}

    rope.register_forward_hook(offset, with_kwargs=True)


_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
    gate_value=0.25,
    deltatime_type="r",
)

PLAN = Plan(
    name="anyflow",
    model_class="AnyFlowTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    # timestep / r_timestep carry one entry per frame too: the probe perturbs and slices them with the latents
    layout=FrameLayout(inputs={"hidden_states": 1, "timestep": 1, "r_timestep": 1}, output_axis=1),
    targets={"block-causal-attention": Targets(paths=("blocks.*.attn1",))},
    tiny_config=_TINY,
    make_inputs=make_inputs,
    forward=forward,
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder",
        mode="per-token",
        sample_arg="hidden_states",
        model_timesteps=per_frame_timesteps,
    ),
    streaming=Streaming(hooks=(install_rope_offset,)),
    tokens=tokens,
    description="AnyFlow flow-map DiT (Wan 2.1 backbone, dual (t, r) timestep embedding), bidirectional variant",
    notes=(
        "only attn1 mixes frames; attn2 is cross-attention to text / image tokens",
        "timestep and r_timestep are native (B, F): per-frame conditioning is the model's own path; actions are added "
        "to condition_embedder.time_embedder's per-frame output; r_timestep stays a caller input",
        "a per-sample timestep / r_timestep (B,) is repeated over the frames by the plan's forward (the model "
        "takes (B, F) only)",
        "the RoPE module takes a layout_cfg dict: streaming recomputes it for offset + F frames and keeps the last F",
        "AnyFlowFARTransformer3DModel is causal by construction (flex BlockMask, KV cache): refused for conversion, "
        "verified unconverted with FAR_PLAN",
    ),
)


# --------------------------------------------------------------------------- FAR (verified, not converted)


def far_inputs(model, frames, gen) -> dict[str, Any]:
    """One frame per chunk (the finest chunking), so the probe measures frame causality."""
    return {**make_inputs(model, frames, gen), "chunk_partition": [1] * frames}


def far_forward(model, inputs) -> torch.Tensor:
    """FAR outputs only its full-resolution chunks (the last `full_chunk_limit`): earlier frames,
    fed as compressed context, get no output. Zeros stand in for them so output frame i is input
    frame i (a frame with no output has no influence to measure)."""
    inputs = per_frame(inputs)
    frames = inputs["hidden_states"].shape[1]
    inputs.setdefault("chunk_partition", [1] * frames)
    out = model(**inputs, return_dict=False)[0]
    missing = frames - out.shape[1]
    if missing:
        out = torch.cat([out.new_zeros(out.shape[0], missing, *out.shape[2:]), out], dim=1)
    return out


FAR_PLAN = Plan(
    name="anyflow-far",
    model_class="AnyFlowFARTransformer3DModel",
    family="dit",
    pipeline="",  # nothing to convert
    layout=FrameLayout(inputs={"hidden_states": 1, "timestep": 1, "r_timestep": 1}, output_axis=1),
    targets={},
    tiny_config={**_TINY, "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 8},
    make_inputs=far_inputs,
    forward=far_forward,
    tokens=tokens,
    description="AnyFlow FAR: chunk-causal by construction (flex BlockMask over chunk ids, compressed past chunks)",
    notes=("not registered: verify it unconverted with this plan; refused for conversion",),
)

FAR_REFUSAL = Refusal(
    model_class="AnyFlowFARTransformer3DModel",
    reason=(
        "already causal: its self-attention uses a chunk-causal flex BlockMask (frame_idx[q] >= frame_idx[kv] per "
        "chunk of chunk_partition) and a KV cache of its own, so there is nothing to convert; verify it unconverted "
        "with causalize.plugins.anyflow.FAR_PLAN"
    ),
    nearest="anyflow",
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)


@hookimpl
def causalize_register_refusals(register):
    register(FAR_REFUSAL)
