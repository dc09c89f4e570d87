"""Exact streaming for the plans whose state is more than a KV cache and a RoPE offset (METHOD.md §10):
Sana-Video's linear-attention running sums, Mochi's per-sample attention loop (one KV cache per
sample), Allegro's video key-padding bias (cached with the keys), Cosmos' learnable absolute
positions, Latte's frame table (and its 1-frame calls, to which the stock forward adds none),
CogVideoX's sincos patch positions. Each mechanism has a negative control: without it, streaming
diverges from full recomputation. Positions that only the caller can compute (`image_rotary_emb`)
are refused in streaming calls."""

from __future__ import annotations

import pytest
import torch
from world_models import tiny_world_model

import causalize.modules.kv_cache as kv_cache
from causalize.errors import UsageError
from causalize.modules.linear_attention import StreamingLinearAttnProcessor
from causalize.modules.streaming_attention import SampleKVCaches, StreamingAttnProcessor
from causalize.plugin_manager import registries
from causalize.rollout import RolloutConfig, rollout
from causalize.rollout.streaming import Stream
from causalize.training.trainer import conditioning_kwargs
from causalize.world_model import WorldModel

ACTION_DIM = 3
NEW_PLANS = ["sana-video", "cosmos", "allegro", "latte", "mochi", "cogvideox"]
# CogVideoX-2b style: no RoPE, sincos positions added by the patch embedding
SINCOS = {"use_rotary_positional_embeddings": False}


def _world_model(name: str, seed: int = 0, **config) -> WorldModel:
    return tiny_world_model(name, action_dim=ACTION_DIM, seed=seed, **config)


def _context(wm: WorldModel, frames: int = 2, batch: int = 1, seed: int = 0) -> torch.Tensor:
    cond = wm.plan.conditioning
    samples = [
        wm.plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(seed + i))[cond.sample_arg]
        for i in range(batch)
    ]
    return torch.cat(samples)


def _actions(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, ACTION_DIM, generator=torch.Generator().manual_seed(seed))


def _both(wm, ctx, actions, **config):
    config = RolloutConfig(**{"steps": 2, "window": 4, "guidance_scale": 2.5, "eta": 0.5, "seed": 3, **config})
    streamed = rollout(wm, ctx, actions, config=config)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    return streamed, full


def _assert_exact(streamed, full):
    assert streamed.frames.abs().max() > 0.1
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)


def _assert_diverges(broken, full):
    assert (broken.frames - full.frames).abs().max() > 1e-3


def test_new_plans_declare_streaming():
    for name in NEW_PLANS:
        assert registries().plans.get(name).streaming is not None, name


# --- chunked history: calls of several frames at an offset > 0 ----------------------------------


def _chunked_vs_full(
    wm: WorldModel, chunks: list[int], batch: int = 1, model_kwargs=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """History written in `chunks` (several frames at offset > 0, which a rollout never does), then
    the current frame read: the output of every call equals the same frames of one full forward."""
    frames = sum(chunks) + 1
    axis = wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]
    out_axis = wm.plan.layout.output_axis
    sample = _context(wm, frames, batch, seed=4)
    ts = torch.full((batch, frames), 39, dtype=torch.long)
    ts[:, -1] = 700
    actions = _actions(frames, batch, seed=5)

    def kwargs(n):
        return conditioning_kwargs(wm.plan, wm.model, batch, n, model_kwargs)

    with torch.no_grad():
        full = wm(sample, ts, actions, **kwargs(frames))
        stream = Stream.of(wm.model, wm.plan)
        stream.reset()
        stream.anchor_timestep = 39
        pieces, start = [], 0
        for n in chunks:
            with stream.write(n):
                pieces.append(
                    wm(
                        sample.narrow(axis, start, n),
                        ts[:, start : start + n],
                        actions[:, start : start + n],
                        **kwargs(n),
                    )
                )
            start += n
        with stream.read():
            pieces.append(wm(sample.narrow(axis, start, 1), ts[:, start:], actions[:, start:], **kwargs(1)))
    return torch.cat(pieces, dim=out_axis), full


@pytest.mark.parametrize("name", NEW_PLANS + ["cogvideox-sincos"])
def test_chunked_history_equals_a_full_forward(name):
    wm = _world_model("cogvideox", **SINCOS) if name == "cogvideox-sincos" else _world_model(name)
    streamed, full = _chunked_vs_full(wm, [2, 2])
    assert full.abs().max() > 0.1
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


# --- Sana-Video: linear attention's running sums -------------------------------------------------


def test_sana_linear_attention_streams_its_running_sums():
    wm = _world_model("sana-video")
    ctx, actions = _context(wm), _actions(4)
    streamed, full = _both(wm, ctx, actions)
    _assert_exact(streamed, full)
    stream = Stream.of(wm.model, wm.plan)
    linear = [p for p in stream._processors if isinstance(p, StreamingLinearAttnProcessor)]
    assert len(linear) == wm.model.config.num_layers
    assert all(p.cache.nbytes() > 0 for p in linear)
    # negative control: the stock block-causal processor back in place (no running sums): each
    # call sees only its own frames
    for m in wm.model.modules():
        if isinstance(getattr(m, "processor", None), StreamingLinearAttnProcessor):
            m.set_processor(m.processor.causal)
    _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)


def test_sana_batch_of_two_streams():
    wm = _world_model("sana-video")
    streamed, full = _both(wm, _context(wm, batch=2), _actions(3, batch=2))
    _assert_exact(streamed, full)


# --- Mochi: one KV cache per sample ---------------------------------------------------------------


def test_mochi_batch_of_two_streams_with_per_sample_caches():
    wm = _world_model("mochi")
    ctx, actions = _context(wm, batch=2), _actions(3, batch=2)
    streamed, full = _both(wm, ctx, actions)
    _assert_exact(streamed, full)
    caches = [p.cache for p in Stream.of(wm.model, wm.plan)._processors]
    assert caches and all(isinstance(c, SampleKVCaches) and len(c.samples) == 2 for c in caches)
    # negative control: every sample reads sample 0's history
    original = SampleKVCaches.for_sample
    try:
        SampleKVCaches.for_sample = lambda self, index, write: original(self, 0 if not write else index, write)
        _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)
    finally:
        SampleKVCaches.for_sample = original


def test_mochi_samples_with_different_valid_text_lengths():
    """The per-sample loop keeps each sample's valid text: sample 0 has 11 valid tokens, sample 1 has 5."""
    wm = _world_model("mochi")
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, :11] = 1
    mask[1, :5] = 1
    text = torch.randn(2, 16, wm.model.config.text_embed_dim, generator=torch.Generator().manual_seed(9))
    prompt = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    streamed, full = _chunked_vs_full(wm, [2, 1], batch=2, model_kwargs=prompt)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    # and the two samples' text lengths do matter
    same, _ = _chunked_vs_full(wm, [2, 1], batch=2, model_kwargs={**prompt, "encoder_attention_mask": mask[[0, 0]]})
    assert (same[1] - streamed[1]).abs().max() > 1e-4


# --- Allegro: the video key-padding bias of history keys ------------------------------------------


def test_allegro_history_keys_keep_their_padding_bias():
    wm = _world_model("allegro")
    ctx, actions = _context(wm), _actions(4)
    streamed, full = _both(wm, ctx, actions)
    _assert_exact(streamed, full)
    assert any(p.cache.mask_columns is not None for p in Stream.of(wm.model, wm.plan)._processors)
    # negative control: cached keys treated as unpadded (every history column allowed)
    original = kv_cache._key_mask_columns
    try:
        kv_cache._key_mask_columns = lambda attn_mask, key_length: False
        _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)
    finally:
        kv_cache._key_mask_columns = original


@pytest.mark.parametrize("name", ["allegro", "cogvideox"])
def test_caller_rope_is_refused_in_streaming_calls(name):
    """RoPE its pipeline computes for a whole clip cannot be offset: a streaming call given it is
    refused; outside streaming the argument passes as before."""
    wm = _world_model(name)
    grid = wm.plan.tokens(wm.model, {"hidden_states": _context(wm, 1)})
    head_dim = wm.model.config.attention_head_dim
    if name == "allegro":
        # Allegro's format, ((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)): any non-None is refused
        rope = ((torch.zeros(1),) * 3, (torch.zeros(1),) * 3)
    else:
        rope = (torch.ones(grid.video_tokens, head_dim), torch.zeros(grid.video_tokens, head_dim))
    ctx = _context(wm)
    with pytest.raises(UsageError, match="image_rotary_emb"):
        rollout(wm, ctx, _actions(1), config=RolloutConfig(steps=1), model_kwargs={"image_rotary_emb": rope})
    if name == "cogvideox":  # identity rotation: the same frames as without it, outside streaming
        axis = wm.plan.layout.inputs["hidden_states"]
        sample = ctx.narrow(axis, 0, 1)
        kwargs = conditioning_kwargs(wm.plan, wm.model, 1, 1)
        with torch.no_grad():
            a = wm(sample, torch.tensor([[500]]), _actions(1), **kwargs)
            b = wm(sample, torch.tensor([[500]]), _actions(1), **kwargs, image_rotary_emb=rope)
        torch.testing.assert_close(a, b)


# --- Cosmos: RoPE and learnable absolute positions --------------------------------------------------


@pytest.mark.parametrize("module", ["learnable_pos_embed", "rope"])
def test_cosmos_positions_are_offset(module):
    wm = _world_model("cosmos")
    ctx, actions = _context(wm), _actions(3)
    streamed, full = _both(wm, ctx, actions, guidance_scale=1.0)
    _assert_exact(streamed, full)
    wm.model.get_submodule(module)._forward_hooks.clear()  # negative control: positions restart at 0
    _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)


def test_cosmos_without_learnable_positions_streams():
    wm = _world_model("cosmos", extra_pos_embed_type=None)
    streamed, full = _both(wm, _context(wm), _actions(3), guidance_scale=1.0)
    _assert_exact(streamed, full)


# --- Latte: the frame table, and 1-frame calls ------------------------------------------------------


def test_latte_single_frame_calls_get_their_frame_row():
    wm = _world_model("latte")
    ctx, actions = _context(wm, frames=1), _actions(4)  # a 1-frame prefill too
    streamed, full = _both(wm, ctx, actions, window=3)
    _assert_exact(streamed, full)
    wm.model.temporal_transformer_blocks[0]._forward_pre_hooks.clear()  # negative control
    _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)


def test_latte_streams_past_video_length():
    """Windows longer than the table (video_length = 4): rows come from the same sincos formula."""
    wm = _world_model("latte")
    assert wm.model.config.video_length == 4
    streamed, full = _both(wm, _context(wm), _actions(5), window=6, guidance_scale=1.0)
    _assert_exact(streamed, full)


# --- CogVideoX: sincos patch positions ------------------------------------------------------------


def test_cogvideox_sincos_positions_are_offset():
    wm = _world_model("cogvideox", **SINCOS)
    ctx, actions = _context(wm), _actions(5)
    streamed, full = _both(wm, ctx, actions)
    _assert_exact(streamed, full)
    embed = wm.model.patch_embed
    embed._forward_hooks.clear()
    embed._forward_pre_hooks.clear()  # negative control: positions restart at 0
    _assert_diverges(rollout(wm, ctx, actions, config=streamed.config), full)


def test_cogvideox_learned_positions_are_refused():
    wm = _world_model("cogvideox", use_learned_positional_embeddings=True)
    with pytest.raises(UsageError, match="learned position"):
        rollout(wm, _context(wm), _actions(1), config=RolloutConfig(steps=1))
    out = rollout(wm, _context(wm), _actions(1), config=RolloutConfig(steps=1, cache=False))
    assert torch.isfinite(out.frames).all()


@pytest.mark.parametrize("name", ["cogvideox-sincos", "latte"])
def test_position_hooks_are_inert_outside_streaming(name):
    wm = _world_model("cogvideox", **SINCOS) if name == "cogvideox-sincos" else _world_model(name)
    cond = wm.plan.conditioning
    for frames in (1, 3):
        inputs = wm.plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(5))
        sample = inputs.pop(cond.sample_arg)
        inputs.pop(cond.timestep_arg)
        ts = torch.tensor([[10, 500, 990][:frames]])
        with torch.no_grad():
            before = wm(sample, ts, _actions(frames), **inputs)
            Stream.of(wm.model, wm.plan)
            after = wm(sample, ts, _actions(frames), **inputs)
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_streaming_processors_are_installed_for_every_mixer():
    """Every causal mixer of the new plans got its streaming state."""
    for name in NEW_PLANS:
        wm = _world_model(name)
        stream = Stream.of(wm.model, wm.plan)
        kinds = {type(p) for p in stream._processors}
        expected = StreamingLinearAttnProcessor if name == "sana-video" else StreamingAttnProcessor
        assert kinds == {expected}, name


def test_plugin_hooks_install_once_and_follow_deep_copies():
    """A second Stream of the same model adds no second position hook; a deep copy of a streamed
    model streams through its own context (the hooks find it through the module, not a closure)."""
    import copy

    wm = _world_model("latte")
    Stream.of(wm.model, wm.plan)
    Stream(wm.model, wm.plan)
    assert len(wm.model.temporal_transformer_blocks[0]._forward_pre_hooks) == 1
    twin = copy.deepcopy(wm)
    streamed, full = _both(twin, _context(twin), _actions(3), guidance_scale=1.0)
    _assert_exact(streamed, full)
    assert Stream.of(twin.model, twin.plan) is not Stream.of(wm.model, wm.plan)
