"""The `causalize` command line: parse arguments, call one public library function, print.

Results go to stdout (one JSON document with --json, a readable result otherwise); messages,
progress and summary tables go to stderr. The library is imported inside command bodies so that
`causalize --help` never imports torch.

Exit codes: 0 ok, 1 verification failed (a leak), 2 usage error, 3 internal error,
4 conversion error (no plan, unmatched pass, bad checkpoint, pickle refused).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from causalize.api import ConvertReport

EXIT_OK, EXIT_LEAK, EXIT_USAGE, EXIT_INTERNAL, EXIT_CONVERSION = 0, 1, 2, 3, 4
EXIT_CODES = (
    "\b\nExit codes:\n"
    "  0  ok\n"
    "  1  verification failed: some output frame depends on a later input frame\n"
    "  2  usage error (bad option, bad --pipeline, OUT exists or lies inside SRC)\n"
    "  3  internal error (re-run with --debug for the traceback)\n"
    "  4  conversion error (no plan, a pass matched nothing, bad checkpoint, pickle refused)"
)

app = typer.Typer(
    name="causalize",
    help=(
        "Turn pretrained diffusers video denoisers into causal world models, and prove it.\n\n"
        "\b\nTypical session:\n"
        "  causalize inspect ./zeroscope/unet           # what would be rewritten\n"
        "  causalize convert ./zeroscope/unet ./causal  # rewrite, verify, write\n"
        "  causalize verify ./causal                    # measure causality again\n\n"
        "Results go to stdout (--json: one JSON document); messages go to stderr.\n\n" + EXIT_CODES
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: paragraphs rewrap, "\b" blocks keep their lines
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _width(stream: Any) -> int | None:
    """Terminal width on a terminal (rich's default); wide enough for whole table rows in logs and pipes."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))  # results (stdout)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))  # messages, progress, summaries
_state = {"debug": False}

# Options shared by several commands.
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document to stdout (errors too).")
PLAN_OPT = typer.Option(None, "--plan", metavar="NAME", help="Use this plan instead of the one registered for the model class (see `causalize plugins`).")
PIPELINE_OPT = typer.Option(None, "--pipeline", metavar="TEXT", help="Pass pipeline, e.g. 'causal-temporal-conv{transfer=extrapolative},causal-temporal-attention' (default: the plan's).")
SUBFOLDER_OPT = typer.Option(None, "--subfolder", metavar="NAME", help="Denoiser subfolder of a pipeline directory (default: unet/ or transformer/, whichever exists).")
FRAMES_OPT = typer.Option(None, "--frames", metavar="N", help="Frames in the causality probe (default 4).")
PICKLE_OPT = typer.Option(False, "--allow-pickle", help="Accept diffusion_pytorch_model.bin (loaded with weights_only=True).")
DTYPE_OPT = typer.Option(None, "--dtype", metavar="fp32|bf16|fp16", help="Compute dtype (default: the checkpoint's own). Modules diffusers keeps in fp32 stay fp32.")
DEVICE_OPT = typer.Option(None, "--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cpu).")


def _version(value: bool) -> None:
    if value:
        from causalize import __version__

        typer.echo(f"causalize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="CAUSALIZE_DEBUG", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug


# --- shared helpers ----------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """NaN and infinities are not JSON: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _emit_json(doc: Any) -> None:
    typer.echo(json.dumps(_jsonable(doc), indent=2, default=str, allow_nan=False))


def _frames(frames: int | None) -> int:
    from causalize.api import DEFAULT_FRAMES

    return DEFAULT_FRAMES if frames is None else frames


def _progress(msg: str) -> None:
    err.print(escape(msg), style="dim")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(kind: str, message: str, hint: str | None, code: int, as_json: bool, label: str = "error") -> None:
    if _state["debug"]:
        traceback.print_exc(file=sys.stderr)
    err.print(f"[bold red]{label}:[/] {escape(_one_line(message))}")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(_one_line(hint))}")
    if as_json:
        _emit_json({"error": {"kind": kind, "message": message, "hint": hint, "code": code}})
    raise typer.Exit(code)


@contextlib.contextmanager
def _guard(as_json: bool = False) -> Iterator[None]:
    """Map library errors to their exit code with a one-line message (traceback only with --debug)."""
    from causalize.errors import CausalizeError

    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own control flow
        raise
    except CausalizeError as exc:
        _fail(exc.kind, exc.message, exc.hint, exc.code, as_json)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: say so briefly, exit 3
        _fail("internal-error", f"{type(exc).__name__}: {exc}", "re-run with --debug for the traceback" if not _state["debug"] else None,
              EXIT_INTERNAL, as_json, label="internal error")


def _fmt_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"


def _culprit(c: dict[str, Any] | None) -> str:
    return f"{c['path']} ({c['class']})" if c else "-"


def _verdict(v: dict[str, Any]) -> str:
    if v["passed"]:
        return f"[green]causal[/] (max leak {v['max_leak']:.3g})"
    return f"[red]NOT causal[/]: {escape(v['summary'])}"


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, overflow="fold", no_wrap=i == 0)  # names stay whole; the rest folds
    return t


def _print_convert_summary(report: ConvertReport) -> None:
    """The conversion summary on stderr: passes, (dry run) sites, verdict, what was written."""
    dry_run = report.dry_run
    table = _table(f"{report.model_class} -> plan '{report.plan}'  ({report.parameters:,} parameters)", "pass", "sites", "options", "seconds")
    for run in report.passes:
        table.add_row(run.name, str(len(run.records)), escape(_fmt_options(run.options)), f"{run.seconds:.2f}")
    err.print(table)
    if dry_run:
        for run in report.passes:  # dry run: show every site it would rewrite
            sites = _table(f"{run.name}: {len(run.records)} sites", "path", "before", "after")
            for rec in run.records:
                sites.add_row(rec.path, rec.before, escape(rec.after))
            err.print(sites)
    v = report.verification
    err.print("verification: " + ("skipped (--no-verify)" if v is None else _verdict(v)))
    if v is not None and not v["passed"]:
        err.print(f"leak: max {v['max_leak']:.3g}, first leaking module {escape(_culprit(v.get('culprit')))}")
    if report.written:
        err.print(f"[green]wrote[/] {escape(str(report.out))} in {report.seconds.get('total', 0):.1f}s"
                  + (" [red](with a leak, recorded in causalize.json)[/]" if not report.passed else ""))
    elif dry_run:
        err.print("dry run: nothing written")
    else:
        err.print("[red]nothing written[/]: verification failed; fix the pipeline, or pass --allow-leak to write anyway")


def _check_precision_names(dtype: str | None) -> None:
    """--dtype checked by name before torch is imported (the device is checked once torch is in)."""
    from causalize.precision import check_dtype_name

    check_dtype_name(dtype)


# --- commands ----------------------------------------------------------------------------------


@app.command()
def convert(
    src: Path = typer.Argument(..., metavar="SRC", help="diffusers model directory (config.json + safetensors), or a pipeline directory."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Where to write the causal checkpoint (written atomically)."),
    plan: Optional[str] = PLAN_OPT,
    pipeline: Optional[str] = PIPELINE_OPT,
    subfolder: Optional[str] = SUBFOLDER_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Convert and verify in memory, list the sites, write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = PICKLE_OPT,
    allow_leak: bool = typer.Option(False, "--allow-leak", help="Write OUT even if verification finds a leak (recorded in causalize.json)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the causality check."),
    action_dim: int = typer.Option(0, "--action-dim", metavar="N", help="Add per-frame timesteps and a frame-level action adapter for N-dimensional actions (0: none)."),
    action_type: str = typer.Option("continuous", "--action-type", help="continuous (an MLP on action vectors) or discrete (a sum of embeddings of active entries)."),
    frames: Optional[int] = FRAMES_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
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

    \b
    Exit codes:
      0  converted, and causal
      1  verification found a leak (OUT is written only with --allow-leak)
      2  usage error: bad --pipeline or --plan, OUT exists, OUT inside SRC
      3  internal error (re-run with --debug for the traceback)
      4  conversion error: no plan, a pass matched nothing, bad checkpoint, pickle refused
    """
    with _guard(as_json):
        _check_precision_names(dtype)
        from causalize import api

        report = api.convert(
            src, out_dir, plan=plan, pipeline=pipeline, subfolder=subfolder, dry_run=dry_run, overwrite=overwrite,
            allow_pickle=allow_pickle, allow_leak=allow_leak, verify=not no_verify,
            action_dim=action_dim, action_type=action_type, frames=_frames(frames), torch_dtype=dtype, device=device,
            progress=_progress,
        )
    _print_convert_summary(report)
    if as_json:
        doc = report.to_json()
        if dry_run:
            doc["records"] = [rec.to_json() for run in report.passes for rec in run.records]
        _emit_json(doc)
    elif report.written:
        typer.echo(str(report.out))
    raise typer.Exit(EXIT_OK if report.passed else EXIT_LEAK)


@app.command()
def verify(
    path: Path = typer.Argument(..., metavar="PATH", help="A converted checkpoint, or a plain diffusers one (expected to leak)."),
    frames: Optional[int] = FRAMES_OPT,
    plan: Optional[str] = PLAN_OPT,
    subfolder: Optional[str] = SUBFOLDER_OPT,
    allow_pickle: bool = PICKLE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
    shrink: bool = typer.Option(False, "--shrink", help="Probe a random-weight copy of the same class with the plan's tiny sizes (no weights read): for models too large for the device; proves the class, config flags and pipeline, not these weights."),
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
      1  a leak (or a probe that moved nothing)
      2  usage error (e.g. --frames too small, unknown --plan)
      3  internal error
      4  the checkpoint cannot be read, or no plan supports it
    """
    with _guard(as_json):
        _check_precision_names(dtype)
        from causalize import api

        report = api.verify(path, frames=_frames(frames), plan=plan, subfolder=subfolder, allow_pickle=allow_pickle,
                            torch_dtype=dtype, device=device, shrink=shrink, progress=_progress)
    if as_json:
        _emit_json({"path": str(path), **report.to_json()})
    else:
        out.print(("[green]" if report.passed else "[red]") + escape(report.summary()) + "[/]")
        out.print(escape(report.format_matrix()))
    raise typer.Exit(EXIT_OK if report.passed else EXIT_LEAK)


@app.command()
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A diffusers model or pipeline directory (or a converted one)."),
    plan: Optional[str] = PLAN_OPT,
    pipeline: Optional[str] = PIPELINE_OPT,
    subfolder: Optional[str] = SUBFOLDER_OPT,
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
    with _guard(as_json):
        from causalize import api

        info = api.inspect(path, plan=plan, pipeline=pipeline, subfolder=subfolder, allow_pickle=allow_pickle, progress=_progress)
    for m in info["uncovered"]:
        err.print(f"[yellow]warning:[/] uncovered time mixer {escape(m['path'])} ({m['class']}): {escape(m.get('what', ''))}")
    if as_json:
        _emit_json(info)
        return
    out.print(f"{info['model_class']}: plan '{info['plan']}', block size {info['block_size']}")
    out.print(f"pipeline: {escape(info['pipeline'])}")
    for name, sites in info["sites"].items():  # one table per pass: path, class, note
        table = _table(f"{name}: {len(sites)} sites", "path", "class", "note")
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
        out.print(f"attention on {a['device']}: {a['backend']} ({escape(a['reason'])}; set CAUSALIZE_ATTENTION=flex|chunked|dense to override)")
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
    with _guard(as_json):
        rows = _pass_rows()
    if as_json:
        _emit_json({"passes": rows})
        return
    table = _table("passes", "name", "version", "options", "summary")
    for r in rows:
        opts = "\n".join(
            f"{o['name']}={o['default']}" + (f" ({'|'.join(map(str, o['choices']))})" if o["choices"] else f" ({o['type']})")
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
            opts.append({"name": fld.name, "type": "choice" if literal else getattr(tp, "__name__", str(tp)),
                         "default": fld.default, "choices": list(get_args(tp)) if literal else [],
                         "help": option_help(fld)})
        rows.append({"name": cls.name, "version": cls.version, "summary": cls.summary, "module": cls.__module__, "options": opts})
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
    with _guard(as_json):
        from causalize.plugin_manager import registries

        regs = registries()
        rows = regs.plugin_rows()
        plans = [
            {"name": p.name, "model_class": p.model_class, "family": p.family, "pipeline": p.pipeline,
             "block_size": p.layout.block_size, "source": p.source, "description": p.description}
            for p in regs.plans
        ]
    if as_json:
        _emit_json({"plugins": rows, "plans": plans})
        return
    t = _table("plugins", "name", "origin", "plans", "passes")
    for r in rows:
        t.add_row(r["name"], escape(r["origin"]), r["plans"] or "-", r["passes"] or "-")
    out.print(t)
    t = _table("plans", "name", "model class", "family", "default pipeline", "block")
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
    with _guard(as_json):
        info = _env_info()
    if as_json:
        _emit_json(info)
        return
    t = _table("environment", "what", "value")
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
    info.update({
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "platform": platform.platform(),
    })
    from causalize.modules.attention_exec import describe

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        a = describe(torch.device(device))
        info[f"attention_{device}"] = f"{a['backend']} ({a['reason']}); flex: {a['flex_note']}"
    return info


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", metavar="DIR", help="Keep the generated checkpoints here (default: a temporary directory)."),
    frames: Optional[int] = FRAMES_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Convert and verify a tiny locally generated checkpoint of every supported family.

    For each registered plan: build a tiny random model, save it, verify it (the negative control:
    it must leak), convert it, load it back and verify again (it must be causal). Then, as a
    world model with an action adapter, roll it out with streaming caches and with full
    recomputation: the "stream = full" column is the max abs difference of the generated frames
    ("full only" where the plan cannot stream). Nothing is downloaded; it takes a minute on a CPU.

    \b
    Example:
      causalize demo --workdir ./demo-out

    \b
    Exit codes: 0 every family is causal after conversion; 1 some family is not;
    3 internal error.
    """
    with _guard(as_json):
        from causalize.demo import run_demo

        rows = run_demo(workdir, frames=_frames(frames), progress=_progress)
    ok = all(r["causal"] and _rollout_ok(r["rollout"]) for r in rows)
    if as_json:
        _emit_json({"rows": rows, "passed": ok})
    else:
        t = _table("causalize demo", "plan", "class", "params", "sites per pass", "leak before", "leak after", "verdict",
                   "stream = full", "leaking module before")
        for r in rows:
            t.add_row(
                r["plan"], r["model_class"], f"{r['parameters']:,}",
                ", ".join(f"{k.removeprefix('causal-')} {n}" for k, n in r["sites"].items()),
                f"{r['unconverted_max_leak']:.3g}", f"{r['converted_max_leak']:.3g}",
                "[green]causal[/]" if r["causal"] else "[red]FAIL[/]", _rollout_cell(r["rollout"]),
                escape(r["unconverted_culprit"] or "-"),
            )
        out.print(t)
    if not ok:
        err.print("[red]some families are not causal after conversion[/]")
    raise typer.Exit(EXIT_OK if ok else EXIT_LEAK)


def _rollout_ok(r: dict | None) -> bool:
    return r is None or not r["streaming"] or r["max_abs_diff"] <= 1e-5


def _rollout_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["streaming"]:
        return "full only"
    return f"{r['max_abs_diff']:.1e}" if _rollout_ok(r) else f"[red]{r['max_abs_diff']:.1e}[/]"


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, metavar="CONFIG", help="Training settings as a .json or .toml file (keys: the fields of causalize.training.trainer.TrainConfig)."),
    model: Optional[Path] = typer.Option(None, "--model", metavar="PATH", help="Converted checkpoint with an action adapter (causalize convert SRC OUT --action-dim N)."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="DIR", help="Episode dataset root (docs/EPISODES.md)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Output directory: metrics.jsonl, checkpoints/, final/."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Optimizer steps to reach."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help="Windows per device per micro-batch."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="X", help="AdamW learning rate (default 1e-5)."),
    window: Optional[int] = typer.Option(None, "--window", metavar="N", help="Frames per training window (default 16)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output directory."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", "--dtype", metavar="no|bf16|fp16", help="accelerate's mixed precision: weights stay fp32, the forward runs in bf16 / fp16 (default: no)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="cpu|cuda", help="cpu trains on the CPU even where CUDA exists (default: accelerate's choice)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (less memory)."),
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
      2  usage error: missing or mismatched model / data (channels, action dimension), bad setting
      3  internal error (re-run with --debug for the traceback)
      4  the model checkpoint cannot be read
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    overrides = {"model": model, "data": data, "output_dir": out_dir, "steps": steps, "batch_size": batch_size,
                 "lr": lr, "window": window, "resume": True if resume else None,
                 "mixed_precision": {"fp32": "no"}.get(mixed_precision, mixed_precision), "device": device,
                 "gradient_checkpointing": gradient_checkpointing}
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task("train", total=None, loss="-")

    def on_step(step: int, total: int, loss: float) -> None:
        bar.update(task, completed=step, total=total, loss=f"{loss:.4g}")

    leader = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`: one bar, one summary
    with _guard(as_json):
        from causalize.training.trainer import TrainConfig, train as run_training

        cfg = TrainConfig.from_file(config, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
        with bar if leader else contextlib.nullcontext():
            result = run_training(cfg, progress=on_step)
    if not leader:
        return
    if as_json:
        _emit_json(result)
    else:
        typer.echo(f"trained to step {result['steps']} ({result['steps_run']} steps this run) in {result['seconds']:.1f}s, "
                   f"final loss {result['final_loss']:.4g}: {result['final']}")


@app.command()
def rollout(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="Converted world model with an action adapter (or a training run directory holding final/)."),
    context: Path = typer.Option(..., "--context", metavar="FRAMES", help="Context frames: episode .npz (frames or latents), .npy, or a video / image (.mp4, .gif, .png)."),
    actions: Path = typer.Option(..., "--actions", metavar="ACTIONS", help="One action per generated frame: .npy, .npz (key actions), .json list, or text (one per line)."),
    out_path: Path = typer.Option(..., "--out", metavar="OUT", help="Output: .mp4, .gif (pixels) or .npz (pixels or latents + actions + settings)."),
    context_frames: Optional[int] = typer.Option(None, "--context-frames", metavar="K", help="Use the first K frames of FRAMES (default: all)."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="S", help="Denoising steps per frame (default 50)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", metavar="NAME", help="ddim (default) or euler."),
    spacing: Optional[str] = typer.Option(None, "--spacing", metavar="NAME", help="trailing (default) or uniform."),
    eta: Optional[float] = typer.Option(None, "--eta", metavar="X", help="DDIM eta in [0, 1] (default 0: deterministic steps)."),
    history_noise: Optional[str] = typer.Option(None, "--history-noise", metavar="K", help="History noise level: an integer, or second_to_last (default)."),
    window: Optional[int] = typer.Option(None, "--window", metavar="L", help="Sliding window incl. the current frame (default: training.json's window, else 16)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", metavar="S", help="Causal action guidance scale (default 2.5; 1 disables guidance)."),
    guidance_rescale: Optional[float] = typer.Option(None, "--guidance-rescale", metavar="PHI", help="Guidance rescale in [0, 1] (default 0.7)."),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", metavar="NAME", help="v, epsilon or sample (default: training.json's, else v)."),
    zero_terminal_snr: Optional[bool] = typer.Option(None, "--zero-terminal-snr/--no-zero-terminal-snr", help="Schedule rescaled to zero terminal SNR (default: training.json's, else on)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole window at every step instead of streaming caches (same frames, slower)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed of all noise (default 0)."),
    fps: float = typer.Option(8.0, "--fps", metavar="F", help="Frames per second of .mp4 / .gif output."),
    generated_only: bool = typer.Option(False, "--generated-only", help="Write only the generated frames (default: context frames first)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
    dtype: Optional[str] = DTYPE_OPT,
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
    task = bar.add_task("rollout", total=None, speed="", start=False)

    def on_frame(done: int, total: int, seconds: float) -> None:
        if not bar.live.is_started:  # shown from the first frame: input errors stay one line
            bar.start()
            bar.start_task(task)
        bar.update(task, completed=done, total=total, speed=f"{seconds:.2f} s/frame")

    options = {"steps": steps, "sampler": sampler, "spacing": spacing, "eta": eta, "window": window,
               "history_noise": int(history_noise) if history_noise and history_noise.isdigit() else history_noise,
               "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale, "prediction_type": prediction_type,
               "zero_terminal_snr": zero_terminal_snr, "cache": False if no_cache else None, "seed": seed}
    with _guard(as_json):
        _check_precision_names(dtype)
        from causalize.rollout.io import rollout_to_file

        try:
            report = rollout_to_file(checkpoint, context, actions, out_path, context_frames=context_frames, overwrite=overwrite,
                                     fps=fps, include_context=not generated_only, device=device, dtype=dtype,
                                     progress=on_frame, **options)
        finally:
            bar.stop()
    t = report.timing
    err.print(f"[green]wrote[/] {escape(str(report.out))}: {report.context_frames} context + {report.generated} generated frames "
              f"({report.kind}) in {report.seconds:.1f}s")
    err.print(f"seconds per frame: mean {t['mean']:.3f}, median {t['median']:.3f}, min {t['min']:.3f}, max {t['max']:.3f}; "
              f"cache: {report.cache_mode}; frame passes: {report.frame_passes} ({report.model_calls} model calls)")
    if as_json:
        _emit_json(report.to_json())
    else:
        typer.echo(str(report.out))


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
        if _state["debug"]:
            traceback.print_exc(file=sys.stderr)
        err.print(f"[bold red]internal error:[/] {escape(_one_line(f'{type(exc).__name__}: {exc}'))}")
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
