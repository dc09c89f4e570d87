"""Block-causal ReLU linear attention (Sana-Video): the processor against the stock one, its exact
causality over frame blocks, the streaming prefix form, the pass, and the BACKBONES §7 attribution
(causal conv_temp alone / block-causal linear attention alone / both)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_sana_video import SanaAttnProcessor2_0, SanaLinearAttnProcessor3_0
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.api import convert_model, inspect_model, verify_model
from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError, PassError
from causalize.modules.linear_attention import (
    BlockCausalLinearAttnProcessor,
    LinearAttnCache,
    block_causal_linear_attention,
    features,
    group_sums,
)
from causalize.plan import Targets
from causalize.plugin_manager import registries

BOTH = "causal-temporal-conv,block-causal-linear-attention"


@pytest.fixture(scope="module")
def plan():
    return registries().plans.get("sana-video")


def fixed_context(frames: int, per_frame: int) -> FrameContext:
    """A frame context pinned to one grid, for calling a processor outside a model forward."""
    ctx = FrameContext(lambda model, kwargs: TokenGrid(frames, per_frame))
    ctx.grid = TokenGrid(frames, per_frame)
    return ctx


def linear_attention_module(heads: int, head_dim: int, seed: int) -> Attention:
    """An attention module built like Sana-Video's attn1 (RMS qk-norm across heads, no bias)."""
    torch.manual_seed(seed)
    return Attention(
        query_dim=heads * head_dim,
        heads=heads,
        dim_head=head_dim,
        kv_heads=heads,
        qk_norm="rms_norm_across_heads",
        bias=False,
        processor=SanaLinearAttnProcessor3_0(),
    ).eval()


def random_rope(tokens: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (1, N, 1, C) cos / sin tables in the interleaved layout Sana's RoPE produces."""
    angles = torch.rand(tokens, head_dim // 2, generator=gen, dtype=torch.float64) * 6.283
    cos, sin = (f(angles).repeat_interleave(2, dim=-1)[None, :, None] for f in (torch.cos, torch.sin))
    return cos, sin


def well_conditioned(
    attn: Attention, x, rope, frames: int, per_frame: int, block_size: int, ratio: float = 0.05
) -> torch.Tensor:
    """(B, N) True where every head's normaliser Σ φ(k)·φ(q) over the visible keys is at least
    `ratio` · Σ |φ(k)| |φ(q)|.

    With ReLU features a query can be (nearly) orthogonal to every key it sees: the normaliser is
    then ~0 (the stock 1e-15 keeps it finite) and the output is a ratio of rounding errors, so two
    correct summation orders disagree arbitrarily (seen: 6.6e6 vs. 1e6 for a lone token whose
    φ(q) and φ(k) have disjoint supports). Such tokens are excluded from the value comparison.
    """
    with torch.no_grad():
        f = features(attn, x, rotary_emb=rope)
    fid = torch.arange(frames).repeat_interleave(per_frame) // block_size
    visible = (fid[None, :] <= fid[:, None]).to(f.q.dtype)  # (N_q, N_k)
    den = (f.q @ f.k.transpose(-1, -2) * visible).sum(-1)  # (B, H, N)
    scale = (f.q.norm(dim=-1, keepdim=True) * f.k.norm(dim=-1)[:, :, None] * visible).sum(-1)
    return (den >= ratio * scale).all(dim=1)


def call(attn: Attention, processor, x, rope):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x, rotary_emb=rope)


def sana_attn1_case(plan, frames: int = 4, seed: int = 0):
    """attn1 of the tiny Sana-Video, its real RoPE tables, and (B, T·P, D) inputs for T frames."""
    model = plan.build_tiny()
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(1, model.config.in_channels, frames, 16, 16, generator=gen)
    with torch.no_grad():
        rope = model.rope(video)
    grid = plan.tokens(model, {"hidden_states": video})
    x = torch.randn(
        1, grid.video_tokens, model.config.num_attention_heads * model.config.attention_head_dim, generator=gen
    )
    return model.transformer_blocks[0].attn1, rope, x, grid


# --- (a) one block covering every frame = the stock processor ------------------------------


@pytest.mark.parametrize("extra", [0, 3])
def test_one_block_reproduces_the_stock_processor(plan, extra):
    attn, rope, x, grid = sana_attn1_case(plan)
    stock = call(attn, SanaLinearAttnProcessor3_0(), x, rope)
    ours = call(
        attn,
        BlockCausalLinearAttnProcessor(fixed_context(grid.frames, grid.per_frame), block_size=grid.frames + extra),
        x,
        rope,
    )
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    causal = call(
        attn, BlockCausalLinearAttnProcessor(fixed_context(grid.frames, grid.per_frame), block_size=1), x, rope
    )
    assert not torch.allclose(causal, stock, rtol=1e-5, atol=1e-5)  # frame-causal is a different function


def test_whole_model_with_one_block_equals_the_stock_model(plan):
    """Through the pass and the model's own forward (frame context from the pre-hook)."""
    stock = plan.build_tiny(seed=2)
    converted = plan.build_tiny(seed=2)
    convert_model(converted, plan, "block-causal-linear-attention{block_size=4}")
    inputs = plan.make_inputs(stock, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plan.forward(converted, inputs), plan.forward(stock, inputs), rtol=1e-5, atol=1e-5)


# --- (b) exact block causality, and the right function --------------------------------------


@st.composite
def cases(draw):
    frames = draw(st.integers(2, 5))
    return dict(
        frames=frames,
        per_frame=draw(st.integers(1, 6)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([2, 4, 8])),
        block_size=draw(st.integers(1, frames + 1)),
        j=draw(st.integers(0, frames - 1)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_earlier_blocks_are_bit_exact_and_later_ones_see_their_prefix(case):
    t, p, b, j = case["frames"], case["per_frame"], case["block_size"], case["j"]
    attn = linear_attention_module(case["heads"], case["head_dim"], case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    rope = random_rope(t * p, case["head_dim"], gen)
    x = torch.randn(2, t * p, attn.inner_dim, generator=gen)
    moved = x.clone()
    moved[:, j * p :] += torch.randn(moved[:, j * p :].shape, generator=gen)
    proc = BlockCausalLinearAttnProcessor(fixed_context(t, p), block_size=b)
    out, out_moved = call(attn, proc, x, rope), call(attn, proc, moved, rope)

    # Tokens of blocks before j's block read prefix sums that stop before frame j: bit-exact.
    past = (j // b) * b * p
    assert torch.equal(out[:, :past], out_moved[:, :past])

    # Every block equals the stock processor run on the frames up to the end of that block
    # (on the tokens where that function is well conditioned, see `well_conditioned`).
    keep = well_conditioned(attn, moved, rope, t, p, b)
    for start in range(0, t, b):
        end = min(start + b, t)
        cos, sin = rope
        ref = call(attn, SanaLinearAttnProcessor3_0(), moved[:, : end * p], (cos[:, : end * p], sin[:, : end * p]))
        rows = keep[:, start * p : end * p]
        torch.testing.assert_close(
            out_moved[:, start * p : end * p][rows], ref[:, start * p :][rows], rtol=1e-5, atol=1e-5
        )


def test_chunked_prefix_equals_the_full_run_bit_exactly():
    """The running sums carried across chunks (the streaming form) reproduce the one-shot run."""
    frames, per_frame, head_dim = 6, 5, 8
    attn = linear_attention_module(2, head_dim, seed=3)
    gen = torch.Generator().manual_seed(3)
    rope = random_rope(frames * per_frame, head_dim, gen)
    x = torch.randn(1, frames * per_frame, attn.inner_dim, generator=gen)
    with torch.no_grad():
        f = features(attn, x, rotary_emb=rope)
        full, full_state = block_causal_linear_attention(f, frames, block_size=2)
        outs, state = [], None
        for lo, hi in [(0, 2), (2, 6)]:  # chunks end on block boundaries
            part = dataclasses.replace(
                f,
                **{k: getattr(f, k)[:, :, lo * per_frame : hi * per_frame] for k in ("q", "k", "q_rot", "k_rot", "v")},
            )
            out, state = block_causal_linear_attention(part, hi - lo, block_size=2, state=state)
            outs.append(out)
    assert torch.equal(torch.cat(outs, dim=2), full)
    assert torch.equal(state.kv, full_state.kv) and torch.equal(state.ksum, full_state.ksum)


def _frames_of(f, keep: list[int], per_frame: int):
    """The features of the frames `keep`, in order (tokens are frame-major)."""
    index = torch.cat([torch.arange(i * per_frame, (i + 1) * per_frame) for i in keep])
    return dataclasses.replace(
        f, **{k: getattr(f, k).index_select(2, index) for k in ("q", "k", "q_rot", "k_rot", "v")}
    )


@pytest.mark.parametrize(("first", "stop"), [(1, 4), (0, 5), (3, 5)])
def test_evicted_frames_leave_the_running_sums(first, stop):
    """A rolling cache pushes frames one by one, recording each frame's sums, then drops frames
    first .. stop−1: its running sums, and what the next frame reads from them, are those of the
    kept frames alone (the one-shot run over the kept frames, bit for bit). Negative control: the
    sums not dropped give another output. A cache whose writes were not recorded refuses to drop."""
    frames, per_frame, head_dim = 6, 5, 8
    attn = linear_attention_module(2, head_dim, seed=4)
    gen = torch.Generator().manual_seed(4)
    rope = random_rope(frames * per_frame, head_dim, gen)
    x = torch.randn(1, frames * per_frame, attn.inner_dim, generator=gen)
    cache, unrecorded = LinearAttnCache(), LinearAttnCache()
    with torch.no_grad():
        f = features(attn, x, rotary_emb=rope)
        for i in range(frames - 1):  # the history, one push per frame
            part = _frames_of(f, [i], per_frame)
            sums = group_sums(part.k, part.k_rot, part.v, 1)
            _, state = block_causal_linear_attention(part, 1, state=cache.state, sums=sums)
            cache.record(*sums, first=i)
            cache.store(state, 1)
            if i == 0:
                unrecorded.store(state, 1)
        stale = cache.state
        stale = dataclasses.replace(stale, kv=stale.kv.clone(), ksum=stale.ksum.clone())
        cache.evict(first, stop)
        kept = [i for i in range(frames - 1) if not first <= i < stop]
        assert [r[0] for r in cache.recorded] == kept and cache.frames == frames - 1
        newest = _frames_of(f, [frames - 1], per_frame)
        out, _ = block_causal_linear_attention(newest, 1, state=cache.state)
        reference, _ = block_causal_linear_attention(_frames_of(f, [*kept, frames - 1], per_frame), len(kept) + 1)
        assert torch.equal(out, reference[:, :, -per_frame:])
        not_dropped, _ = block_causal_linear_attention(newest, 1, state=stale)
    assert (not_dropped - out).abs().max() > 1e-3
    with pytest.raises(CausalizeError, match="did not record"):
        unrecorded.evict(0, 1)


# --- the pass --------------------------------------------------------------------------------


def test_pass_targets_only_linear_self_attention(plan):
    """Even with no path filter, only attn1 (linear) is a site: attn2 is frame-local cross-attention."""
    model = plan.build_tiny()
    loose = dataclasses.replace(plan, targets={**plan.targets, "block-causal-linear-attention": Targets()})
    runs = convert_model(model, loose, "block-causal-linear-attention")
    assert [r.path for r in runs[0].records] == [f"transformer_blocks.{i}.attn1" for i in range(2)]
    assert all(isinstance(b.attn2.processor, SanaAttnProcessor2_0) for b in model.transformer_blocks)
    assert all(isinstance(b.attn1.processor, BlockCausalLinearAttnProcessor) for b in model.transformer_blocks)


def test_pass_without_tokens_function_is_an_error(plan):
    with pytest.raises(PassError, match="no `tokens` function"):
        convert_model(plan.build_tiny(), dataclasses.replace(plan, tokens=None), "block-causal-linear-attention")


def test_inspect_lists_both_paths(plan):
    info = inspect_model(plan.build_tiny(), plan)
    assert [s["path"] for s in info["sites"]["causal-temporal-conv"]] == [
        f"transformer_blocks.{i}.ff.conv_temp" for i in range(2)
    ]
    assert [s["path"] for s in info["sites"]["block-causal-linear-attention"]] == [
        f"transformer_blocks.{i}.attn1" for i in range(2)
    ]
    assert info["uncovered"] == []


def test_block_size_option(plan):
    """block_size=2 lets the frames of a pair see each other: only frame-causal violations inside pairs."""
    model = plan.build_tiny()
    convert_model(model, plan, "causal-temporal-conv,block-causal-linear-attention{block_size=2}")
    frame_causal = verify_model(model, plan)
    assert not frame_causal.passed
    assert all(j == i + 1 and i % 2 == 0 for i, j, _ in frame_causal.violations)
    # conv_temp is frame-causal (past frames only), so a 2-frame block layout must pass.
    block_plan = dataclasses.replace(plan, layout=dataclasses.replace(plan.layout, block_size=2))
    assert verify_model(model, block_plan).passed


# --- (c) BACKBONES §7 attribution: only both fixes give exact zeros -----------------------


@pytest.mark.parametrize(
    "pipeline, culprit",
    [
        ("causal-temporal-conv", ("transformer_blocks.0.attn1", "Attention")),
        ("block-causal-linear-attention", ("transformer_blocks.0.ff.conv_temp", "Conv2d")),
    ],
)
def test_either_fix_alone_still_leaks(plan, pipeline, culprit):
    model = plan.build_tiny()
    convert_model(model, plan, pipeline)
    report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 0
    assert (report.culprit["path"], report.culprit["class"]) == culprit, report.summary()


def test_both_fixes_are_exactly_causal(plan):
    model = plan.build_tiny()
    convert_model(model, plan, BOTH)
    report = verify_model(model, plan, frames=5)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0
    assert all(report.matrix[j, j] > 0 for j in range(5))
