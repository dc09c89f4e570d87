"""The "sdpa-scope" mode of BlockCausalAttnProcessor (processors that call SDPA with no usable mask,
Mochi), the keyword-argument pass-through of the wrapper, and the combination with a model's own
padding mask (Hunyuan)."""

from __future__ import annotations

import copy
import inspect
import threading

import pytest
import torch
import torch.nn.functional as F

from causalize.api import convert_model, example_inputs
from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError
from causalize.modules import block_attention as ba
from causalize.modules.block_attention import BlockCausalAttnProcessor, block_causal_mask, token_frame_ids
from causalize.plugin_manager import registries
from causalize.verify.influence import rerandomize_zero_params

GRID = TokenGrid(frames=3, per_frame=2)  # T·P = 6 video tokens
ORIGINAL_SDPA = F.scaled_dot_product_attention


def _ctx(grid: TokenGrid = GRID) -> FrameContext:
    ctx = FrameContext(tokens=None)
    ctx.grid = grid
    return ctx


def _qkv(length: int, seed: int, lk: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, length, 4, generator=gen)
    k = torch.randn(1, 2, lk or length, 4, generator=gen)
    v = torch.randn(1, 2, lk or length, 4, generator=gen)
    return q, k, v


class SdpaInner:
    """A stand-in for Mochi's processor: one unmasked SDPA call per requested (Lq, Lk)."""

    def __init__(self, shapes, fail: bool = False, nested=None):
        self.shapes, self.fail, self.nested = shapes, fail, nested
        self.seen_function = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        self.seen_function = F.scaled_dot_product_attention
        outs = []
        for i, (lq, lk) in enumerate(self.shapes):
            outs.append(F.scaled_dot_product_attention(*_qkv(lq, i, lk)))
            if self.nested is not None:
                outs.append(self.nested())
        if self.fail:
            raise RuntimeError("inner processor failed")
        return outs


def _reference(length: int, seed: int, grid: TokenGrid = GRID, position: str = "suffix") -> torch.Tensor:
    allowed = block_causal_mask(token_frame_ids(grid, length - grid.video_tokens, position))
    return F.scaled_dot_product_attention(*_qkv(length, seed), attn_mask=allowed)


def _call(proc, hidden_len: int = 6, text_len: int = 4):
    return proc(None, torch.zeros(1, hidden_len, 1), torch.zeros(1, text_len, 1), None)


# --- the scoped SDPA routing -----------------------------------------------------------------


def test_each_call_is_masked_from_its_own_length():
    original = F.scaled_dot_product_attention
    inner = SdpaInner([(9, 9), (7, 7), (6, 6)])  # per-sample joint lengths: 3, 1 and 0 text tokens
    proc = BlockCausalAttnProcessor(inner, _ctx(), position="suffix", joint=True, mask_format="sdpa-scope")
    outs = _call(proc)
    assert inner.seen_function is not original  # routed during the call ...
    assert F.scaled_dot_product_attention is original  # ... and restored after it
    for i, (length, out) in enumerate(zip((9, 7, 6), outs)):
        torch.testing.assert_close(out, _reference(length, i), rtol=0, atol=0)
        assert not torch.equal(out, F.scaled_dot_product_attention(*_qkv(length, i)))


def test_prefix_context_position():
    inner = SdpaInner([(8, 8)])
    proc = BlockCausalAttnProcessor(inner, _ctx(), position="prefix", joint=True, mask_format="sdpa-scope")
    (out,) = _call(proc, text_len=2)
    torch.testing.assert_close(out, _reference(8, 0, position="prefix"), rtol=0, atol=0)


def test_calls_that_do_not_span_the_video_pass_through():
    # cross-shaped (Lq != Lk) and shorter-than-video (text-only) calls are not touched
    inner = SdpaInner([(9, 9), (1, 9), (9, 4), (4, 4)])
    proc = BlockCausalAttnProcessor(inner, _ctx(), position="suffix", joint=True, mask_format="sdpa-scope")
    outs = _call(proc)
    torch.testing.assert_close(outs[0], _reference(9, 0), rtol=0, atol=0)
    for i, (lq, lk) in enumerate([(1, 9), (9, 4), (4, 4)], start=1):
        torch.testing.assert_close(outs[i], F.scaled_dot_product_attention(*_qkv(lq, i, lk)), rtol=0, atol=0)


def test_own_mask_and_is_causal_are_combined():
    allowed = block_causal_mask(token_frame_ids(GRID, 3, "suffix"))
    key_pad = torch.ones(9, dtype=torch.bool)
    key_pad[-1] = False  # a padded text token
    q, k, v = _qkv(9, 0)
    tril = torch.ones(9, 9, dtype=torch.bool).tril()

    class Inner:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            bias = torch.zeros(9).masked_fill(~key_pad, float("-inf"))
            return (
                F.scaled_dot_product_attention(q, k, v, attn_mask=key_pad),
                F.scaled_dot_product_attention(q, k, v, bias),
                F.scaled_dot_product_attention(q, k, v, is_causal=True),
            )

    proc = BlockCausalAttnProcessor(Inner(), _ctx(), position="suffix", joint=True, mask_format="sdpa-scope")
    as_bool, as_bias, causal = _call(proc, text_len=3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & key_pad)
    torch.testing.assert_close(as_bool, expected, rtol=0, atol=0)
    torch.testing.assert_close(as_bias, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        causal, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & tril), rtol=0, atol=0
    )


def test_original_sdpa_is_restored_when_the_inner_processor_raises():
    original = F.scaled_dot_product_attention
    inner = SdpaInner([(9, 9)], fail=True)
    proc = BlockCausalAttnProcessor(inner, _ctx(), position="suffix", joint=True, mask_format="sdpa-scope")
    with pytest.raises(RuntimeError, match="inner processor failed"):
        _call(proc)
    assert inner.seen_function is not original
    assert F.scaled_dot_product_attention is original
    assert ba._SdpaRouting.depth == 0 and not ba._scope_stack()
    (out,) = BlockCausalAttnProcessor(
        SdpaInner([(9, 9)]), _ctx(), position="suffix", joint=True, mask_format="sdpa-scope"
    )(None, torch.zeros(1, 6, 1), torch.zeros(1, 3, 1), None)
    torch.testing.assert_close(out, _reference(9, 0), rtol=0, atol=0)  # still works afterwards


def test_misfit_length_is_a_clear_error_and_restores_sdpa():
    original = F.scaled_dot_product_attention
    # position "none" (video only) but the SDPA call has 3 extra tokens
    proc = BlockCausalAttnProcessor(SdpaInner([(9, 9)]), _ctx(), position="none", joint=True, mask_format="sdpa-scope")
    with pytest.raises(CausalizeError, match="does not fit 3 frames x 2 tokens"):
        _call(proc)
    assert F.scaled_dot_product_attention is original
    # a joint input shorter than the video cannot be this model's layout either
    proc = BlockCausalAttnProcessor(
        SdpaInner([(9, 9)]), _ctx(), position="suffix", joint=True, mask_format="sdpa-scope"
    )
    with pytest.raises(CausalizeError, match="does not fit"):
        _call(proc, hidden_len=2, text_len=1)
    assert F.scaled_dot_product_attention is original


def test_a_processor_that_never_reaches_sdpa_is_an_error():
    """Silently bidirectional is the worst outcome: a call that masked nothing raises."""
    proc = BlockCausalAttnProcessor(
        SdpaInner([(4, 4), (1, 9)]), _ctx(), position="suffix", joint=True, mask_format="sdpa-scope"
    )
    with pytest.raises(CausalizeError, match="masked nothing"):
        _call(proc)
    assert ba._SdpaRouting.depth == 0


def test_nested_scopes_mask_with_the_innermost_grid_and_unwind():
    original = F.scaled_dot_product_attention
    small = TokenGrid(frames=2, per_frame=2)
    inner_proc = BlockCausalAttnProcessor(
        SdpaInner([(6, 6)]), _ctx(small), position="suffix", joint=True, mask_format="sdpa-scope"
    )
    seen = {}

    def nested():
        seen["depth_in"] = ba._SdpaRouting.depth
        out = _call(inner_proc, hidden_len=4, text_len=2)[0]
        seen["still_routed"] = F.scaled_dot_product_attention is not original
        return out

    outer = SdpaInner([(9, 9)], nested=nested)
    proc = BlockCausalAttnProcessor(outer, _ctx(), position="suffix", joint=True, mask_format="sdpa-scope")
    outer_out, nested_out = _call(proc)
    torch.testing.assert_close(outer_out, _reference(9, 0), rtol=0, atol=0)
    torch.testing.assert_close(nested_out, _reference(6, 0, grid=small), rtol=0, atol=0)
    assert seen == {"depth_in": 1, "still_routed": True}
    assert F.scaled_dot_product_attention is original and ba._SdpaRouting.depth == 0


def test_other_threads_pass_through_while_a_scope_is_active():
    result = {}

    def other_thread():
        result["out"] = F.scaled_dot_product_attention(*_qkv(9, 0))  # the routed function, no scope here

    def nested():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        return None

    proc = BlockCausalAttnProcessor(
        SdpaInner([(9, 9)], nested=nested), _ctx(), position="suffix", joint=True, mask_format="sdpa-scope"
    )
    _call(proc)
    torch.testing.assert_close(result["out"], F.scaled_dot_product_attention(*_qkv(9, 0)), rtol=0, atol=0)


def test_unknown_mask_format_is_rejected():
    with pytest.raises(CausalizeError, match="unknown mask_format"):
        BlockCausalAttnProcessor(SdpaInner([]), _ctx(), mask_format="bool3d")


# --- the wrapper keeps the keyword arguments of the processor it wraps -----------------------


def test_wrapper_advertises_the_inner_signature():
    """Legacy `Attention.forward` drops keywords its processor's __call__ does not name."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    proc = BlockCausalAttnProcessor(HunyuanVideoAttnProcessor2_0(), _ctx(), joint=True, position="suffix")
    assert "image_rotary_emb" in inspect.signature(proc.__call__).parameters
    clone = copy.deepcopy(proc)  # the probe runs on a deepcopy: the advertised call follows the copy
    assert clone.__call__.owner is clone


def test_hunyuan_keeps_rope_and_the_padding_mask():
    """With context rows allowed to see video and one frame, the block-causal mask allows everything:
    the converted model must then equal the base model exactly, which holds only if RoPE reaches the
    processor and the forward's text-padding mask is combined, not replaced."""
    plan = registries().plans.get("hunyuan")
    base = plan.build_tiny()
    rerandomize_zero_params(base)
    model = copy.deepcopy(base)
    convert_model(model, plan, "block-causal-attention{context_sees_video=true}")
    inputs = example_inputs(base, plan, frames=1)
    assert inputs["encoder_attention_mask"].sum() < inputs["encoder_attention_mask"].numel()  # some padding
    with torch.no_grad():
        torch.testing.assert_close(plan.forward(model, inputs), plan.forward(base, inputs), rtol=0, atol=0)
    # and the padded text stays invisible in the causal conversion
    causal = copy.deepcopy(base)
    convert_model(causal, plan)
    inputs = example_inputs(base, plan, frames=3)
    moved = dict(inputs)
    text = inputs["encoder_hidden_states"].clone()
    pad = inputs["encoder_attention_mask"][0] == 0
    text[:, pad] += 10 * torch.randn_like(text[:, pad])
    moved["encoder_hidden_states"] = text
    with torch.no_grad():
        torch.testing.assert_close(plan.forward(causal, moved), plan.forward(causal, inputs), rtol=0, atol=0)


# --- Mochi: batch of two with different valid text lengths ----------------------------------


def _mochi_batch(model, valid=(11, 5), frames=4):
    gen = torch.Generator().manual_seed(0)
    c = model.config
    mask = torch.zeros(len(valid), 16, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return {
        "hidden_states": torch.randn(len(valid), c.in_channels, frames, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(len(valid), 16, c.text_embed_dim, generator=gen),
        "timestep": torch.tensor([500] * len(valid)),
        "encoder_attention_mask": mask,
    }


def _per_sample_influence(model, plan, inputs):
    """M[b, i, j, c] = max |Δ output frame i of sample c| when only frame j of sample b moves."""
    with torch.no_grad():
        base = plan.forward(model, inputs)
        batch, frames = base.shape[0], base.shape[2]
        m = torch.zeros(batch, frames, frames, batch, dtype=torch.float64)
        for b in range(batch):
            for j in range(frames):
                moved = dict(inputs)
                x = inputs["hidden_states"].clone()
                x[b, :, j] += torch.randn(x[b, :, j].shape, generator=torch.Generator().manual_seed(10 * b + j))
                moved["hidden_states"] = x
                delta = (plan.forward(model, moved) - base).abs()
                m[b, :, j, :] = delta.amax(dim=(1, 3, 4)).T.double()  # (frames, batch)
    return m


@pytest.fixture(scope="module")
def mochi():
    plan = registries().plans.get("mochi")
    base = plan.build_tiny()
    rerandomize_zero_params(base)
    causal = copy.deepcopy(base)
    convert_model(causal, plan)
    return plan, base, causal


def test_mochi_batch_with_different_text_lengths_is_causal_per_sample(mochi, monkeypatch):
    plan, base, causal = mochi
    inputs = _mochi_batch(base)
    lengths = []
    real = ba.SdpaScope.mask_for
    monkeypatch.setattr(
        ba.SdpaScope, "mask_for", lambda self, length, *a: lengths.append(length) or real(self, length, *a)
    )
    with torch.no_grad():
        plan.forward(causal, inputs)
    video = 4 * 8 * 8
    assert lengths == [video + 11, video + 5] * 2  # 2 blocks x 2 samples, each with its own valid text
    monkeypatch.undo()

    m = _per_sample_influence(causal, plan, inputs)
    frames = m.shape[1]
    for b in range(2):
        for j in range(frames):
            assert m[b, j, j, b] > 0  # the probe reaches the perturbed frame
            for i in range(j):
                assert m[b, i, j, b] == 0, f"sample {b}: output frame {i} moved when input frame {j} changed"
        assert torch.count_nonzero(m[b, :, :, 1 - b]) == 0  # samples stay independent
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA


def test_mochi_unconverted_leaks_in_both_samples(mochi):
    plan, base, _ = mochi
    m = _per_sample_influence(base, plan, _mochi_batch(base))
    for b in range(2):
        assert max(float(m[b, i, j, b]) for j in range(4) for i in range(j)) > 1e-3


def test_mask_cache_distinguishes_grids_of_equal_length():
    """4 frames of 64 tokens and 1 frame of 256 tokens have the same length but different masks."""
    import torch

    from causalize.context import FrameContext, TokenGrid
    from causalize.modules.block_attention import BlockCausalAttnProcessor, block_causal_mask, token_frame_ids

    seen = []

    def inner(attn, hidden_states, encoder_hidden_states, attention_mask, *a, **k):
        seen.append(attention_mask)
        return hidden_states

    ctx = FrameContext(tokens=None)
    proc = BlockCausalAttnProcessor(inner, ctx)
    x = torch.zeros(1, 256, 4)
    for grid in (TokenGrid(4, 64), TokenGrid(1, 256)):
        ctx.grid = grid
        proc(None, x)
        assert torch.equal(seen[-1][0, 0], block_causal_mask(token_frame_ids(grid)))
