"""Per-frame timesteps and frame-level actions (WorldModel): for every plan that declares how
timesteps enter its model, the influence of frame j's latent, timestep and action on earlier
outputs is exactly zero; negative controls: an action path that reaches all frames leaks, and an
unconverted model takes no per-frame timesteps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from causalize.api import convert, convert_model
from causalize.errors import UsageError
from causalize.layout import FrameLayout
from causalize.modules.action_encoder import ActionEncoder
from causalize.passes.frame_conditioning import ADAPTER_ATTR
from causalize.plugin_manager import registries
from causalize.verify import check_causality
from causalize.world_model import WorldModel

PLANS = [p.name for p in registries().plans if p.conditioning is not None]
FRAMES, ACTION_DIM = 4, 3


def _world_model(plan, action_dim=ACTION_DIM):
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={action_dim}}}")
    return WorldModel(model, plan)


def _inputs(wm, seed=0):
    cond = wm.plan.conditioning
    extra = wm.plan.make_inputs(wm.model, FRAMES, torch.Generator().manual_seed(seed))
    sample = extra.pop(cond.sample_arg)
    extra.pop(cond.timestep_arg)
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "sample": sample,
        "timesteps": torch.randint(0, 1000, (1, FRAMES), generator=gen),
        "actions": torch.randn(1, FRAMES, ACTION_DIM, generator=gen),
        **extra,
    }


def _check(wm, inputs, name, axis):
    layout = FrameLayout(
        inputs={name: axis}, output_axis=wm.plan.layout.output_axis, block_size=wm.plan.layout.block_size
    )
    return check_causality(wm, inputs, layout, lambda w, x: w(**x))


@pytest.fixture(scope="module", params=PLANS)
def wm(request):
    return _world_model(registries().plans.get(request.param))


def test_some_families_declare_conditioning():
    assert {"unet3d", "svd", "animatediff", "i2vgenxl", "wan"} <= set(PLANS)


@pytest.mark.parametrize("kind", ["latent", "timestep", "action"])
def test_frame_j_moves_no_earlier_output(wm, kind):
    inputs = _inputs(wm)
    name, axis = {
        "latent": ("sample", wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]),
        "timestep": ("timesteps", 1),
        "action": ("actions", 1),
    }[kind]
    report = _check(wm, inputs, name, axis)
    assert report.passed, report.summary() + "\n" + report.format_matrix()


def test_action_reaching_all_frames_is_caught(wm):
    """Negative control: an action path that averages over frames (a leak) fails the probe."""

    class Leaky(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, actions, mask=None):
            emb = self.inner(actions, mask)
            return emb.mean(dim=1, keepdim=True).expand_as(emb)

    inner = getattr(wm.model, ADAPTER_ATTR)
    setattr(wm.model, ADAPTER_ATTR, Leaky(inner))
    try:
        report = _check(wm, _inputs(wm), "actions", 1)
    finally:
        setattr(wm.model, ADAPTER_ATTR, inner)
    assert not report.passed and report.violations


def test_constant_timesteps_without_actions_match_the_model(wm):
    inputs = _inputs(wm)
    cond = wm.plan.conditioning
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timesteps", "actions")}
    with torch.no_grad():
        base = wm.plan.forward(
            wm.model, {cond.sample_arg: inputs["sample"], cond.timestep_arg: torch.tensor([321]), **extra}
        )
        per_frame = wm(inputs["sample"], torch.full((1, FRAMES), 321), **extra)
    torch.testing.assert_close(per_frame, base, rtol=0, atol=1e-5)


def test_timesteps_are_per_frame(wm):
    """Changing frame j's timestep changes frame j's output (the probe's diagonal is nonzero)."""
    report = _check(wm, _inputs(wm), "timesteps", 1)
    assert all(report.matrix[j, j] > 0 for j in range(FRAMES))


def test_null_action_is_a_zero_embedding(wm):
    inputs = _inputs(wm)
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timesteps", "actions")}
    off = torch.zeros(1, FRAMES, dtype=torch.bool)
    with torch.no_grad():
        none = wm(inputs["sample"], inputs["timesteps"], **extra)
        masked = wm(inputs["sample"], inputs["timesteps"], actions=inputs["actions"], action_mask=off, **extra)
    torch.testing.assert_close(masked, none, rtol=0, atol=0)
    assert torch.count_nonzero(wm.action_encoder(inputs["actions"], off)) == 0


def test_bad_inputs_are_refused(wm):
    inputs = _inputs(wm)
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timesteps", "actions")}
    with pytest.raises(UsageError, match="timesteps must be"):
        wm(inputs["sample"], inputs["timesteps"][:, :2], **extra)
    with pytest.raises(UsageError, match="actions must start with"):
        wm(inputs["sample"], inputs["timesteps"], actions=inputs["actions"][:, :2], **extra)
    with pytest.raises(ValueError, match="dimension"):
        wm(inputs["sample"], inputs["timesteps"], actions=torch.randn(1, FRAMES, ACTION_DIM + 1), **extra)
    nan = inputs["actions"].clone()
    nan[0, 1, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        wm(inputs["sample"], inputs["timesteps"], actions=nan, **extra)


def test_unconverted_model_takes_no_per_frame_timesteps():
    plan = registries().plans.get("unet3d")
    with pytest.raises(UsageError, match="frame-conditioning"):
        WorldModel(plan.build_tiny(), plan)


def test_save_and_load_round_trip(tmp_path):
    plan = registries().plans.get("unet3d")
    plan.build_tiny(seed=2).save_pretrained(tmp_path / "base", safe_serialization=True)
    report = convert(tmp_path / "base", tmp_path / "wm", pipeline=f"{plan.pipeline},frame-conditioning{{action_dim=3}}")
    assert report.written and report.passed
    wm = WorldModel.from_pretrained(tmp_path / "wm")
    with torch.no_grad():  # give the adapter non-trivial weights, then compare a reload after saving them
        for p in wm.action_encoder.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    wm.model.save_pretrained(tmp_path / "wm2", safe_serialization=True)
    (tmp_path / "wm2" / "causalize.json").write_text((tmp_path / "wm" / "causalize.json").read_text())
    again = WorldModel.from_pretrained(tmp_path / "wm2")
    inputs = _inputs(wm, seed=5)
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timesteps", "actions")}
    with torch.no_grad():
        a = wm(inputs["sample"], inputs["timesteps"], actions=inputs["actions"], **extra)
        b = again(inputs["sample"], inputs["timesteps"], actions=inputs["actions"], **extra)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_discrete_actions():
    enc = ActionEncoder(5, 8, "discrete")
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p))
    idx = torch.tensor([[0, 3, 4]])
    one_hot = torch.nn.functional.one_hot(idx, 5).float()
    torch.testing.assert_close(enc(idx), enc(one_hot))
    multi = one_hot.clone()
    multi[0, 0, 2] = 1.0  # multi-hot: the sum of the active rows enters the MLP
    assert not torch.allclose(enc(multi)[0, 0], enc(one_hot)[0, 0])
    assert torch.equal(enc(multi)[0, 1:], enc(one_hot)[0, 1:])


def test_cli_convert_adds_an_action_adapter(tmp_path):
    import json

    from typer.testing import CliRunner

    from causalize.cli.app import app

    plan = registries().plans.get("unet3d")
    plan.build_tiny().save_pretrained(tmp_path / "base", safe_serialization=True)
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(tmp_path / "base"),
            str(tmp_path / "wm"),
            "--action-dim",
            "4",
            "--action-type",
            "discrete",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pipeline"].endswith("frame-conditioning{action_dim=4,action_type=discrete}")
    wm = WorldModel.from_pretrained(tmp_path / "wm")
    assert wm.action_encoder.action_type == "discrete" and wm.action_encoder.action_dim == 4
    bad = CliRunner().invoke(
        app, ["convert", str(tmp_path / "base"), str(tmp_path / "x"), "--action-dim", "4", "--action-type", "joystick"]
    )
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()
