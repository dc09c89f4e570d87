"""Tiny diffusers pipeline directories with random weights, built from configs (no hub access).

Tests and examples need whole pipelines (text encoder, tokenizer, VAE, scheduler and denoiser)
in the layout `DiffusionPipeline.from_pretrained` reads, without downloading gigabytes:

    build_tiny_pipeline("wan", "./tiny-wan")         # WanPipeline
    build_tiny_pipeline("unet3d", "./tiny-unet3d")   # TextToVideoSDPipeline (ModelScope / Zeroscope)

or from a shell: `python -m causalize.testing.pipelines wan ./tiny-wan`. The same seed gives the
same weights; each component has its own seed, so `tiny_vae(kind)` is the pipeline's VAE. The
denoisers are the plans' `tiny_config` models, so a pipeline's denoiser converts like the tests' ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

KINDS = ("wan", "wan-i2v", "unet3d")

#: The Wan VAE: temporal factor 4 (the first frame alone), spatial factor 8, 4 latent channels.
#: Means / stds are not 0 / 1 so that code which forgets to (de)normalise latents shows it.
WAN_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.8, 1.2, 2.0],
)
#: The UNet3D pipeline's VAE: spatial factor 2 (two blocks), 4 latent channels.
UNET3D_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)

_WORDS = (
    "a an the of and in on to with red green blue yellow black white cat dog car ball robot player game "
    "runs jumps moves turns left right up down fast slow big small video world"
).split()
_SEED_OFFSETS = {"vae": 1, "text_encoder": 2, "denoiser": 3}


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Each component from its own seed (the global RNG untouched): a component's weights do not
    depend on what was built before it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100 + _SEED_OFFSETS[component])
        yield


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: use one of {', '.join(KINDS)}")


def tiny_vae(kind: str, *, seed: int = 0):
    """The VAE of `build_tiny_pipeline(kind, seed=seed)`, in memory (eval mode)."""
    _check_kind(kind)
    from diffusers import AutoencoderKL, AutoencoderKLWan

    with _seeded(seed, "vae"):
        if kind in ("wan", "wan-i2v"):
            return AutoencoderKLWan(**WAN_VAE_CONFIG).eval()
        return AutoencoderKL(**UNET3D_VAE_CONFIG).eval()


def _t5_tokenizer(model_max_length: int):
    """A Unigram (sentencepiece-style) T5 tokenizer over a small vocabulary: pad 0, eos 1, unk 2,
    whole words, then single letters so that any word still tokenizes."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_tokenizer(model_max_length: int):
    """A byte-pair CLIP tokenizer over letters, digits and a few merges (no merges file download)."""
    from transformers import CLIPTokenizer

    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = []
    for word in ("the", "red", "cat", "dog", "car"):  # a few whole-word tokens
        merges += [(word[0], word[1]), (word[:2], word[2] + "</w>")]
        vocab.setdefault(word[:2], len(vocab))
        vocab.setdefault(word + "</w>", len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _wan_components(seed: int, image_to_video: bool = False) -> dict[str, Any]:
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from causalize.plugins.wan import PLAN

    tokenizer = _t5_tokenizer(model_max_length=512)
    d_model = 16
    with _seeded(seed, "text_encoder"):
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=d_model,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    with _seeded(seed, "denoiser"):
        transformer = WanTransformer3DModel(
            # image-to-video: [latents ; 4 mask channels ; the image's latent], as Wan 2.2 I2V-A14B
            # (no CLIP image encoder)
            **{**PLAN.tiny_config, "in_channels": 12 if image_to_video else 4, "out_channels": 4, "text_dim": d_model}
        ).eval()
    # Wan 2.1's diffusers repositories ship UniPC with flow sigmas (shift 3 at 480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae("wan", seed=seed),
        scheduler=scheduler,
        transformer=transformer,
    )


def _unet3d_components(seed: int) -> dict[str, Any]:
    from diffusers import DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from causalize.plugins.unet3d import PLAN

    tokenizer = _clip_tokenizer(model_max_length=16)
    hidden = PLAN.tiny_config["cross_attention_dim"]  # the UNet cross-attends to the text encoder's width
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_attention_heads=2,
                num_hidden_layers=2,
                max_position_embeddings=tokenizer.model_max_length,
                projection_dim=hidden,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    with _seeded(seed, "denoiser"):
        unet = UNet3DConditionModel(**PLAN.tiny_config).eval()
    scheduler = DDIMScheduler(  # ModelScope / Zeroscope's schedule
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )
    return dict(
        vae=tiny_vae("unet3d", seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_pipeline(kind: str, *, seed: int = 0):
    """The pipeline `build_tiny_pipeline` writes, in memory."""
    _check_kind(kind)
    from diffusers import TextToVideoSDPipeline, WanImageToVideoPipeline, WanPipeline

    if kind == "wan":
        return WanPipeline(**_wan_components(seed))
    if kind == "wan-i2v":
        return WanImageToVideoPipeline(**_wan_components(seed, image_to_video=True))
    return TextToVideoSDPipeline(**_unet3d_components(seed))


def build_tiny_pipeline(kind: str, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a complete tiny pipeline directory (model_index.json, component subfolders,
    safetensors) to `out`, loadable offline with `DiffusionPipeline.from_pretrained(out)`.

    kind: "wan" (WanPipeline), "wan-i2v" (WanImageToVideoPipeline, no image encoder) or "unet3d"
    (TextToVideoSDPipeline). Written atomically; an
    existing `out` is kept (FileExistsError) unless `overwrite`."""
    from causalize import fs

    pipe = tiny_pipeline(kind, seed=seed)
    with fs.new_directory(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m causalize.testing.pipelines",
        description="Write a tiny random-weight diffusers pipeline directory (for tests and examples).",
    )
    parser.add_argument(
        "kind",
        choices=KINDS,
        help="wan: WanPipeline; wan-i2v: WanImageToVideoPipeline; unet3d: TextToVideoSDPipeline",
    )
    parser.add_argument("out", type=Path, help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_pipeline(args.kind, args.out, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError:
        print(f"error: {args.out} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
