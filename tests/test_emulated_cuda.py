"""causalize.testing.emulated_cuda: CUDA's device rules checked on the CPU, so a device-placement
bug is found here rather than in a lent GPU's few minutes.

The emulation itself first (what it catches, with its negative controls), then the library on it:
every streaming plan's rollout and the trainer run on emulated ``cuda`` with the CPU's numbers, and
a device bug put into each of them is caught.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._triton
from world_models import tiny_world_model

import causalize.rollout.sampler as sampler_mod
import causalize.training.trainer as trainer_mod
from causalize import precision
from causalize.noise import gaussian
from causalize.plugin_manager import registries
from causalize.rollout.sampler import RolloutConfig, rollout
from causalize.testing.emulated_cuda import DeviceMismatch, OnCuda, emulated_cuda

STREAMING = [
    p.name
    for p in registries().plans
    if p.conditioning is not None and p.layout.block_size == 1 and p.streaming is not None
]
assert len(STREAMING) == 24  # an empty list would skip the parametrised test silently


def _values(t: torch.Tensor) -> torch.Tensor:
    return t.elem if isinstance(t, OnCuda) else t


# ----------------------------------------------------------------------------- the emulation


def test_a_module_on_cuda_reports_cuda_and_computes_the_cpu_numbers():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    expected = lin(x)
    with emulated_cuda() as mode:
        lin.to("cuda")
        assert lin.weight.device == torch.device("cuda", 0) and lin.weight.is_cuda
        assert isinstance(lin.weight, torch.nn.Parameter)
        y = lin(x.to("cuda"))
        assert y.device.type == "cuda"
        y.sum().backward()
        assert lin.weight.grad.device.type == "cuda"
        back = y.detach().cpu()
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        assert torch.equal(back, expected.detach())
        assert y.sum().item() == pytest.approx(expected.sum().item())
    assert mode.ops > 0


def test_cpu_and_cuda_tensors_may_not_meet():
    """The negative control of every test below: what CUDA refuses, the emulation refuses."""
    with emulated_cuda():
        lin = torch.nn.Linear(4, 3).to("cuda")
        with pytest.raises(DeviceMismatch, match=r"aten\.addmm.*cuda \(3,\), cpu \(2, 4\)"):
            lin(torch.randn(2, 4))
        x = torch.ones(2, 3, device="cuda")
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim CPU tensor may, as on CUDA
        assert x[torch.tensor([1])].device.type == "cuda"  # so may CPU indices
        x.copy_(torch.zeros(2, 3))  # and copies
        with pytest.raises(DeviceMismatch):
            torch.ones(3)[torch.tensor([0], device="cuda")]
        with pytest.raises(DeviceMismatch, match="does not exist"):
            torch.zeros(1, device="cuda:1")


@pytest.mark.parametrize(
    "bug",
    [
        "torch.stack([loss, torch.tensor(0.0)])",  # a 0-dim CPU tensor outside a pointwise op
        "torch.nn.Embedding(10, 4).cuda()(torch.tensor(3))",
        "torch.searchsorted(x, torch.tensor(2.5))",
        "x.masked_fill(torch.tensor(True), 0.0)",  # a mask follows the tensor
        "torch.zeros(()).add_(loss)",  # a CPU tensor written with a cuda result
        "torch.sum(x, 0, out=torch.zeros(()))",
        "x.__setitem__(torch.tensor([0, 1]), torch.ones(2))",  # CPU indices may, CPU values may not
        "torch.zeros(3).__setitem__(torch.tensor([0], device='cuda'), torch.ones(1, device='cuda'))",
        "x.cuda(1)",
    ],
)
def test_what_cuda_refuses_beyond_shapes(bug):
    with emulated_cuda():
        x = torch.arange(3.0, device="cuda")
        with pytest.raises(DeviceMismatch):
            eval(bug, {"torch": torch}, {"x": x, "loss": x.sum()})


def test_what_cuda_allows_is_allowed():
    """The positive side of the rules above: a 0-dim CPU operand of a pointwise op or a fill value,
    CPU indices and masks for indexing, ints and 'cuda' as devices."""
    with emulated_cuda():
        x = torch.arange(3.0, device="cuda")
        assert (x * torch.tensor(2.0)).device.type == "cuda"
        assert torch.where(x > 0, x, torch.tensor(0.0)).device.type == "cuda"
        x[torch.tensor([0])] = torch.ones(1, device="cuda")
        x[torch.tensor([True, False, True])] = 0.0
        x.fill_(torch.tensor(1.0))
        assert torch.zeros(2, device=0).device.type == torch.zeros(2).to(0).device.type == "cuda"
        assert (x.new_tensor([1.0, 2.0, 3.0]) + x).device.type == "cuda" and x.get_device() == 0
        assert torch.tensor([x.sum(), x.sum()]).device.type == "cpu"  # built from cuda scalars: CPU, as on CUDA
        assert x.numpy(force=True).tolist() == [1.0, 1.0, 1.0]


def test_backward_passes_are_checked_and_gradients_cross_devices():
    """A device bug in a hook or a custom backward is caught like one in a forward pass; gradients
    follow moves between the CPU and cuda (both ways) with the right values and devices."""

    class CpuInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.ones(3)

    with emulated_cuda():
        v = torch.ones(3, device="cuda", requires_grad=True)
        with pytest.raises(DeviceMismatch):
            CpuInBackward.apply(v).sum().backward()
        v.register_hook(lambda g: g + torch.arange(3.0))
        with pytest.raises(DeviceMismatch):
            (v * 2).sum().backward()
        w = torch.ones(3, device="cuda", requires_grad=True)
        ((w * 2).sum() + (w * 3).to("cpu").sum().to("cuda")).backward()
        assert w.grad.device.type == "cuda" and w.grad.cpu().tolist() == [5.0, 5.0, 5.0]
        leaf = torch.ones(3, requires_grad=True)
        (leaf.to("cuda") * 2).sum().backward()
        assert leaf.grad.device.type == "cpu" and leaf.grad.tolist() == [2.0, 2.0, 2.0]


def test_random_draws_need_a_generator_of_their_device():
    with emulated_cuda():
        on_gpu = torch.Generator(device="cuda").manual_seed(0)
        assert torch.randn(3, generator=on_gpu, device="cuda").device.type == "cuda"
        with pytest.raises(DeviceMismatch, match="cuda generator draws for a cpu tensor"):
            torch.randn(3, generator=on_gpu)
        with pytest.raises(DeviceMismatch, match="cpu generator draws for a cuda tensor"):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device="cuda")
        # diffusers' randn_tensor draws on its generator's device
        assert on_gpu.device.type == "cuda" and torch.Generator().device.type == "cpu"
        assert isinstance(torch.default_generator, torch.Generator)  # made before the emulation


def test_host_copies_numpy_and_casts():
    with emulated_cuda():
        x = torch.tensor([1.0, 2.0], device="cuda")
        assert x.device.type == "cuda" and x.tolist() == [1.0, 2.0]
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            x.numpy()
        assert x.cpu().numpy().tolist() == [1.0, 2.0]
        assert x.to("cuda") is x
        half = x.to(torch.bfloat16)
        assert half.device.type == "cuda" and _values(half).dtype == torch.bfloat16
        assert torch.ones(2).type_as(x).device.type == "cuda"  # torch's C++ reads x's options
        assert torch.ones(2).to(x).device.type == "cuda"
        p = torch.nn.Linear(2, 2).to("cuda").weight
        p.data = p.data.to(torch.bfloat16)  # how precision.to_precision casts parameters
        assert p.dtype == _values(p).dtype == torch.bfloat16
        y = torch.nn.functional.rms_norm(half, (2,), torch.ones(2, device="cuda", dtype=torch.bfloat16))
        assert y.device.type == "cuda"  # its C++ casts back with the input's options
        assert torch.nn.functional.one_hot(torch.tensor([1, 0], device="cuda"), 3).device.type == "cuda"


def test_the_process_is_given_back_and_emulations_do_not_nest():
    """Also after an error inside; accelerate's set-up made inside does not outlive the block."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    before = (torch.cuda.is_available, torch.accelerator.current_accelerator, torch.Generator)
    triton = torch.utils._triton.has_triton
    swap = torch.__future__.get_swap_module_params_on_conversion()
    with pytest.raises(ValueError, match="inside"), emulated_cuda():
        assert torch.cuda.is_available() and torch.accelerator.current_accelerator().type == "cuda"
        assert Accelerator().device.type == "cuda"
        assert torch.cuda.get_device_properties(0).major == 9 and not torch.utils._triton.has_triton()
        with pytest.raises(ValueError, match="Expected a cuda device"):
            torch.cuda.get_device_properties("cpu")
        with pytest.raises(DeviceMismatch, match="cuda:1 does not exist"):
            torch.cuda.get_device_properties("cuda:1")
        with pytest.raises(RuntimeError, match="already active"), emulated_cuda():
            pass
        raise ValueError("inside")
    assert (torch.cuda.is_available, torch.accelerator.current_accelerator, torch.Generator) == before
    assert torch.utils._triton.has_triton is triton
    assert "as_subclass" not in torch.Tensor.__dict__  # inherited again, not re-set
    assert torch.__future__.get_swap_module_params_on_conversion() == swap
    assert torch.zeros(1).device.type == "cpu" and PartialState._shared_state == {}
    with emulated_cuda():  # and it can be entered again
        assert torch.ones(1, device="cuda").device.type == "cuda"


def test_the_launcher_runs_a_module_and_fails_on_a_device_bug(tmp_path):
    (tmp_path / "clean.py").write_text("import torch\nprint((torch.ones(2, device='cuda') * 2).device)\n")
    (tmp_path / "same.py").write_text(  # the program and the launcher share one emulation
        textwrap.dedent(
            """
            import torch
            from causalize.testing.emulated_cuda import OnCuda, emulated_cuda
            assert type(torch.ones(1, device="cuda")) is OnCuda
            try:
                with emulated_cuda():
                    pass
            except RuntimeError as error:
                print(error)
            """
        )
    )
    (tmp_path / "buggy.py").write_text(
        textwrap.dedent(
            """
            import torch
            model = torch.nn.Linear(2, 2).to("cuda")
            model(torch.ones(1, 2))  # the input was never moved
            """
        )
    )

    def launch(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "causalize.testing.emulated_cuda", *args]
        env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    clean = launch("-m", "clean")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip() == "cuda:0" and "operations checked" in clean.stderr
    buggy = launch("-m", "buggy")
    assert buggy.returncode != 0 and "DeviceMismatch" in buggy.stderr and "cpu (1, 2)" in buggy.stderr
    same = launch("-m", "same")
    assert same.returncode == 0 and "already active" in same.stdout, same.stderr
    usage = launch()
    assert usage.returncode == 2 and "usage:" in usage.stderr


# ------------------------------------------------------------------------ the library on it


def _rollout_inputs(wm):
    cond = wm.plan.conditioning
    context = wm.plan.make_inputs(wm.model, 2, torch.Generator().manual_seed(0))[cond.sample_arg]
    actions = torch.randn(context.shape[0], 3, 3, generator=torch.Generator().manual_seed(1))
    return context, actions


# bf16 for a plan of each kind of code path its casts take (fp32-kept modules, RMS norms that cast
# back with the input's options, autocast inside the model, UNets): the suite's time
BF16 = ["unet3d", "svd", "wan", "kandinsky6", "hunyuan15", "ltx", "cogvideox", "mochi"]
RUNS = [(name, torch.float32) for name in STREAMING] + [(name, torch.bfloat16) for name in BF16]


@pytest.mark.parametrize(("name", "dtype"), RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in RUNS])
def test_every_streaming_plan_rolls_out_on_cuda_with_the_cpu_numbers(name, dtype, monkeypatch):
    """Exact streaming and full recomputation, on the CPU and on emulated cuda: no tensor of the
    sampler, the caches, the plan's inputs or the converted model's modules lands on the wrong
    device, and the frames are the CPU's bit for bit (dense attention on both: on cuda `auto`
    would pick another execution)."""
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "dense")
    wm = tiny_world_model(name)
    precision.to_precision(wm.model, dtype)
    context, actions = _rollout_inputs(wm)
    expected = {
        c: rollout(wm, context, actions, config=RolloutConfig(cache=c, steps=2, window=3)).frames for c in (True, False)
    }
    with emulated_cuda():
        precision.to_precision(wm.model, device="cuda")
        for cache in (True, False):
            frames = rollout(wm, context, actions, config=RolloutConfig(cache=cache, steps=2, window=3)).frames
            assert frames.device.type == "cuda" and frames.dtype == dtype
            assert torch.equal(_values(frames), expected[cache]), (name, cache)


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [
        ("wan", None),  # KV caches evicted by frame id
        ("unet3d", "causal-temporal-conv,causal-temporal-attention,causal-norm{mode=cumulative}"),  # norm statistics
        ("sana-video", None),  # linear-attention sums
    ],
)
def test_rolling_caches_evict_on_cuda_with_the_cpu_numbers(name, pipeline, monkeypatch):
    """Rolling caches past the slide (window 3, sink 1, 6 frames): what eviction rebuilds (kept
    keys, norm statistics, linear sums) stays on the device, and the frames are the CPU's bit for bit."""
    monkeypatch.setenv("CAUSALIZE_ATTENTION", "dense")
    wm = tiny_world_model(name) if pipeline is None else tiny_world_model(name, pipeline=pipeline)
    context, _ = _rollout_inputs(wm)
    actions = torch.randn(context.shape[0], 6, 3, generator=torch.Generator().manual_seed(1))
    config = RolloutConfig(cache="rolling", sink=1, steps=2, window=3)
    expected = rollout(wm, context, actions, config=config).frames
    with emulated_cuda():
        precision.to_precision(wm.model, device="cuda")
        frames = rollout(wm, context, actions, config=config).frames
        assert frames.device.type == "cuda"
        assert torch.equal(_values(frames), expected), name


def test_a_device_bug_in_the_rollout_is_caught(monkeypatch):
    """Negative control: noise drawn on the CPU whatever the model's device."""
    monkeypatch.setattr(sampler_mod, "gaussian", lambda shape, gen, device, dtype: gaussian(shape, None, "cpu", dtype))
    wm = tiny_world_model("wan")
    context, actions = _rollout_inputs(wm)
    rollout(wm, context, actions, config=RolloutConfig(steps=2, window=3))  # on the CPU the bug is invisible
    with emulated_cuda():
        wm.model.to("cuda")
        with pytest.raises(DeviceMismatch, match="cuda:0 and cpu"):
            rollout(wm, context, actions, config=RolloutConfig(steps=2, window=3))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from test_trainer import _converted, _moving_square

    root = tmp_path_factory.mktemp("emulated-training")
    return {"root": root, "model": _converted(root, "wm"), "data": _moving_square(root / "data")}


def test_training_on_cuda_gives_the_cpu_run_and_resumes(work, tmp_path):
    """The trainer through accelerate on emulated cuda: the CPU's losses and final weights, through a
    checkpoint (optimizer state saved from cuda tensors) and a resume from it."""
    from test_trainer import _config, _metrics, _same_weights

    from causalize.training.trainer import train

    cpu = train(_config(work, tmp_path / "cpu", steps=4, checkpoint_every=2))
    with emulated_cuda():
        config = _config(work, tmp_path / "gpu", device="cuda", steps=2, checkpoint_every=2)
        first = train(config)
        resumed = train(config.replace(steps=4, resume=True))
    # a cuda run after a CPU one in the same process (accelerate's set-up is per process)
    assert first["device"].startswith("cuda") and resumed["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert resumed["start_step"] == 2 and resumed["steps_run"] == 2
    assert [m["loss"] for m in _metrics(tmp_path / "gpu")] == [m["loss"] for m in _metrics(tmp_path / "cpu")]
    _same_weights(tmp_path / "gpu" / "final", tmp_path / "cpu" / "final")


def test_a_device_bug_in_training_is_caught(work, tmp_path, monkeypatch):
    """Negative control: the trainer's noise drawn on the CPU."""
    from test_trainer import _config

    from causalize.training.trainer import train

    monkeypatch.setattr(trainer_mod, "gaussian", lambda shape, gen, device, dtype: gaussian(shape, None, "cpu", dtype))
    train(_config(work, tmp_path / "cpu", steps=1))  # on the CPU the bug is invisible
    with emulated_cuda(), pytest.raises(DeviceMismatch, match="cuda:0 and cpu"):
        train(_config(work, tmp_path / "gpu", device="cuda", steps=1))
