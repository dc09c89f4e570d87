"""The study's report: ``README.md`` (tables, claims, verdicts), the plots, the GIF and the frame grid.

Always regenerated from the results (cheap), so a change here rewrites every study's report on its
next run without retraining anything. Drawing helpers are in ``benchmarks.atari.report``.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.atari import control
from benchmarks.atari import evaluate as ev
from benchmarks.atari.backbones import backbone_of
from benchmarks.atari.scales import BASELINE, run_name

if TYPE_CHECKING:
    from benchmarks.atari.stages import Study

__all__ = [
    "gif_lines",
    "gif_segment",
    "markdown",
    "verdict_lines",
    "write_report",
]


def _curve(summary: dict[str, Any]) -> dict[str, Any]:
    """A horizon summary with steps counted from 1 (the first generated frame)."""
    return {**summary, "steps": [s + 1 for s in summary["steps"]]}


def write_report(study: Study, results: dict[str, Any], segments: ev.Segments) -> None:
    """Plots, GIF, frame grid and README.md under DIR."""
    from benchmarks.atari import report as rp

    out, cfg = study.out, study.cfg
    runs = results["runs"]
    main, variants = study.backbone.main, study.backbone.variants
    s0 = float(cfg["eval"]["ablation_guidance"][0])
    plots = out / "plots"
    xlabel = "generated frame (1 = first after the context)"
    variants_real = {v: runs[run_name(v, s0, "real")] for v in variants if run_name(v, s0, "real") in runs}
    for metric, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
        curves = {v: _curve(r["metrics"][metric]) for v, r in variants_real.items()}
        curves[BASELINE] = _curve(runs[BASELINE]["metrics"][metric])
        rp.plot_horizon(
            plots / f"variants_{metric}.png",
            curves,
            ylabel=label,
            xlabel=xlabel,
            title=f"variants, real actions, s={s0:g}",
        )
        guided = {
            f"s={s:g}": _curve(runs[run_name(main, float(s), "real")]["metrics"][metric])
            for s in cfg["eval"]["guidance"]
        }
        rp.plot_horizon(
            plots / f"guidance_{metric}.png",
            guided,
            ylabel=label,
            xlabel=xlabel,
            title=f"{main}: action guidance scale",
        )
        ctrl = {}
        for r in runs.values():
            if r.get("actions") == "random":
                real = runs[run_name(r["variant"], r["guidance"], "real")]
                ctrl[f"{r['variant']} s={r['guidance']:g} real"] = _curve(real["metrics"][metric])
                ctrl[f"{r['variant']} s={r['guidance']:g} random"] = _curve(r["metrics"][metric])
        if ctrl:
            rp.plot_horizon(
                plots / f"controllability_{metric}.png",
                ctrl,
                ylabel=label,
                xlabel=xlabel,
                title="real vs random actions",
            )
    paddle: dict[str, Any] = {}
    for name, c in results.get("controllability", {}).items():
        if "paddle" in c:
            for actions in ("real", "random"):
                paddle[f"{name} {actions}"] = _curve(runs[c[actions]]["metrics"]["paddle"])
    if paddle and "paddle" in runs[BASELINE]["metrics"]:
        paddle[BASELINE] = _curve(runs[BASELINE]["metrics"]["paddle"])
    if paddle:
        rp.plot_horizon(
            plots / "controllability_paddle.png",
            paddle,
            ylabel="agent's paddle: |y_pred − y_real| (px; no paddle = max)",
            xlabel=xlabel,
            title="real vs random actions: the controlled object",
        )
    losses = {}
    for v in variants:
        path = out / "finetune" / v / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            losses[v] = {"steps": [r["step"] for r in rows], "mean": [r["loss_avg"] for r in rows]}
    if losses:
        rp.plot_horizon(
            plots / "finetune_loss.png",
            losses,
            ylabel="Diffusion-Forcing loss (v)",
            xlabel="fine-tuning step",
            title="fine-tuning loss (same budget)",
        )
    # GIF and grid: the test segment where the real paddle moves most (Pong; else the first), the
    # method at its best guidance scale, with the real and with random actions.
    best = results["best_main_guidance"]
    c = segments.context
    shown = gif_segment(runs[BASELINE]["metrics"].get("paddle"))
    results["gif"] = {"segment": shown, "index": list(segments.index[shown])}
    real = segments.frames[shown]

    def with_context(name: str) -> np.ndarray:
        pred = np.load(out / "eval" / f"{name}.npz")["frames"][shown]
        return np.concatenate([real[:c], pred])

    panels = {"real": real, f"{main} s={best:g}": with_context(run_name(main, best, "real"))}
    if run_name("scratch", s0, "real") in runs:
        panels[f"scratch s={s0:g}"] = with_context(run_name("scratch", s0, "real"))
    if run_name(main, best, "random") in runs:
        panels["random actions"] = with_context(run_name(main, best, "random"))
    rp.write_comparison_gif(out / "rollout.gif", panels, context=c, fps=4.0)
    rp.save_frame_grid(out / "rollout_grid.png", list(panels.values()))
    (out / "README.md").write_text(markdown(results, list(panels)), encoding="utf-8")


def _pm(d: dict[str, Any], spec: str = "+.3g") -> str:
    """``mean ± sem``, "–" for a missing or NaN value."""
    return f"{_fmt(d.get('mean'), spec)} ± {_fmt(d.get('sem'), '.2g')}"


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The claims, one row each: the study seed's paired difference over test segments and, with
    replicates, the aggregate over training seeds (``benchmarks.atari.seeds``), each with its verdict."""
    seeds = {c["claim"]: c for c in results.get("across_seeds") or []}
    n_seeds = len(results.get("replicates") or {})
    seg = results["segments"]["count"]
    head = f"| claim | seed {results['study']['seed']}, over {seg} segments | verdict |"
    rows = [
        head + (f" over {n_seeds} training seeds | verdict |" if seeds else ""),
        "|---|---|---|" + ("---|---|" if seeds else ""),
    ]

    def across(claim: str, metrics: tuple[str, ...], spec: str) -> str:
        if not seeds:
            return ""
        x = seeds.get(claim)
        if x is None:
            return " – | – |"
        return " " + ", ".join(f"{_pm(x[m], spec)}{UNITS[m]}" for m in metrics) + f" | {x['verdict']} |"

    for key, c in (results.get("controllability") or {}).items():
        if "paddle" in c:
            claim = f"{key} follows the real actions: paddle error real − random < 0"
            d = c["paddle"]["real_minus_random"]["overall"]
            mine = f"| {claim} | {_pm(d, '+.2f')} px | {c['paddle']['verdict']} |"
            rows.append(mine + across(claim, ("paddle",), "+.2f"))
    for c in results["comparisons"]:
        mine = f"| {c['claim']} | {_pm(c['psnr'])} dB, {_pm(c['ssim'])} SSIM | {c['verdict']} |"
        rows.append(mine + across(c["claim"], ("psnr", "ssim"), "+.3g"))
    note = (
        " Over training seeds (`benchmarks/atari/seeds.py`): the mean of the seeds' paired differences ± the "
        "standard error over seeds; a difference counts only when it clears Student's 95 % t over seeds "
        "(12.7 s.e. with 2 seeds, 4.3 with 3) *and* 2 s.e. over segments of the seed-averaged per-segment "
        "difference (the seeds share the test segments). `–`: not replicated."
        if seeds
        else ""
    )
    return [
        "## Verdicts, claim by claim",
        "",
        "Study seed: a claim holds when a beats b by more than 2 standard errors of the paired per-segment "
        "difference (PSNR and SSIM both; the paddle error alone for the controllability rows, where lower is "
        "better), is reversed for the opposite, and shows no difference otherwise."
        + note
        + SPACE_NOTES.get(results["study"]["config"].get("space", "pixel"), ""),
        "",
        *rows,
        "",
        *_per_seed_lines(seeds),
    ]


UNITS = {"psnr": " dB", "ssim": " SSIM", "paddle": " px"}


def _per_seed_lines(seeds: dict[str, Any]) -> list[str]:
    """Each seed's paired mean difference, per claim (the numbers behind the over-seeds column)."""
    if not seeds:
        return []
    order = [str(x) for x in next(iter(seeds.values()))["seeds"]]
    lines = ["| claim (a − b per training seed) | " + " | ".join(f"seed {x}" for x in order) + " |"]
    lines.append("|---" * (len(order) + 1) + "|")
    for c in seeds.values():
        metrics = ("paddle",) if "paddle" in c else ("psnr", "ssim")
        cells = [
            ", ".join(f"{_fmt(c[m]['seeds']['per_seed'][i], '+.3g')}{UNITS[m]}" for m in metrics)
            for i in range(len(order))
        ]
        lines.append(f"| {c['claim']} | " + " | ".join(cells) + " |")
    return ["Each training seed's paired mean difference over the test segments:", "", *lines, ""]


AE_NOTE = (
    "Latent study: every prediction is decoded by the study's autoencoder and scored in pixels; the "
    "`autoencoder` row of the runs table (the real future frames encoded and decoded) is a reference: what "
    "predicting the encoder's own latents would score."
)
PATCH_NOTE = (
    "Patch study: the world models diffuse in 4×4-pixel patches (16×16×48 per frame, a lossless rearrangement "
    "normalised per colour); every prediction is mapped back to pixels exactly and scored there."
)
SPACE_NOTES = {"latent": " " + AE_NOTE, "patch": " " + PATCH_NOTE}


def gif_lines(results: dict[str, Any], panels: list[str]) -> list[str]:
    """What the GIF shows: the segment, and the paddle rows of the real and predicted frames."""
    g, runs = results.get("gif") or {}, results["runs"]
    main, best = backbone_of(results["study"]["config"]).main, results["best_main_guidance"]
    lines = [f"![rollout](rollout.gif) — test segment {g.get('index')}, panels: {', '.join(panels)}.", ""]
    names = {"real frames": BASELINE, "real actions": run_name(main, best, "real")}
    names["random actions"] = run_name(main, best, "random")
    if not all(n in runs and "paddle" in runs[n]["metrics"] for n in names.values()):
        return lines
    seg = int(g.get("segment", 0))
    real = control.positions(runs[BASELINE]["metrics"]["paddle"], "real")[seg]
    table = ["| generated frame | " + " | ".join(str(i + 1) for i in range(len(real))) + " |"]
    table.append("|---" * (len(real) + 1) + "|")
    row = {"real frames": real}
    for label in ("real actions", "random actions"):
        row[label] = control.positions(runs[names[label]]["metrics"]["paddle"], "pred")[seg]
    for label, ys in row.items():
        table.append(f"| paddle row, {label} | " + " | ".join("–" if np.isnan(y) else f"{y:.1f}" for y in ys) + " |")
    err, miss = {}, {}
    for k in ("real actions", "random actions"):
        d = np.abs(row[k] - real)
        err[k] = float(d[np.isfinite(d)].mean()) if np.isfinite(d).any() else math.nan
        miss[k] = int(np.isnan(row[k][~np.isnan(real)]).sum())
    lines += [
        f"Paddle rows detected in this segment (`{main}` s={best:g}; – = no paddle found). Mean distance to the real "
        "paddle where one is found: "
        + ", ".join(
            f"{k} {_fmt(None if np.isnan(v) else float(v), '.1f')} px ({miss[k]} frames without one)"
            for k, v in err.items()
        )
        + ". One segment is an illustration; the verdicts above are the evidence.",
        "",
        *table,
        "",
    ]
    return lines


def gif_segment(paddle: dict[str, Any] | None) -> int:
    """The segment whose real paddle travels farthest over the horizon (0 without a paddle metric)."""
    if not paddle:
        return 0
    y = control.positions(paddle, "real")
    travel = [float(np.ptp(r[np.isfinite(r)])) if np.isfinite(r).any() else -1.0 for r in y]
    return int(np.argmax(travel))


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _action_lines(results: dict[str, Any]) -> list[str]:
    """The one-step action check's section: how much the next frame moves with its action."""
    from benchmarks.atari.report import write_markdown_table

    act = results.get("action") or {}
    if not act.get("variants"):
        return []
    rows: dict[str, dict[str, str]] = {}
    for v, levels in act["variants"].items():
        for k, d in levels.items():
            rows[f"{v}, k={k}"] = {"action rms": f"{d['action_rms']:.4f}", "past rms": f"{d['past_rms']:.4f}"} | {
                f"move after a={m['action']}": f"{_fmt(m['mean'], '+.2f')} (n={m['n']})" for m in d.get("moves", [])
            }
    if act.get("real_moves"):
        rows["real test frames"] = {"action rms": "–", "past rms": "–"} | {
            f"move after a={m['action']}": f"{_fmt(m['mean'], '+.2f')} ± {_fmt(m['sem'], '.2f')} (n={m['n']})"
            for m in act["real_moves"]
        }
    return [
        "## Does the next frame depend on its action? (one-step action check)",
        "",
        "The first generated frame of every test segment noised to level k, its own context clean, predicted once "
        "per action with the same noise (`evaluate.action_check`). `action rms`: the spread of the predicted x0 over "
        "the actions; `past rms`: its change when the past is swapped for the next segment's (model space, so the "
        "two compare). `move after a`: the predicted paddle's move (rows of the frame, + = down) from the "
        "last context frame, mean over the segments where both show a paddle; the last row is what the real test "
        "frames show after each action (Pong's minimal set: 0 NOOP, 1 FIRE, 2 RIGHT, 3 LEFT, 4 RIGHTFIRE, "
        "5 LEFTFIRE). A model that follows its actions predicts moves that differ by action as the real ones do.",
        "",
        write_markdown_table(rows, row_header="variant, level"),
    ]


def markdown(results: dict[str, Any], panels: list[str]) -> str:
    """The generated report: tables of every run, the paired comparisons, the figures."""
    from benchmarks.atari.report import write_markdown_table

    cfg, runs = results["study"]["config"], results["runs"]
    rows = {}
    for name, r in runs.items():
        m = r["metrics"]
        rows[name] = {
            "variant": r["variant"],
            "s": r["guidance"],
            "actions": r["actions"],
            "PSNR": m["psnr"]["overall"],
            "SSIM": m["ssim"]["overall"],
            "PSNR first": m["psnr"]["mean"][0],
            "PSNR last": m["psnr"]["mean"][-1],
            "SSIM first": m["ssim"]["mean"][0],
            "SSIM last": m["ssim"]["mean"][-1],
        }
        if "paddle" in m:
            rows[name]["paddle err (px)"] = m["paddle"]["overall"]["mean"]
            rows[name]["no paddle"] = m["paddle"]["missing"]["overall"]
    table = write_markdown_table(rows, row_header="run")
    var_rows = {
        v: {
            "init": d["init"],
            "pipeline": d["pipeline"],
            "verified causal": d["verification"]["passed"],
            "max leak": d["verification"]["max_leak"],
            "final FT loss": d["finetune"]["final_loss"],
        }
        for v, d in results["variants"].items()
    }
    var_table = write_markdown_table(var_rows, row_header="variant", float_format=".4g")
    if cfg["finetune"].get("episodes") is not None:
        var_table += (
            f"\nFine-tuned on {cfg['finetune']['episodes']} of the {cfg['data']['train_episodes']} recorded "
            "training episodes (the trainer's hash split: the same episodes for every variant and seed).\n"
        )
    den = results.get("denoising") or {}
    den_rows = {
        v: {f"k={k}": f"{d['x0']:.2f} ({d['input']:.2f})" for k, d in levels.items()} for v, levels in den.items()
    }
    den_table = write_markdown_table(den_rows, row_header="variant") if den_rows else ""
    ctx_rows = {
        v: {
            f"k={k} {what}": (
                f"{d['own']['psnr']:.2f} / {d['other']['psnr']:.2f}"
                if what == "PSNR own / other"
                else f"{_fmt(d['own']['paddle'], '.1f')} / {_fmt(d['other']['paddle'], '.1f')}"
            )
            for k, d in levels.items()
            for what in ("PSNR own / other", "paddle px own / other")
        }
        for v, levels in (results.get("context") or {}).items()
    }
    ctx_table = write_markdown_table(ctx_rows, row_header="variant") if ctx_rows else ""
    comp = ["| claim | a − b | ΔPSNR dB (± s.e.) | ΔSSIM (± s.e.) | verdict |", "|---|---|---:|---:|---|"]
    for cmp in results["comparisons"]:
        p, s = cmp["psnr"], cmp["ssim"]
        comp.append(
            f"| {cmp['claim']} | `{cmp['a']}` − `{cmp['b']}` | {p['mean']:+.3g} ± {_fmt(p['sem'], '.2g')} | "
            f"{s['mean']:+.3g} ± {_fmt(s['sem'], '.2g')} | {cmp['verdict']} |"
        )
    ctrl = results.get("controllability") or {}
    ctrl_lines = []
    if ctrl:
        from benchmarks.atari.report import controllability_table

        pads = [c["paddle"] for c in ctrl.values() if "paddle" in c]
        ctrl_lines = [
            "## Controllability on the controlled object (the agent's paddle)",
            "",
            "The agent's (right, green) paddle found by its colour in every predicted and real frame "
            "(`benchmarks/atari/control.py`); error = |y_pred − y_real| in pixels, averaged over the steps whose "
            "real frame shows the paddle, a prediction without a paddle counting as the largest possible error"
            + (f" ({pads[0]['penalty']:g} px)" if pads else "")
            + "; mean over segments ± standard error. A model follows its actions when its error with the real "
            "actions is smaller than with random ones by more than 2 standard errors of the paired difference. "
            "ΔPSNR / ΔSSIM: real − random (the paper's controllability measure), per segment, paired.",
            "",
            controllability_table(ctrl),
        ]
        if pads:
            base = runs.get(BASELINE, {}).get("metrics", {}).get("paddle", {}).get("overall", {}).get("mean")
            ctrl_lines += [
                "Floor: on the real frames the detector's error is 0 by construction; it finds the real paddle in "
                f"{100 * pads[0]['real_visible']:.0f}% of the generated steps' real frames (the others are left out). "
                f"The copy-last baseline (the paddle never moves) scores {_fmt(base, '.2f')} px.",
                "",
                "![paddle error](plots/controllability_paddle.png)",
                "",
            ]
    e, st = cfg["eval"], results["study"]
    t = results["timings"]
    lines = [
        f"# Atari world-model study — backbone `{backbone_of(cfg).name}`, scale `{st['scale']}`, seed {st['seed']}",
        "",
        f"Generated by `python -m benchmarks.atari.study` ({st['command']}). Held-out game "
        f"{cfg['data']['heldout']}; {results['segments']['count']} test segments of {e['context']} context + "
        f"{e['horizon']} generated frames; DDIM, {e['steps']} trailing steps, η = {e['eta']}, history level "
        f"{e['history_noise']}, window {e['window']}, guidance rescale {e['guidance_rescale']}. PSNR / SSIM are "
        "per generated frame against the real frame, averaged over segments (and over the horizon for the "
        "overall columns). `real` = the recorded actions, `random` = uniformly random actions (same seed).",
        "",
        *verdict_lines(results),
        "## Runs",
        "",
        table,
        "## Variants (conversion and fine-tuning, equal budget)",
        "",
        var_table,
        "## One-step denoising (how good a denoiser each model is, apart from the sampler)",
        "",
        "Every frame of the test segments (context and future) noised to the same level k, the real actions, one "
        "forward pass: PSNR (dB) of the predicted x0 against the real frames, and in brackets the PSNR of the noisy "
        "input rescaled by 1/sqrt(alpha_k) (no denoising).",
        "",
        den_table,
        *(
            [
                "## Does the model use its past? (one-step context check)",
                "",
                "The first generated frame of every test segment noised to level k, its context clean, the real "
                "actions, one forward pass; the predicted x0 scored against the real frame with the segment's own "
                "context and with the next segment's (a plausible but wrong past). A model that continues its past "
                "scores better with its own: higher PSNR, lower paddle error (no paddle = the largest error).",
                "",
                ctx_table,
            ]
            if ctx_table
            else []
        ),
        *_action_lines(results),
        "## Paired comparisons (same test segments; a − b, mean over segments ± standard error)",
        "",
        *comp,
        "",
        f"Best guidance scale for `{backbone_of(cfg).main}` (overall PSNR): s = {results['best_main_guidance']:g}.",
        "",
        *ctrl_lines,
        "## Figures",
        "",
        "![variants PSNR](plots/variants_psnr.png) ![variants SSIM](plots/variants_ssim.png)",
        "",
        "![guidance PSNR](plots/guidance_psnr.png) ![guidance SSIM](plots/guidance_ssim.png)",
        "",
        "![controllability PSNR](plots/controllability_psnr.png) ![fine-tuning loss](plots/finetune_loss.png)",
        "",
        *gif_lines(results, panels),
        "## Time",
        "",
        f"Recorded stage times (s): data {t['data']:.0f}, "
        + (
            f"autoencoder {t.get('autoencoder', 0):.0f}, encode {t.get('encode', 0):.0f}, "
            if t.get("autoencoder")
            else ""
        )
        + f"pretrain {t['pretrain']:.0f}, convert {t['convert_total']:.0f}, "
        f"fine-tune {t['finetune_total']:.0f}, eval {t['eval_total']:.0f}"
        + (f", replicates {t['replicates_total']:.0f}" if t.get("replicates_total") else "")
        + f"; sum {t['stages_total']:.0f} s "
        f"({t['stages_total'] / 60:.1f} min). Machine: {results['machine'].get('cpu_model')} "
        f"({results['machine'].get('cpu_count')} CPUs), {results['study']['threads']} torch threads.",
        "",
    ]
    return "\n".join(lines)
