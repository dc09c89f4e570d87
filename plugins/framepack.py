"""HunyuanVideoFramepackTransformer3DModel: HunyuanVideo plus FramePack's clean history, frame-causal within a section.

Read from diffusers' `transformer_hunyuan_video_framepack.py`: the blocks, processors and norms
are HunyuanVideo 1.0's (plugins/hunyuan.py). What differs is the token sequence. The forward
embeds the section's noisy latents (`x_embedder`, Conv3d (1, p, p)) and three clean history inputs
with their own patch embeddings (`clean_x_embedder`: `latents_clean` (1, 2, 2),
`latents_history_2x` (2, 4, 4), `latents_history_4x` (4, 8, 8), each with its own RoPE frame
indices), and packs them IN FRONT of the section inside `hidden_states`:

    [history_4x ; history_2x ; clean ; section frames (frame-major)] ; [image-embed tokens ; text]

where the second part is `encoder_hidden_states` (a suffix the processors append). Every block
attends over that whole sequence. The history and the section's frames carry their own RoPE frame
indices (`indices_latents*`), given by the caller.

What "causal" means here — the rule this plan implements and enforces:

- FramePack already generates video section by section, conditioning each section on clean
  history. The history inputs are the **past**: they are context (frame id −1) like the text. Every
  section frame sees all of them; they see only context (history, image tokens, text), never a
  section frame. Within the section, frame t sees frames <= t. So output frame t depends on the
  history, the image / text conditioning and section frames 0..t only.
- "Past" is checked, not assumed: every history frame index must be below every section frame
  index (FramePack-F1 / the pipeline's "vanilla" sampling: history indices 0..k, the section
  after). The original "inverted anti-drifting" sampling conditions a section on LATER frames
  (`clean_latents_post`, history indices above the section's); a causal model cannot use it,
  so such a call is refused (UsageError from `tokens`).

The history is context the model packs before the section (`TokenGrid.leading_context`), the
image and text tokens a suffix: block-causal attention, the per-frame modulation of the
single-stream norms (which modulate [history ; section ; image ; text]) and the streaming KV
caches all place it there.

Per-frame timesteps: as HunyuanVideo 1.0; the history tokens (like the text) keep the per-sample
modulation, i.e. frame 0's timestep (in every frame's past).

Streaming: the section's RoPE frames come from the caller's `indices_latents`, one per frame of the
call; a streaming call adds the cached frame count to them (a hook), so that a call at offset o
gets the indices a full-window call gives its frames o.. . The history tokens are recomputed in
every call (like the text), and nothing they depend on changes within a rollout.
"""

from __future__ import annotations

from typing import Any

import torch

from causalize.context import TokenGrid, bound_arguments
from causalize.errors import UsageError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.hunyuan import TINY_CONFIG as HUNYUAN_TINY

TEXT_TOKENS = 12
VALID_TEXT = 9  # the example inputs pad the prompt, so the text-padding path is exercised
IMAGE_TOKENS = 4
# FramePack-F1's index layout (its pipeline's history sizes 16 / 2 / 1): [start frame, 4x history,
# 2x history, 1x history, section]. The 16-frame 4x history also keeps its frame count away from
# the probes' (the inspect scan tells the history's temporal patch embeddings by their frame count)
HISTORY_4X = tuple(range(1, 17))
HISTORY_2X = (17, 18)
CLEAN = (0, 19)  # the start frame and the 1x history frame
SECTION_START = 20

# (latents argument, its indices argument, the patch kernel its clean_x_embedder applies)
HISTORY = (
    ("latents_clean", "indices_latents_clean", (1, 2, 2)),
    ("latents_history_2x", "indices_latents_history_2x", (2, 4, 4)),
    ("latents_history_4x", "indices_latents_history_4x", (4, 8, 8)),
)
INDICES = ("indices_latents", *(i for _, i, _ in HISTORY))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def history_tokens(kwargs: dict[str, Any]) -> int:
    """Tokens the forward packs before the section: each history input after its patch embedding
    (padded to whole patches, as `_pad_for_3d_conv` does)."""
    total = 0
    for latents, _, (kt, kh, kw) in HISTORY:
        _, _, frames, height, width = kwargs[latents].shape
        total += _ceil(frames, kt) * _ceil(height, kh) * _ceil(width, kw)
    return total


def check_history_is_past(kwargs: dict[str, Any]) -> None:
    """The plan's rule: every history frame index is below every section frame index."""
    section = kwargs.get("indices_latents")
    if section is None:
        raise UsageError(
            "FramePack needs indices_latents (the section's RoPE frame indices)",
            "pass them as the FramePack pipeline does",
        )
    latest = max(int(kwargs[indices].max()) for _, indices, _ in HISTORY)
    first = int(section.min())
    if latest >= first:
        raise UsageError(
            f"FramePack history at frame index {latest} is not before the section (first index {first}): "
            "the causal plan treats the history as the past (FramePack-F1 / vanilla sampling); the inverted "
            "anti-drifting sampling conditions a section on later frames, which a causal model cannot use",
            "give history indices below the section's (vanilla sampling)",
        )


def tokens(model: torch.nn.Module, kwargs: dict[str, Any]) -> TokenGrid:
    """Section frames of (H/p)·(W/p) tokens, after the packed history (leading context); refuses
    calls without the history inputs (the diffusers forward fails without them) and calls whose
    history is not in the past."""
    missing = [n for latents, indices, _ in HISTORY for n in (latents, indices) if kwargs.get(n) is None]
    if missing:
        raise UsageError(
            f"FramePack's forward needs {', '.join(missing)} (it fails without them)",
            "pass the clean history (zeros for an empty one) with its frame indices, as the FramePack pipeline does",
        )
    check_history_is_past(kwargs)
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    return TokenGrid(frames // pt, (height // p) * (width // p), leading_context=history_tokens(kwargs))


def make_inputs(model: torch.nn.Module, frames: int, gen: torch.Generator) -> dict[str, Any]:
    c = model.config
    mask = torch.zeros(1, TEXT_TOKENS)
    mask[:, :VALID_TEXT] = 1
    size = 8  # latent height / width

    def index(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    inputs = {
        "hidden_states": randn(gen, 1, c.in_channels, frames, size, size),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, TEXT_TOKENS, c.text_embed_dim),
        "encoder_attention_mask": mask,
        "pooled_projections": randn(gen, 1, c.pooled_projection_dim),
        "image_embeds": randn(gen, 1, IMAGE_TOKENS, c.image_proj_dim),
        "indices_latents": torch.arange(SECTION_START, SECTION_START + frames),
        "latents_clean": randn(gen, 1, c.in_channels, len(CLEAN), size, size),
        "indices_latents_clean": index(CLEAN),
        "latents_history_2x": randn(gen, 1, c.in_channels, len(HISTORY_2X), size, size),
        "indices_latents_history_2x": index(HISTORY_2X),
        "latents_history_4x": randn(gen, 1, c.in_channels, len(HISTORY_4X), size, size),
        "indices_latents_history_4x": index(HISTORY_4X),
    }
    if c.guidance_embeds:
        inputs["guidance"] = torch.tensor([6000.0])
    return inputs


def offset_section_indices(model: torch.nn.Module, stream) -> None:
    """Streaming: a call at offset o (frames already cached) gets `indices_latents + o`, the RoPE
    frame indices a full-window call gives its frames o.. (the caller passes one index per frame
    of the call, counted from the window start). Inert outside a streaming call."""
    state_of = stream.state_of  # found through the module: deep copies work
    stream.attach(model)

    def shift(module, args, kwargs):
        state = state_of(module)
        if state is None or not state.offset:
            return None
        given = bound_arguments(module, args, kwargs)
        if given.get("indices_latents") is None:
            return None  # tokens() refuses the call
        given["indices_latents"] = given["indices_latents"] + state.offset
        return (), given

    model.register_forward_pre_hook(shift, with_kwargs=True)


_JOINT = dict(context="suffix", joint=True, mask_format="bool4d")

PLAN = Plan(
    name="hunyuan-framepack",
    model_class="HunyuanVideoFramepackTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    # the section's RoPE frame indices are per-frame inputs too (one per frame, shared by the batch)
    layout=FrameLayout(inputs={"hidden_states": 2, "indices_latents": 0}, output_axis=2),
    targets={
        "block-causal-attention": (
            # dual-stream: [history ; section] through to_q/k/v, [image ; text] through add_q/k/v_proj
            Targets(paths=("transformer_blocks.*.attn",), **_JOINT),
            # single-stream: the processor concatenates [history ; section ; image ; text] itself
            Targets(paths=("single_transformer_blocks.*.attn",), **_JOINT),
        ),
        "frame-conditioning": (
            Targets(paths=("norm_out",)),  # the section alone (the forward drops the history first)
            Targets(paths=("transformer_blocks.*.norm1",), context="prefix"),  # [history ; section]
            # [history ; section ; image ; text]: the history leads, the image and text follow
            Targets(paths=("single_transformer_blocks.*.norm",), context="suffix"),
        ),
    },
    tiny_config=HUNYUAN_TINY
    | dict(
        patch_size=2,
        has_image_proj=True,
        image_proj_dim=16,
        has_clean_x_embedder=True,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="time_text_embed.timestep_embedder",
        time_proj="time_text_embed.time_proj",
        sample_arg="hidden_states",
        modulation=("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous"),
        # frame indices are shared by the batch (1-D): callers keep them as they are
        unbatched=INDICES,
    ),
    streaming=Streaming(hooks=(offset_section_indices,)),
    tokens=tokens,
    description=(
        "FramePack (HunyuanVideo with packed clean history): frame-causal within a section, the history as the past"
    ),
    notes=(
        "rule: the clean history (latents_clean, latents_history_2x / 4x) is the past: context tokens every section "
        "frame sees and that see only context; section frame t sees frames <= t",
        "enforced: every history frame index must be below every section index (FramePack-F1 / vanilla sampling); "
        "the inverted anti-drifting sampling (history after the section) is refused",
        "the history is packed before the section inside hidden_states (TokenGrid.leading_context), image and text "
        "tokens after it: masks, per-frame modulation and streaming caches place both",
        "the history's own patch embeddings (2x: (2, 4, 4), 4x: (4, 8, 8)) mix history frames only, never the section",
        "per-frame timesteps: the section's tokens are modulated per frame; history, image and text tokens keep frame "
        "0's timestep",
        "streaming: indices_latents (the section's RoPE frames, given per call) are offset by the cached frame count",
        "the history inputs and indices are required (the diffusers forward fails without them); patch_size must be "
        "2 (the history embedder's clean kernel is fixed at (1, 2, 2))",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
