"""Text conditioning for world models: a prompt embedded by the pipeline's own text encoder.

A converted denoiser still cross-attends to text. What it saw in training is what its pipeline's
`encode_prompt` produced (tokenizer settings, padding, sequence length, hidden-state layer and
normalisation all differ between families), so the embedding is computed by that very method, with
the pipeline's own defaults, and stored under the names of the denoiser's keyword arguments:

    embed_prompt("./Wan2.1-T2V-1.3B-Diffusers", "a red car drives left", "car.safetensors")
    tensors = load_conditioning_file("car.safetensors")   # {"encoder_hidden_states": (1, 512, 4096)}
    check_conditioning(tensors, wm, "car.safetensors")    # fits this world model?
    wm(sample, timesteps, actions, **tensors)

Only the tokenizer(s) and text encoder(s) are loaded, never the denoiser or the VAE. Paths are
checked before torch is imported (`check_prompt_paths`), and the file is written atomically.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalize.errors import UsageError

if TYPE_CHECKING:
    import torch

    from causalize.world_model import WorldModel

MODEL_INDEX = "model_index.json"
KIND = "prompt-embedding"
EMBED_HINT = "embed the prompt with the pipeline the model was converted from: causalize embed-prompt PIPELINE TEXT OUT"


@dataclass(frozen=True)
class PromptSpec:
    """How one pipeline class's `encode_prompt` output feeds its denoiser.

    `outputs` names, position by position, the denoiser keyword argument each returned value is
    passed as in the pipeline's `__call__` (None: not for the denoiser, e.g. the negative prompt's
    embedding, which is an embedding of its own: embed "" or the negative text separately)."""

    denoiser: str
    outputs: tuple[str | None, ...]


#: Pipeline class -> how its prompt reaches its denoiser. Every class here calls its text encoder(s)
#: only through `encode_prompt`, with no other component needed.
PROMPT_SPECS: dict[str, PromptSpec] = {
    "WanPipeline": PromptSpec("WanTransformer3DModel", ("encoder_hidden_states", None)),
    # image-to-video: the same text path (the image reaches the world model as its first frame)
    "WanImageToVideoPipeline": PromptSpec("WanTransformer3DModel", ("encoder_hidden_states", None)),
    "TextToVideoSDPipeline": PromptSpec("UNet3DConditionModel", ("encoder_hidden_states", None)),
    "CogVideoXPipeline": PromptSpec("CogVideoXTransformer3DModel", ("encoder_hidden_states", None)),
    "CogVideoXImageToVideoPipeline": PromptSpec("CogVideoXTransformer3DModel", ("encoder_hidden_states", None)),
    "LTXPipeline": PromptSpec(
        "LTXVideoTransformer3DModel", ("encoder_hidden_states", "encoder_attention_mask", None, None)
    ),
    "HunyuanVideoPipeline": PromptSpec(
        "HunyuanVideoTransformer3DModel", ("encoder_hidden_states", "pooled_projections", "encoder_attention_mask")
    ),
}
#: Every denoiser input a prompt can provide: a world model whose example inputs include one of
#: these needs it from the prompt file too.
PROMPT_KEYS = frozenset(name for spec in PROMPT_SPECS.values() for name in spec.outputs if name)
#: encode_prompt arguments that take the pipeline __call__'s default (as a plain call would).
_CALL_DEFAULTS = ("max_sequence_length", "prompt_template", "clip_skip")


@dataclass
class PromptReport:
    """What `embed_prompt` wrote."""

    out: Path
    pipeline: Path
    pipeline_class: str
    denoiser_class: str
    prompt: str
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"shape", "dtype"}
    device: str = "cpu"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "pipeline": str(self.pipeline),
            "pipeline_class": self.pipeline_class,
            "denoiser_class": self.denoiser_class,
            "prompt": self.prompt,
            "tensors": self.tensors,
            "device": self.device,
            "seconds": self.seconds,
        }


# ----------------------------------------------------------------------------- checks (no torch)


def _supported() -> str:
    return ", ".join(sorted(PROMPT_SPECS))


def _read_index(pipeline: Path) -> dict[str, Any]:
    hint = "give a diffusers pipeline directory (the one holding model_index.json)"
    if not pipeline.exists():
        raise UsageError(f"{pipeline} does not exist", hint)
    if not pipeline.is_dir():
        raise UsageError(f"{pipeline} is not a directory", hint)
    index = pipeline / MODEL_INDEX
    if not index.is_file():
        if (pipeline / "config.json").is_file():
            hint = "this is a model directory: give the pipeline directory above it (the one holding model_index.json)"
        raise UsageError(f"{pipeline} is not a pipeline directory: no {MODEL_INDEX}", hint)
    try:
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{index} is not valid JSON: {exc}", "restore it from the original pipeline") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("_class_name"), str):
        raise UsageError(f"{index} has no '_class_name'", "it must be a diffusers pipeline index")
    return doc


def _components(index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The components model_index.json lists as present: name -> (library, class)."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    }


def _text_components(components: Mapping[str, tuple[str, str]]) -> list[str]:
    return [name for name in components if name.startswith(("text_encoder", "tokenizer"))]


def check_prompt_paths(
    pipeline: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> tuple[str, PromptSpec]:
    """Everything `embed_prompt` checks before importing torch: PIPELINE is a pipeline directory
    of a supported class with a text encoder, its text components exist, and OUT can be written
    (not existing unless `overwrite`, its directory present and writable). Returns the pipeline
    class name and its spec."""
    pipeline, out = Path(pipeline), Path(out)
    index = _read_index(pipeline)
    cls = index["_class_name"]
    components = _components(index)
    if not any(name.startswith("text_encoder") for name in components):
        raise UsageError(
            f"{pipeline}: {cls} has no text encoder: nothing to embed",
            "embed-prompt is for text-conditioned pipelines (e.g. WanPipeline, TextToVideoSDPipeline)",
        )
    spec = PROMPT_SPECS.get(cls)
    if spec is None:
        raise UsageError(f"embed-prompt does not support {cls} ({pipeline})", f"supported pipelines: {_supported()}")
    for name in _text_components(components):
        if not (pipeline / name).is_dir():
            raise UsageError(
                f"{pipeline}: {MODEL_INDEX} lists {name} but there is no {name}/ directory",
                "restore the pipeline's text encoder and tokenizer folders",
            )
    _check_out(out, overwrite)
    return cls, spec


def _check_out(out: Path, overwrite: bool) -> None:
    if os.path.lexists(out):
        if out.is_dir():
            raise UsageError(f"{out} is a directory", "OUT is the embedding file to write, e.g. prompt.safetensors")
        if not overwrite:
            raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another OUT")
    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        raise UsageError(
            f"cannot write {out}: {parent} does not exist", "create the directory first, or choose another OUT"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {out}: {parent} is not writable", "choose an OUT in a directory you can write to"
        )


# ----------------------------------------------------------------------------------- embedding


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading bars (stderr carries our messages), restoring them after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    states = [(mod, mod.is_progress_bar_enabled()) for mod in (dlog, tlog)]
    for mod, _ in states:
        mod.disable_progress_bar()
    try:
        yield
    finally:
        for mod, enabled in states:
            if enabled:
                mod.enable_progress_bar()


def _encode_kwargs(pipe_cls: type, text: str, device: torch.device) -> dict[str, Any]:
    """encode_prompt's arguments for one prompt as a plain `pipe(prompt)` call passes them: batch
    1, no classifier-free guidance (the empty prompt is an embedding of its own), and the
    __call__ defaults for sequence length, template and clip skip."""
    params = inspect.signature(pipe_cls.encode_prompt).parameters
    call = inspect.signature(pipe_cls.__call__).parameters
    kwargs: dict[str, Any] = {"prompt": text, "device": device}
    for name, value in (
        ("do_classifier_free_guidance", False),
        ("num_videos_per_prompt", 1),
        ("num_images_per_prompt", 1),
    ):
        if name in params:
            kwargs[name] = value
    for name in _CALL_DEFAULTS:
        if name in params and name in call and call[name].default is not inspect.Parameter.empty:
            kwargs[name] = call[name].default
    return kwargs


def prompt_tensors(
    pipeline: str | os.PathLike, text: str, *, device: str | None = None, dtype: str | None = None
) -> dict[str, torch.Tensor]:
    """The denoiser keyword arguments the pipeline's own `encode_prompt` makes of `text`, at batch
    1, on the CPU: e.g. {"encoder_hidden_states": (1, L, D)}. Loads only the text components.

    dtype: the text encoders' dtype (fp32 / bf16 / fp16; default: as diffusers loads them)."""
    import diffusers
    import torch

    from causalize import precision

    pipeline = Path(pipeline)
    index = _read_index(pipeline)
    cls_name = index["_class_name"]
    spec = PROMPT_SPECS.get(cls_name)
    if spec is None:
        raise UsageError(
            f"embed-prompt does not support {cls_name} ({pipeline})", f"supported pipelines: {_supported()}"
        )
    torch_dtype = precision.parse_dtype(dtype)
    target = precision.resolve_device(device) or torch.device("cpu")
    precision.check_dtype_on(torch_dtype, target)
    pipe_cls = getattr(diffusers, cls_name)
    components = _components(index)
    # Load through the pipeline class (not DiffusionPipeline, which loads optional components it
    # is told to skip), with None for everything that is not a text component.
    listed = [n for n, v in index.items() if not n.startswith("_") and isinstance(v, list) and len(v) == 2]
    skip = {name: None for name in listed if name not in _text_components(components)}
    with _quiet_loading():
        pipe = pipe_cls.from_pretrained(pipeline, local_files_only=True, dtype=torch_dtype, **skip)
    pipe.to(target)
    with torch.no_grad():
        try:
            outputs = pipe.encode_prompt(**_encode_kwargs(pipe_cls, text, target))
        except NameError as exc:  # diffusers' Wan I2V cleans prompts with ftfy without checking for it
            if "ftfy" not in str(exc):
                raise
            raise UsageError(
                f"{cls_name} cleans prompts with the ftfy package, which is not installed", "pip install ftfy"
            ) from None
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if len(outputs) != len(spec.outputs):
        raise RuntimeError(
            f"{cls_name}.encode_prompt returned {len(outputs)} values, expected {len(spec.outputs)}: "
            "this diffusers version changed it (update causalize.prompt.PROMPT_SPECS)"
        )
    tensors = {}
    for name, value in zip(spec.outputs, outputs):
        if name is None:
            continue
        if value.is_floating_point() and not torch.isfinite(value).all():
            what = precision.describe(value.dtype)
            raise UsageError(
                f"the text encoder's {name} is not finite (NaN or inf) in {what}",
                "use --dtype fp32 or bf16 (T5 encoders overflow in fp16)",
            )
        tensors[name] = value.detach().to("cpu").contiguous()
    return tensors


def embed_prompt(
    pipeline: str | os.PathLike,
    text: str,
    out: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> PromptReport:
    """Embed `text` with PIPELINE's own text encoder(s) and write the denoiser's keyword arguments
    to OUT (safetensors; metadata: pipeline and denoiser class, prompt, causalize version, tensor
    names). Bad paths fail before torch is imported; on any error nothing is written."""
    t0 = time.perf_counter()
    pipeline, out = Path(pipeline), Path(out)
    cls_name, spec = check_prompt_paths(pipeline, out, overwrite=overwrite)
    from safetensors.torch import save

    from causalize import __version__, fs

    tensors = prompt_tensors(pipeline, text, device=device, dtype=dtype)
    metadata = {
        "format": "pt",
        "kind": KIND,
        "causalize_version": __version__,
        "pipeline_class": cls_name,
        "denoiser_class": spec.denoiser,
        "prompt": text,
        "tensors": json.dumps(list(tensors)),
    }
    try:
        fs.write_bytes(out, save(tensors, metadata=metadata), overwrite=overwrite)
    except FileExistsError:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another OUT") from None
    return PromptReport(
        out=out,
        pipeline=pipeline,
        pipeline_class=cls_name,
        denoiser_class=spec.denoiser,
        prompt=text,
        tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        device=str(device or "cpu"),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- reading and checking


def load_conditioning_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a conditioning file (`causalize embed-prompt`'s OUT), on the CPU."""
    path = Path(path)
    hint = "write one with `causalize embed-prompt PIPELINE TEXT OUT`"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{path}: conditioning file not found", hint) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", hint) from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file", hint)
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", hint) from None
    except Exception as exc:  # safetensors' SafetensorError, or a header that is not JSON
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(f"{path} is not a safetensors file ({detail})", hint) from None


def _is_mask(name: str) -> bool:
    return "mask" in name


def _example_frames(plan) -> int:
    """The fewest frames the plan's example inputs accept (a multiple of its block size)."""
    block = max(1, plan.layout.block_size)
    return block * -(-max(plan.min_frames, 1) // block)


def check_conditioning(tensors: Mapping[str, torch.Tensor], wm: WorldModel, where: str) -> None:
    """Refuse conditioning that does not fit `wm`'s denoiser before it runs (a wrong text width
    would fail deep inside a cross-attention, or worse, broadcast): every name must be a keyword
    argument of its forward, at batch 1, with the rank and feature width of the plan's example
    input of that name (the sequence length may differ), and every prompt input the model's
    example has must be present. `where` names the source in the messages (e.g. a file)."""
    import torch

    model, plan = wm.model, wm.plan
    cls = type(model).__name__
    cond = plan.conditioning
    params = inspect.signature(model.forward).parameters
    any_kwarg = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    example = plan.make_inputs(model, _example_frames(plan), torch.Generator().manual_seed(0))
    for name, value in tensors.items():
        if name in (cond.sample_arg, cond.timestep_arg):
            raise UsageError(f"{where}: '{name}' is {cls}'s noisy input or timestep, not conditioning", EMBED_HINT)
        if wm.image_condition is not None and name == wm.image_condition.arg:
            raise UsageError(
                f"{where}: '{name}' is built from the window's first frame by the world model (the image condition)",
                "leave it out of the conditioning file",
            )
        if name not in params and not any_kwarg:
            raise UsageError(
                f"{where}: unknown tensor '{name}': {cls}.forward has no such argument "
                f"(it takes {', '.join(n for n in accepted if n != 'self')})",
                EMBED_HINT,
            )
        if not torch.is_tensor(value):
            raise UsageError(f"{where}: '{name}' is a {type(value).__name__}, not a tensor", EMBED_HINT)
        shape, ref = tuple(value.shape), example.get(name)
        if torch.is_tensor(ref) and value.ndim != ref.ndim:
            raise UsageError(
                f"{where}: '{name}' has {value.ndim} dimensions {shape}, {cls} expects {ref.ndim} like {tuple(ref.shape)}",
                EMBED_HINT,
            )
        if value.ndim == 0 or shape[0] != 1:
            raise UsageError(f"{where}: '{name}' has shape {shape}: expected batch 1 (a leading 1)", EMBED_HINT)
        if torch.is_tensor(ref):
            if not _is_mask(name) and shape[-1] != ref.shape[-1]:
                raise UsageError(
                    f"{where}: '{name}' is {shape}: width {shape[-1]}, but {cls} takes width {ref.shape[-1]} "
                    f"(like {tuple(ref.shape)}; the sequence length may differ)",
                    EMBED_HINT,
                )
            if not _is_mask(name) and ref.is_floating_point() and not value.is_floating_point():
                raise UsageError(f"{where}: '{name}' is {value.dtype}, {cls} expects floating point", EMBED_HINT)
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UsageError(f"{where}: '{name}' contains NaN or inf", EMBED_HINT)
    missing = sorted(n for n in PROMPT_KEYS & example.keys() if n not in tensors and torch.is_tensor(example[n]))
    if missing:
        raise UsageError(f"{where}: missing {', '.join(repr(n) for n in missing)}, which {cls} takes", EMBED_HINT)
    states, mask = tensors.get("encoder_hidden_states"), tensors.get("encoder_attention_mask")
    if torch.is_tensor(states) and torch.is_tensor(mask) and states.ndim >= 2 and mask.shape[-1] != states.shape[1]:
        raise UsageError(
            f"{where}: 'encoder_attention_mask' covers {mask.shape[-1]} tokens, 'encoder_hidden_states' has {states.shape[1]}",
            EMBED_HINT,
        )


__all__ = [
    "PROMPT_SPECS",
    "PromptReport",
    "PromptSpec",
    "check_conditioning",
    "check_prompt_paths",
    "embed_prompt",
    "load_conditioning_file",
    "prompt_tensors",
]
