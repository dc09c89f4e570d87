"""Autoregressive rollout: context frames and actions in, one generated frame per action out
(METHOD.md §8–§10).

    result = causalize.rollout.rollout(wm, context, actions, config=RolloutConfig(steps=50))

`context` holds c frames in the model's native layout (its frame axis as in the plan), already in
model space (normalised pixels or latents); `actions[:, i]` is the action taken after the last
known frame that produces generated frame i (discrete: (B, n) indices, continuous: (B, n, A)).
Every generated frame is denoised from pure noise over S levels while the history — the last
L − 1 frames of the window, noised once to the history level k_h with fixed noise — stays put.

Two strategies compute the same frames:
- exact streaming (`cache="exact"`, also True, the default): the history window is pushed
  through the model once (appended frame by frame while the window grows, re-prefilled when it
  slides), then every denoising step runs on the current frame alone against per-layer caches
  (causalize.rollout.streaming);
- full recomputation (`cache="none"`, also False, the reference strategy): every step runs the
  whole window.

A third one is approximate, for long interactive rollouts at a constant cost per frame:
- rolling (`cache="rolling"`, `sink=N`): every frame is pushed once, when it joins the history,
  and cache entries of frames that left the window are dropped, except the first `sink` frames;
  positions keep counting globally. The kept keys were computed under older windows, so frames
  differ from the exact ones once the window has slid (before that they are equal). Per frame:
  1 push + S single-frame steps (× 2 branches with guidance), whatever the rollout length; cache
  memory is bounded by sink + window frames.

Causal action guidance batches two branches in one forward: the conditional one, and the
unconditional one in which only the newest action is dropped (the null action); history
activations are identical in both, so in streaming mode they share one cache.

`compile="default"` (or another torch.compile mode) runs the static current-frame steps of exact
streaming (those of a full window) through a compiled forward (causalize.rollout.compiled).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from causalize.errors import UsageError
from causalize.noise import NoiseSchedule, gaussian
from causalize.rollout import schedule as sched
from causalize.rollout.compiled import COMPILE_MODES
from causalize.rollout.denoisers import Denoiser, FullRecompute, Rolling, Streaming, frame_axis
from causalize.world_model import WorldModel

ProgressFn = Callable[[int, int, float], None]
CACHE_MODES = ("exact", "rolling", "none")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class RolloutConfig:
    """Sampler settings. Defaults follow METHOD.md §9: DDIM, 50 trailing steps, s = 2.5, φ = 0.7,
    history at the second-to-last level, v-prediction on the zero-terminal-SNR schedule (the
    trainer's defaults; a trained checkpoint's training.json overrides the last two)."""

    steps: int = 50
    sampler: Literal["ddim", "euler"] = "ddim"
    spacing: Literal["trailing", "uniform"] = "trailing"
    eta: float = 0.0
    history_noise: int | str = "second_to_last"
    window: int = 16
    guidance_scale: float = 2.5
    guidance_rescale: float = 0.7
    #: "exact" (or True), "rolling" (approximate, constant cost per frame) or "none" (or False)
    cache: bool | str = True
    #: rolling mode: the first `sink` frames stay in the caches for the whole rollout
    sink: int = 0
    #: frames generated together (denoised jointly, causal among themselves); a multiple of the
    #: plan's temporal block (CogVideoX 1.5: 2)
    chunk: int = 1
    #: a torch.compile mode for the current-frame steps of a full window (exact caches only;
    #: causalize.rollout.compiled), or None: eager
    compile: str | None = None
    prediction_type: str = "v"
    zero_terminal_snr: bool = True
    seed: int = 0

    @property
    def cache_mode(self) -> str:
        """ "exact", "rolling" or "none" (True and False are "exact" and "none")."""
        if isinstance(self.cache, bool):
            return "exact" if self.cache else "none"
        return self.cache

    def validate(self) -> None:
        if not isinstance(self.cache, bool) and self.cache not in CACHE_MODES:
            raise UsageError(f"unknown cache mode {self.cache!r}", "use exact, rolling or none (CLI: --cache)")
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise UsageError(f"sink must be a non-negative integer, got {self.sink!r}")
        if self.sink and self.cache_mode != "rolling":
            raise UsageError(f"sink={self.sink} applies to cache='rolling' only", "add --cache rolling, or drop --sink")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise UsageError(f"steps must be an integer >= 1, got {self.steps!r}", "50 is the default")
        sched.history_level([0], self.history_noise)  # a level >= 0 or "second_to_last"; the top is the schedule's
        if self.sampler not in sched.SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}", f"use one of {', '.join(sched.SAMPLERS)}")
        if self.spacing not in sched.SPACINGS:
            raise UsageError(f"unknown spacing {self.spacing!r}", f"use one of {', '.join(sched.SPACINGS)}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise UsageError(
                f"window must be an integer >= 2 (history frames + the current one), got {self.window!r}",
                "e.g. 16 (the default), or the training window",
            )
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise UsageError(f"eta must lie in [0, 1], got {self.eta!r}", "0: deterministic DDIM steps; 1: ancestral")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise UsageError(
                f"guidance_scale must be a finite number, got {self.guidance_scale!r}",
                "1 disables guidance; 2.5 is the default",
            )
        if not (isinstance(self.guidance_rescale, (int, float)) and 0.0 <= self.guidance_rescale <= 1.0):
            raise UsageError(
                f"guidance_rescale must lie in [0, 1], got {self.guidance_rescale!r}", "0.7 is the default"
            )
        if self.prediction_type not in ("v", "v_prediction", "epsilon", "sample"):
            raise UsageError(f"unknown prediction_type {self.prediction_type!r}", "use v, epsilon or sample")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise UsageError(f"unknown compile mode {self.compile!r}", f"use one of {', '.join(COMPILE_MODES)}")
        if self.compile is not None and self.cache_mode != "exact":
            raise UsageError(
                f"compile={self.compile!r} needs cache='exact': with cache={self.cache_mode!r} no step repeats "
                "the previous frame's shapes and positions",
                "drop --compile, or use --cache exact",
            )
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise UsageError(f"chunk must be a positive integer, got {self.chunk!r}")
        if isinstance(self.window, int) and self.chunk >= self.window:
            raise UsageError(
                f"chunk={self.chunk} does not fit the window ({self.window}) with any history",
                "use a chunk smaller than the window",
            )
        if isinstance(self.window, int) and self.sink >= self.window:
            raise UsageError(
                f"sink={self.sink} must be smaller than the window ({self.window})",
                "the sink frames are kept besides the window's recent ones: e.g. --sink 1 to 4",
            )
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise UsageError(f"steps must be a positive integer, got {self.steps!r}", "e.g. 50 (the default) or 20")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            # torch.Generator.manual_seed takes at most 64 bits; a negative seed would wrap silently
            raise UsageError(
                f"seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}", "e.g. seed=0 (CLI: --seed 0)"
            )

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RolloutResult:
    """Generated frames (native layout, n frames on the frame axis) and what it took."""

    frames: torch.Tensor
    seconds_per_frame: list[float] = field(default_factory=list)
    frame_passes: int = 0  # frames pushed through the model, summed over calls (both branches count)
    model_calls: int = 0
    #: model calls a compiled forward served (config.compile; the static steps of a full window)
    compiled_calls: int = 0
    cache_bytes: int = 0
    config: RolloutConfig | None = None
    #: "exact", "rolling" (approximate) or "none"
    cache_mode: str = "exact"
    #: frames pushed through the model before each generated frame's steps (history prefill / appends)
    passes_per_frame: list[int] = field(default_factory=list)


def _check_inputs(
    wm: WorldModel, context: torch.Tensor, context_actions: torch.Tensor | None, config: RolloutConfig
) -> None:
    encoder = wm.action_encoder
    axis = frame_axis(wm)
    if not torch.is_tensor(context) or context.ndim <= axis:
        raise UsageError(f"context must be a tensor in the model's layout with frames on axis {axis}")
    if not context.is_floating_point() or not torch.isfinite(context).all():
        raise UsageError("context frames must be finite floating-point values in model space")
    block = wm.plan.layout.block_size
    if block != 1:
        _check_blocks(wm, block, context.shape[axis], config)
    if context.shape[axis] < 1:
        raise UsageError("the context needs at least one frame", "pass c >= 1 context frames")
    if context.numel() == 0:
        raise UsageError(
            f"the context has an empty dimension: shape {tuple(context.shape)}",
            "every frame needs a height, a width and channels of at least 1",
        )
    if context_actions is not None:
        _check_actions(encoder, context_actions, context.shape[0], "context_actions")
    if context_actions is not None and context_actions.shape[1] != context.shape[axis]:
        raise UsageError(f"context_actions has {context_actions.shape[1]} frames, the context {context.shape[axis]}")


def _check_blocks(wm: WorldModel, block: int, context_frames: int, config: RolloutConfig) -> None:
    """A plan causal over blocks of `block` frames is rolled out block by block: whole blocks of
    context, chunks and windows, so the model never sees a partial block."""
    name = wm.plan.name
    if config.chunk % block:
        raise UsageError(
            f"plan '{name}' is causal over blocks of {block} frames: chunk={config.chunk} would feed it partial blocks",
            f"use chunk={block} (CLI: --chunk {block})",
        )
    if config.window % block or context_frames % block:
        raise UsageError(
            f"plan '{name}' is causal over blocks of {block} frames: the window ({config.window}) and the context "
            f"({context_frames} frames) must be whole blocks",
            f"use multiples of {block}",
        )
    if config.cache_mode != "none":
        raise UsageError(
            f"plan '{name}' is causal over blocks of {block} frames: streaming caches work frame by frame",
            "roll it out block by block with full recomputation: cache='none' (CLI: --cache none)",
        )


def check_frame_size(wm: WorldModel, context: torch.Tensor, where: str = "context") -> None:
    """Refuse, as a usage error, frames too small (or oddly sized) for the model, before a rollout
    (5-D video samples: (B, C, T, H, W) or (B, T, C, H, W)).

    Whether a size works depends on the whole architecture (a UNet's downsampling and its
    GroupNorms' group sizes, a DiT's patches), so rather than guess from the config this runs the
    model once on one zero frame of the context's size. If that fails and the same probe at the
    size of the plan's own example input works, the size is at fault and the error says so;
    otherwise the original error propagates (a bug, not a bad input)."""
    axis = frame_axis(wm)
    block = min(wm.plan.layout.block_size, context.shape[axis])  # a whole block for block-causal plans
    frame = torch.zeros_like(context.narrow(axis, 0, block)[:1], device=wm.device, dtype=wm.dtype)
    try:
        _probe(wm, frame)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        good = wm.example_sample(wm.plan.layout.block_size).narrow(axis, 0, 1)[:1]
        if good.shape == frame.shape:
            raise
        try:
            _probe(wm, torch.zeros_like(good, device=wm.device, dtype=wm.dtype))
        except (RuntimeError, ValueError):
            raise exc from None
        hw = "×".join(str(n) for n in frame.movedim(axis, 1).shape[3:])
        good_hw = "×".join(str(n) for n in good.movedim(axis, 1).shape[3:])
        raise UsageError(
            f"{where}: frames of {hw} do not fit this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            f"use the frame size the model was trained on; {good_hw} works (the model downsamples, so very small "
            "frames cannot pass through it)",
        ) from None


def _frame_size(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    """Channels and spatial size of one frame of a 5-D video sample."""
    return tuple(x.movedim(axis, 1).shape[2:])


@torch.no_grad()
def _probe(wm: WorldModel, frame: torch.Tensor) -> None:
    frames = frame.shape[frame_axis(wm)]
    ts = torch.zeros(frame.shape[0], frames, dtype=torch.long, device=frame.device)
    image = frame.narrow(frame_axis(wm), 0, 1) if wm.image_condition is not None else None
    wm(frame, ts, None, None, image=image, **wm.unconditional_inputs(frame.shape[0], frames))


def _check_actions(encoder: torch.nn.Module, acts: torch.Tensor, batch: int, name: str) -> None:
    if not torch.is_tensor(acts):
        raise UsageError(f"{name} must be a tensor")
    discrete = encoder.action_type == "discrete"
    if discrete and acts.ndim == 2:
        if acts.is_floating_point() or acts.dtype == torch.bool:
            raise UsageError(f"{name}: discrete actions are integer indices, got dtype {acts.dtype}")
        if acts.numel() and (int(acts.min()) < 0 or int(acts.max()) >= encoder.action_dim):
            raise UsageError(
                f"{name}: action indices must lie in [0, {encoder.action_dim}), got [{int(acts.min())}, {int(acts.max())}]"
            )
    elif acts.ndim == 3:
        if acts.shape[-1] != encoder.action_dim:
            raise UsageError(
                f"{name} have dimension {acts.shape[-1]}, the action adapter expects {encoder.action_dim}",
                f"pass {encoder.action_dim} numbers per action (the --action-dim the checkpoint was converted with)",
            )
        if acts.is_floating_point() and not torch.isfinite(acts).all():
            raise UsageError(f"{name} contain NaN or inf")
    else:
        shape = "(batch, n) indices or (batch, n, N) multi-hot" if discrete else f"(batch, n, {encoder.action_dim})"
        raise UsageError(f"{name} must be {shape}, got shape {tuple(acts.shape)}")
    if acts.shape[0] != batch:
        raise UsageError(f"{name} have batch {acts.shape[0]}, the context {batch}")


class RolloutSession:
    """Step-by-step rollout: `reset(context)`, then `step(action)` returns the next frame.

    `rollout()` is this in a loop; the gymnasium environment drives it one action at a time.
    One generator (seeded by config.seed at reset) draws, in order, the history noise of each
    context frame, then per generated frame its initial noise, any η noise and its history noise;
    both strategies draw the same numbers, so they produce the same frames.
    """

    def __init__(self, wm: WorldModel, config: RolloutConfig | None = None, model_kwargs: dict[str, Any] | None = None):
        self.wm = wm
        self.config = config = config or RolloutConfig()
        config.validate()
        if not isinstance(wm, WorldModel):
            raise UsageError(f"rollout needs a causalize.WorldModel, got {type(wm).__name__}")
        if wm.action_encoder is None:
            raise UsageError(
                "this checkpoint has no action adapter: it cannot be rolled out from actions",
                "convert it with --action-dim N and fine-tune it (causalize train)",
            )
        image = wm.image_condition
        if config.cache_mode == "rolling" and config.sink < 1 and image is not None and image.fill == "first":
            raise UsageError(
                "rolling caches of this image-to-video model need sink >= 1: only frame 0 carries its image, "
                "and a rolling cache without a sink evicts it once the window slides",
                "add --sink 1 (sink=1)",
            )
        self.schedule = NoiseSchedule.from_config(rescale_zero_terminal_snr=config.zero_terminal_snr)
        self.levels = sched.sampling_timesteps(self.schedule.num_train_timesteps, config.steps, config.spacing)
        self.level_h = sched.history_level(self.levels, config.history_noise)
        if self.level_h >= self.schedule.num_train_timesteps:
            raise UsageError(
                f"history_noise {self.level_h} is beyond the schedule's {self.schedule.num_train_timesteps} levels"
            )
        self.prediction = "v" if config.prediction_type == "v_prediction" else config.prediction_type
        self.axis, self.out_axis = frame_axis(wm), wm.plan.layout.output_axis
        self.device, self.dtype = wm.device, wm.dtype
        self.model_kwargs = model_kwargs
        self.denoiser: Denoiser | None = None
        self.generated = 0
        self._fitting_sizes: set[tuple[int, ...]] | None = None  # frame sizes known to fit

    def reset(
        self,
        context: torch.Tensor,
        context_actions: torch.Tensor | None = None,
        context_action_mask: torch.Tensor | None = None,
    ) -> None:
        """Start from `context` (c frames, model space, native layout); context frames get
        `context_actions` (their producing actions) or the null action; `context_action_mask`
        (c,) or (B, c) bool marks which of them are known (e.g. False for an episode's frame 0)."""
        _check_inputs(self.wm, context, context_actions, self.config)
        self.batch = context.shape[0]
        context = context.to(device=self.device, dtype=self.dtype)
        if context.ndim == 5 and _frame_size(context, self.axis) not in self._sizes_known_to_fit():
            check_frame_size(self.wm, context)  # one 1-frame forward: too small frames are a usage error
        self.frame_shape = list(context.shape)
        self.frame_shape[self.axis] = 1
        self.gen = torch.Generator(device=self.device).manual_seed(self.config.seed)
        mode = self.config.cache_mode
        if mode == "rolling":
            self.denoiser = Rolling(self.wm, self.model_kwargs, self.config.sink)
        elif mode == "exact":
            self.denoiser = Streaming(self.wm, self.model_kwargs, self.config.compile)
        else:
            self.denoiser = FullRecompute(self.wm, self.model_kwargs)
        self.passes_per_frame: list[int] = []
        self.history = [self._noised(f) for f in context.split(1, dim=self.axis)]
        # clean frames: an image-to-video model's condition is the window's first frame, clean
        self.clean = list(context.split(1, dim=self.axis)) if self.wm.image_condition is not None else None
        c = len(self.history)
        if context_actions is None:
            self.hist_actions = None  # filled with zeros shaped like the first action
            self.hist_mask = [False] * c
        else:
            self.hist_actions = _as_rows(context_actions.to(self.device))
            self.hist_mask = [True] * c
        if context_action_mask is not None:
            if context_actions is None:
                raise UsageError("context_action_mask without context_actions")
            mask = torch.as_tensor(context_action_mask, dtype=torch.bool)
            if mask.ndim == 2:
                if mask.shape[0] != self.batch or not (mask == mask[:1]).all():
                    raise UsageError("context_action_mask must be (c,) or the same (c,) row for every sample")
                mask = mask[0]
            if mask.shape != (c,):
                raise UsageError(f"context_action_mask must have {c} entries, got shape {tuple(mask.shape)}")
            self.hist_mask = [bool(m) for m in mask]
        self.generated = 0
        self.seconds_per_frame: list[float] = []

    def _noised(self, frame: torch.Tensor) -> torch.Tensor:
        noise = gaussian(frame.shape, self.gen, self.device, self.dtype)
        ts = torch.full((frame.shape[0], 1), self.level_h, dtype=torch.long, device=self.device)
        return self.schedule.q_sample(frame, noise, ts, self.axis)

    def _to_v(self, out: torch.Tensor, x: torch.Tensor, level: int) -> torch.Tensor:
        out = _mean_prediction(out, x)
        if self.prediction == "v":
            return out
        copies = out.shape[0] // x.shape[0]
        ts = torch.full((out.shape[0], 1), level, dtype=torch.long, device=self.device)
        return self.schedule.convert(
            x.repeat(copies, *([1] * (x.ndim - 1))), out, ts, self.prediction, "v", self.out_axis
        )

    def _sizes_known_to_fit(self) -> set[tuple[int, ...]]:
        """Frame sizes that need no probe: the plan's example size, and sizes this session checked."""
        known = self._fitting_sizes
        if known is None:
            example = self.wm.example_sample(self.wm.plan.layout.block_size)
            known = self._fitting_sizes = {_frame_size(example, self.axis)}
        return known

    @torch.no_grad()
    def step(self, action: torch.Tensor) -> torch.Tensor:
        """The next frame (native layout, one frame on the frame axis, model space) given the
        action (B, A) continuous / (B,) discrete index / (B, N) multi-hot."""
        if self.config.chunk != 1:
            raise UsageError(
                f"chunk={self.config.chunk}: generate with step_chunk(actions of {self.config.chunk} frames)"
            )
        return self.step_chunk(action.to(self.device)[:, None])

    @torch.no_grad()
    def step_chunk(self, actions: torch.Tensor) -> torch.Tensor:
        """The next frames, denoised together (native layout, c frames on the frame axis) given
        their actions (B, c, A) / (B, c) / (B, c, N), c a multiple of the plan's temporal block:
        frame i of the chunk is conditioned on actions[:, i] and on the chunk's earlier frames
        (block-causal inside the model). Guidance drops the chunk's actions in its unconditional
        branch (they are all the newest)."""
        if self.denoiser is None:
            raise UsageError("call reset(context) before step(action)")
        row = actions.to(self.device)
        _check_actions(self.wm.action_encoder, row, self.batch, "action")
        c, block = row.shape[1], self.wm.plan.layout.block_size
        if c < 1 or c % block or c >= self.config.window:
            raise UsageError(
                f"a chunk of {c} frames: it must be a positive multiple of {block} smaller than the window "
                f"({self.config.window})"
            )
        t0 = time.perf_counter()
        cfg, batch = self.config, self.batch
        if self.hist_actions is None:
            self.hist_actions = [torch.zeros_like(row[:, :1]) for _ in self.history]
        start = max(0, len(self.history) - (cfg.window - c))
        passes = self.denoiser.frame_passes
        if isinstance(self.denoiser, Rolling):
            lo = self.denoiser.pushed
            acts = torch.cat(self.hist_actions[lo:], dim=1) if lo < len(self.history) else None
            mask = torch.tensor(self.hist_mask[lo:], dtype=torch.bool, device=self.device).expand(batch, -1)
            # rolling caches never recompute: the image stays the rollout's first frame (a "first"
            # family's image lives in frame 0's cached entries, kept by sink >= 1, checked above)
            self.denoiser.image = None if self.clean is None else self.clean[0]
            self.denoiser.push(self.history[lo:], acts, mask, self.level_h, start)
        else:
            window_actions = torch.cat(self.hist_actions[start:], dim=1)
            window_mask = torch.tensor(self.hist_mask[start:], dtype=torch.bool, device=self.device).expand(batch, -1)
            self.denoiser.image = None if self.clean is None else self.clean[start]
            self.denoiser.set_history(self.history[start:], window_actions, window_mask, start, self.level_h)
        self.passes_per_frame.append(self.denoiser.frame_passes - passes)
        shape = list(self.frame_shape)
        shape[self.axis] = c
        x = gaussian(shape, self.gen, self.device, self.dtype)
        for j, level in enumerate(self.levels):
            out = self.denoiser(x, level, row, cfg.guided)
            v = self._to_v(out, x, level)
            if cfg.guided:
                v = sched.guide(v[:batch], v[batch:], cfg.guidance_scale, cfg.guidance_rescale)
            nxt = self.levels[j + 1] if j + 1 < len(self.levels) else None
            x = sched.step(cfg.sampler, self.schedule, x, v, level, nxt, eta=cfg.eta, generator=self.gen)
        for i, frame in enumerate(x.split(1, dim=self.axis)):
            self.history.append(self._noised(frame))
            if self.clean is not None:
                self.clean.append(frame)
            self.hist_actions.append(row[:, i : i + 1])
            self.hist_mask.append(True)
        self.generated += c
        self.seconds_per_frame.extend([(time.perf_counter() - t0) / c] * c)
        return x

    def result(self, frames: list[torch.Tensor]) -> RolloutResult:
        d = self.denoiser
        return RolloutResult(
            frames=torch.cat(frames, dim=self.axis),
            seconds_per_frame=list(self.seconds_per_frame),
            frame_passes=d.frame_passes,
            model_calls=d.model_calls,
            compiled_calls=d.compiled_calls,
            cache_bytes=d.stream.cache_bytes() if isinstance(d, Streaming) else 0,
            config=self.config,
            cache_mode=self.config.cache_mode,
            passes_per_frame=list(self.passes_per_frame),
        )


def rollout(
    wm: WorldModel,
    context: torch.Tensor,
    actions: torch.Tensor,
    *,
    context_actions: torch.Tensor | None = None,
    context_action_mask: torch.Tensor | None = None,
    config: RolloutConfig | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> RolloutResult:
    """Generate one frame per action after the context (see the module docstring).

    actions: (B, n) discrete indices, (B, n, N) multi-hot or (B, n, A) continuous; actions[:, i]
        produces generated frame i.
    context_actions: the actions attached to the context frames (frame j's producing action), or
        None: context frames get the null action.
    context_action_mask: (c,) bool, which context actions are known (False: null action), e.g.
        False for the first frame of an episode.
    model_kwargs: the model's other inputs at batch 1 (e.g. a real empty-prompt embedding);
        by default the zero "empty prompt" the trainer used.
    progress: called after every frame with (frames done, total, seconds for that frame).
    """
    session = RolloutSession(wm, config, model_kwargs)
    session.reset(context, context_actions, context_action_mask)  # checks the context
    _check_actions(wm.action_encoder, actions, session.batch, "actions")
    block = wm.plan.layout.block_size
    if actions.shape[1] % block:
        raise UsageError(
            f"plan '{wm.plan.name}' generates whole blocks of {block} frames; {actions.shape[1]} actions are not",
            f"give a multiple of {block} actions",
        )
    frames = []
    n, chunk = actions.shape[1], session.config.chunk
    for i in range(0, n, chunk):
        frames.append(session.step_chunk(actions[:, i : i + chunk]))
        if progress is not None:
            progress(min(i + chunk, n), n, session.seconds_per_frame[-1])
    if not frames:
        raise UsageError("no actions: nothing to generate")
    return session.result(frames)


def _mean_prediction(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model output that matches the sample: models with learned variance (Latte, out_channels
    = 2·in_channels) return [prediction ; variance] on the channel axis, as diffusers' pipelines
    read it (`chunk(2, dim=1)[0]`)."""
    if out.shape[1:] == x.shape[1:]:
        return out
    if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        return out[:, : x.shape[1]]
    raise UsageError(f"the model returns {tuple(out.shape[1:])} per sample for a sample of {tuple(x.shape[1:])}")


def _as_rows(actions: torch.Tensor) -> list[torch.Tensor]:
    """(B, n[, A]) -> n tensors (B, 1[, A]), one per frame."""
    return list(actions.split(1, dim=1))


__all__ = [
    "MAX_SEED",
    "FullRecompute",
    "RolloutConfig",
    "RolloutResult",
    "CACHE_MODES",
    "Rolling",
    "RolloutSession",
    "Streaming",
    "check_frame_size",
    "rollout",
]
