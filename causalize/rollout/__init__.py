"""Interactive rollout of a converted world model: autoregressive sampler with causal action
guidance (sampler), exact streaming caches (streaming), schedules and steps (schedule)."""

from causalize.rollout.sampler import RolloutConfig, RolloutResult, RolloutSession, rollout

__all__ = ["RolloutConfig", "RolloutResult", "RolloutSession", "rollout"]

# Loaded on first use: the environment needs gymnasium, file rollouts may need imageio.
_LAZY = {
    "WorldModelEnv": "causalize.rollout.env",
    "rollout_to_file": "causalize.rollout.to_file",
    "resolve_config": "causalize.rollout.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'causalize.rollout' has no attribute {name!r}")


__all__ += list(_LAZY)
