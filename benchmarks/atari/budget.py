"""Does the world model start to follow its actions with more fine-tuning? (issue 17)

    python -m benchmarks.atari.budget --study DIR [--variant V] [--steps 1600 3200]
        [--set KEY=VALUE ...] [--sampler KEY=VALUE ...] [--replicate R] [--fine-tune-missing]
        [--threads 2] [--json PATH]

The study fine-tunes every variant for the scale's ``finetune.steps`` (800 at the latent cpu
scale) and finds that no model follows its actions. This continues the fine-tuning of one variant
of a study (the study seed's run; the study need only have finished that variant's fine-tuning)
from its last checkpoint, with the same settings and seed, to each step count in ``--steps`` in
turn (``DIR/budget/<variant>/step-N/``, each continuing the last one's checkpoint, so the runs
replay one uninterrupted run; resumable), and measures at the study's own step count and at each
new one (``--steps`` equal to the study's own count: only the study's model is measured, nothing
trained; a study still fine-tuning its other variants can be measured this way, with the study
stopped, since both need the cores):

* the one-step action check (``evaluate.action_check``): how much the predicted next frame moves
  with its action, against how much it moves with its past, and per action the predicted paddle
  move beside the real one;
* rollouts of the test segments with the real and with random actions (guidance 1, the study's
  sampler, noise and random actions): paddle error real − random, paired over segments, with the
  study's 2-standard-error verdict.

With ``--set`` (fine-tuning settings, ``TrainConfig`` fields, e.g. ``--set adapter_lr_scale=10``)
it asks instead whether other settings buy the same at a given budget: the variant is fine-tuned
afresh from its converted checkpoint with the study's settings so changed, to each step count
(``DIR/budget/<variant>+<settings>/step-N/``, chained and resumable the same way), and measured
the same way (the study's own model is measured by the plain check, ``DIR/budget/<variant>.json``).

With ``--sampler`` (the study's rollout settings ``history_noise``, ``steps``, ``eta``, ``window``,
e.g. ``--sampler history_noise=100``) the same models are measured with the sampler so changed
(nothing is trained for it): does a model that loses the paddle over a rollout keep it when its
own past is noised more? A kept measurement is reused only for the same weights and sampler.

With ``--fine-tune-missing`` a run the study has not made yet (a replicate seed it has not
reached; every run of a study made with ``study --shared-only``) is first converted and fine-tuned
by the study's own stages, then checked: the seeds of a long study are trained run by run, each a
process of its own (machines that do not keep files between sessions finish one run per session).

A table goes to stdout and everything to ``DIR/budget/<variant>[+<settings>][@<sampler>].json``
(or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import record_text
from benchmarks.atari import control
from benchmarks.atari import evaluate as ev
from benchmarks.atari.pretrain import MODEL_DIR
from benchmarks.atari.reuse import recorded_data
from benchmarks.atari.runtime import StageProgress, set_determinism
from benchmarks.atari.scales import CONTEXT_LEVELS, FIRST_FRAMES, StudyError
from benchmarks.atari.seeds import first_frames
from benchmarks.atari.stages import Study, read_identity
from benchmarks.atari.targets import SPANS, copy_last_span
from causalize.errors import CausalizeError

#: A budget run's measurement, beside its model.
MEASURE_FILE = "measure.json"

#: The study's rollout settings (``eval``) that --sampler may change for the measurement.
SAMPLER_KEYS = ("history_noise", "steps", "eta", "window")

#: Settings --set may not change: where and how far the run goes (the check sets them), and what
#: the model predicts and from what (the measurements use the study's sampler and decoder).
_FIXED = {
    "model",
    "data",
    "output_dir",
    "steps",
    "resume",
    "checkpoint_every",
    "keep_checkpoints",
    "prediction_type",
    "zero_terminal_snr",
    "vae",
    "conditioning",
}


def open_study(out: Path, replicate: int = 0) -> Study:
    """The finished study at ``out``, as it was configured (its study.json); ``replicate`` r > 0:
    its replicate with training seed S + r (``out/seed<S+r>/``)."""
    ident = read_identity(out)
    data_dir = recorded_data(out, log=lambda m: None)  # a link to recordings that are gone is refused
    study = Study(out, ident["config"], ident["seed"], scale=ident["scale"], data_dir=data_dir)
    if replicate:
        if replicate >= int(study.cfg["replicates"]["seeds"]):
            raise StudyError(
                f"the study has {study.cfg['replicates']['seeds']} training seed(s); no replicate {replicate}"
            )
        study = study.replica(replicate)
    return study


def _last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def settings_tag(overrides: dict[str, Any]) -> str:
    """``key=value,…`` in key order: the name of a run with changed settings ("" for none)."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items()))


def run_name(variant: str, overrides: dict[str, Any]) -> str:
    """``<variant>`` or ``<variant>+<settings>``: the run's directory and JSON name under budget/."""
    return variant + ("+" + settings_tag(overrides) if overrides else "")


def run_dir(study: Study, name: str, steps: int) -> Path:
    """Where the budget run ``name`` fine-tuned to ``steps`` keeps its model (``final/``), checkpoints
    and measurement."""
    return study.out / "budget" / name / f"step-{steps}"


def record_path(out: Path, name: str) -> Path:
    """The budget check's record of the run ``name`` for the seed whose folder is ``out``."""
    return out / "budget" / f"{name}.json"


def _start(study: Study, name: str, steps: int, fresh: bool) -> Path | None:
    """Where a run to ``steps`` starts: the last checkpoint of the longest shorter one, else of
    the study's run (None: none, or ``fresh``; the run then trains from the converted model)."""
    shorter = sorted(
        (int(d.name.split("-")[1]), d)
        for d in (study.out / "budget" / name).glob("step-*")
        if int(d.name.split("-")[1]) < steps
    )
    for _, d in reversed(shorter):
        if (ckpt := _last_checkpoint(d)) is not None:
            return ckpt
    return None if fresh else _last_checkpoint(study.out / "finetune" / name)


def _train_config(fields: dict[str, Any]) -> Any:
    """TrainConfig(**fields), its refusals (an unknown field, a bad value) as StudyError."""
    from causalize.training.config import TrainConfig, TrainingError

    try:
        return TrainConfig(**fields)
    except (TypeError, TrainingError) as exc:
        raise StudyError(f"--set: {exc}") from exc


def _recorded_finetuning(study: Study, variant: str) -> dict[str, Any]:
    """The study's fine-tuning settings of ``variant`` as it recorded them, with the model and data
    where the study is now, not where it was made: a study moved (to results/) continues."""
    record = json.loads((study.out / "finetune" / f"{variant}.json").read_text(encoding="utf-8"))["config"]
    return {**record, "model": str(study.out / "convert" / variant), "data": str(study.dataset("train"))}


def continue_finetuning(study: Study, variant: str, steps: int, overrides: dict[str, Any] | None = None) -> Path:
    """The variant fine-tuned to ``steps`` (its ``final/`` model): continuing the study's run, or
    with ``overrides`` (TrainConfig fields) a run of its own from the converted checkpoint."""
    from causalize.training.trainer import train

    overrides = overrides or {}
    name = run_name(variant, overrides)
    out = run_dir(study, name, steps)
    if (out / "final").is_dir():
        return out / "final"
    f = study.cfg["finetune"]
    base = _recorded_finetuning(study, variant)
    start = _start(study, name, steps, fresh=bool(overrides))
    resume: bool | str = True if _last_checkpoint(out) is not None or start is None else str(start)
    fields = {
        **base,
        **overrides,
        "output_dir": str(out),
        "steps": int(steps),
        "checkpoint_every": f["checkpoint_every"],
        "keep_checkpoints": 1,
        "resume": resume,
    }
    config = _train_config(fields)
    train(config, progress=StageProgress(study.log, f"[budget {name}] to {steps}"))
    return out / "final"


def measure(study: Study, variant: str, model_dir: Path, segments: ev.Segments) -> dict[str, Any]:
    """The action check and the real- against random-action paddle error of one fine-tuned model."""
    from causalize.rollout.loading import load_world_model

    wm, _ = load_world_model(model_dir, device=study.device)
    batch = study.cfg["eval"]["batch_size"]
    check = ev.action_check(wm, segments, list(CONTEXT_LEVELS), study.seed, decode=study.decoder(), batch_size=batch)
    scored = {kind: score for kind, (_, score) in rollouts(study, variant, wm, segments).items()}
    ctrl = control.controllability(scored["real"], scored["random"])
    return {
        "action_check": check,
        "paddle": _paddle_summary(ctrl),
        "psnr_real": scored["real"]["psnr"]["overall"],
        "copy_last": _against_copy_last(scored["real"], segments),
    }


def rollouts(study: Study, variant: str, wm: Any, segments: ev.Segments) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The measurement's rollouts: ``"real"`` and ``"random"`` actions -> (frames in [-1, 1], their
    scores against the real future), with the study's sampler at guidance 1."""
    config = study.rollout_config(variant, 1.0)
    out = {}
    for kind, actions in (("real", segments.actions), ("random", ev.random_actions(segments, study.seed))):
        pred, _ = study.rollout(wm, segments, actions, config)
        out[kind] = (pred, ev.score(pred, segments.real_future))
    return out


def _against_copy_last(real: dict[str, Any], segments: ev.Segments) -> dict[str, Any]:
    """The real-action rollout − copy-last, PSNR and SSIM paired over segments, on the first
    ``FIRST_FRAMES`` generated frames (the issue's target) and on all of them (``paired`` rows)."""
    base = {"metrics": ev.score(ev.copy_last_baseline(segments), segments.real_future, paddle=False)}
    mine, k = {"metrics": real}, min(FIRST_FRAMES, segments.horizon)
    return {
        span: {m: first_frames(mine, base, m, n) for m in ("psnr", "ssim")}
        for span, n in ((f"first_{k}", k), ("all", segments.horizon))
    }


def _measured(
    study: Study, variant: str, model: Path, segments: ev.Segments, cached: bool, sampler: dict[str, Any]
) -> dict[str, Any]:
    """:func:`measure`, kept beside a budget run's model (``step-N/measure[@<sampler>].json``) so
    that a rerun with more step counts measures only the new ones."""
    path = model.parent / (MEASURE_FILE if not sampler else f"measure@{settings_tag(sampler)}.json")
    weights = _fingerprint(model)
    if cached and path.is_file():
        row = json.loads(path.read_text(encoding="utf-8"))
        if row.get("weights_sha256") == weights and row.get("sampler", {}) == sampler and _complete(row):
            return row
    t0 = time.perf_counter()
    row = {**measure(study, variant, model, segments), "measure_seconds": time.perf_counter() - t0}
    row["weights_sha256"], row["sampler"] = weights, sampler
    if cached:
        path.write_text(record_text(row), encoding="utf-8")
    return row


def _complete(row: dict[str, Any]) -> bool:
    """Whether a kept measurement has everything :func:`measure` now records (the copy-last
    comparison and the per-segment paddle differences came later; older rows are measured again)."""
    return "copy_last" in row and "per_segment" in row.get("paddle", {}).get("real_minus_random", {})


def _fingerprint(model: Path) -> str:
    """sha256 of the model's weights: a kept measurement is reused only for the same weights."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(model.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _paddle_summary(ctrl: dict[str, Any]) -> dict[str, Any]:
    """The overall paddle errors; real − random also per segment (the rule over seeds needs them)."""
    p = ctrl["paddle"]
    return {
        "real": p["real"]["overall"],
        "random": p["random"]["overall"],
        "real_minus_random": {**p["real_minus_random"]["overall"], "per_segment": p["real_minus_random"]["per_sample"]},
        "missing_real": p["real"]["missing"]["overall"],
        "verdict": p["verdict"],
    }


def run(
    out: Path,
    variant: str | None,
    steps: list[int],
    replicate: int = 0,
    overrides: dict[str, Any] | None = None,
    sampler: dict[str, Any] | None = None,
    fine_tune_missing: bool = False,
) -> dict[str, Any]:
    """The budget check of ``variant`` (None: the backbone's method variant) of the study at ``out``,
    measured with the study's sampler changed by ``sampler`` (``SAMPLER_KEYS``).
    ``fine_tune_missing``: the study's own run of the variant, when missing, is first converted and
    fine-tuned as the study does (:func:`study_run`)."""
    overrides, sampler = _typed(overrides or {}), dict(sampler or {})
    bad = sorted(set(overrides) & _FIXED)
    if bad:
        raise StudyError(f"--set cannot change {', '.join(bad)}: the budget check sets them")
    if unknown := sorted(set(sampler) - set(SAMPLER_KEYS)):
        raise StudyError(f"--sampler cannot change {', '.join(unknown)}; it changes {', '.join(SAMPLER_KEYS)}")
    study = open_study(out, replicate)
    study.cfg["eval"].update(sampler)
    if not study.paddle:
        raise StudyError("the budget check measures Pong's paddle; this study's held-out game is not Pong")
    known = list(study.cfg["replicates"]["variants"]) if replicate else list(study.backbone.variants)
    variant = variant or study.backbone.main
    if variant not in known:
        raise StudyError(f"no fine-tuned variant {variant!r} for this seed; use one of {', '.join(known)}")
    base_steps = int(study.cfg["finetune"]["steps"])
    if not overrides and any(s < base_steps for s in steps):
        raise StudyError(f"--steps must be at least the study's own fine-tuning steps ({base_steps})")
    study_model = study.out / "finetune" / variant / "final"
    if not study_model.is_dir() and not fine_tune_missing:
        raise StudyError(
            f"the study has not finished fine-tuning {variant!r} (no finetune/{variant}/final); "
            "--fine-tune-missing fine-tunes it as the study does"
        )
    if not study_model.is_dir():
        study_run(study, variant)
    if overrides:
        _train_config({**_recorded_finetuning(study, variant), **overrides})  # refuse a bad setting before any work
    _check_sampler(study, variant, sampler)
    segments = study.segments()
    rows = {}
    name = run_name(variant, overrides) + (f"@{settings_tag(sampler)}" if sampler else "")
    for n in [base_steps, *sorted(set(steps) - {base_steps})] if not overrides else sorted(set(steps)):
        t0 = time.perf_counter()
        if n == base_steps and not overrides:
            model = study_model
        else:
            model = continue_finetuning(study, variant, n, overrides)
        rows[str(n)] = _measured(study, variant, model, segments, model != study_model, sampler)
        rows[str(n)]["seconds"] = time.perf_counter() - t0  # this invocation's: ~0 when done before
        study.log(f"[budget {name}] {n} steps: paddle real − random {rows[str(n)]['paddle']['real_minus_random']}")
    return {
        "study": str(out),
        "out": str(study.out),
        "variant": variant,
        "settings": overrides,
        "sampler": sampler,
        "name": name,
        "training_seed": study.train_seed,
        "real_moves": ev.real_moves(segments),
        "steps": rows,
    }


def study_run(study: Study, variant: str) -> None:
    """The study's own conversion and fine-tuning of ``variant`` for this seed (its stages, so the
    model is the one the study makes and a later study run skips them): a replicate seed trained
    run by run, over sessions, in a study made with ``--shared-only``."""
    lacking = [d for d in ("pretrain", "scratch_init") if not (study.root / d / MODEL_DIR).is_dir()]
    if lacking:
        raise StudyError(
            f"the study's shared stages are not all there (no {', '.join(f'{d}/{MODEL_DIR}' for d in lacking)}); "
            "make them first (python -m benchmarks.atari.study ... --shared-only)"
        )
    study.convert(variant)
    study.finetune(variant)


def _check_sampler(study: Study, variant: str, sampler: dict[str, Any]) -> None:
    """Refuse a bad --sampler value (a negative history level, a window too short) before any work."""
    try:
        study.rollout_config(variant, 1.0)
    except CausalizeError as exc:
        raise StudyError(f"--sampler {settings_tag(sampler)}: {exc}") from exc


def table(doc: dict[str, Any]) -> str:
    """Markdown: one row per step count."""
    lines = [
        "| fine-tuning steps | action rms k=300 | past rms k=300 | move after RIGHT / LEFT (px) | "
        "paddle err real | random | real − random (± s.e.) | verdict | PSNR real | − copy-last, first frames / all (dB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for n, r in doc["steps"].items():
        c = r["action_check"]["300"]
        moves = {m["action"]: m["mean"] for m in c["moves"]}
        d = r["paddle"]["real_minus_random"]
        lines.append(
            f"| {n} | {c['action_rms']:.4f} | {c['past_rms']:.4f} | {_num(moves.get(2))} / {_num(moves.get(3))} | "
            f"{_num(r['paddle']['real']['mean'])} | {_num(r['paddle']['random']['mean'])} | "
            f"{_num(d['mean'], '+.2f')} ± {_num(d['sem'])} | {r['paddle']['verdict']} | {r['psnr_real']:.2f} | "
            f"{_copy_last_cell(r)} |"
        )
    real = {m["action"]: m["mean"] for m in doc["real_moves"]}
    lines.append(f"\nReal test frames: move after RIGHT / LEFT {_num(real.get(2))} / {_num(real.get(3))} px.")
    if doc.get("settings"):
        lines.append(f"Fine-tuned afresh with {settings_tag(doc['settings'])} (the study's settings otherwise).")
    if doc.get("sampler"):
        lines.append(f"Rolled out with {settings_tag(doc['sampler'])} (the study's sampler otherwise).")
    return "\n".join(lines)


def _copy_last_cell(row: dict[str, Any]) -> str:
    """``+a ± s / +b ± s`` (PSNR, first frames / all), or – for a measurement made before it existed."""
    if "copy_last" not in row:
        return "–"
    cells = (copy_last_span(row, span)["psnr"] for span in SPANS)
    return " / ".join(f"{_num(x['mean'], '+.2f')} ± {_num(x['sem'])}" for x in cells)


def _num(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def _typed(overrides: dict[str, Any]) -> dict[str, Any]:
    """Integers given for float settings as floats, so that ``10`` and ``10.0`` name one run."""
    from causalize.training.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    return {
        k: float(v)
        if k in fields and isinstance(fields[k].default, float) and isinstance(v, int) and not isinstance(v, bool)
        else v
        for k, v in overrides.items()
    }


def add_settings_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``settings``: read them with :func:`parse_settings`."""
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def parse_settings(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; values are JSON (``10``, ``true``), else strings."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StudyError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atari.budget", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--study",
        required=True,
        help="a study's output directory (Pong held out; any space) whose --variant is fine-tuned",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="the variant to fine-tune further (default: the method's, extrapolative for unet3d, causal for wan)",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[1600, 3200],
        help="step counts to reach (default 1600 3200); the study's own count alone measures its model only",
    )
    p.add_argument(
        "--replicate",
        type=int,
        default=0,
        help="r > 0: the replicate with training seed S + r (default 0: the study seed)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--fine-tune-missing",
        action="store_true",
        help="when the study has not fine-tuned --variant for this seed (a replicate it has not reached; a study "
        "made with --shared-only), convert and fine-tune it first as the study does, then check",
    )
    add_settings_option(
        p,
        "a fine-tuning setting (TrainConfig field, JSON value; e.g. adapter_lr_scale=10): fine-tune afresh "
        "from the converted model with it, to each --steps (any count); repeatable",
    )
    p.add_argument(
        "--sampler",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a rollout setting of the measurement ({', '.join(SAMPLER_KEYS)}; e.g. history_noise=100): "
        "the same models measured with the study's sampler so changed; repeatable",
    )
    p.add_argument(
        "--json",
        default=None,
        help="where to write the results (default DIR/budget/<variant>[+<settings>][@<sampler>].json)",
    )
    args = p.parse_args(argv)
    out = Path(args.study)
    set_determinism(args.threads, "cpu")
    try:
        sampler = parse_settings(args.sampler, "--sampler")
        doc = run(
            out,
            args.variant,
            args.steps,
            args.replicate,
            parse_settings(args.settings),
            sampler,
            args.fine_tune_missing,
        )
    except (StudyError, CausalizeError) as exc:  # a training refusal too (a model or data path gone)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.json) if args.json else record_path(Path(doc["out"]), doc["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record_text(doc), encoding="utf-8")
    print(table(doc))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
