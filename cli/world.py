"""The world-model commands: `train` (Diffusion Forcing fine-tuning) and `rollout` (generation
from actions). Registered on the app in cli/app.py; thin over causalize.training and causalize.rollout."""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer
from rich.markup import escape

from causalize.cli.common import DTYPE_OPT, JSON_OPT, LazyBar, check_precision_names, emit_json, err, guard
from causalize.errors import UsageError


def train(
    # Every parameter but config, resume_from and as_json is named like the TrainConfig field it
    # sets: the body passes them on by name (tests/test_train_cli_options.py walks the fields).
    # Defaults are None, "unset": the config file's value (or TrainConfig's default) stands.
    config: Path | None = typer.Argument(
        None,
        metavar="CONFIG",
        help="Training settings as a .json or .toml file; its keys are the options below in snake_case "
        "(--out: output_dir, --resume-from: resume).",
    ),
    # -- what to train, on what, where
    model: Path | None = typer.Option(
        None,
        "--model",
        metavar="PATH",
        help="Converted checkpoint with an action adapter (causalize convert SRC OUT --action-dim N).",
    ),
    data: Path | None = typer.Option(None, "--data", metavar="DIR", help="Episode dataset root (docs/EPISODES.md)."),
    output_dir: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="Output directory: metrics.jsonl, checkpoints/, final/."
    ),
    steps: int | None = typer.Option(None, "--steps", metavar="N", help="Optimizer steps to reach (default 1000)."),
    resume: bool | None = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue from the newest checkpoint in OUT (a fresh run if there is none); --no-resume: a fresh run, "
        "refused if OUT holds one (the default).",
    ),
    resume_from: Path | None = typer.Option(
        None, "--resume-from", metavar="DIR", help="Continue from this checkpoint directory (OUT/checkpoints/step-N)."
    ),
    vae: Path | None = typer.Option(
        None,
        "--vae",
        metavar="PATH",
        help="Frozen image VAE (AutoencoderKL directory, or a pipeline with vae/): train on its latents of the "
        "dataset's pixels (default: none, the frames as stored).",
    ),
    conditioning: Path | None = typer.Option(
        None,
        "--conditioning",
        metavar="FILE",
        help="Safetensors file of model keyword arguments at batch 1, e.g. encoder_hidden_states of the empty "
        "prompt (default: zeros).",
    ),
    train_only: str | None = typer.Option(
        None,
        "--train-only",
        metavar="all|adapter",
        help="Train the whole denoiser, or only the action encoder (default: all).",
    ),
    # -- optimizer
    batch_size: int | None = typer.Option(
        None, "--batch-size", metavar="N", help="Windows per device per micro-batch (default 2)."
    ),
    gradient_accumulation: int | None = typer.Option(
        None, "--gradient-accumulation", metavar="N", help="Micro-batches per optimizer step (default 1)."
    ),
    lr: float | None = typer.Option(None, "--lr", metavar="X", help="AdamW learning rate (default 1e-5)."),
    adapter_lr_scale: float | None = typer.Option(
        None,
        "--adapter-lr-scale",
        metavar="X",
        help="The action adapter's learning rate as a multiple of --lr: the new, zero-initialised adapter may "
        "need a higher rate than the pretrained denoiser (default 1).",
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", metavar="X", help="AdamW decoupled weight decay (default 0.01)."
    ),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", metavar="X", help="Clip the global gradient norm to X (default 0.5; 0 disables)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", metavar="N", help="Seed of data order, noise levels, noise and action dropout (default 0)."
    ),
    # -- objective
    window: int | None = typer.Option(None, "--window", metavar="N", help="Frames per training window (default 16)."),
    prediction_type: str | None = typer.Option(
        None, "--prediction-type", metavar="v|epsilon", help="What the denoiser predicts (default: v)."
    ),
    zero_terminal_snr: bool | None = typer.Option(
        None,
        "--zero-terminal-snr/--no-zero-terminal-snr",
        help="Rescale the noise schedule to zero terminal SNR (default: on).",
    ),
    action_dropout: float | None = typer.Option(
        None,
        "--action-dropout",
        metavar="P",
        help="Probability in [0, 1) of replacing a frame's action by the null action (default 0.2).",
    ),
    motion_weight: float | None = typer.Option(
        None,
        "--motion-weight",
        metavar="X",
        help="Weight the loss towards elements that change between frames (small moving objects on a static "
        "scene); weights 1 + X x relative change, mean 1 (default 0: the plain loss).",
    ),
    timestep_mode: str | None = typer.Option(
        None,
        "--timestep-mode",
        metavar="independent|shared",
        help="A noise level per sample and frame (Diffusion Forcing, the default), or one per sample.",
    ),
    # -- data
    split: str | None = typer.Option(
        None,
        "--split",
        metavar="train|test|all",
        help="Episodes to train on: train (the default), test or all; a fixed split by episode index (README).",
    ),
    test_fraction: float | None = typer.Option(
        None, "--test-fraction", metavar="F", help="Fraction of episodes held out as the test split (default 0.1)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", metavar="N", help="Step between window starts inside an episode (default 1)."
    ),
    num_workers: int | None = typer.Option(
        None, "--num-workers", metavar="N", help="DataLoader worker processes (default 0: the training process)."
    ),
    verify_data: bool | None = typer.Option(
        None,
        "--verify-data/--no-verify-data",
        help="Read every episode once at the start against its checksums (default: on).",
    ),
    skip_short: bool | None = typer.Option(
        None,
        "--skip-short/--no-skip-short",
        help="Skip episodes shorter than the window (with a warning) instead of refusing the dataset (default: off).",
    ),
    # -- checkpoints and metrics
    checkpoint_every: int | None = typer.Option(
        None,
        "--checkpoint-every",
        metavar="N",
        help="Save OUT/checkpoints/step-N every N steps and at the last (default 500; 0: never).",
    ),
    keep_checkpoints: int | None = typer.Option(
        None, "--keep-checkpoints", metavar="N", help="Keep only the newest N checkpoints (default 0: all)."
    ),
    log_every: int | None = typer.Option(
        None,
        "--log-every",
        metavar="N",
        help="Write a metrics.jsonl line every N steps and at the last (default 10).",
    ),
    log_per_frame: bool | None = typer.Option(
        None,
        "--log-per-frame/--no-log-per-frame",
        help="Include the loss per frame index in every metrics line (default: on).",
    ),
    # -- hardware
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
        help="Recompute activations in backward (less memory; default: off).",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Fine-tune a converted world model with the Diffusion Forcing objective.

    Per-frame noise levels, v-prediction on a zero-terminal-SNR schedule, per-frame action
    dropout, AdamW with gradient clipping (METHOD.md §6-§7), through accelerate: run it under
    `accelerate launch` for several GPUs. Every setting is an option and a config key; options
    override the config file, an option not given keeps the file's value. Progress goes to
    stderr; stdout gets the final model's path (or a JSON summary with --json).

    \b
    Examples:
      causalize train --model ./wm --data ./episodes --out ./run --steps 1000
      causalize train run.toml --resume
      causalize train run.toml --steps 2000 --resume-from ./run/checkpoints/step-500
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
    options = dict(locals())  # first: the parameters only, most named like TrainConfig's fields
    leader = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`: one bar, one summary
    bar = LazyBar("training", "loss {task.fields[loss]}", shown=leader, loss="-")

    def on_step(step: int, total: int, loss: float) -> None:
        bar.update(step, total, loss=f"{loss:.4g}")

    with guard(as_json, command="train"):
        # Settings and paths first, without torch: a wrong path fails in well under a second.
        from causalize.training.config import TrainConfig
        from causalize.training.loading import check_paths

        if resume_from is not None:
            if resume is False:
                raise UsageError(
                    "--no-resume and --resume-from contradict each other",
                    "pass one of them (--resume-from DIR resumes)",
                )
            options["resume"] = resume_from
        options["mixed_precision"] = {"fp32": "no"}.get(mixed_precision, mixed_precision)
        # a field without its parameter is a KeyError here, on every run: the options cannot fall behind
        overrides = {name: options[name] for name in TrainConfig.fields()}
        cfg = TrainConfig.from_file(config, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
        check_paths(cfg)
        from causalize.training.trainer import train as run_training

        try:
            result = run_training(cfg, progress=on_step)
        finally:
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
    cache: str | None = typer.Option(
        None,
        "--cache",
        metavar="exact|rolling|none",
        help="exact: streaming caches equal to recomputation (default); rolling: approximate, constant cost per "
        "frame for long rollouts (see --sink); none: recompute the whole window at every step.",
    ),
    sink: int | None = typer.Option(
        None, "--sink", metavar="N", help="Rolling caches: keep the first N frames for the whole rollout (default 0)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="The same as --cache none."),
    chunk: int | None = typer.Option(
        None,
        "--chunk",
        metavar="N",
        help="Frames generated together, causal among themselves (default 1; CogVideoX 1.5: 2, with --cache none).",
    ),
    compile_mode: str | None = typer.Option(
        None,
        "--compile",
        metavar="MODE",
        help="Run the current-frame steps of a full window through torch.compile: default, reduce-overhead "
        "(CUDA graphs on CUDA), max-autotune or max-autotune-no-cudagraphs. Exact caches only; the first "
        "compiled frame pays the compilation (seconds to minutes), later ones run faster.",
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
    vae: Path | None = typer.Option(
        None,
        "--vae",
        metavar="PATH",
        help="Decode latents to pixels with this VAE (pipeline or VAE directory; default: the one `causalize encode` recorded for the training data).",
    ),
    vae_subfolder: str | None = typer.Option(
        None, "--vae-subfolder", metavar="NAME", help="VAE subfolder of --vae (default: PATH itself, else vae/)."
    ),
    conditioning: Path | None = typer.Option(
        None,
        "--conditioning",
        metavar="FILE",
        help="Prompt tensors from `causalize embed-prompt` (default: the file stored with the trained model, else zeros).",
    ),
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

    Latent models: with a VAE (--vae, or the one `causalize encode` recorded for the training
    data) pixel context is encoded through it (a frame count following its rule, e.g. 1 + 4k for
    Wan), actions may be given one per VIDEO frame (k per latent frame, grouped as in training),
    and the generated latents are decoded to pixels, each latent frame once; .npz keeps the
    latents too. --conditioning (default: the prompt file stored with the trained model) is
    passed to every model call; a mismatch with training is warned about.

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
    bar = LazyBar("generating", "{task.fields[speed]}", speed="")

    def on_frame(done: int, total: int, seconds: float) -> None:
        bar.update(done, total, speed=f"{seconds:.2f} s/frame")

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
        "cache": "none" if no_cache else cache,
        "sink": sink,
        "chunk": chunk,
        "compile": compile_mode,
    }
    with guard(as_json, command="rollout"):
        if no_cache and cache not in (None, "none"):
            raise UsageError(f"--no-cache contradicts --cache {cache}", "give one of them")
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
                vae=vae,
                vae_subfolder=vae_subfolder,
                conditioning=conditioning,
                progress=on_frame,
                **options,
            )
        finally:
            bar.stop()
    t = report.timing
    err.print(
        f"[green]wrote[/] {escape(str(report.out))}: {report.context_frames} context + {report.generated} generated frames "
        f"({report.kind}) in {report.seconds:.1f}s"
    )
    err.print(
        f"seconds per frame: mean {t['mean']:.3f}, median {t['median']:.3f}, min {t['min']:.3f}, max {t['max']:.3f}; "
        f"cache: {report.cache_mode}; frame passes: {report.frame_passes} ({report.model_calls} model calls"
        + (f", {report.compiled_calls} compiled" if report.config.get("compile") else "")
        + ")"
    )
    if report.vae is not None:
        d = report.decode_seconds
        err.print(
            f"decoded with {escape(report.vae['path'])} ({report.vae['decode']}): {sum(d):.3f}s over {len(d)} decode call(s); "
            f"conditioning: {report.conditioning}"
        )
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo(str(report.out))
