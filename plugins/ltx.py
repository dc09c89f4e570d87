"""LTXVideoTransformer3DModel (LTX-Video 0.9.x): full self-attention over PACKED frame-major tokens.

The model's input is already patchified: `hidden_states (B, F·H·W, C)` (the pipeline's
`_pack_latents`, p = p_t = 1 in released weights) plus `num_frames, height, width` for the RoPE
grid. Frames are therefore contiguous chunks of H·W tokens along axis 1, not an axis of their
own, and the causality probe (which perturbs and reads one index of a frame axis) cannot address
them directly. The plan's `forward` adapts instead of the probe: it takes UNPACKED latents
`(B, C, F, H, W)` under the key `latents`, packs them exactly like the pipeline, calls the model's
own forward with `num_frames/height/width` of that grid, and unpacks the output to
`(B, C, F, H, W)`. The layout is then the plain `{"latents": 2}`, output axis 2. The converted
model itself is untouched and is still called with packed tokens as before.

attn1 is video self-attention (3-D RoPE on fractional coordinates); the block calls it with no
mask, so the processor builds one. `LTXVideoAttnProcessor` runs `attn.prepare_attention_mask`
on any mask it gets and views it as (B, heads, Lq, Lk): hence the "heads3d" mask format. attn2 is
cross-attention to text (with the text key mask) and never mixes frames.
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.context import TokenGrid
from causalize.errors import CausalizeError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets, default_forward
from causalize.plugins.common import mid_timestep, randn


def _patch(model) -> tuple[int, int]:
    return int(model.config.patch_size_t), int(model.config.patch_size)


def pack(latents: torch.Tensor, patch_size_t: int = 1, patch_size: int = 1) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/pt · H/p · W/p, C·pt·p·p): frame-major tokens, as the LTX pipeline packs."""
    b, c, f, h, w = latents.shape
    pt, p = patch_size_t, patch_size
    x = latents.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(
    tokens: torch.Tensor, frames: int, height: int, width: int, patch_size_t: int = 1, patch_size: int = 1
) -> torch.Tensor:
    """Inverse of `pack`: (B, F·H·W, C·pt·p·p) -> (B, C, F·pt, H·p, W·p), with F, H, W the token grid."""
    b = tokens.shape[0]
    pt, p = patch_size_t, patch_size
    x = tokens.reshape(b, frames, height, width, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def forward(model, inputs: dict[str, Any]) -> torch.Tensor:
    """Unpacked in, unpacked out: pack `latents`, call the model's own forward, unpack its output."""
    kwargs = dict(inputs)
    latents = kwargs.pop("latents")
    pt, p = _patch(model)
    _, _, f, h, w = latents.shape
    grid = dict(num_frames=f // pt, height=h // p, width=w // p)
    out = default_forward(model, {**kwargs, "hidden_states": pack(latents, pt, p), **grid})
    return unpack(out, grid["num_frames"], grid["height"], grid["width"], pt, p)


def tokens(model, kwargs) -> TokenGrid:
    """Token grid of a root forward call: packed `hidden_states` + its `num_frames/height/width`."""
    frames, height, width = kwargs.get("num_frames"), kwargs.get("height"), kwargs.get("width")
    if frames is None or height is None or width is None:
        raise CausalizeError(
            "a causal LTX model needs num_frames, height and width to find frames among the packed tokens",
            "pass num_frames/height/width (of the token grid) to the model's forward, as the LTX pipelines do",
        )
    return TokenGrid(int(frames), int(height) * int(width))


def model_timesteps(model, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-frame timesteps (B, T) of unpacked `latents` (B, C, T, H, W) -> LTX's per-token (B, T·H·W).

    The model flattens `timestep` before its AdaLN-single embedding, so one timestep per packed
    token gives per-token modulation; frame t's value is repeated over its H/p · W/p tokens.
    """
    pt, p = _patch(model)
    if pt != 1:
        raise CausalizeError(
            f"per-frame timesteps need patch_size_t = 1, this LTX model has {pt}",
            "frames inside one temporal patch share a token and cannot have their own noise level",
        )
    _, _, _, h, w = latents.shape
    return timesteps.repeat_interleave((h // p) * (w // p), dim=1)


def make_inputs(model, frames, gen):
    c = model.config
    pt, p = _patch(model)
    channels = c.in_channels // (pt * p * p)
    return {
        "latents": randn(gen, 1, channels, frames * pt, 8 * p, 8 * p),
        "encoder_hidden_states": randn(gen, 1, 16, c.caption_channels),
        "timestep": mid_timestep(),
        "encoder_attention_mask": torch.ones(1, 16),
    }


PLAN = Plan(
    name="ltx",
    model_class="LTXVideoTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"latents": 2}, output_axis=2),
    targets={"block-causal-attention": Targets(paths=("transformer_blocks.*.attn1",), mask_format="heads3d")},
    tiny_config=dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
    ),
    make_inputs=make_inputs,
    forward=forward,
    # timestep (B, N) -> time_embed (AdaLayerNormSingle) embeds timestep.flatten(): its
    # emb.timestep_embedder gives (B·N, D), which feeds time_embed.linear (the blocks' AdaLN, temb)
    # and is embedded_timestep (norm_out's shift/scale). Actions are added there, per token.
    conditioning=Conditioning(
        embedding="time_embed.emb.timestep_embedder",
        mode="per-token",
        sample_arg="latents",
        model_timesteps=model_timesteps,
    ),
    streaming=Streaming(rope="rope", rope_frames_arg=1),
    tokens=tokens,
    description="LTX-Video text/image-to-video DiT (packed tokens)",
    notes=(
        "the model takes packed tokens (B, F·H·W, C): verification inputs are unpacked latents (B, C, F, H, W) under "
        "'latents', which the plan's forward packs, runs through the model's own forward and unpacks; the converted "
        "model is called with packed tokens exactly as before",
        "the frame grid comes from the forward's num_frames/height/width (token grid); they are required, and the "
        "sequence must be exactly num_frames·height·width video tokens (frame-major)",
        "RoPE coordinates restart at frame 0 on every call; streaming rollout offsets them (the rope is run for "
        "offset + num_frames frames and the last frames' tokens kept); explicit video_coords are not offset",
        "per-token timesteps: timestep (B, N) gives per-token AdaLN; expand per-frame t over the H·W tokens of a frame "
        "(WorldModel does, from the unpacked latents); actions are added to time_embed.emb.timestep_embedder's "
        "(B·N, D) output",
        "patch_size_t > 1 would couple the latent frames of one token frame (mask and probe work at token-frame granularity)",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
