"""Frame-modulated twins of DiT modulation modules: a timestep embedding per frame, per token.

The per-sample DiTs (CogVideoX, EasyAnimate, HunyuanVideo, Mochi, Allegro, Latte) embed one
timestep per sample, temb (B, D), and turn it into shift / scale / gate. This file gives each
supported modulation class a subclass (a "twin") that is per-frame when the frame context holds
per-frame embeddings, and is the original module otherwise. Two kinds:

- CogVideoX's norms broadcast everything *inside the module* (they return `gate[:, None, :]`), so
  their twins return per-token (B, N, D) tensors and the block's forward works unchanged.
- The others return per-sample gates that the *block* broadcasts (`gate.unsqueeze(1)`,
  `scale_mlp[:, None]`, `torch.tanh(gate)`), or (AdaLN-single: Allegro, Latte) hand the embedding
  to a model forward that builds every modulation inline. Their twins change no arithmetic: they
  pass the original forward a FrameTensor (causalize.modules.frame_tensor) in place of temb, a
  tensor with the per-sample face whose values become per frame where they meet the tokens. No
  diffusers forward is copied, and an unforeseen use of the embedding raises instead of silently
  staying per sample.

Where the per-frame embeddings come from: frame-conditioning's delta hook (mode "delta") puts
`ctx.temb_delta` (B·T, D) = τ(k_t) − τ(k_0) + e_t in the frame context (τ: the model's own
time_proj / time_embedding, k_0 = timesteps[:, 0], the per-sample timestep WorldModel passes,
e_t the action embedding of frame t). The temb a modulation module receives is the model's
per-sample embedding plus anything added to it per sample (e.g. CogVideoX 1.5's `ofs`
embedding), so frame t's embedding is `temb + delta_t`.

- Video tokens (frame-major, `ctx.grid`): frame f's `per_frame` tokens are modulated with frame
  f's embedding. When one token frame holds r latent frames (CogVideoX 1.5: r = 2), it takes the
  mean of their embeddings; they form one causal block, so this stays causal.
- Context / text tokens keep the model's own per-sample embedding, i.e. frame 0's timestep
  (without an action). Frame 0 is in the past of every frame, so text modulated by it carries
  nothing from later frames: causality holds; the text stream is not per-frame.

Conversion swaps the module's class in place (`module.__class__ = twin`, recorded by
causalize.state so that `unconvert` puts the original class back): same parameters, same
submodules, same state-dict keys, so convert -> save -> load round-trips. Without per-frame
embeddings in the context (the model called directly, or outside a WorldModel call) the twin
calls the original forward: bit-identical. Which instances are swapped (e.g. HunyuanVideo's video
`norm1`, not its text `norm1_context` of the same class) and where their context tokens sit come
from the plan's "frame-conditioning" targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings
from diffusers.models.normalization import (
    AdaLayerNorm,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    CogVideoXLayerNormZero,
)

from causalize import state
from causalize.context import MODULE_CONTEXT
from causalize.errors import CausalizeError
from causalize.modules.frame_tensor import FrameTensor, TokenLayout

# The attribute frame-conditioning sets on the modules it hooks.
CTX = MODULE_CONTEXT
# Where a twin's context (text) tokens sit around the video tokens: "none" / "prefix" / "suffix".
CONTEXT = "_causalize_context"


def frame_values(module: nn.Module, temb: torch.Tensor) -> torch.Tensor | None:
    """Per-token-frame timestep embeddings (B, F, D), or None to behave as the original module.

    `temb` (B, D) is the per-sample embedding the module received. None when the frame context
    holds no per-frame embeddings (the model called directly, outside a WorldModel call).
    """
    ctx = getattr(module, CTX, None)
    if ctx is None or ctx.temb_delta is None or ctx.grid is None:
        return None
    delta, grid = ctx.temb_delta, ctx.grid
    if temb.dim() != 2 or delta.dim() != 2 or delta.shape[1] != temb.shape[1] or delta.shape[0] % temb.shape[0]:
        raise CausalizeError(
            f"{type(module).__name__} received a timestep embedding of shape {tuple(temb.shape)}, "
            f"per-frame conditioning has {tuple(delta.shape)}",
            "the plan's conditioning modulation modules are wrong for this model",
        )
    batch, width = temb.shape
    frames = delta.shape[0] // batch
    per_frame = temb[:, None, :] + delta.reshape(batch, frames, width).to(temb.dtype)  # (B, T, D)
    if frames == grid.frames:
        return per_frame
    if frames % grid.frames:
        raise CausalizeError(f"{frames} per-frame timesteps do not group into {grid.frames} token frames")
    # r latent frames share each token frame (one causal block): the mean of their embeddings
    return per_frame.reshape(batch, grid.frames, frames // grid.frames, width).mean(dim=2)


def frame_embeddings(module: nn.Module, temb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
    """`frame_values` for a module that modulates the video tokens alone: `tokens` (B, N, ·),
    N = F·P frame-major."""
    frames = frame_values(module, temb)
    if frames is None:
        return None
    grid = getattr(module, CTX).grid
    if tokens.shape[1] != grid.video_tokens:
        raise CausalizeError(
            f"{type(module).__name__} modulates {tokens.shape[1]} tokens, the frame grid has {grid.video_tokens} "
            f"({grid.frames} frames x {grid.per_frame})",
            "per-frame modulation needs the video tokens alone, frame-major",
        )
    return frames


def frame_tensor(
    module: nn.Module, temb: torch.Tensor, tokens: torch.Tensor | None = None
) -> FrameTensor | torch.Tensor | None:
    """`temb` (B, D) as a FrameTensor (per-sample face, per-frame values), or None to behave as the
    original module. `tokens` (B, L, ·) is the sequence the module modulates: the video tokens, plus
    context tokens before or after them as the module's context position (set by
    `make_frame_modulated`) says; None = the video tokens alone.

    Under torch.compile (a compiled streaming step, causalize.rollout.compiled) a call of one
    frame without context tokens gets that frame's embedding as a plain (B, D) tensor: every token
    it meets takes exactly those values, and Dynamo cannot trace the FrameTensor subclass."""
    frames = frame_values(module, temb)
    if frames is None:
        return None
    grid = getattr(module, CTX).grid
    length = grid.video_tokens if tokens is None else tokens.shape[1]
    extra = length - grid.video_tokens
    where = getattr(module, CONTEXT, "none")
    before, after = grid.context_split(extra, where) if extra >= 0 else (0, extra)
    if extra < 0 or after < 0 or (after and where not in ("prefix", "suffix")):
        raise CausalizeError(
            f"{type(module).__name__} modulates {length} tokens, the frame grid has {grid.video_tokens} video tokens "
            f"({grid.frames} frames x {grid.per_frame}) and the plan declares context '{where}'",
            "set the context position (prefix / suffix) in the plan's frame-conditioning targets",
        )
    if grid.frames == 1 and not before and not after and torch.compiler.is_compiling():
        return frames[:, 0]
    layout = TokenLayout(grid.frames, grid.per_frame, prefix=before, suffix=after)
    return FrameTensor.wrap(temb, frames, layout)


def per_token(values: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """(B, F, X) per token frame -> (B, F·P, X), each frame's row repeated over its P tokens."""
    return values.repeat_interleave(getattr(module, CTX).grid.per_frame, dim=1)


class FrameCogVideoXLayerNormZero(CogVideoXLayerNormZero):
    """CogVideoXLayerNormZero with per-frame shift / scale / gate for the video tokens (B, N, D);
    the text stream keeps the per-sample modulation (frame 0's timestep)."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        return None

    def forward(self, hidden_states, encoder_hidden_states, temb):
        frames = frame_embeddings(self, temb, hidden_states)
        if frames is None:
            return super().forward(hidden_states, encoder_hidden_states, temb)
        shift, scale, gate = per_token(self.linear(self.silu(frames)), self).chunk(6, dim=-1)[:3]
        _, _, _, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
        hidden_states = self.norm(hidden_states) * (1 + scale) + shift
        encoder_hidden_states = self.norm(encoder_hidden_states) * (1 + enc_scale)[:, None, :] + enc_shift[:, None, :]
        return hidden_states, encoder_hidden_states, gate, enc_gate[:, None, :]


class FrameAdaLayerNorm(AdaLayerNorm):
    """AdaLayerNorm (chunk_dim=1, temb given: CogVideoX's / EasyAnimate's norm_out) with a
    per-frame shift / scale over the video tokens."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        if module.emb is not None or module.chunk_dim != 1:
            return "only AdaLayerNorm(chunk_dim=1) fed a temb (no num_embeddings) is per-token"
        return None

    def forward(self, x, timestep=None, temb=None):
        frames = None if temb is None else frame_embeddings(self, temb, x)
        if frames is None:
            return super().forward(x, timestep, temb)
        shift, scale = per_token(self.linear(self.silu(frames)), self).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


# Twins that change no arithmetic: they hand the original forward a FrameTensor instead of the
# per-sample temb (causalize.modules.frame_tensor), so shift / scale / gate come out per frame
# wherever they meet the token sequence, inside the module or in the block that uses its gates.


class FrameAdaLayerNormZero(AdaLayerNormZero):
    """AdaLayerNormZero fed a temb (HunyuanVideo's video stream): per-frame shift / scale, and
    per-frame gate_msa / shift_mlp / scale_mlp / gate_mlp for the block."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        if module.emb is not None:
            return "only AdaLayerNormZero fed an `emb` (num_embeddings=None) is per-frame"
        return None

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        frames = None if emb is None else frame_tensor(self, emb, x)
        return super().forward(x, timestep, class_labels, hidden_dtype, emb=emb if frames is None else frames)


class FrameAdaLayerNormZeroSingle(AdaLayerNormZeroSingle):
    """AdaLayerNormZeroSingle (HunyuanVideo's single-stream blocks over [video ; text]): video tokens
    per frame, the context tokens (context position from the plan) per sample."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        return None

    def forward(self, x, emb=None):
        frames = None if emb is None else frame_tensor(self, emb, x)
        return super().forward(x, emb=emb if frames is None else frames)


class FrameAdaLayerNormContinuous(AdaLayerNormContinuous):
    """AdaLayerNormContinuous (HunyuanVideo's / Mochi's norm_out): per-frame shift / scale."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        return None

    def forward(self, x, conditioning_embedding):
        frames = frame_tensor(self, conditioning_embedding, x)
        return super().forward(x, conditioning_embedding if frames is None else frames)


class FramePixArtAlphaCombinedTimestepSizeEmbeddings(PixArtAlphaCombinedTimestepSizeEmbeddings):
    """The AdaLN-single embedding (Allegro, Latte: `adaln_single.emb`) returned as a FrameTensor over
    the video tokens: the model's own forward then computes every block's and its final layer's
    modulation from it inline, per frame."""

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        return None

    def forward(self, timestep, resolution, aspect_ratio, batch_size, hidden_dtype):
        out = super().forward(timestep, resolution, aspect_ratio, batch_size, hidden_dtype)
        frames = frame_tensor(self, out)
        return out if frames is None else frames


TWINS: dict[str, type[nn.Module]] = {
    "CogVideoXLayerNormZero": FrameCogVideoXLayerNormZero,
    "AdaLayerNorm": FrameAdaLayerNorm,
    "AdaLayerNormZero": FrameAdaLayerNormZero,
    "AdaLayerNormZeroSingle": FrameAdaLayerNormZeroSingle,
    "AdaLayerNormContinuous": FrameAdaLayerNormContinuous,
    "PixArtAlphaCombinedTimestepSizeEmbeddings": FramePixArtAlphaCombinedTimestepSizeEmbeddings,
}


# Twins by the class they subclass: diffusers copies a class into several model files under one
# name (Wan's and Wan-Animate's WanTimeTextImageEmbedding), and TWINS, keyed by name, holds one.
_BY_PARENT: dict[type, type[nn.Module]] = {}


def _twin_for(module: nn.Module) -> type[nn.Module]:
    name = type(module).__name__
    twin = _BY_PARENT.get(type(module), TWINS.get(name))
    if twin is None or type(module) is not twin.__mro__[1]:
        raise CausalizeError(f"no frame-modulated twin for {name}", f"supported: {', '.join(sorted(TWINS))}")
    reason = twin.supports(module)
    if reason:
        raise CausalizeError(f"cannot modulate this {name} per frame: {reason}")
    return twin


def make_frame_modulated(
    module: nn.Module, ctx, context: str = "none", *, model: nn.Module | None = None, path: str = ""
) -> nn.Module:
    """Turn `module` (in place) into its frame-modulated twin reading the frame context `ctx`.
    `context`: where context (text) tokens sit around the video tokens in the sequence it
    modulates, "none" / "prefix" / "suffix" (they keep the per-sample modulation).

    Only the class changes: parameters, buffers, submodules and hooks stay, so do state-dict keys.
    The class swap and the two attributes are recorded (causalize.state) in the registry of
    `model`, the root `module` sits at `path` in (default: `module` itself), so `unconvert` undoes them.
    """
    if context not in ("none", "prefix", "suffix"):
        raise CausalizeError(f"context must be 'none', 'prefix' or 'suffix', got {context!r}")
    root = module if model is None else model
    if type(module) not in TWINS.values() and type(module) not in _BY_PARENT.values():
        state.swap_class(root, path, _twin_for(module))
    state.set_attribute(root, path, CTX, ctx)
    state.set_attribute(root, path, CONTEXT, context)
    return module


def register_twin(original: str, twin: type[nn.Module]) -> None:
    """Add a twin for another modulation class (its direct subclass, with a `supports` classmethod).
    Classes of the same name from different diffusers files each keep their own twin."""
    TWINS[original] = twin
    parent = twin.__mro__[1] if isinstance(twin, type) and len(twin.__mro__) > 2 else None
    if parent is not None and parent.__name__ == original:
        _BY_PARENT[parent] = twin


__all__ = [
    "CONTEXT",
    "CTX",
    "TWINS",
    "FrameAdaLayerNorm",
    "FrameAdaLayerNormContinuous",
    "FrameAdaLayerNormZero",
    "FrameAdaLayerNormZeroSingle",
    "FrameCogVideoXLayerNormZero",
    "FramePixArtAlphaCombinedTimestepSizeEmbeddings",
    "frame_embeddings",
    "frame_tensor",
    "frame_values",
    "make_frame_modulated",
    "per_token",
    "register_twin",
]
