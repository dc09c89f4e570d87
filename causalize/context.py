"""The per-forward frame context: what diffusers forwards have no argument for.

A forward pre-hook on the root model computes, from that call's inputs, how many token frames
the video has and how many tokens each frame has; the attention processors installed by the
passes read it to build their masks. It is runtime state, never saved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from causalize import state
from causalize.errors import CausalizeError

CONTEXT_ATTR = "_causalize_frame_context"
#: The attribute under which hooked submodules (timestep embeddings, modulation twins) find the
#: root model's frame context.
MODULE_CONTEXT = "_causalize_ctx"


@dataclass(frozen=True)
class TokenGrid:
    """Video tokens of one forward call: `frames` token frames of `per_frame` tokens, frame-major.

    leading_context: context tokens the model itself puts before the video tokens in every sequence
    that has context, whatever a site's declared context position (FramePack packs its clean
    history there, in front of the section's frames); the rest of a site's context sits at that
    position. 0 for every other model.
    """

    frames: int
    per_frame: int
    leading_context: int = 0

    @property
    def video_tokens(self) -> int:
        return self.frames * self.per_frame

    def context_split(self, context_len: int, position: str) -> tuple[int, int]:
        """(before, after): context tokens before and after the video in a sequence of `context_len`
        context tokens at a site that declares `position`; `after` < 0 when they do not fit."""
        if position == "prefix":
            return context_len, 0
        if context_len == 0:
            return 0, 0
        return self.leading_context, context_len - self.leading_context


TokenFn = Callable[[nn.Module, dict[str, Any]], TokenGrid]


class FrameContext:
    """Per-call state: the TokenGrid of the forward in progress (None outside a forward), and the
    per-frame conditioning a WorldModel call sets: timesteps (B, T), action embeddings (B, T, D)."""

    def __init__(self, tokens: TokenFn | None):
        self.tokens = tokens
        self.grid: TokenGrid | None = None
        self.timesteps = None
        self.action_emb = None
        self.temb_delta = None
        self.busy = False
        self.stream = None  # causalize.rollout.streaming.StreamState while a streaming rollout runs

    def current(self) -> TokenGrid:
        if self.grid is None:
            raise CausalizeError(
                "a causal attention processor ran outside the model's forward (no frame context)",
                "call the converted model itself, not one of its blocks",
            )
        return self.grid


def bound_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        return inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


# The hooks find the context through the module, not a closure, so that a deepcopy of the
# model (the causality probe runs on one) drives its own copied context and processors.
def _fill_frame_grid(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Root pre-hook: this call's TokenGrid, from its inputs."""
    c = getattr(module, CONTEXT_ATTR)
    if c.tokens is not None:
        c.grid = c.tokens(module, bound_arguments(module, args, kwargs))


def _clear_frame_grid(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Root hook (always called): nothing of this call outlives it."""
    c = getattr(module, CONTEXT_ATTR)
    c.grid = None
    c.temb_delta = None


def install_context(model: nn.Module, tokens: TokenFn | None = None) -> FrameContext:
    """The model's frame context, installing the pre-hook that fills it on first use (recorded in
    the model's registry, causalize.state, so that `unconvert` removes hooks and context)."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is not None:
        if ctx.tokens is None and tokens is not None:
            ctx.tokens = tokens
        return ctx
    ctx = FrameContext(tokens)
    state.set_attribute(model, "", CONTEXT_ATTR, ctx)
    state.register_hook(model, "", _fill_frame_grid, pre=True, with_kwargs=True)
    state.register_hook(model, "", _clear_frame_grid, with_kwargs=True, always_call=True)
    return ctx


# --- gradient checkpointing ------------------------------------------------------------------

_CONTEXT_FIELDS = ("grid", "timesteps", "action_emb", "temb_delta", "busy")


def context_preserving_checkpoint(frame_context: FrameContext):
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing` that replays
    the frame context while a block is recomputed.

    The per-frame conditioning and the token grid live in a context that is cleared when the
    model's forward returns; diffusers' default checkpointing recomputes blocks in backward, after
    that, so recomputed blocks would see no per-frame conditioning (silently wrong gradients in the
    UNets, an error in DiTs with causal attention). This snapshots the context when a block runs
    forward and restores it during the block's recomputation.
    """
    import contextlib

    from torch.utils.checkpoint import checkpoint

    def checkpoint_func(module, *args):
        snapshot = {f: getattr(frame_context, f) for f in _CONTEXT_FIELDS}

        @contextlib.contextmanager
        def replay():
            saved = {f: getattr(frame_context, f) for f in _CONTEXT_FIELDS}
            for f, v in snapshot.items():
                setattr(frame_context, f, v)
            try:
                yield
            finally:
                for f, v in saved.items():
                    setattr(frame_context, f, v)

        return checkpoint(module, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), replay()))

    return checkpoint_func


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing that is correct on a converted model (use this, not the model's own
    `enable_gradient_checkpointing()`, whose default would drop the frame context). Returns False
    when the diffusers class does not support checkpointing."""
    if not getattr(model, "_supports_gradient_checkpointing", False) or not hasattr(
        model, "enable_gradient_checkpointing"
    ):
        return False
    ctx = getattr(model, CONTEXT_ATTR, None)
    model.enable_gradient_checkpointing(context_preserving_checkpoint(ctx) if ctx is not None else None)
    return True
