"""Reading and writing diffusers model directories, with errors that say what to do next.

Weights are read from safetensors; pickle files are refused unless explicitly allowed, and then
loaded with `weights_only=True`. The model is built with meta parameters and the weights are
assigned, so a large checkpoint is never randomly initialised first.

Every file is untrusted: shards must be regular files beside their index (a symlink to one is
fine: the Hugging Face cache links snapshot files to ../../blobs/), and the sizes config.json asks
for are checked on the meta device against the safetensors headers before anything is allocated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from causalize.errors import CheckpointError, PickleRefused, UsageError
from causalize.manifest import mark_config

CONFIG = "config.json"
WEIGHTS_ST = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
DENOISER_SUBFOLDERS = ("transformer", "unet")
RESTORE = "restore it from the original checkpoint"
MAX_DERIVED_BUFFER_BYTES = 1 << 30
"""Bound on the buffers a model computes in __init__ from config.json that the weights do not hold
(RoPE tables, sinusoidal position tables): real configs need a few MB; rope_max_seq_len=10**9
would need terabytes."""
ELEMENT_SLACK = 1 << 22
"""Elements a model may have beyond twice what its weight files hold (tiny models, derived buffers)."""


@dataclass
class ModelDir:
    """A resolved diffusers model directory: where it is, its config and its weight files.

    `pipeline_dir`: the pipeline directory SRC named when the model is one of its subfolders (an
    output inside it would be written into the source checkpoint)."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    pickle: bool
    pipeline_dir: Path | None = None

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Every tensor's shape from the safetensors headers (no tensor data is read); None for pickle."""
        return None if self.pickle else read_shapes(self.weight_files)


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
        found = denoiser_subfolders(src)
        if len(found) == 1:
            return src / found[0]
        if not found:
            raise CheckpointError(
                f"pipeline {src} has no denoiser subfolder ({' or '.join(DENOISER_SUBFOLDERS)})",
                "pass --subfolder NAME",
            )
        raise CheckpointError(
            f"pipeline {src} has several denoisers: {', '.join(found)} (e.g. Wan 2.2 A14B's two experts)",
            "pass --subfolder NAME (`causalize convert` without it converts them all into OUT/NAME)",
        )
    raise CheckpointError(
        f"no {CONFIG} in {src}", "give a diffusers model directory (config.json + safetensors) or a pipeline directory"
    )


def stock_class(path: str | os.PathLike, subfolder: str | None = None) -> tuple[str, dict] | None:
    """(class name, config) of an unconverted checkpoint from its config.json alone, so that a class
    without a plan is reported before any weight is read; None for converted ones (their manifest
    names the plan) or an unreadable config (the loader reports it)."""
    d = resolve(path, subfolder)
    if (d / "causalize.json").exists():
        return None
    try:
        config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    return (name, config) if isinstance(name, str) and is_model_class(name) else None


def denoiser_subfolders(pipeline: str | os.PathLike) -> list[str]:
    """The denoiser subfolders of a pipeline directory: transformer / unet, and further experts
    named like them (transformer_2: Wan 2.2 A14B's low-noise expert), in name order."""
    import re

    root = Path(pipeline)
    if not (root / "model_index.json").exists():
        return []
    pattern = re.compile(r"(" + "|".join(DENOISER_SUBFOLDERS) + r")(_\d+)?")
    return sorted(p.name for p in root.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and (p / CONFIG).exists())


def _regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file (a symlink is followed): reading a FIFO or a device would
    block forever or never end, and a directory is not a weight file."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror}", RESTORE) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise CheckpointError(f"{what} {path} is {kind}", f"it must be a regular file; {RESTORE}")


def _load_json(path: Path, what: str) -> Any:
    _regular_file(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}", RESTORE) from None


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG
    if not os.path.lexists(path):
        raise CheckpointError(f"no {CONFIG} in {model_dir}", "give a diffusers model directory")
    config = _load_json(path, "config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is a JSON {type(config).__name__}, not an object", RESTORE)
    if "_class_name" not in config:
        raise CheckpointError(f"{path} has no '_class_name'", "it must be a diffusers model config")
    if not isinstance(config["_class_name"], str):
        raise CheckpointError(f"{path}: '_class_name' is {config['_class_name']!r}, not a class name", RESTORE)
    config.pop("causalize", None)  # the converted-checkpoint marker (manifest.CONFIG_MARKER), not a model option
    return config


def _plain_name(name: str) -> bool:
    """A file name with no directory part: it can only name a file in the index's own directory."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and not os.path.isabs(name)


def _shard_names(index: Path) -> list[str]:
    """The shard files an index lists, each checked to be a plain file name (no `..`, no absolute
    path: the index must not pull weights from outside the model directory)."""
    doc = _load_json(index, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file)", RESTORE)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not _plain_name(name):
            raise CheckpointError(
                f"{index}: entry {key!r} names shard {name!r}, which is not a file name in {index.parent}",
                f"shards must be files beside the index; {RESTORE}",
            )
    return sorted(set(weight_map.values()))


def _weight_files(model_dir: Path) -> tuple[list[Path], bool]:
    for name, is_pickle in ((WEIGHTS_ST, False), (WEIGHTS_BIN, True)):
        index = model_dir / f"{name}.index.json"
        if os.path.lexists(index):
            shards = _shard_names(index)
            missing = [s for s in shards if not (model_dir / s).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists missing shards: {', '.join(missing[:3])}", "download the whole checkpoint"
                )
            for s in shards:
                _regular_file(model_dir / s, f"{index}: shard")
            return [model_dir / s for s in shards], is_pickle
        if os.path.lexists(model_dir / name):
            _regular_file(model_dir / name, "weights")
            return [model_dir / name], is_pickle
    raise CheckpointError(
        f"no weights in {model_dir} (expected {WEIGHTS_ST})",
        "save the model with save_pretrained(safe_serialization=True)",
    )


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers, without reading tensor data."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except Exception as exc:
            raise CheckpointError(
                f"cannot read weights {f}: {type(exc).__name__}: {str(exc)[:200]}",
                "the file is corrupt or truncated; restore it",
            ) from None
    return shapes


def open_model_dir(src: str | os.PathLike, subfolder: str | None = None) -> ModelDir:
    model_dir = resolve(src, subfolder)
    config = read_config(model_dir)
    files, is_pickle = _weight_files(model_dir)
    pipeline_dir = Path(src) if model_dir != Path(src) else None
    return ModelDir(model_dir, config, files, is_pickle, pipeline_dir)


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
            import pickle
            import re

            if md.pickle and isinstance(exc, pickle.UnpicklingError):
                # torch's weights-only unpickler refused it. Its own text suggests weights_only=False
                # or allowlisting globals, i.e. turning the protection off: only its finding is kept.
                found = re.search(r"[Uu]nsupported[^\n]*", str(exc))
                detail = re.split(r"\.\s", found.group(0))[0].rstrip(".") if found else "objects other than tensors"
                raise PickleRefused(
                    f"{f} was refused as unsafe: it is not a plain weights file ({detail[:200]})",
                    "loading it could run code; get these weights as safetensors from a source you trust",
                ) from None
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


class _Oversized(Exception):
    """Raised from the registration hook to stop a meta build that outgrows its weights."""


@contextlib.contextmanager
def _registration_budget(max_elements: int | None, max_tensors: int | None) -> Iterator[None]:
    """Stop a build as soon as its parameters outgrow the budget: a config asking for 10**6 layers
    would spend minutes and gigabytes on module objects, even on the meta device."""
    from torch.nn.modules import module as torch_module

    seen = {"elements": 0, "tensors": 0}

    def on_parameter(module, name, param):
        if param is None:
            return
        seen["tensors"] += 1
        seen["elements"] += param.numel()
        if (max_tensors is not None and seen["tensors"] > max_tensors) or (
            max_elements is not None and seen["elements"] > max_elements
        ):
            raise _Oversized(f"{type(module).__name__}.{name} {list(param.shape)}")

    handle = torch_module.register_module_parameter_registration_hook(on_parameter)
    try:
        yield
    finally:
        handle.remove()


def _budget(md: ModelDir | None) -> tuple[int | None, int | None, str]:
    """(max elements, max parameter tensors, what the weights hold) for a model built from md's config."""
    if md is None:
        return None, None, ""
    if md.shapes is not None:
        elements = sum(math.prod(s) for s in md.shapes.values())
        return 2 * elements + ELEMENT_SLACK, 2 * len(md.shapes) + 1024, f"{elements:,} elements"
    size = sum(f.stat().st_size for f in md.weight_files)  # pickle: at least one byte per element
    return 2 * size + ELEMENT_SLACK, None, f"{size:,} bytes"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _check_sizes(probe, class_name: str, where: Path | str, max_elements: int | None, holds: str) -> None:
    """Sizes of a meta-built model: buffers the weights do not hold are bounded, and (with a budget)
    the state dict may not outgrow the weight files."""
    persistent = probe.state_dict()
    derived = sorted(
        ((b.numel() * b.element_size(), n, list(b.shape)) for n, b in probe.named_buffers() if n not in persistent),
        reverse=True,
    )
    total = sum(d[0] for d in derived)
    if total > MAX_DERIVED_BUFFER_BYTES:
        raise CheckpointError(
            f"{where} makes a {class_name} compute {_gib(total)} of buffers that are not in the weights "
            f"(largest: {derived[0][1]} {derived[0][2]}; at most {_gib(MAX_DERIVED_BUFFER_BYTES)})",
            f"a config value is far too large (e.g. rope_max_seq_len); {RESTORE}",
        )
    elements = sum(t.numel() for t in persistent.values())
    if max_elements is not None and elements > max_elements:
        raise CheckpointError(
            f"{where} builds a {class_name} of {elements:,} elements; the weights hold {holds}",
            f"config.json and the weights come from different models; {RESTORE}",
        )


def build_empty(class_name: str, config: dict[str, Any], md: ModelDir | None = None):
    """The model structure with parameters on the meta device and real buffers.

    It is first built entirely on the meta device, where nothing is allocated, and checked: the
    buffers it computes that no checkpoint holds (RoPE and position tables) are bounded by
    MAX_DERIVED_BUFFER_BYTES, and with `md` its tensors may not outgrow the weight files (twice
    their elements, plus ELEMENT_SLACK). Only then is it built again with real buffers, because
    diffusers computes their values in __init__ and the state dict does not hold them.
    """
    import torch
    from accelerate import init_empty_weights

    cls = model_class(class_name)
    where = md.path / CONFIG if md is not None else CONFIG
    max_elements, max_tensors, holds = _budget(md)
    try:
        with _registration_budget(max_elements, max_tensors), torch.device("meta"):
            probe = cls.from_config(config)
        _check_sizes(probe, class_name, where, max_elements, holds)
        del probe
        with init_empty_weights(include_buffers=False):
            return cls.from_config(config)
    except CheckpointError:
        raise
    except _Oversized as exc:
        raise CheckpointError(
            f"{where} builds a {class_name} larger than its weights (stopped at {exc}; the weights hold {holds})",
            f"config.json and the weights come from different models; {RESTORE}",
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"config.json does not build a {class_name}: {type(exc).__name__}: {exc}", "check the config values"
        ) from None


def _check_names(expected: set[str], found: set[str], where: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
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


def check_weights_fit(model, md: ModelDir) -> None:
    """Compare the model's tensor names and shapes with the safetensors headers before any tensor
    data is read (pickle weights are compared by `assign_weights` once loaded)."""
    if md.shapes is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_names(set(expected), set(md.shapes), md.path)
    bad = [k for k in sorted(expected) if expected[k] != md.shapes[k]]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"weights in {md.path} do not fit config.json: {k} is {list(md.shapes[k])} in the weights, "
            f"{list(expected[k])} in the model ({len(bad)} such tensors)",
            "the weights and config come from different models",
        )


def assign_weights(model, state: dict[str, Any], where: Path) -> None:
    """Assign the weights (strict): every parameter must come from the checkpoint."""
    _check_names(set(model.state_dict()), set(state), where)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {where} do not fit the model: {str(exc).splitlines()[0]}",
            "the weights and config come from different models",
        ) from None
    model.eval()


def save_model(model, tmp: Path, md: ModelDir | None = None) -> str:
    """Write the model's config and weights into `tmp`. With `md` (a conversion that changed no
    tensor: same names, shapes, dtypes and values as the source's safetensors), the source's weight
    files and index are copied byte for byte instead of re-serialising every tensor; returns how."""
    import shutil

    if md is None or md.pickle:
        type(model).save_pretrained(model, tmp, safe_serialization=True)  # the manifest is written by convert
        mark_config(tmp)
        return "serialised"
    model.save_config(tmp)
    mark_config(tmp)
    for f in md.weight_files:
        shutil.copyfile(f, tmp / f.name)
    index = md.path / f"{WEIGHTS_ST}.index.json"
    if index.is_file():
        shutil.copyfile(index, tmp / index.name)
    return "copied"


def is_model_class(name: str) -> bool:
    """Whether `name` is a diffusers model class (a ModelMixin in `diffusers.models`)."""
    import diffusers.models

    try:
        cls = getattr(diffusers.models, name, None)
    except Exception:  # a lazily imported model whose optional dependency is missing
        cls = None
    return isinstance(cls, type) and issubclass(cls, diffusers.models.ModelMixin)


def check_model_class(md: ModelDir) -> None:
    """config.json's `_class_name` must name a diffusers model (a ModelMixin), checked before
    anything is built: a pipeline's or a scheduler's config names a class too, and building one
    fails in unrelated ways. Looked up in `diffusers.models`, so no pipeline module is imported."""
    if not is_model_class(md.class_name):
        raise CheckpointError(
            f"{md.path / 'config.json'}: {md.class_name} is not a diffusers model class",
            "give the denoiser's directory (a pipeline's unet/ or transformer/), not a pipeline or scheduler",
        )


def _target(out: Path) -> Path:
    """Where OUT's directory will be: a symlink OUT is itself replaced, its target never written."""
    return out.parent.resolve() / out.name if out.is_symlink() else out.resolve()


def _check_writable(out: Path) -> None:
    """OUT's parent (made if missing) must be a directory this process can write: found now, not
    after the load, the conversion and the verification."""
    parent = Path(os.path.abspath(out)).parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(
            f"cannot write {out}: {parent} is not a directory",
            "choose an OUT whose parents are directories (missing ones are made)",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {out}: {parent} is not writable", "choose an OUT in a directory you can write to"
        )


def check_out_path(
    src_dir: Path, out: Path, overwrite: bool, pipeline_dir: Path | None = None, *, writable: bool = True
) -> None:
    """Refuse, before any work, outputs that would lose data or cannot be written: OUT inside SRC
    (the model directory, and the whole pipeline directory when SRC named one), OUT containing
    SRC, an existing OUT (a dangling symlink too) without `overwrite`, and with `writable` an OUT
    whose directory cannot be made."""
    out_r = _target(out)
    roots = [src_dir.resolve()] + ([pipeline_dir.resolve()] if pipeline_dir is not None else [])
    for root in roots:
        if out_r == root or root in out_r.parents:
            raise UsageError(
                f"OUT {out} is inside SRC {root}", "choose an output directory outside the source checkpoint"
            )
        if out_r in root.parents:
            raise UsageError(
                f"OUT {out} contains SRC {root}", "choose an output directory that does not contain the source"
            )
    if os.path.lexists(out) and not overwrite:
        dangling = out.is_symlink() and not out.exists()
        what = f"already exists (a symlink to missing {os.readlink(out)})" if dangling else "already exists"
        raise UsageError(f"{out} {what}", "pass --overwrite to replace it, or choose another OUT")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", "choose another OUT")
    if writable:
        _check_writable(out)
