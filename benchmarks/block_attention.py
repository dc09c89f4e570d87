"""Block-causal attention cost against full attention of the same shape, and mask memory.

Runs scaled_dot_product_attention on q, k, v of a Wan-1.3B-like head layout (12 heads x 128) with
(a) no mask (full attention), (b) the dense boolean block-causal mask causalize builds on CPU, and
(c) on CUDA, flex attention with the equivalent BlockMask (masked blocks skipped). Reports the
median time of each, the ratios to full attention, and the fraction of query-key pairs a
block-causal mask keeps (the ideal ratio for a kernel that skips masked work).
Memory: bytes of the dense mask (bool and additive) against the BlockMask's tensors.

    python benchmarks/block_attention.py            # CPU shape (and the GPU shape when CUDA exists)
    python benchmarks/block_attention.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import machine_info, machine_line, table, write_json
from causalize.context import TokenGrid
from causalize.modules.block_attention import block_causal_mask, flex_block_mask, token_frame_ids


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _blockmask_bytes(bm) -> int:
    total = 0
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(bm, name, None)
        if torch.is_tensor(t):
            total += t.numel() * t.element_size()
    return total


def run_shape(frames: int, per_frame: int, heads: int, head_dim: int, device: str, dtype, repeats: int) -> dict:
    grid = TokenGrid(frames, per_frame)
    fid = token_frame_ids(grid, device=device)
    n = fid.numel()
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3))
    mask = block_causal_mask(fid)[None, None]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row = {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "frames": frames, "tokens_per_frame": per_frame,
        "tokens": n, "heads": heads, "head_dim": head_dim,
        "kept_pairs_fraction": float(mask.float().mean()),
        "dense_mask_bool_bytes": mask.numel(),
        "dense_mask_additive_bytes": mask.numel() * torch.finfo(dtype).bits // 8,
    }
    row["full_s"] = _time(lambda: F.scaled_dot_product_attention(q, k, v), repeats, sync)
    row["dense_masked_s"] = _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats, sync)
    row["dense_over_full"] = row["dense_masked_s"] / row["full_s"]
    try:
        bm = flex_block_mask(fid)
        row["blockmask_bytes"] = _blockmask_bytes(bm)
        if device == "cuda":
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention)
            row["flex_s"] = _time(lambda: compiled(q, k, v, block_mask=bm), repeats, sync)
            row["flex_over_full"] = row["flex_s"] / row["full_s"]
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            row["flex_max_abs_diff_vs_dense"] = float((compiled(q, k, v, block_mask=bm) - ref).abs().max())
    except Exception as exc:  # report, do not hide: e.g. flex unavailable on this build
        row["blockmask_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats")
    args = ap.parse_args()
    info = machine_info()
    shapes = []
    if args.quick:
        shapes.append(dict(frames=4, per_frame=64, heads=4, head_dim=64, device="cpu", dtype=torch.float32, repeats=2))
    else:
        # CPU: 8 latent frames of 16x16 tokens, Wan-1.3B heads.
        shapes.append(dict(frames=8, per_frame=256, heads=12, head_dim=128, device="cpu", dtype=torch.float32, repeats=5))
        if torch.cuda.is_available():  # realistic: 16 latent frames x 1560 tokens (480x832 Wan), bf16
            shapes.append(dict(frames=16, per_frame=1560, heads=12, head_dim=128, device="cuda", dtype=torch.bfloat16, repeats=10))
    rows = [run_shape(**s) for s in shapes]
    # Mask memory at the realistic shape is arithmetic for the dense mask; the BlockMask is built.
    big_fid = token_frame_ids(TokenGrid(16, 1560))
    memory = {"tokens": big_fid.numel(), "dense_bool_bytes": big_fid.numel() ** 2, "dense_bf16_additive_bytes": 2 * big_fid.numel() ** 2}
    try:
        memory["blockmask_bytes"] = _blockmask_bytes(flex_block_mask(big_fid.to("cuda" if torch.cuda.is_available() else "cpu")))
    except Exception as exc:
        memory["blockmask_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(machine_line(info))
    print(table(
        ["device", "T x P = tokens", "kept pairs", "full (s)", "dense mask (s)", "dense/full", "flex (s)", "flex/full"],
        [[r["device"], f"{r['frames']} x {r['tokens_per_frame']} = {r['tokens']}", f"{r['kept_pairs_fraction']:.3f}",
          f"{r['full_s']:.4f}", f"{r['dense_masked_s']:.4f}", f"{r['dense_over_full']:.2f}",
          f"{r['flex_s']:.4f}" if "flex_s" in r else "n/a (no CUDA)", f"{r['flex_over_full']:.2f}" if "flex_over_full" in r else "n/a"]
         for r in rows],
    ))
    mb = lambda b: f"{b / 2**20:.1f} MiB"
    print(table(["mask at 16 x 1560 tokens", "bytes"],
                [["dense bool", mb(memory["dense_bool_bytes"])], ["dense bf16 additive", mb(memory["dense_bf16_additive_bytes"])],
                 ["flex BlockMask", mb(memory["blockmask_bytes"]) if "blockmask_bytes" in memory else memory.get("blockmask_error", "?")]]))
    write_json("block_attention" + (".quick" if args.quick else ""), {"benchmark": "block_attention", "machine": info, "rows": rows, "mask_memory": memory})


if __name__ == "__main__":
    main()
