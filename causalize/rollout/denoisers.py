"""The three ways a rollout runs the model on [history window ; current frame(s)]: full
recomputation (the reference), exact streaming against per-layer caches, and rolling caches
(approximate, constant cost per frame). causalize.rollout.sampler drives them; see its docstring."""

from __future__ import annotations

from typing import Any

import torch

from causalize.errors import UsageError
from causalize.rollout.compiled import CompiledStep, step_key
from causalize.world_model import WorldModel


def frame_axis(wm: WorldModel) -> int:
    return wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]


class Denoiser:
    """Runs the model on [history window ; current frame] and returns the current frame's output."""

    def __init__(self, wm: WorldModel, model_kwargs: dict[str, Any] | None):
        self.wm = wm
        self.axis = frame_axis(wm)
        self.out_axis = wm.plan.layout.output_axis
        self._overrides = model_kwargs or {}
        self._kwargs: dict[tuple[int, int], dict[str, Any]] = {}
        self.frame_passes = 0
        self.model_calls = 0
        self.compiled: CompiledStep | None = None  # Streaming with a compile mode
        # an image-to-video model's condition: the clean first frame of the window (set by the
        # session before set_history / push; fixed while the window's start is)
        self.image: torch.Tensor | None = None

    @property
    def compiled_calls(self) -> int:
        """Model calls run through the compiled forward (see CompiledStep.calls)."""
        return 0 if self.compiled is None else self.compiled.calls

    def kwargs(self, batch: int, frames: int, like: torch.Tensor) -> dict[str, Any]:
        key = (batch, frames)
        if key not in self._kwargs:
            self._kwargs[key] = self.wm.unconditional_inputs(batch, frames, self._overrides)
        return self._kwargs[key]

    def call(self, sample, timesteps, actions, mask, run=None) -> torch.Tensor:
        """One model call (counted); `run(forward)` runs it instead of `forward()` (a compiled step)."""
        batch, frames = sample.shape[0], sample.shape[self.axis]
        self.model_calls += 1
        self.frame_passes += batch * frames
        kwargs = self.kwargs(batch, frames, sample)

        def forward() -> torch.Tensor:
            return self.wm(sample, timesteps, actions, mask, image=self.image, **kwargs)

        return forward() if run is None else run(forward)

    def set_history(
        self, frames: list[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor, start: int, level: int
    ) -> None:
        raise NotImplementedError

    def __call__(self, x, level, actions, mask) -> torch.Tensor:
        raise NotImplementedError


def branches(x, level, actions, mask, guided: bool, current: int = 1):
    """(sample, timesteps, actions, mask) of the current-frame part of a call, both branches when
    guided: [conditional ; unconditional with the newest actions dropped] (the `current` frames
    being generated: one, or a chunk)."""
    batch = x.shape[0]
    ts = torch.full((batch, current), level, dtype=torch.long, device=x.device)
    if not guided:
        return x, ts, actions, mask
    drop = mask.clone()
    drop[:, -current:] = False
    reps = [2] + [1] * (x.ndim - 1)
    return x.repeat(*reps), ts.repeat(2, 1), actions.repeat(2, *([1] * (actions.ndim - 1))), torch.cat([mask, drop])


class FullRecompute(Denoiser):
    """The reference strategy: every step runs the whole window."""

    def set_history(self, frames, actions, mask, start, level):
        self.history = torch.cat(frames, dim=self.axis) if frames else None  # fixed while a frame is generated
        self.actions, self.mask, self.level = actions, mask, level

    def __call__(self, x, level, action, guided):
        current = x.shape[self.axis]
        actions = torch.cat([self.actions, action], dim=1)
        ones = torch.ones(self.mask.shape[0], current, dtype=torch.bool, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        sample, ts, actions, mask = branches(x, level, actions, mask, guided, current)
        copies = sample.shape[0] // x.shape[0]
        if self.history is not None:
            n_hist = self.history.shape[self.axis]
            hist = self.history.repeat(copies, *([1] * (self.history.ndim - 1)))
            sample = torch.cat([hist, sample], dim=self.axis)
            hist_ts = torch.full((ts.shape[0], n_hist), self.level, dtype=torch.long, device=x.device)
            ts = torch.cat([hist_ts, ts], dim=1)
        out = self.call(sample, ts, actions, mask)
        return out.narrow(self.out_axis, out.shape[self.out_axis] - current, current)


class Streaming(Denoiser):
    """History through the model once per window (append-only while it grows), steps on the
    current frame alone against the caches."""

    def __init__(self, wm, model_kwargs, compile_mode: str | None = None):
        super().__init__(wm, model_kwargs)
        from causalize.rollout.streaming import Stream

        self.stream = Stream.of(wm.model, wm.plan)
        self.stream.reset()
        self.stream.owner = self  # the caches live on the model: one session at a time writes them
        self.span = (0, 0)  # global frame indices [start, end) held in the caches
        if compile_mode is not None:
            self.compiled = CompiledStep(wm.model, compile_mode, eager=self.stream.attention_modules())
        self._keyed = False  # has this frame's step key been given to the compiled step

    def set_history(self, frames, actions, mask, start, level):
        end = start + len(frames)
        if self.stream.owner is not self:  # another session on this model wrote the caches since
            self.stream.owner, self.span = self, (0, 0)  # exact mode rebuilds its window: same frames
        cached_start, cached_end = self.span
        if cached_start == start and cached_end <= end and cached_end > cached_start:
            first = cached_end - start  # append what is missing
        else:
            self.stream.reset()
            first = 0
        self.stream.anchor_timestep = level  # every window frame is at the history level
        if first < len(frames):
            new = torch.cat(frames[first:], dim=self.axis)
            ts = torch.full((new.shape[0], len(frames) - first), level, dtype=torch.long, device=new.device)
            with self.stream.write(len(frames) - first):
                self.call(new, ts, actions[:, first:], mask[:, first:])
        self.span = (start, end)
        self.level = level
        self._keyed = False

    def __call__(self, x, level, action, guided):
        current = x.shape[self.axis]
        mask = torch.ones(x.shape[0], current, dtype=torch.bool, device=x.device)
        sample, ts, actions, mask = branches(x, level, action, mask, guided, current)
        if self.compiled is not None and not self._keyed:
            self.compiled.start_frame(step_key(self.stream.cached_frames, sample, self.stream.anchor_timestep))
            self._keyed = True
        with self.stream.read():
            return self.call(sample, ts, actions, mask, run=None if self.compiled is None else self.compiled.run)


class Rolling(Streaming):
    """Every history frame pushed once, in order, when it joins the history; frames that left the
    window are dropped from the caches except the first `sink`. Approximate once the window slides."""

    def __init__(self, wm, model_kwargs, sink: int):
        super().__init__(wm, model_kwargs)
        self.sink = sink
        self.pushed = 0  # history frames pushed so far (global indices 0 .. pushed−1)

    def push(self, frames, actions, mask, level, window_start: int) -> None:
        """Push the history frames not yet pushed (all of `frames`, global indices from `pushed`),
        then drop frames sink .. window_start−1."""
        if self.stream.owner is not self:
            raise UsageError(
                "another rollout session on this model has used its streaming caches since this one started: "
                "rolling caches cannot be rebuilt",
                "give each session (or environment) its own model copy, or use cache='exact' / 'none'",
            )
        self.stream.anchor_timestep = level
        if frames:
            new = torch.cat(frames, dim=self.axis)
            ts = torch.full((new.shape[0], len(frames)), level, dtype=torch.long, device=new.device)
            with self.stream.write(len(frames), rolling=True):  # to be evicted: running sums record each frame
                self.call(new, ts, actions, mask)
            self.pushed += len(frames)
        if window_start > self.sink:
            self.stream.evict(self.sink, window_start)
        self.level = level


__all__ = ["Denoiser", "FullRecompute", "Rolling", "Streaming", "branches", "frame_axis"]
