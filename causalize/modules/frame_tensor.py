"""FrameTensor: a per-sample modulation tensor that carries one value per token frame.

Why: several DiTs (EasyAnimate, HunyuanVideo, Mochi, Allegro, Latte) compute their AdaLN
modulation from one timestep embedding per sample and broadcast it over the tokens in code that
causalize must not copy — inside the *block* forward (`gate.unsqueeze(1) * attn_output`,
`torch.tanh(gate).unsqueeze(1)`), or inline in the *model* forward
(`(scale_shift_table[None] + temb.reshape(B, 6, -1)).chunk(6, dim=1)`, then
`hidden_states * (1 + scale) + shift`). Replacing the per-sample tensor there by one with a token
axis would break those reshapes. A FrameTensor instead *looks* exactly like the per-sample tensor
(shape, dtype, device; its values are the model's own per-sample ones) and carries, hidden, the
per-frame values `frames` (R, F, *shape[1:]). Every operation on it is intercepted
(`__torch_function__`):

- per-sample operations (elementwise with scalars or per-sample tensors, `F.linear`, `reshape` /
  `view` / `unflatten` keeping the rows, `chunk` / `split` / `unbind`, `unsqueeze`, indexing with `:` / `None`,
  `to`, ...) are applied to the per-sample values and to every frame's values alike, and return a
  FrameTensor again;
- an elementwise operation with a *token sequence* (a tensor (R, L, ...) where the per-sample
  value has a broadcast axis 1, L = the layout's token count) is where the model broadcasts the
  modulation over tokens: it returns a plain tensor in which the video tokens of frame f use frame
  f's values and context (text) tokens the per-sample values — the model's own elementwise
  arithmetic, so with equal frames it gives the model's own result (up to the rounding of the
  batched matrix products that computed the values, ~1e-7);
- `expand` of a size-1 axis to the token count (Helios broadcasts its temb with
  `view(B, 1, -1).expand(B, N, -1)`): a plain tensor, frame f's values on frame f's video tokens;
- `repeat_interleave(r, dim=0)` (Latte repeats its per-sample modulation over frames for its
  spatial blocks, and over patch positions for its temporal blocks): r = the frame count gives
  plain rows (b, f) with frame f's values; r = the tokens per frame gives rows (b, p) whose token
  sequence is the F frames (a FrameTensor with one token per frame); r equal to both is ambiguous
  and refused;
- anything else raises a CausalizeError naming the operation: an unforeseen use fails loudly,
  never silently per sample.

Autograd flows through the per-sample and per-frame tensors it holds (the instance itself is a
detached view used only for its metadata).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import resolve_name

from causalize.errors import CausalizeError


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence a modulation meets: `prefix` context tokens, `frames` x `per_frame` video
    tokens (frame-major), `suffix` context tokens. Context tokens keep the per-sample values."""

    frames: int
    per_frame: int
    prefix: int = 0
    suffix: int = 0

    @property
    def video(self) -> int:
        return self.frames * self.per_frame

    @property
    def length(self) -> int:
        return self.prefix + self.video + self.suffix

    def describe(self) -> str:
        video = f"{self.frames} frames x {self.per_frame} tokens"
        return " + ".join(
            p
            for p in (
                f"{self.prefix} context" if self.prefix else "",
                video,
                f"{self.suffix} context" if self.suffix else "",
            )
            if p
        )


_METADATA = {
    "shape.__get__",
    "dtype.__get__",
    "device.__get__",
    "ndim.__get__",
    "requires_grad.__get__",
    "is_cuda.__get__",
    "layout.__get__",
    "is_meta.__get__",
    "dim",
    "size",
    "numel",
    "nelement",
    "is_floating_point",
    "is_complex",
    "element_size",
    "__len__",
    "get_device",
}
# operations that act elementwise on their tensor operands (broadcasting)
_ELEMENTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "true_divide",
    "__rsub__",
    "__rdiv__",
    "__rtruediv__",
    "__radd__",
    "__rmul__",
    "__add__",
    "__sub__",
    "__mul__",
    "__truediv__",
    "__div__",
    "subtract",
    "multiply",
    "neg",
    "__neg__",
    "negative",
    "tanh",
    "sigmoid",
    "exp",
    "abs",
    "square",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "nn.functional.silu",
    "nn.functional.gelu",
    "nn.functional.relu",
    "nn.functional.sigmoid",
    "nn.functional.tanh",
    "nn.functional.mish",
}
# unary operations whose extra arguments are not operands (dtypes, devices, reference tensors)
_UNARY = {"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach"}
_SPLITS = {"chunk", "split", "unbind", "tensor_split"}


def _name(func: Callable) -> str:
    name = resolve_name(func) or getattr(func, "__name__", repr(func))
    for prefix in ("torch.Tensor.", "torch."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


class FrameTensor(torch.Tensor):
    """Per-sample values (what the model's code sees) plus hidden per-frame values; see the module
    docstring. Build with `FrameTensor.wrap(sample, frames, layout)`."""

    _sample: torch.Tensor
    _frames: torch.Tensor
    _layout: TokenLayout

    @classmethod
    def wrap(cls, sample: torch.Tensor, frames: torch.Tensor, layout: TokenLayout) -> FrameTensor:
        """sample (R, *S); frames (R, F, *S) with F = layout.frames."""
        if sample.dim() < 1 or frames.shape != (sample.shape[0], layout.frames, *sample.shape[1:]):
            raise CausalizeError(
                f"FrameTensor: per-frame values {tuple(frames.shape)} do not match per-sample "
                f"{tuple(sample.shape)} with {layout.frames} frames"
            )
        with torch._C.DisableTorchFunctionSubclass():
            obj = sample.detach().as_subclass(cls)
        obj._sample, obj._frames, obj._layout = sample, frames, layout
        return obj

    @property
    def sample(self) -> torch.Tensor:
        """The per-sample values (the model's own)."""
        return self._sample

    @property
    def frames(self) -> torch.Tensor:
        """The per-frame values (R, F, *shape[1:])."""
        return self._frames

    @property
    def token_layout(self) -> TokenLayout:
        return self._layout

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return (
            f"FrameTensor(per-sample {tuple(self._sample.shape)}, {self._layout.frames} frames, "
            f"tokens: {self._layout.describe()})"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        with torch._C.DisableTorchFunctionSubclass():
            if name in _METADATA:
                return func(*_map(args, lambda t: t._sample), **_map(kwargs, lambda t: t._sample))
            if name == "__repr__":
                return args[0].__repr__()
            if name == "__format__":
                return format(args[0].__repr__(), *args[1:])
            if name in _ELEMENTWISE:
                return _elementwise(func, name, args, kwargs)
            if name in _UNARY or name == "nn.functional.linear":
                return _unary(func, name, args, kwargs)
            if name in _SPLITS:
                return _split(func, name, args, kwargs)
            if name in ("reshape", "view"):
                return _reshape(func, args, kwargs)
            if name == "unsqueeze":
                return _unsqueeze(func, args, kwargs)
            if name == "__getitem__":
                return _getitem(args[0], args[1])
            if name == "repeat_interleave":
                return _repeat_interleave(args, kwargs)
            if name == "unflatten":
                return _unflatten(func, args, kwargs)
            if name == "expand":
                return _expand(args, kwargs)
        raise CausalizeError(
            f"per-frame modulation: the model applied `{name}` to a FrameTensor, which causalize does not know how to "
            f"apply per frame",
            "this model's use of its timestep embedding is not supported by frame-conditioning (report it)",
        )


def _map(obj, fn):
    """Apply fn to every FrameTensor in a (nested) args / kwargs structure."""
    if isinstance(obj, FrameTensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _frame_tensors(args, kwargs) -> list[FrameTensor]:
    found: list[FrameTensor] = []
    _map((args, kwargs), lambda t: found.append(t) or t)
    return found


def _rewrap(sample: torch.Tensor, frames: torch.Tensor, layout: TokenLayout, name: str) -> FrameTensor:
    if frames.shape != (sample.shape[0], layout.frames, *sample.shape[1:]):
        raise CausalizeError(
            f"per-frame modulation: `{name}` gave per-sample {tuple(sample.shape)} but per-frame "
            f"{tuple(frames.shape)}; the operation does not act per sample"
        )
    return FrameTensor.wrap(sample, frames, layout)


def _same_layout(fts: list[FrameTensor], name: str) -> tuple[TokenLayout, int]:
    layout, ndim = fts[0]._layout, fts[0]._sample.dim()
    for t in fts[1:]:
        if t._layout != layout or t._sample.dim() != ndim or t._sample.shape[0] != fts[0]._sample.shape[0]:
            raise CausalizeError(f"per-frame modulation: `{name}` combines FrameTensors of different layouts")
    return layout, ndim


def _is_sequence(t: torch.Tensor, ft: FrameTensor, name: str) -> bool:
    """Is the plain tensor `t` a token sequence the modulation `ft` is broadcast over (axis 1)?

    Not a sequence: an nn.Parameter or a view of one (a modulation table, `scale_shift_table[None]`),
    an operand with one row when the modulation has several (shared by all samples), or one whose
    axis 1 has the modulation's size or 1 (per-sample arithmetic). A sequence: axis 1 of the
    layout's length (or empty) where the modulation has a broadcast axis 1. Anything else raises.
    """
    shape = ft._sample.shape
    if not torch.is_tensor(t) or t.dim() != len(shape) or len(shape) < 2:
        return False
    if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
        return False
    if t.shape[0] == 1 and shape[0] > 1:
        return False
    if shape[1] == 1 and t.shape[1] in (ft._layout.length, 0):
        return True
    if t.shape[1] in (1, shape[1]):
        return False
    raise CausalizeError(
        f"per-frame modulation: `{name}` broadcasts a timestep modulation over {t.shape[1]} tokens, the frame layout "
        f"has {ft._layout.length} ({ft._layout.describe()})",
        "the plan's frame-conditioning targets (context position) do not match this model's token sequence",
    )


def _align(t, ndim: int):
    """A per-sample operand aligned with per-frame values (R, F, ...): a new axis after the rows."""
    if torch.is_tensor(t) and not isinstance(t, FrameTensor):
        if t.dim() > ndim:
            raise CausalizeError(
                f"per-frame modulation: an operand of shape {tuple(t.shape)} has more axes than the "
                f"per-sample modulation ({ndim})"
            )
        if t.dim() == ndim:
            return t.unsqueeze(1)
    return t


def _elementwise(func, name, args, kwargs):
    fts = _frame_tensors(args, kwargs)
    layout, ndim = _same_layout(fts, name)
    tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and not isinstance(a, FrameTensor)]
    sequences = [t for t in tensors if _is_sequence(t, fts[0], name)]
    if not sequences:  # per-sample arithmetic: the same on the per-sample and on every frame's values
        sample = func(*_map(args, lambda t: t._sample), **_map(kwargs, lambda t: t._sample))

        def per_frame(a):
            return a._frames if isinstance(a, FrameTensor) else _align(a, ndim)

        frames = func(*[per_frame(a) for a in args], **{k: per_frame(v) for k, v in kwargs.items()})
        return _rewrap(sample, frames, layout, name)
    return _materialise(func, args, kwargs, {id(t) for t in sequences}, layout, ndim)


def _materialise(func, args, kwargs, seq_ids: set[int], layout: TokenLayout, ndim: int) -> torch.Tensor:
    """The elementwise op against token sequences: video tokens per frame, context tokens per sample."""
    length = next(a for a in (*args, *kwargs.values()) if id(a) in seq_ids).shape[1]
    if length == 0:  # no tokens: nothing is modulated
        return func(*_map(args, lambda t: t._sample), **_map(kwargs, lambda t: t._sample))

    def run(piece: Callable[[Any], Any]):
        return func(*[piece(a) for a in args], **{k: piece(v) for k, v in kwargs.items()})

    def context(lo: int, hi: int):
        return lambda a: a[:, lo:hi] if id(a) in seq_ids else (a._sample if isinstance(a, FrameTensor) else a)

    def video(a):
        if id(a) in seq_ids:
            return a[:, layout.prefix : layout.prefix + layout.video].unflatten(1, (layout.frames, layout.per_frame))
        if isinstance(a, FrameTensor):
            return a._frames  # (R, F, 1, ...): broadcast over the frame's tokens
        return _align(a, ndim)

    parts = []
    if layout.prefix:
        parts.append(run(context(0, layout.prefix)))
    parts.append(run(video).flatten(1, 2))
    if layout.suffix:
        parts.append(run(context(layout.prefix + layout.video, layout.length)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _unary(func, name, args, kwargs):
    ft = args[0]
    if not isinstance(ft, FrameTensor) or len(_frame_tensors(args, kwargs)) != 1:
        raise CausalizeError(f"per-frame modulation: `{name}` takes a FrameTensor in an unsupported position")
    sample = func(ft._sample, *args[1:], **kwargs)
    frames = func(ft._frames, *args[1:], **kwargs)
    return _rewrap(sample, frames, ft._layout, name)


def _dim_arg(args, kwargs, pos: int) -> int:
    return kwargs.get("dim", args[pos] if len(args) > pos else 0)


def _row_preserving_dim(dim: int, ndim: int, name: str) -> int:
    d = dim + ndim if dim < 0 else dim
    if d < 1 or d >= ndim:
        raise CausalizeError(
            f"per-frame modulation: `{name}` over axis {dim} would mix the rows (samples) of a "
            f"per-sample modulation of {ndim} axes"
        )
    return d


def _split(func, name, args, kwargs):
    ft = args[0]
    ndim = ft._sample.dim()
    pos = 1 if name == "unbind" else 2
    d = _row_preserving_dim(_dim_arg(args, kwargs, pos), ndim, name)
    rest = list(args[1:])
    kw = {k: v for k, v in kwargs.items() if k != "dim"}
    if name == "unbind":
        samples, frames = func(ft._sample, d), func(ft._frames, d + 1)
    else:
        size = rest[0] if rest else kw.pop("chunks", kw.pop("split_size_or_sections", kw.pop("split_size", None)))
        samples, frames = func(ft._sample, size, d, **kw), func(ft._frames, size, d + 1, **kw)
    return tuple(_rewrap(s, f, ft._layout, name) for s, f in zip(samples, frames))


def _reshape(func, args, kwargs):
    ft, shape = args[0], args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    shape = tuple(kwargs.get("shape", shape))
    sample = func(ft._sample, shape)
    rows = ft._sample.shape[0]
    if sample.dim() < 1 or sample.shape[0] != rows:
        raise CausalizeError(
            f"per-frame modulation: reshaping a per-sample modulation {tuple(ft._sample.shape)} to "
            f"{tuple(sample.shape)} changes its rows (samples)"
        )
    frames = ft._frames.reshape(rows, ft._layout.frames, *sample.shape[1:])
    return _rewrap(sample, frames, ft._layout, "reshape")


def _unsqueeze(func, args, kwargs):
    ft = args[0]
    d = _row_preserving_dim(_dim_arg(args, kwargs, 1), ft._sample.dim() + 1, "unsqueeze")
    return _rewrap(func(ft._sample, d), func(ft._frames, d + 1), ft._layout, "unsqueeze")


def _getitem(ft: FrameTensor, index):
    index = index if isinstance(index, tuple) else (index,)
    first = index[0] if index else slice(None)
    if not (isinstance(first, slice) and first == slice(None)) or any(
        torch.is_tensor(i) or isinstance(i, (list, bool)) for i in index
    ):
        raise CausalizeError(
            f"per-frame modulation: indexing a per-sample modulation with {index!r} is not supported "
            f"(only `[:, ...]` with None, slices and integers after the rows)"
        )
    sample = ft._sample[index]
    frames = ft._frames[(slice(None), slice(None), *index[1:])]
    return _rewrap(sample, frames, ft._layout, "__getitem__")


def _repeat_interleave(args, kwargs):
    ft = args[0]
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    layout, rows = ft._layout, ft._sample.shape[0]
    if not isinstance(repeats, int) or dim not in (0, -ft._sample.dim()) or layout.prefix or layout.suffix:
        raise CausalizeError(
            f"per-frame modulation: repeat_interleave({repeats!r}, dim={dim!r}) of a per-sample "
            "modulation is only supported as an integer repeat of its rows"
        )
    if repeats == layout.frames and repeats == layout.per_frame:
        raise CausalizeError(
            f"per-frame modulation: repeating a per-sample modulation {repeats} times is ambiguous when a video has as "
            f"many frames as tokens per frame ({repeats}): frame rows or token-position rows",
            "use a frame count or resolution with frames != tokens per frame",
        )
    if repeats == layout.frames:  # rows (b, f): frame f's values
        return ft._frames.reshape(rows * layout.frames, *ft._sample.shape[1:])
    if repeats == layout.per_frame:  # rows (b, p): the token sequence of each row is the F frames
        sample = ft._sample.repeat_interleave(repeats, dim=0)
        frames = ft._frames.repeat_interleave(repeats, dim=0)
        return _rewrap(sample, frames, TokenLayout(layout.frames, 1), "repeat_interleave")
    raise CausalizeError(
        f"per-frame modulation: repeat_interleave({repeats}) of a per-sample modulation is neither "
        f"over the {layout.frames} frames nor over the {layout.per_frame} tokens of a frame"
    )


def _unflatten(func, args, kwargs):
    """`unflatten(dim, sizes)` of an axis after the rows (Wan: `timestep_proj.unflatten(1, (6, -1))`)."""
    ft = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    sizes = kwargs.get("sizes", args[2] if len(args) > 2 else None)
    d = _row_preserving_dim(dim, ft._sample.dim(), "unflatten")
    return _rewrap(func(ft._sample, d, sizes), func(ft._frames, d + 1, sizes), ft._layout, "unflatten")


def _expand(args, kwargs):
    """`expand(*sizes)`. Growing one size-1 axis after the rows to the layout's token count is where
    the model broadcasts the modulation over the tokens itself (Helios:
    `temb.view(B, 1, -1).expand(B, N, -1)`): a plain tensor, video tokens per frame, context tokens
    per sample. Growing no axis keeps a FrameTensor; anything else raises."""
    ft, layout = args[0], args[0]._layout
    sizes = kwargs.get("size", args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = sizes[0]
    sizes = tuple(int(s) for s in sizes)
    old = ft._sample.shape
    sample = ft._sample.expand(*sizes)
    if sample.dim() != len(old) or sample.shape[0] != old[0]:
        raise CausalizeError(
            f"per-frame modulation: expanding a per-sample modulation {tuple(old)} to {tuple(sample.shape)} changes its "
            "rows (samples) or axes"
        )
    grown = [d for d in range(1, len(old)) if old[d] == 1 and sample.shape[d] != 1]
    if not grown:
        return _rewrap(sample, ft._frames.expand(old[0], layout.frames, *sample.shape[1:]), layout, "expand")
    if len(grown) > 1 or sample.shape[grown[0]] != layout.length:
        raise CausalizeError(
            f"per-frame modulation: expanding a per-sample modulation {tuple(old)} to {tuple(sample.shape)} is not a "
            f"broadcast over the {layout.length} tokens of the frame layout ({layout.describe()})"
        )
    d = grown[0]

    def part(values: torch.Tensor, length: int) -> torch.Tensor:
        return values.expand(*sample.shape[:d], length, *sample.shape[d + 1 :])

    video = ft._frames.squeeze(d + 1).movedim(1, d).repeat_interleave(layout.per_frame, dim=d)
    parts = [part(ft._sample, layout.prefix)] if layout.prefix else []
    parts.append(part(video, layout.video))
    if layout.suffix:
        parts.append(part(ft._sample, layout.suffix))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)


__all__ = ["FrameTensor", "TokenLayout"]
