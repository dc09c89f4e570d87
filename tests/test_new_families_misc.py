"""Special cases of the misc new families (plugins kandinsky, anyflow, refused); the generic
guarantees come from the registry-parametrised tests.

- Refused classes say why, through the plan lookup and through `plan_for`.
- Kandinsky 5: the `attention_causal` config flag does not make the stock model causal; per-frame
  timesteps really modulate each frame's tokens (visual blocks and out layer) while the text
  blocks keep the per-sample embedding; a batch is its samples; NABLA sparse attention is refused
  on a converted model.
"""

from __future__ import annotations

import pytest
import torch
from world_models import tiny_world_model

from causalize.api import convert_model, plan_for, verify_model
from causalize.errors import CausalizeError, NoPlanError
from causalize.plugin_manager import registries
from causalize.verify.probe import rerandomize_zero_params

REFUSED = {
    "JoyImageEditTransformer3DModel": "no frame axis",
    "JoyImageEditPlusTransformer3DModel": "no frame axis",
    "MiniMaxH3Transformer3DModel": "packed sequence without a frame map",
    "Cosmos3OmniTransformer": "packed multimodal list inputs without a frame axis",
    "Kandinsky6SRTransformer3DModel": "sparse attention chosen from all frames",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_say_why(name):
    with pytest.raises(NoPlanError, match=f"{name} is not supported: {REFUSED[name]}") as err:
        registries().plans.for_class(name)
    assert "nearest plan" in str(err.value.hint)
    with pytest.raises(NoPlanError, match=REFUSED[name]):
        plan_for(name)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_exist_in_diffusers(name):
    import diffusers

    assert hasattr(diffusers, name)


# --------------------------------------------------------------------------- Kandinsky 5

FRAMES = 4


def _k5():
    return registries().plans.get("kandinsky5")


def test_kandinsky5_attention_causal_flag_is_not_causal():
    """The config flag is stored, never read: the stock model leaks with it too."""
    plan = _k5()
    torch.manual_seed(0)
    model = plan.model_cls()(**{**plan.tiny_config, "attention_causal": True}).eval()
    report = verify_model(model, plan)
    assert not report.passed and report.max_leak > 1e-3
    assert report.culprit["class"] == "Kandinsky5Attention"


def _split(wm, seed=0):
    inputs = wm.plan.make_inputs(wm.model, FRAMES, torch.Generator().manual_seed(seed))
    sample = inputs.pop("hidden_states")
    inputs.pop("timestep")
    return sample, inputs


def test_kandinsky5_per_frame_timesteps_modulate_each_frame():
    """The first visual self-attention's input, for frame f's tokens, is the stock model's at
    frame f's timestep (the visual modulation is per frame, not merely causal)."""
    wm = tiny_world_model("kandinsky5")
    sample, extra = _split(wm)
    per_frame = wm.plan.tokens(wm.model, {"hidden_states": sample}).per_frame
    seen = []
    handle = wm.model.visual_transformer_blocks[0].self_attention.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone())
    )
    ks = torch.tensor([[900, 40, 500, 250]])
    try:
        with torch.no_grad():
            wm(sample, ks, **extra)
            for k in ks[0]:  # outside a world-model call the twins are the stock modules
                wm.plan.forward(wm.model, {"hidden_states": sample, "timestep": k[None], **extra})
    finally:
        handle.remove()
    run, stock = seen[0], seen[1:]
    for f in range(FRAMES):
        rows = slice(f * per_frame, (f + 1) * per_frame)
        torch.testing.assert_close(run[:, rows], stock[f][:, rows], rtol=0, atol=2e-5)
        if f:
            assert not torch.allclose(run[:, rows], stock[0][:, rows], atol=1e-4)


def test_kandinsky5_out_layer_is_per_frame_and_text_blocks_per_sample():
    """Frame f's output depends on frame f's timestep through the out layer; the text stack sees
    frame 0's timestep only (changing a later frame's leaves the text blocks' output unchanged)."""
    wm = tiny_world_model("kandinsky5")
    sample, extra = _split(wm)
    texts = []
    handle = wm.model.text_transformer_blocks[-1].register_forward_hook(lambda m, a, out: texts.append(out.clone()))
    a, b = torch.tensor([[700, 300, 300, 300]]), torch.tensor([[700, 300, 300, 20]])
    try:
        with torch.no_grad():
            ya, yb = wm(sample, a, **extra), wm(sample, b, **extra)
    finally:
        handle.remove()
    assert torch.equal(texts[0], texts[1])
    assert torch.equal(ya[:, :3], yb[:, :3])  # causal: earlier frames untouched
    assert (ya[:, 3] - yb[:, 3]).abs().max() > 1e-4


def test_kandinsky5_a_batch_is_its_samples():
    wm = tiny_world_model("kandinsky5")
    (s0, e0), (s1, e1) = _split(wm, seed=0), _split(wm, seed=10)
    gen = torch.Generator().manual_seed(3)
    t, act = torch.randint(0, 1000, (2, FRAMES), generator=gen), torch.randn(2, FRAMES, 3, generator=gen)
    both = {k: torch.cat([v, e1[k]]) for k, v in e0.items()}
    with torch.no_grad():
        batch = wm(torch.cat([s0, s1]), t, act, **both)
        one, two = wm(s0, t[:1], act[:1], **e0), wm(s1, t[1:], act[1:], **e1)
    torch.testing.assert_close(batch, torch.cat([one, two]), rtol=0, atol=2e-5)


def test_kandinsky5_converted_model_refuses_nabla_sparse_attention():
    plan = _k5()
    model = plan.build_tiny()
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    sparse = {"sta_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool), "to_fractal": True, "P": 0.9}
    convert_model(model, plan)
    with pytest.raises(CausalizeError, match="NABLA"):
        plan.forward(model, {**inputs, "sparse_params": sparse})


def test_kandinsky5_caller_positions_are_used_when_given():
    """The plan's forward fills in the pipeline's aranges only when the caller passes none."""
    plan = _k5()
    model = plan.build_tiny()
    rerandomize_zero_params(model, std=0.3)  # the modulations start at zero: attention would be gated off
    inputs = plan.make_inputs(model, FRAMES, torch.Generator().manual_seed(0))
    pos = (torch.arange(FRAMES), torch.arange(4), torch.arange(4))
    with torch.no_grad():
        filled = plan.forward(model, inputs)
        same = plan.forward(model, {**inputs, "visual_rope_pos": pos, "text_rope_pos": torch.arange(12)})
        spread = plan.forward(model, {**inputs, "visual_rope_pos": (pos[0] * 2, *pos[1:])})
    assert torch.equal(filled, same)
    assert not torch.equal(filled, spread)  # RoPE is relative: spread, not shifted


# --------------------------------------------------------------------------- AnyFlow FAR


def test_anyflow_far_is_refused_for_conversion_as_already_causal():
    with pytest.raises(NoPlanError, match="already causal") as err:
        registries().plans.for_class("AnyFlowFARTransformer3DModel")
    assert "'anyflow'" in str(err.value.hint)


def test_anyflow_far_is_causal_unconverted():
    """verify passes the stock FAR model with no pass applied (one frame per chunk)."""
    from causalize.plugins.anyflow import FAR_PLAN

    report = verify_model(FAR_PLAN.build_tiny(), FAR_PLAN)
    assert report.passed, report.summary() + "\n" + report.format_matrix()
    assert all(report.matrix[j, j] > 0 for j in range(report.matrix.shape[0]))


@pytest.mark.parametrize("chunk", [1, 2])
def test_anyflow_far_mask_equals_causalize_mask_on_the_same_grid(chunk):
    """FAR's own BlockMask (chunks of `chunk` frames, no compressed context) is causalize's
    block-causal mask with block_size = chunk over the same token grid."""
    from diffusers.models.transformers.transformer_anyflow_far import _build_anyflow_far_causal_block_mask

    from causalize.context import TokenGrid
    from causalize.modules.block_attention import block_causal_mask, token_frame_ids

    frames, height, width = 6, 16, 16
    far = _build_anyflow_far_causal_block_mask(
        chunk_partition=[chunk] * (frames // chunk),
        height=height,
        width=width,
        patch_size=(1, 2, 2),
        compressed_patch_size=(1, 4, 4),
        full_chunk_limit=frames,
        device=torch.device("cpu"),  # diffusers' default is CUDA on a CUDA build of torch, even without a GPU
    )
    grid = TokenGrid(frames, (height // 2) * (width // 2))
    n = grid.video_tokens
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    theirs = far.mask_mod(torch.tensor(0), torch.tensor(0), q, kv)
    ours = block_causal_mask(token_frame_ids(grid), block_size=chunk)
    assert torch.equal(theirs.bool(), ours)


def test_anyflow_far_compressed_context_is_causal():
    """With more chunks than full_chunk_limit the older frames become compressed context (no
    output): output frames still see only their past."""
    from causalize.plugins.anyflow import FAR_PLAN, far_forward

    torch.manual_seed(0)
    model = FAR_PLAN.model_cls()(**{**FAR_PLAN.tiny_config, "full_chunk_limit": 2}).eval()
    inputs = FAR_PLAN.make_inputs(model, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = far_forward(model, inputs)
        assert base[:, :2].abs().max() == 0  # frames 0, 1: compressed context, no output
        for j in (0, 2, 3):
            moved = dict(inputs, hidden_states=inputs["hidden_states"].clone())
            moved["hidden_states"][:, j] += 1.0
            out = far_forward(model, moved)
            first = max(j, 2)
            assert torch.equal(out[:, :first], base[:, :first])  # no output frame before j moves
            assert (out[:, first] - base[:, first]).abs().max() > 1e-4  # frame j reaches the next output
