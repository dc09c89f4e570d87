"""The pluggy hook catalogue. Every feature plugs in through these hooks, built-ins included.

A plugin is a module (or object) with functions named like the hooks below, decorated with
`causalize.hookimpl`. Third-party plugins are found through the entry-point group `causalize`.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "causalize"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def causalize_register_passes(register: Callable[[type], type]) -> None:
    """Register pass classes: call `register(PassSubclass)` for each.

    Names are kebab-case and unique; options are a frozen dataclass of int / float / bool / str /
    Literal fields with defaults. Registration validates all of this and raises on a clash.
    """


@hookspec
def causalize_register_plans(register: Callable[[object], object]) -> None:
    """Register model plans: call `register(Plan(...))` for each diffusers class you support.

    One plan per model class (`Plan.model_class`); a second plan for the same class is an error
    unless its name differs and the user picks it with `--plan`.
    """


@hookspec
def causalize_register_twins(register: Callable[[str, type], None]) -> None:
    """Register per-frame twins of modulation classes: call `register("ClassName", TwinClass)`.

    A twin is a direct subclass of the diffusers modulation class with a `supports(module)`
    classmethod; `frame-conditioning` swaps instances of "ClassName" to it (same parameters and
    state-dict keys) so that each frame gets its own timestep modulation.
    """


@hookspec
def causalize_register_refusals(register: Callable[[object], object]) -> None:
    """Register classes that are refused on purpose: call `register(Refusal(...))` for each, so that
    `convert`, `verify` and `inspect` say why instead of "no plan"."""
