#!/usr/bin/env python
"""Which causal-norm mode keeps a converted model closest to the ORIGINAL model on past frames?

METHOD.md §5: the default of `causal-norm{mode=...}` (per-frame or cumulative statistics) must be
chosen by measurement. For every UNet plan whose pipeline has a causal-norm pass, this script
builds the plan's tiny random model (several seeds; plus a wider unet3d config), re-randomises
its all-zero parameters (zero-initialised layers such as TemporalConvLayer.conv4 make the
temporal branch an identity at init and would hide the norm's effect), and compares the original
model's output with converted copies (a secondary "@as-init" condition repeats everything on the
models as initialised; it is reported but never used for the winner):

  full       the plan's default pipeline with causal-norm{mode=M}
  norm-only  only causal-norm{mode=M}
  reference  the default pipeline WITHOUT causal-norm (still leaky): how far the attention / conv
             passes alone move the output, i.e. the floor under the "full" numbers

Inputs: the plan's own make_inputs for everything but the latent "sample", which is replaced by
  smooth  x_t = x_0 + 0.1·t·d + 0.05·ε_t   (x_0, d, ε_t ~ N(0, 1): a video-like slow drift)
  iid     x_t ~ N(0, 1) independently per frame
at 8 and 4 frames. Metric per output frame t: ||y_conv[t] − y_orig[t]|| / ||y_orig[t]||; the
"past-frame" error is its mean over t = 0..T−2; cosine similarity ×100 is over the past frames
flattened. Mean ± std over seeds.

Winner: the mode with the lower past-frame error of the FULL pipeline (the converted model),
as the geometric mean over models × T × inputs of the ratio cumulative / per-frame; the
norm-only winner is reported next to it.

Usage: python benchmarks/norm_mode.py [--quick] [--seeds N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_line, table, write_json  # noqa: E402

NAME = "norm_mode"
MODES = ("per-frame", "cumulative")
KINDS = ("smooth", "iid")
DRIFT, JITTER = 0.1, 0.05
# A wider unet3d (the tiny one has 4 and 8 channels with 4 groups, i.e. 1-2 channels per group).
EXTRA_CONFIGS = {
    "unet3d-wide": (
        "unet3d",
        dict(
            block_out_channels=(32, 64),
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            out_channels=4,
            in_channels=4,
            layers_per_block=1,
            sample_size=16,
        ),
    ),
}


def pipelines_for(plan) -> dict[str, str]:
    """scope/mode -> pipeline text. Raises if the plan has no causal-norm pass."""
    steps = [s.strip() for s in plan.pipeline.split(",") if s.strip()]
    names = [s.split("{", 1)[0] for s in steps]
    if "causal-norm" not in names:
        raise ValueError(f"plan {plan.name} has no causal-norm pass")
    i = names.index("causal-norm")
    out = {}
    for mode in MODES:
        full = steps[:i] + [f"causal-norm{{mode={mode}}}"] + steps[i + 1 :]
        out[f"full/{mode}"] = ",".join(full)
        out[f"norm-only/{mode}"] = f"causal-norm{{mode={mode}}}"
    rest = steps[:i] + steps[i + 1 :]
    if rest:
        out["reference/no-norm"] = ",".join(rest)
    return out


def make_sample(like, axis: int, kind: str, gen) -> Any:
    """A latent shaped like `like` with frames along `axis`: smooth drift or iid noise."""
    import torch

    frames = like.shape[axis]
    frame_shape = like.movedim(axis, 0).shape[1:]
    if kind == "iid":
        xs = [torch.randn(frame_shape, generator=gen) for _ in range(frames)]
    else:
        x0 = torch.randn(frame_shape, generator=gen)
        d = torch.randn(frame_shape, generator=gen)
        xs = [x0 + DRIFT * t * d + JITTER * torch.randn(frame_shape, generator=gen) for t in range(frames)]
    return torch.stack(xs, dim=axis).to(like.dtype)


def frame_metrics(y, ref, axis: int) -> dict[str, Any]:
    import torch

    yd = y.detach().double().movedim(axis, 0).reshape(y.shape[axis], -1)
    rd = ref.detach().double().movedim(axis, 0).reshape(ref.shape[axis], -1)
    rel = ((yd - rd).norm(dim=1) / rd.norm(dim=1)).tolist()
    cos = torch.nn.functional.cosine_similarity(yd, rd, dim=1).tolist()
    past_cos = float(torch.nn.functional.cosine_similarity(yd[:-1].reshape(1, -1), rd[:-1].reshape(1, -1)).item())
    return {
        "rel_err_per_frame": rel,
        "cos_per_frame": cos,
        "past_rel_err": statistics.fmean(rel[:-1]),
        "last_rel_err": rel[-1],
        "past_cos100": 100 * past_cos,
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 frames, tiny configs only (smoke run)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per model (default 5, quick 1)")
    ap.add_argument("--no-as-init", action="store_true", help="skip the secondary as-initialised condition")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: tiny models gain nothing from more, and a shared machine punishes it)",
    )
    args = ap.parse_args()

    import torch

    from causalize.api import convert_model
    from causalize.plugin_manager import registries
    from causalize.verify.influence import rerandomize_zero_params

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    frame_counts = (4,) if args.quick else (8, 4)
    regs = registries()
    plans = [p for p in regs.plans if p.family == "unet" and "causal-norm" in p.pipeline]
    base: dict[str, tuple[Any, dict | None]] = {p.name: (p, None) for p in plans}
    if not args.quick:
        for cname, (pname, cfg) in EXTRA_CONFIGS.items():
            base[cname] = (regs.plans.get(pname), cfg)
    # config name -> (plan, model config or None for the plan's tiny one, re-randomise zero params?)
    configs: dict[str, tuple[Any, dict | None, bool]] = {c: (p, cfg, True) for c, (p, cfg) in base.items()}
    if not args.quick and not args.no_as_init:
        # Secondary condition, never used for the winner: the models exactly as initialised, where
        # zero-initialised output layers make some temporal branches (and so their norms) inert.
        configs.update({f"{c}@as-init": (p, cfg, False) for c, (p, cfg) in base.items()})
    primary = [c for c, v in configs.items() if v[2]]
    [c for c, v in configs.items() if not v[2]]

    results: list[dict[str, Any]] = []  # one row per config × seed × frames × kind × variant
    model_info: dict[str, Any] = {}
    for cname, (plan, cfg, rerandomize) in configs.items():
        pipes = pipelines_for(plan)
        for seed in seeds:
            torch.manual_seed(seed)
            orig = (plan.build_tiny(seed) if cfg is None else plan.model_cls()(**cfg)).float().eval()
            rerand = rerandomize_zero_params(orig, seed=seed) if rerandomize else []
            converted = {}
            sites = {}
            for key, text in pipes.items():
                m = copy.deepcopy(orig)
                runs = convert_model(m, plan, text)
                converted[key] = m.eval()
                sites[key] = {r.name: len(r.records) for r in runs}
            model_info.setdefault(
                cname,
                {
                    "plan": plan.name,
                    "config": cfg or dict(plan.tiny_config),
                    "parameters": sum(p.numel() for p in orig.parameters()),
                    "rerandomize": rerandomize,
                    "rerandomized_zero_params": len(rerand),
                    "pipelines": pipes,
                    "sites": sites,
                },
            )
            for frames in frame_counts:
                for kind in KINDS:
                    gen = torch.Generator().manual_seed(10_000 * seed + 100 * frames + KINDS.index(kind))
                    inputs = plan.make_inputs(orig, frames, gen)
                    axis = plan.layout.inputs["sample"]
                    inputs["sample"] = make_sample(inputs["sample"], axis, kind, gen)
                    with torch.no_grad():
                        ref = plan.forward(orig, inputs)
                        for key, m in converted.items():
                            y = plan.forward(m, inputs)
                            scope, mode = key.split("/")
                            results.append(
                                {
                                    "config": cname,
                                    "plan": plan.name,
                                    "init": "rerandomized" if rerandomize else "as-init",
                                    "seed": seed,
                                    "frames": frames,
                                    "kind": kind,
                                    "scope": scope,
                                    "mode": mode,
                                    **frame_metrics(y, ref, plan.layout.output_axis),
                                }
                            )
            print(
                f"[{NAME}] {cname} seed {seed}: {model_info[cname]['parameters']:,} params, "
                f"{len(rerand)} zero params re-randomised, {time.perf_counter() - t_start:.0f}s",
                flush=True,
            )

    # --- aggregate over seeds ---
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["frames"], r["kind"], r["scope"], r["mode"]), []).append(r)
    agg = []
    for (cname, frames, kind, scope, mode), rs in groups.items():
        pe_m, pe_s = mean_std([r["past_rel_err"] for r in rs])
        co_m, co_s = mean_std([r["past_cos100"] for r in rs])
        le_m, _ = mean_std([r["last_rel_err"] for r in rs])
        per_frame = [statistics.fmean(r["rel_err_per_frame"][t] for r in rs) for t in range(frames)]
        agg.append(
            {
                "config": cname,
                "frames": frames,
                "kind": kind,
                "scope": scope,
                "mode": mode,
                "seeds": len(rs),
                "past_rel_err_mean": pe_m,
                "past_rel_err_std": pe_s,
                "past_cos100_mean": co_m,
                "past_cos100_std": co_s,
                "last_rel_err_mean": le_m,
                "rel_err_per_frame_mean": per_frame,
            }
        )

    def find(cname, frames, kind, scope, mode):
        return next(
            a
            for a in agg
            if (a["config"], a["frames"], a["kind"], a["scope"], a["mode"]) == (cname, frames, kind, scope, mode)
        )

    conditions = []
    for cname in configs:
        for frames in frame_counts:
            for kind in KINDS:
                for scope in ("full", "norm-only"):
                    e = {m: find(cname, frames, kind, scope, m)["past_rel_err_mean"] for m in MODES}
                    winner = "tie" if e["per-frame"] == e["cumulative"] else min(MODES, key=lambda m: e[m])
                    ratio = (
                        1.0
                        if e["per-frame"] == e["cumulative"]
                        else e["cumulative"] / e["per-frame"]
                        if e["per-frame"] > 0
                        else math.inf
                    )
                    per_seed = {
                        m: {r["seed"]: r["past_rel_err"] for r in groups[(cname, frames, kind, scope, m)]}
                        for m in MODES
                    }
                    seed_wins = {
                        m: sum(per_seed[m][sd] < per_seed[o][sd] for sd in seeds) for m, o in (MODES, MODES[::-1])
                    }
                    conditions.append(
                        {
                            "config": cname,
                            "init": "rerandomized" if configs[cname][2] else "as-init",
                            "frames": frames,
                            "kind": kind,
                            "scope": scope,
                            "past_rel_err": e,
                            "winner": winner,
                            "seed_wins": seed_wins,
                            "ratio_cumulative_over_per_frame": ratio,
                        }
                    )

    # Sanity: with every pass applied the model is causal and cumulative == per-frame statistics at
    # t = 0, so output frame 0 must agree between the two modes (up to float rounding).
    frame0 = max(
        abs(a["rel_err_per_frame"][0] - b["rel_err_per_frame"][0])
        for a in results
        if a["scope"] == "full" and a["mode"] == "per-frame"
        for b in results
        if b["scope"] == "full"
        and b["mode"] == "cumulative"
        and (a["config"], a["seed"], a["frames"], a["kind"]) == (b["config"], b["seed"], b["frames"], b["kind"])
    )

    def overall(conds: list[dict]) -> dict[str, Any]:
        wins = {m: sum(c["winner"] == m for c in conds) for m in MODES + ("tie",)}
        seed_wins = {m: sum(c["seed_wins"][m] for c in conds) for m in MODES}
        finite = [
            c["ratio_cumulative_over_per_frame"] for c in conds if math.isfinite(c["ratio_cumulative_over_per_frame"])
        ]
        gm = math.exp(statistics.fmean(math.log(r) for r in finite)) if finite else 1.0
        mean_err = {m: statistics.fmean(c["past_rel_err"][m] for c in conds) for m in MODES}
        return {
            "conditions": len(conds),
            "wins": wins,
            "seed_level_wins": seed_wins,
            "geomean_ratio_cumulative_over_per_frame": gm,
            "mean_past_rel_err": mean_err,
            "winner": "cumulative" if gm < 1 else "per-frame" if gm > 1 else "tie",
        }

    # The primary criterion (METHOD.md §5: "keeps the converted model closest to the original") is the
    # full pipeline, since the default mode is always used together with the other passes; the
    # norm-only scope isolates the norm's own effect and is reported alongside.
    prim = [c for c in conditions if c["init"] == "rerandomized"]
    sec = [c for c in conditions if c["init"] == "as-init"]
    summary = {
        "full_pipeline": overall([c for c in prim if c["scope"] == "full"]),
        "norm_only": overall([c for c in prim if c["scope"] == "norm-only"]),
        "all": overall(prim),
        "full_pipeline_smooth": overall([c for c in prim if c["scope"] == "full" and c["kind"] == "smooth"]),
        "full_pipeline_iid": overall([c for c in prim if c["scope"] == "full" and c["kind"] == "iid"]),
    }
    if sec:
        summary["as_init_full_pipeline"] = overall([c for c in sec if c["scope"] == "full"])
        summary["as_init_norm_only"] = overall([c for c in sec if c["scope"] == "norm-only"])

    # --- print ---
    info = machine_info()
    print()
    print(
        f"norm_mode: past-frame (t = 0..T-2) relative L2 error of converted vs ORIGINAL output, mean ± std over "
        f"{len(seeds)} seed(s); cos = cosine similarity ×100 over past frames. All-zero parameters of each original "
        f"model were re-randomised (std 0.05) before copying, so zero-initialised temporal branches are active."
    )
    headers = [
        "model",
        "T",
        "input",
        "scope",
        "per-frame err",
        "cumulative err",
        "cum/pf",
        "pf cos",
        "cum cos",
        "winner",
        "seeds won pf:cum",
        "ref (no norm) err",
    ]
    rows = []
    for c in prim:
        pf = find(c["config"], c["frames"], c["kind"], c["scope"], "per-frame")
        cu = find(c["config"], c["frames"], c["kind"], c["scope"], "cumulative")
        ref = (
            find(c["config"], c["frames"], c["kind"], "reference", "no-norm")
            if c["scope"] == "full" and "reference/no-norm" in model_info[c["config"]]["pipelines"]
            else None
        )
        rows.append(
            [
                c["config"],
                c["frames"],
                c["kind"],
                c["scope"],
                f"{pf['past_rel_err_mean']:.4f} ± {pf['past_rel_err_std']:.4f}",
                f"{cu['past_rel_err_mean']:.4f} ± {cu['past_rel_err_std']:.4f}",
                f"{c['ratio_cumulative_over_per_frame']:.2f}",
                f"{pf['past_cos100_mean']:.2f}",
                f"{cu['past_cos100_mean']:.2f}",
                c["winner"],
                f"{c['seed_wins']['per-frame']}:{c['seed_wins']['cumulative']}",
                "" if ref is None else f"{ref['past_rel_err_mean']:.4f}",
            ]
        )
    print(table(headers, rows, align="lrllrrrrrlrr"))
    if sec:
        print()
        print(
            "Secondary condition (not used for the winner): the same models AS INITIALISED (no re-randomisation; "
            "zero-initialised output layers leave some temporal branches and their norms inert). Past-frame rel. error:"
        )
        rows2 = []
        for c in sec:
            pf = find(c["config"], c["frames"], c["kind"], c["scope"], "per-frame")
            cu = find(c["config"], c["frames"], c["kind"], c["scope"], "cumulative")
            rows2.append(
                [
                    c["config"],
                    c["frames"],
                    c["kind"],
                    c["scope"],
                    f"{pf['past_rel_err_mean']:.4f} ± {pf['past_rel_err_std']:.4f}",
                    f"{cu['past_rel_err_mean']:.4f} ± {cu['past_rel_err_std']:.4f}",
                    f"{c['ratio_cumulative_over_per_frame']:.2f}",
                    c["winner"],
                    f"{c['seed_wins']['per-frame']}:{c['seed_wins']['cumulative']}",
                ]
            )
        print(
            table(
                [
                    "model",
                    "T",
                    "input",
                    "scope",
                    "per-frame err",
                    "cumulative err",
                    "cum/pf",
                    "winner",
                    "seeds won pf:cum",
                ],
                rows2,
                align="lrllrrrlr",
            )
        )

    fmax = max(frame_counts)
    print()
    print(f"Per-frame relative error (mean over seeds), T = {fmax}, smooth inputs:")
    pf_rows = []
    for cname in primary:
        for scope, mode in [("full", m) for m in MODES] + [("norm-only", m) for m in MODES]:
            a = find(cname, fmax, "smooth", scope, mode)
            pf_rows.append([cname, f"{scope}/{mode}"] + [f"{v:.4f}" for v in a["rel_err_per_frame_mean"]])
    print(table(["model", "variant"] + [f"t={t}" for t in range(fmax)], pf_rows, align="ll" + "r" * fmax))

    print()
    for key, s in summary.items():
        print(
            f"<{key}> winner {s['winner']}: conditions won per-frame {s['wins']['per-frame']} / cumulative "
            f"{s['wins']['cumulative']} / tie {s['wins']['tie']} of {s['conditions']} (seed-level {s['seed_level_wins']['per-frame']}:"
            f"{s['seed_level_wins']['cumulative']}); geomean(cum/pf) {s['geomean_ratio_cumulative_over_per_frame']:.3f}; "
            f"mean past err per-frame {s['mean_past_rel_err']['per-frame']:.4f}, cumulative {s['mean_past_rel_err']['cumulative']:.4f}"
        )
    w = summary["full_pipeline"]
    print(
        f"OVERALL WINNER (full pipeline, all models / T / inputs): {w['winner']} "
        f"(cumulative/per-frame past-frame error, geometric mean = {w['geomean_ratio_cumulative_over_per_frame']:.3f})"
    )
    print(
        f"sanity: max |frame-0 error(per-frame) - frame-0 error(cumulative)| over full-pipeline conditions = {frame0:.2e} "
        f"(should be ~0: both modes use frame 0's own statistics at t = 0)"
    )
    print(f"machine: {machine_line(info)}")

    payload = {
        "benchmark": NAME,
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "settings": {
            "seeds": seeds,
            "frames": list(frame_counts),
            "input_kinds": {
                "smooth": f"x_t = x_0 + {DRIFT}*t*d + {JITTER}*eps_t, x_0, d, eps_t ~ N(0,1)",
                "iid": "x_t ~ N(0,1)",
            },
            "metric": "rel. L2 per output frame ||y_conv - y_orig|| / ||y_orig||; past = mean over t = 0..T-2",
            "cosine": "cosine similarity x100 of past frames flattened",
            "rerandomized_zero_params": "all-zero parameters of the original re-randomised (std 0.05, seed = model seed) before "
            "copying; configs named '...@as-init' skip this (secondary, not used for the winner)",
            "other_inputs": "plan.make_inputs (timestep 500, text / image embeddings, image_latents, ...)",
            "torch_threads": torch.get_num_threads(),
            "dtype": "float32",
        },
        "models": model_info,
        "conditions": conditions,
        "summary": summary,
        "winner": summary["full_pipeline"]["winner"],
        "winner_rule": "full pipeline (the converted model) over all models x T x input kinds: geometric mean of the "
        "past-frame error ratio cumulative/per-frame; < 1 -> cumulative, else per-frame",
        "winner_norm_only": summary["norm_only"]["winner"],
        "winner_all_scopes": summary["all"]["winner"],
        "sanity_frame0_max_abs_diff_full": frame0,
        "aggregated": agg,
        "runs": results,
        "total_benchmark_s": time.perf_counter() - t_start,
    }
    # Smoke runs never overwrite the full results.
    path = write_json(NAME + (".quick" if args.quick else ""), payload)
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
