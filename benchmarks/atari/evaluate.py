"""Rollout evaluation of a fine-tuned world model on held-out test episodes.

A *segment* is ``context + horizon`` consecutive frames of a test episode. The model sees the
``context`` real frames with the actions that produced them, then generates ``horizon`` frames
autoregressively from actions: the real ones recorded in the episode, or (for action
controllability, Vid2World Table 4) uniformly random ones drawn from the game's action set with a
fixed seed. Every generated frame is scored against the real frame at the same step (PSNR, SSIM;
``benchmarks.atari.metrics``; for Pong also the height of the agent's paddle,
``benchmarks.atari.control``), and the scores are summarised per horizon step.

Alignment (EPISODES.md): stored ``actions[t]`` is executed after frame t and produces frame t+1. A
segment starting at frame s therefore takes ``actions[s-1 : s+c-1]`` as its context actions and
``actions[s+c-1 : s+c+h-1]`` as the actions of the generated frames. Segments start at s >= 1 so
that every context frame has a producing action.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.atari import control
from benchmarks.atari.control import score_paddle
from benchmarks.atari.data import load_episode
from benchmarks.atari.metrics import frames_to_unit, horizon_summary, video_metrics
from causalize.episodes import list_episodes, read_info

__all__ = [
    "Segments",
    "action_check",
    "context_check",
    "copy_last_baseline",
    "load_segments",
    "random_actions",
    "real_moves",
    "rollout_segments",
    "score",
    "to_uint8",
]


@dataclass
class Segments:
    """Test segments, batched: frames uint8 (N, c+h, H, W, C) and actions int64."""

    frames: np.ndarray
    context_actions: np.ndarray  # (N, c): the action that produced each context frame
    actions: np.ndarray  # (N, h): the action that produced each generated frame
    context: int
    index: list[tuple[int, int]]  # (episode, start frame) per segment
    num_actions: int
    #: latent studies: the same segments' latents (N, c+h, C, h, w), what the world model sees
    latents: np.ndarray | None = None

    @property
    def horizon(self) -> int:
        return self.frames.shape[1] - self.context

    @property
    def real_future(self) -> np.ndarray:
        return self.frames[:, self.context :]

    def model_frames(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Frames ``start:stop`` as the world model sees them, (N, C, T, H, W): pixels in [-1, 1],
        or the latents of a latent study."""
        if self.latents is not None:
            return torch.from_numpy(self.latents[:, start:stop]).float().movedim(2, 1).contiguous()
        return model_space(self.frames[:, start:stop])

    def context_tensor(self) -> torch.Tensor:
        """Context frames in model space, (N, C, c, H, W)."""
        return self.model_frames(0, self.context)


def model_space(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, H, W, C) frames in model space ([-1, 1], as the training loader maps pixels),
    (N, C, T, H, W)."""
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()


def load_segments(root: str | Path, context: int, horizon: int, per_episode: int) -> Segments:
    """Up to ``per_episode`` non-overlapping segments of every test episode, starting at frame 1."""
    info = read_info(root)
    length = context + horizon
    frames, ctx_actions, actions, index = [], [], [], []
    for e in list_episodes(root):
        ep = load_episode(root, e)
        total = ep["frames"].shape[0]
        for j in range(per_episode):
            s = 1 + j * length
            if s + length > total:
                break
            frames.append(ep["frames"][s : s + length])
            ctx_actions.append(ep["actions"][s - 1 : s + context - 1])
            actions.append(ep["actions"][s + context - 1 : s + length - 1])
            index.append((e, s))
    if not frames:
        raise ValueError(f"no test episode of {root} holds a segment of {length} frames after frame 0")
    return Segments(
        np.stack(frames),
        np.stack(ctx_actions).astype(np.int64),
        np.stack(actions).astype(np.int64),
        context,
        index,
        int(info.action_space.num_actions),
    )


def load_latent_frames(root: str | Path, index: list[tuple[int, int]], length: int) -> np.ndarray:
    """The latents (N, length, C, h, w) of the segments ``index`` (episode, start) of a latent
    dataset encoded one latent frame per video frame (the study's autoencoder)."""
    out = []
    for e, start in index:
        z = load_episode(root, e)["latents"]
        if start + length > z.shape[0]:
            raise ValueError(f"{root}: episode {e} has {z.shape[0]} latent frames, segment needs {start + length}")
        out.append(z[start : start + length])
    return np.stack(out).astype(np.float32)


def random_actions(segments: Segments, seed: int) -> np.ndarray:
    """Uniformly random actions in place of the real future ones (same shape), from ``seed``."""
    rng = np.random.default_rng([int(seed), 0x5EED, 6])
    return rng.integers(0, segments.num_actions, size=segments.actions.shape, dtype=np.int64)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Model-space frames (N, C, T, H, W) in [-1, 1] -> uint8 (N, T, H, W, C)."""
    x = ((frames.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


def score(pred: torch.Tensor, real: np.ndarray, *, paddle: bool = True) -> dict[str, Any]:
    """PSNR / SSIM of predicted frames (N, C, h, H, W, model space) against real uint8 (N, h, H, W, C):
    per-horizon summaries, their overall means, the per-sample means and (``values``, N x h) every
    frame's score, which per-step paired differences between runs need. With ``paddle`` (Pong),
    also ``paddle``: the agent's paddle in the predicted frames (as saved, uint8) against the real
    ones (``control.score_paddle``)."""
    p = frames_to_unit(pred.detach().float().cpu().movedim(2, 1), "signed")
    r = frames_to_unit(torch.from_numpy(np.ascontiguousarray(real)), "uint8")
    values = video_metrics(p, r)
    out: dict[str, Any] = {}
    for name, v in values.items():
        v = (
            torch.nan_to_num(v.double(), posinf=100.0) if name == "psnr" else v.double()
        )  # identical frames: cap at 100 dB
        out[name] = {
            **horizon_summary(v),
            "overall": float(v.mean()),
            "per_sample": v.mean(1).tolist(),
            "values": v.tolist(),
        }
    if paddle:
        out["paddle"] = score_paddle(to_uint8(pred), real)
    return out


def copy_last_baseline(segments: Segments) -> torch.Tensor:
    """The trivial predictor: the last real context frame repeated over the horizon, pixels in [-1, 1]."""
    last = model_space(segments.frames[:, segments.context - 1 : segments.context])
    return last.expand(-1, -1, segments.horizon, -1, -1).contiguous()


def rollout_segments(
    wm: Any,
    segments: Segments,
    actions: np.ndarray,
    config: Any,
    *,
    batch_size: int | None = None,
    progress: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Roll the world model out on every segment from ``actions`` (N, h); returns the generated
    frames (N, C, h, H, W) in model space on the CPU and timing facts. Segments are processed in
    chunks of ``batch_size`` (all at once by default); each chunk restarts the sampler's
    generator from ``config.seed``, so a segment's result does not depend on the chunking only
    when the chunks are equal."""
    from causalize.rollout import rollout

    device = next(wm.parameters()).device
    n = segments.frames.shape[0]
    chunk = batch_size or n
    context = segments.context_tensor()
    outs, seconds, passes = [], [], 0
    t0 = time.perf_counter()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        res = rollout(
            wm,
            context[lo:hi].to(device),
            torch.from_numpy(actions[lo:hi]).to(device),
            context_actions=torch.from_numpy(segments.context_actions[lo:hi]).to(device),
            config=config,
            progress=progress,
        )
        outs.append(res.frames.float().cpu())
        seconds += res.seconds_per_frame
        passes += res.frame_passes
    total = time.perf_counter() - t0
    return torch.cat(outs), {"seconds": total, "seconds_per_frame": seconds, "frame_passes": passes, "samples": n}


def _one_step_x0(
    wm: Any, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, actions: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0`` (N, C, T, H, W) noised to the per-frame ``levels`` (N, T) with ``noise``, one forward
    pass of the world model per chunk of segments: (predicted x0, the noisy input), on the CPU."""
    from causalize.noise import NoiseSchedule
    from causalize.world_model import conditioning_kwargs

    device = next(wm.parameters()).device
    schedule = NoiseSchedule.from_config()
    preds, inputs = [], []
    for lo in range(0, x0.shape[0], chunk):
        xb = x0[lo : lo + chunk].to(device)
        kk = levels[lo : lo + chunk].to(device)
        x_k = schedule.q_sample(xb, noise[lo : lo + chunk].to(device), kk, frame_axis=2)
        kwargs = conditioning_kwargs(wm.plan, wm.model, xb.shape[0], xb.shape[2], device=device)
        v = wm(x_k, kk, actions[lo : lo + chunk].to(device), **kwargs).float().cpu()
        x_k = x_k.cpu()
        preds.append(schedule.convert(x_k, v, kk.cpu(), "v", "sample", frame_axis=2))
        inputs.append(x_k)
    return torch.cat(preds), torch.cat(inputs)


def denoising_psnr(
    wm: Any,
    segments: Segments,
    levels: list[int],
    seed: int,
    batch_size: int | None = None,
    decode: Any = None,
) -> dict[str, Any]:
    """How good a denoiser the world model is, apart from the sampler: every frame of every
    segment (context and future) noised to the same level k, the real actions, one forward pass;
    PSNR of the predicted x0 against the real frames, next to the PSNR of the noisy input
    rescaled by 1/sqrt(alpha_k) (what "no denoising" scores). Model space is [-1, 1]; PSNR over
    [0, 1] pixels, clamped. One noise draw per level from ``seed`` (on the CPU, for the whole set,
    so the numbers do not depend on ``batch_size``, the segments per forward pass). Latent
    studies pass ``decode`` (latents → pixels): x0 and the rescaled input are decoded and scored
    in pixels like every other number."""
    from causalize.noise import NoiseSchedule

    schedule = NoiseSchedule.from_config()
    x0 = segments.model_frames()
    actions = torch.from_numpy(np.concatenate([segments.context_actions, segments.actions], 1))
    n, frames = x0.shape[0], x0.shape[2]
    real = frames_to_unit(torch.from_numpy(np.ascontiguousarray(segments.frames)), "uint8")
    out: dict[str, Any] = {}
    with torch.no_grad():
        for k in levels:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed) * 1000 + int(k)))
            a = schedule.alphas_cumprod[int(k)].float()
            kk = torch.full((n, frames), int(k), dtype=torch.long)
            pred, x_k = _one_step_x0(wm, x0, noise, kk, actions, batch_size or n)
            pixels = {"x0": pred, "input": x_k / a.sqrt().clamp(min=1e-3)}
            if decode is not None:
                pixels = {name: decode(x) for name, x in pixels.items()}
            out[str(int(k))] = {
                name: float(
                    video_metrics(frames_to_unit(x.clamp(-1, 1).movedim(2, 1), "signed"), real)["psnr"].double().mean()
                )
                for name, x in pixels.items()
            }
    return out


def _first_frame_inputs(segments: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-step checks' inputs: the context plus the first generated frame (N, C, c+1, H, W),
    the same with the next segment's context (a plausible but wrong past), and the real actions
    that produced those frames (N, c+1)."""
    c = segments.context
    x = segments.model_frames(0, c + 1)
    wrong = torch.cat([torch.roll(x[:, :, :c], 1, dims=0), x[:, :, c:]], 2)
    actions = torch.from_numpy(np.concatenate([segments.context_actions, segments.actions[:, :1]], 1))
    return x, wrong, actions


def _first_frame_noise(x: torch.Tensor, context: int, seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise (one draw per seed and level, shared by the checks) and the levels: the first
    generated frame at ``k``, the context clean."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed) * 1000 + 7 + int(k)))
    kk = torch.zeros((x.shape[0], context + 1), dtype=torch.long)
    kk[:, context] = int(k)
    return noise, kk


def context_check(
    wm: Any,
    segments: Segments,
    levels: list[int],
    seed: int,
    *,
    decode: Any = None,
    batch_size: int | None = None,
    paddle: bool = True,
) -> dict[str, Any]:
    """Does the model use its past? The first generated frame noised to level k, its context clean
    (level 0) and either the segment's own or the next segment's (a plausible but wrong past), the
    real actions, one forward pass: the predicted x0 scored against the real frame (PSNR, and the
    paddle error for Pong). A model that continues its context scores better with its own."""
    c = segments.context
    x, wrong, actions = _first_frame_inputs(segments)
    n = x.shape[0]
    real = segments.frames[:, c : c + 1]
    out: dict[str, Any] = {}
    with torch.no_grad():
        for k in levels:
            noise, kk = _first_frame_noise(x, c, seed, k)
            row = {}
            for name, past in (("own", x), ("other", wrong)):
                pred = _one_step_x0(wm, past, noise, kk, actions, batch_size or n)[0][:, :, c:]
                m = score(_pixels(pred, decode), real, paddle=paddle)
                row[name] = {"psnr": m["psnr"]["overall"], "paddle": m.get("paddle", {}).get("overall", {}).get("mean")}
            out[str(int(k))] = row
    return out


def action_check(
    wm: Any,
    segments: Segments,
    levels: list[int],
    seed: int,
    *,
    decode: Any = None,
    batch_size: int | None = None,
    paddle: bool = True,
) -> dict[str, Any]:
    """Does the next frame depend on its action? The first generated frame noised to level k, its
    own context clean, predicted once per action (every other input and the noise equal, as in
    :func:`context_check`). ``action_rms``: the rms spread of the predicted x0 over the actions;
    ``past_rms``: the rms change from swapping the past for the next segment's, with the real
    action (model space, so the two compare). For Pong, ``moves``: per action, the predicted
    paddle's move from the last context frame (rows, + = down), to set beside :func:`real_moves`."""
    c = segments.context
    x, wrong, base = _first_frame_inputs(segments)
    n, num = x.shape[0], segments.num_actions
    out: dict[str, Any] = {}
    with torch.no_grad():
        for k in levels:
            noise, kk = _first_frame_noise(x, c, seed, k)
            preds = []
            for a in range(num):
                act = base.clone()
                act[:, c] = a
                preds.append(_one_step_x0(wm, x, noise, kk, act, batch_size or n)[0][:, :, c:])
            stack = torch.stack(preds)  # (A, N, C, 1, h, w)
            own = stack[base[:, c], torch.arange(n)]
            other = _one_step_x0(wm, wrong, noise, kk, base, batch_size or n)[0][:, :, c:]
            row: dict[str, Any] = {
                "action_rms": float((stack - stack.mean(0)).pow(2).mean().sqrt()),
                "past_rms": float((own - other).pow(2).mean().sqrt()),
            }
            if paddle:
                last = control.detect_paddle(segments.frames[:, c - 1])
                ys = [control.detect_paddle(to_uint8(_pixels(p, decode))[:, 0]) for p in preds]
                acts = np.broadcast_to(np.arange(num)[:, None], (num, n))
                row["moves"] = control.action_moves(np.broadcast_to(last, (num, n)), np.stack(ys), acts, num)
            out[str(int(k))] = row
    return out


def _pixels(pred: torch.Tensor, decode: Any) -> torch.Tensor:
    return (decode(pred) if decode is not None else pred).clamp(-1, 1)


def real_moves(segments: Segments) -> list[dict[str, Any]]:
    """Per action, the paddle's move between consecutive real frames of the test segments, over the
    frames that action produced: what a model that follows its actions should predict."""
    y = control.detect_paddle(segments.frames)
    produced = np.concatenate([segments.context_actions, segments.actions], 1)
    return control.action_moves(y[:, :-1], y[:, 1:], produced[:, 1:], segments.num_actions)
