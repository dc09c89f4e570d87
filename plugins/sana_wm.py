"""SANA-WM (stage 1 camera-controlled world model, stage 2 LTX-2 refiner): refused, with the sites a
port needs. Read from diffusers 0.42.1's transformer_sana_wm.py / transformer_sana_wm_refiner.py.

SanaWMTransformer3DModel, input (B, C, T, H, W), per-frame timesteps (B, 1, T). Frames mix in:
- every non-softmax block's `attn.attn` (SanaWMBidirectionalGDNAttention): a gated-delta-rule
  scan over frames run forwards (frames <= t) *and* over the time-flipped, shifted sequence
  (frames > t, via `flip_and_shift`); both streams are summed into each frame's numerator and
  denominator. The camera branch `attn.cam_attn` (SanaWMBidirectionalGDNCamAttention, UCPE ray
  transforms) does the same. A causal variant keeps the forward scan only (the backward one
  fed empty keys: `flip_and_shift` -> a constant), which the forward scan already is per frame.
- the Q/K/V short convolutions `conv_q/k/v(_cam)` (SanaWMTemporalShortConvolution): a causal
  depthwise kernel run forwards and on the flipped sequence, minus the doubled centre tap, i.e. a
  centred (2k-1)-tap filter over frames; the causal variant is the forward run alone.
- every `softmax_every_n`-th block's `attn.attn` / `attn.cam_attn` (SanaWMSoftmax*Attention): a
  bare `F.scaled_dot_product_attention(q, k, v)` in bf16 over all tokens, outside any processor,
  so the processor-level block-causal wrapper cannot reach it (it needs a module-level SDPA scope).
- the FFN `mlp.t_conv` (GLUMBConvTemp): Conv2d (k, 1), padding k // 2, over (B, C, T, H*W), i.e.
  Sana-Video's conv_temp, which the causal-temporal-conv pass already handles (conv_dims=(2,)).
- the camera branch: raw (B, T, 20) camera conditions become UCPE ray matrices and an absolute
  map; whether any of that is normalised over the clip was not audited.
Timesteps are per frame natively ((B, 1, T) -> per-frame adaLN), so frame-conditioning would be
per-token-like. Refused for now: four twin modules, a module-level SDPA scope and a camera audit
are a port of their own; the reason names the sites.

SanaWMLTX2RefinerTransformer3DModel: LTX-2's video stream on pre-packed tokens (B, N, C) with
a caller-built `video_rotary_emb` (absolute frame positions) and no frame count argument: the
frame map lives in the caller's RoPE. It is chunk-causal already (autoregressive blocks over a
sliding-window KV cache of sink + history, `kv_cache_mode`), with full attention inside a block by
design: the refiner denoises an AR block jointly.
"""

from __future__ import annotations

from causalize.hookspecs import hookimpl
from causalize.plan import Refusal

SANA_WM_REFUSAL = Refusal(
    model_class="SanaWMTransformer3DModel",
    reason=(
        "bidirectional recurrence over frames: every GDN block scans its gated delta rule forwards and over the "
        "time-flipped sequence (future frames' keys and values summed into each frame's state, main and UCPE camera "
        "branch), its Q/K/V short convolutions run a causal kernel both ways (a centred filter), and every "
        "softmax_every_n-th block calls F.scaled_dot_product_attention unmasked outside any attention processor; "
        "causal twins for the backward scans and short convolutions and a module-level SDPA mask are not implemented"
    ),
    nearest="sana-video",
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
def causalize_register_refusals(register):
    register(SANA_WM_REFUSAL)
    register(SANA_WM_REFINER_REFUSAL)
