"""The text-row rule of joint attention, and the block-causal mask builders.

Issue requirement: "A joint-attention family whose text rows may see video is caught as leaking —
test the text-row rule by disabling it". In [text ; video] joint attention, if text rows may attend
to video, a future frame reaches the text stream in one layer and every past frame through that
text in the next layer (BACKBONES.md pitfall 6, METHOD.md §3). The pass option
`context_sees_video=true` deliberately disables the rule; the probe must then fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.api import convert_model, verify_model
from causalize.context import TokenGrid
from causalize.modules.block_attention import block_causal_mask, flex_block_mask, token_frame_ids
from causalize.plugin_manager import registries

JOINT_PLANS = ["cogvideox", "easyanimate"]  # [text ; video] joint attention inside the processor
LEAKY = "block-causal-attention{context_sees_video=true}"


def _joint_plan(name: str, num_layers: int = 2):
    """The plan, with a tiny config of `num_layers` blocks (the leak needs a second layer to surface)."""
    plan = registries().plans.get(name)
    assert plan.targets_for("block-causal-attention")[0].joint
    config = dict(plan.tiny_config, num_layers=num_layers)
    if "mmdit_layers" in config:
        config["mmdit_layers"] = min(config["mmdit_layers"], num_layers)
    return dataclasses.replace(plan, tiny_config=config)


@pytest.mark.parametrize("name", JOINT_PLANS)
def test_text_rows_that_see_video_leak(name):
    plan = _joint_plan(name, num_layers=2)
    model = plan.build_tiny()
    convert_model(model, plan, LEAKY)
    report = verify_model(model, plan)
    assert not report.passed, "text rows that see video must be caught as a leak"
    # far above rounding (a causal model gives exact zeros in fp32 on CPU); EasyAnimate's is ~5e-4,
    # diluted by the gates and the 16 text tokens
    assert report.max_leak > 1e-5, report.summary()
    assert not report.inert
    # every earlier output frame hears the last frame, through the text tokens of the second layer
    last = report.matrix.shape[1] - 1
    assert {i for i, j, _ in report.violations if j == last} == set(range(last))


@pytest.mark.parametrize("name", JOINT_PLANS)
def test_text_rows_that_see_only_text_are_causal(name):
    plan = _joint_plan(name, num_layers=2)
    model = plan.build_tiny()
    convert_model(model, plan)  # the default: context_sees_video=false
    report = verify_model(model, plan)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0


def test_one_layer_hides_the_text_row_leak():
    """With a single block the leaky text outputs are discarded: the probe cannot see the leak,
    which is why the leak test above needs two layers."""
    plan = _joint_plan("cogvideox", num_layers=1)
    model = plan.build_tiny()
    convert_model(model, plan, LEAKY)
    assert verify_model(model, plan).passed


# --- the mask builders -----------------------------------------------------------------------


def _brute_force(frames: int, per_frame: int, context: int, position: str, block: int, context_sees_video: bool):
    """The definition, token by token: None marks a context token, t a token of video frame t."""
    video = [t for t in range(frames) for _ in range(per_frame)]
    ctx = [None] * context
    tokens = ctx + video if position == "prefix" else video + ctx
    n = len(tokens)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q, fq in enumerate(tokens):
        for k, fk in enumerate(tokens):
            if fq is None:  # context query: only context, unless the rule is disabled
                allowed[q, k] = fk is None or context_sees_video
            else:  # video query: context, and every frame whose block is not after its own
                allowed[q, k] = fk is None or fk // block <= fq // block
    return tokens, allowed


layouts = st.fixed_dictionaries(
    {
        "frames": st.integers(1, 6),
        "per_frame": st.integers(1, 5),
        "context": st.integers(0, 7),
        "position": st.sampled_from(["prefix", "suffix"]),
        "block": st.integers(1, 4),
    }
)


@settings(max_examples=300, deadline=None)
@given(layout=layouts, context_sees_video=st.booleans())
def test_block_causal_mask_matches_definition(layout, context_sees_video):
    grid = TokenGrid(layout["frames"], layout["per_frame"])
    tokens, expected = _brute_force(**layout, context_sees_video=context_sees_video)

    fid = token_frame_ids(grid, layout["context"], layout["position"])
    assert fid.tolist() == [-1 if t is None else t for t in tokens]
    mask = block_causal_mask(fid, layout["block"], context_sees_video)

    assert mask.dtype == torch.bool and mask.shape == expected.shape
    assert torch.equal(mask, expected)
    assert mask.any(dim=1).all(), "every query row keeps at least one key"
    assert mask.diagonal().all(), "every token sees itself"
    context_rows = fid < 0
    if context_sees_video:
        assert mask[context_rows].all()
    else:
        assert not mask[context_rows][:, ~context_rows].any(), "context rows see no video"


def _flex_cases():
    return [
        (1, 1, 0, "prefix", 1),
        (3, 5, 7, "prefix", 1),
        (4, 6, 3, "suffix", 2),
        (6, 5, 0, "prefix", 4),
        (5, 40, 11, "prefix", 2),
        (7, 33, 0, "suffix", 3),
        (2, 130, 77, "suffix", 1),  # spans several 128-blocks
    ]


@pytest.mark.parametrize("context_sees_video", [False, True])
@pytest.mark.parametrize("frames,per_frame,context,position,block", _flex_cases())
def test_flex_mask_mod_matches_dense(frames, per_frame, context, position, block, context_sees_video):
    """The BlockMask's element rule (its mask_mod), evaluated on every (query, key) pair, is the dense mask.
    (The BlockMask itself is at 128×128 tile granularity; the CUDA test below compares outputs.)"""
    fid = token_frame_ids(TokenGrid(frames, per_frame), context, position)
    block_mask = flex_block_mask(fid, block, context_sees_video)
    n = fid.numel()
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    elementwise = block_mask.mask_mod(zero, zero, q_idx, kv_idx).expand(n, n)
    assert torch.equal(elementwise, block_causal_mask(fid, block, context_sees_video))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex-attention BlockMask path runs on CUDA")
@pytest.mark.parametrize("context_sees_video", [False, True])
@pytest.mark.parametrize("frames,per_frame,context,position,block", _flex_cases())
def test_flex_block_mask_equals_dense_mask_on_cuda(frames, per_frame, context, position, block, context_sees_video):
    from torch.nn.attention.flex_attention import flex_attention

    fid = token_frame_ids(TokenGrid(frames, per_frame), context, position, device="cuda")
    n = fid.numel()
    gen = torch.Generator(device="cuda").manual_seed(frames * 1000 + per_frame * 10 + context)
    q, k, v = (torch.randn(2, 2, n, 16, device="cuda", generator=gen) for _ in range(3))
    dense = block_causal_mask(fid, block, context_sees_video)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[None, None])
    got = flex_attention(q, k, v, block_mask=flex_block_mask(fid, block, context_sees_video))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
