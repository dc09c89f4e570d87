"""KV caches as preallocated buffers (METHOD.md §10): appending in pieces equals appending at once
(keys, values, frame ids, key-mask columns, boolean and additive), capacity grows keeping the
contents, buffers are reused when they suffice and across resets, bf16 stays bf16; attention
through the cache equals attention over the concatenated history (tiled for a guided call), with
no mask at all for a single-frame read; linear-attention sums are updated in place; and a bf16
streaming rollout stays close to full recomputation for a DiT and a UNet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from world_models import tiny_world_model

from causalize.context import TokenGrid
from causalize.errors import CausalizeError
from causalize.layout import causal_block_allowed
from causalize.modules import kv_cache
from causalize.modules.kv_cache import CallTokens, KVCache, attend_with_cache, frame_tokens, grid_tokens
from causalize.modules.linear_attention import LinearAttnCache, LinearAttnState, StreamingLinearAttnProcessor
from causalize.modules.streaming_attention import SampleKVCaches
from causalize.rollout import RolloutConfig, rollout
from causalize.rollout.streaming import Stream

HEADS, DK, DV = 3, 4, 5


def _kv(n: int, batch: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, n, DK, generator=g).to(dtype),
        torch.randn(batch, HEADS, n, DV, generator=g).to(dtype),
    )


def _columns(n: int, kind: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    keep = torch.rand(batch, 1, 1, n, generator=torch.Generator().manual_seed(seed)) > 0.3
    return keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


def _assert_same(a: KVCache, b: KVCache) -> None:
    assert a.length == b.length
    for name in ("key", "value", "frame_ids", "mask_columns"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


# --- buffers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, "bool", "additive"])
def test_appending_in_pieces_equals_appending_at_once(kind):
    k, v = _kv(10)
    ids = torch.arange(10)
    cols = None if kind is None else _columns(10, kind)
    whole = KVCache()
    whole.append(k, v, ids, cols)
    pieces = KVCache()
    for a, b in ((0, 3), (3, 4), (4, 10)):
        pieces.append(k[..., a:b, :], v[..., a:b, :], ids[a:b], None if cols is None else cols[..., a:b])
    _assert_same(pieces, whole)
    assert torch.equal(whole.key, k) and torch.equal(whole.value, v)


def test_mask_columns_arriving_late_or_of_the_other_kind():
    """Keys written without a mask count as allowed; boolean columns followed by additive ones are
    stored additive (0 / −inf), as one additive mask over the whole history would be."""
    k, v = _kv(6)
    late = KVCache()
    late.append(k[..., :2, :], v[..., :2, :], torch.arange(2))
    late.append(k[..., 2:, :], v[..., 2:, :], torch.arange(2, 6), _columns(4, "bool"))
    assert late.mask_columns.dtype == torch.bool
    assert late.mask_columns[..., :2].all() and torch.equal(
        late.mask_columns[..., 2:], _columns(4, "bool").expand(2, 1, 1, 4)
    )
    mixed = KVCache()
    mixed.append(k[..., :3, :], v[..., :3, :], torch.arange(3), _columns(3, "bool", seed=1))
    mixed.append(k[..., 3:, :], v[..., 3:, :], torch.arange(3, 6), _columns(3, "additive", seed=2))
    expected = torch.cat([_columns(3, "additive", seed=1), _columns(3, "additive", seed=2)], dim=-1)
    assert mixed.mask_columns.dtype == torch.float32 and torch.equal(mixed.mask_columns, expected)
    # columns shared by the batch (lead 1) widen to per-sample columns when those arrive
    shared = KVCache()
    shared.append(k[..., :2, :], v[..., :2, :], torch.arange(2), torch.ones(1, 1, 1, 2, dtype=torch.bool))
    shared.append(k[..., 2:, :], v[..., 2:, :], torch.arange(2, 6), _columns(4, "bool"))
    assert shared.mask_columns.shape == (2, 1, 1, 6) and shared.mask_columns[..., :2].all()


def test_capacity_grows_and_keeps_the_contents():
    k, v = _kv(40)
    cache = KVCache()
    capacities = []
    for a in range(0, 40, 4):
        cache.append(k[..., a : a + 4, :], v[..., a : a + 4, :], torch.arange(a, a + 4), _columns(4, "bool", seed=a))
        capacities.append(cache.capacity)
        assert torch.equal(cache.key, k[..., : a + 4, :]) and torch.equal(cache.value, v[..., : a + 4, :])
        assert torch.equal(cache.frame_ids, torch.arange(a + 4))
    assert capacities[0] == 4 and capacities[-1] >= 40
    growths = len(set(capacities)) - 1
    assert growths <= math.ceil(math.log(40 / 4, kv_cache.GROWTH))  # geometric, not one per append
    expected = torch.cat([_columns(4, "bool", seed=a) for a in range(0, 40, 4)], dim=-1)
    assert torch.equal(cache.mask_columns, expected)


def test_no_reallocation_when_the_capacity_suffices():
    k, v = _kv(12)
    cache = KVCache()
    cache.reserve(16)
    cache.append(k[..., :4, :], v[..., :4, :], torch.arange(4))
    assert cache.capacity == 16
    pointers = (cache._key.data_ptr(), cache._value.data_ptr(), cache._ids.data_ptr())
    cache.append(k[..., 4:12, :], v[..., 4:12, :], torch.arange(4, 12))
    keys, values, in_place = cache.joined(*_kv(4, seed=1))  # a call's own keys after the history
    assert in_place and keys.shape[-2] == 16
    assert (cache._key.data_ptr(), cache._value.data_ptr(), cache._ids.data_ptr()) == pointers
    assert keys.data_ptr() == pointers[0] and values.data_ptr() == pointers[1]
    assert torch.equal(keys[..., :12, :], k) and torch.equal(keys[..., 12:, :], _kv(4, seed=1)[0])
    assert cache.length == 12  # joined does not commit


def test_reset_reuses_the_buffers():
    k, v = _kv(8)
    cache = KVCache()
    cache.append(k, v, torch.arange(8), _columns(8, "additive"))
    pointers = (cache._key.data_ptr(), cache._value.data_ptr(), cache._columns.data_ptr())
    nbytes = cache.nbytes()
    cache.reset()
    assert cache.length == 0 and cache.key is None and cache.mask_columns is None and cache.batch is None
    assert cache.nbytes() == nbytes  # held, not released
    k2, v2 = _kv(8, seed=3)
    cache.append(k2, v2, torch.arange(8), _columns(8, "additive", seed=3))
    assert (cache._key.data_ptr(), cache._value.data_ptr(), cache._columns.data_ptr()) == pointers
    assert torch.equal(cache.key, k2) and torch.equal(cache.mask_columns, _columns(8, "additive", seed=3))
    cache.reset()
    cache.append(k2[..., :2, :], v2[..., :2, :], torch.arange(2))  # no mask this time
    assert cache.mask_columns is None
    cache.reset()
    cache.append(*_kv(3, batch=1), torch.arange(3))  # another batch after a reset: new buffers
    assert cache.batch == 1 and cache.key.shape == (1, HEADS, 3, DK)


def test_bf16_buffers_stay_bf16():
    k, v = _kv(6, dtype=torch.bfloat16)
    cols = _columns(6, "additive").to(torch.bfloat16)
    cache = KVCache()
    cache.append(k[..., :2, :], v[..., :2, :], torch.arange(2), cols[..., :2])
    cache.append(k[..., 2:, :], v[..., 2:, :], torch.arange(2, 6), cols[..., 2:])
    assert cache._key.dtype == cache._value.dtype == cache.mask_columns.dtype == torch.bfloat16
    assert torch.equal(cache.key, k) and torch.equal(cache.mask_columns, cols)
    keys, _, _ = cache.joined(*_kv(2, dtype=torch.bfloat16, seed=1))
    assert keys.dtype == torch.bfloat16
    # bf16 keys into a cache allocated in float32 (e.g. the model cast between windows): bf16 buffers
    cache.reset()
    cache.append(*_kv(2), torch.arange(2))
    cache.reset()
    cache.append(k, v, torch.arange(6))
    assert cache._key.dtype == torch.bfloat16


def test_batch_mismatch_is_refused():
    cache = KVCache()
    cache.append(*_kv(3, batch=2), torch.arange(3))
    with pytest.raises(CausalizeError, match="history written with batch 1, the cache holds batch 2"):
        cache.append(*_kv(1, batch=1), torch.arange(3, 4))
    call = frame_tokens(1, 3, "cpu")
    q, k, v = (torch.randn(3, HEADS, 1, DK) for _ in range(3))
    with pytest.raises(CausalizeError, match="batch 3 cannot share"):
        attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, False, q, k, v)


def test_sample_caches_reset_and_follow_the_batch():
    caches = SampleKVCaches()
    caches.prepare_write(3)
    for i in range(3):
        caches.for_sample(i, True).append(*_kv(2, batch=1, seed=i), torch.arange(2))
    kept = caches.samples[0]
    caches.reset()
    assert caches.length == 0 and caches.samples[0] is kept
    caches.prepare_write(2)  # a window of fewer samples: reads tile over 2, not 3
    assert len(caches.samples) == 2
    with pytest.raises(CausalizeError, match="history written with batch"):
        caches.for_sample(0, True).append(*_kv(1, batch=1), torch.arange(1))
        caches.prepare_write(3)


# --- attention through the cache --------------------------------------------------------------


def _reference(query, key, value, hist_k, hist_v, hist_ids, ids, own_mask=None, hist_cols=None, block_size=1):
    """The streaming attention written out: the history tiled to the call's batch, concatenated
    with the call's keys, masked by global frame index and by the model's own key mask."""
    reps = query.shape[0] // hist_k.shape[0]
    keys = torch.cat([hist_k.repeat(reps, 1, 1, 1), key], dim=-2)
    values = torch.cat([hist_v.repeat(reps, 1, 1, 1), value], dim=-2)
    allowed = causal_block_allowed(ids, torch.cat([hist_ids, ids]), block_size)
    if own_mask is None and hist_cols is None:
        return F.scaled_dot_product_attention(query, keys, values, allowed)
    own = own_mask if own_mask is not None else torch.ones(1, 1, 1, key.shape[-2], dtype=torch.bool)
    hist = (
        hist_cols.repeat(reps, 1, 1, 1)
        if hist_cols is not None
        else torch.ones(1, 1, 1, hist_k.shape[-2], dtype=torch.bool)
    )
    lead = torch.broadcast_shapes(hist.shape[:-1], own.shape[:-1])
    cols = torch.cat([hist.expand(*lead, hist.shape[-1]), own.expand(*lead, own.shape[-1])], dim=-1)
    return F.scaled_dot_product_attention(query, keys, values, cols & allowed)


def _spy():
    masks = []

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        masks.append(attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, *args, **kwargs)

    return sdpa, masks


def _history(cache: KVCache, frames: int, per_frame: int, seed: int = 0, columns: bool = False):
    """Write `frames` frames (batch 1) into `cache` through attend_with_cache, as a prefill does."""
    grid = TokenGrid(frames, per_frame)
    call = grid_tokens(grid, 0, "none", 0, "cpu")
    q, k, v = (
        torch.randn(1, HEADS, frames * per_frame, DK, generator=torch.Generator().manual_seed(seed + i))
        for i in range(3)
    )
    cols = _columns(frames * per_frame, "bool", batch=1, seed=seed) if columns else None
    attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, True, q, k, v, cols)
    return k, v, call.ids, cols


@pytest.mark.parametrize("guided", [False, True])
def test_a_single_frame_read_needs_no_mask_and_equals_the_reference(guided):
    cache = KVCache()
    hk, hv, hids, _ = _history(cache, 3, 4)
    batch = 2 if guided else 1
    q, k, v = (torch.randn(batch, HEADS, 4, DK, generator=torch.Generator().manual_seed(9 + i)) for i in range(3))
    call = grid_tokens(TokenGrid(1, 4), 0, "none", 3, "cpu")
    sdpa, masks = _spy()
    out = attend_with_cache(sdpa, cache, call, 1, False, q, k, v)
    assert masks == [None] * batch  # one call per guidance branch, no mask
    torch.testing.assert_close(out, _reference(q, k, v, hk, hv, hids, call.ids), rtol=0, atol=1e-6)
    assert cache.length == 12  # reads do not write


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_context_rows_see_only_context(position):
    """A joint call (text tokens in the sequence): the text rule needs a mask, built once per
    (layout, history length) and reused by the next call."""
    cache = KVCache()
    grid = TokenGrid(2, 3)
    call = grid_tokens(grid, 2, position, 0, "cpu")
    q, k, v = (torch.randn(1, HEADS, 8, DK, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, True, q, k, v)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, causal_block_allowed(call.ids, call.ids)), rtol=0, atol=1e-6
    )
    video = call.ids >= 0
    assert torch.equal(cache.key, k[..., video, :]) and torch.equal(cache.frame_ids, call.ids[video])
    read = grid_tokens(TokenGrid(1, 3), 2, position, 2, "cpu")
    q2, k2, v2 = (torch.randn(2, HEADS, 5, DK, generator=torch.Generator().manual_seed(5 + i)) for i in range(3))
    sdpa, masks = _spy()
    out = attend_with_cache(sdpa, cache, read, 1, False, q2, k2, v2)
    torch.testing.assert_close(
        out, _reference(q2, k2, v2, k[..., video, :], v[..., video, :], call.ids[video], read.ids), rtol=0, atol=1e-6
    )
    attend_with_cache(sdpa, cache, read, 1, False, q2, k2, v2)
    assert masks[0] is not None and all(m is masks[0] for m in masks)  # one mask, reused


def test_history_key_columns_and_a_write_after_a_read():
    """Allegro-style key-padding masks: the cached keys keep their columns; a single-frame write
    after reads appends in place, and a read after it sees the new frame."""
    cache = KVCache()
    hk, hv, hids, hcols = _history(cache, 2, 3, columns=True)
    call = grid_tokens(TokenGrid(1, 3), 0, "none", 2, "cpu")
    q, k, v = (torch.randn(2, HEADS, 3, DK, generator=torch.Generator().manual_seed(7 + i)) for i in range(3))
    own = _columns(3, "bool", batch=2, seed=8)
    out = attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, False, q, k, v, own)
    torch.testing.assert_close(out, _reference(q, k, v, hk, hv, hids, call.ids, own, hcols), rtol=0, atol=1e-6)
    # the current frame becomes history (batch 1), then the next frame reads it
    attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, True, q[:1], k[:1], v[:1], own[:1])
    assert cache.length == 9 and torch.equal(cache.key[..., 6:, :], k[:1])
    assert torch.equal(cache.mask_columns[..., 6:], own[:1])
    nxt = grid_tokens(TokenGrid(1, 3), 0, "none", 3, "cpu")
    out = attend_with_cache(F.scaled_dot_product_attention, cache, nxt, 1, False, q, k, v)
    ref = _reference(
        q,
        k,
        v,
        torch.cat([hk, k[:1]], -2),
        torch.cat([hv, v[:1]], -2),
        torch.cat([hids, call.ids]),
        nxt.ids,
        None,
        torch.cat([hcols, own[:1]], -1),
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "flex"])
def test_a_prefill_runs_through_the_block_causal_executor(backend):
    """A write over several frames (the prefill, and an append at an offset) goes through the
    project's block-causal execution: chunked SDPA calls without a mask, or compiled flex; the
    same result as the dense mask, and the same cache."""
    from causalize.modules import attention_exec

    if backend == "flex" and not attention_exec.flex_status("cpu")[0]:
        pytest.skip("no CPU flex kernel here")
    caches = {}
    outs = {}
    for name in ("dense", backend):
        cache = caches[name] = KVCache()
        sdpa, masks = _spy()
        with attention_exec.attention_backend(name):
            got = []
            for frames, offset, seed in ((3, 0, 0), (2, 3, 10)):
                call = grid_tokens(TokenGrid(frames, 4), 0, "none", offset, "cpu")
                q, k, v = (
                    torch.randn(1, HEADS, frames * 4, 16, generator=torch.Generator().manual_seed(seed + i))
                    for i in range(3)
                )
                got.append(attend_with_cache(sdpa, cache, call, 1, True, q, k, v))
        outs[name] = got
        if name == "chunked":
            assert masks and all(m is None for m in masks)  # one call per frame, no mask
        elif name == "dense":
            assert all(m is not None for m in masks)
    for a, b in zip(outs["dense"], outs[backend]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _assert_same(caches["dense"], caches[backend])


def test_bare_frame_ids_and_history_order():
    cache = KVCache()
    _history(cache, 2, 2)
    q, k, v = (torch.randn(1, HEADS, 2, DK) for _ in range(3))
    attend_with_cache(F.scaled_dot_product_attention, cache, torch.tensor([2, 2]), 1, False, q, k, v)  # from ids
    with pytest.raises(CausalizeError, match="must precede"):
        attend_with_cache(F.scaled_dot_product_attention, cache, torch.tensor([1, 1]), 1, False, q, k, v)
    with pytest.raises(CausalizeError, match="is_causal"):
        attend_with_cache(
            F.scaled_dot_product_attention, cache, torch.tensor([2, 2]), 1, False, q, k, v, None, 0.0, True
        )


def test_gradients_flow_through_the_current_call():
    """With gradients enabled the history is concatenated (no in-place buffer writes under autograd)."""
    cache = KVCache()
    hk, hv, hids, _ = _history(cache, 2, 2)
    q, k, v = (torch.randn(1, HEADS, 2, DK, requires_grad=True) for _ in range(3))
    call = grid_tokens(TokenGrid(1, 2), 0, "none", 2, "cpu")
    out = attend_with_cache(F.scaled_dot_product_attention, cache, call, 1, False, q, k, v)
    out.sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0
    torch.testing.assert_close(out, _reference(q, k, v, hk, hv, hids, call.ids), rtol=0, atol=1e-6)


def test_structure_masks_and_call_tokens_are_shared():
    grid = TokenGrid(3, 4)
    a = grid_tokens(grid, 0, "none", 2, "cpu")
    assert grid_tokens(grid, 0, "none", 2, "cpu") is a
    assert a.ids.tolist() == [2] * 4 + [3] * 4 + [4] * 4 and (a.frames, a.first_frame, a.per_frame) == (3, 2, 4)
    s1 = kv_cache._structure(a, 8, 1)
    assert kv_cache._structure(a, 8, 1) is s1 and s1.shape == (12, 20) and s1[:, :8].all()
    assert kv_cache._structure(grid_tokens(TokenGrid(1, 4), 0, "none", 5, "cpu"), 20, 1) is None
    # one block of two frames needs no mask either; a block boundary inside the call does
    assert kv_cache._structure(grid_tokens(TokenGrid(2, 4), 0, "none", 4, "cpu"), 8, 2) is None
    assert kv_cache._structure(grid_tokens(TokenGrid(2, 4), 0, "none", 3, "cpu"), 8, 2) is not None
    assert CallTokens.from_ids(torch.tensor([-1, -1, 4, 4, 5, 5])).video_start == 2


# --- linear attention -------------------------------------------------------------------------


def test_linear_attention_sums_are_updated_in_place():
    cache = LinearAttnCache()
    g = torch.Generator().manual_seed(0)
    first = LinearAttnState(torch.randn(1, 2, 3, 3, generator=g), torch.randn(1, 2, 3, generator=g))
    cache.store(first, 2)
    pointers = (cache.state.kv.data_ptr(), cache.state.ksum.data_ptr())
    stacked = torch.randn(1, 2, 4, 3, 3, generator=g)  # a call's prefix stack: the state is its last entry
    cache.store(LinearAttnState(stacked[:, :, -1], stacked[:, :, -1, 0]), 1)
    assert (cache.state.kv.data_ptr(), cache.state.ksum.data_ptr()) == pointers
    assert torch.equal(cache.state.kv, stacked[:, :, -1]) and cache.frames == 3
    cache.reset()
    assert cache.state is None and cache.frames == 0 and cache.nbytes() > 0
    with pytest.raises(CausalizeError, match="history written with batch 2"):
        cache.store(LinearAttnState(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3)), 1)
        cache.store(LinearAttnState(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3)), 1)


# --- rollouts ---------------------------------------------------------------------------------


def _rollout_pair(wm, frames: int = 4, **config):
    cond = wm.plan.conditioning
    dtype = next(wm.parameters()).dtype
    ctx = wm.plan.make_inputs(wm.model, 2, torch.Generator().manual_seed(0))[cond.sample_arg].to(dtype)
    actions = torch.randn(1, frames, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(**{"steps": 3, "window": 4, "guidance_scale": 2.5, "seed": 3, **config})
    streamed = rollout(wm, ctx, actions, config=config)
    full = rollout(wm, ctx, actions, config=RolloutConfig(**{**config.to_json(), "cache": False}))
    return streamed, full


def test_a_second_rollout_reuses_every_buffer():
    wm = tiny_world_model("wan", action_dim=3)
    _rollout_pair(wm)
    stream = Stream.of(wm.model, wm.plan)
    caches = [p.cache for p in stream._processors]
    pointers = [(c._key.data_ptr(), c._value.data_ptr()) for c in caches]
    streamed, full = _rollout_pair(wm)
    assert [(c._key.data_ptr(), c._value.data_ptr()) for c in caches] == pointers
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)


# bf16: streaming and full recomputation run different kernels on different shapes (a one-frame
# call, batch 1 history against batch 2 reads), each rounding to 8 bits of mantissa, and 3 guided
# DDIM steps over 4 frames amplify that. Tolerance, relative to the frame scale s = mean |full|:
# mean |streamed − full| <= 1% of s for the DiT (exact on CPU), <= 5% of s for the UNet (about 3%
# on CPU: its bf16 convs change algorithm with the batch); max <= 25% of max |full|. Breaking the
# caches gives 3–50% (RoPE offsets / conv buffers dropped), see the fp32 negative controls.
@pytest.mark.parametrize("name,mean_tol", [("wan", 0.01), ("unet3d", 0.05)])
def test_bf16_streaming_stays_close_to_full_recomputation(name, mean_tol):
    wm = tiny_world_model(name, action_dim=3).to(torch.bfloat16)
    streamed, full = _rollout_pair(wm)
    assert streamed.frames.dtype == full.frames.dtype == torch.bfloat16
    s, f = streamed.frames.float(), full.frames.float()
    scale = f.abs().mean()
    assert scale > 0.1
    assert (s - f).abs().mean() <= mean_tol * scale
    assert (s - f).abs().max() <= 0.25 * f.abs().max()
    caches = [p.cache for p in Stream.of(wm.model, wm.plan)._processors]
    assert caches and all(c._key.dtype == torch.bfloat16 for c in caches)


def test_linear_attention_cache_holds_only_the_running_sums():
    """Sana-Video: the stored sums are copies (a view would keep every call's prefix stack alive)."""
    wm = tiny_world_model("sana-video", action_dim=3)
    streamed, full = _rollout_pair(wm, frames=3)
    torch.testing.assert_close(streamed.frames, full.frames, rtol=0, atol=1e-5)
    linear = [p for p in Stream.of(wm.model, wm.plan)._processors if isinstance(p, StreamingLinearAttnProcessor)]
    for p in linear:
        kv = p.cache.state.kv
        assert kv.untyped_storage().nbytes() == kv.numel() * kv.element_size()
