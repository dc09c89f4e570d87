"""CogVideoXTransformer3DModel, 1.0 (patch_size_t=None) and 1.5 (patch_size_t=2): joint [text ; video] attention.

Every block runs one attention, `attn1`, whose processor (`CogVideoXAttnProcessor2_0`) concatenates
`encoder_hidden_states` (the text stream) in front of the video tokens itself: the joint sequence is
[text ; video frame-major]. So the site is joint with a prefix context, and the mask goes through
`attn.prepare_attention_mask` ("heads3d"). Text rows see only text, otherwise the text stream would
carry future frames into the next layer (BACKBONES.md pitfall 6).

CogVideoX 1.5 patchifies (p_t=2, p, p) with a Linear: latent frames 2k and 2k+1 share every token,
so no attention mask can separate them (pitfall 8). Its plan is block-causal over token frames
(the pass's block_size=1 token frame) and is verified with blocks of 2 latent frames
(FrameLayout.block_size=2).
"""

from __future__ import annotations

import torch

from causalize.context import TokenGrid
from causalize.errors import UsageError
from causalize.hookspecs import hookimpl
from causalize.image_condition import ImageCondition
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn

TARGETS = Targets(paths=("transformer_blocks.*.attn1",), context="prefix", joint=True, mask_format="heads3d")

# One timestep per sample (temb (B, D)): the delta hook embeds each frame's timestep through the
# model's own time_proj / time_embedding, and the AdaLN-Zero norms of every block and norm_out
# become frame-modulated twins (causalize.modules.frame_modulation): video tokens of frame t are
# modulated by frame t's embedding (CogVideoX 1.5: the mean over the 2 latent frames of a token
# frame), text tokens by the per-sample one (frame 0's timestep).
CONDITIONING = Conditioning(
    embedding="time_embedding",
    time_proj="time_proj",
    sample_arg="hidden_states",
    modulation=("CogVideoXLayerNormZero", "AdaLayerNorm"),
)


def _temporal_patch(model) -> int:
    return model.config.patch_size_t or 1


def _tokens_for(plan_name: str, patch_t: int, other: str):
    """The plan's `tokens`: (B, F, C, H, W) latents -> F / p_t token frames of (H/p)·(W/p) tokens each.

    It refuses a model of the other CogVideoX version, whose causal block (1 or 2 latent frames)
    this plan's verification layout would get wrong.
    """

    def tokens(model, kwargs) -> TokenGrid:
        if _temporal_patch(model) != patch_t:
            raise UsageError(
                f"plan '{plan_name}' is for CogVideoX with patch_size_t={patch_t if patch_t > 1 else None}, "
                f"this model has patch_size_t={model.config.patch_size_t}",
                f"use --plan {other}",
            )
        _, frames, _, height, width = kwargs["hidden_states"].shape
        p = model.config.patch_size
        return TokenGrid(frames // patch_t, (height // p) * (width // p))

    return tokens


def make_inputs(model, frames, gen):
    c = model.config
    pt = _temporal_patch(model)
    if frames % pt:
        raise UsageError(
            f"CogVideoX with patch_size_t={pt} needs a multiple of {pt} latent frames, got {frames}",
            f"use {frames + pt - frames % pt} frames (the CogVideoX 1.5 pipeline also pads latents to a multiple of patch_size_t)",
        )
    if c.use_learned_positional_embeddings:  # these checkpoints refuse any other resolution
        height, width = c.sample_height, c.sample_width
    else:
        height = width = 4 * c.patch_size
    inputs = {
        "hidden_states": randn(gen, 1, frames, c.in_channels, height, width),
        # sincos position embeddings have exactly max_text_seq_length text slots
        "encoder_hidden_states": randn(gen, 1, c.max_text_seq_length, c.text_embed_dim),
        "timestep": mid_timestep(),
    }
    if c.ofs_embed_dim:  # CogVideoX 1.5 I2V: the pipeline passes ofs = 2.0
        inputs["ofs"] = inputs["hidden_states"].new_full((1,), 2.0)
    return inputs


def offset_sincos_positions(model, stream) -> None:
    """Streaming: the patch embedding's sincos frame positions for frames offset..offset+F−1.

    With `use_rotary_positional_embeddings=False` (CogVideoX-2b) `CogVideoXPatchEmbed` adds a 3-D
    sincos table to [text ; video] whose frame rows restart at 0 on every call (the text rows are
    zeros). In a streaming call at offset o it runs on o zero frames followed by the call's F frames
    (the table of o + F frames, whose rows depend only on the frame index), and the hook keeps the
    text tokens and the last F frames' tokens: each is the frame's own projection plus row o + t, as
    in a full-window call. Learned position tables (CogVideoX-5b-I2V) are tied to `sample_frames`
    and refused; RoPE passed by the caller (`image_rotary_emb`) is refused by `caller_positions`.
    """
    state_of = stream.state_of  # found through the module: deep copies work

    embed = model.patch_embed
    stream.attach(embed)

    def active(module):
        state = state_of(module)
        if state is None or not (module.use_positional_embeddings or module.use_learned_positional_embeddings):
            return None
        if module.use_learned_positional_embeddings:
            raise UsageError(
                "this CogVideoX model has learned position embeddings, tied to its sample_frames: streaming cannot "
                "offset them",
                "use full recomputation (cache=False)",
            )
        if module.patch_size_t is not None:
            raise UsageError("streaming CogVideoX with patch_size_t > 1 is not supported", "use cache=False")
        return state if state.offset else None

    def pad_frames(module, args):
        state = active(module)
        if state is None:
            return None
        text, image = args
        pad = image.new_zeros(image.shape[0], state.offset, *image.shape[2:])
        return text, torch.cat([pad, image], dim=1)

    def keep_last_frames(module, args, output):
        state = active(module)
        if state is None:
            return None
        text, image = args
        frames = image.shape[1]  # offset + F (padded by pad_frames)
        video = output.shape[1] - text.shape[1]
        per_frame = video // frames
        skip = text.shape[1] + state.offset * per_frame
        return torch.cat([output[:, : text.shape[1]], output[:, skip:]], dim=1)

    embed.register_forward_pre_hook(pad_frames)
    embed.register_forward_hook(keep_last_frames)


_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    time_embed_dim=2,
    text_embed_dim=8,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=13,
    patch_size=2,
    patch_size_t=None,
    temporal_compression_ratio=4,
    max_text_seq_length=8,
    use_rotary_positional_embeddings=True,
)

_COMMON_NOTES = (
    "joint attention over [text ; video]: text rows see only text (context_sees_video=false), "
    "video rows see the text, their own and earlier token frames",
    "3-D RoPE (image_rotary_emb) is computed by the pipeline; the example inputs leave it out (RoPE never mixes frames)",
    "RoPE / sincos frame positions restart at 0 on every call: streaming needs global offsets",
)

# Streaming (1.0): the sincos patch positions are offset by a hook; RoPE can only come from the
# caller (`image_rotary_emb`, built by the pipeline for a whole clip): a streaming call that gets
# it is refused. Without it (what the rollout and the trainer pass) RoPE models have no positions.
STREAMING = Streaming(caller_positions=("image_rotary_emb",), hooks=(offset_sincos_positions,))


def image_condition(model):
    """CogVideoX I2V (and ConsisID): the image's latent on the first frame, zeros after, on the
    channel axis: in_channels = 2 × out_channels. CogVideoX 1.5 (patch_size_t = 2): its VAE sets
    `invert_scale_latents`, and the pipeline then passes the image latent divided by the scaling
    factor the video latents are multiplied by ("inverse" units)."""
    c = model.config
    if c.in_channels != 2 * c.out_channels:
        return None
    return ImageCondition(fill="first", units="inverse" if (getattr(c, "patch_size_t", None) or 1) == 2 else "latents")


PLAN = Plan(
    name="cogvideox",
    model_class="CogVideoXTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 1}, output_axis=1),
    targets={"block-causal-attention": TARGETS},
    tiny_config=_TINY,
    make_inputs=make_inputs,
    tokens=_tokens_for("cogvideox", 1, "cogvideox15"),
    conditioning=CONDITIONING,
    image_condition=image_condition,
    streaming=STREAMING,
    accepts=lambda config: (config.get("patch_size_t") or 1) == 1,
    description="CogVideoX 1.0 text/image-to-video DiT (patch_size_t=None): one token frame per latent frame, frame-causal",
    notes=(
        *_COMMON_NOTES,
        "streaming rollout: sincos patch positions (use_rotary_positional_embeddings=False) are offset by the cached "
        "frame count; a streaming call given image_rotary_emb is refused (the caller's positions restart at 0), "
        "and so are learned position tables (tied to sample_frames)",
    ),
)

PLAN_15 = Plan(
    name="cogvideox15",
    model_class="CogVideoXTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 1}, output_axis=1, block_size=2),
    targets={"block-causal-attention": TARGETS},
    tiny_config={**_TINY, "patch_size_t": 2},
    make_inputs=make_inputs,
    conditioning=CONDITIONING,
    image_condition=image_condition,
    tokens=_tokens_for("cogvideox15", 2, "cogvideox"),
    accepts=lambda config: (config.get("patch_size_t") or 1) == 2,
    description=(
        "CogVideoX 1.5 DiT (patch_size_t=2): two latent frames share each token, so per-latent-frame causality is "
        "impossible; causal over blocks of 2 latent frames (= 1 token frame)"
    ),
    notes=(
        "per-latent-frame causality is IMPOSSIBLE: the (2, p, p) patch embedding mixes latent frames 2k and 2k+1 "
        "into the same tokens, so they always see each other",
        "verified block = 2 latent frames (layout block_size=2); the pass's block_size counts token frames (1 = 2 latent frames)",
        "needs an even number of latent frames (the model cannot patchify an odd count); probe with >= 4 (two blocks)",
        *_COMMON_NOTES,
    ),
    min_frames=4,
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
    register(PLAN_15)
