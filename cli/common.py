"""What every `causalize` command shares: the two consoles (results on stdout, messages on
stderr), the common options, JSON output, one-line errors with exit codes, and summary tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
    "  1  verification failed: some output frame depends on a later input frame, or the probe's output is not finite\n"
    "  2  usage error (bad option, bad --pipeline, OUT exists or lies inside SRC)\n"
    "  3  internal error (re-run with --debug for the traceback)\n"
    "  4  conversion error (no plan, a pass matched nothing, bad checkpoint, pickle refused)"
)


def terminal_width(stream: Any) -> int | None:
    """Terminal width on a terminal (rich's default); wide enough for whole table rows in logs and pipes."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 160


out = Console(highlight=False, soft_wrap=True, width=terminal_width(sys.stdout))  # results (stdout)
err = Console(
    stderr=True, highlight=False, soft_wrap=True, width=terminal_width(sys.stderr)
)  # messages, progress, summaries
state = {"debug": False}

# Options shared by several commands.
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document to stdout (errors too).")
PLAN_OPT = typer.Option(
    None,
    "--plan",
    metavar="NAME",
    help="Use this plan instead of the one registered for the model class (see `causalize plugins`).",
)
PIPELINE_OPT = typer.Option(
    None,
    "--pipeline",
    metavar="TEXT",
    help="Pass pipeline, e.g. 'causal-temporal-conv{transfer=extrapolative},causal-temporal-attention' (default: the plan's).",
)
SUBFOLDER_OPT = typer.Option(
    None,
    "--subfolder",
    metavar="NAME",
    help="Denoiser subfolder of a pipeline directory (default: unet/ or transformer/, whichever exists).",
)
FRAMES_OPT = typer.Option(None, "--frames", metavar="N", help="Frames in the causality probe (default 4).")
PICKLE_OPT = typer.Option(
    False, "--allow-pickle", help="Accept diffusion_pytorch_model.bin (loaded with weights_only=True)."
)
DTYPE_OPT = typer.Option(
    None,
    "--dtype",
    metavar="fp32|bf16|fp16",
    help="Compute dtype (default: the checkpoint's own). Modules diffusers keeps in fp32 stay fp32.",
)
DEVICE_OPT = typer.Option(None, "--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cpu).")


def jsonable(obj: Any) -> Any:
    """NaN and infinities are not JSON: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def emit_json(doc: Any) -> None:
    typer.echo(json.dumps(jsonable(doc), indent=2, default=str, allow_nan=False))


def probe_frames(frames: int | None) -> int:
    """--frames of verify / convert, checked here so the error has its hint (a plan may need more)."""
    from causalize.api import DEFAULT_FRAMES
    from causalize.errors import UsageError

    if frames is not None and frames < 2:
        raise UsageError(
            f"--frames must be at least 2, got {frames}",
            f"the probe perturbs a later frame and watches an earlier one: use --frames {DEFAULT_FRAMES} (the default)",
        )
    return DEFAULT_FRAMES if frames is None else frames


def progress_message(msg: str) -> None:
    err.print(escape(msg), style="dim")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(
    kind: str,
    message: str,
    hint: str | None,
    code: int,
    as_json: bool,
    label: str = "error",
    command: str | None = None,
) -> None:
    if state["debug"]:
        traceback.print_exc(file=sys.stderr)
    if not hint and code in (EXIT_USAGE, EXIT_CONVERSION):  # the promise: every error has a hint
        hint = default_hint(command)
    err.print(f"[bold red]{label}:[/] {escape(one_line(message))}")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(one_line(hint))}")
    if as_json:
        emit_json({"error": {"kind": kind, "message": message, "hint": hint, "code": code}})
    raise typer.Exit(code)


def default_hint(command: str | None = None) -> str:
    """A pointer to the command's help, for errors raised without a more specific hint."""
    return f"see `causalize {command} --help`" if command else "see `causalize --help`"


@contextlib.contextmanager
def guard(as_json: bool = False, command: str | None = None) -> Iterator[None]:
    """Map library errors to their exit code with a one-line message (traceback only with --debug);
    `command` names the running command for the hint of an error raised without one."""
    import warnings

    from causalize.errors import CausalizeError

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        """A warning as one line on stderr (not Python's file:line: source form)."""
        err.print(f"[yellow]warning:[/] {escape(one_line(str(message)))}")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own control flow
        raise
    except CausalizeError as exc:
        fail(exc.kind, exc.message, exc.hint, exc.code, as_json, command=command)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: say so briefly, exit 3
        fail(
            "internal-error",
            f"{type(exc).__name__}: {exc}",
            "re-run with --debug for the traceback" if not state["debug"] else None,
            EXIT_INTERNAL,
            as_json,
            label="internal error",
        )


class LazyBar:
    """A progress bar on stderr shown from its first update, so that errors raised while setting up
    stay one line, and stopped only if it was shown (stopping a bar never shown prints an empty line).
    `detail` is a column template over the task's fields (given as keyword arguments)."""

    def __init__(self, label: str, detail: str, *, eta: bool = True, shown: bool = True, **fields: Any):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(detail), TimeElapsedColumn()]
        if eta:
            columns.append(TimeRemainingColumn())
        self.bar = Progress(*columns, console=err, transient=False)
        self.task = self.bar.add_task(label, total=None, start=False, **fields)
        self.shown = shown

    def update(self, completed: int, total: int, **fields: Any) -> None:
        if not self.shown:
            return
        if not self.bar.live.is_started:
            self.bar.start()
            self.bar.start_task(self.task)
        self.bar.update(self.task, completed=completed, total=total, **fields)

    def stop(self) -> None:
        if self.bar.live.is_started:
            self.bar.stop()


def fmt_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"


def culprit_text(c: dict[str, Any] | None) -> str:
    return f"{c['path']} ({c['class']})" if c else "-"


def verdict_text(v: dict[str, Any]) -> str:
    if v["passed"]:
        return f"[green]causal[/] (max leak {v['max_leak']:.3g})"
    if v.get("nonfinite"):  # NaN / inf: nothing was measured, neither causal nor leaky
        return f"[red]NOT verified[/]: {escape(v['summary'])}"
    return f"[red]NOT causal[/]: {escape(v['summary'])}"


def make_table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, overflow="fold", no_wrap=i == 0)  # names stay whole; the rest folds
    return t


def print_convert_summary(report: ConvertReport) -> None:
    """The conversion summary on stderr: passes, (dry run) sites, verdict, what was written."""
    dry_run = report.dry_run
    table = make_table(
        f"{report.model_class} -> plan '{report.plan}'  ({report.parameters:,} parameters)",
        "pass",
        "sites",
        "options",
        "seconds",
    )
    for run in report.passes:
        table.add_row(run.name, str(len(run.records)), escape(fmt_options(run.options)), f"{run.seconds:.2f}")
    err.print(table)
    if dry_run:
        for run in report.passes:  # dry run: show every site it would rewrite
            sites = make_table(f"{run.name}: {len(run.records)} sites", "path", "before", "after")
            for rec in run.records:
                sites.add_row(rec.path, rec.before, escape(rec.after))
            err.print(sites)
    v = report.verification
    err.print("verification: " + ("skipped (--no-verify)" if v is None else verdict_text(v)))
    if v is not None and v.get("violations"):
        err.print(f"leak: max {v['max_leak']:.3g}, first leaking module {escape(culprit_text(v.get('culprit')))}")
    if report.written:
        err.print(
            f"[green]wrote[/] {escape(str(report.out))} in {report.seconds.get('total', 0):.1f}s"
            + (" [red](verification failed, recorded in causalize.json)[/]" if not report.passed else "")
        )
    elif dry_run:
        err.print("dry run: nothing written")
    else:
        what = "fix the weights (non-finite output)" if v and v.get("nonfinite") else "fix the pipeline"
        err.print(f"[red]nothing written[/]: verification failed; {what}, or pass --allow-leak to write anyway")


def check_precision_names(dtype: str | None) -> None:
    """--dtype checked by name before torch is imported (the device is checked once torch is in)."""
    from causalize.precision import check_dtype_name

    check_dtype_name(dtype)


def check_source(path: os.PathLike[str] | str, subfolder: str | None) -> None:
    """SRC exists and is a readable model or pipeline directory: checked before torch is imported,
    so a mistyped path is a one-line error in a fraction of a second (the library checks again)."""
    from causalize.checkpoint import resolve  # standard library only: no torch

    resolve(path, subfolder)
