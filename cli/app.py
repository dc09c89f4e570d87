"""The `causalize` command line: parse arguments, call one public library function, print.

Results go to stdout (one JSON document with --json, a readable result otherwise); messages,
progress and summary tables go to stderr. The library is imported inside command bodies so that
`causalize --help` never imports torch.

Exit codes: 0 ok, 1 verification failed (a leak), 2 usage error, 3 internal error,
4 conversion error (no plan, unmatched pass, bad checkpoint, pickle refused).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from causalize.cli import demo, latents, prompt, world
from causalize.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_LEAK,
    EXIT_OK,
    FRAMES_OPT,
    JSON_OPT,
    PICKLE_OPT,
    PIPELINE_OPT,
    PLAN_OPT,
    SUBFOLDER_OPT,
    check_precision_names,
    check_source,
    emit_json,
    err,
    guard,
    make_table,
    one_line,
    out,
    print_convert_summary,
    probe_frames,
    progress_message,
    state,
)

app = typer.Typer(
    name="causalize",
    help=(
        "Turn pretrained diffusers video denoisers into causal world models, and prove it.\n\n"
        "\b\nTypical session:\n"
        "  causalize inspect ./zeroscope/unet           # what would be rewritten\n"
        "  causalize convert ./zeroscope/unet ./causal  # rewrite, verify, write\n"
        "  causalize verify ./causal                    # measure causality again\n\n"
        "\b\nFrom a video pipeline to a world model (README, docs/LATENTS.md):\n"
        "  causalize encode EPISODES LATENTS --vae PIPE  # episodes through the pipeline's VAE\n"
        "  causalize convert PIPE WM --action-dim N      # causal + an action adapter\n"
        "  causalize embed-prompt PIPE '' empty.safetensors\n"
        "  causalize train --model WM --data LATENTS --out RUN --conditioning empty.safetensors\n"
        "  causalize rollout RUN --context ep.npz --actions acts.txt --out clip.mp4\n\n"
        "Results go to stdout (--json: one JSON document); messages go to stderr.\n\n" + EXIT_CODES
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: paragraphs rewrap, "\b" blocks keep their lines
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from causalize import __version__

        typer.echo(f"causalize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="CAUSALIZE_DEBUG", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state["debug"] = debug


# --- commands ----------------------------------------------------------------------------------


@app.command()
def convert(
    src: Path = typer.Argument(
        ..., metavar="SRC", help="diffusers model directory (config.json + safetensors), or a pipeline directory."
    ),
    out_dir: Path = typer.Argument(
        ..., metavar="OUT", help="Where to write the causal checkpoint (written atomically)."
    ),
    plan: str | None = PLAN_OPT,
    pipeline: str | None = PIPELINE_OPT,
    subfolder: str | None = SUBFOLDER_OPT,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Convert and verify in memory, list the sites, write nothing."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = PICKLE_OPT,
    allow_leak: bool = typer.Option(
        False, "--allow-leak", help="Write OUT even if verification finds a leak (recorded in causalize.json)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the causality check."),
    action_dim: int = typer.Option(
        0,
        "--action-dim",
        metavar="N",
        help="Add per-frame timesteps and a frame-level action adapter for N-dimensional actions (0: none).",
    ),
    action_type: str = typer.Option(
        "continuous",
        "--action-type",
        help="continuous (an MLP on action vectors) or discrete (a sum of embeddings of active entries).",
    ),
    frames: int | None = FRAMES_OPT,
    dtype: str | None = DTYPE_OPT,
    device: str | None = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Convert a diffusers checkpoint into a causal one, verify it, and write it to OUT.

    Reads SRC/config.json, picks the plan for its class, runs the pass pipeline, measures
    causality with the influence matrix, then writes OUT (weights + causalize.json) through a
    temporary directory. SRC is never modified. A leak means nothing is written unless
    --allow-leak. The summary table goes to stderr; stdout gets OUT's path (or the report with --json).

    \b
    Examples:
      causalize convert ./zeroscope/unet ./zeroscope-causal
      causalize convert ./svd-pipeline ./svd-causal --subfolder unet --dry-run
      causalize convert SRC OUT --pipeline 'causal-temporal-conv{transfer=extrapolative},causal-temporal-attention,causal-norm'
      causalize convert SRC OUT --action-dim 13        # a world model: per-frame timesteps + actions
      causalize convert SRC OUT --dtype bf16 --device cuda   # converted, verified and saved in bf16
      causalize convert ./Wan2.2-T2V-A14B-Diffusers ./wan22-causal  # both experts: OUT/transformer, OUT/transformer_2

    \b
    Exit codes:
      0  converted, and causal
      1  verification found a leak or a non-finite output (OUT is written only with --allow-leak)
      2  usage error: bad --pipeline or --plan, OUT exists, OUT inside SRC
      3  internal error (re-run with --debug for the traceback)
      4  conversion error: no plan, a pass matched nothing, bad checkpoint, pickle refused
    """
    with guard(as_json):
        check_precision_names(dtype)
        from causalize.experts import pipeline_experts  # no torch

        if pipeline_experts(src, subfolder):
            _convert_experts(src, out_dir, dry_run, as_json, locals())
        check_source(src, subfolder)
        from causalize import api

        report = api.convert(
            src,
            out_dir,
            plan=plan,
            pipeline=pipeline,
            subfolder=subfolder,
            dry_run=dry_run,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            allow_leak=allow_leak,
            verify=not no_verify,
            action_dim=action_dim,
            action_type=action_type,
            frames=probe_frames(frames),
            torch_dtype=dtype,
            device=device,
            progress=progress_message,
        )
    print_convert_summary(report)
    if as_json:
        doc = report.to_json()
        if dry_run:
            doc["records"] = [rec.to_json() for run in report.passes for rec in run.records]
        emit_json(doc)
    elif report.written:
        typer.echo(str(report.out))
    raise typer.Exit(EXIT_OK if report.passed else EXIT_LEAK)


def _convert_experts(src: Path, out_dir: Path, dry_run: bool, as_json: bool, opts: dict) -> None:
    """A pipeline with several denoisers (Wan 2.2 A14B's experts): each converted into OUT/NAME."""
    from causalize.experts import convert_experts

    reports = convert_experts(
        src,
        out_dir,
        plan=opts["plan"],
        pipeline=opts["pipeline"],
        dry_run=dry_run,
        overwrite=opts["overwrite"],
        allow_pickle=opts["allow_pickle"],
        allow_leak=opts["allow_leak"],
        verify=not opts["no_verify"],
        action_dim=opts["action_dim"],
        action_type=opts["action_type"],
        frames=probe_frames(opts["frames"]),
        torch_dtype=opts["dtype"],
        device=opts["device"],
        progress=progress_message,
    )
    for report in reports:
        print_convert_summary(report)
    passed = all(r.passed for r in reports)
    if as_json:
        emit_json({"experts": [r.to_json() for r in reports], "out": str(out_dir)})
    elif all(r.written for r in reports):
        typer.echo(str(out_dir))
    raise typer.Exit(EXIT_OK if passed else EXIT_LEAK)


@app.command()
def verify(
    path: Path = typer.Argument(
        ..., metavar="PATH", help="A converted checkpoint, or a plain diffusers one (expected to leak)."
    ),
    frames: int | None = FRAMES_OPT,
    plan: str | None = PLAN_OPT,
    subfolder: str | None = SUBFOLDER_OPT,
    allow_pickle: bool = PICKLE_OPT,
    dtype: str | None = DTYPE_OPT,
    device: str | None = DEVICE_OPT,
    shrink: bool = typer.Option(
        False,
        "--shrink",
        help="Probe a random-weight copy of the same class with the plan's tiny sizes (no weights read): for models too large for the device; proves the class, config flags and pipeline, not these weights.",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Measure whether any output frame depends on a later input frame.

    Loads PATH (a converted checkpoint replays its pipeline from causalize.json), perturbs each
    input frame in turn and prints the verdict and the influence matrix M[out, in] ('!' marks a
    leak). On a leak it names the first module whose past frames moved on their own.

    \b
    Examples:
      causalize verify ./zeroscope-causal
      causalize verify ./zeroscope/unet --frames 6 --json   # negative control: leaks
      causalize verify ./wan-causal --dtype bf16 --device cuda   # in the precision you run it in
      causalize verify ./wan14b-causal --shrink                  # too large to probe: a shrunken copy

    \b
    Exit codes:
      0  causal
      1  a leak (or a probe that moved nothing, or an output that is NaN / inf)
      2  usage error (e.g. --frames too small, unknown --plan)
      3  internal error
      4  the checkpoint cannot be read, or no plan supports it
    """
    with guard(as_json):
        check_precision_names(dtype)
        check_source(path, subfolder)
        from causalize import api

        report = api.verify(
            path,
            frames=probe_frames(frames),
            plan=plan,
            subfolder=subfolder,
            allow_pickle=allow_pickle,
            torch_dtype=dtype,
            device=device,
            shrink=shrink,
            progress=progress_message,
        )
    if as_json:
        emit_json({"path": str(path), **report.to_json()})
    else:
        out.print(("[green]" if report.passed else "[red]") + escape(report.summary()) + "[/]")
        out.print(escape(report.format_matrix()))
    raise typer.Exit(EXIT_OK if report.passed else EXIT_LEAK)


@app.command()
def inspect(
    path: Path = typer.Argument(
        ..., metavar="PATH", help="A diffusers model or pipeline directory (or a converted one)."
    ),
    plan: str | None = PLAN_OPT,
    pipeline: str | None = PIPELINE_OPT,
    subfolder: str | None = SUBFOLDER_OPT,
    allow_pickle: bool = PICKLE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Show the time-mixing sites each pass would rewrite, without converting anything.

    A traced forward also looks for modules that mix frames but that no pass covers
    ("uncovered"): each one is a leak the conversion would leave behind.

    \b
    Example:
      causalize inspect ./zeroscope/unet --pipeline causal-temporal-attention

    \b
    Exit codes:
      0  ok (also with uncovered mixers: they are warned about on stderr)
      2  usage error (bad --pipeline, unknown --plan)
      3  internal error
      4  the checkpoint cannot be read, or no plan supports it
    """
    with guard(as_json):
        check_source(path, subfolder)
        from causalize import api

        info = api.inspect(
            path,
            plan=plan,
            pipeline=pipeline,
            subfolder=subfolder,
            allow_pickle=allow_pickle,
            progress=progress_message,
        )
    for m in info["uncovered"]:
        err.print(
            f"[yellow]warning:[/] uncovered time mixer {escape(m['path'])} ({m['class']}): {escape(m.get('what', ''))}"
        )
    if as_json:
        emit_json(info)
        return
    out.print(f"{info['model_class']}: plan '{info['plan']}', block size {info['block_size']}")
    out.print(f"pipeline: {escape(info['pipeline'])}")
    for name, sites in info["sites"].items():  # one table per pass: path, class, note
        table = make_table(f"{name}: {len(sites)} sites", "path", "class", "note")
        for site in sites:
            table.add_row(site["path"], site["kind"], escape(site.get("note", "")))
        out.print(table)
    out.print("sites: " + ", ".join(f"{name} {len(sites)}" for name, sites in info["sites"].items()))
    out.print(f"uncovered: {len(info['uncovered'])}")
    kinds = [c["kind"] for c in info.get("installed", [])]
    for kind in dict.fromkeys(kinds):  # what a converted checkpoint's conversion installed (details: --json)
        out.print(f"installed {kind}: {kinds.count(kind)}")
    if info.get("attention"):
        a = info["attention"]
        out.print(
            f"attention on {a['device']}: {a['backend']} ({escape(a['reason'])}; set CAUSALIZE_ATTENTION=flex|chunked|dense to override)"
        )
    if info.get("image_condition"):
        out.print(escape(info["image_condition"]["describe"]))
    for note in info["notes"]:
        out.print(f"note: {escape(note)}")


@app.command()
def passes(as_json: bool = JSON_OPT) -> None:
    """List the registered passes: version, options (name=default, choices) and what each does.

    Options are written in a pipeline as pass-name{option=value,...}.

    \b
    Example:
      causalize passes --json

    \b
    Exit codes: 0 ok; 3 internal error (e.g. a plugin failed to load).
    """
    with guard(as_json):
        rows = _pass_rows()
    if as_json:
        emit_json({"passes": rows})
        return
    table = make_table("passes", "name", "version", "options", "summary")
    for r in rows:
        opts = "\n".join(
            f"{o['name']}={o['default']}"
            + (f" ({'|'.join(map(str, o['choices']))})" if o["choices"] else f" ({o['type']})")
            + (f": {o['help']}" if o["help"] else "")
            for o in r["options"]
        )
        table.add_row(r["name"], str(r["version"]), escape(opts or "-"), escape(r["summary"]))
    out.print(table)


def _pass_rows() -> list[dict[str, Any]]:
    import dataclasses
    from typing import Literal, get_args, get_origin

    from causalize.passes.base import option_help
    from causalize.passes.registry import option_type
    from causalize.plugin_manager import registries

    rows = []
    for cls in registries().passes:
        opts = []
        for fld in dataclasses.fields(cls.Options):
            tp = option_type(cls, fld)
            literal = get_origin(tp) is Literal
            opts.append(
                {
                    "name": fld.name,
                    "type": "choice" if literal else getattr(tp, "__name__", str(tp)),
                    "default": fld.default,
                    "choices": list(get_args(tp)) if literal else [],
                    "help": option_help(fld),
                }
            )
        rows.append(
            {
                "name": cls.name,
                "version": cls.version,
                "summary": cls.summary,
                "module": cls.__module__,
                "options": opts,
            }
        )
    return rows


@app.command()
def plugins(as_json: bool = JSON_OPT) -> None:
    """List the loaded plugins and the plans they register (one plan per diffusers class).

    Built-ins load first, then entry points of group 'causalize'; set
    CAUSALIZE_DISABLE_PLUGIN_AUTOLOAD=1 to skip third-party ones.

    \b
    Example:
      causalize plugins --json

    \b
    Exit codes: 0 ok; 3 internal error (e.g. a plugin failed to load).
    """
    with guard(as_json):
        from causalize.plugin_manager import registries

        regs = registries()
        rows = regs.plugin_rows()
        plans = [
            {
                "name": p.name,
                "model_class": p.model_class,
                "family": p.family,
                "pipeline": p.pipeline,
                "block_size": p.layout.block_size,
                "source": p.source,
                "description": p.description,
            }
            for p in regs.plans
        ]
    if as_json:
        emit_json({"plugins": rows, "plans": plans})
        return
    t = make_table("plugins", "name", "origin", "plans", "passes")
    for r in rows:
        t.add_row(r["name"], escape(r["origin"]), r["plans"] or "-", r["passes"] or "-")
    out.print(t)
    t = make_table("plans", "name", "model class", "family", "default pipeline", "block")
    for p in plans:
        t.add_row(p["name"], p["model_class"], p["family"], escape(p["pipeline"]), str(p["block_size"]))
    out.print(t)


@app.command()
def env(as_json: bool = JSON_OPT) -> None:
    """Print versions (causalize, python, torch, diffusers, peft, pluggy, accelerate), CUDA and platform.

    Paste this into bug reports.

    \b
    Example:
      causalize env --json

    \b
    Exit codes: 0 ok; 3 internal error.
    """
    with guard(as_json):
        info = _env_info()
    if as_json:
        emit_json(info)
        return
    t = make_table("environment", "what", "value")
    for k, v in info.items():
        t.add_row(k, escape(str(v)))
    out.print(t)


def _env_info() -> dict[str, Any]:
    import platform
    from importlib import metadata

    import torch

    from causalize import __version__

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {"causalize": __version__, "python": platform.python_version()}
    info.update({name: version(name) for name in ("torch", "diffusers", "peft", "pluggy", "accelerate")})
    info.update(
        {
            "cuda_available": torch.cuda.is_available(),
            "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count(),
            "platform": platform.platform(),
        }
    )
    from causalize.modules.attention_exec import describe

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        a = describe(torch.device(device))
        info[f"attention_{device}"] = f"{a['backend']} ({a['reason']}); flex: {a['flex_note']}"
    return info


app.command()(demo.demo)
app.command()(world.train)
app.command()(world.rollout)
app.command("embed-prompt")(prompt.embed_prompt)
app.command()(latents.encode)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and exit with the documented status."""
    try:
        code = app(args=argv, prog_name="causalize", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, ...
        show = getattr(exc, "show", None)
        show() if show else err.print(f"error: {escape(exc.format_message())}")
        code = exc.exit_code
    except typer.Abort:
        err.print("aborted")
        code = 130
    except Exception as exc:  # escaped every command guard: still one line, exit 3
        if state["debug"]:
            traceback.print_exc(file=sys.stderr)
        err.print(f"[bold red]internal error:[/] {escape(one_line(f'{type(exc).__name__}: {exc}'))}")
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
