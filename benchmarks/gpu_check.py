"""Every GPU measurement of issue 11 in one command, one JSON and one table.

    python benchmarks/gpu_check.py                 # on a CUDA machine: real sizes, under 8 minutes
    python benchmarks/gpu_check.py --quick         # anywhere: the same checks at tiny sizes (CPU, < 3 min)
    python benchmarks/gpu_check.py --out DIR       # where gpu_check[.quick].json goes (default benchmarks/results)

Sections (each records its own errors instead of stopping the run, so that one failure still
leaves every other number; the JSON is rewritten after each section, so a run stopped by a time
limit keeps the sections it finished):

1. causality: every plan's tiny model on the device, in fp32 and bf16: the unconverted model
   leaks (negative control) and the converted one has max leak exactly 0.
2. forward: a Wan2.1-1.3B-shaped transformer (30 layers x 1536, 480p x 16 latent frames = 24,960
   video tokens, 512 text tokens, bf16): stock forward against the converted one on each
   block-causal attention path (flex, chunked, dense): seconds and peak memory.
3. streaming: the same model as a world model (action adapter), rolled out in bf16 with guidance
   and window 16 at S = 4 and S = 50: seconds per frame with streaming caches and with full
   recomputation, the speed-up next to the frame-pass ideal, and one single-frame step against
   its FLOP time at the matmul throughput measured here; the same with compiled current-frame
   steps (`compile="reduce-overhead"` on CUDA: CUDA graphs; "default" on CPU).
4. train: one bf16 mixed-precision Diffusion-Forcing step of that world model with gradient
   checkpointing (AdamW on fp32 weights): seconds and peak memory.

Random weights throughout: times and memory do not depend on them. `--quick` uses the plans' tiny
configs; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, WAN_1_3B, machine_info, machine_line, record_text, table  # noqa: E402


class Sizes:
    """Real (GPU) or tiny (--quick) sizes of every section."""

    def __init__(self, quick: bool):
        from causalize.plugin_manager import registries

        self.quick = quick
        if quick:
            self.config = dict(registries().plans.get("wan").tiny_config)
            self.frames, self.height, self.width, self.text = 4, 8, 8, 8
            self.steps, self.window, self.repeats = (2, 4), 4, 2
        else:
            self.config = dict(WAN_1_3B)
            self.frames, self.height, self.width, self.text = 16, 60, 104, 512
            self.steps, self.window, self.repeats = (4, 50), 16, 3

    def tokens_per_frame(self) -> int:
        p = self.config["patch_size"]
        return (self.height // p[1]) * (self.width // p[2])


# ------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median seconds of `repeats` calls after `warmup` (the first call compiles and allocates),
    and the peak memory over all of them."""
    _reset_peak(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return {
        "seconds": statistics.median(seconds),
        "runs": [round(s, 5) for s in seconds],
        "peak_gib": _peak_gib(device),
    }


def section(results: dict, name: str):
    """Run one section; an exception is recorded (with its traceback tail) and the run goes on."""

    @contextlib.contextmanager
    def guard():
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        finally:
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    return guard()


def build_wan(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    """The Wan transformer at `sizes`, initialised directly on the device (no CPU copy)."""
    from diffusers import WanTransformer3DModel

    from causalize.precision import to_precision

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**sizes.config)
    return to_precision(model.eval(), dtype)


def wan_inputs(sizes: Sizes, device: torch.device, dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    c = sizes.config
    latents = torch.randn(batch, c["in_channels"], sizes.frames, sizes.height, sizes.width, generator=gen)
    text = torch.randn(batch, sizes.text, c["text_dim"], generator=gen)
    return {
        "hidden_states": latents.to(device, dtype),
        "encoder_hidden_states": text.to(device, dtype),
        "timestep": torch.full((batch,), 500, device=device),
    }


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeats=5, warmup=2)["seconds"]
    return 2 * n**3 / t / 1e12


# ----------------------------------------------------------------------------------- sections


def check_causality(device: torch.device) -> list[dict[str, Any]]:
    from causalize.api import convert_model, verify_model
    from causalize.plugin_manager import registries
    from causalize.precision import to_precision

    rows = []
    for plan in registries().plans:
        for dtype in (torch.float32, torch.bfloat16):
            row: dict[str, Any] = {"plan": plan.name, "dtype": str(dtype).removeprefix("torch.")}
            try:
                model = to_precision(plan.build_tiny(), dtype, device)
                row["leak_before"] = verify_model(model, plan).max_leak  # negative control: > 0
                convert_model(model, plan)
                report = verify_model(model, plan)
                row.update(leak_after=report.max_leak, passed=report.passed and row["leak_before"] > 0)
            except Exception as exc:  # noqa: BLE001
                row.update(passed=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    return rows


def check_forward(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    from causalize.api import convert_model
    from causalize.modules.attention_exec import attention_backend
    from causalize.plugin_manager import registries

    plan = registries().plans.get("wan")
    model = build_wan(sizes, device, torch.bfloat16)
    inputs = wan_inputs(sizes, device, torch.bfloat16)

    @torch.no_grad()
    def forward():
        return model(**inputs, return_dict=False)[0]

    out: dict[str, Any] = {
        "video_tokens": sizes.frames * sizes.tokens_per_frame(),
        "text_tokens": sizes.text,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out["stock"] = timed(forward, device, sizes.repeats)
    convert_model(model, plan)
    reference = None
    for path in ("dense", "chunked", "flex"):
        try:
            with attention_backend(path):
                out[path] = timed(forward, device, sizes.repeats)
                got = forward().float()
            out[path]["ratio_to_stock"] = out[path]["seconds"] / out["stock"]["seconds"]
            if out["stock"]["peak_gib"]:
                out[path]["memory_ratio_to_stock"] = out[path]["peak_gib"] / out["stock"]["peak_gib"]
            reference = got if reference is None else reference  # the paths must agree (up to rounding)
            out[path]["max_abs_diff_vs_dense"] = (got - reference).abs().max().item()
            out[path]["output_scale"] = reference.abs().max().item()
        except Exception as exc:  # noqa: BLE001
            out[path] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _world_model(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from causalize.api import convert_model
    from causalize.plugin_manager import registries
    from causalize.world_model import WorldModel

    plan = registries().plans.get("wan")
    model = build_wan(sizes, device, dtype)
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=3}}")
    return WorldModel(model, plan).eval()


def check_streaming(sizes: Sizes, device: torch.device, tflops: float) -> list[dict[str, Any]]:
    wm = _world_model(sizes, device, torch.bfloat16)
    c = sizes.config
    context = wan_inputs(sizes, device, torch.bfloat16)["hidden_states"][:, :, : sizes.window - 1]
    kwargs = {"encoder_hidden_states": torch.zeros(1, sizes.text, c["text_dim"])}
    action = torch.randn(1, 3, generator=torch.Generator().manual_seed(0)).to(device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    strategies = {"streaming": dict(cache=True), "full": dict(cache=False), "compiled": dict(compile=mode)}
    rows = []
    for steps in sizes.steps:
        row: dict[str, Any] = {"steps": steps, "window": sizes.window, "guidance_scale": 2.5, "compile_mode": mode}
        for key, settings in strategies.items():
            try:
                row.update(_strategy(wm, key, settings, steps, sizes, context, kwargs, action, device, tflops))
            except Exception as exc:  # noqa: BLE001 - the compiled path has not run on a GPU yet: keep the rest
                if key != "compiled":
                    raise
                row["compiled_error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
        history = sizes.window - 1
        row["speedup"] = row["full_seconds_per_frame"] / row["streaming_seconds_per_frame"]
        row["frame_pass_ideal"] = (steps * 2 * sizes.window) / (history + steps * 2)
        row["fraction_of_ideal"] = row["speedup"] / row["frame_pass_ideal"]
        if "compiled_seconds_per_frame" in row:
            row["compiled_speedup"] = row["full_seconds_per_frame"] / row["compiled_seconds_per_frame"]
            row["compiled_fraction_of_ideal"] = row["compiled_speedup"] / row["frame_pass_ideal"]
        rows.append(row)
    return rows


def _strategy(wm, key: str, settings: dict, steps: int, sizes: Sizes, context, kwargs, action, device, tflops) -> dict:
    """One strategy's frames of one row: seconds of its last frame, frame passes, the single step."""
    from causalize.rollout.sampler import RolloutConfig, RolloutSession

    # the window is full from the first frame on: 1 frame is the steady state. Compiled: its
    # first frame runs eagerly and the first row's second frame compiles, so it takes one more
    frames = (2 if steps <= 10 else 1) + (key == "compiled")
    session = RolloutSession(wm, RolloutConfig(steps=steps, window=sizes.window, **settings), kwargs)
    session.reset(context)
    for _ in range(frames):
        session.step(action)
    _sync(device)
    out: dict[str, Any] = {
        f"{key}_seconds_per_frame": session.seconds_per_frame[-1],
        f"{key}_frame_passes": session.denoiser.frame_passes,
    }
    if key != "full":
        name = "single_frame_step" if key == "streaming" else "compiled_single_frame_step"
        out[name] = _single_step(session, action, device, sizes, tflops)
    if key == "compiled":
        out["compiled_calls"] = session.denoiser.compiled_calls
        out["compile_failure"] = session.denoiser.compiled.failure
    return out


def _single_step(session, action, device: torch.device, sizes: Sizes, tflops: float) -> dict[str, Any]:
    """One guided single-frame denoising step against the caches, timed alone, next to its FLOP
    time at the measured bf16 matmul throughput: 2·params·tokens for the linear layers plus
    4·Lq·Lk·dim per layer for self-attention (both branches), cross-attention to the text."""
    x = torch.randn(session.frame_shape, device=device, dtype=session.dtype)
    level = session.levels[0]
    t = timed(lambda: session.denoiser(x, level, action[:, None], True), device, sizes.repeats)
    c = sizes.config
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    p = sizes.tokens_per_frame()
    params = sum(q.numel() for q in session.wm.parameters())
    keys = sizes.window * p
    flops = 2 * (2 * params * p + c["num_layers"] * (4 * p * keys * dim + 4 * p * sizes.text * dim))
    flop_seconds = flops / (tflops * 1e12)
    return {**t, "flops": flops, "flop_seconds": flop_seconds, "ratio_to_flop_time": t["seconds"] / flop_seconds}


def check_train(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    from causalize.context import enable_gradient_checkpointing
    from causalize.noise import NoiseSchedule
    from causalize.training.trainer import compute_loss

    wm = _world_model(sizes, device, torch.float32).train()
    checkpointing = enable_gradient_checkpointing(wm.model)
    optim = torch.optim.AdamW(wm.parameters(), lr=1e-5)
    c = sizes.config
    x0 = wan_inputs(sizes, device, torch.float32)["hidden_states"]
    actions = torch.randn(1, sizes.frames, 3, device=device)
    kwargs = {"encoder_hidden_states": torch.zeros(1, sizes.text, c["text_dim"], device=device)}
    schedule = NoiseSchedule.from_config()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    losses = []

    def step():
        gen = torch.Generator(device=device).manual_seed(len(losses))
        with autocast:
            loss, _, _ = compute_loss(
                wm, x0, actions, None, schedule=schedule, frame_axis=2, generator=gen, model_kwargs=kwargs
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 0.5)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())

    t = timed(step, device, repeats=2 if not sizes.quick else 1)
    return {
        **t,
        "gradient_checkpointing": checkpointing,
        "loss": losses[-1],
        "loss_finite": all(x == x for x in losses),
        "window_frames": sizes.frames,
        "parameters": sum(p.numel() for p in wm.parameters()),
    }


# -------------------------------------------------------------------------------------- report


def _compiled_cells(r: dict[str, Any]) -> list[str]:
    if "compiled_seconds_per_frame" not in r:
        return ["error", "-", "-", "-"]
    step = r["compiled_single_frame_step"]
    speedup = f"{r['compiled_speedup']:.2f}x" + (" (eager: compile failed)" if r.get("compile_failure") else "")
    return [
        f"{r['compiled_seconds_per_frame']:.3f}",
        speedup,
        f"{step['seconds']:.4f}",
        f"{step['ratio_to_flop_time']:.1f}x",
    ]


def report_table(results: dict[str, Any]) -> str:
    lines = []
    causal = results.get("causality", [])
    if causal:
        bad = [f"{r['plan']}/{r['dtype']}" for r in causal if not r.get("passed")]
        lines.append(
            f"causality: {sum(bool(r.get('passed')) for r in causal)}/{len(causal)} plan x dtype checks exact "
            f"(leak 0 after, > 0 before){'; failed: ' + ', '.join(bad) if bad else ''}"
        )
    fwd = results.get("forward")
    if fwd:
        rows = []
        for path in ("stock", "flex", "chunked", "dense"):
            r = fwd.get(path, {})
            if "error" in r:
                rows.append([path, "error", "", "", r["error"][:60]])
            elif r:
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
                rows.append(
                    [
                        path,
                        f"{r['seconds']:.4f}",
                        f"{r.get('ratio_to_stock', 1.0):.2f}x",
                        peak,
                        f"{r.get('memory_ratio_to_stock', 1.0):.2f}x" if r.get("peak_gib") else "-",
                    ]
                )
        lines.append(f"forward, {fwd['video_tokens']} video + {fwd['text_tokens']} text tokens, bf16:")
        lines.append(table(["path", "seconds", "vs stock", "peak GiB", "memory vs stock"], rows))
    stream = results.get("streaming")
    if stream:
        rows = [
            [
                r["steps"],
                f"{r['streaming_seconds_per_frame']:.3f}",
                f"{r['full_seconds_per_frame']:.3f}",
                f"{r['speedup']:.2f}x",
                f"{r['frame_pass_ideal']:.2f}x",
                f"{r['fraction_of_ideal']:.2f}",
                f"{r['single_frame_step']['seconds']:.4f}",
                f"{r['single_frame_step']['ratio_to_flop_time']:.1f}x",
                *_compiled_cells(r),
            ]
            for r in stream
        ]
        lines.append(f"streaming rollout, bf16, guidance 2.5 (compiled: mode {stream[0]['compile_mode']}):")
        lines.append(
            table(
                [
                    "S",
                    "stream s/frame",
                    "full s/frame",
                    "speed-up",
                    "ideal",
                    "of ideal",
                    "1-frame step s",
                    "vs FLOP time",
                    "compiled s/frame",
                    "compiled speed-up",
                    "compiled step s",
                    "vs FLOP time",
                ],
                rows,
            )
        )
    tr = results.get("train")
    if tr:
        peak = f"{tr['peak_gib']:.1f} GiB" if tr.get("peak_gib") else "-"
        lines.append(
            f"train step (bf16 autocast, checkpointing={tr['gradient_checkpointing']}): {tr['seconds']:.3f} s, "
            f"peak {peak}, loss {tr['loss']:.4g}"
        )
    if results.get("errors"):
        lines.append("errors: " + "; ".join(f"{k}: {v[:120]}" for k, v in results["errors"].items()))
    return "\n".join(lines)


def run(
    quick: bool, device: torch.device, only: list[str] | None = None, save: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Every wanted section; `save(results)` after each one, so that a run stopped by a time limit
    still leaves the sections it finished."""
    sizes = Sizes(quick)
    results: dict[str, Any] = {"quick": quick, "device": str(device), "machine": machine_info()}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    from causalize.modules.attention_exec import describe

    results["attention"] = describe(device)
    wanted = set(only or ("causality", "forward", "streaming", "train"))
    results["bf16_matmul_tflops"] = matmul_tflops(device, torch.bfloat16, 256 if quick else 8192)
    checks = {
        "causality": lambda: check_causality(device),
        "forward": lambda: check_forward(sizes, device),
        "streaming": lambda: check_streaming(sizes, device, results["bf16_matmul_tflops"]),
        "train": lambda: check_train(sizes, device),
    }
    for name, check in checks.items():
        if name in wanted:
            with section(results, name):
                results[name] = check()
            if save is not None:
                save(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (or --device), under 3 minutes")
    parser.add_argument("--device", default=None, help="default: cuda (full run) / cpu (--quick)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of gpu_check[.quick].json")
    parser.add_argument(
        "--only", nargs="*", choices=("causality", "forward", "streaming", "train"), help="run only these sections"
    )
    args = parser.parse_args(argv)
    from causalize.precision import resolve_device

    device = resolve_device(args.device or ("cpu" if args.quick else "cuda"))

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check.quick.json" if args.quick else "gpu_check.json")
    t0 = time.perf_counter()

    def save(results: dict[str, Any]) -> None:
        results["seconds"] = round(time.perf_counter() - t0, 1)
        results["table"] = report_table(results)
        path.write_text(record_text(results, default=str))

    results = run(args.quick, device, args.only, save)
    save(results)
    text = results["table"]
    print(f"{results.get('gpu', device)}; {machine_line(results['machine'])}")
    print(text)
    print(f"wrote {path} in {results['seconds']} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
