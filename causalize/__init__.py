"""causalize: turn pretrained bidirectional video diffusion models into causal world models.

The package imports lazily so that `causalize --help` never imports torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "convert": "causalize.api",
    "load": "causalize.api",
    "verify": "causalize.api",
    "inspect": "causalize.api",
    "convert_model": "causalize.api",
    "unconvert": "causalize.state",
    "installed": "causalize.state",
    "check_causality": "causalize.verify",
    "CausalityReport": "causalize.verify",
    "Plan": "causalize.plan",
    "Targets": "causalize.plan",
    "FrameLayout": "causalize.layout",
    "registries": "causalize.plugin_manager",
    "hookimpl": "causalize.hookspecs",
    "assert_causal": "causalize.testing.asserts",
    "WorldModel": "causalize.world_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'causalize' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
