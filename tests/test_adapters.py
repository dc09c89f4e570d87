"""Named action adapters through PEFT (causalize.adapters): standard adapter files that reload to
identical outputs, switching between action spaces, LoRA on attention projections, base weights
untouched by adapter training, and a model that stays causal with adapters on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from causalize.adapters import (
    active_action_adapter,
    add_action_adapter,
    list_action_adapters,
    load_action_adapter,
    remove_action_adapter,
    save_action_adapter,
    set_action_adapter,
)
from causalize.api import convert_model
from causalize.errors import UsageError
from causalize.layout import FrameLayout
from causalize.passes.frame_conditioning import ADAPTER_ATTR
from causalize.plugin_manager import registries
from causalize.verify import check_causality
from causalize.world_model import WorldModel

FRAMES = 4
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _converted(name="unet3d", action_dim=3):
    plan = registries().plans.get(name)
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={action_dim}}}")
    return model, plan


def _inputs(wm, seed=0):
    """As in test_world_model: the plan's inputs, per-frame timesteps, no actions yet."""
    cond = wm.plan.conditioning
    extra = wm.plan.make_inputs(wm.model, FRAMES, torch.Generator().manual_seed(seed))
    sample = extra.pop(cond.sample_arg)
    extra.pop(cond.timestep_arg)
    gen = torch.Generator().manual_seed(seed + 1)
    return {"sample": sample, "timesteps": torch.randint(0, 1000, (1, FRAMES), generator=gen), **extra}


def _continuous(dim=3, seed=7):
    return torch.randn(1, FRAMES, dim, generator=torch.Generator().manual_seed(seed))


def _one_hot(n=5, seed=8):
    idx = torch.randint(0, n, (1, FRAMES), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, n).float()


def _run(wm, inputs, actions):
    with torch.no_grad():
        return wm(**inputs, actions=actions)


def _adapter_params(model, name):
    """(path, parameter) of adapter `name`: its encoder copy and its LoRA weights."""
    enc = f"{ADAPTER_ATTR}.modules_to_save.{name}."
    return [(n, p) for n, p in model.named_parameters() if n.startswith(enc) or (".lora_" in n and f".{name}." in n)]


def _randomize(model, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in _adapter_params(model, name):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_save_then_load_gives_identical_outputs(tmp_path):
    model, plan = _converted()
    add_action_adapter(model, "robot", action_dim=3, lora_rank=2)
    _randomize(model, "robot", seed=1)
    wm = WorldModel(model, plan)
    inputs = _inputs(wm)
    ref = _run(wm, inputs, _continuous())
    save_action_adapter(model, "robot", tmp_path / "robot")

    assert {p.name for p in (tmp_path / "robot").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "causalize_adapter.json",
    }
    config = json.loads((tmp_path / "robot" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == [ADAPTER_ATTR] and config["r"] == 2
    keys = load_file(tmp_path / "robot" / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") and ".robot." not in k for k in keys)  # PeftModel's layout
    assert f"base_model.model.{ADAPTER_ATTR}.out.2.weight" in keys

    fresh, _ = _converted()
    load_action_adapter(fresh, tmp_path / "robot", "robot")
    out = _run(WorldModel(fresh, plan), inputs, _continuous())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, _run(WorldModel(_converted()[0], plan), inputs, _continuous()))  # the adapter matters


@pytest.mark.parametrize("rank", [0, 2])
def test_files_load_with_stock_peft(tmp_path, rank):
    """The files are PEFT's own: PeftModel.from_pretrained on a converted model reproduces the
    outputs, for an encoder-only adapter (r=0, PEFT's dummy target) and one with LoRA."""
    from peft import PeftModel

    model, plan = _converted()
    add_action_adapter(model, "robot", action_dim=3, lora_rank=rank)
    _randomize(model, "robot", seed=2)
    inputs = _inputs(WorldModel(model, plan))
    ref = _run(WorldModel(model, plan), inputs, _continuous())
    save_action_adapter(model, "robot", tmp_path / "robot")
    fresh, _ = _converted()
    PeftModel.from_pretrained(fresh, tmp_path / "robot")  # injects into `fresh` in place
    torch.testing.assert_close(_run(WorldModel(fresh, plan), inputs, _continuous()), ref, rtol=0, atol=0)


def test_two_action_spaces_switch(tmp_path):
    model, plan = _converted()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_action_adapter(model, "robot", action_dim=3)
    add_action_adapter(model, "game", action_dim=5, action_type="discrete", lora_rank=2)
    assert list_action_adapters(model) == ["robot", "game"] and active_action_adapter(model) == "game"
    _randomize(model, "robot", seed=3)
    _randomize(model, "game", seed=4)
    wm = WorldModel(model, plan)
    inputs = _inputs(wm)

    set_action_adapter(model, "robot")
    assert wm.action_encoder.action_dim == 3 and wm.action_encoder.action_type == "continuous"
    robot = _run(wm, inputs, _continuous())
    set_action_adapter(model, "game")
    assert wm.action_encoder.action_dim == 5 and wm.action_encoder.action_type == "discrete"
    game = _run(wm, inputs, _one_hot())
    with pytest.raises(ValueError, match="dimension"):  # game's encoder now runs: 3-d actions are refused
        _run(wm, inputs, _continuous())

    for name in ("robot", "game"):
        save_action_adapter(model, name, tmp_path / name)
    fresh, _ = _converted()
    fwm = WorldModel(fresh, plan)
    load_action_adapter(fresh, tmp_path / "robot", "robot")
    load_action_adapter(fresh, tmp_path / "game", "game")
    for m, w in ((model, wm), (fresh, fwm)):
        set_action_adapter(m, "robot")
        torch.testing.assert_close(_run(w, inputs, _continuous()), robot, rtol=0, atol=0)
        set_action_adapter(m, "game")
        torch.testing.assert_close(_run(w, inputs, _one_hot()), game, rtol=0, atol=0)
        set_action_adapter(m, "robot")  # back to a: game's LoRA is off again
        torch.testing.assert_close(_run(w, inputs, _continuous()), robot, rtol=0, atol=0)

    # adapters hold copies: the base weights (converted encoder included) never moved
    unwrapped = {
        n.replace(f"{ADAPTER_ATTR}.original_module.", f"{ADAPTER_ATTR}.").replace(".base_layer.", "."): p
        for n, p in model.named_parameters()
    }
    for n, p in base.items():
        torch.testing.assert_close(unwrapped[n], p, rtol=0, atol=0)


def test_training_moves_only_the_active_adapter():
    model, plan = _converted()
    add_action_adapter(model, "robot", action_dim=3, lora_rank=2)
    add_action_adapter(model, "game", action_dim=5, action_type="discrete", lora_rank=2)
    _randomize(model, "robot", seed=5)
    _randomize(model, "game", seed=6)
    set_action_adapter(model, "robot")

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in _adapter_params(model, "robot")}
    assert any(".lora_A." in n for n in trainable) and any(".modules_to_save.robot." in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wm = WorldModel(model, plan)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    wm(**_inputs(wm), actions=_continuous()).square().mean().backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lora_on_attention_projections(tmp_path):
    model, plan = _converted()
    wm = WorldModel(model, plan)
    inputs = _inputs(wm)
    # frozen like the base will be under the adapter: on CPU, nn.Linear on a non-contiguous input
    # takes another matmul path (~1 ulp apart) when its weight requires grad, even under no_grad
    model.requires_grad_(False)
    before = _run(wm, inputs, _continuous())
    add_action_adapter(model, "robot", action_dim=3, lora_rank=4, lora_alpha=8)

    lora = [n for n, _ in _adapter_params(model, "robot") if ".lora_" in n]
    wrapped = {n.split(".lora_")[0] for n in lora}
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"to_q", "to_k", "to_v", "0"}
    assert all(w.endswith(ATTENTION) for w in wrapped)
    n_attn = sum(1 for n, _ in _converted()[0].named_modules() if n.endswith(tuple("." + a for a in ATTENTION)))
    assert len(wrapped) == n_attn and len(lora) == 2 * n_attn
    # LoRA-B and the encoder's last layer start at zero: the new adapter changes nothing yet
    torch.testing.assert_close(_run(wm, inputs, _continuous()), before, rtol=0, atol=0)

    _randomize(model, "robot", seed=9)
    ref = _run(wm, inputs, _continuous())
    assert not torch.equal(ref, before)
    save_action_adapter(model, "robot", tmp_path / "robot")
    saved = load_file(tmp_path / "robot" / "adapter_model.safetensors")
    assert sum(".lora_" in k for k in saved) == len(lora)
    fresh, _ = _converted()
    load_action_adapter(fresh, tmp_path / "robot", "r2")
    torch.testing.assert_close(_run(WorldModel(fresh, plan), inputs, _continuous()), ref, rtol=0, atol=0)


def _causal(wm, inputs, name, axis):
    layout = FrameLayout(inputs={name: axis}, output_axis=wm.plan.layout.output_axis)
    return check_causality(wm, inputs, layout, lambda w, x: w(**x))


@pytest.mark.parametrize("plan_name", ["unet3d", "wan"])
def test_still_causal_with_adapters(plan_name):
    """Over the actions and the latent, with a continuous and a discrete adapter carrying LoRA
    (zero parameters, LoRA-B included, are re-randomised by the probe)."""
    model, plan = _converted(plan_name)
    add_action_adapter(model, "robot", action_dim=3, lora_rank=2)
    add_action_adapter(
        model,
        "game",
        action_dim=5,
        action_type="discrete",
        lora_rank=2,
        lora_targets=["to_q", "to_v", "resnets.0.conv1"] if plan_name == "unet3d" else None,
    )  # per-frame Conv2d
    wm = WorldModel(model, plan)
    latent_axis = plan.layout.inputs[plan.conditioning.sample_arg]
    for name, actions in (("robot", _continuous()), ("game", _one_hot())):
        set_action_adapter(model, name)
        inputs = {**_inputs(wm), "actions": actions}
        for arg, axis in (("actions", 1), ("sample", latent_axis)):
            report = _causal(wm, inputs, arg, axis)
            assert report.passed, f"{name}/{arg}: " + report.summary() + "\n" + report.format_matrix()
        assert all(report.matrix[j, j] > 0 for j in range(FRAMES))


def test_lora_on_a_causal_temporal_conv_is_refused():
    model, _ = _converted()
    with pytest.raises(UsageError, match="causal temporal convolution"):
        add_action_adapter(model, "robot", action_dim=3, lora_rank=2, lora_targets=["temp_convs.0.conv1.2"])
    with pytest.raises(UsageError, match="not a Linear"):  # the temporal conv's Sequential
        add_action_adapter(model, "robot", action_dim=3, lora_rank=2, lora_targets=["to_q", "conv1"])
    with pytest.raises(UsageError, match="match no module"):
        add_action_adapter(model, "robot", action_dim=3, lora_rank=2, lora_targets=["no_such_layer"])
    assert list_action_adapters(model) == [] and not getattr(model, "peft_config", {})


def test_bad_names_and_mismatched_files_are_refused(tmp_path):
    model, _ = _converted()
    add_action_adapter(model, "robot", action_dim=3)
    for bad in ("robot", "a.b", "", "conv_in"):
        with pytest.raises(UsageError):
            add_action_adapter(model, bad, action_dim=3)
    with pytest.raises(UsageError, match="no action adapter"):
        set_action_adapter(model, "nope")
    save_action_adapter(model, "robot", tmp_path / "robot")
    wan, _ = _converted("wan")
    with pytest.raises(UsageError, match="UNet3DConditionModel"):
        load_action_adapter(wan, tmp_path / "robot", "robot")
    with pytest.raises(UsageError, match="has no adapter_config.json"):
        load_action_adapter(model, tmp_path, "x")


def test_remove_and_model_converted_without_actions():
    """A model converted with no action adapter gets a null base encoder; removing the active
    adapter activates another one."""
    model, plan = _converted(action_dim=0)
    assert getattr(model, ADAPTER_ATTR, None) is None
    add_action_adapter(model, "robot", action_dim=3)
    add_action_adapter(model, "game", action_dim=5, action_type="discrete")
    remove_action_adapter(model, "game")
    assert list_action_adapters(model) == ["robot"] and active_action_adapter(model) == "robot"
    assert list(model.peft_config) == ["robot"]
    wm = WorldModel(model, plan)
    inputs = _inputs(wm)
    # the fresh encoder's last layer is zero: actions change nothing until trained
    torch.testing.assert_close(_run(wm, inputs, _continuous()), _run(wm, inputs, None), rtol=0, atol=0)
