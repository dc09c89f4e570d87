"""Block-causal attention through the real processor path: dense vs chunked vs compiled flex.

Times one attention module of a diffusers DiT block (projections, QK norms, SDPA, output
projection) with its stock processor (bidirectional, the baseline) and wrapped in
`BlockCausalAttnProcessor` under each `CAUSALIZE_ATTENTION` backend. Reports the median time,
the ratio to stock, the peak memory on CUDA, the largest difference to the dense result, and how
many calls each execution actually handled (flex falls back to chunked for inputs it cannot take).

    python benchmarks/block_attention.py --quick                  # tiny CPU shape, seconds
    python benchmarks/block_attention.py                          # Wan-1.3B shape: 16 x 1560 tokens, 12 x 128 heads
    python benchmarks/block_attention.py --model hunyuan --text 512 --frames 8 --per-frame 1560
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import machine_info, machine_line, table, write_json

from causalize.context import FrameContext, TokenGrid
from causalize.modules import attention_exec
from causalize.modules.block_attention import BlockCausalAttnProcessor


def _module(model: str, heads: int, head_dim: int):
    """The attention module of one real block, and whether it takes joint text (suffix context)."""
    dim = heads * head_dim
    if model == "wan":
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        return WanTransformerBlock(dim, 2 * dim, heads).attn1, False
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformerBlock

    return HunyuanVideoTransformerBlock(heads, head_dim, mlp_ratio=1.0).attn, True


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    out = fn()  # warm-up: the flex compile, mask and layout caches
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), out


def _peak_bytes(fn: Callable[[], Any], device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(args) -> dict[str, Any]:
    device, dtype = args.device, getattr(torch, args.dtype)
    attn, joint = _module(args.model, args.heads, args.head_dim)
    attn = attn.to(device, dtype).eval()
    stock = attn.processor
    ctx = FrameContext(tokens=None)
    ctx.grid = TokenGrid(args.frames, args.per_frame)
    gen = torch.Generator(device=device).manual_seed(0)
    dim = args.heads * args.head_dim
    x = torch.randn(1, ctx.grid.video_tokens, dim, generator=gen, device=device, dtype=dtype)
    text = torch.randn(1, args.text, dim, generator=gen, device=device, dtype=dtype) if joint and args.text else None
    causal = BlockCausalAttnProcessor(
        stock, ctx, block_size=args.block_size, position="suffix" if text is not None else "none", joint=joint
    )

    def call(processor) -> torch.Tensor:
        attn.set_processor(processor) if hasattr(attn, "set_processor") else setattr(attn, "processor", processor)
        out = attn(x, text) if text is not None else attn(x)
        return out[0] if isinstance(out, tuple) else out

    rows, outputs = [], {}
    with torch.no_grad():
        stock_s, _ = _time(lambda: call(stock), args.repeats, device)
        rows.append(
            {
                "backend": "stock (bidirectional)",
                "seconds": stock_s,
                "peak_bytes": _peak_bytes(lambda: call(stock), device),
            }
        )
        for backend in args.backends:
            before = dict(attention_exec.describe(device)["executions"])
            try:
                with attention_exec.attention_backend(backend):
                    seconds, out = _time(lambda: call(causal), args.repeats, device)
                    peak = _peak_bytes(lambda: call(causal), device)
            except Exception as exc:  # report, do not hide: e.g. flex cannot compile on this platform
                rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            after = attention_exec.describe(device)["executions"]
            outputs[backend] = out.float()
            rows.append(
                {
                    "backend": backend,
                    "seconds": seconds,
                    "over_stock": seconds / stock_s,
                    "peak_bytes": peak,
                    "executions": {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)},
                }
            )
    ref = outputs.get("dense")
    for row in rows:
        if ref is not None and row["backend"] in outputs:
            row["max_abs_diff_vs_dense"] = float((outputs[row["backend"]] - ref).abs().max())
    shape = {
        "model": args.model,
        "device": device,
        "dtype": args.dtype,
        "frames": args.frames,
        "tokens_per_frame": args.per_frame,
        "video_tokens": ctx.grid.video_tokens,
        "text_tokens": args.text if joint else 0,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "repeats": args.repeats,
    }
    return {"shape": shape, "rows": rows, "selection": attention_exec.describe(device)}


def _parse() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU shape, 5 repeats (checks the script works)")
    ap.add_argument(
        "--model",
        choices=["wan", "hunyuan"],
        default="wan",
        help="wan: video self-attention; hunyuan: joint [video ; text]",
    )
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--per-frame", type=int, default=1560)
    ap.add_argument("--text", type=int, default=512, help="joint text tokens (hunyuan only)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backends", default="dense,chunked,flex", help="comma-separated subset of dense,chunked,flex")
    args = ap.parse_args()
    if args.quick:
        args.device, args.dtype, args.repeats = "cpu", "float32", 5
        args.frames, args.per_frame, args.text, args.heads, args.head_dim = 4, 64, 16, 2, 32
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def main() -> None:
    args = _parse()
    info = machine_info()
    result = run(args)
    s = result["shape"]
    print(machine_line(info))
    print(
        f"{s['model']} attention, {s['frames']} x {s['tokens_per_frame']} = {s['video_tokens']} video tokens"
        + (f" + {s['text_tokens']} text" if s["text_tokens"] else "")
        + f", {s['heads']} x {s['head_dim']} heads, "
        f"{s['dtype']} on {s['device']}, block {s['block_size']}, median of {s['repeats']}"
    )
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
    print(
        table(
            ["backend", "time (s)", "x stock", "peak mem", "max |diff| vs dense", "executions"],
            [
                [
                    r["backend"],
                    f"{r['seconds']:.4f}" if "seconds" in r else r.get("error", "?"),
                    f"{r['over_stock']:.2f}" if "over_stock" in r else "",
                    gib(r.get("peak_bytes")),
                    f"{r['max_abs_diff_vs_dense']:.2e}" if "max_abs_diff_vs_dense" in r else "",
                    ", ".join(f"{k} {v}" for k, v in r.get("executions", {}).items()),
                ]
                for r in result["rows"]
            ],
            align="lrrrrl",
        )
    )
    path = write_json(
        "block_attention" + (".quick" if args.quick else f".{s['model']}.{s['device']}"),
        {"benchmark": "block_attention", "machine": info, **result},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
