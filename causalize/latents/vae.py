"""Running a VAE the way its pipeline does: whole clips through the encoder (so a video VAE sees
the frame groups it was trained on), the pipeline's normalisation, and decoding that streams one
latent frame at a time where the VAE allows it (:class:`StreamingDecoder`).

Pixels here are float tensors in [-1, 1], channels first: a clip is (B, C, T, H, W); latents are
(B, C, J, h, w) and normalised ("model space", what the denoiser consumes) unless a name says raw.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from causalize.latents.spec import LatentNorm, VaeError, VaeSpec, read_spec

__all__ = [
    "StreamingDecoder",
    "decode_clip",
    "denormalise",
    "encode_clip",
    "load_vae",
    "normalise",
]


def load_vae(
    path: str | os.PathLike,
    subfolder: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[Any, VaeSpec]:
    """The frozen, eval-mode VAE at ``path`` (a VAE directory or a pipeline with ``vae/``) on
    ``device`` in ``dtype`` (None: as stored; modules diffusers keeps in fp32 stay fp32), and its
    spec. The spec is read before any weight, so an unsupported class fails fast."""
    import diffusers

    from causalize.precision import check_dtype_on, parse_dtype, resolve_device, to_precision

    spec = read_spec(path, subfolder)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    check_dtype_on(torch_dtype, dev)
    cls = getattr(diffusers, spec.class_name, None)
    if cls is None:
        raise VaeError(f"{spec.path}: diffusers {diffusers.__version__} has no class {spec.class_name}")
    vae = cls.from_pretrained(spec.path)
    vae.requires_grad_(False).eval()
    if torch_dtype is not None or dev is not None:
        to_precision(vae, torch_dtype, dev)
    named = dict(vae.named_buffers())
    buffers = named.get("latents_mean"), named.get("latents_std")
    if spec.norm.mean is None and all(torch.is_tensor(b) for b in buffers):  # LTX keeps them as weights
        norm = replace(spec.norm, mean=_floats(buffers[0]), std=_floats(buffers[1]))
        norm.check(spec.latent_channels, spec.path)
        spec = replace(spec, norm=norm)
    return vae, spec


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in t.detach().float().cpu().flatten())


def _stats(norm: LatentNorm, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """mean and std broadcastable over channel axis 1 of ``like``."""
    shape = (1, -1) + (1,) * (like.ndim - 2)

    def vec(values: tuple[float, ...] | None, default: float) -> torch.Tensor | float:
        return default if values is None else torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    mean = vec(norm.mean, 0.0)
    return (mean + norm.shift if norm.shift else mean), vec(norm.std, 1.0)


def normalise(z: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Raw VAE latents → the denoiser's space: ``(z - mean) * scale / std`` (channel axis 1)."""
    mean, std = _stats(norm, z)
    return (z - mean) * norm.scale / std


def denormalise(z: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """The inverse of :func:`normalise`: what the VAE's decoder takes."""
    mean, std = _stats(norm, z)
    return z * std / norm.scale + mean


def _vae_dtype(vae: Any) -> torch.dtype:
    return next(vae.parameters()).dtype


def _vae_device(vae: Any) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def encode_clip(vae: Any, spec: VaeSpec, clip: torch.Tensor, *, chunk: int = 16, sample: bool = False) -> torch.Tensor:
    """Pixels (B, C, T, H, W) in [-1, 1] → normalised latents (B, C', J, h, w) in fp32.

    A video VAE encodes each clip whole (T must follow ``spec.grouping``); an image VAE encodes
    frames on their own, ``chunk`` frames per call. The posterior's mode by default (deterministic:
    the same episode always gives the same latents); ``sample=True`` draws from it."""
    if clip.ndim != 5:
        raise ValueError(f"expected a clip (B, C, T, H, W), got shape {tuple(clip.shape)}")
    b, c, t, h, w = clip.shape
    _check_pixels(spec, c, h, w)
    x = clip.to(device=_vae_device(vae), dtype=_vae_dtype(vae))
    if spec.video:
        if not spec.grouping.fits(t):
            raise VaeError(f"{spec.class_name} encodes clips of {spec.grouping.rule()}, got {t} frames")
        z = _posterior(vae.encode(x).latent_dist, sample)
    else:
        flat = x.movedim(2, 1).reshape(b * t, c, h, w)
        z = torch.cat([_posterior(vae.encode(part).latent_dist, sample) for part in flat.split(chunk)])
        z = z.reshape(b, t, *z.shape[1:]).movedim(1, 2)
    return normalise(z.float(), spec.norm)


def _posterior(dist: Any, sample: bool) -> torch.Tensor:
    return dist.sample() if sample else dist.mode()


def _check_pixels(spec: VaeSpec, channels: int, h: int, w: int) -> None:
    if channels != spec.pixel_channels:
        raise VaeError(f"{spec.class_name} takes {spec.pixel_channels}-channel pixels, got {channels} channels")
    f = spec.spatial_factor
    if h % f or w % f:
        raise VaeError(
            f"frames of {h}×{w} pixels do not divide by the VAE's spatial factor {f}",
            f"resize or crop the frames to multiples of {f}",
        )


@torch.no_grad()
def decode_clip(vae: Any, spec: VaeSpec, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C', J, h, w) → pixels (B, C, T, H, W) in [-1, 1], fp32, through the
    VAE's own decode of the whole clip (the reference the streaming decoder is tested against)."""
    z = denormalise(latents.to(device=_vae_device(vae), dtype=torch.float32), spec.norm).to(_vae_dtype(vae))
    if spec.video:
        return vae.decode(z).sample.float().clamp(-1, 1)
    b, c, j, h, w = z.shape
    flat = z.movedim(2, 1).reshape(b * j, c, h, w)
    x = torch.cat([vae.decode(part).sample for part in flat.split(16)]).float().clamp(-1, 1)
    return x.reshape(b, j, *x.shape[1:]).movedim(1, 2)


class StreamingDecoder:
    """Decodes a growing latent clip one latent frame at a time; :meth:`push` returns the pixel
    frames that latent frame adds (1 for the first frame of a causal video VAE, else ``factor``).

    - "own-cache" (AutoencoderKLWan): the VAE's decoder with its own causal feature cache, which
      diffusers' ``_decode`` also walks frame by frame, so each latent frame is decoded once and
      the result equals decoding the whole clip.
    - "per-frame" (image VAEs): every latent frame on its own; exact.
    - "whole" (CogVideoX, HunyuanVideo, LTX: no cache diffusers exposes, and decoders that look
      ahead in time): the clip so far is decoded again at every push and its newest frames
      returned. The cost grows with the clip (:attr:`redecodes` counts frames decoded again), and
      a frame shown early can differ from the same frame in a decode of the finished clip, so
      file rollouts decode such clips once, whole (:func:`decode_clip`).
    """

    def __init__(self, vae: Any, spec: VaeSpec):
        self.vae, self.spec = vae, spec
        self.mode = spec.decode_stream
        if self.mode == "own-cache" and getattr(vae, "use_tiling", False):
            self.mode = "whole"  # tiled decoding keeps no cache across calls
        self.redecodes = 0
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self._latents: list[torch.Tensor] = []
        self._cache: list[Any] | None = None

    @property
    def latent_frames(self) -> int:
        return self._count

    @torch.no_grad()
    def push(self, latent: torch.Tensor) -> torch.Tensor:
        """One normalised latent frame (B, C', h, w) or (B, C', 1, h, w) → its pixels (B, C, n, H, W)."""
        z = latent if latent.ndim == 5 else latent.unsqueeze(2)
        if z.shape[2] != 1:
            raise ValueError(f"push takes one latent frame, got {z.shape[2]}")
        first = self._count == 0
        self._count += 1
        if self.mode == "per-frame":
            return decode_clip(self.vae, self.spec, z)
        if self.mode == "own-cache":
            return self._push_cached(z, first)
        self._latents.append(z)
        clip = decode_clip(self.vae, self.spec, torch.cat(self._latents, dim=2))
        new = len(self.spec.grouping.covers(self._count - 1))
        self.redecodes += clip.shape[2] - new
        return clip[:, :, -new:]

    def _push_cached(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        vae = self.vae
        if first:
            self._cache = [None] * _decoder_conv_count(vae)
        x = denormalise(z.to(device=_vae_device(vae), dtype=torch.float32), self.spec.norm).to(_vae_dtype(vae))
        x = vae.post_quant_conv(x)
        out = vae.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=first)
        patch = getattr(vae.config, "patch_size", None)
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch)
        return out.float().clamp(-1, 1)


def _decoder_conv_count(vae: Any) -> int:
    """Slots of the Wan decoder's feature cache (diffusers counts its causal convolutions)."""
    counts = getattr(vae, "_cached_conv_counts", None)
    if isinstance(counts, dict) and "decoder" in counts:
        return int(counts["decoder"])
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
