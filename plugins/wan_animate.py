"""WanAnimateTransformer3DModel (Wan 2.2 Animate), and the refusal of WanAnimate2Transformer3DModel.

Wan-Animate, read from its forward:

- `hidden_states` (B, 2C+4, T+1, H, W): frame 0 is the reference (character) image, frames 1..T the
  video; each is patchified per frame (p_t = 1), frame-major, as in Wan.
- `pose_hidden_states` (B, C, T, H, W) is patchified per frame and added to token frames 1..T: pose
  frame i sits on frame i+1.
- `face_pixel_values` (B, 3, S, s, s), S = 4T - 3 pixel frames: the motion encoder runs per image,
  then the face encoder's Conv1d stack is *causal* (replicate left padding, strides 2 and 2), so its
  output j depends on face frames <= 4j; a zero frame is prepended for the reference. Every
  `inject_face_latents_blocks`-th block adds a face cross-attention in which token frame j attends
  only to face vector j. So the face path is frame-aligned and causal by construction.
- Only `blocks.*.attn1` (full self-attention, Wan's RoPE) mixes frames: it gets the block-causal
  mask. The reference image is frame 0, in the past of every frame.
- Timesteps: one per sample (the forward calls the condition embedder with timestep_seq_len=None,
  Wan 2.1's path): per-frame timesteps go the delta way, with this file's copy of
  WanTimeTextImageEmbedding turned into the frame-modulated twin (FrameTensors).
- No exact streaming: every call's frame 0 is the reference (the forward adds pose from frame 1 and a
  zero face vector at frame 0), and the face encoder's causal convs reach back several face frames
  before a call's first one; a call over the newest frame alone cannot be the tail of a longer
  call without rewriting the forward. Rollouts recompute the window (its first frame plays the
  reference).

Wan-Animate-2 is refused (see REFUSAL).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_wan_animate import WanTimeTextImageEmbedding

from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Refusal, Targets, default_forward
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens
from causalize.plugins.wan import TINY_CONFIG as WAN_TINY
from causalize.plugins.wan_vace import frame_modulated_embedding

FrameWanAnimateTimeTextImageEmbedding = frame_modulated_embedding(WanTimeTextImageEmbedding)


FACE_PER_FRAME = 4  # face pixel frames per video latent frame (the Wan VAE's temporal factor)


def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Frame-aligned inputs in, the model's own call out. The plan's inputs put everything on the
    latents' frame grid (so the probe perturbs, and the rollout slices, all of it at frame j):

    - `latents` (B, C, F, H, W), the noisy sample, and `reference_latents` (B, C+4, F, H, W), the
      pipeline's [reference image ; previous segment] conditioning: concatenated on channels into
      `hidden_states`, as the pipeline does;
    - `pose_latents` (B, C, F, H, W): frame 0 (the reference's slot) is dropped, frames 1.. are the
      model's `pose_hidden_states`;
    - `face_pixels` (B, 3, F, 4, s, s): frame j's 4 face frames end at face frame 4(j - 1); block 0 and
      the first 3 frames of block 1 are dropped, the rest flattened into `face_pixel_values`
      (S = 4(F - 1) - 3 frames).
    """
    kwargs = dict(inputs)
    latents, reference = kwargs.pop("latents"), kwargs.pop("reference_latents")
    pose, face = kwargs.pop("pose_latents"), kwargs.pop("face_pixels")
    return default_forward(
        model,
        {
            **kwargs,
            "hidden_states": torch.cat([latents, reference], dim=1),
            "pose_hidden_states": pose[:, :, 1:],
            "face_pixel_values": face[:, :, 1:].flatten(2, 3)[:, :, FACE_PER_FRAME - 1 :],
        },
    )


def make_inputs(model, frames, gen):
    c = model.config
    size = c.motion_encoder_size
    return {
        "latents": randn(gen, 1, c.latent_channels, frames, 16, 16),
        "reference_latents": randn(gen, 1, c.in_channels - c.latent_channels, frames, 16, 16),
        "pose_latents": randn(gen, 1, c.latent_channels, frames, 16, 16),
        "face_pixels": randn(gen, 1, 3, frames, FACE_PER_FRAME, size, size),
        "encoder_hidden_states": randn(gen, 1, 12, c.text_dim),
        "timestep": mid_timestep(),
    }


PLAN = Plan(
    name="wan-animate",
    model_class="WanAnimateTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(
        inputs={"latents": 2, "reference_latents": 2, "pose_latents": 2, "face_pixels": 2}, output_axis=2
    ),
    targets={
        "block-causal-attention": Targets(paths=("blocks.*.attn1",)),
        "frame-conditioning": Targets(paths=("condition_embedder",)),
    },
    tiny_config=WAN_TINY
    | dict(
        in_channels=12,
        latent_channels=4,
        image_dim=None,  # the CLIP branch needs 512 text tokens (WanAttnProcessor hard-codes it); cross-attention only
        motion_encoder_channel_sizes={"8": 8, "4": 8},
        motion_encoder_size=8,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
    ),
    make_inputs=make_inputs,
    forward=forward,
    min_frames=2,  # the reference frame and one video frame (a call with no video frame fails natively)
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder",
        time_proj="condition_embedder.timesteps_proj",
        sample_arg="latents",
        modulation=("WanTimeTextImageEmbedding",),
    ),
    streaming=None,
    tokens=tokens,
    description="Wan 2.2 Animate character animation / replacement DiT (Wan + pose latents + causal face adapter)",
    notes=(
        "only attn1 mixes frames: block-causal; frame 0 is the reference image (the past of every frame); pose "
        "latents are added per frame to frames 1..T, and the face path (per-image motion encoder, causal strided "
        "Conv1d face encoder, per-frame face cross-attention) is causal as shipped: face frames <= 4j reach frame j+1",
        "per-frame timesteps: the forward takes (B,) only; frame-conditioning runs in delta mode with this model "
        "file's condition embedder turned into its frame-modulated twin (FrameTensors)",
        "no exact streaming (streaming=None): every call's frame 0 is the reference (pose from frame 1, a zero face "
        "vector at frame 0) and the face encoder reaches back before a call's first frame; rollouts recompute the "
        "window, whose first frame plays the reference",
        "verification / world-model inputs are frame-aligned (the plan's forward maps them to the model's call): "
        "latents (the noisy sample, C channels) + reference_latents (C+4) concatenated into hidden_states; "
        "pose_latents with an unused frame 0; face_pixels (B, 3, F, 4, s, s), 4 face frames per latent frame; the "
        "converted model itself is called exactly as before",
    ),
)

REFUSAL = Refusal(
    model_class="WanAnimate2Transformer3DModel",
    reason=(
        "a stateful two-pass call on lists, without a frame-axis input: unbatched (C, F, H, W) latents in lists, a "
        "reference pass (kv_cache_mode='extract') that fills a caller-held KV cache, then generation passes whose "
        "self-attention is a flex BlockMask the model builds itself (create_mask) over a packed, 128-aligned "
        "[generation | reference] buffer, run on the flex backend only (no SDPA call to mask), with every "
        "generation token seeing every other"
    ),
    nearest="wan-animate",
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)


@hookimpl
def causalize_register_twins(register):
    register("WanTimeTextImageEmbedding", FrameWanAnimateTimeTextImageEmbedding)


@hookimpl
def causalize_register_refusals(register):
    register(REFUSAL)
