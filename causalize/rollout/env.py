"""A gymnasium environment whose dynamics are a world model (one generated frame per step).

    env = WorldModelEnv.from_pretrained("./run/final", context=first_frames, max_steps=100)
    obs, info = env.reset(seed=0)                      # the last context frame
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Observations are pixels (uint8 (H, W, C), 0..255) or latents (float32 (C, H, W)), chosen by
`observation=`; context frames come in the same format, several at once ((T, H, W, C) / (T, C, H,
W)). The reward is always 0.0 and episodes never terminate: the model predicts frames, nothing
else; wrap the env to score them. Batch size 1.

Reproducibility: `reset(seed=s)` rolls out exactly like `rollout(..., config.seed=s)`; a reset
without a seed draws the next seed from the env's generator, which `config.seed` seeds at
construction. The history noise of the context frames is drawn at reset, so the same seed, context
and actions give the same frames.

One WorldModel instance holds one set of streaming caches: when several envs step one model in
turn, exact streaming rebuilds its window (same frames, slower) and rolling caches refuse; give
each env its own model to keep the speed.

Latent world models serve pixels through their VAE (`vae=`; `from_pretrained` takes the one
`causalize encode` recorded for the training data): context pixels are encoded (a frame count
following the VAE's rule, e.g. 1 + 4k), and each step's latent frame is decoded once, streaming
through the VAE's temporal cache where it has one. A step then yields the k video frames that
latent frame covers: the observation is the newest, `info["frames"]` holds all k, and the action
is the k video-frame actions (MultiDiscrete([N] * k), MultiBinary((k, N)) or Box((k, A))), grouped
as in training (docs/LATENTS.md).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any, Literal

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

from causalize.errors import UsageError
from causalize.rollout.io import (
    Frames,
    actions_to_tensor,
    as_frames,
    fit_channels,
    frames_to_model,
    model_to_frames,
    sample_geometry,
)
from causalize.rollout.sampler import RolloutConfig, RolloutSession
from causalize.world_model import WorldModel

Observation = Literal["pixels", "latents"]


class WorldModelEnv(gymnasium.Env):
    """gymnasium.Env over a RolloutSession. See the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(
        self,
        world_model: WorldModel,
        config: RolloutConfig | None = None,
        *,
        context: Any = None,
        context_actions: Any = None,
        observation: Observation = "pixels",
        frame_shape: tuple[int, ...] | None = None,
        max_steps: int | None = None,
        action_low: float | np.ndarray | None = None,
        action_high: float | np.ndarray | None = None,
        multi_hot: bool = False,
        info_timing: bool = False,
        render_mode: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        vae: Any = None,
    ):
        """
        context: default context frames for `reset()` without options["context"] (observation
            format, one frame or several).
        frame_shape: the observation shape when no context is given ((H, W, C) or (C, H, W));
            default: the model's example input size.
        max_steps: truncate after this many steps (None: never).
        action_low / action_high: bounds of the continuous action Box (default −inf..inf).
        multi_hot: a discrete adapter takes MultiBinary(N) rows instead of Discrete(N) indices.
        info_timing: add wall-clock seconds to step infos. Off by default: timings differ between
            identical runs, and gymnasium's check_env requires identical infos.
        vae: a VAE (its directory, or a loaded causalize.rollout.decoded.LatentIO) that turns the
            model's latents into pixel observations; see the module docstring. A directory alone
            carries no action grouping: actions then take the model's own rows; `from_pretrained`
            reads the grouping from the model's latent.json.
        """
        if observation not in ("pixels", "latents"):
            raise UsageError(f"observation must be 'pixels' or 'latents', got {observation!r}")
        if render_mode not in (None, "rgb_array"):
            raise UsageError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if render_mode is not None and observation != "pixels":
            raise UsageError("render_mode='rgb_array' needs pixel observations (latents cannot be shown without a VAE)")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise UsageError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
        self.config = config or RolloutConfig()
        RolloutSession(world_model, self.config)  # validates the settings and the action adapter now
        if self.config.chunk != 1:
            raise UsageError(f"chunk={self.config.chunk}: the environment generates one frame per step", "use chunk=1")
        self.wm = world_model
        self.observation = observation
        self.max_steps = max_steps
        self.info_timing = info_timing
        self.render_mode = render_mode
        self.model_kwargs = model_kwargs
        self.frame_axis, self.channels = sample_geometry(world_model)
        self.channel_axis = world_model.plan.layout.channel_axis
        if self.channels is None:
            raise UsageError(
                f"plan '{world_model.plan.name}' takes packed tokens, not a video tensor: WorldModelEnv does not support it"
            )
        self.latent_io = _latent_io(vae, world_model)
        if self.latent_io is not None:
            if observation != "pixels":
                raise UsageError("with a VAE the observations are pixels: drop observation='latents' or the VAE")
            self.latent_io.check_model(self.channels)
            self._decoder = self.latent_io.decoder()
        self.default_context = None if context is None else self._frames(context, "context")
        self.default_context_actions = context_actions
        self.observation_space = self._observation_space(frame_shape)
        self.action_space = self._action_space(action_low, action_high, multi_hot)
        self._np_random, self._np_random_seed = seeding.np_random(self.config.seed)
        self._session: RolloutSession | None = None
        self._last: np.ndarray | None = None
        self._steps = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: RolloutConfig | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> WorldModelEnv:
        """An env over a checkpoint (a converted model, or a training run's output directory), on
        `device` (None: CUDA when available) in `dtype` (None: as stored; 'bf16' for speed). A
        model trained on encoded latents decodes with its recorded VAE (`vae=PATH` overrides it,
        `vae=False` serves latents); the conditioning stored with it is used (`conditioning=FILE`
        overrides it), as in `causalize rollout`.
        Without `config` the sampler settings follow the checkpoint's training.json
        (causalize.rollout.loading.resolve_config)."""
        from causalize.rollout.loading import load_world_model, resolve_config

        if config is None:
            config, _ = resolve_config(path)
        from causalize.rollout.conditioning import resolve_conditioning
        from causalize.rollout.decoded import LatentIO, find_vae
        from causalize.rollout.loading import checkpoint_dir

        vae = kwargs.pop("vae", None)
        choice = None if vae is False else find_vae(checkpoint_dir(path), vae)
        wm, ckpt = load_world_model(path, device=device, dtype=dtype)
        if "model_kwargs" not in kwargs:
            kwargs["model_kwargs"] = resolve_conditioning(ckpt, kwargs.pop("conditioning", None), wm)[0] or None
        if choice is not None:
            kwargs["vae"] = LatentIO.load(choice, device=wm.device, dtype=dtype)
        return cls(wm, config, **kwargs)

    # --- spaces --------------------------------------------------------------------------------

    def _observation_space(self, frame_shape: tuple[int, ...] | None) -> spaces.Box:
        if self.latent_io is not None and self.default_context is None and frame_shape is None:
            c, h, w = self._example_frame_shape(latents=True)
            f = self.latent_io.spec.spatial_factor
            frame_shape = (h * f, w * f, self.latent_io.spec.pixel_channels)
        if self.default_context is not None:
            shape = tuple(self.default_context.data.shape[1:])
        elif frame_shape is not None:
            shape = tuple(int(s) for s in frame_shape)
        else:
            shape = self._example_frame_shape()
        if len(shape) != 3:
            raise UsageError(f"frame_shape must have 3 entries ((H, W, C) pixels / (C, H, W) latents), got {shape}")
        if self.observation == "pixels":
            return spaces.Box(0, 255, shape, np.uint8)
        return spaces.Box(-np.inf, np.inf, shape, np.float32)

    def _example_frame_shape(self, latents: bool = False) -> tuple[int, ...]:
        from causalize.layout import from_native

        c, h, w = from_native(self.wm.example_sample(1), self.frame_axis, self.channel_axis).shape[2:]
        return (h, w, c) if self.observation == "pixels" and not latents else (c, h, w)

    def _action_space(self, low: Any, high: Any, multi_hot: bool) -> spaces.Space:
        grouped = self._video_action_space()
        if grouped is not None:
            return grouped
        enc = self.wm.action_encoder
        n = int(enc.action_dim)
        if enc.action_type == "discrete":
            if low is not None or high is not None:
                raise UsageError("action_low / action_high apply to continuous adapters only")
            return spaces.MultiBinary(n) if multi_hot else spaces.Discrete(n)
        if multi_hot:
            raise UsageError("multi_hot applies to discrete adapters only")
        lo = np.broadcast_to(np.asarray(-np.inf if low is None else low, dtype=np.float32), (n,)).copy()
        hi = np.broadcast_to(np.asarray(np.inf if high is None else high, dtype=np.float32), (n,)).copy()
        if not (lo <= hi).all():
            raise UsageError(f"action_low must not exceed action_high, got {lo} and {hi}")
        return spaces.Box(lo, hi, (n,), np.float32)

    def _video_action_space(self) -> spaces.Space | None:
        """k video-frame actions per step, for a model trained on grouped latent actions."""
        io = self.latent_io
        record = None if io is None else io.choice.record
        k = 1 if io is None else io.spec.grouping.factor
        if record is None or k == 1 or record.slots != k:
            return None
        space = record.video_action_space
        if space.type == "continuous":
            return spaces.Box(-np.inf, np.inf, (k, space.width), np.float32)
        if space.multi_hot:
            return spaces.MultiBinary((k, space.width))
        return spaces.MultiDiscrete([space.width] * k)

    # --- gymnasium API -------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start from options["context"] (default: the constructor's context) with
        options["context_actions"] (the action that produced each context frame; default: the
        null action). Returns the last context frame."""
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        options = dict(options or {})
        if options.get("context") is not None:
            context, context_actions = (
                self._frames(options["context"], "options['context']"),
                options.get("context_actions"),
            )
        elif self.default_context is not None:
            context, context_actions = (
                self.default_context,
                options.get("context_actions", self.default_context_actions),
            )
        else:
            raise UsageError(
                "no context frames: pass reset(options={'context': frames}) or WorldModelEnv(..., context=frames)"
            )
        if tuple(context.data.shape[1:]) != self.observation_space.shape:
            raise UsageError(
                f"context frames have shape {tuple(context.data.shape[1:])}, the observation space {self.observation_space.shape}"
            )
        session = RolloutSession(self.wm, dataclasses.replace(self.config, seed=seed), self.model_kwargs)
        model_context = context
        if self.latent_io is not None:
            model_context = self.latent_io.context_latents(context, "context")
        x = frames_to_model(model_context, self.frame_axis, self.channels, channel_axis=self.channel_axis).to(
            session.device
        )
        session.reset(x, self._context_actions(context_actions, model_context.count))
        self._session, self._steps = session, 0
        self._last = context.data[-1].copy()
        if self.latent_io is not None:  # the decoder's cache starts from the context latents
            self._decoder.reset()
            self._last = self._decode(x)[-1]  # the VAE's reconstruction, as a file rollout writes it
        return self._last.copy(), {"seed": seed, "context_frames": context.count, "step": 0}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Generate the next frame from `action`; reward 0.0, never terminated, truncated at max_steps."""
        if self._session is None:
            raise UsageError("call reset() before step()")
        x = self._session.step(self._action_tensor(action).to(self._session.device))
        self._steps += 1
        info_frames = None
        if self.latent_io is not None:
            info_frames = self._decode(x)
            obs = info_frames[-1]
        else:
            obs = model_to_frames(x, self.frame_axis, self.observation, channel_axis=self.channel_axis).data[0]
        self._last = obs
        truncated = self.max_steps is not None and self._steps >= self.max_steps
        info = self._info()
        if info_frames is not None:
            info["frames"] = info_frames
        return obs.copy(), 0.0, False, bool(truncated), info

    def _decode(self, x: Any) -> np.ndarray:
        """Latent frames (model layout) through the streaming decoder, each once: uint8 pixels."""
        import torch

        from causalize.rollout.decoded import to_uint8

        latents = torch.from_numpy(
            model_to_frames(x, self.frame_axis, "latents", channel_axis=self.channel_axis).data
        )  # (T, C, h, w)
        clips = [self._decoder.push(z[None]) for z in latents]
        return to_uint8(torch.cat(clips, dim=2)[0])

    def render(self) -> np.ndarray | None:
        """rgb_array: the latest frame (uint8 (H, W, C); grayscale frames repeated to 3 channels)."""
        if self.render_mode != "rgb_array" or self._last is None:
            return None
        frame = self._last
        return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3].copy()

    def close(self) -> None:
        self._session = None

    # --- helpers -------------------------------------------------------------------------------

    @property
    def seconds_per_frame(self) -> list[float]:
        """Wall-clock seconds of every step since the last reset."""
        return list(self._session.seconds_per_frame) if self._session is not None else []

    def _info(self) -> dict[str, Any]:
        d = self._session.denoiser
        info: dict[str, Any] = {
            "step": self._steps,
            "frame_passes": d.frame_passes,
            "model_calls": d.model_calls,
            "compiled_calls": d.compiled_calls,
            "cache": {"exact": "streaming", "none": "full recompute"}.get(
                self.config.cache_mode, f"{self.config.cache_mode} (approximate)"
            ),
        }
        if self.info_timing:
            s = self._session.seconds_per_frame
            info["seconds"] = s[-1]
            info["seconds_mean"] = statistics.fmean(s)
        return info

    def _frames(self, data: Any, where: str) -> Frames:
        if self.latent_io is not None:  # pixels for the VAE
            channels, whose = self.latent_io.spec.pixel_channels, "the VAE takes"
        else:
            channels, whose = self.channels, "the model's sample has"
        frames = fit_channels(as_frames(data, self.observation, where), channels)
        if frames.channels != channels:
            raise UsageError(f"{where}: {self.observation} have {frames.channels} channels, {whose} {channels}")
        return frames

    def _context_actions(self, actions: Any, count: int):
        if actions is None:
            return None
        enc = self.wm.action_encoder
        t = actions_to_tensor(actions, enc.action_type, enc.action_dim, "context_actions")
        if t.shape[1] != count:
            raise UsageError(f"context_actions has {t.shape[1]} rows, the context {count} frames")
        return t

    def _action_tensor(self, action: Any):
        """One action as the session takes it: (1,) index, (1, N) multi-hot or (1, A) row."""
        import torch

        arr = np.asarray(action)
        space = self.action_space
        if self._video_action_space() is not None:
            return self._grouped_action(arr, space)
        if isinstance(space, spaces.Discrete):
            if arr.ndim != 0 or arr.dtype.kind not in "iu":
                raise UsageError(f"a Discrete({space.n}) action is one integer, got {action!r}")
            if not 0 <= int(arr) < space.n:
                raise UsageError(f"action {int(arr)} is outside Discrete({space.n})")
            return torch.tensor([int(arr)], dtype=torch.long)
        if arr.shape != space.shape:
            raise UsageError(f"action must have shape {space.shape}, got {arr.shape}")
        if isinstance(space, spaces.MultiBinary):
            if not np.isin(arr, (0, 1)).all():
                raise UsageError("multi-hot actions must be 0 or 1")
            return torch.from_numpy(arr.astype(np.float32))[None]
        if arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
            raise UsageError(f"continuous actions must be finite numbers, got {action!r}")
        return torch.from_numpy(arr.astype(np.float32))[None]

    def _grouped_action(self, arr: np.ndarray, space: spaces.Space):
        """k video-frame actions → the model's one row (slots concatenated, docs/LATENTS.md)."""
        import torch

        from causalize.latents.actions import slot_rows

        if not space.contains(arr.astype(space.dtype) if arr.dtype.kind in "iub" else arr):
            raise UsageError(f"action {arr.tolist()!r} is not in {space}")
        record = self.latent_io.choice.record
        rows = slot_rows(arr, record.video_action_space)
        return torch.from_numpy(rows.reshape(1, -1).astype(np.float32))


def _latent_io(vae: Any, wm: WorldModel) -> Any:
    """A loaded LatentIO from a path or a LatentIO (None: no VAE)."""
    if vae is None:
        return None
    from causalize.latents.spec import read_spec
    from causalize.rollout.decoded import LatentIO, VaeChoice

    if isinstance(vae, LatentIO):
        return vae
    choice = VaeChoice(str(vae), None, "option", read_spec(vae), None)
    return LatentIO.load(choice, device=wm.device)


__all__ = ["WorldModelEnv"]
