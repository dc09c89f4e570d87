"""Named frame-level action adapters through PEFT: one per action space, switchable, saved as
standard PEFT adapter files.

    add_action_adapter(model, "robot", action_dim=7)                       # continuous 7-d
    add_action_adapter(model, "game", action_dim=5, action_type="discrete", lora_rank=8)
    set_action_adapter(model, "robot")            # WorldModel(model) now uses robot's encoder
    save_action_adapter(model, "robot", "adapters/robot")
    load_action_adapter(other_model, "adapters/robot", "robot")

Design (METHOD.md §7). `model` is a diffusers denoiser converted with a pipeline ending in
`frame-conditioning` (the hooks that add an embedding per frame). An adapter is one PEFT LoRA
adapter, injected in place with PEFT's integration API (`peft.functional`), whose trainable
parts are

* its own action encoder: the module at `ADAPTER_ATTR` is listed in `modules_to_save`, so PEFT
  wraps it in a `ModulesToSaveWrapper` holding one encoder copy per adapter name. The wrapper's
  forward dispatches `(actions, mask)` to the active adapter's copy and its attribute lookup
  (`action_dim`, `action_type`) too, so `WorldModel` runs unchanged. An adapter for the action
  space of the converted encoder starts as PEFT's copy of that encoder (a fine-tune of it); one
  for another space (dim or type) gets a fresh `ActionEncoder` for that space in its slot — its
  last layer is zero, so a new adapter leaves the base model's output unchanged. The wrapped
  original encoder stays untouched: it is what runs when no adapter is active.
* optionally LoRA (rank > 0) on attention projections (default `to_q`, `to_k`, `to_v`,
  `to_out.0`, the names in every diffusers attention) or on other Linear / per-frame conv
  layers named in `lora_targets` (PEFT `target_modules` semantics: module-name suffixes, or one
  regex). LoRA on a Linear acts per token and on a per-frame conv per frame, so it adds no
  leak. Temporal convolutions made causal by causalize are refused (PEFT builds their LoRA-A
  with the causal conv's own class and its zero time padding, which that class rejects), and so
  is anything PEFT's LoRA cannot wrap, before PEFT touches the model.

PEFT cannot inject a LoRA adapter that targets no module (`target_modules=[]` raises
`NoMatchingPeftModuleError`; `None` needs a transformers `model_type`). An encoder-only adapter
therefore uses PEFT's own placeholder `target_modules="dummy-target-modules"` (the value X-LoRA
uses), with `r=0`: a valid LoraConfig that PEFT saves, reloads (`PeftModel.from_pretrained`
included) and injects as "no LoRA layers".

Files (`save_action_adapter`): `adapter_config.json` and `adapter_model.safetensors` exactly as
`PeftModel.save_pretrained` writes them (keys `base_model.model.<path>`, adapter name removed),
plus `causalize_adapter.json` with the action space, because the weights alone cannot rebuild an
encoder for a space other than the converted one. An adapter for the converted space loads with
stock PEFT too (`PeftModel.from_pretrained(converted_model, dir)`).

Only one adapter is active at a time (a `ModulesToSaveWrapper` allows no more). After
`set_action_adapter(model, name)` exactly that adapter's parameters require grad (its encoder
copy and LoRA A/B); base weights, the original encoder and other adapters are frozen.
A model holding adapters has PEFT wrappers in its module tree: save the adapters with
`save_action_adapter` and keep the converted checkpoint as the base (its `save_pretrained`
would write wrapper keys that `causalize.load` does not expect).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from causalize import state
from causalize.context import MODULE_CONTEXT as CTX
from causalize.errors import UsageError
from causalize.modules.action_encoder import ADAPTER_ATTR, ActionEncoder, ActionType, embedding_width
from causalize.modules.causal_conv import is_causal_conv
from causalize.precision import model_device, model_dtype

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what PEFT's LoRA wraps in a diffusers model
CONFIG_FILE = "adapter_config.json"  # = peft.utils.CONFIG_NAME
WEIGHTS_FILE = "adapter_model.safetensors"  # = peft.utils.SAFETENSORS_WEIGHTS_NAME
SIDECAR_FILE = "causalize_adapter.json"
SIDECAR_FORMAT = "causalize-action-adapter"
SIDECAR_VERSION = 1
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before every key it saves


# --- public API ------------------------------------------------------------------------------


def add_action_adapter(
    model: nn.Module,
    name: str,
    *,
    action_dim: int,
    action_type: ActionType = "continuous",
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
) -> None:
    """Register adapter `name` for one action space and make it the active one.

    Its trainable parts: an action encoder (`action_dim`, `action_type`) and, with `lora_rank` > 0,
    LoRA of that rank on `lora_targets` (default: the attention projections). `lora_alpha`
    defaults to the rank (LoRA scale 1). New adapters change no output: the new encoder's last
    layer and LoRA-B start at zero (a copy of the converted encoder starts as that encoder).
    """
    from peft import LoraConfig

    _check_new_name(model, name)
    _check_action_space(action_dim, action_type)
    if lora_rank < 0:
        raise UsageError(f"lora_rank must be >= 0, got {lora_rank}")
    if lora_rank == 0 and lora_targets:
        raise UsageError("lora_targets given with lora_rank=0", "pass lora_rank > 0 to train LoRA on them")
    if lora_rank > 0:
        targets: Any = lora_targets if isinstance(lora_targets, str) else list(lora_targets or DEFAULT_LORA_TARGETS)
    else:
        targets = _dummy_targets()
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_rank if lora_alpha is None else lora_alpha,
        target_modules=targets,
        modules_to_save=[ADAPTER_ATTR],
    )
    _register(model, name, config, action_dim, action_type)


def set_action_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one that runs (its encoder and its LoRA), and the only trainable part.

    Goes through `peft.functional.set_adapter`, which switches both the LoRA layers and the
    encoder's `ModulesToSaveWrapper` (diffusers' `model.set_adapter` switches LoRA layers only).
    """
    from peft.functional import set_adapter

    if name not in list_action_adapters(model):
        raise UsageError(
            f"no action adapter named {name!r}", f"adapters of this model: {list_action_adapters(model) or 'none'}"
        )
    set_adapter(model, name, inference_mode=False)
    trainable = {id(p) for p in _adapter_parameters(model, name)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def list_action_adapters(model: nn.Module) -> list[str]:
    """Names of the action adapters on `model`, in the order they were added."""
    wrapper = _wrapper(model)
    return list(wrapper.modules_to_save.keys()) if wrapper is not None else []


def active_action_adapter(model: nn.Module) -> str | None:
    """The adapter whose encoder runs now, or None (the converted encoder runs)."""
    wrapper = _wrapper(model)
    if wrapper is None or wrapper.disable_adapters or not wrapper.active_adapters:
        return None
    return wrapper.active_adapters[0]


def save_action_adapter(model: nn.Module, name: str, directory: str | os.PathLike) -> Path:
    """Write adapter `name` as standard PEFT files plus the causalize sidecar; returns the directory."""
    from peft.functional import get_peft_model_state_dict
    from safetensors.torch import save_file

    if name not in list_action_adapters(model):
        raise UsageError(
            f"no action adapter named {name!r}", f"adapters of this model: {list_action_adapters(model) or 'none'}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    state = {_PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out))
    encoder = _wrapper(model).modules_to_save[name]
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model_class": type(model).__name__,
        "module": ADAPTER_ATTR,
        "action_dim": encoder.action_dim,
        "action_type": encoder.action_type,
        "emb_dim": encoder.emb_dim,
        "hidden": _hidden(encoder),
    }
    (out / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def load_action_adapter(model: nn.Module, directory: str | os.PathLike, name: str) -> None:
    """Add the adapter saved in `directory` to `model` under `name`, and make it active.

    The LoRA config comes from `adapter_config.json` as saved (rank, alpha, targets, patterns),
    the action space from the sidecar. Every adapter weight must be present and every saved key
    must find its parameter, otherwise the adapter is removed again and an error raised.
    """
    from peft import LoraConfig, PeftConfig
    from peft.functional import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(directory)
    for f in (CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE):
        if not (src / f).is_file():
            raise UsageError(f"{src} has no {f}", "save the adapter with causalize.adapters.save_action_adapter")
    meta = _read_sidecar(src)
    if meta["model_class"] != type(model).__name__:
        raise UsageError(f"the adapter in {src} was trained on a {meta['model_class']}, not a {type(model).__name__}")
    config = PeftConfig.from_pretrained(str(src))
    if not isinstance(config, LoraConfig) or ADAPTER_ATTR not in (config.modules_to_save or []):
        raise UsageError(f"{src / CONFIG_FILE} is not a causalize action adapter (a LoRA config saving {ADAPTER_ATTR})")
    config.inference_mode = False
    _check_new_name(model, name)
    base = _base_encoder(model, meta["action_dim"], meta["action_type"])
    if meta.get("emb_dim", base.emb_dim) != base.emb_dim:
        raise UsageError(
            f"the adapter in {src} embeds actions to width {meta['emb_dim']}, this model's timestep embedding is {base.emb_dim} wide"
        )
    _register(model, name, config, meta["action_dim"], meta["action_type"], hidden=meta.get("hidden"))
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(src / WEIGHTS_FILE)).items()}
    try:
        expected = _expected_keys(model, name)
        missing = sorted(expected - set(state))
        if missing:
            raise UsageError(f"{src / WEIGHTS_FILE} lacks {len(missing)} adapter weights, e.g. {missing[0]}")
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if result.unexpected_keys:
            raise UsageError(
                f"{src / WEIGHTS_FILE} has weights this model has no place for, e.g. {result.unexpected_keys[0]}",
                "load it on the model class and converted base it was trained on",
            )
    except BaseException:
        remove_action_adapter(model, name)
        raise


def remove_action_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` (its encoder copy and LoRA layers) and its PEFT config."""
    if name not in list_action_adapters(model):
        raise UsageError(f"no action adapter named {name!r}")
    was_active = active_action_adapter(model)
    _discard(model, name)
    remaining = list_action_adapters(model)
    if remaining:
        set_action_adapter(model, was_active if was_active in remaining else remaining[-1])


# --- internals -------------------------------------------------------------------------------


def _register(
    model: nn.Module, name: str, config: Any, action_dim: int, action_type: ActionType, hidden: int | None = None
) -> None:
    """Inject `config` as adapter `name`, give it an encoder for its action space, activate it."""
    from peft.functional import inject_adapter_in_model

    _check_action_space(action_dim, action_type)
    base = _base_encoder(model, action_dim, action_type)
    _check_lora_targets(model, config)
    try:
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter is injected into a model that already has one.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=name)
    except BaseException:
        _discard(model, name)  # PEFT may have registered the config and some layers already
        raise
    same_space = (base.action_dim, base.action_type) == (action_dim, action_type)
    if not same_space or (hidden is not None and hidden != _hidden(base)):
        # PEFT's slot holds a copy of the converted encoder; this action space needs its own.
        fresh = ActionEncoder(action_dim, base.emb_dim, action_type, hidden).to(model_device(base), model_dtype(base))
        _wrapper(model).modules_to_save[name] = fresh
    # PEFT leaves a new adapter half active when another one exists (its LoRA layers on, the
    # encoder wrapper on no adapter at all); activating it sets every part consistently.
    set_action_adapter(model, name)


def _discard(model: nn.Module, name: str) -> None:
    """Remove every trace of adapter `name`: layers, encoder copy, config."""
    from peft.functional import delete_adapter

    if name in getattr(model, "peft_config", {}):
        delete_adapter(model, name, prefix="lora_")
        model.peft_config.pop(name, None)  # peft.functional.delete_adapter leaves the config


def _base_encoder(model: nn.Module, action_dim: int, action_type: ActionType) -> ActionEncoder:
    """The converted encoder (unwrapped). A model converted without actions gets one for this
    action space first (zero last layer: the null action), so adapters have a module to copy."""
    if not any(hasattr(m, CTX) for m in model.modules()):
        raise UsageError(
            f"this {type(model).__name__} has no per-frame conditioning",
            "convert it with a pipeline that ends in 'frame-conditioning'",
        )
    current = getattr(model, ADAPTER_ATTR, None)
    if current is None:
        from causalize.api import plan_for

        width = embedding_width(model.get_submodule(plan_for(model).conditioning.embedding))
        encoder = ActionEncoder(action_dim, width, action_type).to(model_device(model), model_dtype(model))
        return state.add_module(model, ADAPTER_ATTR, encoder, by="adapters")  # recorded: unconvert removes it
    encoder = current.original_module if _is_wrapper(current) else current
    if not isinstance(encoder, ActionEncoder):
        raise UsageError(f"model.{ADAPTER_ATTR} is a {type(encoder).__name__}, not an ActionEncoder")
    return encoder


def _check_lora_targets(model: nn.Module, config: Any) -> None:
    """Fail before PEFT touches the model: targets that match nothing, or a causal temporal conv."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    if config.target_modules == _dummy_targets():
        return
    matched = [
        (key, mod)
        for key, mod in model.named_modules()
        if key and key.split(".")[0] != ADAPTER_ATTR and check_target_module_exists(config, key)
    ]
    if not matched:
        raise UsageError(f"lora_targets {config.target_modules} match no module of this {type(model).__name__}")
    for key, mod in matched:
        if is_causal_conv(mod):
            raise UsageError(
                f"LoRA cannot target {key}: it is a causal temporal convolution ({type(mod).__name__})",
                "target attention projections or per-frame layers instead",
            )
        if not isinstance(mod, (*_LORA_LAYERS, BaseTunerLayer)):  # a LoRA layer takes one more adapter
            raise UsageError(
                f"LoRA cannot target {key}: a {type(mod).__name__}, not a Linear or convolution",
                "name the layer itself (targets match module-name suffixes)",
            )


def _adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters owned by adapter `name`: its encoder copy and its tuner-layer weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params: list[nn.Parameter] = list(_wrapper(model).modules_to_save[name].parameters())
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            for attr in (*mod.adapter_layer_names, *mod.other_param_names):
                holder = getattr(mod, attr, None)
                if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and name in holder:
                    entry = holder[name]
                    params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return params


def _expected_keys(model: nn.Module, name: str) -> set[str]:
    """The keys `get_peft_model_state_dict` would write for adapter `name` (what a load must fill)."""
    from peft.functional import get_peft_model_state_dict

    return set(get_peft_model_state_dict(model, adapter_name=name))


def _wrapper(model: nn.Module):
    module = getattr(model, ADAPTER_ATTR, None)
    return module if _is_wrapper(module) else None


def _is_wrapper(module: Any) -> bool:
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


def _hidden(encoder: ActionEncoder) -> int:
    return encoder.out[0].in_features


def _dummy_targets() -> str:
    from peft.utils.constants import DUMMY_TARGET_MODULES

    return DUMMY_TARGET_MODULES


def _check_new_name(model: nn.Module, name: str) -> None:
    """Adapter names become ModuleDict keys and parameter-path segments in PEFT."""
    if not isinstance(name, str) or not name or "." in name or not name.replace("-", "_").isidentifier():
        raise UsageError(f"adapter name must be a non-empty identifier without '.', got {name!r}")
    if name in getattr(model, "peft_config", {}):
        raise UsageError(
            f"this model already has an adapter named {name!r}", "remove_action_adapter it first, or pick another name"
        )
    if any(name == key.split(".")[-1] for key, _ in model.named_modules()):
        raise UsageError(f"adapter name {name!r} is also a module name in this model", "pick another name")


def _check_action_space(action_dim: int, action_type: str) -> None:
    if not isinstance(action_dim, int) or action_dim < 1:
        raise UsageError(f"action_dim must be a positive integer, got {action_dim!r}")
    if action_type not in ("continuous", "discrete"):
        raise UsageError(f"action_type must be 'continuous' or 'discrete', got {action_type!r}")


def _read_sidecar(src: Path) -> dict[str, Any]:
    try:
        meta = json.loads((src / SIDECAR_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {src / SIDECAR_FILE}: {e}") from None
    if (
        meta.get("format") != SIDECAR_FORMAT
        or not isinstance(meta.get("version"), int)
        or meta["version"] > SIDECAR_VERSION
    ):
        raise UsageError(f"{src / SIDECAR_FILE} is not a causalize action-adapter sidecar this version reads")
    for key in ("model_class", "action_dim", "action_type"):
        if key not in meta:
            raise UsageError(f"{src / SIDECAR_FILE} lacks {key!r}")
    return meta


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "active_action_adapter",
    "add_action_adapter",
    "list_action_adapters",
    "load_action_adapter",
    "remove_action_adapter",
    "save_action_adapter",
    "set_action_adapter",
]
