"""Interactive rollout of a converted world model: autoregressive sampler with causal action
guidance (sampler), exact streaming caches (streaming), schedules and steps (schedule).

Every name loads on first use: `causalize.rollout.io` and `causalize.rollout.to_file` check files
without torch, so that `causalize rollout` reports a bad path before torch is imported; the
environment needs gymnasium, file rollouts may need imageio."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from causalize.rollout.env import WorldModelEnv
    from causalize.rollout.loading import resolve_config
    from causalize.rollout.sampler import RolloutConfig, RolloutResult, RolloutSession, rollout
    from causalize.rollout.to_file import rollout_to_file

_LAZY = {
    "RolloutConfig": "causalize.rollout.sampler",
    "RolloutResult": "causalize.rollout.sampler",
    "RolloutSession": "causalize.rollout.sampler",
    "rollout": "causalize.rollout.sampler",
    "WorldModelEnv": "causalize.rollout.env",
    "rollout_to_file": "causalize.rollout.to_file",
    "resolve_config": "causalize.rollout.loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'causalize.rollout' has no attribute {name!r}")


__all__ = [
    "RolloutConfig",
    "RolloutResult",
    "RolloutSession",
    "WorldModelEnv",
    "resolve_config",
    "rollout",
    "rollout_to_file",
]
