"""HeliosTransformer3DModel (Helios): a Wan-style DiT with multi-term memory (history) tokens.

Read from its forward:

- The noisy chunk `hidden_states` (B, C, F, H, W) is patchified like Wan's (p_t = 1), frame-major.
  Optional clean history latents (short / mid / long, patchified at (1,2,2), (2,4,4), (4,8,8) with
  caller-given frame indices) are concatenated *before* it: every block's attn1 sees
  [long ; mid ; short ; chunk] (attn2, with `guidance_cross_attn`, only the chunk). The history is
  the past of every chunk frame: block-causal attn1 with a "prefix" context gives chunk frame t the
  history plus frames <= t, and the history rows only the history (otherwise a chunk frame would
  reach an earlier one through them in the next layer). Without history it is Wan's layout.
- RoPE takes explicit frame indices (`indices_hidden_states`, default 0..F-1), not a shape:
  streaming passes indices offset by the cached frame count (a root pre-hook; a caller's own
  indices are refused in a streaming call).
- Timesteps: one per sample. The forward broadcasts temb itself, `temb.view(B, 1, -1).expand(B, N, -1)`
  and `timestep_proj.view(B, 6, 1, -1).expand(B, 6, N, -1)`, then runs the blocks' and the output
  norm's per-token AdaLN (history tokens get timestep 0 from a second embedder call when
  `zero_history_timestep`). Per-frame timesteps go the delta way: the condition embedder's twin
  returns FrameTensors, which become per-frame, per-token tensors at those `expand`s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_helios import HeliosTimeTextEmbedding

from causalize.context import CONTEXT_ATTR, MODULE_CONTEXT, TokenGrid, bound_arguments
from causalize.errors import UsageError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.modules.frame_modulation import frame_tensor
from causalize.plan import Conditioning, Plan, Streaming, Targets
from causalize.plugins.common import patch3d_tokens
from causalize.plugins.wan import make_inputs

INDICES = "indices_hidden_states"
HISTORY = ("short", "mid", "long")


def tokens(model: nn.Module, kwargs: dict) -> TokenGrid:
    """The chunk's token grid (Wan's patch layout); history tokens, when given, are a prefix context,
    which is only causal if the history is the past: every history frame index must be below every
    chunk frame index (the Helios pipeline's layout: history, then the chunk)."""
    given = [
        kwargs.get(f"indices_latents_history_{k}")
        for k in HISTORY
        if kwargs.get(f"latents_history_{k}") is not None and kwargs.get(f"indices_latents_history_{k}") is not None
    ]
    if given:
        chunk = kwargs.get(INDICES)
        first = 0 if chunk is None else int(chunk.min())
        latest = max(int(i.max()) for i in given)
        if latest >= first:
            raise UsageError(
                f"history frame index {latest} is not before the chunk's first frame index {first}: a causal Helios "
                "treats the history as the past of every chunk frame",
                "pass indices_hidden_states after every history index (the Helios pipeline's layout)",
            )
    return patch3d_tokens(model, kwargs)


class FrameHeliosTimeTextEmbedding(HeliosTimeTextEmbedding):
    """HeliosTimeTextEmbedding whose temb / timestep_proj carry one embedding per frame (FrameTensors)
    inside a per-frame WorldModel call; the original otherwise, and always for the forward's
    zero-history-timestep call (`is_return_encoder_hidden_states=False`: timestep 0 for the history
    tokens, batch 1), during which the delta hook is held off."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        return None

    def forward(self, timestep, encoder_hidden_states=None, is_return_encoder_hidden_states=True):
        ctx = getattr(self, MODULE_CONTEXT, None)
        if not is_return_encoder_hidden_states:
            busy = ctx is not None and ctx.busy
            if ctx is not None:
                ctx.busy = True  # the history's timestep 0 is not the chunk's per-sample timestep
            try:
                return super().forward(timestep, encoder_hidden_states, is_return_encoder_hidden_states)
            finally:
                if ctx is not None:
                    ctx.busy = busy
        temb, proj, text = super().forward(timestep, encoder_hidden_states, is_return_encoder_hidden_states)
        frames = frame_tensor(self, temb)
        if frames is None:
            return temb, proj, text
        return frames, self.time_proj(self.act_fn(frames)), text


def _offset_indices(module: nn.Module, args: tuple, kwargs: dict):
    """Root pre-hook: in a streaming call after the first, RoPE frame indices offset..offset+F-1."""
    ctx = getattr(module, CONTEXT_ATTR, None)
    stream = None if ctx is None else ctx.stream
    if stream is None or stream.offset == 0:
        return None
    bound = bound_arguments(module, args, kwargs)
    if bound.get(INDICES) is not None:
        return None  # refused by the caller-positions check
    x = bound["hidden_states"]
    frames = x.shape[2] // module.config.patch_size[0]
    indices = torch.arange(stream.offset, stream.offset + frames, device=x.device)[None].expand(x.shape[0], -1)
    if len(args) > 3:  # passed positionally (as None)
        return (*args[:3], indices, *args[4:]), kwargs
    return args, {**kwargs, INDICES: indices}


def install_streaming_positions(model: nn.Module, stream) -> None:
    """Streaming.hooks: offset the RoPE frame indices of streaming calls (inert outside one)."""
    model.register_forward_pre_hook(_offset_indices, with_kwargs=True)


PLAN = Plan(
    name="helios",
    model_class="HeliosTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    # attn1 runs over [history ; chunk]: the history is a prefix context (the past of every frame).
    targets={
        "block-causal-attention": Targets(paths=("blocks.*.attn1",), context="prefix"),
        "frame-conditioning": Targets(paths=("condition_embedder",)),
    },
    tiny_config=dict(
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
        qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True,
        guidance_cross_attn=True,
        zero_history_timestep=True,
    ),
    make_inputs=make_inputs,
    conditioning=Conditioning(
        embedding="condition_embedder.time_embedder",
        time_proj="condition_embedder.timesteps_proj",
        sample_arg="hidden_states",
        modulation=("HeliosTimeTextEmbedding",),
    ),
    streaming=Streaming(hooks=(install_streaming_positions,), caller_positions=(INDICES,)),
    tokens=tokens,
    description="Helios autoregressive video DiT (Wan-style, short / mid / long history tokens)",
    notes=(
        "block-causal attn1 over [history ; chunk]: history tokens (short / mid / long latents, when given) are a "
        "prefix context that every chunk frame sees and that sees only itself; the chunk's frames are causal",
        "per-frame timesteps: the forward takes (B,) and expands temb / timestep_proj over the tokens itself; "
        "frame-conditioning (delta mode) makes the condition embedder return FrameTensors, which become per-frame "
        "per-token tensors at those expands; the zero-history-timestep call (history at t = 0) stays per sample",
        "with zero_history_timestep=False and history given, the forward expands the chunk's temb over the history "
        "too: per-frame timesteps are refused there (the history has no frame of its own)",
        "RoPE takes frame indices (default 0..F-1): streaming passes offset..offset+F-1 (a root pre-hook); a "
        "streaming call given indices_hidden_states is refused. The probe and the rollouts run without history",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)


@hookimpl
def causalize_register_twins(register):
    register("HeliosTimeTextEmbedding", FrameHeliosTimeTextEmbedding)
