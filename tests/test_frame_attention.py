"""The UNet-style frame-causal processor wrapper: mask semantics and argument pass-through."""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.modules.frame_attention import CausalFrameAttnProcessor, frame_causal_bias


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4))
def test_bias_matches_definition(frames, block):
    bias = frame_causal_bias(frames, block_size=block)
    for q in range(frames):
        for k in range(frames):
            assert (bias[q, k] == 0) == (k // block <= q // block)


def _attn() -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(CausalFrameAttnProcessor(AttnProcessor2_0()))
    return attn.eval()


def test_equals_sdpa_with_tril_mask():
    attn = _attn()
    x = torch.randn(3, 5, 8)
    got = attn(x)
    ref = AttnProcessor2_0()(
        attn,
        x,
        attention_mask=torch.zeros(5, 5)
        .masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        .expand(6, 5, 5),
    )
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_cross_attention_is_untouched():
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    ref = attn(x, encoder_hidden_states=ctx)
    attn.set_processor(CausalFrameAttnProcessor(attn.processor))
    torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), ref, rtol=0, atol=0)


def test_wrapper_advertises_the_inner_signature():
    """diffusers' Attention.forward drops keyword arguments the processor's __call__ does not name;
    the wrapper must advertise the inner processor's parameters (e.g. `temb`)."""
    proc = CausalFrameAttnProcessor(AttnProcessor2_0())
    assert (
        inspect.signature(proc.__call__).parameters.keys()
        == inspect.signature(AttnProcessor2_0().__call__).parameters.keys()
    )
    assert "temb" in inspect.signature(proc.__call__).parameters
