"""A shrunken copy of a model for verification when the real one does not fit the device.

Causality is a property of the graph, not of the weight values (zero weights that could hide a
path are re-randomised by the probe). So a model of the same class, built from the same config
with the plan's tiny sizes (layers, heads, widths, block lists) but the real model's kinds
(flags, norms, activations, patch sizes), exercises every path the real one has: it proves the
class + config flags + pipeline causal, not the checkpoint's particular weights.
"""

from __future__ import annotations

from typing import Any

from causalize.errors import CheckpointError
from causalize.plan import Plan

#: Config keys that describe what kind of model this is rather than its size: kept from the real
#: config. Everything the plan's tiny config sets that is a number, or a list of numbers or block
#: names, is a size.
_KINDS = ("patch", "type", "norm", "act", "mode", "embeds", "bias", "rope", "encoding")


def _is_size(key: str, value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return False
    if any(word in key for word in _KINDS) and not key.endswith("_types"):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
    return False


def shrunken_config(plan: Plan, config: dict[str, Any]) -> dict[str, Any]:
    """The real config with every size the plan's tiny config sets replaced by the tiny value."""
    sizes = {k: v for k, v in plan.tiny_config.items() if _is_size(k, v)}
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    return {**public, **sizes}


def build_shrunken(plan: Plan, config: dict[str, Any], seed: int = 0):
    """A random-weight model of the plan's class from `shrunken_config` (fp32, eval)."""
    import torch

    shrunk = shrunken_config(plan, config)
    torch.manual_seed(seed)
    try:
        return plan.model_cls()(**shrunk).eval(), shrunk
    except Exception as exc:  # noqa: BLE001 - any constructor failure means the mix does not fit
        raise CheckpointError(
            f"cannot build a shrunken {plan.model_cls().__name__} from this config: {type(exc).__name__}: {exc}",
            "verify the full model instead (without --shrink), on a device it fits",
        ) from None


__all__ = ["build_shrunken", "shrunken_config"]
