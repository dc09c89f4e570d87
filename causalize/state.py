"""What a conversion installed on a model, in one place, and how to take it off again.

Passes rewrite a model in place in seven ways: forward hooks and pre-hooks, attention-processor
wrappers, module swaps (a causal subclass rebuilt from the stock module), in-place class swaps
(per-frame twins), added submodules (the action encoder) and plain attributes that hooks read
(the frame context). Each goes through one helper here that makes the change and appends a
`Change` to the `Installed` registry on the root model, so that `installed(model)` lists them
(`causalize inspect`) and `unconvert(model)` takes them off, newest first, in the spirit of
PEFT's single replace-module path with `unload()`.

Hooks are torch's own, kept with their `RemovableHandle`s, not diffusers' `HookRegistry`: that
registry replaces `module.forward` by a closure over the original module, so a deep copy of a
hooked model (the causality probe and the tests run on copies) still runs the original's forward.

Records hold paths, classes and attribute values, never parameters (unless asked to with
`keep_weights`): the registry costs no memory for weights, survives `load_state_dict(assign=True)`
(how `causalize.load` fills a converted structure) and deep-copies with the model. Runtime state
that the streaming rollout installs (causalize.rollout.streaming) is not recorded; `unconvert`
refuses a model that has it rather than leave it half removed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from causalize.errors import CausalizeError, UsageError

#: The attribute of the root model that holds its `Installed` registry (set once, not a module).
STATE_ATTR = "_causalize_state"
#: A change made outside `recording` (a helper called directly) is attributed to this name.
DIRECT = "direct"
KINDS = ("hook", "pre-hook", "processor", "module-swap", "class-swap", "module-added", "attribute")

# Every dict a forward (pre-)hook id can sit in: removal by id also reaches a copy of the dict
# that a later module swap (rebuild_as copies containers) gave the module now at the path.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
# Streaming rollout marks every module it hooks with this attribute (causalize.rollout.streaming).
_STREAM_ATTR = "_causalize_stream"


@dataclass
class Change:
    """One change a conversion made: its kind, the module path ("" = the root model), the pass
    that made it, a short description, the parameters whose values it altered (names relative to
    the module), and what undoing it needs (`data`: a hook handle, the original processor, class
    or attribute values)."""

    kind: str
    path: str
    by: str
    detail: str
    weights_changed: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "pass": self.by,
            "detail": self.detail,
            "weights_changed": [_join(self.path, name) for name in self.weights_changed],
        }


class Installed:
    """Every change conversions made to one model, oldest first."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.current = DIRECT  # the pass now recording (see `recording`)
        self.keep_weights = False  # keep the stock values of parameters a swap changes

    def __repr__(self) -> str:
        return f"Installed({len(self.changes)} changes)"


@dataclass
class UnconvertReport:
    """What `unconvert` did. `unrestored`: parameter paths whose stock values the conversion
    overwrote (a weight transfer) and that are not known any more, so the model has the stock
    structure but not the stock weights there; empty means the model is the stock one."""

    undone: list[dict[str, Any]] = field(default_factory=list)
    unrestored: list[str] = field(default_factory=list)
    restored_weights: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.unrestored

    def summary(self) -> str:
        text = f"undid {len(self.undone)} changes"
        if self.restored_weights:
            text += f"; restored {len(self.restored_weights)} kept parameters"
        if self.unrestored:
            text += (
                f"; {len(self.unrestored)} parameters keep their converted values (the weight transfer "
                f"overwrote the stock ones): {', '.join(self.unrestored)}"
            )
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "undone": self.undone,
            "unrestored": self.unrestored,
            "restored_weights": self.restored_weights,
            "exact": self.exact,
        }


# --- the registry ------------------------------------------------------------------------------


def registry(model: nn.Module, create: bool = False) -> Installed | None:
    """The model's registry (created on first use when `create`), or None."""
    reg = vars(model).get(STATE_ATTR)
    if reg is None and create:
        reg = Installed()
        object.__setattr__(model, STATE_ATTR, reg)  # plain attribute: not a submodule, not saved
    return reg


def installed(model: nn.Module) -> list[dict[str, Any]]:
    """Every change conversions made to `model` (oldest first), as JSON-ready dicts with kind,
    path, pass, detail and weights_changed; empty for a model never converted (or unconverted)."""
    reg = registry(model)
    return [c.to_json() for c in reg.changes] if reg is not None else []


def remember_recipe(model: nn.Module, plan: str, pipeline: str) -> None:
    """Make the model's own `save_pretrained` write the conversion's recipe too (SavesRecipe), so a
    re-saved converted model still loads causal; a later conversion's pipeline is appended."""
    from causalize.manifest import SavesRecipe

    saver = vars(model).get("save_pretrained")
    if isinstance(saver, SavesRecipe):
        saver.pipelines.append(pipeline)
        return
    set_attribute(model, "", "save_pretrained", SavesRecipe(model, plan, [pipeline]), by="convert_model")


def weights_untouched(model: nn.Module) -> bool:
    """True when no recorded change altered or added a weight (processor wraps, hooks, class swaps
    and weight-preserving module swaps only): the model's state dict is the checkpoint's."""
    reg = registry(model)
    changes = reg.changes if reg is not None else []
    return not any(c.weights_changed or c.kind == "module-added" for c in changes)


@contextmanager
def recording(model: nn.Module, pass_name: str, keep_weights: bool = False) -> Iterator[Installed]:
    """Attribute the changes made inside to `pass_name` (convert_model runs every pass in one).
    `keep_weights`: module swaps that change weights keep the stock values, so that `unconvert`
    can restore them (costs their memory; they stay where they were, whatever `.to()` does later)."""
    reg = registry(model, create=True)
    saved = reg.current, reg.keep_weights
    reg.current, reg.keep_weights = pass_name, keep_weights
    try:
        yield reg
    finally:
        reg.current, reg.keep_weights = saved
        if not reg.changes:  # nothing installed: a model that was never converted carries no registry
            vars(model).pop(STATE_ATTR, None)


def _record(
    model: nn.Module,
    kind: str,
    path: str,
    detail: str,
    by: str | None,
    weights_changed: tuple[str, ...] = (),
    **data: Any,
) -> Change:
    reg = registry(model, create=True)
    change = Change(kind, path, by or reg.current, detail, tuple(weights_changed), data)
    reg.changes.append(change)
    return change


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise CausalizeError(f"{type(model).__name__} has no module '{path}'") from None


# --- the helpers every installation goes through -------------------------------------------------


def register_hook(
    model: nn.Module, path: str, fn: Callable, *, pre: bool = False, by: str | None = None, **options: Any
) -> RemovableHandle:
    """A forward hook (`pre`: pre-hook) on the module at `path`, recorded with its handle.
    `options` go to torch (`with_kwargs`, `always_call`, `prepend`)."""
    module = _module(model, path)
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(fn, **options)
    _record(model, "pre-hook" if pre else "hook", path, getattr(fn, "__qualname__", repr(fn)), by, handle=handle)
    return handle


def set_processor(attn: nn.Module, processor: Any) -> None:
    """`set_processor` where the class has one (it may do bookkeeping); a plain assignment otherwise
    (e.g. MochiAttention in diffusers 0.42 has a `processor` but no setter)."""
    if callable(getattr(attn, "set_processor", None)):
        attn.set_processor(processor)
    else:
        attn.processor = processor


def wrap_processor(model: nn.Module, path: str, processor: Any, *, by: str | None = None) -> None:
    """Give the attention module at `path` a new processor (usually one wrapping the current
    one), recording the original to put back."""
    attn = _module(model, path)
    original = attn.processor
    set_processor(attn, processor)
    _record(model, "processor", path, f"{type(original).__name__} -> {type(processor).__name__}", by, original=original)


def swap_module(
    model: nn.Module, path: str, new: nn.Module, *, weights_changed: tuple[str, ...] = (), by: str | None = None
) -> nn.Module:
    """Put `new` (rebuilt from the module at `path`, e.g. by `modules.swap.rebuild_as`) in its place.

    Recorded: the original class, the original values of the attributes `new` changed (padding)
    and the names of those it added, so that undoing rebuilds a module of the original class
    around the parameters then in place. `weights_changed`: parameters whose values `new` may not
    share with the original (a weight transfer); those found equal (a zero kernel) are dropped
    unless on the meta device; the stock values of the rest are lost unless the pass runs under
    `recording(..., keep_weights=True)`.
    """
    old = _module(model, path)
    reg = registry(model, create=True)
    weights_changed = tuple(n for n in weights_changed if not _equal_values(old._parameters[n], new._parameters[n]))
    data: dict[str, Any] = {
        "cls": type(old),
        "restore": _changed_attributes(old, new),
        "added": [k for k in vars(new) if k not in vars(old)],
    }
    if weights_changed and reg.keep_weights:
        data["weights"] = {name: old._parameters[name].detach() for name in weights_changed}
    model.set_submodule(path, new)
    _record(
        model, "module-swap", path, f"{type(old).__name__} -> {type(new).__name__}", by, tuple(weights_changed), **data
    )
    return new


def swap_class(model: nn.Module, path: str, cls: type, *, by: str | None = None) -> nn.Module:
    """Change the class of the module at `path` in place (a twin subclass: same parameters, same
    submodules, same state-dict keys), recording the original class."""
    module = _module(model, path)
    original = type(module)
    module.__class__ = cls
    _record(model, "class-swap", path, f"{original.__name__} -> {cls.__name__}", by, cls=original)
    return module


def add_module(model: nn.Module, path: str, module: nn.Module, *, by: str | None = None) -> nn.Module:
    """Register `module` as a new submodule at `path` (its parent must exist); a module already
    there is recorded and put back on undo."""
    parent_path, _, name = path.rpartition(".")
    parent = _module(model, parent_path)
    previous = parent._modules.get(name)
    parent.add_module(name, module)
    _record(model, "module-added", path, type(module).__name__, by, previous=previous)
    return module


def set_attribute(model: nn.Module, path: str, name: str, value: Any, *, by: str | None = None) -> None:
    """Set a plain attribute (`object.__setattr__`: a module value is not registered as a submodule,
    so the state dict does not change) on the module at `path`, recording what was there."""
    module = _module(model, path)
    had = name in vars(module)
    _record(model, "attribute", path, name, by, name=name, had=had, previous=vars(module).get(name))
    object.__setattr__(module, name, value)


def _equal_values(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """The same values (NaN aside) in both; False when that cannot be told (meta tensors: a
    structure being built for weights loaded later, so what the transfer claims is kept)."""
    if a is None or b is None:
        return a is b
    if a.is_meta or b.is_meta or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return torch.equal(a, b)


def _changed_attributes(old: nn.Module, new: nn.Module) -> dict[str, Any]:
    """The attributes of `old` whose values `new` does not share (parameters aside), copied."""
    missing = object()
    new_vars = vars(new)
    return {
        k: copy.copy(v) for k, v in vars(old).items() if k != "_parameters" and not _same(v, new_vars.get(k, missing))
    }


def _same(a: Any, b: Any) -> bool:
    """Equal values, comparing tensors by identity (containers are compared element by element)."""
    if a is b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality are treated as changed
        return False


# --- undo --------------------------------------------------------------------------------------


def _undo_hook(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    handle: RemovableHandle = change.data["handle"]
    handle.remove()
    module = model.get_submodule(change.path)
    for name in _HOOK_DICTS:
        getattr(module, name, {}).pop(handle.id, None)


def _undo_processor(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    set_processor(model.get_submodule(change.path), change.data["original"])


def _undo_module_swap(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    current = model.get_submodule(change.path)
    cls = change.data["cls"]
    restored = cls.__new__(cls)
    state = {k: v for k, v in vars(current).items() if k not in change.data["added"]}
    state.update({k: copy.copy(v) for k, v in change.data["restore"].items()})
    restored.__dict__.update(state)
    kept = change.data.get("weights", {})
    for name in change.weights_changed:
        full = _join(change.path, name)
        if name in kept:
            with torch.no_grad():
                restored._parameters[name].copy_(kept[name])
            report.restored_weights.append(full)
        else:
            report.unrestored.append(full)
    model.set_submodule(change.path, restored)


def _undo_class_swap(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    model.get_submodule(change.path).__class__ = change.data["cls"]


def _undo_module_added(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    parent_path, _, name = change.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    previous = change.data["previous"]
    if previous is None:
        delattr(parent, name)
    else:
        parent.add_module(name, previous)


def _undo_attribute(model: nn.Module, change: Change, report: UnconvertReport) -> None:
    module = model.get_submodule(change.path)
    name = change.data["name"]
    if change.data["had"]:
        object.__setattr__(module, name, change.data["previous"])
    else:
        vars(module).pop(name, None)


_UNDO: dict[str, Callable[[nn.Module, Change, UnconvertReport], None]] = {
    "hook": _undo_hook,
    "pre-hook": _undo_hook,
    "processor": _undo_processor,
    "module-swap": _undo_module_swap,
    "class-swap": _undo_class_swap,
    "module-added": _undo_module_added,
    "attribute": _undo_attribute,
}


def _check_undoable(model: nn.Module, reg: Installed) -> None:
    """Fail before changing anything: runtime state no record covers, or a recorded module gone."""
    if any(_STREAM_ATTR in vars(m) for m in model.modules()):
        raise UsageError(
            f"this {type(model).__name__} has streaming caches installed (causalize.rollout.streaming); their hooks "
            "are runtime state that unconvert does not track",
            "unconvert a copy taken before streaming, or reload the stock model",
        )
    if getattr(model, "peft_config", None):
        raise UsageError(
            f"this {type(model).__name__} has PEFT adapters ({', '.join(model.peft_config)})",
            "unload or delete the adapters first (PEFT), then unconvert",
        )
    for change in reg.changes:
        try:
            model.get_submodule(change.path)
        except AttributeError:
            raise CausalizeError(
                f"cannot unconvert: {change.kind} at '{change.path}' ({change.detail}) is no longer in the model",
                "the model was restructured after conversion",
            ) from None


def lost_weights(model: nn.Module) -> list[str]:
    """Parameter paths whose stock values conversion overwrote and did not keep."""
    reg = registry(model)
    if reg is None:
        return []
    return [
        _join(c.path, name)
        for c in reg.changes
        if c.kind == "module-swap"
        for name in c.weights_changed
        if name not in c.data.get("weights", {})
    ]


def unconvert(model: nn.Module, *, strict: bool = False) -> UnconvertReport:
    """Take every recorded change off `model` (in place), newest first: remove hooks by their
    handles, put back the original processors, classes and modules (with the padding a causal
    swap changed), delete the added modules (the action encoder) and attributes (the frame
    context), then the registry itself.

    Where the conversion changed no weights the model then computes exactly what the stock model
    does. Where a weight transfer overwrote parameters, the structure is restored and the report
    names those parameters in `unrestored` (`strict`: refuse, before changing anything). Returns
    an `UnconvertReport`; a model never converted gives an empty one.
    """
    reg = registry(model)
    report = UnconvertReport()
    if reg is None:
        return report
    _check_undoable(model, reg)
    lost = lost_weights(model)
    if strict and lost:
        raise UsageError(
            f"unconvert cannot restore {len(lost)} parameters the weight transfer overwrote: {', '.join(lost)}",
            "convert with keep_original_weights=True, or with causal-temporal-conv{transfer=shift}",
        )
    for change in reversed(reg.changes):
        _UNDO[change.kind](model, change, report)
        report.undone.append(change.to_json())
    report.unrestored.reverse()  # in conversion order, as `installed` lists them
    report.restored_weights.reverse()
    vars(model).pop(STATE_ATTR, None)
    return report


__all__ = [
    "DIRECT",
    "KINDS",
    "STATE_ATTR",
    "Change",
    "Installed",
    "UnconvertReport",
    "add_module",
    "installed",
    "lost_weights",
    "recording",
    "register_hook",
    "registry",
    "set_attribute",
    "set_processor",
    "swap_class",
    "swap_module",
    "unconvert",
    "wrap_processor",
]
