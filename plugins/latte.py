"""LatteTransformer3DModel: spatial blocks over (B·F, H·W) alternate with temporal blocks over (B·H·W, F).

Only the temporal blocks' self-attention (`temporal_transformer_blocks.*.attn1`) mixes frames;
its sequence is the F frames of one patch position, so the UNet-style frame-causal (tril) mask
of `causal-temporal-attention` is all it needs. The spatial blocks (self-attention over the
patches of one frame, cross-attention to the caption) are per frame. AdaLN-single is per sample.

Fixed frame count: `temp_pos_embed` is a sincos table of exactly `video_length` rows, added
(unsliced) before the first temporal block, so the stock model only runs on F == video_length
frames. The plan's `forward` therefore swaps in the table of the call's own frame count for
the duration of the call: the first F rows of the same sincos table (what a model built with
video_length=F holds; for F < video_length a slice, bit-identical), restored afterwards. This
is what lets the checker probe 3 or 5 frames and run on T−1 frames to localise a leak; calling
the model directly still needs F == video_length.

Per-frame timesteps: Latte's AdaLN-single modulation is built INLINE. `forward` repeats the
per-sample 6·D modulation over frames for the spatial blocks (rows (b, f) of (B·F, P, D)) and over
patch positions for the temporal blocks (rows (b, p) of (B·P, F, D)), every block adds
`scale_shift_table` and chunks it, and the final layer repeats `embedded_timestep` over frames.
`adaln_single.emb` returns a FrameTensor (causalize.modules.frame_tensor) carrying each frame's
embedding: repeated over frames it becomes per-frame rows, exactly what a spatial block needs;
repeated over the P patch positions it becomes rows whose token sequence is the F frames, so
temporal token f gets frame f's modulation. Only a video with as many frames as patches per frame
(F = P) is ambiguous there, and refused with an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from causalize.context import TokenGrid
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, Plan, Streaming, Targets, default_forward
from causalize.plugins.common import mid_timestep, randn


def temporal_positions(table: torch.Tensor, frames: int) -> torch.Tensor:
    """The (1, frames, D) sincos frame table `LatteTransformer3DModel.__init__` builds for video_length=frames."""
    if frames <= table.shape[1]:
        return table[:, :frames]
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    grid = torch.arange(0, frames).unsqueeze(1)
    return get_1d_sincos_pos_embed_from_grid(table.shape[-1], grid, output_type="pt").float().unsqueeze(0).to(table)


@contextmanager
def frame_count(model: nn.Module, frames: int) -> Iterator[None]:
    """Run `model` on `frames` frames: its `temp_pos_embed` buffer holds that many rows meanwhile."""
    table = model.temp_pos_embed
    if frames <= 1 or frames == table.shape[1]:
        yield
        return
    model.temp_pos_embed = temporal_positions(table, frames)
    try:
        yield
    finally:
        model.temp_pos_embed = table


def offset_frame_positions(model: nn.Module, stream: Any) -> None:
    """Streaming: Latte's frame positions for frames offset..offset+F−1 of the window.

    The stock forward adds `temp_pos_embed` before the first temporal block only when the call
    has more than one frame (`num_frame > 1`), rows 0..F−1. In a streaming call:
    - F > 1 frames at offset o: the table holds rows o..o+F−1 for the call (a root pre-hook swaps
      it in after the plan's `forward` sized it, a root hook restores it);
    - F = 1 frame (the current frame of a denoising step, or one appended history frame): the model
      adds nothing, so a pre-hook on the first temporal block adds row o itself — the same
      addition, at the same place, that a full-window call makes for that frame.
    Rows depend on the frame index only (the sincos table), so they match a full-window call.
    """
    state_of, stream_of = stream.state_of, stream.stream_of  # found through the module: deep copies work

    blocks = getattr(model, "temporal_transformer_blocks", None)
    if not blocks:
        return
    stream.attach(model)
    stream.attach(blocks[0])

    def frames_of(args, kwargs) -> int:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden.shape[2]

    def swap(module, args, kwargs):
        state = state_of(module)
        if state is None or state.offset == 0 or frames_of(args, kwargs) <= 1:
            return None
        table = module.temp_pos_embed
        object.__setattr__(module, "_causalize_frame_table", table)
        module.temp_pos_embed = temporal_positions(table, state.offset + frames_of(args, kwargs))[:, state.offset :]
        return None

    def restore(module, args, kwargs, output):
        table = vars(module).pop("_causalize_frame_table", None)
        if table is not None:
            module.temp_pos_embed = table
        return None

    def add_single_frame(block, args):
        state = state_of(block)
        hidden = args[0]
        if state is None or hidden.shape[1] != 1:
            return None
        table = stream_of(block).model.temp_pos_embed
        row = temporal_positions(table, state.offset + 1)[:, state.offset :]
        return (hidden + row.to(hidden.dtype), *args[1:])

    model.register_forward_pre_hook(swap, with_kwargs=True)
    model.register_forward_hook(restore, with_kwargs=True, always_call=True)
    blocks[0].register_forward_pre_hook(add_single_frame)


def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with frame_count(model, inputs["hidden_states"].shape[2]):
        return default_forward(model, inputs)


def tokens(model: nn.Module, kwargs: dict[str, Any]) -> TokenGrid:
    """(B, C, F, H, W) latents, a per-frame 2-D patch embedding -> F frames of (H/p)·(W/p) patches."""
    _, _, frames, height, width = kwargs["hidden_states"].shape
    p = model.config.patch_size
    return TokenGrid(frames, (height // p) * (width // p))


def make_inputs(model, frames, gen):
    c = model.config
    size = c.sample_size
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, size, size),
        "encoder_hidden_states": randn(gen, 1, 8, c.caption_channels),
        "timestep": mid_timestep(),
        "enable_temporal_attentions": True,
    }


PLAN = Plan(
    name="latte",
    model_class="LatteTransformer3DModel",
    family="dit",
    pipeline="causal-temporal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    targets={
        # self-attention over the F frames of one patch position (the pass leaves cross-attention alone)
        "causal-temporal-attention": Targets(paths=("temporal_transformer_blocks.*",)),
    },
    tiny_config=dict(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        caption_channels=8,
        in_channels=4,
        cross_attention_dim=8,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-06,
        video_length=4,
    ),
    make_inputs=make_inputs,
    forward=forward,
    conditioning=Conditioning(
        embedding="adaln_single.emb.timestep_embedder",
        time_proj="adaln_single.emb.time_proj",
        sample_arg="hidden_states",
        modulation=("PixArtAlphaCombinedTimestepSizeEmbeddings",),
    ),
    streaming=Streaming(hooks=(offset_frame_positions,)),
    tokens=tokens,
    description="Latte text-to-video DiT (alternating spatial and temporal blocks)",
    notes=(
        "temporal attention is over frames: a tril mask (causal-temporal-attention), as in the UNets",
        "temp_pos_embed is fixed to video_length frames; the plan's forward swaps in the table of the "
        "call's frame count (a slice of the same sincos table) so the checker can probe other lengths; "
        "the model called directly still needs F == video_length",
        "absolute frame positions: streaming rollout gives each call the table rows of its global frames "
        "(offset..offset+F−1, extended past video_length by the same sincos formula); a 1-frame call, to which the "
        "stock forward adds no positions, gets its row added before the first temporal block",
        "per-frame timesteps: adaln_single.emb returns a FrameTensor, so the spatial blocks get per-frame rows, the "
        "temporal blocks per-frame tokens and the final layer per-frame rows; F == patches per frame is refused "
        "(ambiguous)",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
