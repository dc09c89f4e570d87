"""The plugin manager: built-in passes and model plugins first, then the `causalize` entry points.

Set CAUSALIZE_DISABLE_PLUGIN_AUTOLOAD=1 to skip third-party entry points (built-ins still load).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import pluggy

from causalize import hookspecs
from causalize.errors import NoPlanError, UsageError
from causalize.passes.registry import PassRegistry, did_you_mean
from causalize.plan import Plan, Refusal

#: The built-in plugins, loaded in this order (as pytest lists its default plugins): the passes,
#: then one module per model family. Adding a family = adding its file to plugins/ and here
#: (a test checks that every file in plugins/ is listed); nothing else in the folder is loaded.
BUILTIN_MODEL_PLUGINS = (
    "allegro",
    "animatediff",
    "anyflow",
    "chronoedit",
    "cogvideox",
    "consisid",
    "cosmos",
    "easyanimate",
    "framepack",
    "helios",
    "hunyuan",
    "hunyuan15",
    "i2vgenxl",
    "kandinsky",
    "latte",
    "ltx",
    "ltx2",
    "mochi",
    "motif",
    "refused",
    "sana_video",
    "sana_wm",
    "skyreels_v2",
    "svd",
    "unet3d",
    "wan",
    "wan_animate",
    "wan_vace",
)
BUILTIN_PLUGINS = ("causalize.passes", *(f"causalize.plugins.{name}" for name in BUILTIN_MODEL_PLUGINS))
AUTOLOAD_ENV = "CAUSALIZE_DISABLE_PLUGIN_AUTOLOAD"


class PlanRegistry:
    """name -> Plan, with a lookup by diffusers class name."""

    def __init__(self) -> None:
        self._plans: dict[str, Plan] = {}
        self.refusals: dict[str, Refusal] = {}

    def refuse(self, refusal: Refusal, source: str = "") -> Refusal:
        if not isinstance(refusal, Refusal):
            raise TypeError(f"register() expects a causalize.plan.Refusal, got {type(refusal).__name__}")
        if refusal.model_class in self.refusals:
            raise ValueError(f"{refusal.model_class} is already refused")
        self.refusals[refusal.model_class] = refusal
        return refusal

    def register(self, plan: Plan, source: str = "") -> Plan:
        if not isinstance(plan, Plan):
            raise TypeError(f"register() expects a causalize.plan.Plan, got {type(plan).__name__}")
        if plan.name in self._plans:
            raise ValueError(f"plan '{plan.name}' is already registered by {self._plans[plan.name].source}")
        object.__setattr__(plan, "source", source)
        self._plans[plan.name] = plan
        return plan

    def get(self, name: str) -> Plan:
        try:
            return self._plans[name]
        except KeyError:
            raise UsageError(
                f"unknown plan '{name}'.{did_you_mean(name, self._plans)}", "run `causalize plugins` to list plans"
            ) from None

    def for_class(self, class_name: str, config: dict | None = None) -> Plan:
        """The plan for a diffusers class; with several, the first whose `accepts(config)` holds."""
        matches = [p for p in self._plans.values() if p.model_class == class_name]
        if config is not None and len(matches) > 1:
            fitting = [p for p in matches if p.accepts is None or p.accepts(dict(config))]
            matches = fitting or matches
        if not matches:
            refusal = self.refusals.get(class_name)
            if refusal is not None:
                start = f"; the nearest plan is '{refusal.nearest}'" if refusal.nearest else ""
                raise NoPlanError(
                    f"no plan: {class_name} is not supported: {refusal.reason}",
                    f"a port needs a plugin that solves this (see README, 'Writing a plugin'){start}",
                )
            supported = ", ".join(sorted(f"{p.model_class} ({p.name})" for p in self._plans.values()))
            raise NoPlanError(
                f"no plan supports {class_name}; supported: {supported}",
                "write a plugin that registers a Plan for it (see README, 'Writing a plugin')"
                + self._nearest_hint(class_name)
                + ", or pass --plan",
            )
        return matches[0]

    def _nearest_hint(self, class_name: str) -> str:
        """The plan whose class name is closest, as a starting point for a port."""
        import difflib

        by_class = {p.model_class: p.name for p in self._plans.values()}
        close = difflib.get_close_matches(class_name, list(by_class), n=1, cutoff=0.0)
        return f", starting from the nearest plan '{by_class[close[0]]}' ({close[0]})" if close else ""

    def __iter__(self):
        return iter(self._plans[n] for n in sorted(self._plans))

    def names(self) -> list[str]:
        return sorted(self._plans)


@dataclass
class Registries:
    passes: PassRegistry
    plans: PlanRegistry
    manager: pluggy.PluginManager

    def plugin_rows(self) -> list[dict[str, str]]:
        """One row per loaded plugin: name, where it came from, what it registered."""
        rows = []
        dists = {id(p): d for p, d in self.manager.list_plugin_distinfo()}
        for name, plugin in self.manager.list_name_plugin():
            dist = dists.get(id(plugin))
            origin = f"{dist.project_name} {dist.version}" if dist else "built-in"
            module = getattr(plugin, "__name__", type(plugin).__name__)
            plans = [p.name for p in self.plans if p.source == name]
            passes = [c.name for c in self.passes if c.__module__.startswith(module)] if module else []
            rows.append({"name": name, "origin": origin, "plans": ", ".join(plans), "passes": ", ".join(passes)})
        return rows


def build_registries(autoload: bool | None = None) -> Registries:
    """A fresh plugin manager with built-ins and (unless disabled) entry-point plugins loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for mod in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(mod), name=mod)
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    passes, plans = PassRegistry(), PlanRegistry()
    for impl in pm.hook.causalize_register_passes.get_hookimpls():
        impl.function(register=passes.register)
    for impl in pm.hook.causalize_register_plans.get_hookimpls():
        impl.function(register=lambda plan, _src=impl.plugin_name: plans.register(plan, _src))
    for impl in pm.hook.causalize_register_refusals.get_hookimpls():
        impl.function(register=lambda refusal, _src=impl.plugin_name: plans.refuse(refusal, _src))
    from causalize.modules.frame_modulation import register_twin  # torch: only once plugins load

    pm.hook.causalize_register_twins(register=register_twin)
    return Registries(passes, plans, pm)


@lru_cache(maxsize=1)
def registries() -> Registries:
    """The process-wide registries (built once)."""
    return build_registries()
