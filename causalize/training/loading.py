"""What a training run loads before its first step, and the checks that it all fits together:
the episode dataset, the converted world model, an optional frozen VAE and conditioning inputs.

Every mismatch (paths, action space, channels) is a :class:`TrainingError` naming both sides, raised
before any weights change.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalize.latents.spec import VaeError, encodes_video, find_vae_dir
from causalize.training.config import TrainConfig, TrainingError, adapter_has_own_group

if TYPE_CHECKING:
    import torch
    from torch import nn

    from causalize.episodes import EpisodeDataset
    from causalize.latents.spec import LatentNorm
    from causalize.world_model import WorldModel

__all__ = [
    "check_compatible",
    "check_paths",
    "data_latent_norm",
    "enable_checkpointing",
    "load_conditioning",
    "load_vae",
    "load_world_model",
    "open_dataset",
    "param_groups",
    "select_trainable",
]


def check_paths(config: TrainConfig) -> None:
    """Every path the run reads exists and the output directory can take the run, checked before
    anything is loaded (torch-free, so the CLI fails fast); the loaders below check again."""
    from causalize.training.checkpoints import check_output_dir

    _check_model_path(Path(config.model))
    _check_data_path(Path(config.data))
    for name, hint in (("vae", "a diffusers AutoencoderKL directory"), ("conditioning", "a safetensors file")):
        value = getattr(config, name)
        if value is not None and not Path(value).exists():
            raise TrainingError(f"{name} not found: {value}", f"{name} must be {hint}")
    if isinstance(config.resume, str) and not Path(config.resume).is_dir():
        raise TrainingError(
            f"not a training checkpoint: {config.resume} (no such directory)",
            "give --resume-from a checkpoint directory (OUT/checkpoints/step-N), or --resume for the newest one",
        )
    check_output_dir(config)


def _check_data_path(path: Path) -> None:
    if not path.exists():
        raise TrainingError(f"dataset not found: {path}", "pass the root of an episode dataset (docs/EPISODES.md)")


def _check_model_path(path: Path) -> None:
    from causalize.manifest import MANIFEST

    if not path.exists():
        raise TrainingError(
            f"model checkpoint not found: {path}", "convert one first: causalize convert SRC OUT --action-dim N"
        )
    if not (path / MANIFEST).is_file():
        raise TrainingError(
            f"{path} is not a converted causalize checkpoint (no {MANIFEST})",
            "convert it first: causalize convert SRC OUT --action-dim N",
        )


def open_dataset(config: TrainConfig) -> EpisodeDataset:
    """The training windows of ``config.data`` (split, stride, window as configured), every
    episode validated now (headers, checksums, action values), so bad data fails the run before
    its output directory is created rather than at some step."""
    from causalize.episodes import DataError, EpisodeDataset

    _check_data_path(Path(config.data))
    try:
        return EpisodeDataset(
            config.data,
            config.window,
            stride=config.stride,
            split=config.split,
            test_fraction=config.test_fraction,
            verify=config.verify_data,
            skip_short=config.skip_short,
        )
    except DataError as exc:
        raise TrainingError(f"cannot use dataset {config.data}: {exc.message}", exc.hint) from exc


def load_world_model(config: TrainConfig) -> WorldModel:
    """The converted checkpoint ``config.model``; a plain diffusers model is refused (no manifest)."""
    from causalize.world_model import WorldModel

    path = Path(config.model)
    _check_model_path(path)
    return WorldModel.from_pretrained(path)


def load_vae(path: str) -> Any:
    """A frozen diffusers autoencoder from its directory or a pipeline directory with ``vae/``."""
    import diffusers

    try:
        p = find_vae_dir(path)
    except VaeError as exc:  # the same rule as inference's, reported as a training error
        raise TrainingError(exc.message, exc.hint) from None
    vae_config = json.loads((p / "config.json").read_text())
    class_name = vae_config.get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "encode"):
        raise TrainingError(f"{p}: {class_name} is not a diffusers autoencoder")
    if encodes_video(vae_config):
        raise TrainingError(
            f"{p}: {class_name} encodes video, not frames (its encoder groups or mixes frames), but training "
            "encodes each frame on its own: the denoiser would learn latents its VAE never produces",
            "encode the episodes the way the pipeline does and train on them: causalize encode EPISODES OUT --vae "
            f"{path}; per-frame image VAEs (AutoencoderKL) work with --vae",
        )
    vae = cls.from_pretrained(p).eval()
    vae.requires_grad_(False)
    return vae


def latent_channels(vae: Any) -> int:
    """Channels of the VAE's latents, whatever its config calls them (`latent_channels`, `z_dim`)."""
    for key in ("latent_channels", "z_dim"):
        value = getattr(vae.config, key, None) if hasattr(vae.config, key) else vae.config.get(key)
        if isinstance(value, int):
            return value
    raise TrainingError(f"cannot tell the latent channels of {type(vae).__name__} from its config")


def _sample_channels(wm: WorldModel, frames: int) -> int | None:
    """Latent channels of the denoiser's sample (from the plan's example input, an I2V config's
    image channels left out), None if not 5-D."""
    from causalize.layout import from_native

    sample = wm.example_sample(frames)
    if sample.ndim != 5:
        return None
    layout = wm.plan.layout
    return int(from_native(sample, layout.inputs[wm.plan.conditioning.sample_arg], layout.channel_axis).shape[2])


def check_compatible(wm: WorldModel, info: Any, vae: Any, config: TrainConfig) -> None:
    """The model's action adapter and sample channels fit the dataset (through the VAE, if any)."""
    _check_action_space(wm, info, config)
    _check_channels(wm, info, vae, config)


def _check_action_space(wm: WorldModel, info: Any, config: TrainConfig) -> None:
    space = info.action_space
    encoder = wm.action_encoder
    if encoder is None:
        raise TrainingError(
            f"the model at {config.model} has no action adapter, but the dataset has {space.width}-dimensional {space.type} actions",
            f"convert it with an adapter: causalize convert SRC OUT --action-dim {space.width}",
        )
    if encoder.action_dim != space.width:
        raise TrainingError(
            f"action dimension mismatch: the dataset's action space has {space.width} dimensions ({space.type}) "
            f"but the model's action adapter expects {encoder.action_dim}",
            f"convert the model with --action-dim {space.width}, or use a dataset with {encoder.action_dim}-dimensional actions",
        )
    if encoder.action_type != space.type:
        raise TrainingError(
            f"action type mismatch: the dataset's actions are {space.type}, the model's adapter is {encoder.action_type}",
            f"convert the model with --action-type {space.type}",
        )


def _check_channels(wm: WorldModel, info: Any, vae: Any, config: TrainConfig) -> None:
    data_channels = info.channels
    source = f"the dataset's {info.kind}"
    if vae is not None:
        if info.kind != "pixels":
            raise TrainingError(
                f"--vae is set but the dataset {config.data} stores {info.kind}",
                "drop --vae (config: vae), or use a pixel dataset",
            )
        vae_in = int(getattr(vae.config, "in_channels", data_channels))
        if vae_in != data_channels:
            raise TrainingError(
                f"channel mismatch: the dataset's pixels have {data_channels} channels but the VAE takes {vae_in}"
            )
        data_channels = latent_channels(vae)
        source = "the VAE's latents"
    model_channels = _sample_channels(wm, min(config.window, 4))
    if model_channels is not None and model_channels != data_channels:
        hint = (
            "encode the episodes with the base model's VAE (causalize encode EPISODES OUT --vae PIPELINE), or pass --vae for a per-frame image VAE"
            if vae is None and info.kind == "pixels"
            else "train a model whose in_channels equal the data's channels"
        )
        image = " latent channels (the rest of its input is the image condition)" if wm.image_condition else ""
        raise TrainingError(
            f"channel mismatch: {source} have {data_channels} channels but the model's sample has {model_channels}{image}",
            hint,
        )


def data_latent_norm(config: TrainConfig, vae: Any) -> LatentNorm | None:
    """The normalisation of the latents training feeds the model: the per-frame VAE's (``--vae``)
    or the latent dataset's record; None when not known. An I2V family whose pipeline passes its
    image un-normalised (SVD) undoes it with this."""
    if vae is not None:
        from causalize.latents.spec import LatentNorm

        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return LatentNorm(scale=float(vae.config.scaling_factor), shift=float(shift))
    from causalize.latents.record import read_dataset_record

    record = read_dataset_record(config.data)
    return None if record is None else record.vae.norm


def select_trainable(wm: WorldModel, train_only: str) -> list[torch.nn.Parameter]:
    """Set requires_grad for "all" or "adapter" (the action encoder only); the trained parameters."""
    wm.requires_grad_(train_only == "all")
    if train_only == "adapter":
        encoder = wm.action_encoder
        if encoder is None:
            raise TrainingError(
                "--train-only adapter needs a model with an action adapter", "convert it with --action-dim N"
            )
        encoder.requires_grad_(True)
    return [p for p in wm.parameters() if p.requires_grad]


def param_groups(wm: WorldModel, params: list[torch.nn.Parameter], config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the denoiser's ``params`` at ``lr`` and the action
    adapter's at ``lr × adapter_lr_scale`` exactly when `adapter_has_own_group` says so (so that a
    checkpoint's group count can be checked without the model); otherwise one group, at the
    adapter's rate when it is all that trains. The metrics log group 0's rate."""
    lr, scale = config.lr, config.adapter_lr_scale
    if config.train_only == "adapter":
        return [{"params": params, "lr": lr * scale}]
    if not adapter_has_own_group(config.train_only, scale):
        return [{"params": params, "lr": lr}]
    adapter = {id(p) for p in wm.action_encoder.parameters()} if wm.action_encoder is not None else set()
    return [
        {"params": [p for p in params if id(p) not in adapter], "lr": lr},
        {"params": [p for p in params if id(p) in adapter], "lr": lr * scale},
    ]


def load_conditioning(path: str | None, wm: WorldModel | None = None) -> dict[str, torch.Tensor]:
    """Model keyword arguments at batch 1 from a safetensors file (`causalize embed-prompt`), checked
    against ``wm``'s denoiser (names, ranks, widths); {} without a file: zeros are used."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise TrainingError(f"conditioning file not found: {path}", "write one with causalize embed-prompt")
    from causalize.prompt import check_conditioning, load_conditioning_file

    tensors = load_conditioning_file(path)
    if wm is not None:
        check_conditioning(tensors, wm, path)
    return tensors


def enable_checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing that keeps the frame context; a warning (not an error) where the
    model does not support it, since training still works, only with more memory."""
    from causalize.context import enable_gradient_checkpointing

    if enable_gradient_checkpointing(model):
        return True
    warnings.warn(f"{type(model).__name__} does not support gradient checkpointing; training without it", stacklevel=5)
    return False
