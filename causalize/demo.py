"""The built-in default job: for every registered plan, save a tiny random checkpoint, convert it,
load it back and verify it, against the unconverted model as a negative control; then, as a world
model (per-frame timesteps + an action adapter), roll it out with streaming caches and with full
recomputation and compare the frames. No downloads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from causalize.api import DEFAULT_FRAMES, Progress, convert, load, say, verify_model


def demo_family(
    plan, workdir: Path, frames: int = DEFAULT_FRAMES, seed: int = 0, progress: Progress | None = None
) -> dict[str, Any]:
    """One row of the demo table for one plan."""
    t0 = time.perf_counter()
    base = plan.build_tiny(seed)
    src = workdir / "base" / plan.name
    base.save_pretrained(src, safe_serialization=True)
    before = verify_model(base, plan, frames=frames)
    report = convert(
        src, workdir / "causal" / plan.name, plan=plan.name, overwrite=True, frames=frames, progress=progress
    )
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
        "rollout": demo_rollout(plan, seed),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def demo_rollout(plan, seed: int = 0) -> dict[str, Any] | None:
    """Streaming vs full-recomputation rollout of the tiny world model (3 frames through a window
    of 3, 2 steps, guidance 2.5): the max abs difference of the frames, or why it cannot stream."""
    import torch

    from causalize.api import convert_model
    from causalize.rollout import RolloutConfig, rollout
    from causalize.world_model import WorldModel

    if plan.conditioning is None:
        return None
    model = plan.build_tiny(seed)
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=2}}")
    wm = WorldModel(model, plan)
    with torch.no_grad():  # zero-initialised layers (the adapter's last one) would hide the actions
        gen = torch.Generator().manual_seed(seed)
        for p in wm.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    block = plan.layout.block_size
    context = plan.make_inputs(model, 2 * block, torch.Generator().manual_seed(seed))[plan.conditioning.sample_arg]
    actions = torch.randn(1, 3 * block, 2, generator=torch.Generator().manual_seed(seed + 1))
    config = RolloutConfig(steps=2, window=3 * block, chunk=block)
    full = rollout(wm, context, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    if plan.streaming is None or block != 1:  # block plans roll out block by block, recomputing
        return {"streaming": False, "full_frame_passes": full.frame_passes}
    streamed = rollout(wm, context, actions, config=config)
    return {
        "streaming": True,
        "max_abs_diff": float((streamed.frames - full.frames).abs().max()),
        "frame_passes": streamed.frame_passes,
        "full_frame_passes": full.frame_passes,
    }


def run_demo(
    workdir: str | Path | None = None, frames: int = DEFAULT_FRAMES, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Convert and verify a locally generated checkpoint of every registered family."""
    from causalize.plugin_manager import registries

    with tempfile.TemporaryDirectory(prefix="causalize-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        rows = []
        for plan in registries().plans:
            say(progress, f"{plan.name}: {plan.model_class}")
            rows.append(demo_family(plan, root, frames, progress=progress))
        return rows
