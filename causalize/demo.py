"""The built-in default job: for every registered plan, save a tiny random checkpoint, convert it,
load it back and verify it, against the unconverted model as a negative control. No downloads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from causalize.api import DEFAULT_FRAMES, Progress, _say, convert, load, verify_model


def demo_family(plan, workdir: Path, frames: int = DEFAULT_FRAMES, seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """One row of the demo table for one plan."""
    t0 = time.perf_counter()
    base = plan.build_tiny(seed)
    src = workdir / "base" / plan.name
    base.save_pretrained(src, safe_serialization=True)
    before = verify_model(base, plan, frames=frames)
    report = convert(src, workdir / "causal" / plan.name, plan=plan.name, overwrite=True, frames=frames, progress=progress)
    after = verify_model(load(report.out), plan, frames=frames)
    culprit = before.culprit
    return {
        "plan": plan.name,
        "model_class": plan.model_class,
        "parameters": sum(p.numel() for p in base.parameters()),
        "sites": {r.name: len(r.records) for r in report.passes},
        "block_size": plan.layout.block_size,
        "unconverted_max_leak": before.max_leak,
        "unconverted_culprit": f"{culprit['path']} ({culprit['class']})" if culprit else None,
        "converted_max_leak": after.max_leak,
        "causal": after.passed and not before.passed,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run_demo(workdir: str | Path | None = None, frames: int = DEFAULT_FRAMES, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Convert and verify a locally generated checkpoint of every registered family."""
    from causalize.plugin_manager import registries

    with tempfile.TemporaryDirectory(prefix="causalize-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        rows = []
        for plan in registries().plans:
            _say(progress, f"{plan.name}: {plan.model_class}")
            rows.append(demo_family(plan, root, frames, progress=progress))
        return rows
