"""Frame-level action encoders (METHOD.md §7): one embedding per frame, added to that frame's
timestep embedding. Frame-local by construction, so they add no leak."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

ActionType = Literal["continuous", "discrete"]

#: The submodule name under which a converted model holds its action encoder.
ADAPTER_ATTR = "causalize_action_encoder"


def embedding_width(module: nn.Module) -> int:
    """Output width of a timestep-embedding module (its last Linear): the action embedding's width."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot tell the width of the timestep embedding {type(module).__name__} (it has no Linear)")
    return linears[-1].out_features


class ActionEncoder(nn.Module):
    """Continuous: Linear(A→C0) → SiLU → Linear(C0→D) → SiLU → Linear(D→D), mirroring the timestep
    MLP with the sinusoid replaced by a projection. Discrete / multi-hot: the sum of the embedding
    rows of the active entries (a·E), then Linear(C0→D) → SiLU → Linear(D→D).

    The last Linear starts at zero, so a freshly added adapter leaves the causal base model unchanged
    (the causality probe re-randomises zero parameters, so this hides no leak).
    A masked-out (dropped, or absent) action is the null action: a zero embedding.
    """

    def __init__(
        self, action_dim: int, emb_dim: int, action_type: ActionType = "continuous", hidden: int | None = None
    ):
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        if action_type not in ("continuous", "discrete"):
            raise ValueError(f"action_type must be 'continuous' or 'discrete', got {action_type!r}")
        self.action_dim, self.emb_dim, self.action_type = action_dim, emb_dim, action_type
        hidden = hidden or max(emb_dim // 4, 1)
        if action_type == "continuous":
            self.inp = nn.Sequential(nn.Linear(action_dim, hidden), nn.SiLU())
        else:
            self.inp = nn.Linear(action_dim, hidden, bias=False)  # rows of E summed by a·E
        self.out = nn.Sequential(nn.Linear(hidden, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, actions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """actions (B, T, A) (discrete: (B, T) indices or (B, T, N) multi-hot); mask (B, T) bool."""
        if self.action_type == "discrete" and actions.dim() == 2:
            actions = nn.functional.one_hot(actions.long(), self.action_dim)
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions have dimension {actions.shape[-1]}, the adapter expects {self.action_dim}")
        emb = self.out(self.inp(actions.to(self.out[0].weight.dtype)))
        if mask is not None:
            emb = emb * mask.to(emb.dtype)[..., None]
        return emb
