"""Causal temporal convolutions that keep the stock parameter names (METHOD.md §4).

A symmetric "same" temporal conv (kernel k = 2m+1, dilation d, padding d·m, stride 1) is made
causal by setting its temporal padding to 0 and padding the time axis on the left by 2m·d in
``forward``. The output length is unchanged, output frame t reads only input frames <= t, and
``weight``/``bias`` keep their names and shapes, so stock state dicts load unchanged. The kernel
is remapped by one of the weight transfers of :mod:`causalize.modules.weight_transfer`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .swap import causal_subclass, rebuild_as
from .weight_transfer import TRANSFERS, transfer_kernel

__all__ = [
    "CausalConv1d",
    "CausalConv2d",
    "CausalConv3d",
    "is_temporal_conv",
    "make_causal_conv",
    "temporal_conv_problem",
    "transferred_parameters",
]

_CAUSAL_PADDING_MODES = ("zeros", "replicate")


# --------------------------------------------------------------------------- inspection


def _num_spatial(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def _check_time_axis(conv: nn.Module, time_axis: int) -> str | None:
    if isinstance(time_axis, bool) or not isinstance(time_axis, int):
        return f"time_axis must be an int, got {time_axis!r}"
    if not 0 <= time_axis < _num_spatial(conv):
        return (
            f"time_axis={time_axis} is out of range for a conv with {_num_spatial(conv)} "
            f"spatial axes (0 = the first axis after channels)"
        )
    return None


def is_temporal_conv(conv: nn.Module, time_axis: int = 0) -> bool:
    """True for a conv whose kernel along the time axis mixes frames (size > 1)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or _check_time_axis(conv, time_axis):
        return False
    return conv.kernel_size[time_axis] > 1


def _temporal_padding(conv: nn.Module, time_axis: int) -> int | None:
    """Temporal padding of one side, or None when it is asymmetric (even 'same')."""
    k, d = conv.kernel_size[time_axis], conv.dilation[time_axis]
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return None if d * (k - 1) % 2 else d * (k - 1) // 2
    return conv.padding[time_axis]


def _same_spatial_problem(conv: nn.Module, time_axis: int) -> str | None:
    if conv.padding != "same":
        return None
    for axis, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
        if axis != time_axis and d * (k - 1) % 2:
            return (
                f"padding='same' is asymmetric along spatial axis {axis} (kernel {k}, "
                f"dilation {d}); it cannot be written as explicit padding"
            )
    return None


def _symmetric_problem(conv: nn.Module, time_axis: int) -> str | None:
    """Why ``conv`` is not a symmetric "same" conv over time that left padding makes causal."""
    k, d = conv.kernel_size[time_axis], conv.dilation[time_axis]
    m = (k - 1) // 2
    if k % 2 == 0:
        return f"temporal kernel size {k} is even; a symmetric 'same' kernel has k = 2m+1"
    if conv.stride[time_axis] != 1:
        return (
            f"temporal stride is {conv.stride[time_axis]}, not 1: the conv groups frames instead of sliding over them"
        )
    padding = _temporal_padding(conv, time_axis)
    if padding != d * m:
        return (
            f"temporal padding is {conv.padding if isinstance(conv.padding, str) else padding}, "
            f"not dilation·m = {d}·{m} = {d * m}: not a symmetric 'same' conv over time"
        )
    if m > 0 and conv.padding_mode not in _CAUSAL_PADDING_MODES:
        return (
            f"padding_mode {conv.padding_mode!r} pads the clip start with future frames "
            f"(reflect mirrors frames 1..2m·d, circular wraps the clip end); causal modes: "
            f"{', '.join(_CAUSAL_PADDING_MODES)}"
        )
    return _same_spatial_problem(conv, time_axis)


def temporal_conv_problem(conv: nn.Module, time_axis: int = 0) -> str | None:
    """None if ``conv`` can be made causal along ``time_axis``, else the reason.

    A conv with temporal kernel 1 and no temporal padding is frame-local; it converts trivially.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{type(conv).__name__} is not an nn.Conv1d/Conv2d/Conv3d"
    if isinstance(conv, _CausalConvMixin):
        return f"{type(conv).__name__} is already causal"
    if torch.nn.utils.parametrize.is_parametrized(conv):
        return "parametrized convs (torch.nn.utils.parametrize) are not supported"
    return _check_time_axis(conv, time_axis) or _symmetric_problem(conv, time_axis)


# --------------------------------------------------------------------------- modules


class _CausalConvMixin:
    """Left-pads the time axis in ``forward``; everything else is the original conv's."""

    time_axis: int
    transfer: str | None
    p: int
    left_pad: int
    _conv_base: type[nn.modules.conv._ConvNd]

    def __init__(
        self,
        *args: Any,
        time_axis: int = 0,
        transfer: str | None = None,
        p: int = 2,
        **kwargs: Any,
    ) -> None:
        """Build directly with the conv's own arguments, e.g. ``CausalConv3d(c, c, (3, 1, 1),
        padding=(1, 0, 0))``: the declared padding must be symmetric "same"; the freshly
        initialised weights are used as they are (``transfer`` is only recorded)."""
        super().__init__(*args, **kwargs)
        problem = _check_time_axis(self, time_axis) or _symmetric_problem(self, time_axis)
        if problem:
            raise ValueError(f"cannot build a causal {type(self).__name__}: {problem}")
        self._make_causal(time_axis, transfer, p)

    @classmethod
    def from_module(
        cls,
        conv: nn.modules.conv._ConvNd,
        *,
        time_axis: int = 0,
        transfer: str | None = "extrapolative",
        p: int = 2,
    ) -> nn.modules.conv._ConvNd:
        """Causal copy of ``conv`` (device, dtype, requires_grad, training flag and hooks kept).

        ``transfer`` remaps the kernel (see ``TRANSFERS``); ``None`` keeps the weights
        bit-identical, for re-loading weights that were already converted.
        """
        base = cls._conv_base
        if not isinstance(conv, base):
            raise TypeError(f"{cls.__name__}.from_module expects an nn.{base.__name__}, got {type(conv).__name__}")
        if transfer is not None and transfer not in TRANSFERS:
            raise ValueError(f"unknown weight transfer {transfer!r}; valid: {', '.join(TRANSFERS)} or None")
        problem = temporal_conv_problem(conv, time_axis)
        if problem:
            raise ValueError(f"cannot make {type(conv).__name__} causal along time_axis={time_axis}: {problem}")
        with torch.no_grad():
            weight = conv.weight.detach()
            weight = weight.clone() if transfer is None else transfer_kernel(weight, 2 + time_axis, transfer, p)
            bias = None if conv.bias is None else conv.bias.detach().clone()
        new = rebuild_as(conv, causal_subclass(cls, base, type(conv)), {"weight": weight, "bias": bias})
        new._make_causal(time_axis, transfer, p)
        return new

    def _make_causal(self, time_axis: int, transfer: str | None, p: int) -> None:
        """Move the temporal padding from both sides to the left; keep the spatial padding."""
        k, d = self.kernel_size[time_axis], self.dilation[time_axis]
        padding = [_explicit_padding(self, axis) for axis in range(_num_spatial(self))]
        padding[time_axis] = 0
        self.padding = tuple(padding)
        self._reversed_padding_repeated_twice = [q for q in reversed(padding) for _ in range(2)]
        self.time_axis, self.transfer, self.p = time_axis, transfer, int(p)
        self.left_pad = d * (k - 1)

    def _pad_time(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend ``left_pad`` frames (zeros, or frame 0 for 'replicate'); a streaming cache
        overrides this to prepend the cached frames of the previous call instead."""
        if self.left_pad == 0:
            return x
        nspatial = _num_spatial(self)
        pad = [0] * (2 * nspatial)
        pad[2 * (nspatial - 1 - self.time_axis)] = self.left_pad  # F.pad lists the last dim first
        if self.padding_mode == "replicate":
            return F.pad(x, pad, mode="replicate")
        return F.pad(x, pad)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: A002
        return super().forward(self._pad_time(input), *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, time_axis={self.time_axis}, transfer={self.transfer!r}, "
            f"p={self.p}, left_pad={self.left_pad}"
        )


def _explicit_padding(conv: nn.modules.conv._ConvNd, axis: int) -> int:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return conv.dilation[axis] * (conv.kernel_size[axis] - 1) // 2
    return conv.padding[axis]


class CausalConv1d(_CausalConvMixin, nn.Conv1d):
    """``nn.Conv1d`` over (B, C, T), causal along T."""

    _conv_base = nn.Conv1d


class CausalConv2d(_CausalConvMixin, nn.Conv2d):
    """``nn.Conv2d`` causal along one axis, e.g. ``Conv2d((3, 1))`` over (B, C, T, H·W)."""

    _conv_base = nn.Conv2d


class CausalConv3d(_CausalConvMixin, nn.Conv3d):
    """``nn.Conv3d`` causal along one axis, by default T of (B, C, T, H, W)."""

    _conv_base = nn.Conv3d


_BY_BASE: tuple[tuple[type, type], ...] = (
    (nn.Conv3d, CausalConv3d),
    (nn.Conv2d, CausalConv2d),
    (nn.Conv1d, CausalConv1d),
)


def make_causal_conv(
    conv: nn.modules.conv._ConvNd,
    *,
    time_axis: int = 0,
    transfer: str | None = "extrapolative",
    p: int = 2,
) -> nn.modules.conv._ConvNd:
    """Dispatch to ``CausalConv{1,2,3}d.from_module`` by the conv's dimensionality."""
    for base, causal in _BY_BASE:
        if isinstance(conv, base):
            return causal.from_module(conv, time_axis=time_axis, transfer=transfer, p=p)
    raise TypeError(f"expected an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}")


def transferred_parameters(conv: nn.Module) -> tuple[str, ...]:
    """Names of the parameters whose stock values the weight transfer overwrote: the kernel,
    unless the transfer is the identity (shift, None, or a temporal kernel of size 1). Decided
    from the transfer, not the data, so it also holds for a structure built on meta tensors."""
    if conv.transfer in (None, "shift") or conv.kernel_size[conv.time_axis] == 1:
        return ()
    return ("weight",)


def is_causal_conv(module: nn.Module) -> bool:
    """True for a convolution this module already made causal."""
    return isinstance(module, (CausalConv1d, CausalConv2d, CausalConv3d))
