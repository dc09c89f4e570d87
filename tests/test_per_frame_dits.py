"""Per-frame timesteps for the DiTs whose AdaLN is per sample in the block or model forward
(EasyAnimate, HunyuanVideo, Mochi, Allegro, Latte) and for Sana-Video (native per-token):

- the first block's self-attention input, for frame f's tokens, equals the stock model's at
  frame f's timestep (the modulation really is per frame, not merely causal);
- conversion keeps the state-dict keys, the converted model called directly is the stock model
  bit for bit, and a world model round-trips through save / load;
- gradient checkpointing (the trainer's context-preserving one) gives the same gradients;
- configurations that cannot be made per-frame are refused with a clear error.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from causalize.api import convert, convert_model
from causalize.context import CONTEXT_ATTR, FrameContext, context_preserving_checkpoint
from causalize.errors import CausalizeError, PassError
from causalize.passes import frame_conditioning
from causalize.plugin_manager import registries
from causalize.world_model import WorldModel

FRAMES, ACTION_DIM = 4, 3
SIX = ["sana-video", "easyanimate", "hunyuan", "mochi", "allegro", "latte"]

# (attention module, its video-token argument, how frame f's tokens sit in it)
PROBES = {
    "sana-video": ("transformer_blocks.0.attn1", 0, "sequence"),
    "easyanimate": ("transformer_blocks.0.attn1", "hidden_states", "sequence"),
    "hunyuan": ("transformer_blocks.0.attn", "hidden_states", "sequence"),
    "mochi": ("transformer_blocks.0.attn1", "hidden_states", "sequence"),
    "allegro": ("transformer_blocks.0.attn1", 0, "sequence"),
    "latte": ("transformer_blocks.0.attn1", 0, "rows"),  # spatial: (B·F, P, D)
    "latte-temporal": ("temporal_transformer_blocks.0.attn1", 0, "tokens"),  # temporal: (B·P, F, D)
    "cogvideox": ("transformer_blocks.0.attn1", "hidden_states", "sequence"),
}


def _plan(name):
    return registries().plans.get(name.replace("-temporal", ""))


def _world_model(plan, action_dim=ACTION_DIM, seed=0):
    model = plan.build_tiny(seed)
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={action_dim}}}")
    return WorldModel(model, plan)


def _split(plan, model, seed=0):
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(seed))
    cond = plan.conditioning
    sample = inputs.pop(cond.sample_arg)
    inputs.pop(cond.timestep_arg)
    return sample, inputs


def _capture(model, path, arg):
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs[arg] if isinstance(arg, str) else args[arg]).detach().clone())

    return seen, model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)


def _frame(x, how, f, per_frame):
    if how == "sequence":
        return x[:, f * per_frame : (f + 1) * per_frame]
    return x[f] if how == "rows" else x[:, f]


@pytest.mark.parametrize("name", sorted(PROBES))
def test_first_block_modulation_is_frame_ts_own(name):
    plan = _plan(name)
    wm = _world_model(plan)
    sample, extra = _split(plan, wm.model)
    path, arg, how = PROBES[name]
    per_frame = plan.tokens(wm.model, {plan.conditioning.sample_arg: sample}).per_frame
    ks = torch.tensor([[900, 40, 500, 250]])
    seen, handle = _capture(wm.model, path, arg)
    try:
        with torch.no_grad():
            wm(sample, ks, **extra)
            for k in ks[0]:  # the stock model (twins inactive outside a world-model call) at one timestep
                plan.forward(
                    wm.model, {plan.conditioning.sample_arg: sample, plan.conditioning.timestep_arg: k[None], **extra}
                )
    finally:
        handle.remove()
    per_frame_run, stock = seen[0], seen[1:]
    for f in range(FRAMES):
        got, want = _frame(per_frame_run, how, f, per_frame), _frame(stock[f], how, f, per_frame)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{name}: frame {f}")
        if f:  # and frame f's timestep does matter there
            assert not torch.allclose(got, _frame(stock[0], how, f, per_frame), atol=1e-4)


@pytest.mark.parametrize("name", SIX)
def test_conversion_keeps_keys_and_the_direct_call(name):
    plan = _plan(name)
    base = plan.build_tiny(seed=3)
    model = plan.build_tiny(seed=3)
    convert_model(model, plan, "frame-conditioning{action_dim=2}")
    keys = [k for k in model.state_dict() if not k.startswith(frame_conditioning.ADAPTER_ATTR)]
    assert keys == list(base.state_dict())
    inputs = plan.make_inputs(base, FRAMES, torch.Generator().manual_seed(0))
    with torch.no_grad():  # no per-frame conditioning in the context: the stock model, exactly
        assert torch.equal(plan.forward(model, inputs), plan.forward(base, inputs))


@pytest.mark.parametrize("name", SIX)
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


@pytest.mark.parametrize("name", ["allegro", "hunyuan", "easyanimate"])
def test_gradient_checkpointing_keeps_per_frame_modulation(name):
    """Allegro's blocks receive the FrameTensor itself as an argument; Hunyuan's / EasyAnimate's
    create it inside the checkpointed block."""
    plan = _plan(name)
    if not getattr(plan.model_cls(), "_supports_gradient_checkpointing", False):
        pytest.skip("no gradient checkpointing")
    wm = _world_model(plan).train()
    for p in wm.action_encoder.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    sample, extra = _split(plan, wm.model)
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


# ------------------------------------------------------------------------------------ refusals


def _convert_with_config(name, **config):
    plan = _plan(name)
    plan = dataclasses.replace(plan, tiny_config={**plan.tiny_config, **config})
    model = plan.build_tiny()
    convert_model(model, plan, "frame-conditioning")
    return plan, model


def test_sana_with_guidance_embeddings_is_refused():
    with pytest.raises(PassError, match="no timestep embedding 'time_embed.emb.timestep_embedder'"):
        _convert_with_config("sana-video", guidance_embeds=True)


def test_hunyuan_token_replace_is_refused():
    with pytest.raises(PassError, match="HunyuanVideoTokenReplaceAdaLayerNormZero, which frame-conditioning cannot"):
        _convert_with_config("hunyuan", image_condition_type="token_replace", in_channels=8)


def test_latte_with_as_many_frames_as_patches_is_refused():
    plan = _plan("latte")
    plan = dataclasses.replace(plan, tiny_config={**plan.tiny_config, "sample_size": 4})  # 2x2 = 4 patches
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning")
    wm = WorldModel(model, plan)
    sample, extra = _split(plan, model)  # 4 frames
    with pytest.raises(CausalizeError, match="ambiguous"):
        wm(sample, torch.tensor([[1, 2, 3, 4]]), **extra)
    out = wm(sample[:, :, :3], torch.tensor([[1, 2, 3]]), **extra)  # 3 frames are fine
    assert out.shape[2] == 3


def test_a_timestep_condition_is_refused():
    ctx = FrameContext(None)
    ctx.timesteps = torch.zeros(1, 2, dtype=torch.long)
    module = torch.nn.Linear(2, 2)
    object.__setattr__(module, frame_conditioning.CTX, ctx)
    with pytest.raises(CausalizeError, match="timestep condition"):
        frame_conditioning._on_delta_embedding(module, (torch.zeros(1, 2), torch.zeros(1, 2)), torch.zeros(1, 2))


@pytest.mark.parametrize("name", SIX)
def test_a_batch_is_its_samples(name):
    """Two samples with their own per-frame timesteps, actions and text: each equals its own call."""
    plan = _plan(name)
    wm = _world_model(plan)
    for p in wm.action_encoder.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    (s0, e0), (s1, e1) = _split(plan, wm.model, seed=0), _split(plan, wm.model, seed=10)
    gen = torch.Generator().manual_seed(3)
    t, a = torch.randint(0, 1000, (2, FRAMES), generator=gen), torch.randn(2, FRAMES, ACTION_DIM, generator=gen)
    both = {
        k: torch.cat([v, e1[k]]) if torch.is_tensor(v) and v.dim() and v.shape[0] == 1 else v for k, v in e0.items()
    }
    with torch.no_grad():
        batch = wm(torch.cat([s0, s1]), t, a, **both)
        one = wm(s0, t[:1], a[:1], **e0)
        two = wm(s1, t[1:], a[1:], **e1)
    torch.testing.assert_close(batch, torch.cat([one, two]), rtol=0, atol=2e-5)
