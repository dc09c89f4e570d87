"""Interactive rollout of a converted world model: autoregressive sampler with causal action
guidance (sampler), exact streaming caches (streaming), schedules and steps (schedule)."""

from causalize.rollout.sampler import RolloutConfig, RolloutResult, RolloutSession, rollout

__all__ = ["RolloutConfig", "RolloutResult", "RolloutSession", "rollout"]
