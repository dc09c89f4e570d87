"""Frame-modulated twins of DiT modulation modules (causalize.modules.frame_modulation): the
original module when called without per-frame embeddings (exactly) or with equal ones (to 1e-6),
state-dict keys unchanged by conversion, and CogVideoX 1.5 (two latent frames per token frame)
block-causal over latent, timestep and action with blocks of 2 frames. The FrameTensor twins
(HunyuanVideo, Mochi, EasyAnimate norms; the AdaLN-single embedding of Allegro / Latte): frame t's
video tokens and gates are the original module's at frame t's embedding, text stays per sample."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero

from causalize.api import convert_model
from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError
from causalize.layout import FrameLayout
from causalize.modules import frame_modulation as fm
from causalize.passes import frame_conditioning
from causalize.plugin_manager import registries
from causalize.verify import check_causality
from causalize.world_model import WorldModel

B, T, P, L, D, TD = 2, 3, 4, 5, 8, 6


def _randomize(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return module


def _modules():
    return {
        "zero": _randomize(CogVideoXLayerNormZero(TD, D)),
        "out": _randomize(AdaLayerNorm(TD, output_dim=2 * D, chunk_dim=1)),
    }


def _call(kind, module, x, text, temb):
    return module(x, text, temb) if kind == "zero" else (module(x, temb=temb),)


def _twins(delta):
    ctx = FrameContext(None)
    ctx.grid, ctx.temb_delta = TokenGrid(T, P), delta
    originals = _modules()
    twins = {k: fm.make_frame_modulated(_randomize(type(m)(*_args(k))), ctx) for k, m in originals.items()}
    return originals, twins, ctx


def _args(kind):
    return (TD, D) if kind == "zero" else (TD, None, 2 * D, False, 1e-5, 1)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T * P, D, generator=g), torch.randn(B, L, D, generator=g), torch.randn(B, TD, generator=g)


def test_ctx_attribute_matches_the_pass():
    assert fm.CTX == frame_conditioning.CTX


def test_twin_without_per_frame_embeddings_is_the_original_exactly():
    originals, twins, ctx = _twins(None)
    x, text, temb = _inputs()
    for kind in originals:
        for a, b in zip(_call(kind, originals[kind], x, text, temb), _call(kind, twins[kind], x, text, temb)):
            assert torch.equal(a, b)
    ctx.grid, ctx.temb_delta = None, torch.zeros(B * T, TD)  # no grid: outside a forward
    for kind in originals:
        for a, b in zip(_call(kind, originals[kind], x, text, temb), _call(kind, twins[kind], x, text, temb)):
            assert torch.equal(a, b)


def test_twin_with_equal_frames_matches_the_original():
    originals, twins, _ = _twins(torch.zeros(B * T, TD))
    x, text, temb = _inputs()
    for kind in originals:
        for a, b in zip(_call(kind, originals[kind], x, text, temb), _call(kind, twins[kind], x, text, temb)):
            a = a.expand_as(b)  # gates: (B, 1, D) per sample, (B, N, D) per token
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_twin_modulates_each_frame_with_its_own_embedding():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(B * T, TD, generator=g)
    originals, twins, _ = _twins(delta)
    x, text, temb = _inputs()
    frame_temb = temb[:, None] + delta.reshape(B, T, TD)
    for kind in originals:
        got = _call(kind, twins[kind], x, text, temb)
        for t in range(T):  # frame t's tokens = the original module run at frame t's embedding
            want = _call(kind, originals[kind], x[:, t * P : (t + 1) * P], text, frame_temb[:, t])
            torch.testing.assert_close(got[0][:, t * P : (t + 1) * P], want[0], rtol=0, atol=1e-6)
            if kind == "zero":
                torch.testing.assert_close(got[2][:, t * P : (t + 1) * P], want[2].expand(B, P, D), rtol=0, atol=1e-6)
        if kind == "zero":  # text keeps the per-sample modulation
            want = _call(kind, originals[kind], x, text, temb)
            assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])


def test_token_count_must_match_the_grid():
    _, twins, _ = _twins(torch.zeros(B * T, TD))
    x, text, temb = _inputs()
    with pytest.raises(CausalizeError, match="tokens"):
        twins["zero"](x[:, :-1], text, temb)


def test_unsupported_configuration_is_refused():
    with pytest.raises(CausalizeError, match="chunk_dim=1"):
        fm.make_frame_modulated(AdaLayerNorm(TD, output_dim=2 * D), FrameContext(None))
    with pytest.raises(CausalizeError, match="no frame-modulated twin"):
        fm.make_frame_modulated(torch.nn.LayerNorm(D), FrameContext(None))


@pytest.mark.parametrize("name", ["cogvideox"])
def test_conversion_keeps_state_dict_keys_and_output(name, tmp_path):
    plan = registries().plans.get(name)
    base = plan.build_tiny(seed=3)
    keys = list(base.state_dict().keys())
    inputs = plan.make_inputs(base, 2, torch.Generator().manual_seed(0))
    model = plan.build_tiny(seed=3)
    convert_model(model, plan, "frame-conditioning{action_dim=2}")
    assert [k for k in model.state_dict().keys() if not k.startswith(frame_conditioning.ADAPTER_ATTR)] == keys
    assert any(isinstance(m, fm.FrameCogVideoXLayerNormZero) for m in model.modules())
    assert any(isinstance(m, fm.FrameAdaLayerNorm) for m in model.modules())
    with torch.no_grad():  # called directly (no per-frame embeddings): the stock model, exactly
        assert torch.equal(plan.forward(model, inputs), plan.forward(base, inputs))


def test_cogvideox15_is_block_causal_with_per_frame_modulation():
    """CogVideoX 1.5 (two latent frames per token frame) with the CogVideoX conditioning: causal
    over blocks of 2 latent frames for latent, timestep and action."""
    from plugins.cogvideox import CONDITIONING

    plan = dataclasses.replace(registries().plans.get("cogvideox15"), conditioning=CONDITIONING)
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=3}}")
    wm = WorldModel(model, plan)
    frames = 4
    extra = plan.make_inputs(model, frames, torch.Generator().manual_seed(0))
    sample = extra.pop("hidden_states")
    extra.pop("timestep")
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": sample,
        "timesteps": torch.randint(0, 1000, (1, frames), generator=g),
        "actions": torch.randn(1, frames, 3, generator=g),
        **extra,
    }
    for name, axis in (("sample", 1), ("timesteps", 1), ("actions", 1)):
        layout = FrameLayout(inputs={name: axis}, output_axis=1, block_size=2)
        report = check_causality(wm, inputs, layout, lambda w, x: w(**x))
        assert report.passed, name + ": " + report.summary() + "\n" + report.format_matrix()
        assert all(report.matrix[j, j] > 0 for j in range(frames))
    with torch.no_grad():  # constant timesteps: the model's own per-sample output
        base = plan.forward(model, {"hidden_states": sample, "timestep": torch.tensor([321]), **extra})
        per_frame = wm(sample, torch.full((1, frames), 321), **extra)
    torch.testing.assert_close(per_frame, base, rtol=0, atol=1e-5)


# ------------------------------------------- FrameTensor twins (causalize.modules.frame_tensor)


def _new_twin_cases():
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.transformers.transformer_easyanimate import EasyAnimateLayerNormZero
    from diffusers.models.transformers.transformer_mochi import MochiRMSNormZero

    import plugins.easyanimate  # noqa: F401  (registers the EasyAnimate / Mochi twins)
    import plugins.mochi  # noqa: F401

    # name: (module factory, call(module, video, text, temb), context position, temb width,
    #        outputs that belong to the text stream and stay per sample)
    return {
        "AdaLayerNormZero": (lambda: AdaLayerNormZero(D), lambda m, x, c, e: m(x, emb=e), "none", D, ()),
        "AdaLayerNormZeroSingle": (
            lambda: AdaLayerNormZeroSingle(D),
            lambda m, x, c, e: m(torch.cat([x, c], 1), emb=e),
            "suffix",
            D,
            (),
        ),
        "AdaLayerNormContinuous": (
            lambda: AdaLayerNormContinuous(D, TD, elementwise_affine=False, eps=1e-6),
            lambda m, x, c, e: (m(x, e),),
            "none",
            TD,
            (),
        ),
        "MochiRMSNormZero": (lambda: MochiRMSNormZero(TD, 4 * D), lambda m, x, c, e: m(x, e), "none", TD, ()),
        "EasyAnimateLayerNormZero": (
            lambda: EasyAnimateLayerNormZero(TD, D),
            lambda m, x, c, e: m(x, c, e),
            "none",
            TD,
            (1, 3),
        ),
    }


NEW_TWINS = sorted(_new_twin_cases())


def _per_token(out, length):
    """A block's view of a module output: gates (B, D) broadcast over `length` tokens as the blocks do."""
    if out.dim() == 2:
        return torch.tanh(out).unsqueeze(1).to(torch.float32) * torch.ones(B, length, out.shape[-1])
    return out


@pytest.mark.parametrize("name", NEW_TWINS)
def test_frame_tensor_twin_is_per_frame_on_video_and_per_sample_on_text(name):
    factory, call, context, width, text_outputs = _new_twin_cases()[name]
    original = _randomize(factory())
    twin = copy.deepcopy(original)
    ctx = FrameContext(None)
    fm.make_frame_modulated(twin, ctx, context)
    assert type(twin).__name__ == "Frame" + name and isinstance(twin, type(original))
    g = torch.Generator().manual_seed(1)
    x, text, temb = (
        torch.randn(B, T * P, D, generator=g),
        torch.randn(B, L, D, generator=g),
        torch.randn(B, width, generator=g),
    )
    want = call(original, x, text, temb)
    for a, b in zip(want, call(twin, x, text, temb)):  # no per-frame embeddings: the original, exactly
        assert type(b) is torch.Tensor and torch.equal(a, b)
    delta = torch.randn(B * T, width, generator=g)
    ctx.grid, ctx.temb_delta = TokenGrid(T, P), delta
    got = call(twin, x, text, temb)
    frame_temb = temb[:, None] + delta.reshape(B, T, width)
    length = got[0].shape[1]
    for i, out in enumerate(got):
        if i in text_outputs:  # the text stream: the original per-sample modulation, exactly
            assert type(out) is torch.Tensor and torch.equal(out, want[i])
            continue
        out = _per_token(out, length)
        for t in range(T):  # frame t's tokens: the original module at frame t's embedding
            ref = _per_token(call(original, x, text, frame_temb[:, t])[i], length)
            torch.testing.assert_close(out[:, t * P : (t + 1) * P], ref[:, t * P : (t + 1) * P], rtol=0, atol=1e-6)
        if length > T * P:  # context tokens after the video: per sample
            torch.testing.assert_close(out[:, T * P :], _per_token(want[i], length)[:, T * P :], rtol=0, atol=0)


def test_frame_tensor_twin_needs_the_declared_context():
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    ctx = FrameContext(None)
    ctx.grid, ctx.temb_delta = TokenGrid(T, P), torch.zeros(B * T, D)
    twin = fm.make_frame_modulated(AdaLayerNormZeroSingle(D), ctx)  # context "none", but fed [video ; text]
    with pytest.raises(CausalizeError, match="declares context 'none'"):
        twin(torch.randn(B, T * P + L, D), emb=torch.randn(B, D))
    with pytest.raises(CausalizeError, match="context must be"):
        fm.make_frame_modulated(AdaLayerNormZeroSingle(D), ctx, context="middle")


def test_adaln_single_embedding_twin_returns_a_frame_tensor():
    from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings

    from causalize.modules.frame_tensor import FrameTensor, TokenLayout

    emb = _randomize(PixArtAlphaCombinedTimestepSizeEmbeddings(D, D // 3))
    twin = fm.make_frame_modulated(copy.deepcopy(emb), FrameContext(None))
    ts = torch.tensor([100, 700])
    plain = twin(ts, None, None, B, torch.float32)
    assert type(plain) is torch.Tensor and torch.equal(plain, emb(ts, None, None, B, torch.float32))
    ctx = getattr(twin, fm.CTX)
    ctx.grid, ctx.temb_delta = TokenGrid(T, P), torch.randn(B * T, D)
    out = twin(ts, None, None, B, torch.float32)
    assert isinstance(out, FrameTensor) and out.token_layout == TokenLayout(T, P)
    assert torch.equal(out.sample, plain)
    torch.testing.assert_close(out.frames, plain[:, None] + ctx.temb_delta.reshape(B, T, D))
