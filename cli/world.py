"""The world-model commands: `train` (Diffusion Forcing fine-tuning) and `rollout` (generation
from actions). Registered on the app in cli/app.py; thin over causalize.training and causalize.rollout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer
from rich.markup import escape

from causalize.cli.common import DTYPE_OPT, JSON_OPT, check_precision_names, emit_json, err, guard
from causalize.errors import UsageError


def train(
    config: Path | None = typer.Argument(
        None,
        metavar="CONFIG",
        help="Training settings as a .json or .toml file (keys: the fields of causalize.training.trainer.TrainConfig).",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        metavar="PATH",
        help="Converted checkpoint with an action adapter (causalize convert SRC OUT --action-dim N).",
    ),
    data: Path | None = typer.Option(None, "--data", metavar="DIR", help="Episode dataset root (docs/EPISODES.md)."),
    out_dir: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Output directory: metrics.jsonl, checkpoints/, final/."
    ),
    steps: int | None = typer.Option(None, "--steps", metavar="N", help="Optimizer steps to reach."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", metavar="N", help="Windows per device per micro-batch."
    ),
    lr: float | None = typer.Option(None, "--lr", metavar="X", help="AdamW learning rate (default 1e-5)."),
    window: int | None = typer.Option(None, "--window", metavar="N", help="Frames per training window (default 16)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output directory."),
    skip_short: bool = typer.Option(
        False,
        "--skip-short",
        help="Skip episodes shorter than the window (with a warning) instead of refusing the dataset.",
    ),
    mixed_precision: str | None = typer.Option(
        None,
        "--mixed-precision",
        "--dtype",
        metavar="no|bf16|fp16",
        help="accelerate's mixed precision: weights stay fp32, the forward runs in bf16 / fp16 (default: no).",
    ),
    device: str | None = typer.Option(
        None,
        "--device",
        metavar="cpu|cuda",
        help="cpu trains on the CPU even where CUDA exists (default: accelerate's choice).",
    ),
    gradient_checkpointing: bool | None = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in backward (less memory).",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Fine-tune a converted world model with the Diffusion Forcing objective.

    Per-frame noise levels, v-prediction on a zero-terminal-SNR schedule, per-frame action
    dropout, AdamW with gradient clipping (METHOD.md §6-§7), through accelerate: run it under
    `accelerate launch` for several GPUs. Options override the config file. Progress goes to
    stderr; stdout gets the final model's path (or a JSON summary with --json).

    \b
    Examples:
      causalize train --model ./wm --data ./episodes --out ./run --steps 1000
      causalize train run.toml --resume
      accelerate launch -m causalize.cli.app train run.toml

    \b
    Exit codes:
      0  trained; OUT/final holds the model
      2  usage error: missing or mismatched model / data (channels, action dimension), invalid or
         damaged episodes (checked before OUT is created), OUT already holds a run (or another run
         claimed it first), bad setting
      3  internal error (re-run with --debug for the traceback)
      4  the model checkpoint cannot be read
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    overrides = {
        "model": model,
        "data": data,
        "output_dir": out_dir,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "window": window,
        "resume": True if resume else None,
        "mixed_precision": {"fp32": "no"}.get(mixed_precision, mixed_precision),
        "device": device,
        "gradient_checkpointing": gradient_checkpointing,
        "skip_short": True if skip_short else None,
    }
    bar = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = bar.add_task("train", total=None, loss="-", start=False)
    leader = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`: one bar, one summary

    def on_step(step: int, total: int, loss: float) -> None:
        if leader and not bar.live.is_started:  # shown from the first step: set-up errors stay one line
            bar.start()
            bar.start_task(task)
        bar.update(task, completed=step, total=total, loss=f"{loss:.4g}")

    with guard(as_json, command="train"):
        # Settings and paths first, without torch: a wrong path fails in well under a second.
        from causalize.training.config import TrainConfig
        from causalize.training.loading import check_paths

        cfg = TrainConfig.from_file(config, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
        check_paths(cfg)
        from causalize.training.trainer import train as run_training

        try:
            result = run_training(cfg, progress=on_step)
        finally:
            if bar.live.is_started:  # stopping a bar never shown would print an empty line
                bar.stop()
    if not leader:
        return
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"trained to step {result['steps']} ({result['steps_run']} steps this run) in {result['seconds']:.1f}s, "
            f"final loss {result['final_loss']:.4g}: {result['final']}"
        )


def parse_seed(text: str | None) -> int | None:
    """--seed as an integer (typer would accept only what fits its own int parsing, and report a
    bad value in a multi-line usage box); the range is RolloutConfig's to check."""
    if text is None:
        return None
    value = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise UsageError(
            f"--seed must be an integer, got {text!r}", "seeds are whole numbers from 0 to 2**64 - 1, e.g. --seed 1"
        )
    return int(value)


def rollout(
    checkpoint: Path = typer.Argument(
        ...,
        metavar="CHECKPOINT",
        help="Converted world model with an action adapter (or a training run directory holding final/).",
    ),
    context: Path = typer.Option(
        ...,
        "--context",
        metavar="FRAMES",
        help="Context frames: episode .npz (frames or latents), .npy, or a video / image (.mp4, .gif, .png).",
    ),
    actions: Path = typer.Option(
        ...,
        "--actions",
        metavar="ACTIONS",
        help="One action per generated frame: .npy, .npz (key actions), .json list, or text (one per line).",
    ),
    out_path: Path = typer.Option(
        ...,
        "--out",
        metavar="OUT",
        help="Output: .mp4, .gif (pixels) or .npz (pixels or latents + actions + settings).",
    ),
    context_frames: int | None = typer.Option(
        None, "--context-frames", metavar="K", help="Use the first K frames of FRAMES (default: all)."
    ),
    steps: int | None = typer.Option(None, "--steps", metavar="S", help="Denoising steps per frame (default 50)."),
    sampler: str | None = typer.Option(None, "--sampler", metavar="NAME", help="ddim (default) or euler."),
    spacing: str | None = typer.Option(None, "--spacing", metavar="NAME", help="trailing (default) or uniform."),
    eta: float | None = typer.Option(
        None, "--eta", metavar="X", help="DDIM eta in [0, 1] (default 0: deterministic steps)."
    ),
    history_noise: str | None = typer.Option(
        None, "--history-noise", metavar="K", help="History noise level: an integer, or second_to_last (default)."
    ),
    window: int | None = typer.Option(
        None,
        "--window",
        metavar="L",
        help="Sliding window incl. the current frame (default: training.json's window, else 16).",
    ),
    guidance_scale: float | None = typer.Option(
        None, "--guidance-scale", metavar="S", help="Causal action guidance scale (default 2.5; 1 disables guidance)."
    ),
    guidance_rescale: float | None = typer.Option(
        None, "--guidance-rescale", metavar="PHI", help="Guidance rescale in [0, 1] (default 0.7)."
    ),
    prediction_type: str | None = typer.Option(
        None, "--prediction-type", metavar="NAME", help="v, epsilon or sample (default: training.json's, else v)."
    ),
    zero_terminal_snr: bool | None = typer.Option(
        None,
        "--zero-terminal-snr/--no-zero-terminal-snr",
        help="Schedule rescaled to zero terminal SNR (default: training.json's, else on).",
    ),
    no_cache: bool = typer.Option(
        False,
        "--no-cache",
        help="Recompute the whole window at every step instead of streaming caches (same frames, slower).",
    ),
    seed: str | None = typer.Option(
        None, "--seed", metavar="N", help="Seed of all noise: an integer from 0 to 2**64 - 1 (default 0)."
    ),
    fps: float = typer.Option(8.0, "--fps", metavar="F", help="Frames per second of .mp4 / .gif output."),
    generated_only: bool = typer.Option(
        False, "--generated-only", help="Write only the generated frames (default: context frames first)."
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda when available)."
    ),
    dtype: str | None = DTYPE_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    as_json: bool = JSON_OPT,
) -> None:
    """Generate frames from context frames and actions with a world model, and write a clip.

    Every action produces one frame: actions[i] is taken after the last known frame and yields
    generated frame i (autoregressive sampling with causal action guidance and exact streaming
    caches); context frames get the null action. To replay an episode after its first K frames,
    pass its actions from row K-1 on (row t is the action taken after frame t). OUT holds the context frames followed by the generated ones (--generated-only: only
    those); .npz also stores the actions, the settings and the timing. Pixel frames are uint8
    (model space x/127.5 - 1); latent frames (float) can only be written to .npz.

    Sampler settings: an option given here wins, else the checkpoint's training.json
    (prediction_type, zero_terminal_snr, window), else the built-in default. Progress goes to
    stderr, then a per-frame timing summary; stdout gets OUT (or a JSON summary with --json).
    Inputs are checked before the model runs, and OUT is written atomically: on any error
    nothing is written, and an existing OUT is kept unless --overwrite.

    \b
    Examples:
      causalize rollout ./run/final --context episode.npz --context-frames 4 --actions acts.txt --out clip.mp4
      causalize rollout ./wm --context start.png --actions acts.json --out clip.gif --steps 20 --seed 1
      causalize rollout ./wm --context ctx.npz --actions acts.npy --out roll.npz --no-cache --json

    \b
    Actions files: discrete adapters take integer indices (one per line / a 1-D array) or 0/1
    multi-hot rows; continuous ones take rows of A numbers ("0.1 -0.5 0.0" or "0.1,-0.5,0.0").

    \b
    Exit codes:
      0  written
      2  usage error: unreadable or malformed file, wrong action dimension / dtype / range, NaN,
         too few context frames, OUT exists, no action adapter in the checkpoint, bad setting
      3  internal error (re-run with --debug for the traceback)
      4  the checkpoint cannot be read
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = bar.add_task("rollout", total=None, speed="", start=False)

    def on_frame(done: int, total: int, seconds: float) -> None:
        if not bar.live.is_started:  # shown from the first frame: input errors stay one line
            bar.start()
            bar.start_task(task)
        bar.update(task, completed=done, total=total, speed=f"{seconds:.2f} s/frame")

    options = {
        "steps": steps,
        "sampler": sampler,
        "spacing": spacing,
        "eta": eta,
        "window": window,
        "history_noise": int(history_noise) if history_noise and history_noise.isdigit() else history_noise,
        "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale,
        "prediction_type": prediction_type,
        "zero_terminal_snr": zero_terminal_snr,
        "cache": False if no_cache else None,
    }
    with guard(as_json, command="rollout"):
        check_precision_names(dtype)
        options["seed"] = parse_seed(seed)
        # Paths first, without torch (causalize.rollout.to_file imports it only to run the model):
        # a missing file or an existing OUT fails in well under a second.
        from causalize.rollout.to_file import check_rollout_paths, rollout_to_file

        check_rollout_paths(checkpoint, context, actions, out_path, overwrite=overwrite)
        try:
            report = rollout_to_file(
                checkpoint,
                context,
                actions,
                out_path,
                context_frames=context_frames,
                overwrite=overwrite,
                fps=fps,
                include_context=not generated_only,
                device=device,
                dtype=dtype,
                progress=on_frame,
                **options,
            )
        finally:
            if bar.live.is_started:  # stopping a bar never shown would print an empty line
                bar.stop()
    t = report.timing
    err.print(
        f"[green]wrote[/] {escape(str(report.out))}: {report.context_frames} context + {report.generated} generated frames "
        f"({report.kind}) in {report.seconds:.1f}s"
    )
    err.print(
        f"seconds per frame: mean {t['mean']:.3f}, median {t['median']:.3f}, min {t['min']:.3f}, max {t['max']:.3f}; "
        f"cache: {report.cache_mode}; frame passes: {report.frame_passes} ({report.model_calls} model calls)"
    )
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo(str(report.out))
