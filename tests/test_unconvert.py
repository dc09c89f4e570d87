"""`causalize.unconvert`: everything a conversion installs is recorded on the model
(causalize.state) and taken off again. Parametrised over the plan registry: for every plan, a
conversion that changes no weights unconverts to a model that computes the stock model's output bit
for bit; a weight transfer is reported parameter by parameter; the model converts again afterwards.
Negative controls: the converted output differs from the stock one, and an unconvert that skips one
recorded change is caught by the same comparison."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import causalize
from causalize import state
from causalize.api import (
    convert,
    convert_model,
    example_inputs,
    load,
    parse_pipeline,
    verify_model,
    with_action_adapter,
)
from causalize.errors import UsageError
from causalize.plugin_manager import registries
from causalize.verify.probe import rerandomize_zero_params
from causalize.world_model import WorldModel

PLANS = registries().plans.names()
CONV_PLANS = [n for n in PLANS if "causal-temporal-conv" in registries().plans.get(n).pipeline]


@pytest.fixture(params=PLANS)
def plan(request):
    return registries().plans.get(request.param)


def _pipeline(plan, transfer: str | None = "shift", actions: bool = False):
    """The plan's pipeline with the temporal-conv transfer set (shift: no weight changes), and
    frame-conditioning with a 3-d action adapter appended when `actions`."""
    pipe = parse_pipeline(None, plan)
    if transfer and "causal-temporal-conv" in pipe.names():
        pipe = pipe.replace_options("causal-temporal-conv", transfer=transfer)
    return with_action_adapter(pipe, 3, "continuous") if actions else pipe


def _out(plan, model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return plan.forward(model, inputs)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _structure(model) -> dict[str, tuple]:
    """Every module's class, instance attributes, processor class and padding."""
    return {
        path: (type(m), sorted(vars(m)), type(getattr(m, "processor", None)), getattr(m, "padding", None))
        for path, m in model.named_modules()
    }


def _drive_world_model(model, plan) -> None:
    """One WorldModel call with per-frame timesteps and actions, so the installed hooks have run."""
    cond = plan.conditioning
    inputs = example_inputs(model, plan)
    sample = inputs.pop(cond.sample_arg)
    inputs.pop(cond.timestep_arg)
    batch, frames = sample.shape[0], sample.shape[plan.layout.inputs[cond.sample_arg]]
    timesteps = torch.randint(0, 1000, (batch, frames), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        WorldModel(model, plan)(sample, timesteps, actions=torch.randn(batch, frames, 3), **inputs)


# --- (a) + (c): no weight changes -> the stock model, bit for bit ------------------------------


@pytest.mark.parametrize("actions", [False, True], ids=["passes", "with-actions"])
def test_unconvert_gives_back_the_stock_model_bit_for_bit(plan, actions):
    if actions and plan.conditioning is None:
        pytest.skip(f"plan '{plan.name}' has no per-frame conditioning")
    model = plan.build_tiny()
    rerandomize_zero_params(model)  # zero-initialised layers (Kandinsky's) would hide the conversion
    stock = copy.deepcopy(model)
    convert_model(model, plan, _pipeline(plan, actions=actions))
    inputs = example_inputs(model, plan)
    expected = _out(plan, stock, inputs)
    # negative control: the comparison below would catch a model that stayed converted
    assert not torch.equal(_out(plan, model, inputs), expected), "the conversion changed nothing"
    if actions:
        _drive_world_model(model, plan)
    assert state.installed(model)

    report = causalize.unconvert(model)

    assert report.exact and report.unrestored == [], report.summary()
    assert state.installed(model) == [] and state.registry(model) is None
    assert _bitwise_equal(_out(plan, model, inputs), expected)
    assert list(model.state_dict()) == list(stock.state_dict())
    assert all(_bitwise_equal(v, stock.state_dict()[k]) for k, v in model.state_dict().items())
    assert _structure(model) == _structure(stock)


@pytest.mark.parametrize("kind", ["processor", "module-swap"])
def test_skipping_one_change_is_caught(kind):
    """Negative control of the comparison itself: an unconvert that leaves one change (the newest
    processor wrap, or causal norm swap) in place gives a model that differs from the stock one."""
    plan = registries().plans.get("unet3d")
    model = plan.build_tiny()
    stock = copy.deepcopy(model)
    convert_model(model, plan, _pipeline(plan))
    reg = state.registry(model)
    reg.changes.remove(next(c for c in reversed(reg.changes) if c.kind == kind))
    state.unconvert(model)
    inputs = example_inputs(model, plan)
    assert not torch.equal(_out(plan, model, inputs), _out(plan, stock, inputs))


# --- (b): weight transfers are reported --------------------------------------------------------


@pytest.mark.parametrize("name", CONV_PLANS)
def test_weight_transfer_is_reported_and_structure_restored(name):
    plan = registries().plans.get(name)
    model = plan.build_tiny()
    stock = copy.deepcopy(model)
    runs = convert_model(model, plan)  # default: extrapolative
    converted = {f"{r.path}.weight" for run in runs if run.name == "causal-temporal-conv" for r in run.records}
    lost = state.lost_weights(model)

    report = state.unconvert(model)

    assert not report.exact
    assert report.unrestored == lost and set(lost) <= converted
    assert all(p in report.summary() for p in lost)
    assert _structure(model) == _structure(stock)
    assert list(model.state_dict()) == list(stock.state_dict())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, stock.state_dict()[k])]
    assert changed and set(changed) == set(lost) and len(lost) == len(changed)  # exactly those differ from stock


@pytest.mark.parametrize("name", CONV_PLANS[:2])
def test_kept_weights_restore_a_weight_transfer(name):
    plan = registries().plans.get(name)
    model = plan.build_tiny()
    stock = copy.deepcopy(model)
    convert_model(model, plan, keep_original_weights=True)
    report = state.unconvert(model)
    assert report.exact and report.restored_weights
    inputs = example_inputs(model, plan)
    assert _bitwise_equal(_out(plan, model, inputs), _out(plan, stock, inputs))


def test_strict_refuses_before_changing_anything():
    plan = registries().plans.get("unet3d")
    model = plan.build_tiny()
    convert_model(model, plan)
    before = state.installed(model)
    with pytest.raises(UsageError, match="cannot restore"):
        state.unconvert(model, strict=True)
    assert state.installed(model) == before


# --- (d): it converts again --------------------------------------------------------------------


def test_converts_again_after_unconvert(plan):
    model = plan.build_tiny()
    convert_model(model, plan, _pipeline(plan, actions=plan.conditioning is not None))
    state.unconvert(model)
    convert_model(model, plan)
    report = verify_model(model, plan)
    assert report.passed, report.summary()


# --- (e): what installed() lists ---------------------------------------------------------------


def _by_kind(changes: list[dict]) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for c in changes:
        kinds.setdefault(c["kind"], set()).add(c["path"])
    return kinds


def test_installed_lists_a_unet_conversion():
    plan = registries().plans.get("unet3d")
    model = plan.build_tiny()
    convert_model(model, plan, _pipeline(plan, actions=True))
    changes = state.installed(model)
    kinds = _by_kind(changes)
    assert {"hook", "pre-hook", "processor", "module-swap", "module-added", "attribute"} <= set(kinds)
    assert "" in kinds["pre-hook"] and "" in kinds["hook"]  # the frame context's root hooks
    assert plan.conditioning.embedding in kinds["hook"]  # the per-frame timestep embedding
    consumers = {p for p, m in model.named_modules() if type(m).__name__ in plan.conditioning.consumers}
    assert consumers and consumers <= kinds["pre-hook"]
    assert "causalize_action_encoder" in kinds["module-added"]
    swaps = [c for c in changes if c["kind"] == "module-swap"]
    assert {c["pass"] for c in swaps} == {"causal-temporal-conv", "causal-norm"}
    assert all(c["weights_changed"] == [] for c in swaps)  # shift transfer
    assert all(set(c) == {"kind", "path", "pass", "detail", "weights_changed"} for c in changes)


def test_installed_lists_a_dit_conversion():
    plan = registries().plans.get("cogvideox")
    model = plan.build_tiny()
    convert_model(model, plan, _pipeline(plan, actions=True))
    kinds = _by_kind(state.installed(model))
    assert {"hook", "pre-hook", "processor", "class-swap", "attribute", "module-added"} <= set(kinds)
    assert kinds["processor"] == {p for p, m in model.named_modules() if type(m).__name__ == "Attention"}
    assert kinds["class-swap"] == {p for p, m in model.named_modules() if type(m).__name__.startswith("Frame")}
    passes = {c["pass"] for c in state.installed(model)}
    assert passes == {
        "block-causal-attention",
        "frame-conditioning",
        "convert_model",
    }  # the recipe-saving save_pretrained


# --- copies, loading, refusals, the CLI --------------------------------------------------------


def test_unconvert_of_a_copy_leaves_the_original_converted():
    """Handles and records deep-copy with the model (the causality probe runs on copies)."""
    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan, _pipeline(plan, actions=True))
    inputs = example_inputs(model, plan)
    converted = _out(plan, model, inputs)
    state.unconvert(copy.deepcopy(model))
    assert len(state.installed(model)) > 0
    assert _bitwise_equal(_out(plan, model, inputs), converted)


def test_streaming_state_is_refused():
    from causalize.rollout.streaming import Stream

    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan, _pipeline(plan, actions=True))
    Stream.of(model, plan)
    before = state.installed(model)
    with pytest.raises(UsageError, match="streaming"):
        state.unconvert(model)
    assert state.installed(model) == before


def test_never_converted_model_unconverts_to_itself():
    model = registries().plans.get("wan").build_tiny()
    report = state.unconvert(model)
    assert report.exact and report.undone == [] and state.installed(model) == []


@pytest.fixture(scope="module")
def converted_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("unconvert")
    registries().plans.get("unet3d").build_tiny(seed=1).save_pretrained(root / "base", safe_serialization=True)
    convert(root / "base", root / "causal", verify=False, action_dim=2)
    return root


def test_loaded_checkpoint_lists_and_unconverts(converted_checkpoint):
    model = load(converted_checkpoint / "causal")
    changes = state.installed(model)
    assert {"module-swap", "processor", "hook", "module-added"} <= {c["kind"] for c in changes}
    report = state.unconvert(model)
    lost = {p for c in changes for p in c["weights_changed"]}
    assert lost and set(report.unrestored) == lost
    assert not any(k.startswith("causalize_action_encoder") for k in model.state_dict())


def test_inspect_shows_what_a_conversion_installed(converted_checkpoint):
    import json

    from causalize.cli.app import app

    runner = CliRunner()
    human = runner.invoke(app, ["inspect", str(converted_checkpoint / "causal")])
    assert human.exit_code == 0, human.output
    assert "installed module-swap:" in human.stdout and "installed pre-hook:" in human.stdout
    doc = json.loads(runner.invoke(app, ["inspect", str(converted_checkpoint / "causal"), "--json"]).stdout)
    assert {c["kind"] for c in doc["installed"]} >= {"module-swap", "processor", "hook", "pre-hook", "attribute"}
    plain = json.loads(runner.invoke(app, ["inspect", str(converted_checkpoint / "base"), "--json"]).stdout)
    assert "installed" not in plain
