"""The Diffusion Forcing trainer (causalize.training.trainer) on a tiny pixel-space world model.

The model is the unet3d plan's tiny UNet3DConditionModel with 3 input / output channels, converted
with a 2-D continuous action adapter; the data are 16×16 RGB episodes of a square moved by the
actions. Every run is on the CPU, where the trainer is bit-for-bit deterministic.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import causalize.training.trainer as trainer_mod
from causalize.api import convert, convert_model, verify_model
from causalize.context import context_preserving_checkpoint
from causalize.episodes import ActionSpace, create_dataset, write_episode
from causalize.errors import UsageError
from causalize.noise import NoiseSchedule
from causalize.plugin_manager import registries
from causalize.training.trainer import (
    TrainConfig,
    TrainingError,
    draw_step_inputs,
    latest_checkpoint,
    step_generator,
    train,
)
from causalize.world_model import WorldModel

A = 2  # action dimension
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------- fixtures


def _tiny_unet(channels: int, **extra):
    from diffusers import UNet3DConditionModel

    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    return UNet3DConditionModel(**{**plan.tiny_config, "in_channels": channels, "out_channels": channels, **extra})


def _converted(root: Path, name: str, channels: int = 3, action_dim: int = A) -> Path:
    src, out = root / f"{name}-src", root / name
    _tiny_unet(channels).save_pretrained(src)
    convert(src, out, action_dim=action_dim)
    return out


def _moving_square(root: Path, episodes: int = 3, length: int = 12, action_dim: int = A, seed: int = 0) -> Path:
    """Episodes of a 4×4 white square on black, moved by continuous actions (pixels / 2 per unit)."""
    create_dataset(root, ActionSpace.continuous(action_dim), frame_shape=(16, 16, 3))
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        actions = rng.uniform(-1, 1, (length, action_dim)).astype(np.float32)
        frames = np.zeros((length, 16, 16, 3), np.uint8)
        pos = rng.uniform(2, 10, 2)
        for t in range(length):
            x, y = np.clip(pos, 0, 12).astype(int)
            frames[t, y : y + 4, x : x + 4] = 255
            pos = pos + 2 * actions[t, :2]
        write_episode(root, e, frames=frames, actions=actions)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return {
        "root": root,
        "model": _converted(root, "wm"),
        "data": _moving_square(root / "data"),
    }


def _config(work, out: Path, **kw) -> TrainConfig:
    # device="cpu": bit-exact resume is a CPU guarantee (GPU kernels are not bit-deterministic), so
    # these tests pin the CPU even on a machine with a GPU
    base = dict(
        model=str(work["model"]),
        data=str(work["data"]),
        output_dir=str(out),
        window=6,
        batch_size=2,
        steps=2,
        lr=1e-3,
        log_every=1,
        checkpoint_every=0,
        split=None,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Recorder:
    """Wraps WorldModel.forward to record what the trainer feeds the model."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = WorldModel.forward

        def forward(wm, sample, timesteps, actions=None, action_mask=None, **kw):
            self.calls.append(
                {
                    "timesteps": timesteps.clone(),
                    "action_mask": None if action_mask is None else action_mask.clone(),
                    "actions": actions,
                    "sample_shape": tuple(sample.shape),
                    "kwargs": kw,
                }
            )
            return original(wm, sample, timesteps, actions, action_mask, **kw)

        monkeypatch.setattr(WorldModel, "forward", forward)


# ------------------------------------------------------------------------------- 1. overfitting


def test_loss_falls_on_a_fixed_window(tmp_path, work):
    """Overfitting: ONE 4-frame window (a one-episode dataset, batch 1), the real objective (fresh
    per-frame noise levels, noise and action dropout every step), seed 0, lr 3e-3, grad clip 0.5.
    Within N = 100 steps the mean loss of the last 10 steps is < 0.5 × the mean of the first 5
    (measured: 0.32 for seed 0; 0.32–0.43 for seeds 0–2)."""
    data = tmp_path / "one"
    create_dataset(data, ActionSpace.continuous(A), frame_shape=(16, 16, 3))
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    for t in range(4):
        frames[t, 4:8, 2 + t : 6 + t] = 255
    write_episode(data, 0, frames=frames, actions=np.tile(np.float32([[1.0, 0.5]]), (4, 1)))
    out = tmp_path / "run"
    result = train(_config(work, out, data=str(data), window=4, batch_size=1, steps=100, lr=3e-3))
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 100 and result["steps"] == 100
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (np.mean(losses[:5]), np.mean(losses[-10:]))


# -------------------------------------------------------------------- 2./3. resume, metrics, final


@pytest.fixture(scope="module")
def uninterrupted(work):
    """4 steps, batch 4 × accumulation 2 over 21 windows (5 batches an epoch, so step 3 crosses
    into epoch 1), checkpoints at steps 2 and 4."""
    out = work["root"] / "full"
    result = train(_config(work, out, steps=4, batch_size=4, gradient_accumulation=2, checkpoint_every=2))
    return out, result


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_from_a_checkpoint_replays_the_uninterrupted_run(work, uninterrupted, tmp_path):
    full, _ = uninterrupted
    ckpt = full / "checkpoints" / "step-2"
    out = tmp_path / "resumed"
    result = train(
        _config(work, out, steps=4, batch_size=4, gradient_accumulation=2, checkpoint_every=2, resume=str(ckpt))
    )
    assert result["start_step"] == 2 and result["steps_run"] == 2 and result["resumed_from"] == str(ckpt)
    expected = {m["step"]: m["loss"] for m in _metrics(full)}
    got = {m["step"]: m["loss"] for m in _metrics(out)}
    assert got == {3: expected[3], 4: expected[4]}  # exactly equal on the CPU
    _same_weights(out / "final", full / "final")


def test_resume_true_continues_from_the_latest_checkpoint(work, uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "interrupted"
    cfg = _config(work, out, steps=2, batch_size=4, gradient_accumulation=2, checkpoint_every=2)
    train(cfg)
    with (out / "metrics.jsonl").open("a") as fh:  # a step logged after the checkpoint, then a crash
        fh.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(cfg.replace(steps=4))
    result = train(cfg.replace(steps=4, resume=True))
    assert result["start_step"] == 2
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(full)]
    _same_weights(out / "final", full / "final")
    assert latest_checkpoint(out) == out / "checkpoints" / "step-4"


def test_metrics_checkpoints_and_final_model(uninterrupted):
    out, result = uninterrupted
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert {"step", "loss", "lr", "seconds_per_step", "samples_per_second", "loss_per_frame", "grad_norm"} <= set(m)
        assert np.isfinite(m["loss"]) and m["lr"] == 1e-3 and m["seconds_per_step"] > 0
        assert len(m["loss_per_frame"]) == 6
        assert m["loss"] == pytest.approx(float(np.mean(m["loss_per_frame"])), rel=1e-5)
    assert result["final_loss"] == lines[-1]["loss"]
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step and state["config"]["gradient_accumulation"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert json.loads((out / "final" / "training.json").read_text())["step"] == 4
    wm = WorldModel.from_pretrained(out / "final")
    assert wm.action_encoder is not None and wm.action_encoder.action_dim == A
    assert verify_model(wm.model, wm.plan, frames=4).passed


# ----------------------------------------------------------------- 4./5. action dropout, timesteps


def test_draws_drop_actions_with_probability_p_and_never_restore_missing_ones():
    schedule = NoiseSchedule.from_config()
    x0 = torch.zeros(8, 3, 16, 4, 4)
    data_mask = torch.ones(8, 16, dtype=torch.bool)
    data_mask[:, 0] = False
    dropped = total = 0
    for step in range(200):
        d = draw_step_inputs(
            x0, data_mask, schedule=schedule, frame_axis=2, generator=step_generator(0, step), action_dropout=0.2
        )
        assert not d.keep[:, 0].any()
        dropped += int((~d.keep[:, 1:]).sum())
        total += d.keep[:, 1:].numel()
    assert dropped / total == pytest.approx(0.2, abs=0.01)  # 24000 draws: std 0.0026


def test_trainer_applies_action_dropout(work, tmp_path, monkeypatch):
    """Inside the trainer: the mask the model receives is action_keep_mask(p) & the data's mask,
    and over 10 steps × 12 frames the dropped fraction of action_keep_mask is ≈ p = 0.5."""
    rec = _Recorder(monkeypatch)
    drawn, probs = [], []
    original = trainer_mod.action_keep_mask

    def keep_mask(*args, **kw):
        probs.append(args[2] if len(args) > 2 else kw.get("drop_prob"))
        drawn.append(original(*args, **kw))
        return drawn[-1]

    monkeypatch.setattr(trainer_mod, "action_keep_mask", keep_mask)
    train(_config(work, tmp_path / "run", steps=10, action_dropout=0.5, log_every=10))
    assert probs == [0.5] * 10 and len(rec.calls) == 10
    for call, keep in zip(rec.calls, drawn):
        assert not (call["action_mask"] & ~keep).any()  # nothing dropped comes back
    frac = float(torch.stack([~k for k in drawn]).float().mean())
    assert frac == pytest.approx(0.5, abs=0.15)  # 120 draws: std 0.046


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_timestep_mode(work, tmp_path, monkeypatch, mode):
    rec = _Recorder(monkeypatch)
    train(_config(work, tmp_path / "run", steps=2, batch_size=4, timestep_mode=mode))
    ts = torch.cat([c["timesteps"] for c in rec.calls])  # (8, 6)
    assert ts.shape == (8, 6) and ts.dtype == torch.long
    equal_rows = (ts == ts[:, :1]).all(dim=1)
    if mode == "shared":
        assert equal_rows.all()
    else:
        assert not equal_rows.any()
    # the sample reaches the model in UNet3D's native layout (B, C, T, H, W)
    assert rec.calls[0]["sample_shape"] == (4, 3, 6, 16, 16)
    ehs = rec.calls[0]["kwargs"]["encoder_hidden_states"]
    assert ehs.shape[0] == 4 and not ehs.any()  # the empty prompt: zeros at the batch size


# ------------------------------------------------------------------------------------- 6. errors


def test_action_dimension_mismatch_names_both(work, tmp_path):
    data = _moving_square(tmp_path / "data3", episodes=2, action_dim=3)
    with pytest.raises(TrainingError, match=r"has 3 dimensions .* expects 2"):
        train(_config(work, tmp_path / "run", data=str(data)))


def test_channel_mismatch_names_both(work, tmp_path):
    model4 = _converted(tmp_path, "wm4", channels=4)
    with pytest.raises(TrainingError, match=r"channel mismatch: .* 3 channels .* has 4"):
        train(_config(work, tmp_path / "run", model=str(model4)))


@pytest.mark.parametrize("what", ["model", "data", "resume", "unconverted", "no-adapter"])
def test_missing_or_unusable_paths(work, tmp_path, what):
    kw: dict = {}
    if what == "unconverted":
        kw["model"] = str(work["root"] / "wm-src")
    elif what == "no-adapter":
        kw["model"] = str(_converted(tmp_path, "plain", action_dim=0))
    elif what == "resume":
        kw["resume"] = str(tmp_path / "nowhere")
    else:
        kw[what] = str(tmp_path / "nowhere")
    with pytest.raises(UsageError) as info:
        train(_config(work, tmp_path / "run", **kw))
    needle = {
        "model": "not found",
        "data": "not found",
        "resume": "not a training checkpoint",
        "unconverted": "not a converted",
        "no-adapter": "no per-frame timesteps|no action adapter",
    }[what]
    assert info.match(needle)
    assert not (tmp_path / "run" / "final").exists()


def test_config_file_toml_json_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d"\noutput_dir = "o"\nsteps = 7\nlr = 0.01\n[unused]\n')
    with pytest.raises(TrainingError, match="unknown setting 'unused'"):
        TrainConfig.from_file(toml)
    toml.write_text('[train]\nmodel = "m"\ndata = "d"\noutput_dir = "o"\nsteps = 7\nlr = 0.01\n')
    cfg = TrainConfig.from_file(toml, steps=9, lr=None)
    assert (cfg.steps, cfg.lr, cfg.model, cfg.prediction_type, cfg.action_dropout) == (9, 0.01, "m", "v", 0.2)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"model": "m", "data": "d", "output_dir": "o", "batchsize": 1}))
    with pytest.raises(TrainingError, match="did you mean .batch_size."):
        TrainConfig.from_file(js)
    with pytest.raises(TrainingError, match="missing required setting"):
        TrainConfig.from_file(None, model="m")
    with pytest.raises(TrainingError, match="timestep_mode"):
        TrainConfig(model="m", data="d", output_dir="o", timestep_mode="diagonal")
    with pytest.raises(TrainingError, match="action_dropout"):
        TrainConfig(model="m", data="d", output_dir="o", action_dropout=1.0)


# ------------------------------------------------------------------- gradient checkpointing, VAE


def test_gradient_checkpointing_keeps_the_per_frame_conditioning():
    """diffusers recomputes checkpointed blocks in backward, after the forward cleared the frame
    context; the trainer's checkpoint function replays it, so the gradients equal those without
    checkpointing (AnimateDiff's UNetMotionModel, whose blocks take per-frame embeddings)."""
    from causalize.context import CONTEXT_ATTR

    plan = registries().plans.get("animatediff")
    model = plan.build_tiny()
    convert_model(model, plan, f"{plan.pipeline},frame-conditioning{{action_dim={A}}}")
    for p in model.causalize_action_encoder.parameters():  # the zero-initialised last layer
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    wm = WorldModel(model, plan).train()
    inputs = plan.make_inputs(model, 4, torch.Generator().manual_seed(0))
    sample = inputs.pop("sample")
    inputs.pop("timestep")
    gen = torch.Generator().manual_seed(1)
    t, a = torch.randint(0, 1000, (1, 4), generator=gen), torch.randn(1, 4, A, generator=gen)

    def grads(w):
        w.zero_grad()
        w(sample, t, a, None, **inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}

    reference = grads(wm)
    ckpt = copy.deepcopy(wm)
    ckpt.model.enable_gradient_checkpointing(context_preserving_checkpoint(getattr(ckpt.model, CONTEXT_ATTR)))
    got = grads(ckpt)
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_unsupported_warns(work, tmp_path):
    with pytest.warns(UserWarning, match="does not support gradient checkpointing"):
        result = train(_config(work, tmp_path / "run", steps=1, gradient_checkpointing=True))
    assert result["gradient_checkpointing"] is False


def test_latent_training_through_a_frozen_vae(work, tmp_path):
    from world_models import tiny_image_vae

    tiny_image_vae().save_pretrained(tmp_path / "vae")
    model4 = _converted(tmp_path, "wm4", channels=4)  # 16x16 pixels -> 4x8x8 latents
    result = train(_config(work, tmp_path / "run", model=str(model4), vae=str(tmp_path / "vae"), steps=1))
    assert np.isfinite(result["final_loss"])
    with pytest.raises(TrainingError, match="channel mismatch"):  # 4 latent channels into a 3-channel model
        train(_config(work, tmp_path / "run2", vae=str(tmp_path / "vae")))


def test_train_only_adapter_changes_only_the_adapter(work, tmp_path):
    out = tmp_path / "run"
    result = train(_config(work, out, steps=2, train_only="adapter"))
    assert 0 < result["trainable_parameters"] < result["parameters"]
    before, after = load_file(work["model"] / WEIGHTS), load_file(out / "final" / WEIGHTS)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("causalize_action_encoder.") for k in changed)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_adapter_lr_scale_sets_the_adapters_rate(work, tmp_path, scale):
    """One AdamW step moves each weight by about its rate (the first step's update is lr · g/|g|):
    the adapter's largest move is lr × scale, the denoiser's lr. Scale 1 is the control: the
    adapter then moves like the denoiser."""
    lr = 1e-3
    out = tmp_path / "run"
    train(_config(work, out, steps=1, lr=lr, weight_decay=0.0, adapter_lr_scale=scale))
    before, after = load_file(work["model"] / WEIGHTS), load_file(out / "final" / WEIGHTS)
    moves = {k: float((after[k].double() - before[k].double()).abs().max()) for k in before}
    adapter = max(v for k, v in moves.items() if k.startswith("causalize_action_encoder."))
    denoiser = max(v for k, v in moves.items() if not k.startswith("causalize_action_encoder."))
    assert adapter == pytest.approx(lr * scale, rel=0.01)
    assert denoiser == pytest.approx(lr, rel=0.01)
    assert _metrics(out)[-1]["lr"] == lr  # the logged rate is the denoiser's


@pytest.mark.parametrize("strength", [0.0, 3.0])
def test_motion_weight_reaches_the_loss(work, tmp_path, monkeypatch, strength):
    """The trainer weights the loss by motion_weights of the clean clip at the configured strength;
    at 0 (the default, the control) it computes the plain loss and never builds weights."""
    from causalize.training import objective

    calls = []
    original = objective.motion_weights

    def recording(x0, frame_axis, s):
        calls.append((tuple(x0.shape), frame_axis, s))
        return original(x0, frame_axis, s)

    monkeypatch.setattr(objective, "motion_weights", recording)
    result = train(_config(work, tmp_path / "run", steps=1, motion_weight=strength))
    plain = train(_config(work, tmp_path / "plain", steps=1))
    assert [c[2] for c in calls] == ([strength] if strength else [])
    # the weights reach the loss: same draws, another value unless the strength is 0
    assert (result["final_loss"] == plain["final_loss"]) == (strength == 0)
    with pytest.raises(TrainingError, match="motion_weight"):
        _config(work, tmp_path / "bad", motion_weight=-1.0)


def test_resume_with_other_rates(work, tmp_path):
    """Resuming takes the configured rates, not the checkpoint's, and warns that the run will not
    replay; a change between one rate and an adapter rate of its own is refused (the optimizer
    state has another number of parameter groups)."""
    out = tmp_path / "run"
    train(_config(work, out, steps=1, checkpoint_every=1))
    with pytest.warns(UserWarning, match="different lr"):
        train(_config(work, out, steps=2, checkpoint_every=1, lr=2e-3, resume=True))
    assert [m["lr"] for m in _metrics(out)] == [1e-3, 2e-3]
    with pytest.raises(TrainingError, match="adapter_lr_scale"):
        train(_config(work, out, steps=3, checkpoint_every=1, lr=2e-3, adapter_lr_scale=10.0, resume=True))
    # when only the adapter trains there is one group whatever the scale: the change is allowed
    only = tmp_path / "only"
    train(_config(work, only, steps=1, checkpoint_every=1, train_only="adapter"))
    with pytest.warns(UserWarning, match="different adapter_lr_scale"):
        train(_config(work, only, steps=2, train_only="adapter", adapter_lr_scale=10.0, resume=True))
    assert [m["lr"] for m in _metrics(only)] == [1e-3, 1e-2]
    # another train_only: the optimizer state belongs to other parameters (before: torch's bare
    # ValueError at scale 1, a wrong hint at another scale)
    for scale in (1.0, 10.0):
        with pytest.raises(TrainingError, match="train_only='adapter', this run asks for 'all'"):
            train(_config(work, only, steps=3, adapter_lr_scale=scale, resume=True))


def test_adapter_lr_scale_must_be_positive(work, tmp_path):
    with pytest.raises(TrainingError, match="adapter_lr_scale"):
        _config(work, tmp_path / "run", adapter_lr_scale=0.0)


# ------------------------------------------------------------------------------------------ 7. CLI


def test_cli_train_json(work, tmp_path):
    from causalize.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(work["model"]),
            "--data",
            str(work["data"]),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--window",
            "6",
            "--lr",
            "0.001",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["steps"] == 2 and doc["final"] == str(out / "final") and np.isfinite(doc["final_loss"])
    assert (out / "final" / "causalize.json").is_file()
    again = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(work["model"]),
            "--data",
            str(work["data"]),
            "--out",
            str(out),
            "--steps",
            "2",
            "--json",
        ],
    )
    assert again.exit_code == 2 and json.loads(again.stdout)["error"]["kind"] == "training-error"


def test_cli_train_help():
    from causalize.cli.app import app

    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--data", "--out", "--steps", "--batch-size", "--lr", "--window", "--resume", "--json"):
        assert option in result.stdout


def test_runs_of_another_set_up_in_one_process_get_their_own(work, tmp_path):
    """accelerate keeps one set-up per process; the trainer starts afresh when a run needs another
    (without that, the second run here is refused; and a cuda run after a CPU one trained on the
    CPU: tests/test_emulated_cuda.py)."""
    first = train(_config(work, tmp_path / "fp32", steps=1))
    second = train(_config(work, tmp_path / "bf16", steps=1, mixed_precision="bf16"))
    third = train(_config(work, tmp_path / "again", steps=1))
    assert (first["mixed_precision"], second["mixed_precision"], third["mixed_precision"]) == ("no", "bf16", "no")
    losses = [[m["loss"] for m in _metrics(tmp_path / run)] for run in ("fp32", "again")]
    assert losses[0] == losses[1]
