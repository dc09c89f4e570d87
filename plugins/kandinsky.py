"""Kandinsky5Transformer3DModel: text blocks, then visual blocks over frame-major tokens.

Input (B, F, H, W, C) (channels last), patchified (1, 2, 2) by a Linear; output the same layout.
Where frames mix: only each visual block's `self_attention` (full attention over all F·P video
tokens). `cross_attention` reads the text (a separate text-block stack that never sees video) and
the feed-forward, norms and the out layer are per token. So block-causal attention on the visual
self-attention alone makes the model causal.

- The processor takes no `attention_mask` (its 4th argument is `rotary_emb`): the block-causal
  wrapper calls it without one and masks its SDPA call in a scope (causalize.modules.wrapping).
- `attention_causal` (config) is stored and never read by the diffusers model: a stock model with
  `attention_causal=True` is exactly as bidirectional as one without (tested).
- NABLA sparse attention (`attention_type="nabla"`, the pipeline's `sparse_params`) picks which
  64-token blocks attend from a softmax over *all* key blocks, future frames included, and runs
  through flex attention: the block choice itself leaks, so a converted model refuses
  `sparse_params` (use the dense attention it approximates).
- Kandinsky6SRTransformer3DModel is refused: its only attention is NABLA (no dense mode), see
  SR_REFUSAL.
- Per-frame timesteps: one temb (B, D) per sample = timestep + pooled text. The visual blocks'
  `visual_modulation` (shift / scale / gate, broadcast by the block over the tokens) becomes per
  frame through a FrameTensor twin; the out layer, which broadcasts over a (B, F, H, W, D) grid,
  is run with the frames folded into the batch. The text blocks' `text_modulation` keeps the
  per-sample temb (frame 0's timestep, in every frame's past), as HunyuanVideo's text stream.
- Temporal positions: `visual_rope_pos` / `text_rope_pos` are built by the caller; the plan's
  forward fills in the pipeline's aranges when they are not given, so every call (the probe's on
  fewer frames included) gets positions of its own size.
- No exact streaming (`streaming=None`): the processor rounds q and k to bfloat16 inside its RoPE
  (`apply_rotary(...).to(torch.bfloat16)`), even in an fp32 model. A KV-cached call differs from a
  full recomputation by fp32 summation order (~1e-7, as in every plan), and those bf16 roundings
  turn it into bf16 ulps: streamed and recomputed rollouts of the tiny model differed by up to
  9e-4 (3e-6 with the rounding patched out). Rollouts use full recomputation, which is exact.

Kandinsky6Transformer3DModel (plan `kandinsky6`): the same visual stack inside fused video/audio
blocks (`visual_transformer_blocks.*.video_dec_block`), video and audio text stacks, and an audio
stream. Converted for video only: without `audio_hidden_states` each fused block skips the audio
path and the va/av cross-attentions, so video frames mix only in `video_dec_block.self_attention`.
Audio is refused on a converted model (K6_AUDIO): audio latents have their own time axis (the
pipeline's audio_length is not a whole number of tokens per latent frame), audio self-attention is
full and the va/av cross-attentions join all video with all audio tokens (tested: with audio, the
last video frame moves frame 0). Its processor applies RoPE in fp32 and casts back (no bf16
rounding), so it streams exactly; the temporal RoPE index is offset by a pre-hook on
`visual_rope_embeddings`.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation, Kandinsky5OutLayer
from diffusers.models.transformers.transformer_kandinsky6 import Kandinsky6Modulation, Kandinsky6OutLayer

from causalize.context import TokenGrid
from causalize.errors import CausalizeError
from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.modules.frame_modulation import frame_tensor, frame_values
from causalize.plan import Conditioning, Plan, Refusal, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn

TEXT_TOKENS = 12
HEIGHT = WIDTH = 8


def tokens(model, kwargs) -> TokenGrid:
    _, frames, height, width, _ = kwargs["hidden_states"].shape
    pt, ph, pw = model.config.patch_size
    return TokenGrid(frames // pt, (height // ph) * (width // pw))


def make_inputs(model, frames, gen):
    c = model.config
    channels = 2 * c.in_visual_dim + 1 if c.visual_cond else c.in_visual_dim
    return {
        "hidden_states": randn(gen, 1, frames, HEIGHT, WIDTH, channels),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.in_text_dim),
        "timestep": mid_timestep(),
        "pooled_projections": randn(gen, 1, c.in_text_dim2),
    }


def positions(model, inputs) -> dict:
    """The pipeline's RoPE positions for this call (aranges over token frames, rows, columns and
    text tokens), where the caller passed none: they then follow the frame count of every call
    (the probe runs on fewer frames, streaming on one)."""
    _, frames, height, width, _ = inputs["hidden_states"].shape
    pt, ph, pw = model.config.patch_size
    device = inputs["hidden_states"].device
    out = {}
    if inputs.get("visual_rope_pos") is None:
        out["visual_rope_pos"] = tuple(
            torch.arange(n, device=device) for n in (frames // pt, height // ph, width // pw)
        )
    if inputs.get("text_rope_pos") is None:
        out["text_rope_pos"] = torch.arange(inputs["encoder_hidden_states"].shape[1], device=device)
    return out


def forward(model, inputs) -> torch.Tensor:
    """The model's own forward with the pipeline's positions filled in; a converted model refuses
    NABLA sparse attention (see the module docstring)."""
    if inputs.get("sparse_params") is not None and _converted(model):
        raise CausalizeError(
            "Kandinsky 5's NABLA sparse attention chooses its attended blocks from all frames (future ones included)",
            "call the converted model without sparse_params (dense attention)",
        )
    out = model(**inputs, **positions(model, inputs), return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def _converted(model) -> bool:
    from causalize.context import CONTEXT_ATTR

    return getattr(model, CONTEXT_ATTR, None) is not None


class FrameKandinsky5Modulation(Kandinsky5Modulation):
    """`visual_modulation` of a visual block: the block unsqueezes, chunks and broadcasts its
    output over the video tokens; fed a FrameTensor, it does so per frame (no arithmetic copied)."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, x):
        per_frame = frame_tensor(self, x)
        return super().forward(x if per_frame is None else per_frame)


class FrameKandinsky5OutLayer(Kandinsky5OutLayer):
    """The out layer broadcasts its shift / scale over a (B, F, H, W, D) grid: with per-frame
    embeddings it runs once with the frames folded into the batch, each with its own embedding."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, visual_embed, text_embed, time_embed):
        per_frame = frame_values(self, time_embed)  # (B, F, D) or None
        if per_frame is None:
            return super().forward(visual_embed, text_embed, time_embed)
        batch, frames = visual_embed.shape[:2]
        if per_frame.shape[1] != frames:
            raise CausalizeError(f"{per_frame.shape[1]} per-frame embeddings for {frames} token frames")
        out = super().forward(
            visual_embed.reshape(batch * frames, 1, *visual_embed.shape[2:]),
            text_embed.repeat_interleave(frames, dim=0),
            per_frame.reshape(batch * frames, -1),
        )
        return out.reshape(batch, -1, *out.shape[2:])


#: The tiny Kandinsky 5 the tests build; Kandinsky 6 adds its audio sizes.
TINY_CONFIG = dict(
    in_visual_dim=4,
    out_visual_dim=4,
    in_text_dim=16,
    in_text_dim2=16,
    time_dim=16,
    patch_size=(1, 2, 2),
    model_dim=16,
    ff_dim=32,
    num_text_blocks=1,
    num_visual_blocks=2,
    axes_dims=(2, 2, 4),
    visual_cond=False,
)


def image_condition(model):
    """Kandinsky 5 with `visual_cond`: [latents ; zeros ; 1 mask channel], channels last. Its I2V
    pipeline writes the image into the latents' frame 0 and marks that frame in the mask (the T2V
    pipeline feeds the mask as zeros too); a world model's frame 0 is the window's first frame."""
    if not getattr(model.config, "visual_cond", False):
        return None
    return ImageCondition(fill="first", parts=("zeros", "mask"), mask_channels=1)


PLAN = Plan(
    name="kandinsky5",
    model_class="Kandinsky5Transformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 1}, output_axis=1, channel_axis=4),  # (B, T, H, W, C)
    targets={
        "block-causal-attention": Targets(paths=("visual_transformer_blocks.*.self_attention",)),
        "frame-conditioning": Targets(paths=("visual_transformer_blocks.*.visual_modulation", "out_layer")),
    },
    tiny_config=TINY_CONFIG,
    make_inputs=make_inputs,
    forward=forward,
    conditioning=Conditioning(
        embedding="time_embeddings",
        time_proj="",  # Kandinsky5TimeEmbeddings takes raw timesteps (its sinusoid is inside)
        sample_arg="hidden_states",
        modulation=("Kandinsky5Modulation", "Kandinsky5OutLayer"),
    ),
    streaming=None,  # see the module docstring: the model's bf16 RoPE rounding amplifies cache rounding
    tokens=tokens,
    description="Kandinsky 5 text/image-to-video DiT (visual self-attention + cross-attention to a text stack)",
    notes=(
        "only the visual blocks' self_attention mixes frames; cross-attention reads text blocks that never see video",
        "the processor takes no attention_mask: the block-causal mask is applied to its SDPA call in a scope",
        "attention_causal in the config is never read by the diffusers model: the stock model stays bidirectional",
        "NABLA sparse attention (sparse_params) selects blocks from all frames: refused on a converted model",
        "per-frame timesteps: visual_modulation and the out layer are per frame, the text blocks keep frame 0's",
        "visual_rope_pos / text_rope_pos: the pipeline's aranges, filled in by the plan's forward when not given",
        "no exact streaming: the processor rounds q and k to bfloat16 in its RoPE, which turns the fp32 rounding of a "
        "KV-cached call into bf16 ulps (streamed vs recomputed rollouts differed by up to 9e-4 in fp32, 3e-6 with the "
        "rounding removed): roll out by full recomputation",
        "patch_size[0] > 1 couples the frames of one temporal patch: use block_size = patch_size[0]",
    ),
    image_condition=image_condition,
)


# --------------------------------------------------------------------------- Kandinsky 6 (TI2VA)


def k6_forward(model, inputs) -> torch.Tensor:
    """The model's own forward (video velocity); a converted model refuses audio (see K6_AUDIO)."""
    if inputs.get("audio_hidden_states") is not None and _converted(model):
        raise CausalizeError(K6_AUDIO, "call the converted model without audio_hidden_states (video only)")
    out = model(**inputs, return_dict=False)
    return out[0]


K6_AUDIO = (
    "Kandinsky 6 audio is not causal: audio latents have their own time axis (audio_length = "
    "ceil(((F-1)*4+1)/fps*sample_rate/hop), not a whole number of tokens per latent frame), audio self-attention is "
    "full over the clip, and each fused block's va/av cross-attention joins every video token with every audio token "
    "(future video reaches past audio, and through it past video); a time-aligned audio<->video mask is not "
    "implemented"
)


def offset_k6_rope(model, stream) -> None:
    """Streaming: the temporal RoPE index of frames offset..offset+F-1. The model builds
    `arange(F)` per call and hands it to `visual_rope_embeddings(pos, scale_factor)`; the pre-hook
    adds the offset to `pos[0]` (inert outside a streaming call)."""
    rope = model.visual_rope_embeddings
    state_of = stream.state_of
    stream.attach(rope)

    def shift(module, args):
        state = state_of(module)
        if state is None or state.offset == 0:
            return None
        pos = args[0]
        return ((pos[0] + state.offset, *pos[1:]), *args[1:])

    rope.register_forward_pre_hook(shift)


class FrameKandinsky6Modulation(Kandinsky6Modulation):
    """`video_dec_block.visual_modulation` of a fused block: its 9 shift / scale / gate chunks are
    broadcast over the video tokens by `apply_scale_shift` / `apply_gate_sum`; fed a FrameTensor,
    they are per frame (no arithmetic copied)."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, x):
        per_frame = frame_tensor(self, x)
        return super().forward(x if per_frame is None else per_frame)


class FrameKandinsky6OutLayer(Kandinsky6OutLayer):
    """The out layer reshapes shift / scale to (B, 1, 1, 1, D) over a (B, F, H, W, D) grid: with
    per-frame embeddings it runs once with the frames folded into the batch."""

    @classmethod
    def supports(cls, module) -> str | None:
        return None

    def forward(self, visual_embed, time_embed):
        per_frame = frame_values(self, time_embed)  # (B, F, D) or None
        if per_frame is None:
            return super().forward(visual_embed, time_embed)
        batch, frames = visual_embed.shape[:2]
        if per_frame.shape[1] != frames:
            raise CausalizeError(f"{per_frame.shape[1]} per-frame embeddings for {frames} token frames")
        out = super().forward(
            visual_embed.reshape(batch * frames, 1, *visual_embed.shape[2:]), per_frame.reshape(batch * frames, -1)
        )
        return out.reshape(batch, -1, *out.shape[2:])


K6_PLAN = Plan(
    name="kandinsky6",
    model_class="Kandinsky6Transformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 1}, output_axis=1, channel_axis=4),  # (B, T, H, W, C)
    targets={
        "block-causal-attention": Targets(paths=("visual_transformer_blocks.*.video_dec_block.self_attention",)),
        "frame-conditioning": Targets(
            paths=("visual_transformer_blocks.*.video_dec_block.visual_modulation", "out_layer")
        ),
    },
    tiny_config=TINY_CONFIG | dict(in_audio_dim=4, out_audio_dim=4),
    make_inputs=make_inputs,  # the same video and text inputs (audio is refused)
    forward=k6_forward,
    conditioning=Conditioning(
        embedding="video_time_embeddings",
        time_proj="",  # Kandinsky6TimeEmbeddings takes raw timesteps (its sinusoid is inside)
        sample_arg="hidden_states",
        modulation=("Kandinsky6Modulation", "Kandinsky6OutLayer"),
    ),
    streaming=Streaming(caller_positions=("visual_rope_pos",), hooks=(offset_k6_rope,)),
    tokens=tokens,
    description="Kandinsky 6 text/image-to-video(+audio) DiT, converted for video: fused video/audio blocks",
    notes=(
        "Kandinsky 5's structure in fused blocks: video frames mix only in video_dec_block.self_attention",
        "video only: a converted model refuses audio_hidden_states (audio has its own time axis, full audio "
        "self-attention and full va/av cross-attention; no time-aligned audio<->video mask)",
        "without audio the fused block skips the audio path and the va/av cross-attention entirely",
        "the processor takes attn_mask, not attention_mask: the block-causal mask is applied to its SDPA call in a "
        "scope",
        "per-frame timesteps: video visual_modulation and the out layer are per frame; the video and audio text "
        "blocks keep frame 0's embedding",
        "streaming is exact: the RoPE is applied in fp32 and cast back (no bf16 rounding as in Kandinsky 5); the "
        "temporal RoPE index is offset by a pre-hook; caller-given visual_rope_pos is refused while streaming",
        "image conditioning: the pipeline appends the clean reference as an extra last frame (token type 1, RoPE "
        "position 0); after conversion it is in every frame's future, so no frame sees it: use the per-frame "
        "visual_cond channels (conditioning latent + mask) of the first frames instead",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
    register(K6_PLAN)


# Kandinsky 6 SR has no dense attention to make causal: every self-attention is NABLA on flex.
SR_REFUSAL = Refusal(
    model_class="Kandinsky6SRTransformer3DModel",
    reason=(
        "sparse attention chosen from all frames: its only self-attention is NABLA on the flex backend, whose "
        "BlockMask keeps the 64-token key blocks picked by a softmax over all key blocks (future frames included) "
        "plus a sliding-tile window of +-5 frames; there is no dense mode, and the block choice itself carries the "
        "future (a causal choice would be another model)"
    ),
    nearest="kandinsky5",
)


@hookimpl
def causalize_register_refusals(register):
    register(SR_REFUSAL)


@hookimpl
def causalize_register_twins(register):
    register("Kandinsky5Modulation", FrameKandinsky5Modulation)
    register("Kandinsky5OutLayer", FrameKandinsky5OutLayer)
    register("Kandinsky6Modulation", FrameKandinsky6Modulation)
    register("Kandinsky6OutLayer", FrameKandinsky6OutLayer)
