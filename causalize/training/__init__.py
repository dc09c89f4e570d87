"""Training-side pieces of the Vid2World recipe: the Diffusion Forcing objective (METHOD.md §6),
per-frame noise levels, v-parameterisation, the zero-terminal-SNR schedule and per-frame action
dropout (§7). Import submodules directly, e.g. ``from causalize.training.objective import ...``."""
