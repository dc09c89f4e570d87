"""The files of a training run: ``checkpoints/step-N/``, ``final/``, ``metrics.jsonl``, and the
checkpoint a run resumes from.

Directories appear in one step through :mod:`causalize.fs`, so a reader (or a resumed run) never
sees half a checkpoint. Only a resumed run may replace what an earlier run in the same
``output_dir`` wrote: a fresh run refuses such a directory before it starts, and claims it
atomically (:class:`OutputClaim`) so that two fresh runs cannot share one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from causalize import fs
from causalize.manifest import Manifest
from causalize.training.config import TrainConfig, TrainingError, adapter_has_own_group

__all__ = [
    "CHECKPOINT_DIR",
    "FINAL_DIR",
    "METRICS_FILE",
    "STATE_FILE",
    "TRAINING_FILE",
    "OutputClaim",
    "append_metrics",
    "check_output_dir",
    "holds_run",
    "latest_checkpoint",
    "list_checkpoints",
    "resume_point",
    "save_checkpoint",
    "save_final",
    "truncate_metrics",
]

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
STATE_FILE = "trainer_state.json"
TRAINING_FILE = "training.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

#: Settings that decide which windows, noise, dropout and inputs a step draws: resuming with other
#: values cannot replay the interrupted run; nor can other rates or loss weights (the configured
#: rates replace the checkpoint's). (Not ``model``: a resumed run takes its weights from
#: the checkpoint, and a model of another shape fails to load them.)
_REPLAY_SETTINGS = (
    "seed",
    "batch_size",
    "window",
    "gradient_accumulation",
    "timestep_mode",
    "action_dropout",
    "data",
    "split",
    "vae",
    "conditioning",
    "lr",
    "adapter_lr_scale",
    "motion_weight",
)
#: Settings that are paths: compared resolved, and recorded resolved in trainer_state.json
#: ("paths"), so that a run resumed from another working directory compares the same files.
_PATH_SETTINGS = ("model", "data", "vae", "conditioning")


def _resolved_paths(config: TrainConfig) -> dict[str, str | None]:
    return {k: None if getattr(config, k) is None else str(Path(getattr(config, k)).resolve()) for k in _PATH_SETTINGS}


def _same_setting(key: str, saved: Any, now: Any) -> bool:
    """Equal settings; paths compare resolved (a relative path from a config file and the absolute
    one recorded by the run are the same dataset)."""
    if key in _PATH_SETTINGS and isinstance(saved, str) and isinstance(now, str):
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


# --------------------------------------------------------------------------------------------
# Finding and choosing checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``output_dir/checkpoints/step-N``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``output_dir/checkpoints/step-N`` (None if there is none)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def holds_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds (the start of) a training run: metrics, checkpoints or final/."""
    out = Path(output_dir)
    return (out / METRICS_FILE).exists() or bool(list_checkpoints(out)) or (out / FINAL_DIR).exists()


def _run_exists(out: Path, why: str = "") -> TrainingError:
    return TrainingError(
        f"{out} already holds a training run{why}",
        "continue it with --resume (config: resume = true) or --resume-from DIR, or choose another output directory",
    )


def check_output_dir(config: TrainConfig) -> None:
    """Fail before any work when the run could not write its output directory: a file in the way,
    or (for a fresh run) a directory that already holds a run. Cheap, and torch-free."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output directory {out} is a file", "choose another output directory")
    if config.resume is False and holds_run(out):
        raise _run_exists(out)


def resume_point(config: TrainConfig, is_main: bool) -> tuple[Path | None, int]:
    """(checkpoint to resume from, its step); refuses to mix a fresh run into an old one."""
    out = Path(config.output_dir)
    if config.resume is False:
        if holds_run(out):
            raise _run_exists(out)
        return None, 0
    if config.resume is True:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            return None, 0
    else:
        ckpt = Path(config.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise TrainingError(f"not a training checkpoint: {ckpt} (no {STATE_FILE})")
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    saved = {**state.get("config", {}), **state.get("paths", {})}  # paths: as resolved by the saving run
    _check_groups(ckpt, saved, config)
    differs = [k for k in _REPLAY_SETTINGS if k in saved and not _same_setting(k, saved[k], getattr(config, k))]
    if differs and is_main:
        warnings.warn(
            f"resuming from {ckpt} with different {', '.join(differs)}: the run will not replay the uninterrupted one",
            stacklevel=4,
        )
    return ckpt, int(state["step"])


def _check_groups(ckpt: Path, saved: dict, config: TrainConfig) -> None:
    """Refuse a resume whose optimizer would hold other parameters or another number of parameter
    groups (`adapter_has_own_group`) than the checkpoint's: torch cannot load its state."""
    trained = saved.get("train_only", config.train_only)
    if trained != config.train_only:
        raise TrainingError(
            f"{ckpt} was trained with train_only={trained!r}, this run asks for {config.train_only!r}: "
            "the optimizer state belongs to other parameters and cannot carry over",
            f"resume with --train-only {trained}, or start a fresh run from the checkpoint's weights",
        )
    before = float(saved.get("adapter_lr_scale", 1.0))
    if adapter_has_own_group(trained, before) != adapter_has_own_group(config.train_only, config.adapter_lr_scale):
        raise TrainingError(
            f"{ckpt} was trained with adapter_lr_scale={before:g}, this run asks for {config.adapter_lr_scale:g}: "
            "one of them gives the adapter a rate of its own, the other not, and the optimizer state cannot carry over",
            "resume with the checkpoint's adapter_lr_scale, or start a fresh run",
        )


# --------------------------------------------------------------------------------------------
# Claiming the output directory
# --------------------------------------------------------------------------------------------


class RunLock:
    """One live run per output directory, fresh or resumed: `OUT/.causalize-run.lock`, created
    exclusively and holding the PID, for the whole run. Two resumed runs started on the same
    directory would otherwise both write its checkpoints; a lock whose process is gone (a killed
    run) is stale and taken over."""

    NAME = ".causalize-run.lock"

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / self.NAME
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._holder()
                if pid is not None and fs.process_alive(pid) and pid != os.getpid():
                    raise TrainingError(
                        f"{self.path.parent} is being trained by another run (pid {pid})",
                        "wait for it to finish, or choose another output directory",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return
        raise TrainingError(f"cannot lock {self.path.parent} for training", "another run keeps taking it")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._holder() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class OutputClaim:
    """A fresh run's hold on its output directory, taken in one atomic step: the exclusive creation
    (``O_CREAT | O_EXCL``) of an empty ``metrics.jsonl``, which also marks the directory as
    holding a run. Of two runs started on the same directory at once exactly one gets it; the
    other fails before writing anything. A resumed run continues what is there and claims nothing.

    ``release()`` undoes the claim when the run fails before its first step (nothing written on
    error): it removes only what this claim created, the still-empty metrics file and the
    directory if it made it and it is empty.
    """

    def __init__(self, output_dir: str | Path, fresh: bool):
        self.out = Path(output_dir)
        self.made_dir = False
        self.made_metrics = False
        try:
            self.out.mkdir(parents=True)
            self.made_dir = True
        except FileExistsError:
            if not self.out.is_dir():
                raise TrainingError(
                    f"output directory {self.out} is a file", "choose another output directory"
                ) from None
        if not fresh:
            return
        try:
            os.close(os.open(self.out / METRICS_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            self.release()
            raise _run_exists(self.out, " (another run claimed it first)") from None
        self.made_metrics = True
        if list_checkpoints(self.out) or (self.out / FINAL_DIR).exists():
            self.release()
            raise _run_exists(self.out)

    def release(self) -> None:
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
        metrics = self.out / METRICS_FILE
        if self.made_metrics:
            with contextlib.suppress(OSError):
                if metrics.stat().st_size == 0:
                    metrics.unlink()
            self.made_metrics = False
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
                self.out.rmdir()
            self.made_dir = False


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line per logged step (an append-only log: no temporary, no rename)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metrics lines of steps later than the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= after_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    fs.write_text(path, "".join(line + "\n" for line in keep), overwrite=True)


# --------------------------------------------------------------------------------------------
# Writing checkpoints and the final model
# --------------------------------------------------------------------------------------------


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int, loss: float) -> Path:
    """``checkpoints/step-N``: ``accelerator.save_state`` (every process writes its part) plus
    ``trainer_state.json``, in a temporary directory renamed into place by the main process."""
    dest = Path(config.output_dir) / CHECKPOINT_DIR / f"step-{step}"
    if accelerator.is_main_process:
        fs.clean_stale(dest)  # temporaries of a killed run
    with _shared_new_directory(accelerator, dest, overwrite=_may_replace(config)) as tmp:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "loss": loss, "config": config.to_json(), "paths": _resolved_paths(config)}
            _write_json(tmp / STATE_FILE, state)
    if accelerator.is_main_process and config.keep_checkpoints:
        for _, old in list_checkpoints(config.output_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return dest


def save_final(wm: Any, config: TrainConfig, step: int, loss: float, resumed_from: Path | None) -> Path:
    """``final/``: the trained denoiser (safetensors), the conversion manifest of the model it
    started from and ``training.json`` (step, loss, settings), so that
    ``WorldModel.from_pretrained`` loads it and rollout picks up the training settings; with them
    a copy of the conditioning file (``conditioning.safetensors``) and, for data made by
    ``causalize encode``, its latent record (``latent.json``: the VAE and the action grouping),
    so that rollout uses the same inputs and decodes with the same VAE. Main process only."""
    final = Path(config.output_dir) / FINAL_DIR
    fs.clean_stale(final)  # temporaries of a killed run
    with fs.new_directory(final, overwrite=_may_replace(config)) as tmp:
        wm.model.save_pretrained(tmp, safe_serialization=True)
        Manifest.read(Path(config.model)).write(tmp)
        _write_json(
            tmp / TRAINING_FILE,
            {
                "step": step,
                "final_loss": loss,
                "config": config.to_json(),
                "resumed_from": None if resumed_from is None else str(resumed_from),
                # how an I2V model's image was un-normalised (SVD; rollout reads it back)
                "latent_norm": None if getattr(wm, "latent_norm", None) is None else wm.latent_norm.to_json(),
            },
        )
        _store_inputs(tmp, config)
    return final


def _store_inputs(final: Path, config: TrainConfig) -> None:
    """The conditioning file and the dataset's latent record, beside the model."""
    from causalize.episodes import read_info
    from causalize.latents.record import RECORD_FILE, RECORD_KEY
    from causalize.rollout.conditioning import CONDITIONING_FILE

    if config.conditioning is not None:
        fs.write_bytes(final / CONDITIONING_FILE, Path(config.conditioning).read_bytes())
    record = read_info(config.data).extra_fields.get(RECORD_KEY)
    if record is not None:
        fs.write_json(final / RECORD_FILE, record, indent=2)


def _may_replace(config: TrainConfig) -> bool:
    """A resumed run redoes steps, so it replaces their checkpoints and the final model; a fresh
    run found none (resume_point), and replacing one that appeared meanwhile would lose data."""
    return config.resume is not False


@contextlib.contextmanager
def _shared_new_directory(accelerator: Any, dest: Path, overwrite: bool) -> Iterator[Path]:
    """fs.new_directory on the main process, its temporary path sent to every process (each
    writes its own RNG state there); the main process renames it into place on exit."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(fs.new_directory(dest, overwrite=overwrite)) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            tmp = broadcast_object_list([tmp])[0]
        yield tmp


def _write_json(path: Path, obj: Any) -> None:
    """Indented JSON through fs.write_text rather than fs.write_json: the loss of a diverged run
    (or of a resume past the last step) is NaN, which must not fail the save."""
    fs.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
