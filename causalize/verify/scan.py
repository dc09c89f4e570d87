"""A traced scan for time-mixing modules, independent of any plan's targets.

It backs `causalize inspect`: the sites each pass covers are compared against what a forward pass
shows mixes frames, so a plan that forgot a GroupNorm owner or a temporal conv is visible before
conversion. Attention over frames cannot be told apart by shape alone (pitfall: L = T collides
with H·W = T), so attention calls are reported as "possible" only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from causalize.modules.causal_conv import is_causal_conv, is_temporal_conv
from causalize.modules.causal_norm import CausalGroupNorm
from causalize.modules.frame_attention import is_wrapped
from causalize.plan import Plan


@torch.no_grad()
def scan_time_mixers(model: nn.Module, plan: Plan, inputs: dict[str, Any]) -> list[dict[str, str]]:
    frames = plan.layout.num_frames(inputs)
    axis = plan.targets_for("causal-temporal-conv")[0].time_axis
    found: dict[str, dict[str, str]] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not is_causal_conv(mod):
            if isinstance(mod, nn.Conv3d) and is_temporal_conv(mod, axis):
                found[path] = {
                    "path": path,
                    "class": type(mod).__name__,
                    "what": f"temporal kernel {mod.kernel_size[axis]}",
                }

    on_frames: set[str] = set()  # Conv3d calls whose input has the probe's frame count along time

    def hook(mod, args, _out, _path):
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if x is None:
            return
        if isinstance(mod, nn.Conv3d) and x.ndim == 5 and x.shape[2 + axis] == frames:
            on_frames.add(_path)
        # A Conv1d/2d on (B, C, T, ...) at the probe's batch of 1 (per-frame convs see B*T rows).
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not is_causal_conv(mod) and x.shape[0] == 1 < frames:
            if x.ndim >= 3 and x.shape[2] == frames and mod.kernel_size[0] > 1:
                found[_path] = {
                    "path": _path,
                    "class": type(mod).__name__,
                    "what": f"possible temporal conv over {tuple(x.shape)}",
                }
            return
        if (
            isinstance(mod, nn.GroupNorm)
            and not isinstance(mod, CausalGroupNorm)
            and x.ndim >= 5
            and x.shape[2] == frames
        ):
            found[_path] = {
                "path": _path,
                "class": type(mod).__name__,
                "what": f"statistics over {tuple(x.shape)} span frames",
            }
        elif (
            hasattr(mod, "processor")
            and not is_wrapped(getattr(mod, "processor", None))
            and x.ndim == 3
            and x.shape[1] == frames
        ):
            if not getattr(mod, "is_cross_attention", False):
                found.setdefault(
                    _path,
                    {
                        "path": _path,
                        "class": type(mod).__name__,
                        "what": f"possible attention over frames (sequence length {frames})",
                    },
                )

    from causalize.verify.probe import as_model_inputs

    handles = [m.register_forward_hook(lambda m, a, o, _p=p: hook(m, a, o, _p)) for p, m in model.named_modules() if p]
    try:
        plan.forward(model, as_model_inputs(model, inputs))
    finally:
        for h in handles:
            h.remove()
    # A temporal patch embedding (stride = kernel along time, no temporal padding) that this forward
    # never ran, or ran only on inputs of another frame count, embeds inputs other than the frames
    # (FramePack's / Helios' history latents).
    for path in [p for p in found if p not in on_frames and _is_temporal_patch(model.get_submodule(p), axis)]:
        del found[path]
    return sorted(found.values(), key=lambda d: d["path"])


def _is_temporal_patch(mod: nn.Module, axis: int) -> bool:
    return (
        isinstance(mod, nn.Conv3d)
        and mod.stride[axis] == mod.kernel_size[axis]
        and not isinstance(mod.padding, str)
        and mod.padding[axis] == 0
    )
