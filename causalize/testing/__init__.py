"""Causality checks for tests: `assert_causal`, `assert_leaks`, and a pytest plugin.

The pytest plugin (`causalize.testing.pytest_plugin`, entry point pytest11) provides the
`causality` fixture and the `causal` marker. Nothing here imports torch until a check is used.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "assert_causal": "causalize.testing.asserts",
    "assert_leaks": "causalize.testing.asserts",
    "CausalityCheckFailed": "causalize.testing.asserts",
    "module_forward": "causalize.testing.asserts",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'causalize.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
