"""SANA-WM (stage 1 camera-controlled world model; stage 2 LTX-2 refiner, refused). Read from diffusers
0.42.1's transformer_sana_wm.py / transformer_sana_wm_refiner.py.

SanaWMTransformer3DModel, input (B, C, T, H, W), per-frame timesteps (B, 1, T), raw camera
conditions (B, T, 20) and, with `use_chunk_plucker_post_attn`, Plücker rays (B, C, T, H, W).
Tokens are frame-major; frames mix in four places, each one a site of the plan:
- every GDN block's `attn.attn` / `attn.cam_attn` (SanaWMBidirectionalGDN(Cam)Attention): a
  gated-delta-rule scan over frames run forwards (frames <= t) and over the time-flipped sequence
  shifted by one (`flip_and_shift`: frames > t), the two numerators / denominators summed. The
  causal twin runs the model's own forward with `flip_and_shift` returning its padding constant
  (keys, values, beta = 0, decay = 1): the backward scan then sees no key and adds exactly 0, so
  what remains is the forward scan (frames <= t), the causal direction the model already has.
- the Q/K/V short convolutions `conv_q/k/v(_cam)` (SanaWMTemporalShortConvolution): a causal
  depthwise kernel run forwards and on the flipped sequence minus the doubled centre tap (a centred
  2k-1 tap filter). The twin keeps the forward run (the module's own `_causal_conv`), as the
  reference model's fla ShortConvolution does.
- every `softmax_every_n`-th block's `attn.attn` / `attn.cam_attn` (SanaWMSoftmax(Cam)Attention):
  a bare `F.scaled_dot_product_attention` over all tokens, outside any processor. The twin runs
  the model's forward inside causalize's SDPA scope (block_attention.sdpa_scope), which gives that
  call the block-causal mask (combined with the camera branch's own padding bias).
- the FFN `mlp.t_conv` (GLUMBConvTemp): Conv2d (k, 1) over (B, C, T, H·W), Sana-Video's
  conv_temp: the causal-temporal-conv pass (conv_dims=(2,), time axis 0).
Frame-local elsewhere: beta (per token), decay (per-frame spatial mean), Q/K RMSNorms, RoPE, the
camera geometry (`_process_camera_conditions_ucpe`: each frame's rays from its own C2W and
intrinsics), the Conv3d patch embeddings (kernel = stride, p_t = 1), cross-attention to text and
the per-frame adaLN.
No streaming: the forward GDN scan and the short convolutions would need their own caches.

SanaWMLTX2RefinerTransformer3DModel (refused): LTX-2's video stream on pre-packed tokens (B, N, C)
with a caller-built `video_rotary_emb` (absolute frame positions) and no frame count argument: the
frame map lives in the caller's RoPE. It is chunk-causal already (autoregressive blocks over a
sliding-window KV cache of sink + history, `kv_cache_mode`), with full attention inside a block by
design: the refiner denoises an AR block jointly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from causalize import state
from causalize.context import install_context
from causalize.errors import CausalizeError
from causalize.hookspecs import hookimpl
from causalize.layout import FrameLayout
from causalize.modules.block_attention import BlockCausalAttnProcessor, SdpaScope, sdpa_scope
from causalize.passes.base import Pass, PassContext, Record, Site
from causalize.plan import Conditioning, Plan, Refusal, Targets, default_forward
from causalize.plugins.common import mid_timestep, randn
from causalize.plugins.common import patch3d_tokens as tokens

SCOPE_ATTR = "causalize_sdpa_mask"  # the BlockCausalAttnProcessor whose scope masks a softmax twin's SDPA call

_FORWARD_ONLY = threading.local()  # .depth > 0 while a GDN twin runs: flip_and_shift feeds the backward scan nothing
_INSTALL_LOCK = threading.Lock()


def _sana_wm():
    from diffusers.models.transformers import transformer_sana_wm

    return transformer_sana_wm


def _install_flip_switch() -> None:
    """Route the model file's `flip_and_shift` through a switch, once per process: outside a GDN twin
    (any other thread, the stock model) it is the original function; inside, it returns its padding
    constant, so the backward scan gets zero keys, values and beta and a decay of 1."""
    mod = _sana_wm()
    with _INSTALL_LOCK:
        if getattr(mod.flip_and_shift, "_causalize_switch", False):
            return
        original = mod.flip_and_shift

        def flip_and_shift(x, dim=2, shift_val=0.0):
            if getattr(_FORWARD_ONLY, "depth", 0):
                return torch.full_like(x, shift_val)
            return original(x, dim=dim, shift_val=shift_val)

        flip_and_shift._causalize_switch = True
        mod.flip_and_shift = flip_and_shift


class _ForwardScanOnly:
    """Mixin of the GDN twins: the model's own forward with the backward (future) scan emptied."""

    def forward(self, *args, **kwargs):
        _install_flip_switch()
        _FORWARD_ONLY.depth = getattr(_FORWARD_ONLY, "depth", 0) + 1
        try:
            return super().forward(*args, **kwargs)
        finally:
            _FORWARD_ONLY.depth -= 1


class _BlockCausalSdpa:
    """Mixin of the softmax twins: the model's own forward, its SDPA call block-causal over frames."""

    def forward(self, *args, **kwargs):
        mask: BlockCausalAttnProcessor = self.__dict__[SCOPE_ATTR]
        with sdpa_scope(SdpaScope(mask, mask.context.current())) as scope:
            out = super().forward(*args, **kwargs)
        if not scope.masked_calls:
            raise CausalizeError(
                f"{type(self).__name__} made no scaled_dot_product_attention call over the video tokens",
                "this diffusers version's SANA-WM softmax attention changed: the plan needs updating",
            )
        return out


def _causal_short_conv_forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The module's own causal kernel (`_causal_conv`) over frames, once: output frame t reads frames t-k+1..t."""
    batch, length, channels = hidden_states.shape
    spatial = length // num_frames
    per_pixel = hidden_states.reshape(batch, num_frames, spatial, channels).transpose(1, 2)
    out = self._causal_conv(per_pixel.reshape(batch * spatial, num_frames, channels)).to(hidden_states.dtype)
    return out.reshape(batch, spatial, num_frames, channels).transpose(1, 2).reshape(batch, length, channels)


_TWINS: dict[str, type] = {}


def _twins() -> dict[str, type]:
    """Stock class name -> causal twin (direct subclasses: same parameters, same state-dict keys)."""
    if not _TWINS:
        mod = _sana_wm()
        for name, mixin in (
            ("SanaWMBidirectionalGDNAttention", _ForwardScanOnly),
            ("SanaWMBidirectionalGDNCamAttention", _ForwardScanOnly),
            ("SanaWMSoftmaxAttention", _BlockCausalSdpa),
            ("SanaWMSoftmaxCamAttention", _BlockCausalSdpa),
        ):
            _TWINS[name] = type(f"Causal{name[len('SanaWM') :]}", (mixin, getattr(mod, name)), {})
        short = mod.SanaWMTemporalShortConvolution
        _TWINS[short.__name__] = type(
            "CausalTemporalShortConvolution", (short,), {"forward": _causal_short_conv_forward}
        )
    return _TWINS


def _is_mixer(module: nn.Module) -> bool:
    return type(module).__name__ in _twins()


class SanaWMCausalMixing(Pass):
    name = "sana-wm-causal-mixing"
    version = 1
    summary = (
        "SANA-WM: bidirectional GDN scans -> forward scan only, bidirectional Q/K/V short convolutions -> their "
        "causal kernel, the softmax blocks' bare SDPA -> block-causal (SDPA scope)"
    )

    @dataclass(frozen=True)
    class Options:
        pass

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        return [
            Site(path, type(m).__name__, f"-> {_twins()[type(m).__name__].__name__}")
            for path, m, _ in ctx.plan.iter_targets(self.name, model, _is_mixer)
        ]

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        frame_ctx = install_context(model, ctx.plan.tokens)
        records = []
        for path, m, _ in list(ctx.plan.iter_targets(self.name, model, _is_mixer)):
            before = type(m).__name__
            twin = _twins()[before]
            if issubclass(twin, _BlockCausalSdpa):
                mask = BlockCausalAttnProcessor(None, frame_ctx, block_size=ctx.plan.layout.block_size)
                state.set_attribute(model, path, SCOPE_ATTR, mask)
            state.swap_class(model, path, twin)
            records.append(Record(self.name, path, before, twin.__name__))
        return records


CAMERA_CHANNELS = 20  # flattened 4x4 camera-to-world matrix, then fx, fy, cx, cy (in pixels)
PLUCKER_CHANNELS = 6
HEIGHT = WIDTH = 8


def camera_conditions(frames: int, gen: torch.Generator) -> torch.Tensor:
    """(1, T, 20): a camera moving along a random path, slightly rotating, fixed pinhole intrinsics."""
    angle = 0.1 * randn(gen, frames)
    c2w = torch.eye(4).repeat(frames, 1, 1)
    c2w[:, 0, 0], c2w[:, 0, 2] = angle.cos(), angle.sin()
    c2w[:, 2, 0], c2w[:, 2, 2] = -angle.sin(), angle.cos()
    c2w[:, :3, 3] = randn(gen, frames, 3).cumsum(0)
    intrinsics = torch.tensor([10.0, 10.0, WIDTH / 2, HEIGHT / 2]).repeat(frames, 1)
    return torch.cat([c2w.reshape(frames, 16), intrinsics], dim=1)[None]


def make_inputs(model, frames, gen):
    c = model.config
    return {
        "hidden_states": randn(gen, 1, c.in_channels, frames, HEIGHT, WIDTH),
        "timestep": mid_timestep(),
        "encoder_hidden_states": randn(gen, 1, 1, 12, c.caption_channels),
        "encoder_attention_mask": torch.ones(1, 12, dtype=torch.long),
        "camera_conditions": camera_conditions(frames, gen),
        "chunk_plucker": randn(gen, 1, PLUCKER_CHANNELS, frames, HEIGHT, WIDTH),
    }


def _camera_embeds(model, sample: torch.Tensor, cameras: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model file's own per-frame camera geometry, run in fp32 and cast to the model's dtype (its
    create_grid refuses half precision on CPU, and fp32 rays meet half-precision queries in an einsum)."""
    p = model.config.patch_size
    grid = (sample.shape[2] // p[0], sample.shape[3] // p[1], sample.shape[4] // p[2])
    raymats, absmap = _sana_wm()._process_camera_conditions_ucpe(cameras.float(), sample.shape[0], grid, p)
    return {
        "absmap": absmap.permute(0, 4, 1, 2, 3).to(model.dtype),
        "P": raymats.reshape(sample.shape[0], -1, 4, 4).to(model.dtype),
    }


def forward(model, inputs: dict) -> torch.Tensor:
    """The model's own forward; a per-sample timestep (scalar or (B,)) is given to every frame as the
    (B, 1, T) the blocks require (they read the frame count from it); in half precision the camera
    rays come from `_camera_embeds`."""
    cameras = inputs.get("camera_conditions")
    if (
        torch.is_tensor(cameras)
        and model.dtype not in (torch.float32, torch.float64)
        and "cam_pos_embeds" not in inputs
    ):
        inputs = {**inputs, "cam_pos_embeds": _camera_embeds(model, inputs["hidden_states"], cameras)}
    timestep = inputs.get("timestep")
    if torch.is_tensor(timestep) and timestep.dim() <= 1:
        sample = inputs["hidden_states"]
        frames = sample.shape[2] // model.config.patch_size[0]
        timestep = timestep.reshape(-1, 1, 1).expand(sample.shape[0], 1, frames)
        inputs = {**inputs, "timestep": timestep}
    return default_forward(model, inputs)


def model_timesteps(model, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-frame timesteps (B, T) -> SANA-WM's native (B, 1, T) (p_t = 1: a latent frame is a token frame)."""
    return timesteps[:, None, :]


PLAN = Plan(
    name="sana-wm",
    model_class="SanaWMTransformer3DModel",
    family="dit",
    pipeline="causal-temporal-conv,sana-wm-causal-mixing",
    layout=FrameLayout(inputs={"hidden_states": 2, "camera_conditions": 1, "chunk_plucker": 2}, output_axis=2),
    targets={
        "causal-temporal-conv": Targets(paths=("blocks.*.mlp.t_conv",), conv_dims=(2,), time_axis=0),
        "sana-wm-causal-mixing": Targets(paths=("blocks.*.attn.*",)),
    },
    tiny_config=dict(
        in_channels=4,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        patch_size=(1, 2, 2),
        softmax_every_n=2,
        linear_head_dim=16,
        t_kernel_size=3,
        # no Q/K/V short convolutions here: they run before the attention in each GDN block, so the stock model's
        # first leaking module would be a convolution, not the attention the generic DiT test names;
        # tests/test_sana_wm.py converts and verifies the released short-convolution configs
        conv_kernel_size=0,
        cam_attn_compress=1,
        use_chunk_plucker_post_attn=True,
        chunk_plucker_channels=PLUCKER_CHANNELS,
        chunk_plucker_post_attn_blocks=-1,
        image_size=16,
        caption_channels=16,
        mlp_ratio=2.0,
        mixed_precision="fp32",
    ),
    make_inputs=make_inputs,
    forward=forward,
    # timestep (B, 1, T): t_embedder embeds timestep.flatten() once per frame, (B·T, D), and every
    # block's adaLN and the final layer modulate frame t's tokens with frame t's row. Actions are
    # added to that per-frame output.
    conditioning=Conditioning(
        embedding="t_embedder", mode="per-token", sample_arg="hidden_states", model_timesteps=model_timesteps
    ),
    streaming=None,
    tokens=tokens,
    description="SANA-WM camera-controlled world-model DiT (bidirectional gated delta-rule linear attention + softmax blocks)",
    notes=(
        "GDN blocks: the backward (future) delta-rule scan of the main and camera branches is emptied (flip_and_shift "
        "returns its padding constant inside the twin, so that scan adds exactly 0): each frame keeps the forward scan",
        "Q/K/V short convolutions keep their causal kernel only (the stock model runs it both ways)",
        "softmax blocks call F.scaled_dot_product_attention outside any processor: their twins run it in the SDPA "
        "scope with the block-causal mask",
        "mlp.t_conv is Sana-Video's conv_temp: causal-temporal-conv",
        "per-frame timesteps are native, (B, 1, T); actions are added to t_embedder's (B·T, D) per-frame output",
        "camera_conditions (B, T, 20) and chunk_plucker (B, C, T, H, W) are per frame and frame-local",
        "plan.forward gives a per-sample timestep to every frame as (B, 1, T) (the blocks need it) and, in half "
        "precision, passes the camera rays as cam_pos_embeds computed in fp32 by the model file's own geometry "
        "(the stock forward cannot run bf16 camera conditions on CPU)",
        "the tiny config has no Q/K/V short convolutions (they would be the stock model's first leaking module, not "
        "an attention); tests/test_sana_wm.py converts and verifies the released conv_kernel_size=4 configs",
        "no streaming: the GDN state and the short convolutions' history would need a cache of their own; "
        "roll out by full recomputation",
    ),
)

SANA_WM_REFINER_REFUSAL = Refusal(
    model_class="SanaWMLTX2RefinerTransformer3DModel",
    reason=(
        "packed sequence without a frame map: video tokens come pre-patchified as (B, N, C) with no frame count, "
        "their frame positions only inside the caller-built video_rotary_emb; the model is chunk-causal already "
        "(autoregressive blocks over a sink + history KV cache) with full attention inside a block by design"
    ),
    nearest="ltx",
)


@hookimpl
def causalize_register_passes(register):
    register(SanaWMCausalMixing)


@hookimpl
def causalize_register_plans(register):
    register(PLAN)


@hookimpl
def causalize_register_refusals(register):
    register(SANA_WM_REFINER_REFUSAL)
