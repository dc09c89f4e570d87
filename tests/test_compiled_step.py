"""Compiled current-frame steps (issue 11, item 3): with `compile=` the static steps of exact
streaming (those of a full window) run through torch.compile of the model's forward. With
inductor (Wan, fp32 and bf16) they give the eager frames (fp32: to rounding; bf16: within the
half-precision tolerance) and a second rollout compiles nothing. With Dynamo alone (backend
"eager", cheap enough for every streaming plan of the registry) each plan is served compiled or
warns that it cannot; while the window grows nothing is compiled at all. The negative control
serves every frame compiled, and the graph counter then sees a recompilation per new history
length: the gating, not luck, keeps recompiles away; a second one disables Dynamo, and no call
may then count as compiled. Bad settings are refused before any frame."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from world_models import tiny_world_model

from causalize import precision
from causalize.errors import UsageError
from causalize.plugin_manager import registries
from causalize.rollout import compiled as compiled_module
from causalize.rollout.compiled import CompiledStep
from causalize.rollout.sampler import RolloutConfig, RolloutSession, rollout

STEPS = 3
STREAMING = [
    p.name
    for p in registries().plans
    if p.conditioning is not None and p.layout.block_size == 1 and p.streaming is not None
]
# Their per-frame modulation covers text tokens in the same sequence as the video tokens, so even a
# one-frame call needs the FrameTensor subclass, which Dynamo cannot trace: they warn and run eagerly.
EAGER_ONLY = {"hunyuan", "hunyuan-framepack", "motif"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's caches and counters are per process: start and leave them empty."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _inputs(wm, context_frames: int, frames: int):
    cond = wm.plan.conditioning
    context = wm.plan.make_inputs(wm.model, context_frames, torch.Generator().manual_seed(0))[cond.sample_arg]
    actions = torch.randn(context.shape[0], frames, 3, generator=torch.Generator().manual_seed(1))
    return context, actions


def _graphs_per_frame(wm, context, actions, config: RolloutConfig) -> tuple[list[int], RolloutSession]:
    """Graphs compiled so far, after each generated frame."""
    session = RolloutSession(wm, config)
    session.reset(context)
    seen = []
    for i in range(actions.shape[1]):
        session.step(actions[:, i])
        seen.append(_graphs())
    return seen, session


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_steps_give_the_eager_frames_and_compile_once(dtype):
    """With inductor (the real code generation; every other test here traces with Dynamo alone)."""
    wm = tiny_world_model("wan")
    context, actions = _inputs(wm, 2, 4)  # window 3: the 2-frame history is full from the first frame
    config = dict(steps=STEPS, window=3)
    reference = rollout(wm, context, actions, config=RolloutConfig(**config)).frames  # fp32, eager
    if dtype is torch.bfloat16:
        precision.to_precision(wm.model, torch.bfloat16)
    eager = rollout(wm, context, actions, config=RolloutConfig(**config))
    compiled = rollout(wm, context, actions, config=RolloutConfig(**config, compile="default"))
    graphs = _graphs()
    # frame 1 runs eagerly (its step key has no predecessor); frames 2..4 compiled, one call per step
    assert compiled.compiled_calls == 3 * STEPS and eager.compiled_calls == 0
    assert compiled.model_calls == eager.model_calls
    assert compiled.frames.dtype == dtype
    scale = reference.std().item()
    diff = (compiled.frames.float() - eager.frames.float()).abs().max().item()
    if dtype is torch.float32:
        assert diff <= 1e-4 * scale, diff
    else:  # bf16: the compiled kernels round differently; as close to fp32 as the eager bf16 rollout
        err_eager = (eager.frames.float() - reference).abs().max().item()
        err_compiled = (compiled.frames.float() - reference).abs().max().item()
        assert err_compiled <= 2 * err_eager + 0.02 * scale, (err_compiled, err_eager, scale)
    again = rollout(wm, context, actions, config=RolloutConfig(**config, compile="default"))
    assert _graphs() == graphs, "a second rollout of the same shapes recompiled"
    assert torch.equal(again.frames, compiled.frames) and again.compiled_calls == compiled.compiled_calls


@pytest.fixture
def dynamo_only(monkeypatch):
    monkeypatch.setattr(compiled_module, "BACKEND", "eager")


def test_a_growing_window_runs_eagerly_and_a_full_one_compiles_once(dynamo_only):
    wm = tiny_world_model("wan")
    context, actions = _inputs(wm, 1, 5)
    # window 3: histories of 1, 2, 2, 2, 2 frames; frame 3 is the first whose key repeats
    seen, session = _graphs_per_frame(wm, context, actions, RolloutConfig(steps=STEPS, window=3, compile="default"))
    assert seen[0] == seen[1] == 0, seen
    assert seen[2] > 0 and seen[2] == seen[3] == seen[4], seen
    assert session.denoiser.compiled_calls == 3 * STEPS


def test_negative_control_compiling_a_growing_window_recompiles(monkeypatch, dynamo_only):
    """Serve every frame compiled, whatever its key: each new history length is a new offset,
    and the counter sees Dynamo compile again (frame 2 after frame 1)."""
    monkeypatch.setattr(CompiledStep, "static", property(lambda self: True))
    wm = tiny_world_model("wan")
    context, actions = _inputs(wm, 1, 3)
    seen, session = _graphs_per_frame(wm, context, actions, RolloutConfig(steps=STEPS, window=3, compile="default"))
    assert 0 < seen[0] < seen[1] == seen[2], seen
    assert session.denoiser.compiled_calls == 3 * STEPS


@pytest.mark.parametrize("name", STREAMING)
def test_every_streaming_plan_traces_or_says_it_cannot(name, dynamo_only):
    """Dynamo alone (backend "eager": its captured graphs run as they are, no code generation):
    every streaming plan's full-window steps are served compiled, give the eager frames, and a
    second rollout compiles nothing; the plans listed in EAGER_ONLY warn once and run eagerly."""
    wm = tiny_world_model(name)
    context, actions = _inputs(wm, 2, 3)
    config = dict(steps=2, window=3)
    eager = rollout(wm, context, actions, config=RolloutConfig(**config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = rollout(wm, context, actions, config=RolloutConfig(**config, compile="default"))
        graphs = _graphs()
        again = rollout(wm, context, actions, config=RolloutConfig(**config, compile="default"))
    cannot = [str(w.message) for w in caught if "cannot compile" in str(w.message)]
    scale = eager.frames.abs().max().item()
    assert torch.allclose(first.frames, eager.frames, rtol=0, atol=1e-5 * scale)
    assert torch.equal(again.frames, first.frames)
    assert first.model_calls == again.model_calls == eager.model_calls  # a failed compile is not a second call
    # either way the second session traces nothing: the graphs are reused, or the failure remembered
    assert _graphs() == graphs, "the second rollout traced the model again"
    if name in EAGER_ONLY:
        assert first.compiled_calls == again.compiled_calls == 0 and len(cannot) == 1, cannot
    else:
        assert first.compiled_calls == again.compiled_calls == 2 * 2 and not cannot, cannot
        assert graphs > 0


def test_negative_control_a_disabled_dynamo_is_not_counted_as_compiled(dynamo_only):
    """With Dynamo disabled the compiled forward runs eagerly without raising: the step must see
    that nothing was compiled, say so, and count no compiled call."""
    # Dynamo's own patch: on torch 2.11 monkeypatch's undo leaves "disable" deleted from the config
    wm = tiny_world_model("wan")
    context, actions = _inputs(wm, 2, 3)
    with torch._dynamo.config.patch(disable=True), pytest.warns(UserWarning, match="compiled nothing"):
        result = rollout(wm, context, actions, config=RolloutConfig(steps=2, window=3, compile="default"))
    assert result.compiled_calls == 0 and _graphs() == 0


def test_an_error_inside_a_compiled_call_leaves_every_forward_as_it_was(dynamo_only):
    wm = tiny_world_model("wan")
    from causalize.rollout.streaming import Stream

    eager = Stream.of(wm.model, wm.plan).attention_modules()
    assert eager, "the streaming attention modules are found"
    step = CompiledStep(wm.model, "default", eager=eager)
    step.start_frame(("k",))
    step.start_frame(("k",))

    def boom() -> torch.Tensor:
        raise ValueError("not a compile error")

    with pytest.raises(ValueError, match="not a compile error"):
        step.run(boom)
    assert not [name for name, m in wm.model.named_modules() if "forward" in vars(m)]
    assert step.failure is None and step.calls == 0


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(compile="fastest"), "unknown compile mode"),
        (dict(compile="default", cache="rolling"), "needs cache='exact'"),
        (dict(compile="default", cache=False), "needs cache='exact'"),
    ],
)
def test_bad_compile_settings_are_refused_before_any_frame(settings, needle):
    with pytest.raises(UsageError, match=needle):
        RolloutConfig(**settings).validate()


def test_the_model_forward_is_left_as_it_was(dynamo_only):
    """The compiled forward (and the eager attention stand-ins) are swapped in around a call and
    out again: after a compiled rollout no module has an instance forward, and one it had is kept."""
    wm = tiny_world_model("wan")
    context, actions = _inputs(wm, 2, 3)
    rollout(wm, context, actions, config=RolloutConfig(steps=2, window=3, compile="default"))
    assert not [name for name, m in wm.model.named_modules() if "forward" in vars(m)]
    marker = wm.model.forward
    object.__setattr__(wm.model, "forward", marker)
    step = CompiledStep(wm.model, "default")
    step.start_frame(("k",))
    step.start_frame(("k",))
    seen = []
    step.run(lambda: seen.append(wm.model.forward) or torch.zeros(1))
    assert seen[0] is not marker and wm.model.forward is marker
