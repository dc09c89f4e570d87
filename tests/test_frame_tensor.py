"""FrameTensor (causalize.modules.frame_tensor): a per-sample modulation that carries one value per
token frame. Each op is checked against the explicit per-frame computation: video tokens of
frame f use frame f's values, context tokens the per-sample ones; with equal frames it is the
per-sample result; per-sample chains (AdaLN-single: reshape, + table, chunk) stay lazy; Latte's
row repeats; unknown or row-mixing ops and mismatched sequences raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causalize.errors import CausalizeError
from causalize.modules.frame_tensor import FrameTensor, TokenLayout

B, T, P, D = 2, 3, 4, 5


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ft(layout=TokenLayout(T, P), width=D, equal=False, seed=0):
    g = _gen(seed)
    sample = torch.randn(B, width, generator=g)
    frames = sample[:, None].repeat(1, layout.frames, 1) if equal else torch.randn(B, layout.frames, width, generator=g)
    return FrameTensor.wrap(sample, frames, layout), sample, frames


def _tokens(layout, seed=1):
    return torch.randn(B, layout.length, D, generator=_gen(seed))


def test_has_the_per_sample_face():
    x, sample, _ = _ft()
    assert x.shape == sample.shape and x.dtype == sample.dtype and x.device == sample.device
    assert x.dim() == 2 and x.ndim == 2 and x.size(1) == D and len(x) == B and x.numel() == B * D
    assert x.is_floating_point()
    assert "3 frames x 4 tokens" in repr(x) and f"{x}".startswith("FrameTensor")


@pytest.mark.parametrize("layout", [TokenLayout(T, P), TokenLayout(T, P, suffix=2), TokenLayout(T, P, prefix=3)])
def test_broadcast_over_tokens_is_per_frame(layout):
    x, sample, frames = _ft(layout)
    h = _tokens(layout)
    out = h * (1 + x[:, None]) + x.unsqueeze(1)
    assert type(out) is torch.Tensor and out.shape == h.shape
    v0 = layout.prefix
    for f in range(T):
        sl = slice(v0 + f * P, v0 + (f + 1) * P)
        want = h[:, sl] * (1 + frames[:, f, None]) + frames[:, f, None]
        assert torch.equal(out[:, sl], want)
    for sl in (slice(0, v0), slice(v0 + T * P, layout.length)):  # context: per sample
        assert torch.equal(out[:, sl], h[:, sl] * (1 + sample[:, None]) + sample[:, None])


def test_equal_frames_give_the_per_sample_result():
    layout = TokenLayout(T, P, suffix=2)
    x, sample, _ = _ft(layout, equal=True)
    h = _tokens(layout)
    w, b = torch.randn(6 * D, D, generator=_gen(3)), torch.randn(6 * D, generator=_gen(4))

    def block(t):  # a Hunyuan-style norm and the block's use of its gate
        shift, scale, gate, *_ = F.linear(F.silu(t), w, b).chunk(6, dim=1)
        x = h * (1 + scale[:, None]) + shift[:, None]
        return torch.tanh(gate).unsqueeze(1).to(torch.float32) * x

    torch.testing.assert_close(block(x), block(sample), rtol=0, atol=1e-6)


def test_adaln_single_chain_stays_lazy_until_the_tokens():
    """Allegro / Latte blocks: (table[None] + temb.reshape(B, 6, -1)).chunk(6, dim=1), then tokens."""
    layout = TokenLayout(T, P)
    x, sample, frames = _ft(layout, width=6 * D)
    table = nn.Parameter(torch.randn(6, D, generator=_gen(2)))
    chunks = (table[None] + x.reshape(B, 6, -1)).chunk(6, dim=1)
    assert all(isinstance(c, FrameTensor) and c.shape == (B, 1, D) for c in chunks)
    shift, scale, gate = chunks[:3]
    h = _tokens(layout)
    out = gate * (h * (1 + scale) + shift)
    for f in range(T):
        s, c, g = (table[None] + frames[:, f].reshape(B, 6, -1)).chunk(6, dim=1)[:3]
        torch.testing.assert_close(
            out[:, f * P : (f + 1) * P], g * (h[:, f * P : (f + 1) * P] * (1 + c) + s), rtol=0, atol=0
        )
    # the final layer: table[None] + emb[:, None] broadcasts the per-sample axis over the table's 2 rows
    y, _, yf = _ft(layout, seed=5)
    shift, scale = (table[:2][None] + y[:, None]).chunk(2, dim=1)
    out = h * (1 + scale) + shift
    s, c = (table[:2][None] + yf[:, 1, None]).chunk(2, dim=1)
    torch.testing.assert_close(out[:, P : 2 * P], h[:, P : 2 * P] * (1 + c) + s, rtol=0, atol=0)


def test_repeat_over_frames_gives_frame_rows_and_over_patches_frame_tokens():
    layout = TokenLayout(T, P)
    x, sample, frames = _ft(layout, width=6 * D)
    rows = x.repeat_interleave(T, dim=0, output_size=B * T).view(-1, x.shape[-1])  # Latte's spatial timesteps
    assert type(rows) is torch.Tensor and torch.equal(rows, frames.reshape(B * T, -1))
    temporal = x.repeat_interleave(P, dim=0, output_size=B * P).view(-1, x.shape[-1])  # temporal timesteps
    assert isinstance(temporal, FrameTensor) and temporal.shape == (B * P, 6 * D)
    assert temporal.token_layout == TokenLayout(T, 1)
    h = torch.randn(B * P, T, 6 * D, generator=_gen(3))  # rows (b, p), one token per frame
    out = h * temporal[:, None]
    for row in range(B * P):
        for f in range(T):
            assert torch.equal(out[row, f], h[row, f] * frames[row // P, f])


def test_repeat_is_refused_when_frames_equal_tokens_per_frame():
    x, _, _ = _ft(TokenLayout(4, 4))
    with pytest.raises(CausalizeError, match="ambiguous"):
        x.repeat_interleave(4, dim=0)
    with pytest.raises(CausalizeError, match="neither"):
        _ft(TokenLayout(T, P))[0].repeat_interleave(7, dim=0)


def test_gradients_reach_the_per_sample_and_per_frame_values():
    layout = TokenLayout(T, P, suffix=2)
    sample = torch.randn(B, D, requires_grad=True)
    frames = torch.randn(B, T, D, requires_grad=True)
    h = _tokens(layout)
    (h * (1 + FrameTensor.wrap(sample, frames, layout)[:, None])).sum().backward()
    torch.testing.assert_close(sample.grad, h[:, T * P :].sum(dim=1))  # the context tokens
    torch.testing.assert_close(frames.grad, h[:, : T * P].reshape(B, T, P, D).sum(dim=2))


def test_empty_sequence_is_not_modulated():
    x, sample, _ = _ft()
    empty = torch.zeros(B, 0, D)
    out = empty * (1 + x[:, None])
    assert type(out) is torch.Tensor and out.shape == (B, 0, D)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: torch.cat([x, x], dim=1),
        lambda x: x.transpose(0, 1),
        lambda x: F.layer_norm(x, (D,)),
        lambda x: x.sum(dim=1),
        lambda x: x.mean(),
        lambda x: torch.einsum("bd->db", x),
    ],
)
def test_unknown_operations_fail_loudly(op):
    x, _, _ = _ft()
    with pytest.raises(CausalizeError, match="does not know how to apply per frame"):
        op(x)


@pytest.mark.parametrize(
    "op, match",
    [
        (lambda x: x.chunk(2, dim=0), "mix the rows"),
        (lambda x: x.unsqueeze(0), "mix the rows"),
        (lambda x: x.reshape(-1), "changes its rows"),
        (lambda x: x[0], "indexing"),
        (lambda x: x[torch.tensor([0])], "indexing"),
        (lambda x: torch.randn(B, T * P + 1, D) * x[:, None], "over 13 tokens"),
        (lambda x: x.repeat_interleave(T, dim=1), "integer repeat of its rows"),
    ],
)
def test_row_mixing_and_mismatched_sequences_are_refused(op, match):
    x, _, _ = _ft()
    with pytest.raises(CausalizeError, match=match):
        op(x)


def test_wrap_checks_the_frame_values():
    with pytest.raises(CausalizeError, match="do not match"):
        FrameTensor.wrap(torch.zeros(B, D), torch.zeros(B, T + 1, D), TokenLayout(T, P))
