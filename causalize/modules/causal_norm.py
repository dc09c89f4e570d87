"""Causal GroupNorm for (B, C, T, *spatial) tensors (METHOD.md §5).

Stock GroupNorm on a 5-D clip pools its statistics over all frames, so every output frame
depends on future input frames. ``CausalGroupNorm`` keeps the affine parameters and replaces the
statistics by either

- ``per-frame``: each frame's own (C/G, spatial) statistics, exactly the stock op applied to
  the (B·T, C, *spatial) reshape; or
- ``cumulative``: the statistics of all frames <= t, from per-frame means and M2 merged with
  Chan's parallel formula along a prefix scan (no S2/N - μ² cancellation).

Inputs with fewer than 5 dims (e.g. (B·T, C, H, W)) are already frame-local and go to the
stock op.
"""

from __future__ import annotations

import torch
from torch import nn

from causalize.layout import tile_history

from .swap import causal_subclass, rebuild_as

__all__ = ["MODES", "CausalGroupNorm"]

MODES: tuple[str, ...] = ("per-frame", "cumulative")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown causal norm mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


def _check_time_dim(time_dim: int) -> int:
    if isinstance(time_dim, bool) or not isinstance(time_dim, int):
        raise TypeError(f"time_dim must be an int, got {time_dim!r}")
    if 0 <= time_dim < 2:
        raise ValueError(f"time_dim={time_dim} would be the batch or channel dim; use >= 2 or < 0")
    return time_dim


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics for frame t use only frames <= t."""

    mode: str
    time_dim: int

    def __init__(self, *args: object, mode: str = "per-frame", time_dim: int = 2, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.mode, self.time_dim = _check_mode(mode), _check_time_dim(time_dim)

    @classmethod
    def from_module(cls, gn: nn.GroupNorm, mode: str = "per-frame", time_dim: int = 2) -> nn.GroupNorm:
        """Causal copy of ``gn`` keeping weight/bias names, device, dtype, requires_grad, eps,
        affine and hooks; an instance of ``type(gn)`` too when that is a GroupNorm subclass."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"CausalGroupNorm.from_module expects an nn.GroupNorm, got {type(gn).__name__}")
        if isinstance(gn, CausalGroupNorm):
            raise ValueError(f"{type(gn).__name__} is already causal")
        mode, time_dim = _check_mode(mode), _check_time_dim(time_dim)
        with torch.no_grad():
            params = {name: None if t is None else t.detach().clone() for name, t in gn._parameters.items()}
        new = rebuild_as(gn, causal_subclass(cls, nn.GroupNorm, type(gn)), params)
        new.mode, new.time_dim = mode, time_dim
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if input.ndim < 5:
            return super().forward(input)
        x = input.movedim(self.time_dim, 2)  # (B, C, T, *spatial)
        if self.mode == "per-frame":
            y = self._per_frame(x)
        else:
            y = self._cumulative(x)
        return y.movedim(2, self.time_dim)

    def _per_frame(self, x: torch.Tensor) -> torch.Tensor:
        """The stock op on (B·T, C, *spatial): each frame normalised by its own statistics."""
        b, c, t = x.shape[:3]
        frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])
        y = super().forward(frames)
        return y.reshape(b, t, c, *x.shape[3:]).transpose(1, 2)

    def _cumulative(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise frame t by the mean and biased variance of frames 0..t of its group.

        The data are first shifted by one value of frame 0 per group (causal, and exact for
        data near it), so a large common offset does not eat the precision of the statistics.
        """
        return self.cumulative_with(x, None)[0]

    def cumulative_with(
        self, x: torch.Tensor, carry: NormCarry | None, record: bool = True
    ) -> tuple[torch.Tensor, NormCarry]:
        """`_cumulative` continuing from the statistics `carry` of earlier frames (streaming:
        frames arrive over several calls); returns the output and the carry after these frames
        (with every frame's own statistics when `record`: a carry to keep, not a read's)."""
        b, c, t = x.shape[:3]
        acc = _accumulation_dtype(x.dtype)
        groups = x.to(acc).reshape(b, self.num_groups, c // self.num_groups, t, -1)
        shift = groups[:, :, :1, :1, :1] if carry is None else tile_history(carry.shift, b).to(acc)
        groups = groups - shift
        mean, var, carry = _prefix_statistics(groups, carry, record)
        carry.shift = shift
        rstd = torch.rsqrt(var + self.eps)
        y = ((groups - mean[:, :, None, :, None]) * rstd[:, :, None, :, None]).reshape(x.shape)
        shape = (1, c) + (1,) * (x.ndim - 2)
        if self.weight is not None:
            y = y * self.weight.to(acc).reshape(shape)
        if self.bias is not None:  # GroupNorm(bias=False) has a weight but no bias
            y = y + self.bias.to(acc).reshape(shape)
        return y.to(x.dtype), carry

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, time_dim={self.time_dim}"


class NormCarry:
    """Running statistics of a cumulative norm after `count` frames (per sample and group): the
    frame-0 shift, Σ of per-frame means, Σ of per-frame variances plus Chan terms, and each frame's
    own mean and variance, (B, G, count), so that `drop` can rebuild the sums without some frames
    (a rolling cache). `frames`: the frames' global ids, kept by the streaming cache."""

    def __init__(self, shift, mean_sum, var_sum, count: int, frame_means, frame_vars):
        self.shift, self.mean_sum, self.var_sum, self.count = shift, mean_sum, var_sum, count
        self.frame_means, self.frame_vars = frame_means, frame_vars
        self.frames: list[int] = []

    def drop(self, first: int, stop: int) -> NormCarry:
        """These statistics without the frames whose id is in first .. stop−1: the kept frames'
        own means and variances merged again (equal sizes, so the variance of the union is the mean
        of their variances plus the variance of their means)."""
        kept = [i for i, f in enumerate(self.frames) if not first <= f < stop]
        if len(kept) == len(self.frames):
            return self
        index = torch.tensor(kept, dtype=torch.long, device=self.frame_means.device)
        means, variances = self.frame_means.index_select(-1, index), self.frame_vars.index_select(-1, index)
        mean_sum = means.sum(-1, keepdim=True)
        spread = (means - mean_sum / max(len(kept), 1)).square().sum(-1, keepdim=True)
        out = NormCarry(self.shift, mean_sum, variances.sum(-1, keepdim=True) + spread, len(kept), means, variances)
        out.frames = [self.frames[i] for i in kept]
        return out


def _prefix_statistics(
    groups: torch.Tensor, carry: NormCarry | None = None, record: bool = True
) -> tuple[torch.Tensor, torch.Tensor, NormCarry]:
    """Mean and biased variance over frames <= t of ``groups`` (B, G, C/G, T, S): each (B, G, T).

    Per frame: two-pass mean and variance (var_f = M2_f / n). Chan's merge of the prefix
    (t·n values, mean_{t-1}) with frame t (n values, mean μ_t) adds M2_f(t) + n·δ_t²·t/(t+1),
    δ_t = μ_t - mean_{t-1}. Every term is >= 0, so summing them with ``cumsum`` cannot cancel
    the way S2/N - μ² does. `carry` continues the sums of frames seen in earlier calls.
    """
    var_f, mean_f = torch.var_mean(groups, dim=(2, 4), correction=0)
    b = groups.shape[0]
    start = 0 if carry is None else carry.count
    mean_before = 0.0 if carry is None else tile_history(carry.mean_sum, b)
    var_before = 0.0 if carry is None else tile_history(carry.var_sum, b)
    count = torch.arange(start + 1, start + groups.shape[3] + 1, dtype=groups.dtype, device=groups.device)
    mean_sums = mean_before + torch.cumsum(mean_f, dim=-1)
    mean = mean_sums / count
    first_previous = mean[..., :1] * 0 if start == 0 else mean_before / start
    previous = torch.cat([first_previous, mean[..., :-1]], dim=-1)
    between = (mean_f - previous).square() * (count - 1) / count  # Chan term / n; 0 at t = 0
    var_sums = var_before + torch.cumsum(var_f + between, dim=-1)
    var = var_sums / count
    if carry is not None and record:  # each frame's own statistics too, for NormCarry.drop
        mean_f = torch.cat([tile_history(carry.frame_means, b), mean_f], dim=-1)
        var_f = torch.cat([tile_history(carry.frame_vars, b), var_f], dim=-1)
    return mean, var, NormCarry(None, mean_sums[..., -1:], var_sums[..., -1:], start + groups.shape[3], mean_f, var_f)
