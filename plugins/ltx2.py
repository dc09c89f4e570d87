"""LTX2VideoTransformer3DModel: joint audio + video streams; refused, with the missing piece named.

Read from diffusers 0.42.1's transformer_ltx2.py. Video tokens (B, F*H*W, C) with `num_frames`,
audio tokens (B, A, C) with `audio_num_frames` on their own time axis (their own RoPE grid from
`LTX2AudioVideoRotaryPosEmbed`, modality "audio"), each stream with its own timestep (`timestep`,
`audio_timestep`). Every block runs video self-attention, audio self-attention (full over the
clip), and a2v / v2a cross-attention between all video and all audio tokens; the model's forward
passes `a2v_cross_attention_mask=None` / `v2a_cross_attention_mask=None` to every block. So the
last video frame reaches the first audio token, and the last audio token reaches video frame 0
(tested on a tiny model).

A port needs a time-aligned audio<->video mask: each audio token assigned to the latent video
frame whose time span holds it (from the two streams' RoPE coordinate grids), a
block-causal mask over that joint frame map for audio self-attention and both cross-attentions,
per-frame audio timesteps, and an audio output/conditioning layout. `isolate_modalities=True`
turns the cross-attentions off (the video stream is then independent of audio) but is a guidance
mode, not the model's joint generation, so it is not offered as a video-only plan either.
"""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.plan import Refusal

LTX2_REFUSAL = Refusal(
    model_class="LTX2VideoTransformer3DModel",
    reason=(
        "joint audio and video streams on separate time axes: audio self-attention is full over the clip and the "
        "a2v / v2a cross-attentions join every video token with every audio token (the forward passes no mask for "
        "them), so future video reaches past audio and back; a time-aligned audio<->video frame mask is not "
        "implemented"
    ),
    nearest="ltx",
)


@hookimpl
def causalize_register_refusals(register):
    register(LTX2_REFUSAL)
