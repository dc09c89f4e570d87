"""Exact streaming: run a converted model one frame at a time with per-layer caches (METHOD.md §10).

`Stream(model, plan)` installs, once, the runtime hooks every causal mixer needs:

| mixer | state | installed as |
|---|---|---|
| causal temporal conv | the last (k−1)·d input frames | an instance override of `_pad_time` |
| cumulative causal norm | running Σ of per-frame means and variances, the frame-0 shift, each frame's own mean and variance | an instance override of `_cumulative` |
| causal / block-causal attention | keys and values of history tokens (one cache per sample for per-sample SDPA loops) | `StreamingAttnProcessor` |
| block-causal linear attention | running sums Σ v ⊗ R(φ(k)), Σ φ(k) over the cached frames | `StreamingLinearAttnProcessor` |
| per-frame norm, spatial ops, FFN, AdaLN | none | — |
| temporal positions (RoPE, absolute embeddings, frame-index embeddings, sinusoidal tables) | none: offset by the frames already cached | hooks named by plan.streaming |

Outside a `Stream` call every hook is inert: the model computes exactly what it did before.
Inside, a call either *writes* history (`stream.write(...)`: prefill a window, or append the
newest frame; the caches grow) or *reads* it (`stream.read(...)`: a denoising step of the current
frame; the caches are used, not changed). Frames of one call get global indices starting at the
number of frames already cached, so positions and masks match a full-window forward.

The caches are exact as long as the history is fixed: a window whose start moves must be
re-prefilled after `reset()` (the exact rollout does). A rolling rollout instead drops the frames
that left the window (`evict`) and keeps appending: positions keep counting globally, and the kept
keys were computed under older windows, so it is approximate. Running sums (cumulative norms,
linear attention) drop a frame by keeping each frame's own part.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from causalize.context import CONTEXT_ATTR, FrameContext
from causalize.errors import CausalizeError, UsageError
from causalize.layout import tile_history
from causalize.modules.block_attention import BlockCausalAttnProcessor
from causalize.modules.causal_conv import is_causal_conv
from causalize.modules.causal_norm import CausalGroupNorm
from causalize.modules.frame_attention import CausalFrameAttnProcessor
from causalize.modules.linear_attention import BlockCausalLinearAttnProcessor, StreamingLinearAttnProcessor
from causalize.modules.streaming_attention import StreamingAttnProcessor
from causalize.plan import OffsetPositions, Plan

STREAM_ATTR = "_causalize_stream"
OFFSET_ATTR = "_causalize_offset_positions"
HOOKS_ATTR = "_causalize_stream_hooks"
CALLER_ATTR = "_causalize_caller_positions"


@dataclass
class StreamState:
    """What the hooks read during one streaming call."""

    mode: Literal["write", "read"]
    offset: int  # global index of the call's first frame = frames already cached
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # id(conv) -> its last (k−1)·d input frames
    norms: dict[int, object] = field(default_factory=dict)  # id(norm) -> NormCarry of the cached frames
    # the timestep of the window's first frame: per-sample-AdaLN models modulate their text stream
    # with the call's first timestep (WorldModel passes it), which must stay the window's
    anchor_timestep: int | None = None
    rolling: bool = False  # a rolling write: running sums record each frame's own part, to evict it later


class Stream:
    """The streaming caches of one model; `Stream.of(model, plan)` returns the installed one."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.model = model
        self.plan = plan
        self.context: FrameContext | None = getattr(model, CONTEXT_ATTR, None)
        if self.context is None:
            raise UsageError(f"this {type(model).__name__} was not converted (no frame context): nothing to stream")
        if plan.streaming is None:
            raise UsageError(
                f"plan '{plan.name}' does not declare streaming support",
                "use full recomputation (cache=False / --no-cache)",
            )
        self._check_supported()
        self.cached_frames = 0
        self.anchor_timestep: int | None = None
        self.owner: object | None = None  # the rollout whose history the caches hold
        self._conv: dict[int, torch.Tensor] = {}
        self._norms: dict[int, object] = {}
        self._processors = self._install_attention()
        self._install_convs()
        self._install_norms()
        self._install_rope()
        self._install_frame_positions()
        if getattr(model, STREAM_ATTR, None) is None:
            self.attach(model)  # the root hooks below find the call through it
        self._install_caller_positions_check()
        self._install_plugin_hooks()

    @classmethod
    def of(cls, model: nn.Module, plan: Plan) -> Stream:
        stream = getattr(model, STREAM_ATTR, None)
        if stream is None:
            stream = cls(model, plan)
            object.__setattr__(model, STREAM_ATTR, stream)
        return stream

    # --- what cannot stream ------------------------------------------------------------------

    def _check_supported(self) -> None:
        if self.plan.layout.block_size != 1:
            raise UsageError(
                f"plan '{self.plan.name}' is causal over blocks of {self.plan.layout.block_size} frames",
                "block-by-block streaming is not implemented: use cache=False",
            )

    # --- installation ------------------------------------------------------------------------

    def _install_attention(self) -> list[StreamingAttnProcessor | StreamingLinearAttnProcessor]:
        installed = []
        for _, m in self.model.named_modules():
            processor = getattr(m, "processor", None)
            if isinstance(processor, (StreamingAttnProcessor, StreamingLinearAttnProcessor)):
                installed.append(processor)
                continue
            if isinstance(processor, (CausalFrameAttnProcessor, BlockCausalAttnProcessor)):
                wrapper = StreamingAttnProcessor(processor, self.context)
            elif isinstance(processor, BlockCausalLinearAttnProcessor):
                wrapper = StreamingLinearAttnProcessor(processor, self.context)
            else:
                continue
            m.set_processor(wrapper) if hasattr(m, "set_processor") else setattr(m, "processor", wrapper)
            installed.append(wrapper)
        return installed

    def _install_convs(self) -> None:
        for _, m in self.model.named_modules():
            if is_causal_conv(m) and m.left_pad > 0 and "_pad_time" not in vars(m):
                m._pad_time = types.MethodType(_streaming_pad_time, m)
                object.__setattr__(m, STREAM_ATTR, self)

    def _install_norms(self) -> None:
        for _, m in self.model.named_modules():
            if isinstance(m, CausalGroupNorm) and m.mode == "cumulative" and "_cumulative" not in vars(m):
                m._cumulative = types.MethodType(_streaming_cumulative, m)
                object.__setattr__(m, STREAM_ATTR, self)

    def _install_rope(self) -> None:
        spec = self.plan.streaming
        if spec.rope:
            rope = OffsetPositions(spec.rope, spec.rope_frame_axis, spec.rope_token_axis, spec.rope_frames_arg)
            self._install_offset(self.model.get_submodule(spec.rope), rope)
        for positions in spec.positions:
            try:
                module = self.model.get_submodule(positions.path)
            except AttributeError:  # this config has no such embedding (e.g. Cosmos without the learnable one)
                continue
            if isinstance(module, nn.Module):
                self._install_offset(module, positions)

    def _install_offset(self, module: nn.Module, positions: OffsetPositions) -> None:
        if OFFSET_ATTR in vars(module):
            return
        object.__setattr__(module, STREAM_ATTR, self)
        object.__setattr__(module, OFFSET_ATTR, positions)
        module.register_forward_hook(_offset_rope, with_kwargs=True)

    def _install_plugin_hooks(self) -> None:
        """The plan's own position hooks, once per model (they read the model's frame context, so
        they serve every Stream of it)."""
        done = vars(self.model).get(HOOKS_ATTR)
        if done is None:
            done = set()
            object.__setattr__(self.model, HOOKS_ATTR, done)
        for install in self.plan.streaming.hooks:
            if install not in done:
                install(self.model, self)
                done.add(install)

    def _install_caller_positions_check(self) -> None:
        names = self.plan.streaming.caller_positions
        if names and CALLER_ATTR not in vars(self.model):
            object.__setattr__(self.model, CALLER_ATTR, names)
            self.model.register_forward_pre_hook(_refuse_caller_positions, with_kwargs=True)

    def _install_frame_positions(self) -> None:
        spec = self.plan.streaming
        owners = dict(name.split(".", 1) for name in spec.frame_index)
        for _, m in self.model.named_modules():
            child = owners.get(type(m).__name__)
            if child is not None:
                target = m.get_submodule(child)
                object.__setattr__(target, STREAM_ATTR, self)
                target.register_forward_pre_hook(_offset_frame_index)
            if type(m).__name__ in spec.pe_tables:
                object.__setattr__(m, STREAM_ATTR, self)
                m.register_forward_pre_hook(_shift_pe_table)
                m.register_forward_hook(_restore_pe_table, always_call=True)

    # --- calls -------------------------------------------------------------------------------

    def attach(self, module: nn.Module) -> None:
        """Let hooks on `module` find this stream through the module (`stream_of`, `state_of`), not
        a closure, so that a deep copy of the model drives its own copy."""
        object.__setattr__(module, STREAM_ATTR, self)

    @staticmethod
    def state_of(module: nn.Module) -> StreamState | None:
        """The streaming call in progress for the model an attached `module` belongs to, or None
        outside one: what plugin position hooks read (they get the stream, so they import nothing
        from the runtime)."""
        return state_of(module)

    @staticmethod
    def stream_of(module: nn.Module) -> Stream:
        """The Stream an attached `module` belongs to (its `.model` is the model being streamed)."""
        return stream_of(module)

    def reset(self) -> None:
        """Forget the history (a new window, or a new rollout)."""
        self.cached_frames = 0
        self._conv.clear()
        self._norms.clear()
        for p in self._processors:
            p.cache.reset()  # keeps the buffers: the next window has the same shapes

    @contextmanager
    def _call(self, mode: Literal["write", "read"], frames: int, rolling: bool = False) -> Iterator[StreamState]:
        if self.context.stream is not None:
            raise CausalizeError("streaming calls do not nest")
        state = StreamState(mode, self.cached_frames, self._conv, self._norms, self.anchor_timestep, rolling)
        self.context.stream = state
        try:
            yield state
        finally:
            self.context.stream = None
        if mode == "write":
            self.cached_frames += frames

    def write(self, frames: int, rolling: bool = False):
        """Context for a forward over `frames` new history frames: they are appended to the caches.
        `rolling`: they will be evicted later (`evict`), so running sums record each frame's part."""
        return self._call("write", frames, rolling)

    def read(self):
        """Context for a forward over the current frame(s): caches are used, not changed."""
        return self._call("read", 0)

    def evict(self, first: int, stop: int) -> None:
        """Drop cached frames first .. stop−1 (global indices) from every attention cache (the
        linear-attention sums included) and from the cumulative norms' statistics; conv buffers
        hold only the newest frames already. Positions keep counting (`cached_frames`)."""
        for p in self._processors:
            p.cache.evict(first, stop)
        for key, carry in self._norms.items():
            self._norms[key] = carry.drop(first, stop)

    def attention_modules(self) -> list[nn.Module]:
        """The modules whose attention processors read these caches (what a compiled step keeps eager)."""
        mine = {id(p) for p in self._processors}
        return [m for m in self.model.modules() if id(getattr(m, "processor", None)) in mine]

    def cache_bytes(self) -> int:
        """Memory held by the caches (keys, values, linear-attention sums, conv buffers, norm statistics)."""
        norms = [t for c in self._norms.values() for t in (c.mean_sum, c.var_sum, c.frame_means, c.frame_vars)]
        return sum(p.cache.nbytes() for p in self._processors) + sum(
            t.numel() * t.element_size() for t in [*self._conv.values(), *norms]
        )


def stream_of(module: nn.Module) -> Stream:
    """The Stream attached to `module` (by `Stream.attach`)."""
    return getattr(module, STREAM_ATTR)


def state_of(module: nn.Module) -> StreamState | None:
    """The streaming call in progress for the model `module` belongs to (attached), or None."""
    stream = getattr(module, STREAM_ATTR, None)
    return None if stream is None else stream.context.stream


def _streaming_pad_time(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CausalConv's padding, or inside a streaming call the cached last (k−1)·d frames of the
    previous history (the padding itself on the first call of a window)."""
    stream: Stream = getattr(self, STREAM_ATTR)
    state = stream.context.stream
    padding = type(self)._pad_time
    if state is None:
        return padding(self, x)
    dim = 2 + self.time_axis
    buffer = state.conv.get(id(self))
    if buffer is None:
        if state.offset:
            raise CausalizeError("a causal conv has no cached frames for a streaming call after the first")
        padded = padding(self, x)
    else:
        padded = torch.cat([tile_history(buffer, x.shape[0], "conv cache").to(x.dtype), x], dim=dim)
    if state.mode == "write":
        # a copy, not a view: a view would keep the whole padded input alive until the next write
        state.conv[id(self)] = padded.narrow(dim, padded.shape[dim] - self.left_pad, self.left_pad).detach().clone()
    return padded


def _streaming_cumulative(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A cumulative causal norm continuing from the running statistics of the cached frames."""
    state = getattr(self, STREAM_ATTR).context.stream
    if state is None:
        return type(self)._cumulative(self, x)
    carry = state.norms.get(id(self))
    if carry is None and state.offset:
        raise CausalizeError("a cumulative norm has no cached statistics for a streaming call after the first")
    y, new = self.cumulative_with(x, carry, record=state.mode == "write")
    if state.mode == "write":
        new.frames = (carry.frames if carry is not None else []) + list(range(state.offset, state.offset + x.shape[2]))
        state.norms[id(self)] = new
    return y


def _offset_rope(module: nn.Module, args, kwargs, output):
    """Rotary embeddings for frames offset..offset+F−1: the module run on offset+F frames (a
    longer input of which it reads only the shape, or a larger frame-count argument), keeping the
    last F frames' tokens."""
    stream: Stream = getattr(module, STREAM_ATTR)
    state = stream.context.stream
    if state is None or state.offset == 0 or getattr(module, "_causalize_busy", False):
        return None
    spec: OffsetPositions = getattr(module, OFFSET_ATTR)
    args = list(args)
    if spec.frames_arg is None:
        shape = list(args[0].shape)
        shape[spec.frame_axis] += state.offset
        args[0] = args[0].new_empty(1).expand(shape)
    else:
        args[spec.frames_arg] = args[spec.frames_arg] + state.offset
    object.__setattr__(module, "_causalize_busy", True)
    try:
        longer = module(*args, **kwargs)
    except (RuntimeError, IndexError) as exc:
        raise UsageError(
            f"{type(module).__name__} cannot give positions for frame {state.offset} of the rollout "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}): its position table is shorter",
            "rolling caches count positions globally: roll out fewer frames, or use cache='exact' (positions per window)",
        ) from None
    finally:
        object.__setattr__(module, "_causalize_busy", False)

    def tail(full, short):
        n = short.shape[spec.token_axis]
        return full.narrow(spec.token_axis, full.shape[spec.token_axis] - n, n)

    if isinstance(output, tuple):
        return tuple(tail(f, s) for f, s in zip(longer, output))
    return tail(longer, output)


def _refuse_caller_positions(module: nn.Module, args, kwargs):
    """A root pre-hook: a streaming call must not carry positions its caller computed for a whole clip."""
    from causalize.context import bound_arguments

    if state_of(module) is None:
        return None
    given = bound_arguments(module, args, kwargs)
    passed = [n for n in getattr(module, CALLER_ATTR) if given.get(n) is not None]
    if passed:
        raise UsageError(
            f"{type(module).__name__} was passed {', '.join(passed)}: positions its caller computed for a whole "
            "clip, which a streaming call (one frame, at a global offset) cannot offset",
            "leave it out (the rollout builds none), or use full recomputation (cache=False)",
        )
    return None


def _offset_frame_index(module: nn.Module, args):
    state = getattr(module, STREAM_ATTR).context.stream
    if state is None or state.offset == 0:
        return None
    return (args[0] + state.offset, *args[1:])


def _shift_pe_table(module: nn.Module, args):
    state = getattr(module, STREAM_ATTR).context.stream
    if state is None or state.offset == 0:
        return None
    table = module.pe
    if state.offset + args[0].shape[1] > table.shape[1]:
        raise UsageError(
            f"{type(module).__name__} has {table.shape[1]} positions; the streaming window needs "
            f"{state.offset + args[0].shape[1]}",
            "rolling caches count positions globally: roll out fewer frames, or use cache='exact'",
        )
    object.__setattr__(module, "_causalize_pe", table)
    module._buffers["pe"] = table[:, state.offset :]
    return None


def _restore_pe_table(module: nn.Module, args, output):
    table = vars(module).pop("_causalize_pe", None)
    if table is not None:
        module._buffers["pe"] = table
    return None


__all__ = ["Stream", "StreamState", "state_of", "stream_of"]
