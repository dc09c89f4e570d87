"""``causalize encode``: a pixel episode dataset becomes a latent one, every episode encoded as a
whole clip through the pipeline's VAE and normalised as its pipeline does, actions grouped onto
latent frames (causalize.latents.actions), the VAE and the alignment recorded in dataset.json.

Safe to interrupt: the work happens in ``OUT.encoding/`` (every episode written atomically), and
``OUT`` appears, complete, by one rename at the end. Running the same command again resumes from
the episodes already there; different settings are refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from causalize import fs
from causalize.episodes import DataError, DatasetInfo, episode_path, episode_problems, list_episodes, read_info
from causalize.episodes.reader import read_headers
from causalize.errors import UsageError
from causalize.latents.spec import VaeError, VaeSpec, read_spec

__all__ = ["EncodeJob", "EncodeReport", "encode_episodes", "plan_encode"]

STAGING_SUFFIX = ".encoding"
JOB_FILE = "encode-job.json"
Progress = Callable[[int, int, int, float], None]  # episodes done, total, video frames done, seconds


@dataclass
class EncodeJob:
    """What an encode will do, checked without torch: the episodes, their lengths, the trims."""

    src: Path
    out: Path
    info: DatasetInfo
    spec: VaeSpec
    lengths: dict[int, int]
    trimmed: dict[int, tuple[int, int]]
    settings: dict[str, Any]

    @property
    def staging(self) -> Path:
        return self.out.with_name(self.out.name + STAGING_SUFFIX)


@dataclass
class EncodeReport:
    out: Path
    episodes: int
    encoded: int
    resumed: int
    video_frames: int
    latent_frames: int
    seconds: float
    trimmed: dict[int, tuple[int, int]] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None

    @property
    def frames_per_second(self) -> float | None:
        return self.video_frames / self.seconds if self.seconds > 0 and self.video_frames else None

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "episodes": self.episodes,
            "encoded": self.encoded,
            "resumed": self.resumed,
            "video_frames": self.video_frames,
            "latent_frames": self.latent_frames,
            "seconds": self.seconds,
            "frames_per_second": self.frames_per_second,
            "trimmed": {str(k): list(v) for k, v in self.trimmed.items()},
            "vae": self.vae,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def plan_encode(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vae: str | os.PathLike,
    *,
    subfolder: str | None = None,
    trim: bool = False,
    sample: bool = False,
    dtype: str | None = None,
) -> EncodeJob:
    """Every check that needs no torch and no weights: the source is a valid pixel dataset, OUT
    is free (or a resumable encode of the same job), the VAE's class is known and fits the frames,
    and every episode's length follows the VAE's frame rule (or is trimmed, with ``trim``)."""
    src_p, out_p = Path(src), Path(out)
    info = _read_source(src_p)
    spec = read_spec(vae, subfolder)
    _check_fit(spec, info, src_p)
    lengths = _episode_lengths(src_p, info)
    trimmed = _trims(spec, lengths, src_p, trim)
    settings = {
        "src": str(src_p.resolve()),
        "vae": spec.path,
        "vae_class": spec.class_name,
        "trim": trim,
        "posterior": "sample" if sample else "mode",
        "dtype": dtype or "float32",
    }
    job = EncodeJob(src_p, out_p, info, spec, lengths, trimmed, settings)
    _check_out(job)
    return job


def _read_source(src: Path) -> DatasetInfo:
    if not src.exists():
        raise UsageError(f"episodes not found: {src}", "give the root of a pixel episode dataset (docs/EPISODES.md)")
    info = read_info(src)
    if info.kind != "pixels":
        raise UsageError(f"{src} already stores {info.kind}", "encode takes a pixel dataset")
    return info


def _check_fit(spec: VaeSpec, info: DatasetInfo, src: Path) -> None:
    h, w, c = info.shape
    if c != spec.pixel_channels:
        raise VaeError(
            f"{src}: frames have {c} channels but {spec.class_name} takes {spec.pixel_channels}",
            "use the VAE of the pipeline the frames were made for",
        )
    f = spec.spatial_factor
    if h % f or w % f:
        raise VaeError(
            f"{src}: frames of {h}×{w} pixels do not divide by {spec.class_name}'s spatial factor {f}",
            f"resize or crop the episodes to multiples of {f}",
        )


def _episode_lengths(src: Path, info: DatasetInfo) -> dict[int, int]:
    lengths, problems = {}, []
    for index in list_episodes(src):
        path = episode_path(src, index)
        length, found = episode_problems(read_headers(path), info)
        if found:
            problems.append(f"{path}: {found[0]}")
        lengths[index] = length
    if problems:
        raise DataError(src, f"{len(problems)} invalid episode(s): " + "; ".join(problems[:5]))
    if not lengths:
        raise DataError(src, "no episodes to encode")
    return lengths


def _trims(spec: VaeSpec, lengths: dict[int, int], src: Path, trim: bool) -> dict[int, tuple[int, int]]:
    rule = spec.grouping
    bad = {i: t for i, t in lengths.items() if not rule.fits(t)}
    if not bad:
        return {}
    names = ", ".join(f"{episode_path(src, i).name} ({t} frames)" for i, t in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    if not trim:
        raise UsageError(
            f"{len(bad)} episode(s) do not fit {spec.class_name}'s frame rule, {rule.rule()}: {names}{more}",
            "pass --trim to drop each one's last frames down to the nearest fitting length",
        )
    too_short = [i for i, t in bad.items() if rule.trimmed(t) < 1]
    if too_short:
        raise UsageError(
            f"{episode_path(src, too_short[0]).name} has {bad[too_short[0]]} frames: too short for {rule.rule()}",
            "remove it from the dataset",
        )
    return {i: (t, rule.trimmed(t)) for i, t in bad.items()}


def _check_out(job: EncodeJob) -> None:
    if job.out.exists() or job.out.is_symlink():
        raise UsageError(f"{job.out} exists", "choose a new OUT; encode never writes into an existing directory")
    if not job.out.parent.is_dir():
        raise UsageError(f"{job.out.parent} does not exist", "create the parent directory first")
    if job.out.resolve() == job.src.resolve() or job.src.resolve() in job.out.resolve().parents:
        raise UsageError(f"{job.out} lies inside the source dataset {job.src}", "write the latents elsewhere")
    if job.staging.exists():
        _check_resumable(job)


def _check_resumable(job: EncodeJob) -> None:
    f = job.staging / JOB_FILE
    try:
        previous = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise UsageError(
            f"{job.staging} exists but is not an unfinished encode ({f.name} missing or unreadable)",
            "delete it, or choose another OUT",
        ) from None
    changed = [k for k, v in job.settings.items() if previous.get(k) != v]
    if changed:
        k = changed[0]
        raise UsageError(
            f"{job.staging} holds an unfinished encode with {k}={previous.get(k)!r}, not {job.settings[k]!r}",
            "run it again with the same settings to resume, or delete it to start over",
        )


# ---- running ------------------------------------------------------------------------------------


def encode_episodes(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vae: str | os.PathLike,
    *,
    subfolder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 1,
    trim: bool = False,
    sample: bool = False,
    progress: Progress | None = None,
) -> EncodeReport:
    """Encode the pixel dataset ``src`` into the latent dataset ``out`` (see the module docstring).

    ``batch_size``: video VAEs encode up to this many equal-length episodes per call; image VAEs
    encode this many frames per call. ``sample`` draws latents from the posterior instead of
    taking its mode. Returns what was done; ``out`` exists only once every episode is encoded."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    job = plan_encode(src, out, vae, subfolder=subfolder, trim=trim, sample=sample, dtype=dtype)
    import torch

    from causalize.latents.vae import load_vae

    model, spec = load_vae(job.spec.path, device=device, dtype=dtype)
    t0 = time.perf_counter()  # encoding time: after the VAE (and diffusers) are loaded
    _start_staging(job, spec)
    todo = [i for i in job.lengths if not episode_path(job.staging, i).is_file()]
    resumed = len(job.lengths) - len(todo)
    frames_done = latent_done = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    done = resumed
    for group in _batches(job, todo, spec, batch_size):
        frames_done, latent_done = _encode_group(job, model, spec, group, batch_size, sample, frames_done, latent_done)
        done += len(group)
        if progress is not None:
            progress(done, len(job.lengths), frames_done, time.perf_counter() - t0)
    (job.staging / JOB_FILE).unlink()
    fs.rename_noreplace(job.staging, job.out)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return EncodeReport(
        out=job.out,
        episodes=len(job.lengths),
        encoded=len(todo),
        resumed=resumed,
        video_frames=frames_done,
        latent_frames=latent_done,
        seconds=time.perf_counter() - t0,
        trimmed=job.trimmed,
        vae=spec.to_json(),
        peak_memory_bytes=peak,
    )


def _start_staging(job: EncodeJob, spec: VaeSpec) -> None:
    """``OUT.encoding/`` with dataset.json (the latent record included) and the job file."""
    from causalize.episodes import create_dataset
    from causalize.latents.actions import latent_action_space
    from causalize.latents.record import RECORD_KEY, LatentRecord

    if job.staging.exists():
        return
    h, w, _ = job.info.shape
    f = spec.spatial_factor
    record = LatentRecord(
        vae=spec,
        video_action_space=job.info.action_space,
        pixel_shape=job.info.shape,
        posterior=job.settings["posterior"],
        dtype=job.settings["dtype"],
        source=job.settings["src"],
        trimmed={str(k): list(v) for k, v in job.trimmed.items()},
    )
    with fs.new_directory(job.staging) as tmp:
        create_dataset(
            tmp,
            latent_action_space(job.info.action_space, spec.grouping.factor),
            frame_shape=(spec.latent_channels, h // f, w // f),
            kind="latents",
            extras=job.info.extras,
            fps=None if job.info.fps is None else job.info.fps / spec.grouping.factor,
            source=job.info.source,
            extra={RECORD_KEY: record.to_json()},
        )
        fs.write_json(tmp / JOB_FILE, job.settings)


def _batches(job: EncodeJob, todo: list[int], spec: VaeSpec, batch_size: int) -> list[list[int]]:
    """Consecutive episodes of one length, up to ``batch_size`` (video VAEs); one each otherwise."""
    groups: list[list[int]] = []
    for i in todo:
        n = _length(job, i)
        if spec.video and groups and len(groups[-1]) < batch_size and _length(job, groups[-1][0]) == n:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _length(job: EncodeJob, index: int) -> int:
    return job.trimmed[index][1] if index in job.trimmed else job.lengths[index]


def _encode_group(
    job: EncodeJob,
    model: Any,
    spec: VaeSpec,
    group: list[int],
    batch_size: int,
    sample: bool,
    frames: int,
    latents: int,
) -> tuple[int, int]:
    import torch

    from causalize.episodes import read_arrays, verify_crc
    from causalize.latents.vae import encode_clip

    arrays = []
    for i in group:
        path = episode_path(job.src, i)
        bad = verify_crc(path)
        if bad:
            raise DataError(path, f"damaged: {bad[0]}", hint="restore the episode from its source")
        arrays.append(read_arrays(path))
    n = _length(job, group[0])
    clip = torch.stack([torch.from_numpy(np.array(a["frames"][:n])) for a in arrays])
    clip = clip.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, C, T, H, W) in [-1, 1]
    z = encode_clip(model, spec, clip, chunk=batch_size, sample=sample)
    for i, a, zi in zip(group, arrays, z):
        _write_latent_episode(job, spec, i, a, zi.movedim(1, 0).cpu().numpy(), n)
        frames, latents = frames + n, latents + zi.shape[1]
    return frames, latents


def _write_latent_episode(job: EncodeJob, spec: VaeSpec, index: int, arrays: dict, z: np.ndarray, n: int) -> None:
    from causalize.episodes import write_episode
    from causalize.latents.actions import group_actions, group_extras

    J, grouping = z.shape[0], spec.grouping
    extras = {}
    if "rewards" in job.info.extras:
        extras["rewards"] = group_extras(arrays["rewards"][:n], grouping, J, "sum")
    if "dones" in job.info.extras:
        extras["dones"] = group_extras(arrays["dones"][:n], grouping, J, "any")
    actions = group_actions(arrays["actions"][:n], job.info.action_space, grouping, J)
    fs.clean_stale(episode_path(job.staging, index))
    write_episode(job.staging, index, latents=z.astype(np.float32), actions=actions, **extras)
