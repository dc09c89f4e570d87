"""HunyuanVideo 1.5, FramePack, Motif-Video and ConsisID: what the registry-parametrised tests
(test_families, test_world_model, test_rollout, test_half_precision) do not show.

- per-frame modulation is each frame's own (the first block's attention input for frame f equals
  the stock model's at frame f's timestep), conversion keeps the keys and the direct call, a batch
  is its samples, and world models round-trip through disk;
- the joint-context rule: context rows that may see video leak (negative control);
- streaming with history written in several multi-frame calls at offsets > 0, batch 1 and 2,
  equals one full forward (also ConsisID with CogVideoX's sincos positions);
- FramePack's rule (the clean history is the past): enforced on the frame indices, needed as a
  leading context (a suffix-only layout leaks), and streamed with offset section indices (without
  the offset, streaming diverges);
- Motif-Video with decoder layers is refused, and would leak;
- HunyuanVideo 1.5 keeps its own context mask (the "scope" mask format).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from world_models import tiny_world_model

from causalize.api import convert, convert_model, verify_model
from causalize.context import TokenGrid
from causalize.errors import UsageError
from causalize.passes import frame_conditioning
from causalize.plan import Streaming
from causalize.plugin_manager import registries
from causalize.plugins import framepack
from causalize.rollout import RolloutConfig, rollout
from causalize.rollout.streaming import Stream
from causalize.world_model import WorldModel

FRAMES, ACTION_DIM = 4, 3
NEW = ["consisid", "hunyuan-framepack", "hunyuan15", "motif"]
# the first block's attention and the argument holding its video tokens (after any leading context)
PROBES = {
    "consisid": ("transformer_blocks.0.attn1", "hidden_states"),
    "hunyuan-framepack": ("transformer_blocks.0.attn", "hidden_states"),
    "hunyuan15": ("transformer_blocks.0.attn", "hidden_states"),
    "motif": ("transformer_blocks.0.attn", "hidden_states"),
}


def _world_model(plan, action_dim=ACTION_DIM, seed=0):
    model = plan.build_tiny(seed)
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={action_dim}}}")
    wm = WorldModel(model, plan)
    with torch.no_grad():  # the adapter's zero-initialised output layer would hide the actions
        for p in wm.action_encoder.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return wm


def _split(plan, model, seed=0):
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(seed))
    cond = plan.conditioning
    sample = inputs.pop(cond.sample_arg)
    inputs.pop(cond.timestep_arg)
    return sample, inputs


def _batch(a, b):
    """Two samples' extra inputs as one batch (lists item by item; FramePack's frame indices, integer
    and shared by the batch, as they are)."""
    if isinstance(a, list):
        return [_batch(x, y) for x, y in zip(a, b)]
    if torch.is_tensor(a) and a.dim() and a.shape[0] == 1 and a.is_floating_point():
        return torch.cat([a, b])
    return a


@pytest.mark.parametrize("name", NEW)
def test_first_block_modulation_is_each_frames_own(name):
    plan = registries().plans.get(name)
    wm = _world_model(plan)
    sample, extra = _split(plan, wm.model)
    grid = plan.tokens(wm.model, {plan.conditioning.sample_arg: sample, **extra})
    path, arg = PROBES[name]
    seen = []
    handle = wm.model.get_submodule(path).register_forward_pre_hook(
        lambda m, a, k: seen.append(k[arg].detach().clone()), with_kwargs=True
    )
    ks = torch.tensor([[900, 40, 500, 250]])
    try:
        with torch.no_grad():
            wm(sample, ks, **extra)
            for k in ks[0]:  # the stock model (twins inactive outside a world-model call) at one timestep
                plan.forward(
                    wm.model, {plan.conditioning.sample_arg: sample, plan.conditioning.timestep_arg: k[None], **extra}
                )
    finally:
        handle.remove()

    def frame(x, f):
        start = grid.leading_context + f * grid.per_frame
        return x[:, start : start + grid.per_frame]

    per_frame_run, stock = seen[0], seen[1:]
    for f in range(FRAMES):
        got = frame(per_frame_run, f)
        torch.testing.assert_close(got, frame(stock[f], f), rtol=0, atol=2e-5, msg=f"{name}: frame {f}")
        if f:  # and frame f's timestep does matter there
            assert not torch.allclose(got, frame(stock[0], f), atol=1e-4)
    if grid.leading_context:  # FramePack's history keeps the per-sample (frame 0's) modulation
        torch.testing.assert_close(
            per_frame_run[:, : grid.leading_context], stock[0][:, : grid.leading_context], rtol=0, atol=2e-5
        )


@pytest.mark.parametrize("name", NEW)
def test_conversion_keeps_keys_and_the_direct_call(name):
    plan = registries().plans.get(name)
    base, model = plan.build_tiny(seed=3), plan.build_tiny(seed=3)
    convert_model(model, plan, "frame-conditioning{action_dim=2}")
    keys = [k for k in model.state_dict() if not k.startswith(frame_conditioning.ADAPTER_ATTR)]
    assert keys == list(base.state_dict())
    inputs = plan.make_inputs(base, FRAMES, torch.Generator().manual_seed(0))
    with torch.no_grad():  # no per-frame conditioning in the context: the stock model, exactly
        assert torch.equal(plan.forward(model, inputs), plan.forward(base, inputs))


@pytest.mark.parametrize("name", NEW)
def test_a_batch_is_its_samples(name):
    """Two samples with their own per-frame timesteps, actions and conditioning: each equals its own call."""
    plan = registries().plans.get(name)
    wm = _world_model(plan)
    (s0, e0), (s1, e1) = _split(plan, wm.model, seed=0), _split(plan, wm.model, seed=10)
    gen = torch.Generator().manual_seed(3)
    t, a = torch.randint(0, 1000, (2, FRAMES), generator=gen), torch.randn(2, FRAMES, ACTION_DIM, generator=gen)
    both = {k: _batch(v, e1[k]) for k, v in e0.items()}
    with torch.no_grad():
        batch = wm(torch.cat([s0, s1]), t, a, **both)
        one = wm(s0, t[:1], a[:1], **e0)
        two = wm(s1, t[1:], a[1:], **e1)
    torch.testing.assert_close(batch, torch.cat([one, two]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", NEW)
def test_world_model_round_trips_through_disk(name, tmp_path):
    plan = registries().plans.get(name)
    plan.build_tiny(seed=2).save_pretrained(tmp_path / "base", safe_serialization=True)
    pipeline = f"{plan.pipeline},frame-conditioning{{action_dim={ACTION_DIM}}}"
    report = convert(tmp_path / "base", tmp_path / "wm", pipeline=pipeline)
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


@pytest.mark.parametrize("name", NEW)
def test_context_rows_that_see_video_leak(name):
    """Negative control of the joint-context rule: text / image (and FramePack's history) rows
    allowed to see the video carry the last frame into every earlier one through the next layer."""
    plan = registries().plans.get(name)
    model = plan.build_tiny()
    convert_model(model, plan, "block-causal-attention{context_sees_video=true}")
    report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 1e-5, report.summary()
    last = report.matrix.shape[1] - 1
    assert {i for i, j, _ in report.violations if j == last} == set(range(last))


@pytest.mark.parametrize("name", [*NEW, "consisid-sincos"])
@pytest.mark.parametrize("batch", [1, 2])
def test_chunked_history_equals_a_full_forward(name, batch):
    """History written in calls of several frames at an offset > 0 (which a rollout never does),
    then the current frame read: every call's output equals the same frames of one full forward.
    ConsisID without RoPE adds CogVideoX's sincos patch positions, offset by CogVideoX's hook."""
    sincos = name == "consisid-sincos"
    wm = tiny_world_model("consisid", use_rotary_positional_embeddings=False) if sincos else tiny_world_model(name)
    cond, layout = wm.plan.conditioning, wm.plan.layout
    axis = layout.inputs[cond.sample_arg]
    chunks, frames = [2, 2], 5
    gen = torch.Generator().manual_seed(4)
    samples = [wm.plan.make_inputs(wm.model, frames, gen)[cond.sample_arg] for _ in range(batch)]
    sample = torch.cat(samples)
    ts = torch.full((batch, frames), 39, dtype=torch.long)
    ts[:, -1] = 700
    actions = torch.randn(batch, frames, ACTION_DIM, generator=gen)
    with torch.no_grad():
        full = wm(sample, ts, actions, **wm.unconditional_inputs(batch, frames))
        stream = Stream.of(wm.model, wm.plan)
        stream.anchor_timestep = 39
        pieces, start = [], 0
        for n in chunks:
            with stream.write(n):
                part = sample.narrow(axis, start, n)
                pieces.append(
                    wm(
                        part,
                        ts[:, start : start + n],
                        actions[:, start : start + n],
                        **wm.unconditional_inputs(batch, n),
                    )
                )
            start += n
        with stream.read():
            last = sample.narrow(axis, start, 1)
            pieces.append(wm(last, ts[:, start:], actions[:, start:], **wm.unconditional_inputs(batch, 1)))
    assert full.abs().max() > 0.1
    torch.testing.assert_close(torch.cat(pieces, dim=layout.output_axis), full, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ FramePack


def _framepack():
    return registries().plans.get("hunyuan-framepack")


def _converted_framepack(plan=None):
    plan = plan or _framepack()
    model = plan.build_tiny()
    convert_model(model, plan)
    return plan, model


def test_framepack_history_after_the_section_is_refused():
    """The inverted anti-drifting sampling conditions a section on later frames: not causal."""
    plan, model = _converted_framepack()
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    inputs["indices_latents_history_2x"] = inputs["indices_latents"].max() + torch.tensor([1, 2])
    with pytest.raises(UsageError, match="is not before the section"):
        plan.forward(model, inputs)


def test_framepack_without_history_is_refused_with_a_reason():
    plan, model = _converted_framepack()
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    del inputs["latents_history_4x"]
    with pytest.raises(UsageError, match="needs latents_history_4x"):
        plan.forward(model, inputs)


def test_framepack_history_counts_as_leading_context():
    plan = _framepack()
    model = plan.build_tiny()
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    grid = plan.tokens(model, inputs)
    # clean: 2 frames x 4 x 4; 2x: (2, 4, 4) patches of 2 x 8 x 8; 4x: (4, 8, 8) patches of 16 x 8 x 8
    assert grid == TokenGrid(FRAMES, 16, leading_context=32 + 4 + 4)


def test_framepack_with_the_history_as_a_suffix_leaks():
    """Negative control: without `leading_context` the history counts as part of the suffix, so the
    frame ids are shifted by the history length and the mask is wrong (BACKBONES.md pitfall 7)."""

    def suffix_only(model, kwargs):
        grid = framepack.tokens(model, kwargs)
        return TokenGrid(grid.frames, grid.per_frame)

    plan, model = _converted_framepack(dataclasses.replace(_framepack(), tokens=suffix_only))
    report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 1e-4, report.summary()


def test_framepack_streaming_without_the_index_offset_diverges():
    """Negative control: section RoPE indices restarting at the window start in every streaming
    call give different frames; with the offset hook streaming equals full recomputation."""
    config = RolloutConfig(steps=2, window=4, guidance_scale=1.0)
    ctx_frames = _framepack().make_inputs(_framepack().build_tiny(), 2, torch.Generator().manual_seed(0))
    context = ctx_frames["hidden_states"]
    actions = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1))
    wm = tiny_world_model("hunyuan-framepack")
    full = rollout(wm, context, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    streamed = rollout(tiny_world_model("hunyuan-framepack"), context, actions, config=config)
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)
    broken_wm = tiny_world_model("hunyuan-framepack")
    broken_wm = WorldModel(broken_wm.model, dataclasses.replace(broken_wm.plan, streaming=Streaming()))
    broken = rollout(broken_wm, context, actions, config=config)
    assert (broken.frames - full.frames).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ Motif


def _motif_with_decoder_layers():
    plan = registries().plans.get("motif")
    config = {**plan.tiny_config, "num_single_layers": 2, "num_decoder_layers": 1}
    return dataclasses.replace(plan, tiny_config=config)


def test_motif_decoder_layers_are_refused():
    plan = _motif_with_decoder_layers()
    model = plan.build_tiny()
    convert_model(model, plan)
    with pytest.raises(UsageError, match="num_decoder_layers=1 is not supported"):
        verify_model(model, plan)


def test_motif_decoder_layers_would_leak():
    """Why: the decoder blocks' context slot holds the encoder's video tokens, which the block-causal
    layout treats as context every frame sees."""
    plan = _motif_with_decoder_layers()
    c = plan.tiny_config

    def ignore_decoder(model, kwargs):
        _, _, frames, height, width = kwargs["hidden_states"].shape
        return TokenGrid(frames, (height // c["patch_size"]) * (width // c["patch_size"]))

    plan = dataclasses.replace(plan, tokens=ignore_decoder)
    model = plan.build_tiny()
    convert_model(model, plan)
    report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 1e-4, report.summary()


# ------------------------------------------------------------------------------------ HunyuanVideo 1.5


def test_hunyuan15_keeps_its_own_context_mask():
    """The 'scope' format leaves the processor its (B, N_ctx) context mask: padded context tokens
    stay hidden from the video, so their values do not matter (the stock model's behaviour)."""
    plan = registries().plans.get("hunyuan15")
    model = plan.build_tiny()
    convert_model(model, plan)
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    other = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][:, 5:] += 3.0  # padding (mask 0) only
    with torch.no_grad():
        torch.testing.assert_close(plan.forward(model, other), plan.forward(model, inputs), rtol=0, atol=0)
    assert model.transformer_blocks[0].attn.processor.mask_format == "scope"
