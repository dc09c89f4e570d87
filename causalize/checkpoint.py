"""Reading and writing diffusers model directories, with errors that say what to do next.

Weights are read from safetensors; pickle files are refused unless explicitly allowed, and then
loaded with `weights_only=True`. The model is built with meta parameters and the weights are
assigned, so a large checkpoint is never randomly initialised first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from causalize.errors import CheckpointError, PickleRefused, UsageError

CONFIG = "config.json"
WEIGHTS_ST = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
DENOISER_SUBFOLDERS = ("transformer", "unet")


@dataclass
class ModelDir:
    """A resolved diffusers model directory: where it is, its config and its weight files."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    pickle: bool

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]


def _readable_dir(src: Path) -> None:
    if not src.exists():
        raise CheckpointError(f"{src} does not exist", "give a diffusers model or pipeline directory")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory", "give the directory that holds config.json")
    if not os.access(src, os.R_OK | os.X_OK):
        raise CheckpointError(f"{src} is not readable", "check its permissions")


def resolve(src: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The model directory: SRC itself, or the denoiser subfolder of a pipeline directory."""
    src = Path(src)
    _readable_dir(src)
    if subfolder:
        sub = src / subfolder
        _readable_dir(sub)
        return sub
    if (src / CONFIG).exists():
        return src
    if (src / "model_index.json").exists():
        found = [s for s in DENOISER_SUBFOLDERS if (src / s / CONFIG).exists()]
        if len(found) == 1:
            return src / found[0]
        if not found:
            raise CheckpointError(
                f"pipeline {src} has no denoiser subfolder ({' or '.join(DENOISER_SUBFOLDERS)})",
                "pass --subfolder NAME",
            )
        raise CheckpointError(f"pipeline {src} has several denoisers: {', '.join(found)}", "pass --subfolder NAME")
    raise CheckpointError(
        f"no {CONFIG} in {src}", "give a diffusers model directory (config.json + safetensors) or a pipeline directory"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG
    if not path.exists():
        raise CheckpointError(f"no {CONFIG} in {model_dir}", "give a diffusers model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}", "restore it from the original checkpoint") from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise CheckpointError(f"{path} has no '_class_name'", "it must be a diffusers model config")
    return config


def _weight_files(model_dir: Path) -> tuple[list[Path], bool]:
    for name, is_pickle in ((WEIGHTS_ST, False), (WEIGHTS_BIN, True)):
        index = model_dir / f"{name}.index.json"
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is corrupt: {exc}", "restore it from the original checkpoint") from None
            missing = [s for s in shards if not (model_dir / s).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists missing shards: {', '.join(missing[:3])}", "download the whole checkpoint"
                )
            return [model_dir / s for s in shards], is_pickle
        if (model_dir / name).exists():
            return [model_dir / name], is_pickle
    raise CheckpointError(
        f"no weights in {model_dir} (expected {WEIGHTS_ST})",
        "save the model with save_pretrained(safe_serialization=True)",
    )


def open_model_dir(src: str | os.PathLike, subfolder: str | None = None) -> ModelDir:
    model_dir = resolve(src, subfolder)
    config = read_config(model_dir)
    files, is_pickle = _weight_files(model_dir)
    return ModelDir(model_dir, config, files, is_pickle)


def load_state_dict(md: ModelDir, allow_pickle: bool = False) -> dict[str, Any]:
    """All weights of the model directory as one state dict."""
    import torch
    from safetensors.torch import load_file

    if md.pickle and not allow_pickle:
        raise PickleRefused(
            f"{md.weight_files[0].name} is a pickle file, which can run arbitrary code",
            "convert it to safetensors, or pass --allow-pickle to load it with weights_only=True",
        )
    state: dict[str, Any] = {}
    for f in md.weight_files:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True) if md.pickle else load_file(str(f))
        except Exception as exc:
            raise CheckpointError(
                f"cannot read weights {f}: {type(exc).__name__}: {str(exc)[:200]}",
                "the file is corrupt or truncated; restore it",
            ) from None
        state.update(part)
    return state


def model_class(class_name: str) -> type:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise CheckpointError(
            f"diffusers has no model class {class_name!r}", "check config.json's _class_name and your diffusers version"
        )
    return cls


def build_empty(class_name: str, config: dict[str, Any]):
    """The model structure with parameters on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    cls = model_class(class_name)
    try:
        with init_empty_weights(include_buffers=False):
            return cls.from_config(config)
    except Exception as exc:
        raise CheckpointError(
            f"config.json does not build a {class_name}: {type(exc).__name__}: {exc}", "check the config values"
        ) from None


def assign_weights(model, state: dict[str, Any], where: Path) -> None:
    """Assign the weights (strict): every parameter must come from the checkpoint."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"weights in {where} do not match config.json: {'; '.join(parts)}",
            "the weights and config come from different models",
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {where} do not fit the model: {str(exc).splitlines()[0]}",
            "the weights and config come from different models",
        ) from None
    model.eval()


def check_out_path(src_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse outputs that would lose data: an existing OUT, OUT inside SRC, OUT == SRC."""
    src_r, out_r = src_dir.resolve(), out.resolve()
    roots = {src_r, src_r.parent} if src_r.name in DENOISER_SUBFOLDERS else {src_r}
    for root in roots:
        if out_r == root or root in out_r.parents:
            raise UsageError(
                f"OUT {out} is inside SRC {root}", "choose an output directory outside the source checkpoint"
            )
        if out_r in root.parents:
            raise UsageError(
                f"OUT {out} contains SRC {root}", "choose an output directory that does not contain the source"
            )
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another OUT")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", "choose another OUT")
