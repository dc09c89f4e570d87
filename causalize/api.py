"""The public Python API: convert, load, verify and inspect. The CLI is a thin layer over these."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from causalize import __version__
from causalize.errors import CheckpointError, PassError, UsageError
from causalize.manifest import MANIFEST, Manifest, is_converted
from causalize.passes.base import PassContext, Record, Site
from causalize.passes.pipeline import Pipeline, parse
from causalize.plan import Plan
from causalize.precision import check_model_fits, checked_precision, model_device, model_dtype, to_precision
from causalize.precision import describe as describe_dtype

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from causalize.checkpoint import ModelDir
    from causalize.plugin_manager import Registries
    from causalize.verify import CausalityReport

Progress = Callable[[str], None]
DEFAULT_FRAMES = 4


def say(progress: Progress | None, msg: str) -> None:
    """Send a progress message to the caller's callback, if there is one."""
    if progress:
        progress(msg)


def _registries() -> Registries:
    from causalize.plugin_manager import registries

    return registries()


def plan_for(model_or_class: Any, plan: str | Plan | None = None, config: dict | None = None) -> Plan:
    """The plan named `plan`, or the one registered for the model's class (and config)."""
    if isinstance(plan, Plan):
        return plan
    regs = _registries()
    if plan:
        return regs.plans.get(plan)
    if isinstance(model_or_class, str):
        return regs.plans.for_class(model_or_class, config)
    config = config if config is not None else getattr(model_or_class, "config", None)
    return regs.plans.for_class(type(model_or_class).__name__, config)


def parse_pipeline(text: str | Pipeline | None, plan: Plan) -> Pipeline:
    if isinstance(text, Pipeline):
        return text
    return parse(text if text is not None else plan.pipeline, _registries().passes)


def with_action_adapter(pipe: Pipeline, action_dim: int, action_type: str) -> Pipeline:
    """The pipeline with `frame-conditioning{action_dim=N,action_type=T}` set (appended if absent)."""
    if action_dim < 0:
        raise UsageError(f"--action-dim must be >= 0, got {action_dim}")
    if action_type not in ("continuous", "discrete"):
        raise UsageError(f"--action-type must be continuous or discrete, got {action_type!r}")
    step = f"frame-conditioning{{action_dim={action_dim},action_type={action_type}}}"
    if "frame-conditioning" in pipe.names():
        return pipe.replace_options("frame-conditioning", action_dim=action_dim, action_type=action_type)
    return parse(f"{pipe},{step}", _registries().passes)


@dataclass
class PassRun:
    name: str
    version: int
    options: dict[str, Any]
    records: list[Record]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "options": self.options,
            "sites": len(self.records),
            "seconds": round(self.seconds, 4),
        }


def _options_dict(opts: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(opts)


def convert_model(
    model: nn.Module,
    plan: str | Plan | None = None,
    pipeline: str | Pipeline | None = None,
    progress: Progress | None = None,
    *,
    keep_original_weights: bool = False,
) -> list[PassRun]:
    """Run the pipeline on `model` in place. A pass that matches nothing is an error.

    Every change is recorded on the model (causalize.state: `installed(model)` lists them,
    `causalize.unconvert(model)` undoes them). `keep_original_weights`: keep the stock values of
    the parameters a weight transfer overwrites, so that `unconvert` restores them too (costs
    their memory)."""
    from causalize import state

    plan = plan_for(model, plan)
    pipe = parse_pipeline(pipeline, plan)
    regs = _registries()
    runs = []
    for step in pipe.steps:
        cls = regs.passes.get(step.name)
        ctx = PassContext(plan=plan, options=step.resolved(regs.passes))
        t0 = time.perf_counter()
        with state.recording(model, step.name, keep_weights=keep_original_weights):
            records = cls().apply(model, ctx)
        seconds = time.perf_counter() - t0
        if not records:
            raise PassError(
                f"pass '{step.name}' matched nothing in {type(model).__name__} (plan '{plan.name}')",
                "remove it from the pipeline, or fix the plan's targets",
            )
        runs.append(PassRun(step.name, cls.version, _options_dict(ctx.options), records, seconds))
        say(progress, f"{step.name}: {len(records)} sites in {seconds:.2f}s")
    state.remember_recipe(model, plan.name, str(pipe))
    return runs


def example_inputs(model: nn.Module, plan: Plan, frames: int = DEFAULT_FRAMES, seed: int = 0) -> dict[str, Any]:
    import torch

    return plan.make_inputs(model, frames, torch.Generator().manual_seed(seed))


def verify_model(
    model: nn.Module,
    plan: str | Plan | None = None,
    frames: int = DEFAULT_FRAMES,
    seed: int = 0,
    tolerance: float = 0.0,
) -> CausalityReport:
    """Measure causality of an in-memory model with the plan's example inputs, in its own dtype on
    its own device (the model is probed in place and given back unchanged)."""
    from causalize.verify import check_causality

    plan = plan_for(model, plan)
    if frames < max(2, plan.min_frames):
        raise UsageError(f"frames must be at least {max(2, plan.min_frames)} for plan '{plan.name}', got {frames}")
    inputs = example_inputs(model, plan, frames, seed)
    return check_causality(model, inputs, plan.layout, plan.forward, tolerance=tolerance, seed=seed)


def inspect_model(
    model: nn.Module,
    plan: str | Plan | None = None,
    pipeline: str | Pipeline | None = None,
    frames: int = DEFAULT_FRAMES,
) -> dict[str, Any]:
    """The time-mixing sites each pass covers, and any found by a traced forward that none covers;
    for a converted model (e.g. from `causalize.load`) also what its conversion installed."""
    from causalize import state
    from causalize.verify.scan import scan_time_mixers

    plan = plan_for(model, plan)
    pipe = parse_pipeline(pipeline, plan)
    regs = _registries()
    covered: dict[str, list[Site]] = {}
    for step in pipe.steps:
        ctx = PassContext(plan=plan, options=step.resolved(regs.passes))
        covered[step.name] = regs.passes.get(step.name)().find_sites(model, ctx)
    paths = {s.path for sites in covered.values() for s in sites}
    mixers = scan_time_mixers(model, plan, example_inputs(model, plan, frames))
    info = {
        "model_class": type(model).__name__,
        "plan": plan.name,
        "pipeline": str(pipe),
        "block_size": plan.layout.block_size,
        "sites": {name: [s.__dict__ for s in sites] for name, sites in covered.items()},
        "uncovered": [m for m in mixers if m["path"] not in paths],
        "notes": list(plan.notes),
        "attention": _attention_path(model, covered),
        "image_condition": None if (ic := plan.image_condition_of(model)) is None else ic.to_json(),
    }
    if state.registry(model) is not None:
        info["installed"] = state.installed(model)
    return info


def _attention_path(model: nn.Module, covered: dict[str, list[Site]]) -> dict[str, Any] | None:
    """Which block-causal attention execution this model's device gets (None without such sites)."""
    from causalize.modules.attention_exec import describe

    if not covered.get("block-causal-attention"):
        return None
    return describe(model_device(model))


# --- checkpoints on disk -------------------------------------------------------------------


def _load_dir(
    path: str | os.PathLike,
    subfolder: str | None,
    allow_pickle: bool,
    progress: Progress | None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
):
    from causalize import checkpoint

    md = checkpoint.open_model_dir(path, subfolder)
    checkpoint.check_model_class(md)
    check_model_fits(md, dtype, device)
    say(progress, f"reading {md.path} ({md.class_name})")
    model = checkpoint.build_empty(md.class_name, md.config, md)
    return md, model, checkpoint.load_state_dict(md, allow_pickle)


def _trusted_recipe(manifest: Manifest, md: Any) -> tuple[Plan, Pipeline]:
    """The plan and pipeline of an (untrusted) causalize.json, checked against the checkpoint
    before anything is built.

    - `base_class` must be config.json's `_class_name`.
    - `plan` and `pipeline` must parse: an error there is a bad checkpoint (exit 4), not a usage error.
    - The pipeline must contain every pass of the plan's default pipeline. This is the cheap
      stand-in for re-verifying on load: replaying the recipe *is* the conversion, so a recipe
      cut down (say, to `frame-conditioning`) leaves those sites bidirectional while the recorded
      verification still says "passed". Comparing pass names costs nothing; a re-verification
      costs a forward per frame, and `causalize verify` does that. A manifest whose recorded
      verification failed (written with --allow-leak) may omit passes: it declares its leak
      (e.g. the Atari study's noncausal-norm ablation).
    - frame-conditioning's action_dim must be the adapter input width in the safetensors headers
      (`_check_action_dim`); `load` then compares every shape (`_check_shapes`).
    """
    where = md.path / MANIFEST
    if manifest.base_class != md.class_name:
        raise CheckpointError(
            f"{where}: base_class {manifest.base_class!r} is not config.json's _class_name {md.class_name!r}",
            "causalize.json and config.json come from different checkpoints; re-run `causalize convert`",
        )
    try:
        plan = _registries().plans.get(manifest.plan)
    except UsageError as exc:
        raise CheckpointError(f"{where}: field 'plan': {exc.message}", exc.hint) from None
    try:
        pipe = parse_pipeline(manifest.pipeline, plan)
    except UsageError as exc:
        raise CheckpointError(f"{where}: field 'pipeline': {exc.message}", "re-run `causalize convert`") from None
    missing = [name for name in parse_pipeline(None, plan).names() if name not in pipe.names()]
    if missing and not manifest.declares_leak():
        raise CheckpointError(
            f"{where}: field 'pipeline' ({manifest.pipeline!r}) lacks {', '.join(missing)} of plan '{plan.name}', "
            "so the loaded model would not be causal, but causalize.json does not record a failed verification",
            "restore causalize.json, or re-run `causalize convert` (with --allow-leak if the leak is intended)",
        )
    weak = [
        f"{st.name}{{{_options_dict(o)}}}"
        for st in pipe.steps
        if _weakens(o := st.resolved(_registries().passes), plan)
    ]
    if weak and not manifest.declares_leak():
        raise CheckpointError(
            f"{where}: options {', '.join(weak)} make the model less causal than plan '{plan.name}' "
            "allows, but causalize.json does not record a failed verification",
            "restore causalize.json, or re-run `causalize convert`",
        )
    _check_action_dim(pipe, md)
    return plan, pipe


def _weakens(options: Any, plan: Plan) -> bool:
    """Options that widen what a frame sees: the deliberately leaky text rule, or a coarser block."""
    return (
        bool(getattr(options, "context_sees_video", False))
        or getattr(options, "block_size", 0) > plan.layout.block_size
    )


def _check_action_dim(pipe: Pipeline, md: Any) -> None:
    """frame-conditioning's action_dim against the input width of the action adapter the weights
    hold, before anything is built: `verify --shrink` builds its adapter for real from this number
    (`load` has the general check, `_check_shapes`)."""
    from causalize.modules.action_encoder import ADAPTER_ATTR

    step = next((s for s in pipe.steps if s.name == "frame-conditioning"), None)
    action_dim = dict(step.options).get("action_dim", 0) if step else 0
    stored = md.shapes if action_dim > 0 else None  # safetensors headers; None for pickle
    if stored is None:
        return
    widths = sorted(
        {shape[-1] for k, shape in stored.items() if k.startswith(f"{ADAPTER_ATTR}.inp.") and len(shape) == 2}
    )
    if widths != [action_dim]:
        raise CheckpointError(
            f"{md.path / MANIFEST}: field 'pipeline' sets frame-conditioning action_dim={action_dim}, "
            f"but the action adapter in the weights takes {widths[0] if len(widths) == 1 else widths or 'no actions'}",
            "causalize.json does not belong to these weights; restore it, or re-run `causalize convert`",
        )


def _check_shapes(model: nn.Module, md: Any) -> None:
    """Every tensor the replayed recipe built (with meta parameters: nothing allocated yet) must have
    the shape the checkpoint's safetensors headers give it, so no size taken from causalize.json
    allocates anything before it is found wrong. Pickle checkpoints have no headers;
    `assign_weights` compares their shapes after reading (the model is still meta, so nothing of
    the manifest's size is allocated either)."""
    stored = md.shapes
    if stored is None:
        return
    for name, tensor in model.state_dict().items():
        if name in stored and tuple(tensor.shape) != stored[name]:
            raise CheckpointError(
                f"{md.path / MANIFEST}: its pipeline builds {name} with shape {tuple(tensor.shape)}, "
                f"but the weights hold {stored[name]}",
                "causalize.json does not belong to these weights; restore it, or re-run `causalize convert`",
            )


def load(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """A converted checkpoint as an instance of its diffusers class: drop-in and causal.

    Builds the base structure from config.json (parameters on the meta device), replays the
    pipeline stored in causalize.json after checking it (`_trusted_recipe`, `_check_shapes`), then
    reads and assigns the saved weights; `torch_dtype` (None: as stored) and `device` (None: CPU)
    as in diffusers' `from_pretrained`, with `_keep_in_fp32_modules` kept in fp32.
    """
    from causalize import checkpoint

    dtype, device = checked_precision(torch_dtype, device)
    manifest = Manifest.read(Path(path))
    md = checkpoint.open_model_dir(path, None)
    checkpoint.check_model_class(md)
    check_model_fits(md, dtype, device)
    the_plan, pipe = _trusted_recipe(manifest, md)
    say(progress, f"reading {md.path} ({md.class_name})")
    model = checkpoint.build_empty(md.class_name, md.config, md)
    convert_model(model, the_plan, pipe)
    _check_shapes(model, md)
    checkpoint.assign_weights(model, checkpoint.load_state_dict(md, allow_pickle), md.path)
    return to_precision(model, dtype, device)


def load_any(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, Manifest | None]:
    """A converted checkpoint through `load`, or a plain diffusers one as is (with no manifest)."""
    from causalize import checkpoint

    if subfolder is None and is_converted(Path(path)):
        model = load(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype, device=device, progress=progress)
        return model, Manifest.read(Path(path))
    dtype, dev = checked_precision(torch_dtype, device)
    md, model, state = _load_dir(path, subfolder, allow_pickle, progress, dtype, dev)
    checkpoint.assign_weights(model, state, md.path)
    return to_precision(model, dtype, dev), None


def verify(
    path: str | os.PathLike,
    *,
    frames: int = DEFAULT_FRAMES,
    plan: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    shrink: bool = False,
    progress: Progress | None = None,
) -> CausalityReport:
    """Causality of a checkpoint on disk (converted or not: an unconverted one is expected to leak),
    probed in `torch_dtype` (None: as stored) on `device` (None: CPU).

    `shrink`: probe a random-weight model of the same class built from the checkpoint's config
    with the plan's tiny sizes (causalize.verify.shrink) instead of the checkpoint itself; no
    weights are read, so a model too large for the device is still checked (a proof for the class,
    config flags and pipeline rather than for these weights)."""
    if shrink:
        return _verify_shrunken(
            path,
            frames=frames,
            plan=plan,
            subfolder=subfolder,
            torch_dtype=torch_dtype,
            device=device,
            progress=progress,
        )
    model, manifest = load_any(
        path, subfolder=subfolder, allow_pickle=allow_pickle, torch_dtype=torch_dtype, device=device, progress=progress
    )
    plan_name = plan or (manifest.plan if manifest else None)
    say(progress, f"probing {frames} frames in {describe_dtype(model_dtype(model))} on {model_device(model)}")
    return verify_model(model, plan_for(model, plan_name), frames=frames)


def _verify_shrunken(path, *, frames, plan, subfolder, torch_dtype, device, progress) -> CausalityReport:
    from causalize import checkpoint
    from causalize.verify.shrink import build_shrunken

    dtype, dev = checked_precision(torch_dtype, device)
    converted = subfolder is None and is_converted(Path(path))
    manifest = Manifest.read(Path(path)) if converted else None
    md = checkpoint.open_model_dir(path, subfolder)
    checkpoint.check_model_class(md)
    recipe = _trusted_recipe(manifest, md) if manifest is not None else None
    the_plan = plan_for(md.class_name, plan, md.config) if plan or recipe is None else recipe[0]
    model, shrunk = build_shrunken(the_plan, md.config)
    say(
        progress,
        f"probing a shrunken {md.class_name} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"sizes from plan '{the_plan.name}') on {frames} frames",
    )
    if recipe is not None:
        convert_model(model, the_plan, recipe[1])
    to_precision(model, dtype, dev)
    report = verify_model(model, the_plan, frames=frames)
    report.subject = "shrunken copy"
    return report


def inspect(
    path: str | os.PathLike,
    *,
    plan: str | None = None,
    pipeline: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    frames: int = DEFAULT_FRAMES,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`inspect_model` on a checkpoint on disk, without converting it. A class without a plan (or
    refused on purpose) is reported before any weight is read."""
    from causalize import checkpoint

    stock = checkpoint.stock_class(path, subfolder) if plan is None else None
    if stock is not None:
        plan_for(stock[0], None, stock[1])
    model, manifest = load_any(path, subfolder=subfolder, allow_pickle=allow_pickle, progress=progress)
    return inspect_model(model, plan_for(model, plan or (manifest.plan if manifest else None)), pipeline, frames)


@dataclass
class ConvertReport:
    src: str
    out: str
    model_class: str
    plan: str
    pipeline: str
    passes: list[PassRun]
    verification: dict[str, Any] | None
    written: bool
    dry_run: bool
    seconds: dict[str, float] = field(default_factory=dict)
    parameters: int = 0

    @property
    def passed(self) -> bool:
        return self.verification is None or bool(self.verification["passed"])

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "out": self.out,
            "model_class": self.model_class,
            "plan": self.plan,
            "pipeline": self.pipeline,
            "passes": [p.to_json() for p in self.passes],
            "verification": self.verification,
            "written": self.written,
            "dry_run": self.dry_run,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "parameters": self.parameters,
        }


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    plan: str | None = None,
    pipeline: str | None = None,
    subfolder: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    allow_leak: bool = False,
    verify: bool = True,
    action_dim: int = 0,
    action_type: str = "continuous",
    frames: int = DEFAULT_FRAMES,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> ConvertReport:
    """Convert a diffusers checkpoint directory into a causal one at OUT (atomically; SRC untouched).

    If verification fails, nothing is written unless `allow_leak` (the manifest then records it).
    `action_dim` > 0 appends `frame-conditioning{action_dim=N,action_type=...}` to the pipeline:
    per-frame timesteps and a frame-level action adapter (see causalize.WorldModel).
    `torch_dtype` (None: the checkpoint's) is the dtype the passes, the verification and the saved
    weights use; `device` (None: CPU) is where the model is converted and verified.
    """
    from causalize import checkpoint, fs

    t0 = time.perf_counter()
    out = Path(out)
    dtype, dev = checked_precision(torch_dtype, device)
    md = checkpoint.open_model_dir(src, subfolder)
    checkpoint.check_model_class(md)
    check_model_fits(md, dtype, dev)
    # OUT is checked (and stale temporaries of a killed run removed) before any weight is read;
    # a dry run writes nothing.
    checkpoint.check_out_path(md.path, out, overwrite or dry_run, md.pipeline_dir, writable=not dry_run)
    if not dry_run:
        for stale in fs.clean_stale(out):
            say(progress, f"removed {stale}, left by an interrupted causalize run")
    the_plan = plan_for(md.class_name, plan, md.config)
    pipe = parse_pipeline(pipeline, the_plan)
    if action_dim:
        pipe = with_action_adapter(pipe, action_dim, action_type)
    model = checkpoint.build_empty(md.class_name, md.config, md)
    checkpoint.check_weights_fit(model, md)  # names and shapes from the headers, before reading data
    checkpoint.assign_weights(model, checkpoint.load_state_dict(md, allow_pickle), md.path)
    to_precision(model, dtype, dev)
    seconds = {"load": time.perf_counter() - t0}
    n_params = sum(p.numel() for p in model.parameters())
    say(progress, f"loaded {md.class_name} ({n_params:,} parameters) in {seconds['load']:.1f}s")

    t1 = time.perf_counter()
    runs = convert_model(model, the_plan, pipe, progress)
    seconds["passes"] = time.perf_counter() - t1
    report = ConvertReport(
        str(src),
        str(out),
        md.class_name,
        the_plan.name,
        str(pipe),
        runs,
        None,
        False,
        dry_run,
        seconds,
        sum(p.numel() for p in model.parameters()),
    )  # after the passes: adapters included
    if verify:
        t2 = time.perf_counter()
        say(progress, f"verifying causality on {frames} frames")
        report.verification = verify_model(model, the_plan, frames=frames).to_json()
        seconds["verify"] = time.perf_counter() - t2
    if dry_run or (not report.passed and not allow_leak):
        seconds["total"] = time.perf_counter() - t0
        return report

    t3 = time.perf_counter()
    manifest = Manifest(
        base_class=md.class_name,
        plan=the_plan.name,
        pipeline=str(pipe),
        passes=[r.to_json() for r in runs],
        records=[rec.to_json() for r in runs for rec in r.records],
        verification=report.verification,
        source=str(Path(src).resolve()),
        causalize_version=__version__,
    )
    from causalize import state

    reuse = md if dtype is None and state.weights_untouched(model) else None  # no tensor changed
    _write_atomic(model, manifest, out, overwrite, progress, reuse)
    seconds["save"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    report.written = True
    return report


def _write_atomic(
    model: nn.Module,
    manifest: Manifest,
    out: Path,
    overwrite: bool,
    progress: Progress | None,
    reuse: ModelDir | None = None,
) -> None:
    """Write to a temporary sibling directory, then put it at OUT in one step (causalize.fs):
    a concurrent writer that got there first wins, and this one fails with a usage error.
    (`convert` removed stale temporaries of OUT before loading.)"""
    from causalize import checkpoint, fs

    try:
        with fs.new_directory(out, overwrite=overwrite) as tmp:
            how = checkpoint.save_model(model, tmp, reuse)
            manifest.write(tmp)
    except FileExistsError:
        raise UsageError(
            f"{out} was created by someone else while converting; it was left as it is",
            "choose another OUT, or pass --overwrite to replace it",
        ) from None
    except (PermissionError, NotADirectoryError) as exc:  # checked before the work; changed since
        raise UsageError(f"cannot write {out}: {exc.strerror}: {exc.filename}", "choose another OUT") from None
    say(progress, f"wrote {out} (weights {how})")
