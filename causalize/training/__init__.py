"""Training-side pieces of the Vid2World recipe: the Diffusion Forcing objective (METHOD.md §6),
per-frame noise levels and action dropout (§7), and the accelerate trainer. The noise schedule and
the v / ε / x0 conversions are in :mod:`causalize.noise`, shared with rollout. Import submodules
directly, e.g. ``from causalize.training.trainer import TrainConfig, train``."""
