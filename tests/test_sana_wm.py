"""SANA-WM special cases; the generic guarantees come from the registry-parametrised tests.

The plan's tiny config has no Q/K/V short convolutions (in each GDN block they run before the
attention, so the stock model's first leaking module would be a convolution, where the generic DiT
test expects an attention). Here the released short-convolution configs are converted and verified,
and the GDN twins' switch is checked to leave stock models alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from causalize.api import convert_model, verify_model
from causalize.plugin_manager import registries

FRAMES = 4


def _plan(**config):
    plan = registries().plans.get("sana-wm")
    return dataclasses.replace(plan, tiny_config={**plan.tiny_config, **config})


@pytest.mark.parametrize("k_conv_only", [True, False])
def test_short_convolutions_leak_and_their_causal_twins_are_exact(k_conv_only):
    plan = _plan(conv_kernel_size=4, k_conv_only=k_conv_only)
    model = plan.build_tiny()
    before = verify_model(model, plan, frames=5)
    assert not before.passed and before.culprit["class"] == "SanaWMTemporalShortConvolution", before.culprit
    convert_model(model, plan)
    assert any(type(m).__name__ == "CausalTemporalShortConvolution" for m in model.modules())
    report = verify_model(model, plan, frames=5)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    t = report.matrix.shape[0]
    later = report.matrix[torch.arange(t)[None, :] > torch.arange(t)[:, None]]
    assert torch.count_nonzero(later) == 0
    assert all(report.matrix[j, j] > 0 for j in range(t))


def test_causal_short_convolution_is_the_forward_causal_kernel():
    """Frame t of the twin's output is the stock filter's forward run: w_{k-1} x_t + ... + w_0 x_{t-k+1}."""
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTemporalShortConvolution

    from causalize.plugins.sana_wm import _twins

    conv = SanaWMTemporalShortConvolution(6, kernel_size=3)
    conv.weight.data.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, FRAMES * 2, 6, generator=torch.Generator().manual_seed(1))  # 2 tokens per frame
    conv.__class__ = _twins()["SanaWMTemporalShortConvolution"]
    y = conv(x, FRAMES)
    frames = x.reshape(FRAMES, 2, 6)
    w = conv.weight[:, 0]  # (C, K)
    for t in range(FRAMES):
        expected = sum(w[:, 2 - i] * frames[t - i] for i in range(3) if t - i >= 0)
        torch.testing.assert_close(y.reshape(FRAMES, 2, 6)[t], expected)


def test_stock_model_is_untouched_by_a_converted_one():
    """The GDN twins switch flip_and_shift only while they run: a stock model in the same process
    gives the same output before and after another model is converted and run."""
    plan = registries().plans.get("sana-wm")
    stock, converted = plan.build_tiny(seed=0), plan.build_tiny(seed=0)
    inputs = plan.make_inputs(stock, FRAMES, torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = plan.forward(stock, inputs)
        convert_model(converted, plan)
        causal = plan.forward(converted, inputs)
        again = plan.forward(stock, inputs)
        assert not torch.equal(causal, first)
        torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_softmax_twin_masks_its_sdpa_call():
    """The softmax blocks' bare SDPA runs in the scope: a converted model has both softmax twins."""
    plan = registries().plans.get("sana-wm")
    model = plan.build_tiny()
    convert_model(model, plan)
    names = {type(m).__name__ for m in model.modules()}
    assert {"CausalSoftmaxAttention", "CausalSoftmaxCamAttention", "CausalBidirectionalGDNAttention"} <= names
