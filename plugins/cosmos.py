"""CosmosTransformer3DModel (Cosmos 1.0 / 2.5 world models): full self-attention over frame-major tokens.

`CosmosPatchEmbed` is a reshape + Linear with patch (1, 2, 2): tokens are (t, h, w), w fastest.
attn1 is video self-attention with RoPE (temporal `rope_scale`) plus a learnable 3-D position
embedding added to the tokens; attn2 is cross-attention to text (and, for 2.5 with an image
context, to image tokens). The block calls `attn1(x, image_rotary_emb=...)`: no mask reaches it,
so the processor builds its own. `CosmosAttnProcessor2_0` hands `attention_mask` straight to
`dispatch_attention_fn`, hence the "bool4d" mask format.

torchvision: with `concat_padding_mask=True` (every released config) `forward` always calls
`torchvision.transforms.functional.resize(padding_mask, latent HxW, NEAREST)`, through a module
global `transforms` that diffusers imports only when torchvision is installed. Without it the call
is a NameError whatever the inputs. `torchvision_resize_shim()` provides that one call (nearest
interpolation, exactly what torchvision does for a tensor) for the duration of a `with` block, and
only when torchvision is missing; the plan's forward runs inside it, so verification works either
way and nothing is changed for code outside it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from causalize.errors import CausalizeError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.plan import Conditioning, OffsetPositions, Plan, Streaming, Targets, default_forward
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens

_COSMOS_MODULE = "diffusers.models.transformers.transformer_cosmos"


def _nearest_resize(img: torch.Tensor, size, interpolation: str = "nearest", *args: Any, **kwargs: Any) -> torch.Tensor:
    """torchvision's tensor `resize` for the NEAREST mode Cosmos uses: interpolate over the last two axes."""
    if interpolation != "nearest":
        raise NotImplementedError(f"causalize's torchvision shim only implements NEAREST resize, got {interpolation!r}")
    size = [int(s) for s in size]
    if list(img.shape[-2:]) == size:
        return img
    lead = img.shape[:-2]
    x = img.reshape(-1, 1, *img.shape[-2:])
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.float()
    x = F.interpolate(x, size=size, mode="nearest")
    if dtype != x.dtype:
        x = (x.round() if not dtype.is_floating_point else x).to(dtype)
    return x.reshape(*lead, *size)


_SHIM = SimpleNamespace(
    functional=SimpleNamespace(resize=_nearest_resize),
    InterpolationMode=SimpleNamespace(NEAREST="nearest"),
)


@contextlib.contextmanager
def torchvision_resize_shim() -> Iterator[None]:
    """While active, and only if torchvision is not installed, Cosmos' padding_mask resize works.

    Use it to call a Cosmos model (converted or not) on a machine without torchvision:
    `with torchvision_resize_shim(): model(...)`. A no-op when torchvision is available.
    """
    mod = importlib.import_module(_COSMOS_MODULE)
    if hasattr(mod, "transforms"):  # real torchvision (or an outer shim) already there
        yield
        return
    mod.transforms = _SHIM
    try:
        yield
    finally:
        if getattr(mod, "transforms", None) is _SHIM:
            del mod.transforms


def forward(model, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's own forward, inside the torchvision shim (a no-op when torchvision is installed)."""
    with torchvision_resize_shim():
        return default_forward(model, inputs)


def model_timesteps(model, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-frame timesteps (B, T) -> Cosmos' native per-frame format (B, 1, T, 1, 1).

    The forward flattens it to (B·T,), embeds each frame once and expands temb / embedded_timestep
    over the frame's H·W tokens itself; it requires p_t = 1 (T latent frames = T token frames).
    """
    if int(model.config.patch_size[0]) != 1:
        raise CausalizeError(
            f"per-frame timesteps need patch_size_t = 1, this Cosmos model has {model.config.patch_size[0]}",
            "frames inside one temporal patch share a token and cannot have their own noise level",
        )
    return timesteps[:, None, :, None, None]


def make_inputs(model, frames, gen):
    c = model.config
    inputs = {
        "hidden_states": randn(gen, 1, c.in_channels, frames, 16, 16),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, 12, c.text_embed_dim),
        "attention_mask": torch.ones(1, 12, dtype=torch.bool),
        "fps": 30,
    }
    if c.concat_padding_mask:
        # The pipelines pass a zero mask at pixel size; one already at latent size is resized to itself.
        inputs["padding_mask"] = torch.zeros(1, 1, 16, 16)
    return inputs


PLAN = Plan(
    name="cosmos",
    model_class="CosmosTransformer3DModel",
    family="dit",
    pipeline="block-causal-attention",
    layout=FrameLayout(inputs={"hidden_states": 2}, output_axis=2),
    # attn1: video self-attention. attn2 (Attention or CosmosAttention): cross-attention to text /
    # image context, never mixes frames.
    targets={"block-causal-attention": Targets(paths=("transformer_blocks.*.attn1",), mask_format="bool4d")},
    tiny_config=dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    ),
    make_inputs=make_inputs,
    forward=forward,
    # timestep (B, 1, T, 1, 1) -> time_embed embeds timestep.flatten() per frame. Its t_embedder
    # (linear_1 -> SiLU -> linear_2) gives temb (B·T, 3D), the AdaLN-LoRA term added to every
    # block's shift/scale/gate and (first 2D) to norm_out's shift/scale. The action embedding is
    # added to linear_1's (B·T, D) output, so it reaches all of them through the pretrained
    # SiLU -> linear_2 (as Wan's reaches its modulation through time_proj).
    conditioning=Conditioning(
        embedding="time_embed.t_embedder.linear_1",
        mode="per-token",
        sample_arg="hidden_states",
        model_timesteps=model_timesteps,
        unbatched=("padding_mask",),
    ),
    # RoPE: `rope(hidden_states, fps=...)` returns (cos, sin) of (T·H·W, D), tokens on axis 0; the
    # learnable embedding returns (B, T·H·W, D). Both read only the shape of hidden_states (frames
    # on axis 2; hidden_states there already carries the padding-mask channel).
    streaming=Streaming(
        rope="rope", rope_token_axis=0, positions=(OffsetPositions("learnable_pos_embed", token_axis=1),)
    ),
    tokens=tokens,
    description="NVIDIA Cosmos 1.0 / 2.5 world-model DiT (text/video-to-world)",
    notes=(
        "torchvision: forward resizes padding_mask with torchvision (always, when concat_padding_mask); without "
        "torchvision installed causalize runs its probes inside causalize.plugins.cosmos.torchvision_resize_shim() "
        "(NEAREST resize via F.interpolate, active only during those calls); wrap your own calls in it too",
        "padding_mask is a per-sample (H, W) map repeated over frames; condition_mask (video2world) is per frame "
        "(B, 1, T, H, W): both enter as channels of the per-token patch embedding only, so frame t's mask reaches "
        "frame t's tokens only; the conditioning (first) frames are past frames and stay visible to later ones",
        "RoPE frame indices and the learnable 3-D position embedding restart at frame 0 on every call (and the "
        "learnable one is limited to max_size[0] frames): streaming rollout offsets both by the cached frame count",
        "per-frame timesteps: timestep (B, 1, T, 1, 1) gives per-frame AdaLN (requires patch_size_t = 1); actions are "
        "added per frame to time_embed.t_embedder.linear_1's (B·T, D) output, upstream of the temb that enters every "
        "AdaLN modulation",
    ),
)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)
