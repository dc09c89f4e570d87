"""`causalize encode`: pixel episodes → latent episodes through a pipeline's VAE. Registered on
the app in cli/app.py; thin over causalize.latents.encode."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from causalize.cli.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, LazyBar, check_precision_names, emit_json, err, guard


def encode(
    episodes: Path = typer.Argument(..., metavar="EPISODES", help="Pixel episode dataset (docs/EPISODES.md)."),
    out: Path = typer.Argument(..., metavar="OUT", help="New latent dataset directory (must not exist)."),
    vae: Path = typer.Option(
        ..., "--vae", metavar="PATH", help="The pipeline's directory (its vae/ is used) or a VAE directory."
    ),
    subfolder: str | None = typer.Option(
        None, "--subfolder", metavar="NAME", help="VAE subfolder of PATH (default: PATH itself, else vae/)."
    ),
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    batch_size: int = typer.Option(
        1,
        "--batch-size",
        metavar="N",
        help="Video VAEs: equal-length episodes per call; image VAEs: frames per call.",
    ),
    trim: bool = typer.Option(
        False, "--trim", help="Drop each episode's last frames down to the VAE's frame rule (e.g. 1 + 4k)."
    ),
    sample: bool = typer.Option(
        False, "--sample", help="Draw latents from the VAE's posterior (default: its mode, deterministic)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Encode pixel episodes into latent episodes the way the VAE's pipeline does.

    Each episode is one clip through the VAE (video VAEs group frames: Wan's first frame alone,
    then groups of 4), latents normalised as the pipeline does (Wan: latents_mean/std, others:
    scaling_factor). Latent frame j carries the actions of the video frames it covers,
    concatenated (docs/LATENTS.md); dataset.json records the VAE, its normalisation and this
    alignment, so `train` and `rollout` decode and group actions the same way.

    Work happens in OUT.encoding/ and OUT appears complete at the end; if interrupted, run the
    same command again to resume. stdout gets OUT (or a JSON report with --json) and the action
    dimension to convert the model with.

    \b
    Examples:
      causalize encode ./episodes ./latents --vae ./Wan2.1-T2V-1.3B-Diffusers
      causalize encode ./episodes ./latents --vae ./pipe --trim --device cuda --dtype bf16

    \b
    Exit codes:
      0  encoded; OUT holds the latent dataset
      2  usage error: OUT exists, EPISODES is not a pixel dataset or is damaged, an episode's length
         does not fit the VAE's frame rule (without --trim), frames that do not fit the VAE
         (channels, size), a class that is not a supported VAE, bad option
      3  internal error (re-run with --debug for the traceback)
    """
    bar = LazyBar("encoding", "{task.fields[speed]}", eta=False, speed="")

    def on_episode(done: int, total: int, frames: int, seconds: float) -> None:
        bar.update(done, total, speed=f"{frames / max(seconds, 1e-9):.1f} frames/s")

    with guard(as_json, command="encode"):
        check_precision_names(dtype)
        from causalize.latents.encode import encode_episodes, plan_encode

        job = plan_encode(episodes, out, vae, subfolder=subfolder, trim=trim, sample=sample, dtype=dtype)
        if job.staging.exists():
            err.print(f"resuming the unfinished encode in {escape(str(job.staging))}")
        try:
            report = encode_episodes(
                episodes,
                out,
                vae,
                subfolder=subfolder,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                trim=trim,
                sample=sample,
                progress=on_episode,
            )
        finally:
            bar.stop()
    for index, (before, after) in sorted(report.trimmed.items()):
        err.print(f"trimmed episode {index}: {before} → {after} frames")
    from causalize.episodes import read_info

    space = read_info(report.out).action_space
    hint = f"convert the denoiser with --action-dim {space.width} --action-type {space.type}"
    err.print(
        f"[green]encoded[/] {report.encoded} episode(s) ({report.resumed} already done): {report.video_frames} frames "
        f"→ {report.latent_frames} latent frames in {report.seconds:.1f}s; {hint}"
    )
    if as_json:
        emit_json({**report.to_json(), "action_space": space.to_json()})
    else:
        typer.echo(str(report.out))
