"""Special cases of the Wan-derived families (plugins wan_vace, wan_animate, chronoedit, helios, and
the Wan 2.2 TI2V-5B configuration of the `wan` plan); the generic guarantees come from the
registry-parametrised tests.

- Wan-Animate-2 is refused, with its reason.
- VACE: the control video leaks through the hint blocks' attention on its own (negative control:
  masking only the main blocks leaves it), and is causal once both are masked.
- Wan-Animate: reference, pose and face inputs, aligned to token frames, each reach their own frame
  and no earlier one after conversion (the face encoder is causal as shipped); each leaks before.
- Per-frame timesteps in the delta-mode plans (VACE, Animate, Helios): the first block's AdaLN and
  the output norm of frame f use frame f's timestep; the direct call is the stock model; a batch is
  its samples; gradient checkpointing keeps the per-frame modulation; save / load round-trips.
- ChronoEdit: the stock 2-frame RoPE makes frame 1 depend on the clip length; `stable-frame-positions`
  removes that (prefix-consistent calls, exact streaming), and streaming without it diverges.
- Helios: with short / mid / long history the chunk stays exactly causal (the stock model leaks), a
  history after the chunk is refused, per-frame timesteps work beside the history's t = 0, the
  streaming index offset is needed (negative control), and caller indices in a streaming call are refused.
- Wan 2.2 TI2V-5B (in / out channels 48, per-token timesteps): the `wan` plan serves it unchanged; the
  pipeline's `expand_timesteps` call (first frame at t = 0) is the world model's per-frame call.
- FrameTensor's `unflatten` / `expand` and twins of same-named classes from different model files.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from world_models import tiny_world_model

import causalize
from causalize.api import convert, convert_model, plan_for, verify_model
from causalize.context import CONTEXT_ATTR, TokenGrid, context_preserving_checkpoint
from causalize.errors import CausalizeError, NoPlanError, UsageError
from causalize.layout import FrameLayout
from causalize.passes import frame_conditioning
from causalize.plugin_manager import registries
from causalize.rollout import RolloutConfig, rollout
from causalize.rollout.streaming import Stream
from causalize.verify import check_causality
from causalize.world_model import WorldModel

FRAMES, ACTION_DIM = 4, 3
P = 64  # tokens per frame of the tiny inputs: 16 x 16 latents, 2 x 2 patches
DELTA = ["helios", "wan-animate", "wan-vace"]


def _plan(name):
    return registries().plans.get(name)


def _split(plan, model, frames=FRAMES, seed=0):
    inputs = plan.make_inputs(model, frames, torch.Generator().manual_seed(seed))
    sample = inputs.pop(plan.conditioning.sample_arg)
    inputs.pop(plan.conditioning.timestep_arg)
    return sample, inputs


def _capture(module, where="pre"):
    seen = []
    if where == "pre":
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(tuple(x for x in a)))
    else:
        handle = module.register_forward_hook(lambda m, a, o: seen.append(o))
    return seen, handle


# ----------------------------------------------------------------------------------- refusal


def test_wan_animate_2_is_refused_with_its_reason():
    with pytest.raises(NoPlanError, match="WanAnimate2Transformer3DModel is not supported: a stateful two-pass") as err:
        registries().plans.for_class("WanAnimate2Transformer3DModel")
    assert "wan-animate" in str(err.value.hint)
    with pytest.raises(NoPlanError, match="flex BlockMask"):
        plan_for("WanAnimate2Transformer3DModel")
    import diffusers

    assert hasattr(diffusers, "WanAnimate2Transformer3DModel")


# --------------------------------------------------------------------------------------- VACE


def _control_only(plan):
    return FrameLayout(inputs={"control_hidden_states": 2}, output_axis=2)


def test_vace_control_video_needs_the_hint_blocks_masked():
    plan = _plan("wan-vace")
    layout = _control_only(plan)
    stock = plan.build_tiny()
    inputs = plan.make_inputs(stock, FRAMES, torch.Generator().manual_seed(0))
    assert check_causality(stock, inputs, layout, plan.forward, localize=False).violations
    spec = plan.targets_for("block-causal-attention")[0]
    main_only = dataclasses.replace(
        plan, targets={**plan.targets, "block-causal-attention": dataclasses.replace(spec, paths=("blocks.*.attn1",))}
    )
    half = plan.build_tiny()
    convert_model(half, main_only)
    assert check_causality(half, inputs, layout, plan.forward, localize=False).violations
    model = plan.build_tiny()
    convert_model(model, plan)
    report = check_causality(model, inputs, layout, plan.forward)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0


# ------------------------------------------------------------------------------- Wan-Animate


@pytest.mark.parametrize("name", ["reference_latents", "pose_latents", "face_pixels"])
def test_wan_animate_conditioning_inputs_reach_their_own_frame_only(name):
    """The model's pose (one frame fewer) and face pixels (4 per latent frame) on the latents' grid:
    before conversion each leaks through attn1; after it each reaches its own frame and no earlier
    one, with the face encoder as shipped (its causal convs need no rewrite)."""
    plan = _plan("wan-animate")
    layout = FrameLayout(inputs={name: 2}, output_axis=2)
    stock = plan.build_tiny()
    inputs = plan.make_inputs(stock, FRAMES, torch.Generator().manual_seed(0))
    assert check_causality(stock, inputs, layout, plan.forward, localize=False).violations
    model = plan.build_tiny()
    convert_model(model, plan)
    report = check_causality(model, inputs, layout, plan.forward, localize=False)
    assert not report.violations, report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0
    first = 0 if name == "reference_latents" else 1  # frame 0 is the reference: no pose / face of its own
    assert all(report.matrix[j, j] > 0 for j in range(first, FRAMES))


def test_wan_animate_aligned_inputs_are_the_model_call():
    """The plan's aligned inputs map onto the model's own call (pose from frame 1, S = 4(F-1) - 3 face frames)."""
    plan = _plan("wan-animate")
    model = plan.build_tiny()
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    face = inputs["face_pixels"][:, :, 1:].flatten(2, 3)[:, :, 3:]
    assert face.shape[2] == 4 * (FRAMES - 1) - 3
    with torch.no_grad():
        direct = model(
            hidden_states=torch.cat([inputs["latents"], inputs["reference_latents"]], dim=1),
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pose_hidden_states=inputs["pose_latents"][:, :, 1:],
            face_pixel_values=face,
        ).sample
        assert torch.equal(plan.forward(model, inputs), direct)


# --------------------------------------------------------------- per-frame timesteps (delta)


@pytest.mark.parametrize("name", DELTA)
def test_per_frame_timesteps_modulate_each_frame(name):
    """The first block's attn1 input (AdaLN) and the output modulation of frame f's tokens are the
    stock model's at frame f's timestep."""
    wm = tiny_world_model(name, action_dim=ACTION_DIM)
    plan, model = wm.plan, wm.model
    sample, extra = _split(plan, model)
    ks = torch.tensor([[900, 40, 500, 250]])
    attn, h_attn = _capture(model.get_submodule("blocks.0.attn1"))
    if name == "helios":  # HeliosOutputNorm(hidden_states, temb (B, N, D), length): temb per token
        out, h_out = _capture(model.norm_out)
        emb, h_emb = [], None
    else:  # norm_out is a plain LayerNorm; the forward modulates its output and hands it to proj_out
        out, h_out = _capture(model.proj_out)
        emb, h_emb = _capture(model.condition_embedder, "post")
        normed, h_normed = _capture(model.norm_out, "post")
    try:
        with torch.no_grad():
            wm(sample, ks, **extra)
            for k in ks[0]:
                plan.forward(model, {plan.conditioning.sample_arg: sample, "timestep": k[None], **extra})
    finally:
        for h in (h_attn, h_out, h_emb, None if name == "helios" else h_normed):
            if h is not None:
                h.remove()
    for f in range(FRAMES):
        tok = slice(f * P, (f + 1) * P)
        got, want = attn[0][0][:, tok], attn[1 + f][0][:, tok]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{name}: frame {f}")
        if f:
            assert not torch.allclose(got, attn[1][0][:, tok], atol=1e-4)
        if name == "helios":
            torch.testing.assert_close(out[0][1][:, tok], out[1 + f][1][:, tok], rtol=0, atol=2e-5)
        else:
            shift, scale = (model.scale_shift_table + emb[1 + f][0].unsqueeze(1)).chunk(2, dim=1)
            want_out = normed[0][:, tok] * (1 + scale) + shift
            torch.testing.assert_close(out[0][0][:, tok], want_out, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", DELTA)
def test_conversion_keeps_keys_and_the_direct_call(name):
    plan = _plan(name)
    base, model = plan.build_tiny(seed=3), plan.build_tiny(seed=3)
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim=2}}")
    keys = [k for k in model.state_dict() if not k.startswith(frame_conditioning.ADAPTER_ATTR)]
    assert keys == list(base.state_dict())
    convert_model(base, plan)
    inputs = plan.make_inputs(base, FRAMES, torch.Generator().manual_seed(0))
    with torch.no_grad():  # no per-frame conditioning in the context: the causal model, exactly
        assert torch.equal(plan.forward(model, inputs), plan.forward(base, inputs))


@pytest.mark.parametrize("name", DELTA)
def test_a_batch_is_its_samples(name):
    wm = tiny_world_model(name, action_dim=ACTION_DIM)
    (s0, e0), (s1, e1) = _split(wm.plan, wm.model, seed=0), _split(wm.plan, wm.model, seed=10)
    gen = torch.Generator().manual_seed(3)
    t, a = torch.randint(0, 1000, (2, FRAMES), generator=gen), torch.randn(2, FRAMES, ACTION_DIM, generator=gen)
    both = {k: torch.cat([v, e1[k]]) for k, v in e0.items()}
    with torch.no_grad():
        batch = wm(torch.cat([s0, s1]), t, a, **both)
        one, two = wm(s0, t[:1], a[:1], **e0), wm(s1, t[1:], a[1:], **e1)
    torch.testing.assert_close(batch, torch.cat([one, two]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", DELTA)
def test_gradient_checkpointing_keeps_per_frame_modulation(name):
    """VACE / Animate blocks receive the FrameTensor timestep_proj as a checkpointed argument;
    Helios blocks a per-token tensor made from it."""
    wm = tiny_world_model(name, action_dim=ACTION_DIM).train()
    sample, extra = _split(wm.plan, wm.model)
    gen = torch.Generator().manual_seed(1)
    t, a = torch.randint(0, 1000, (1, FRAMES), generator=gen), torch.randn(1, FRAMES, ACTION_DIM, generator=gen)

    def grads(w):
        w.zero_grad()
        w(sample, t, a, **extra).square().mean().backward()
        return {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}

    reference = grads(wm)
    ckpt = copy.deepcopy(wm)
    ckpt.model.enable_gradient_checkpointing(context_preserving_checkpoint(getattr(ckpt.model, CONTEXT_ATTR)))
    got = grads(ckpt)
    assert got.keys() == reference.keys() and any("action_encoder" in n for n in got)
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", DELTA)
def test_world_model_round_trips_through_disk(name, tmp_path):
    plan = _plan(name)
    plan.build_tiny(seed=2).save_pretrained(tmp_path / "base", safe_serialization=True)
    report = convert(
        tmp_path / "base", tmp_path / "wm", pipeline=f"{plan.pipeline},frame-conditioning{{action_dim={ACTION_DIM}}}"
    )
    assert report.written and report.passed
    wm = WorldModel.from_pretrained(tmp_path / "wm")
    with torch.no_grad():
        for p in wm.action_encoder.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    wm.model.save_pretrained(tmp_path / "wm2", safe_serialization=True)
    (tmp_path / "wm2" / "causalize.json").write_text((tmp_path / "wm" / "causalize.json").read_text())
    again = WorldModel.from_pretrained(tmp_path / "wm2")
    sample, extra = _split(plan, wm.model, seed=5)
    gen = torch.Generator().manual_seed(6)
    t, a = torch.randint(0, 1000, (1, FRAMES), generator=gen), torch.randn(1, FRAMES, ACTION_DIM, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(again(sample, t, a, **extra), wm(sample, t, a, **extra), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- ChronoEdit


def _prefix_gap(model, plan) -> float:
    """max |frames 0-1 of a 2-frame call - frames 0-1 of the 3-frame call extending it|."""
    inputs = plan.make_inputs(model, 3, torch.Generator().manual_seed(0))
    short = {**inputs, "hidden_states": inputs["hidden_states"][:, :, :2]}
    with torch.no_grad():
        return (plan.forward(model, short) - plan.forward(model, inputs)[:, :, :2]).abs().max().item()


def test_chronoedit_two_frame_positions_depend_on_the_clip_length_until_fixed():
    plan = _plan("chronoedit")
    attention_only = plan.build_tiny()
    convert_model(attention_only, plan, "block-causal-attention")
    assert verify_model(attention_only, plan).passed  # the value probe cannot see it
    assert _prefix_gap(attention_only, plan) > 1e-3  # frame 1 sits at position 7, then at 1
    model = plan.build_tiny()
    convert_model(model, plan)
    assert model.rope.temporal_skip_len == 2
    assert _prefix_gap(model, plan) < 1e-5
    causalize.unconvert(model)
    assert model.rope.temporal_skip_len == plan.tiny_config["rope_temporal_skip_len"]


def test_chronoedit_streaming_needs_stable_positions():
    config = RolloutConfig(steps=2, window=4, guidance_scale=1.0)
    actions = torch.randn(1, 3, ACTION_DIM, generator=torch.Generator().manual_seed(1))
    gaps = {}
    for pipeline in ("block-causal-attention", None):
        wm = tiny_world_model("chronoedit", action_dim=ACTION_DIM, pipeline=pipeline)
        ctx = _split(wm.plan, wm.model, frames=2)[0]
        full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
        streamed = rollout(wm, ctx, actions, config=config)
        gaps[pipeline] = (streamed.frames - full.frames).abs().max().item()
    assert gaps["block-causal-attention"] > 1e-3 and gaps[None] < 1e-5, gaps


# --------------------------------------------------------------------------------------- Helios


def _with_history(model, frames=FRAMES, batch=1, chunk_start=8, gen_seed=0):
    """The plan's inputs plus Helios-pipeline-shaped history: long (4 frames), mid (2), short (2),
    indices 0..7, the chunk after them."""
    plan = _plan("helios")
    gen = torch.Generator().manual_seed(gen_seed)
    c = model.config
    inputs = plan.make_inputs(model, frames, gen)
    inputs = {
        k: v.expand(batch, *v.shape[1:]).clone() if torch.is_tensor(v) and v.dim() > 1 else v for k, v in inputs.items()
    }

    def latents(n):
        return torch.randn(batch, c.in_channels, n, 16, 16, generator=gen)

    def idx(*values):
        return torch.tensor([values]).expand(batch, -1)

    return {
        **inputs,
        "indices_hidden_states": torch.arange(chunk_start, chunk_start + frames)[None].expand(batch, -1),
        "latents_history_long": latents(4),
        "indices_latents_history_long": idx(0, 1, 2, 3),
        "latents_history_mid": latents(2),
        "indices_latents_history_mid": idx(4, 5),
        "latents_history_short": latents(2),
        "indices_latents_history_short": idx(6, 7),
    }


def test_helios_chunk_is_causal_beside_its_history():
    plan = _plan("helios")
    layout = FrameLayout(inputs={"hidden_states": 2}, output_axis=2)
    cfg = {**plan.tiny_config, "is_amplify_history": True}
    torch.manual_seed(0)
    stock = plan.model_cls()(**cfg).eval()
    inputs = _with_history(stock)
    assert check_causality(stock, inputs, layout, plan.forward, localize=False).violations
    model = copy.deepcopy(stock)
    convert_model(model, plan)
    report = check_causality(model, inputs, layout, plan.forward)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert torch.count_nonzero(torch.triu(report.matrix, diagonal=1)) == 0
    with torch.no_grad():  # the history is seen: changing it moves the chunk
        other = {**inputs, "latents_history_short": torch.randn_like(inputs["latents_history_short"])}
        assert (plan.forward(model, other) - plan.forward(model, inputs)).abs().max() > 1e-4


def test_helios_history_after_the_chunk_is_refused():
    plan = _plan("helios")
    model = plan.build_tiny()
    convert_model(model, plan)
    inputs = _with_history(model, chunk_start=5)  # the chunk starts before the short history (6, 7)
    with pytest.raises(UsageError, match="history frame index 7 is not before the chunk's first frame index 5"):
        plan.forward(model, inputs)


def test_helios_per_frame_timesteps_beside_the_history():
    """The zero-history-timestep call (batch 1, t = 0) stays per sample; constant per-frame
    timesteps are the model's own call; a batch of two is its samples."""
    wm = tiny_world_model("helios", action_dim=ACTION_DIM)
    inputs = _with_history(wm.model, batch=2)
    sample = inputs.pop("hidden_states")
    inputs.pop("timestep")
    with torch.no_grad():
        base = wm.plan.forward(wm.model, {"hidden_states": sample, "timestep": torch.tensor([321, 321]), **inputs})
        per_frame = wm(sample, torch.full((2, FRAMES), 321), **inputs)
        torch.testing.assert_close(per_frame, base, rtol=0, atol=1e-5)
        t = torch.tensor([[900, 40, 500, 250], [10, 20, 30, 40]])
        both = wm(sample, t, **inputs)
        one = wm(sample[:1], t[:1], **{k: v[:1] if torch.is_tensor(v) else v for k, v in inputs.items()})
    torch.testing.assert_close(both[:1], one, rtol=0, atol=2e-5)


def test_helios_streaming_needs_the_index_offset_and_refuses_caller_indices():
    from causalize.plugins import helios

    config = RolloutConfig(steps=2, window=4, guidance_scale=1.0)
    wm = tiny_world_model("helios", action_dim=ACTION_DIM)
    ctx = _split(wm.plan, wm.model, frames=2)[0]
    actions = torch.randn(1, 3, ACTION_DIM, generator=torch.Generator().manual_seed(1))
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    torch.testing.assert_close(rollout(wm, ctx, actions, config=config).frames, full.frames, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="indices_hidden_states"):
        rollout(wm, ctx, actions, config=config, model_kwargs={"indices_hidden_states": torch.arange(3)[None]})
    Stream.of(wm.model, wm.plan)
    hooks = wm.model._forward_pre_hooks
    for key in [k for k, h in hooks.items() if h is helios._offset_indices]:
        del hooks[key]
    broken = rollout(wm, ctx, actions, config=config)
    assert (broken.frames - full.frames).abs().max() > 1e-3


# ------------------------------------------------------------------------- Wan 2.2 TI2V-5B


TI2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=48,  # the Wan 2.2 VAE's 48 latent channels (TI2V-5B: in = out = 48)
    out_channels=48,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def test_wan22_ti2v_config_is_served_by_the_wan_plan():
    """TI2V-5B's pipeline (`expand_timesteps`) passes timestep (B, N) with the first frame's tokens
    at 0 (the clean image) and t elsewhere: that is the world model's per-frame call with frame 0 at
    0. The wan plan serves this config unchanged: causal in latents, timesteps and actions."""
    import diffusers

    plan = plan_for("WanTransformer3DModel", config=TI2V)
    assert plan.name == "wan"
    plan = dataclasses.replace(plan, tiny_config=TI2V)
    stock = plan.build_tiny()
    assert not verify_model(stock, plan).passed
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TI2V).eval()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={ACTION_DIM}}}")
    assert verify_model(model, plan).passed
    wm = WorldModel(model, plan)
    sample, extra = _split(plan, model)
    frames = torch.tensor([[0, 700, 700, 700]])
    mask = torch.ones(1, 1, FRAMES, 16, 16)
    mask[:, :, 0] = 0  # the pipeline's first-frame mask, on the latent grid
    native = (mask[0][0][:, ::2, ::2] * 700).flatten()[None].long()  # expand_timesteps' per-token timestep
    with torch.no_grad():
        want = plan.forward(model, {"hidden_states": sample, "timestep": native, **extra})
        torch.testing.assert_close(wm(sample, frames, **extra), want, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    probe = {
        "sample": sample,
        "timesteps": torch.randint(0, 1000, (1, FRAMES), generator=gen),
        "actions": torch.randn(1, FRAMES, ACTION_DIM, generator=gen),
        **extra,
    }
    for name, axis in (("sample", 2), ("timesteps", 1), ("actions", 1)):
        layout = FrameLayout(inputs={name: axis}, output_axis=2)
        report = check_causality(wm, probe, layout, lambda w, x: w(**x))
        assert report.passed, f"{name}: {report.summary()}"


# ------------------------------------------------------------------------- shared machinery


def test_frame_tensor_unflatten_and_expand():
    from causalize.modules.frame_tensor import FrameTensor, TokenLayout

    b, f, per, d = 2, 3, 4, 5
    sample, frames = torch.randn(b, 6 * d), torch.randn(b, f, 6 * d)
    ft = FrameTensor.wrap(sample, frames, TokenLayout(f, per, prefix=2))
    six = ft.unflatten(1, (6, -1))
    assert isinstance(six, FrameTensor) and six.shape == (b, 6, d)
    torch.testing.assert_close(six.frames, frames.unflatten(2, (6, d)), rtol=0, atol=0)
    wide = six.view(b, 6, 1, d).expand(b, 6, 2 + f * per, -1)  # Helios: over the tokens, axis 2
    assert type(wide) is torch.Tensor and wide.shape == (b, 6, 2 + f * per, d)
    torch.testing.assert_close(wide[:, :, :2], sample.view(b, 6, 1, d).expand(b, 6, 2, d), rtol=0, atol=0)
    for t in range(f):
        rows = wide[:, :, 2 + t * per : 2 + (t + 1) * per]
        torch.testing.assert_close(rows, frames[:, t].view(b, 6, 1, d).expand(b, 6, per, d), rtol=0, atol=0)
    same = six.unsqueeze(2).expand(b, 6, 1, d)  # no axis grows: still per sample, per frame
    assert isinstance(same, FrameTensor)
    with pytest.raises(CausalizeError, match="not a broadcast over the 14 tokens"):
        six.view(b, 6, 1, d).expand(b, 6, 7, d)


def test_same_named_classes_from_different_files_get_their_own_twin():
    from diffusers.models.transformers import transformer_wan, transformer_wan_animate

    from causalize.context import FrameContext
    from causalize.modules import frame_modulation as fm

    registries()  # the twins are registered with the plugins
    for module in (transformer_wan, transformer_wan_animate):
        emb = module.WanTimeTextImageEmbedding(24, 256, 144, 16)
        fm.make_frame_modulated(emb, FrameContext(None))
        assert type(emb).__mro__[1] is module.WanTimeTextImageEmbedding
    ctx = FrameContext(None)
    ctx.grid, ctx.temb_delta = TokenGrid(2, 3), torch.zeros(2, 24)
    emb = fm.make_frame_modulated(transformer_wan.WanTimeTextImageEmbedding(24, 256, 144, 16), ctx)
    temb, proj, _, _ = emb(torch.tensor([500]), torch.randn(1, 5, 16))
    assert temb.frames.shape == (1, 2, 24) and proj.frames.shape == (1, 2, 144)
