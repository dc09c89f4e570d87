"""The three executions of block-causal attention (dense, chunked, compiled flex) and their selection.

Chunked and flex must give the dense results (up to float rounding) for every layout the
processors produce — context prefix / suffix, block sizes, key-padding masks (bool and additive),
full masks, batch > 1, GQA — and stay exactly causal on every registered DiT plan. The compiled
flex tests are few (one compile is seconds to tens of seconds on CPU) and marked slow.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from causalize.api import convert_model, example_inputs, verify_model
from causalize.context import FrameContext, TokenGrid
from causalize.errors import CausalizeError, UsageError
from causalize.modules import attention_exec as ae
from causalize.modules.block_attention import BlockCausalAttnProcessor, block_causal_mask, token_frame_ids
from causalize.plugin_manager import registries
from causalize.verify.influence import rerandomize_zero_params

ORIGINAL_SDPA = F.scaled_dot_product_attention
PROCESSOR_PLANS = [
    n for n in registries().plans.names() if "block-causal-attention" in registries().plans.get(n).targets
]


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch):
    """Every test starts from auto, and leaves no override behind."""
    monkeypatch.delenv(ae.ENV_VAR, raising=False)
    ae.set_attention_backend(None)
    yield
    ae.set_attention_backend(None)


def _executions(path: str) -> int:
    return ae.describe("cpu")["executions"].get(path, 0)


# --- selection -----------------------------------------------------------------------------------


def test_auto_on_cpu_is_dense_for_short_and_chunked_for_long_sequences():
    assert ae.active_backend("cpu") == "dense"
    assert ae.active_backend("cpu", ae.DENSE_MAX_TOKENS) == "dense"
    assert ae.active_backend("cpu", ae.DENSE_MAX_TOKENS + 1) == "chunked"


def test_auto_on_cuda_is_flex_when_it_can_run(monkeypatch):
    monkeypatch.setattr(ae, "flex_status", lambda device: (True, "test"))
    assert ae.active_backend("cuda", 25_472) == "flex"
    assert ae.active_backend("cuda", ae.FLEX_MIN_TOKENS - 1) == "chunked"  # not worth a compile
    monkeypatch.setattr(ae, "flex_status", lambda device: (False, "no triton"))
    assert ae.active_backend("cuda", 25_472) == "chunked"
    assert "no triton" in ae._resolve("cuda", 25_472)[1]


def test_env_var_then_api_then_context_manager(monkeypatch):
    monkeypatch.setenv(ae.ENV_VAR, " Chunked ")
    assert ae.active_backend("cpu") == "chunked"
    assert ae.describe("cpu")["source"] == f"environment variable {ae.ENV_VAR}"
    ae.set_attention_backend("dense")  # the API wins over the environment
    assert ae.active_backend("cpu") == "dense" and ae.requested_backend() == ("dense", "set_attention_backend")
    assert ae.environment_backend() == "chunked"  # what a launcher passes on to its child
    with pytest.raises(RuntimeError, match="boom"):
        with ae.attention_backend("flex"):
            assert ae.active_backend("cpu") == "flex"
            raise RuntimeError("boom")
    assert ae.active_backend("cpu") == "dense"  # restored on error
    ae.set_attention_backend(None)
    assert ae.active_backend("cpu") == "chunked"


def test_bad_backend_names_are_one_line_usage_errors(monkeypatch):
    monkeypatch.setenv(ae.ENV_VAR, "fast")
    with pytest.raises(UsageError) as err:
        ae.active_backend("cpu")
    message = str(err.value)
    assert "\n" not in message and ae.ENV_VAR in message and "'fast'" in message
    assert all(name in message for name in ae.BACKENDS)
    monkeypatch.delenv(ae.ENV_VAR)
    with pytest.raises(UsageError, match="auto, flex, chunked, dense"):
        ae.set_attention_backend("sdpa")
    with pytest.raises(UsageError):
        with ae.attention_backend("xformers"):
            pass
    assert ae.requested_backend() == ("auto", "default") and ae.environment_backend() is None


def test_describe_says_what_runs_and_why():
    info = ae.describe("cpu")
    assert info["device"] == "cpu" and info["requested"] == "auto" and info["source"] == "default"
    assert info["backend"] == "dense" and "dense mask" in info["reason"]
    assert isinstance(info["flex_available"], bool) and info["flex_note"]
    with ae.attention_backend("chunked"):
        assert ae.describe("cpu")["backend"] == "chunked"


def test_explicit_flex_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(ae, "flex_status", lambda device: (False, "no kernel here"))
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(CausalizeError, match="no kernel here"):
        ae.block_causal_attention(q, q, q, torch.tensor([0, 0, 1, 1]), backend="flex")
    ae.set_attention_backend("auto")  # auto falls back instead
    assert ae.block_causal_attention(q, q, q, torch.tensor([0, 0, 1, 1])).shape == q.shape


def test_flex_runs_chunked_for_inputs_it_cannot_take():
    """No compile needed: the fallback happens before the kernel (CPU flex has no backward)."""
    fid = token_frame_ids(TokenGrid(2, 3))
    q = torch.randn(1, 1, 6, 16, requires_grad=True)
    before = _executions("chunked")
    out = ae.block_causal_attention(q, q, q, fid, backend="flex")
    assert _executions("chunked") == before + 1
    out.sum().backward()
    assert q.grad is not None
    p = q.detach()
    assert (
        ae.flex_unsupported(p, p, p, torch.ones(1, 1, 6, 6, dtype=torch.bool))
        == "the model's own mask is not a key mask"
    )
    assert ae.flex_unsupported(p[0], p[0], p[0], None) is not None  # 3-D
    assert ae.flex_unsupported(p, p, p, torch.ones(1, 6, dtype=torch.bool)) is None  # a (1, L) key mask


def test_a_flex_compile_failure_under_auto_falls_back_and_under_flex_is_an_error(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(ae, "_flex", broken)
    monkeypatch.setattr(ae._Selection, "flex_broken", None)
    monkeypatch.setattr(ae, "_WARNED", set())
    fid = token_frame_ids(TokenGrid(2, 3))
    q = torch.randn(1, 1, 6, 16)
    with pytest.raises(CausalizeError, match="no kernel for you"):
        ae.block_causal_attention(q, q, q, fid, backend="flex")
    monkeypatch.setattr(ae, "active_backend", lambda device, length=None: "flex")  # what auto picks on CUDA
    with pytest.warns(RuntimeWarning, match="using chunked SDPA"):
        out = ae.block_causal_attention(q, q, q, fid)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=block_causal_mask(fid)))
    assert not ae.flex_status("cpu")[0] and "no kernel for you" in ae.flex_status("cpu")[1]  # off for the process


# --- chunked (and dense) equal the reference ----------------------------------------------------


def _reference(q, k, v, fid, block, csv, mask, **kw):
    allowed = block_causal_mask(fid, block, csv)  # the definition (tests/test_joint_text_rule.py)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ae.combine_masks(mask, allowed), **kw)


def _model_mask(kind: str, fid: torch.Tensor, batch: int, heads: int, gen, dtype=torch.float32):
    """A mask the model itself might pass; every query row keeps a key (frame 0 and the first
    context token are never masked)."""
    n = fid.numel()
    protect = fid == 0
    protect[(fid < 0).nonzero()[:1, 0]] = True
    if kind == "none":
        return None
    if kind in ("key-bool", "key-bool-3d", "key-bool-2d", "key-additive"):
        keep = (torch.rand(batch, n, generator=gen) > 0.3) | protect
        if kind == "key-bool":
            return keep[:, None, None, :]
        if kind == "key-bool-3d":
            return keep[:, None, :]  # (B, 1, L): the leading dim broadcasts against heads, so B must be 1 or H
        if kind == "key-bool-2d":
            return keep[:1]  # (1, L)
        bias = torch.zeros(1, heads, 1, n, dtype=dtype)
        return bias.masked_fill(torch.rand(1, heads, 1, n, generator=gen) < 0.3, -10000.0)  # Allegro-style, per head
    full = (torch.rand(batch, 1, n, n, generator=gen) > 0.3) | torch.eye(n, dtype=torch.bool)
    if kind == "full-bool":
        return full
    return torch.zeros(full.shape, dtype=dtype).masked_fill(~full, float("-inf"))


layouts = st.fixed_dictionaries(
    {
        "frames": st.integers(1, 5),
        "per_frame": st.integers(1, 6),
        "context": st.integers(0, 6),
        "position": st.sampled_from(["prefix", "suffix"]),
        "block": st.integers(1, 3),
        "csv": st.booleans(),
        "batch": st.integers(1, 2),
        "heads": st.sampled_from([1, 2, 4]),
        "gqa": st.booleans(),
        "mask": st.sampled_from(
            ["none", "key-bool", "key-bool-3d", "key-bool-2d", "key-additive", "full-bool", "full-additive"]
        ),
        "scale": st.sampled_from([None, 0.3]),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=120, deadline=None)
@given(case=layouts)
def test_chunked_and_dense_equal_the_reference(case):
    c = case
    fid = token_frame_ids(
        TokenGrid(c["frames"], c["per_frame"]), c["context"], c["position"] if c["context"] else "none"
    )
    n, gen = fid.numel(), torch.Generator().manual_seed(c["seed"])
    kv_heads = 1 if c["gqa"] else c["heads"]
    q = torch.randn(c["batch"], c["heads"], n, 8, generator=gen)
    k, v = (torch.randn(c["batch"], kv_heads, n, 8, generator=gen) for _ in range(2))
    mask = _model_mask(c["mask"], fid, c["batch"] if c["mask"] != "key-bool-3d" else 1, c["heads"], gen)
    kw = {"scale": c["scale"], "enable_gqa": c["gqa"]}
    expected = _reference(q, k, v, fid, c["block"], c["csv"], mask, **kw)
    for backend in ("chunked", "dense"):
        got = ae.block_causal_attention(
            q, k, v, fid, block_size=c["block"], context_sees_video=c["csv"], attn_mask=mask, backend=backend, **kw
        )
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    lq=st.integers(1, 24),
    lk=st.integers(1, 24),
    frames=st.integers(1, 4),
    block=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_chunked_takes_any_frame_ids(lq, lk, frames, block, seed):
    """Unordered ids and Lq != Lk (e.g. cached history keys before the call's own): the key order
    and the query runs come from the ids themselves."""
    gen = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(-1, frames, (lq,), generator=gen)
    k_ids = torch.randint(-1, frames, (lk,), generator=gen)
    k_ids[torch.randint(0, lk, (1,), generator=gen)] = -1  # every query row sees a context key
    q = torch.randn(2, 2, lq, 8, generator=gen)
    k, v = (torch.randn(2, 2, lk, 8, generator=gen) for _ in range(2))
    allowed = ae.block_ids(k_ids, block)[None, :] <= ae.block_ids(q_ids, block, queries=True)[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = ae.block_causal_attention(q, k, v, q_ids, k_ids, block_size=block, backend="chunked")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_bf16_chunked_stays_within_rounding_of_dense(position):
    fid = token_frame_ids(TokenGrid(4, 24), 9, position)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, fid.numel(), 32, generator=gen) for _ in range(3))
    mask = _model_mask("key-bool", fid, 2, 3, gen)
    exact = _reference(q, k, v, fid, 2, False, mask)
    low = [t.bfloat16() for t in (q, k, v)]
    for backend in ("chunked", "dense"):
        got = ae.block_causal_attention(*low, fid, block_size=2, attn_mask=mask, backend=backend)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), exact, rtol=3e-2, atol=3e-2)
    chunked, dense = (
        ae.block_causal_attention(*low, fid, block_size=2, attn_mask=mask, backend=b).float()
        for b in ("chunked", "dense")
    )
    assert (chunked - dense).abs().max() < 3e-2


def test_chunked_is_exactly_causal_and_a_broken_boundary_is_not(monkeypatch):
    """Later keys are not in an earlier block's computation at all: moving them changes nothing,
    bit for bit. Letting each run see one key too many breaks that."""
    fid = token_frame_ids(TokenGrid(3, 5), 4, "suffix")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, fid.numel(), 8, generator=gen) for _ in range(3))
    later = fid == 2
    k2, v2 = k.clone(), v.clone()
    k2[..., later, :] += 5
    v2[..., later, :] -= 5
    earlier = (fid >= 0) & (fid < 2) | (fid < 0)

    def run(key, value):
        return ae.block_causal_attention(q, key, value, fid, backend="chunked", layout_key="exact-test")

    assert torch.equal(run(k, v)[..., earlier, :], run(k2, v2)[..., earlier, :])
    ae._reset_caches()
    real_init = ae._Layout.__init__

    def one_key_too_many(self, *args):
        real_init(self, *args)
        self.runs = tuple((s, e, min(n + 1, self.lk)) for s, e, n in self.runs)

    monkeypatch.setattr(ae._Layout, "__init__", one_key_too_many)
    try:
        assert not torch.equal(run(k, v)[..., earlier, :], run(k2, v2)[..., earlier, :])
    finally:
        ae._reset_caches()


def test_dropout_and_is_causal_run_dense():
    fid = token_frame_ids(TokenGrid(2, 3))
    q = torch.randn(1, 1, 6, 8)
    before = _executions("dense")
    out = ae.block_causal_attention(q, q, q, fid, is_causal=True, backend="chunked")
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=block_causal_mask(fid) & tril))
    assert _executions("dense") == before + 1


def test_tile_block_mask_equals_create_block_mask():
    """The BlockMask built per tile (no (L, L) tensor) is the one flex would build from the mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(0)
    for frames, per_frame, context, position, block, csv in [
        (5, 40, 11, "prefix", 2, False),
        (2, 130, 77, "suffix", 1, True),
        (7, 33, 0, "none", 3, False),
        (3, 128, 128, "prefix", 1, False),
    ]:
        fid = token_frame_ids(TokenGrid(frames, per_frame), context, position)
        n = fid.numel()
        for keep in (None, torch.rand(2, 1, n, generator=gen) > 0.4, torch.rand(1, 3, n, generator=gen) > 0.9):
            ours = ae.build_block_mask(
                ae.block_ids(fid, block, queries=True, context_sees_video=csv), ae.block_ids(fid, block), keep
            )
            b, h = (None, None) if keep is None else keep.shape[:2]
            theirs = create_block_mask(ours.mask_mod, b, h, n, n, device="cpu")
            for name in ("kv_num_blocks", "full_kv_num_blocks"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), (frames, per_frame, name)
            assert torch.equal(ours.to_dense(), theirs.to_dense())


# --- the processor routes through the executions -------------------------------------------------


class _SdpaCalls:
    """A processor stand-in: one SDPA call per (Lq, Lk), the joint self-attention among them."""

    def __init__(self, shapes, mask=None):
        self.shapes, self.mask = shapes, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        outs = []
        for i, (lq, lk) in enumerate(self.shapes):
            gen = torch.Generator().manual_seed(i)
            q = torch.randn(1, 2, lq, 4, generator=gen)
            k, v = (torch.randn(1, 2, lk, 4, generator=gen) for _ in range(2))
            mask = self.mask if lq == lk == 9 else None
            outs.append((q, k, v, mask, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return outs


def _ctx(grid=TokenGrid(3, 2)):
    ctx = FrameContext(tokens=None)
    ctx.grid = grid
    return ctx


@pytest.mark.parametrize("mask_format", ["bool4d", "heads3d", "sdpa-scope"])
def test_chunked_processor_masks_only_the_joint_self_attention(mask_format):
    """Cross-shaped and shorter calls in the same processor pass through; the joint one (Lq == Lk
    >= T·P) is block-causal, with the model's own key mask kept."""
    key_pad = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    key_pad[..., -1] = False
    proc = BlockCausalAttnProcessor(
        _SdpaCalls([(9, 9), (1, 9), (9, 4), (4, 4)], key_pad),
        _ctx(),
        position="suffix",
        joint=True,
        mask_format=mask_format,
    )
    before = _executions("chunked")
    with ae.attention_backend("chunked"):
        outs = proc(None, torch.zeros(1, 6, 1), torch.zeros(1, 3, 1), None)
    assert _executions("chunked") == before + 1
    fid = token_frame_ids(TokenGrid(3, 2), 3, "suffix")
    q, k, v, mask, out = outs[0]
    torch.testing.assert_close(out, _reference(q, k, v, fid, 1, False, mask), rtol=1e-6, atol=1e-6)
    for q, k, v, _mask, out in outs[1:]:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA  # the routing is undone


def test_a_processor_that_bypasses_sdpa_is_an_error_under_chunked():
    def inner(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return hidden_states  # "attention" that never calls SDPA: nothing could make it causal

    proc = BlockCausalAttnProcessor(inner, _ctx())
    with ae.attention_backend("chunked"):
        with pytest.raises(CausalizeError, match=f"masked nothing.*{ae.ENV_VAR}=dense"):
            proc(None, torch.zeros(1, 6, 4))
    with ae.attention_backend("dense"):  # dense hands the mask to the processor instead
        proc(None, torch.zeros(1, 6, 4))


@pytest.mark.parametrize("backend", ["sage", "flash", "flex"])
def test_a_non_sdpa_diffusers_backend_is_refused(backend):
    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan)
    inner = model.blocks[0].attn1.processor.inner
    inner._attention_backend = backend
    inputs = example_inputs(model, plan, frames=2)
    for name in ("dense", "chunked"):
        with ae.attention_backend(name), torch.no_grad(), pytest.raises(CausalizeError, match=f"backend '{backend}'"):
            plan.forward(model, inputs)
    inner._attention_backend = "native"
    with torch.no_grad():
        plan.forward(model, inputs)


# --- every plan: chunked equals dense and is exactly causal --------------------------------------


def _frames(plan, at_least: int = 4) -> int:
    b = plan.layout.block_size
    return max(plan.min_frames, -(-at_least // b) * b)


@pytest.fixture(scope="module", params=PROCESSOR_PLANS)
def converted(request):
    plan = registries().plans.get(request.param)
    base = plan.build_tiny(seed=1)
    rerandomize_zero_params(base)
    model = copy.deepcopy(base)
    convert_model(model, plan)
    assert any(isinstance(getattr(m, "processor", None), BlockCausalAttnProcessor) for m in model.modules())
    return plan, model


def test_plan_chunked_equals_dense(converted, monkeypatch):
    plan, model = converted
    inputs = example_inputs(model, plan, frames=_frames(plan), seed=3)
    monkeypatch.setenv(ae.ENV_VAR, "chunked")
    before = _executions("chunked")
    with torch.no_grad():
        with ae.attention_backend("dense"):  # the API overrides the environment
            dense = plan.forward(model, inputs)
        assert _executions("chunked") == before
        chunked = plan.forward(model, inputs)
    assert _executions("chunked") > before, "the chunked path did not run"
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)


def test_plan_chunked_is_exactly_causal(converted):
    plan, model = converted
    with ae.attention_backend("chunked"):
        report = verify_model(model, plan, frames=_frames(plan, 5))
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    b = plan.layout.block_size
    blk = torch.arange(report.matrix.shape[0]) // b
    assert torch.count_nonzero(report.matrix[blk[None, :] > blk[:, None]]) == 0  # bit-exact zeros


def test_chunked_catches_text_rows_that_see_video():
    """Negative control at the model level: the leaky text-row rule runs chunked too, and leaks."""
    plan = registries().plans.get("cogvideox")
    plan = dataclasses.replace(plan, tiny_config=dict(plan.tiny_config, num_layers=2))
    model = plan.build_tiny()
    convert_model(model, plan, "block-causal-attention{context_sees_video=true}")
    with ae.attention_backend("chunked"):
        report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 1e-5


def test_chunked_catches_a_broken_chunk_boundary(monkeypatch):
    """Negative control: chunks that see one frame too many make the model leak, and the probe says so."""
    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan)
    real_init = ae._Layout.__init__

    def one_frame_too_many(self, *args):  # each run of one frame's queries also sees the next frame's keys
        real_init(self, *args)
        self.runs = tuple((s, e, min(n + (e - s), self.lk)) for s, e, n in self.runs)

    ae._reset_caches()
    monkeypatch.setattr(ae._Layout, "__init__", one_frame_too_many)
    try:
        with ae.attention_backend("chunked"):
            report = verify_model(model, plan)
    finally:
        ae._reset_caches()
    assert not report.passed and report.violations


def _mochi_batch(model, valid=(11, 5), frames=3):
    gen = torch.Generator().manual_seed(0)
    c = model.config
    mask = torch.zeros(len(valid), 16, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return {
        "hidden_states": torch.randn(len(valid), c.in_channels, frames, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(len(valid), 16, c.text_embed_dim, generator=gen),
        "timestep": torch.tensor([500] * len(valid)),
        "encoder_attention_mask": mask,
    }


def test_per_sample_text_lengths_and_padding_masks_chunked_equal_dense():
    """Mochi (a joint length per sample) and Hunyuan (a text-padding key mask per sample), batch 2."""
    for name in ("mochi", "hunyuan"):
        plan = registries().plans.get(name)
        model = plan.build_tiny(seed=1)
        rerandomize_zero_params(model)
        convert_model(model, plan)
        if name == "mochi":
            inputs = _mochi_batch(model)
        else:
            one, two = example_inputs(model, plan, frames=3, seed=1), example_inputs(model, plan, frames=3, seed=2)
            inputs = {k: torch.cat([v, two[k]]) if torch.is_tensor(v) else v for k, v in one.items()}
            inputs["encoder_attention_mask"][1, 4:] = 0  # the second sample: more padding
        with torch.no_grad():
            with ae.attention_backend("dense"):
                dense = plan.forward(model, inputs)
            with ae.attention_backend("chunked"):
                chunked = plan.forward(model, inputs)
        torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)


# --- compiled flex (CPU here; a few compiles only) ----------------------------------------------

needs_flex = pytest.mark.skipif(
    not ae.flex_status("cpu")[0], reason=f"compiled flex cannot run here: {ae.flex_status('cpu')[1]}"
)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@needs_flex
def test_compiled_flex_equals_dense_with_joint_text_and_padding_and_compiles_once():
    fid = token_frame_ids(TokenGrid(3, 40), 9, "suffix")
    n, gen = fid.numel(), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(3))

    def padding(seed):
        keep = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(seed)) > 0.3
        keep[..., fid == 0] = True
        keep[..., n - 9] = True  # a text token each context row can see
        return keep

    for seed in (1, 2):  # the second call: a new mask tensor of the same shape
        graphs, flex_calls = _graphs(), _executions("flex")
        mask = padding(seed)
        got = ae.block_causal_attention(q, k, v, fid, attn_mask=mask, backend="flex", layout_key="flex-test")
        torch.testing.assert_close(got, _reference(q, k, v, fid, 1, False, mask), rtol=1e-5, atol=1e-5)
        assert _executions("flex") == flex_calls + 1
        if seed == 2:
            assert _graphs() == graphs, "a second call at the same shape recompiled"


@pytest.mark.slow
@needs_flex
def test_compiled_flex_with_additive_per_head_mask_gqa_and_scale():
    fid = token_frame_ids(TokenGrid(3, 20), 5, "prefix")
    n, gen = fid.numel(), torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 16, generator=gen)
    k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    bias = torch.zeros(1, 4, 1, n).masked_fill(torch.rand(1, 4, 1, n, generator=gen) < 0.2, -10000.0)
    kw = {"scale": 0.3, "enable_gqa": True}
    got = ae.block_causal_attention(q, k, v, fid, block_size=2, attn_mask=bias, backend="flex", **kw)
    torch.testing.assert_close(got, _reference(q, k, v, fid, 2, False, bias, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_flex
def test_hunyuan_under_flex_equals_dense_and_is_exactly_causal():
    """The whole processor path: joint [video ; text] with the model's text-padding mask, compiled once."""
    plan = registries().plans.get("hunyuan")
    base = plan.build_tiny(seed=2)
    rerandomize_zero_params(base)
    model = copy.deepcopy(base)
    convert_model(model, plan)
    inputs = example_inputs(base, plan, frames=4, seed=5)
    assert inputs["encoder_attention_mask"].sum() < inputs["encoder_attention_mask"].numel()  # some padding
    with torch.no_grad():
        with ae.attention_backend("dense"):
            dense = plan.forward(model, inputs)
        flex_calls = _executions("flex")
        with ae.attention_backend("flex"):
            flex = plan.forward(model, inputs)
            graphs = _graphs()
            report = verify_model(model, plan, frames=4)
    assert _executions("flex") > flex_calls
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    assert report.passed, report.summary()
    assert _graphs() == graphs  # the probe's many forwards at one shape reuse the kernel


def test_env_and_inspect_show_the_attention_path(tmp_path, monkeypatch):
    """`causalize env` and `inspect` name the execution in use and follow the override."""
    import json as _json

    from typer.testing import CliRunner

    from causalize.cli.app import app

    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0 and _json.loads(result.stdout)["attention_cpu"].startswith("dense")
    src = tmp_path / "wan"
    registries().plans.get("wan").build_tiny().save_pretrained(src)
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "chunked")
    result = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert _json.loads(result.stdout)["attention"]["backend"] == "chunked"
    result = CliRunner().invoke(app, ["inspect", str(src)])
    assert "attention on cpu: chunked" in result.stdout
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "fast")
    result = CliRunner().invoke(app, ["inspect", str(src)])
    assert result.exit_code == 2 and "CAUSALIZE_ATTENTION" in result.output
