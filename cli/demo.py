"""`causalize demo`: every registered family converted, verified and rolled out on a tiny
locally built checkpoint. Registered on the app in cli/app.py; thin over causalize.demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from causalize.cli.common import (
    EXIT_LEAK,
    EXIT_OK,
    FRAMES_OPT,
    JSON_OPT,
    emit_json,
    err,
    guard,
    make_table,
    out,
    probe_frames,
    progress_message,
)


def demo(
    workdir: Path | None = typer.Option(
        None, "--workdir", metavar="DIR", help="Keep the generated checkpoints here (default: a temporary directory)."
    ),
    frames: int | None = FRAMES_OPT,
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
    with guard(as_json):
        from causalize.demo import run_demo

        rows = run_demo(workdir, frames=probe_frames(frames), progress=progress_message)
    ok = all(r["causal"] and _rollout_ok(r["rollout"]) for r in rows)
    from causalize.plugin_manager import registries

    refused = [
        {"model_class": c, "reason": r.reason, "nearest": r.nearest} for c, r in registries().plans.refusals.items()
    ]
    if as_json:
        emit_json({"rows": rows, "refused": sorted(refused, key=lambda r: r["model_class"]), "passed": ok})
    else:
        t = make_table(
            "causalize demo",
            "plan",
            "class",
            "params",
            "sites per pass",
            "leak before",
            "leak after",
            "verdict",
            "stream = full",
            "leaking module before",
        )
        for r in rows:
            t.add_row(
                r["plan"],
                r["model_class"],
                f"{r['parameters']:,}",
                ", ".join(f"{k.removeprefix('causal-')} {n}" for k, n in r["sites"].items()),
                f"{r['unconverted_max_leak']:.3g}",
                f"{r['converted_max_leak']:.3g}",
                "[green]causal[/]" if r["causal"] else "[red]FAIL[/]",
                _rollout_cell(r["rollout"]),
                escape(r["unconverted_culprit"] or "-"),
            )
        out.print(t)
        if refused:
            r_table = make_table("refused on purpose", "class", "reason", "nearest plan")
            for r in sorted(refused, key=lambda r: r["model_class"]):
                r_table.add_row(r["model_class"], escape(r["reason"].split(":")[0]), r["nearest"] or "-")
            out.print(r_table)
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
