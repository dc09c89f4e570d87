"""`causalize embed-prompt`: a prompt embedded by a pipeline's own text encoder, for world models
that cross-attend to text. Registered on the app in cli/app.py; thin over causalize.prompt."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from causalize.cli.common import DEVICE_OPT, DTYPE_OPT, JSON_OPT, check_precision_names, emit_json, err, guard


def embed_prompt(
    pipeline: Path = typer.Argument(
        ...,
        metavar="PIPELINE",
        help="diffusers pipeline directory (model_index.json) the world model was converted from.",
    ),
    text: str = typer.Argument(..., metavar="TEXT", help='The prompt; "" for the empty prompt.'),
    out_path: Path = typer.Argument(
        ..., metavar="OUT", help="The embedding file to write (safetensors, written atomically)."
    ),
    device: str | None = DEVICE_OPT,
    dtype: str | None = DTYPE_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    as_json: bool = JSON_OPT,
) -> None:
    """Embed TEXT with PIPELINE's own tokenizer and text encoder, and write it to OUT.

    A world model converted from a text-to-video denoiser still cross-attends to text: OUT holds
    exactly what the pipeline's encode_prompt gives its denoiser for TEXT (e.g.
    encoder_hidden_states; also encoder_attention_mask / pooled_projections where the family
    takes them), at batch 1, under the denoiser's argument names, with the pipeline class and the
    prompt in the file's metadata. Only the tokenizer(s) and text encoder(s) are loaded. Paths are
    checked first; on any error nothing is written. stdout gets OUT (or a JSON report with --json).

    \b
    Supported pipelines: WanPipeline, TextToVideoSDPipeline (ModelScope / Zeroscope),
    CogVideoXPipeline, LTXPipeline, HunyuanVideoPipeline.

    \b
    Examples:
      causalize embed-prompt ./Wan2.1-T2V-1.3B-Diffusers "a red car drives left" car.safetensors
      causalize embed-prompt ./zeroscope "" empty.safetensors          # the empty prompt
      causalize embed-prompt ./wan-pipeline "a game level" level.safetensors --device cuda --dtype bf16
      causalize embed-prompt ./wan-pipeline -- "-dashes first" out.safetensors   # TEXT starting with '-'

    \b
    Exit codes:
      0  written
      2  usage error: PIPELINE missing or not a pipeline directory (no model_index.json), a
         pipeline without a text encoder or of an unsupported class, OUT exists (without
         --overwrite) or its directory is missing, bad --dtype / --device, a non-finite embedding
      3  internal error (re-run with --debug for the traceback)
    """
    with guard(as_json, command="embed-prompt"):
        check_precision_names(dtype)
        # Paths first, without torch: a mistyped path fails in well under a second.
        from causalize.prompt import check_prompt_paths
        from causalize.prompt import embed_prompt as run_embed

        check_prompt_paths(pipeline, out_path, overwrite=overwrite)
        report = run_embed(pipeline, text, out_path, device=device, dtype=dtype, overwrite=overwrite)
    shapes = ", ".join(f"{name} {tuple(t['shape'])} {t['dtype']}" for name, t in report.tensors.items())
    err.print(f"[green]wrote[/] {escape(str(report.out))}: {report.pipeline_class} -> {escape(shapes)}")
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo(str(report.out))
