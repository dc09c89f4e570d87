"""Special cases of Kandinsky 6, Sana-WM and LTX-2 (plugins kandinsky, sana_wm, ltx2); the generic
guarantees come from the registry-parametrised tests.

- Kandinsky 6 is converted for video: a converted model refuses audio, and the reason is real
  (with audio, a future video frame reaches frame 0's output through the audio tokens).
- SANA-WM's LTX-2 refiner and LTX-2 are refused: the refusals say why, and the reasons are
  checked on the diffusers modules themselves (each named site mixes future frames in).
- SANA-WM stage 1 has a plan (plugins/sana_wm.py, tests/test_sana_wm.py); the checks below show
  the stock sites its twins replace mix future frames in, and that the forward GDN scan alone is causal.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from world_models import tiny_world_model

from causalize.api import convert_model, plan_for, verify_model
from causalize.errors import CausalizeError, NoPlanError
from causalize.plugin_manager import registries

FRAMES = 4


# --------------------------------------------------------------------------- Kandinsky 6


def _k6():
    return registries().plans.get("kandinsky6")


def _k6_audio(model, inputs, gen):
    return torch.randn(1, 3 * FRAMES, model.config.in_audio_dim, generator=gen)


def test_kandinsky6_converted_model_refuses_audio():
    plan = _k6()
    model = plan.build_tiny()
    gen = torch.Generator().manual_seed(0)
    inputs = plan.make_inputs(model, FRAMES, gen)
    audio = _k6_audio(model, inputs, gen)
    with torch.no_grad():
        assert len(model(**inputs, audio_hidden_states=audio, return_dict=False)) == 2  # stock: audio is fine
    convert_model(model, plan)
    with pytest.raises(CausalizeError, match="audio latents have their own time axis"):
        plan.forward(model, {**inputs, "audio_hidden_states": audio})


def test_kandinsky6_audio_carries_future_video_into_the_past():
    """The refusal's reason: on a converted model called with audio (bypassing the plan's forward),
    moving the last video frame changes frame 0's output through the va/av cross-attention, while
    without audio it does not."""
    from causalize.verify.probe import rerandomize_zero_params

    plan = _k6()
    model = plan.build_tiny()
    rerandomize_zero_params(model, std=0.3)  # modulations start at zero: gates would be closed
    convert_model(model, plan)
    gen = torch.Generator().manual_seed(0)
    inputs = plan.make_inputs(model, FRAMES, gen)
    audio = _k6_audio(model, inputs, gen)
    moved = {**inputs, "hidden_states": inputs["hidden_states"].clone()}
    moved["hidden_states"][:, -1] += 1.0
    with torch.no_grad():
        video_only = [model(**x, return_dict=False)[0] for x in (inputs, moved)]
        with_audio = [model(**x, audio_hidden_states=audio, return_dict=False)[0] for x in (inputs, moved)]
    assert torch.equal(video_only[0][:, :-1], video_only[1][:, :-1])
    assert (with_audio[0][:, 0] - with_audio[1][:, 0]).abs().max() > 1e-4


def test_kandinsky6_verifies_causal_and_stock_leaks_in_self_attention():
    plan = _k6()
    from causalize.verify.probe import rerandomize_zero_params

    model = plan.build_tiny()
    rerandomize_zero_params(model, std=0.3)
    report = verify_model(model, plan)
    assert not report.passed and report.culprit["class"] == "Kandinsky6Attention"
    convert_model(model, plan)
    assert verify_model(model, plan).passed


def test_kandinsky6_per_frame_timesteps_modulate_each_frame():
    """The first video self-attention's input, for frame f's tokens, is the stock model's at frame
    f's timestep."""
    wm = tiny_world_model("kandinsky6")
    inputs = wm.plan.make_inputs(wm.model, FRAMES, torch.Generator().manual_seed(0))
    sample = inputs.pop("hidden_states")
    inputs.pop("timestep")
    per_frame = wm.plan.tokens(wm.model, {"hidden_states": sample}).per_frame
    seen = []
    attn = wm.model.visual_transformer_blocks[0].video_dec_block.self_attention
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    ks = torch.tensor([[900, 40, 500, 250]])
    try:
        with torch.no_grad():
            wm(sample, ks, **inputs)
            for k in ks[0]:
                wm.plan.forward(wm.model, {"hidden_states": sample, "timestep": k[None], **inputs})
    finally:
        handle.remove()
    run, stock = seen[0], seen[1:]
    for f in range(FRAMES):
        rows = slice(f * per_frame, (f + 1) * per_frame)
        torch.testing.assert_close(run[:, rows], stock[f][:, rows], rtol=0, atol=2e-5)
        if f:
            assert not torch.allclose(run[:, rows], stock[0][:, rows], atol=1e-4)


# --------------------------------------------------------------------------- refusals

REFUSED = {
    "SanaWMLTX2RefinerTransformer3DModel": "packed sequence without a frame map",
    "LTX2VideoTransformer3DModel": "joint audio and video streams on separate time axes",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_say_why(name):
    import diffusers

    assert hasattr(diffusers, name)
    with pytest.raises(NoPlanError, match=f"{name} is not supported: {REFUSED[name]}") as err:
        registries().plans.for_class(name)
    assert "nearest plan" in str(err.value.hint)
    with pytest.raises(NoPlanError, match=REFUSED[name]):
        plan_for(name)


T, S, HEADS, DIM = 3, 4, 2, 4  # frames, tokens per frame, heads, head dim


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _moves_first_frame(fn, x: torch.Tensor, frame_axis_len: int = T) -> float:
    """How much the first frame's rows of fn(x) move when the last frame's rows of x move (token axis 1)."""
    moved = x.clone()
    moved[:, -(x.shape[1] // frame_axis_len) :] += 1.0
    with torch.no_grad():
        a, b = fn(x), fn(moved)
    rows = a.shape[1] // frame_axis_len
    return (a[:, :rows] - b[:, :rows]).abs().max().item()


def test_sana_wm_short_convolution_runs_its_causal_kernel_both_ways():
    from diffusers.models.transformers.transformer_sana_wm import SanaWMTemporalShortConvolution

    conv = SanaWMTemporalShortConvolution(HEADS * DIM, kernel_size=3)
    conv.weight.data.normal_(generator=_gen())
    x = torch.randn(1, T * S, HEADS * DIM, generator=_gen(1))
    assert _moves_first_frame(lambda h: conv(h, T), x) > 1e-4


def _gdn_inputs(seed=0):
    g = _gen(seed)
    q, k, v = (torch.rand(1, T * S, HEADS, DIM, generator=g) for _ in range(3))
    beta = torch.rand(1, HEADS, T, S, generator=g)
    decay = torch.rand(1, HEADS, T, generator=g) * 0.5 + 0.5
    return q, k, v, beta, decay


def test_sana_wm_gdn_scans_the_flipped_sequence_and_its_forward_scan_alone_is_causal(monkeypatch):
    """The bidirectional GDN leaks (future keys / values through the flipped scan); with the flipped
    scan fed no keys (flip_and_shift -> a constant, the causal variant the refusal names) it does not."""
    from diffusers.models.transformers import transformer_sana_wm as sana_wm

    attn = sana_wm.SanaWMBidirectionalGDNAttention()
    q, k, v, beta, decay = _gdn_inputs()

    def run(key_value):
        key, value = key_value.unbind(0)
        return attn(q, key[None], value[None], beta, decay, torch.zeros(1), T)

    both = torch.stack([k[0], v[0]])  # (2, N, H, D): move the last frame of keys and values together
    assert _moves_first_frame(run, both) > 1e-4
    monkeypatch.setattr(sana_wm, "flip_and_shift", lambda x, dim=2, shift_val=0.0: torch.full_like(x, shift_val))
    for f in range(T - 1):
        moved = both.clone()
        moved[:, (f + 1) * S :] += 1.0
        with torch.no_grad():
            a, b = run(both), run(moved)
        assert torch.equal(a[:, : (f + 1) * S], b[:, : (f + 1) * S])


def test_sana_wm_softmax_blocks_call_sdpa_unmasked():
    from diffusers.models.transformers.transformer_sana_wm import SanaWMSoftmaxAttention

    attn = SanaWMSoftmaxAttention()
    q, k, v, _, _ = _gdn_inputs()
    assert _moves_first_frame(lambda kv: attn(q, kv[:1], kv[1:]), torch.cat([k, v])) > 1e-4


def test_sana_wm_refiner_has_no_frame_map():
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    params = inspect.signature(SanaWMLTX2RefinerTransformer3DModel.forward).parameters
    assert "num_frames" not in params and "video_coords" not in params
    assert params["video_rotary_emb"].default is inspect.Parameter.empty  # positions come from the caller


def test_ltx2_audio_and_video_reach_each_others_past():
    """Tiny LTX-2: the last audio token moves video frame 0; the last video frame moves audio token 0
    (isolate_modalities, the guidance mode, cuts both)."""
    from diffusers import LTX2VideoTransformer3DModel

    from causalize.verify.probe import rerandomize_zero_params

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    ).eval()
    rerandomize_zero_params(model, std=0.3)
    frames, h, w, audio = 3, 2, 2, 6
    per_frame = h * w
    g = _gen()
    kw = dict(
        hidden_states=torch.randn(1, frames * per_frame, 4, generator=g),
        audio_hidden_states=torch.randn(1, audio, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        audio_encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        timestep=torch.tensor([500.0]),
        num_frames=frames,
        height=h,
        width=w,
        audio_num_frames=audio,
        return_dict=False,
    )
    late_audio = {**kw, "audio_hidden_states": kw["audio_hidden_states"].clone()}
    late_audio["audio_hidden_states"][:, -1] += 1.0
    late_video = {**kw, "hidden_states": kw["hidden_states"].clone()}
    late_video["hidden_states"][:, -per_frame:] += 1.0
    with torch.no_grad():
        v, a = model(**kw)
        v_audio, _ = model(**late_audio)
        _, a_video = model(**late_video)
        iso, iso_audio = (model(**x, isolate_modalities=True)[0] for x in (kw, late_audio))
    assert (v_audio[:, :per_frame] - v[:, :per_frame]).abs().max() > 1e-4
    assert (a_video[:, 0] - a[:, 0]).abs().max() > 1e-4
    assert torch.equal(iso, iso_audio)
