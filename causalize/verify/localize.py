"""Leak localisation: the first module, in execution order, whose past-frame output moved although
its past-frame input did not.

Intermediate tensors have many layouts ((B·T, C, H, W), (B·H·W, T, C), (B, C, T, H, W), tokens).
Rather than guess a frame axis from one shape, we run the model once more on T−1 frames: the one
dimension whose size changes is the frame axis, and the change is the number of entries per
frame (frame-major). Entries beyond T times that are context tokens, taken to lead (FramePack packs
its clean history before the section, CogVideoX its text before the video): the past region is
the context plus the past frames. Tensors where that fails are compared whole.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from causalize.layout import FrameLayout
from causalize.verify.probe import Forward, perturb_frame, slice_frames

Key = tuple[str, int, str, int]  # (module path, call index, "in"/"out", tensor index)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):
        return _tensors(obj.to_tuple())
    return []


@contextmanager
def _record(model: nn.Module, visit: Callable[[str, int, str, list[torch.Tensor]], None]) -> Iterator[list[str]]:
    """Call `visit(path, call, "in"/"out", tensors)` after each module call; yields the completion order."""
    order: list[str] = []
    calls: dict[str, int] = defaultdict(int)
    handles = []
    for path, mod in model.named_modules():
        if not path:
            continue

        def hook(m, args, kwargs, output, _path=path):
            call = calls[_path]
            calls[_path] += 1
            visit(_path, call, "in", _tensors(args) + _tensors(kwargs))
            visit(_path, call, "out", _tensors(output))
            order.append(f"{_path}#{call}")

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def _frame_axes(model, inputs, layout, forward, frames: int) -> dict[Key, tuple[int, int, int]]:
    """(axis, entries per causal block, leading context entries) for every tensor whose frame axis
    the T / T−b comparison reveals (b = block size: a temporally patched model holds T/b token frames)."""
    b = layout.block_size
    shapes: dict[int, dict[Key, tuple[int, ...]]] = {frames: {}, frames - b: {}}

    def make_visit(store):
        def visit(path, call, kind, ts):
            for k, t in enumerate(ts):
                store[(path, call, kind, k)] = tuple(t.shape)

        return visit

    for n in (frames, frames - b):
        with _record(model, make_visit(shapes[n])), torch.no_grad():
            forward(model, slice_frames(inputs, layout, n) if n != frames else inputs)
    axes: dict[Key, tuple[int, int, int]] = {}
    for key, full in shapes[frames].items():
        short = shapes[frames - b].get(key)
        if short is None or len(short) != len(full):
            continue
        diff = [d for d in range(len(full)) if full[d] != short[d]]
        if len(diff) != 1:
            continue
        d = diff[0]
        per = full[d] - short[d]
        context = full[d] - per * (frames // b)
        if per > 0 and context >= 0:
            axes[key] = (d, per, context)
    return axes


def _digest(t: torch.Tensor, axis_per: tuple[int, int, int] | None, past_blocks: int) -> str:
    """Hash of the region of t before block `past_blocks`, leading context included (the whole
    tensor if its frame axis is unknown)."""
    if axis_per is not None:
        axis, per, context = axis_per
        t = t.narrow(axis, 0, context + past_blocks * per)
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()


@torch.no_grad()
def localize_leak(
    model: nn.Module, inputs: dict[str, Any], layout: FrameLayout, forward: Forward, j: int, seed: int = 0
) -> tuple[list[dict[str, Any]], str]:
    """Modules whose output moved before frame j's block while their input did not, in execution order."""
    frames, b = layout.num_frames(inputs), layout.block_size
    if frames < 2 * b or frames % b:
        return [], f"localisation needs a multiple of the block size ({b}) of at least {2 * b} frames"
    past = j // b  # causal blocks strictly before frame j's
    try:
        axes = _frame_axes(model, inputs, layout, forward, frames)
    except Exception as exc:  # models with a fixed frame count cannot run on T-b frames
        return [], f"could not localise: the model does not run on {frames - b} frames ({type(exc).__name__}: {exc})"

    def run(run_inputs) -> tuple[dict[Key, str], list[str]]:
        digests: dict[Key, str] = {}

        def visit(path, call, kind, ts):
            for k, t in enumerate(ts):
                key = (path, call, kind, k)
                digests[key] = _digest(t, axes.get(key), past)

        with _record(model, visit) as order:
            forward(model, run_inputs)
        return digests, order

    base, order = run(inputs)
    moved, _ = run(perturb_frame(inputs, layout, j, torch.Generator().manual_seed(seed + 7)))
    classes = {p: type(m).__name__ for p, m in model.named_modules()}
    by_call: dict[tuple[str, int], list[Key]] = defaultdict(list)
    for key in base:
        by_call[(key[0], key[1])].append(key)
    culprits: list[dict[str, Any]] = []
    for entry in order:
        path, call = entry.rsplit("#", 1)
        keys = by_call[(path, int(call))]
        if any(base[k] != moved.get(k) for k in keys if k[2] == "in"):
            continue
        if not any(base[k] != moved.get(k) for k in keys if k[2] == "out" and k in axes):
            continue
        # A parent of a module already blamed leaks only through that child.
        if any(c["path"].startswith(path + ".") for c in culprits):
            continue
        culprits.append({"path": path, "class": classes.get(path, "?"), "call": int(call)})
    note = (
        ""
        if culprits
        else "could not localise: no single module moved past frames on its own (the leak may enter through an input the probe does not see)"
    )
    return culprits, note
