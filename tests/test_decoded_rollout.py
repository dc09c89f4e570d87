"""Decoded rollouts of latent world models (issue #14 items 3, 4 and "bad input"): `causalize
rollout` / `rollout_to_file` and `WorldModelEnv` on a model trained on `causalize encode` latents
of a tiny Wan pipeline (4 video frames per latent frame, the first alone) and of a tiny UNet3D one
(per-frame AutoencoderKL). Pixel context is encoded, per-video-frame actions are grouped, the
generated latents are decoded once each (exactly as a whole-clip decode), the conditioning stored
with the model is used (a different one warned about, a wrong one refused), and every bad --vae /
--conditioning / frame count is a one-line exit 2 with nothing written.

Everything is built in-process once per module (pipelines, episodes, encode, convert, embed,
2-step training); rollouts use 2 sampler steps."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

iio = pytest.importorskip("imageio.v3")
gymnasium = pytest.importorskip("gymnasium")
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from causalize.api import convert
from causalize.cli.app import app
from causalize.errors import UsageError
from causalize.latents.encode import encode_episodes
from causalize.latents.vae import StreamingDecoder, decode_clip, load_vae
from causalize.plugin_manager import registries
from causalize.prompt import embed_prompt, load_conditioning_file
from causalize.rollout.conditioning import ConditioningWarning, resolve_conditioning
from causalize.rollout.decoded import to_uint8
from causalize.rollout.env import WorldModelEnv
from causalize.rollout.loading import resolve_config
from causalize.rollout.to_file import rollout_to_file
from causalize.testing.episodes import write_toy_episodes
from causalize.testing.pipelines import build_tiny_pipeline
from causalize.training.config import TrainConfig
from causalize.training.trainer import train

runner = CliRunner()
SEED = 3  # not the default 0: the seed must be passed on, not merely coincide
K, N = 4, 3  # video frames per latent frame (Wan), discrete video actions
VIDEO_ACTIONS = [1, 1, 2, 2, 0, 1, 1, 1]  # 8 video frames = 2 latent frames
OTHER_ACTIONS = [0, 0, 0, 0, 2, 2, 2, 2]
FAST = dict(steps=2, seed=SEED, device="cpu")
CLI_FAST = ("--steps", "2", "--seed", str(SEED), "--device", "cpu")
IGNORE_COND_WARNING = pytest.mark.filterwarnings("ignore::causalize.rollout.conditioning.ConditioningWarning")


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def roll(
    work: Work,
    out: Path,
    *extra: object,
    model: Path | None = None,
    context: Path | None = None,
    frames: int = 5,
    actions: Path | None = None,
):
    """`causalize rollout` of the trained Wan run from the episode's first `frames` frames."""
    return cli(
        "rollout",
        model or work.run,
        "--context",
        context or work.episode,
        "--context-frames",
        frames,
        "--actions",
        actions or work.acts,
        "--out",
        out,
        *CLI_FAST,
        *extra,
    )


def multi_hot(video_actions: list[int]) -> np.ndarray:
    """The model's rows (docs/LATENTS.md), written out independently of the library: latent
    frame i's row holds video actions i·k .. i·k+k−1, slot s one-hot in columns s·N .. s·N+N−1."""
    rows = np.zeros((len(video_actions) // K, K * N), np.uint8)
    for i, a in enumerate(video_actions):
        rows[i // K, (i % K) * N + a] = 1
    return rows


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Python's own display of warnings (a line on sys.stderr when raised), which pytest replaces
    by its recorder: what a user of the command sees on the terminal."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def no_conditioning_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if issubclass(w.category, ConditioningWarning)], [str(w.message) for w in caught]


@dataclass
class Work:
    root: Path
    pipe: Path
    episode: Path  # pixel episode 0 (13 frames, 32×32)
    latent_episode: Path  # the same episode encoded (4 latent frames)
    run: Path  # trained with empty.safetensors
    nocond: Path  # trained without conditioning
    empty: Path
    cat: Path
    acts: Path  # 8 video-frame actions
    ref: Path  # rollout_to_file(run, episode[:5], acts) → .npz, seed SEED

    @property
    def pixels(self) -> np.ndarray:
        return np.load(self.episode)["frames"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    root = tmp_path_factory.mktemp("decoded")
    pipe = build_tiny_pipeline("wan", root / "wan-pipe")
    write_toy_episodes(root / "episodes", episodes=4, frames=13, size=32)
    encode_episodes(root / "episodes", root / "latents", pipe)
    convert(pipe, root / "wm", action_dim=K * N, action_type="discrete", verify=False)
    embed_prompt(pipe, "", root / "empty.safetensors")
    embed_prompt(pipe, "a red cat runs left", root / "cat.safetensors")
    # lr 0.05: two steps move the adapter's zero-initialised output layer far enough that actions
    # change the frames (at 1e-5 they change latents by ~1e-5 only, too little to tell apart)
    common = dict(
        model=str(root / "wm"), data=str(root / "latents"), steps=2, window=3, batch_size=1, lr=0.05, device="cpu"
    )
    train(TrainConfig(output_dir=str(root / "run"), conditioning=str(root / "empty.safetensors"), **common))
    train(TrainConfig(output_dir=str(root / "nocond"), **common))
    acts = root / "acts.txt"
    acts.write_text("".join(f"{a}\n" for a in VIDEO_ACTIONS))
    w = Work(
        root=root,
        pipe=pipe,
        episode=root / "episodes/episodes/000000.npz",
        latent_episode=root / "latents/episodes/000000.npz",
        run=root / "run",
        nocond=root / "nocond",
        empty=root / "empty.safetensors",
        cat=root / "cat.safetensors",
        acts=acts,
        ref=root / "ref.npz",
    )
    with no_conditioning_warning():  # the stored conditioning, nothing to warn about
        rollout_to_file(w.run, w.episode, acts, w.ref, context_frames=5, **FAST)
    return w


@pytest.fixture(scope="module")
def ref(work) -> dict:
    z = np.load(work.ref)
    return {
        "frames": z["frames"],
        "latents": z["latents"],
        "actions": z["actions"],
        "meta": json.loads(str(z["rollout"])),
    }


@pytest.fixture(scope="module")
def wan_vae(work):
    return load_vae(work.pipe)


def _decode(vae_and_spec, latents: np.ndarray) -> np.ndarray:
    vae, spec = vae_and_spec
    return to_uint8(decode_clip(vae, spec, torch.from_numpy(latents).movedim(0, 1)[None])[0])


def _out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _nothing_written(out: Path) -> None:
    assert not out.exists() and list(out.parent.iterdir()) == [], list(out.parent.iterdir())


# ---- 1. decoded rollout to .npz / .gif / .mp4 ---------------------------------------------------


def test_npz_holds_decoded_pixels_and_latents(work, ref):
    """5 context video frames (2 latent frames) + 8 actions (2 latent frames) → 13 uint8 frames
    and 4 latent frames; each latent frame decoded once; the recorded VAE, the stored prompt."""
    frames, latents, meta = ref["frames"], ref["latents"], ref["meta"]
    assert frames.shape == (13, 32, 32, 3) and frames.dtype == np.uint8
    assert latents.shape == (4, 4, 4, 4) and latents.dtype == np.float32
    z = np.load(work.ref)
    assert int(z["context_frames"]) == 5
    assert meta["kind"] == "pixels" and (meta["context_frames"], meta["generated"], meta["frames_written"]) == (
        5,
        8,
        13,
    )
    assert meta["vae"]["source"] == "latent.json" and meta["vae"]["class"] == "AutoencoderKLWan"
    assert meta["vae"]["decode"] == "own-cache" and Path(meta["vae"]["path"]) == (work.pipe / "vae").resolve()
    assert meta["conditioning"] == "stored"
    assert len(meta["decode_seconds_all"]) == 4  # one push per latent frame, context included
    assert meta["config"]["seed"] == SEED and meta["config"]["steps"] == 2
    # the actions as the model took them: one 12-wide multi-hot row per generated latent frame
    assert ref["actions"].dtype == np.uint8 and np.array_equal(ref["actions"], multi_hot(VIDEO_ACTIONS))
    # the context is the episode's pixels encoded through the VAE, as `causalize encode` did
    assert np.array_equal(latents[:2], np.load(work.latent_episode)["latents"][:2])


def test_streamed_pixels_equal_a_whole_clip_decode(ref, wan_vae):
    frames, latents = ref["frames"], ref["latents"]
    assert np.array_equal(_decode(wan_vae, latents), frames)  # exact: Wan's causal cache, each frame once
    # negative control: the same generated latents decoded without the context in the VAE's cache
    vae, spec = wan_vae
    fresh = StreamingDecoder(vae, spec)
    clips = [fresh.push(torch.from_numpy(z)[None]) for z in latents[2:]]
    alone = to_uint8(torch.cat(clips, dim=2)[0])
    assert alone.shape == (5, 32, 32, 3)  # a fresh causal decode takes the first latent frame alone
    assert not np.array_equal(alone[-K:], frames[-K:])  # the last latent frame's 4 video frames
    assert np.abs(alone[-K:].astype(int) - frames[-K:]).mean() > 1


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_video_formats_via_cli(work, ref, tmp_path, ext):
    out = tmp_path / f"clip{ext}"
    result = roll(work, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "5 context + 8 generated frames (pixels)" in result.stderr
    assert "over 4 decode call(s); conditioning: stored" in result.stderr
    video = iio.imread(out, index=None)
    assert video.shape == (13, 32, 32, 3) and video.dtype == np.uint8
    # lossy (a 256-colour palette / H.264) but the same clip: every written frame is nearest to the
    # .npz frame of its index (mean errors here: gif ~3, mp4 ~10; between different frames >= 20)
    dist = np.abs(video[:, None].astype(int) - ref["frames"][None].astype(int)).mean(axis=(2, 3, 4))
    assert dist.argmin(axis=1).tolist() == list(range(13)), dist.round(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# ---- 2. actions: video-frame indices or model rows ---------------------------------------------


def test_model_width_rows_give_the_same_rollout(work, ref, tmp_path):
    rows = tmp_path / "rows.npy"
    np.save(rows, multi_hot(VIDEO_ACTIONS))
    out = tmp_path / "rows.npz"
    rollout_to_file(work.run, work.episode, rows, out, context_frames=5, **FAST)
    z = np.load(out)
    assert np.array_equal(z["latents"], ref["latents"]) and np.array_equal(z["frames"], ref["frames"])
    assert np.array_equal(z["actions"], ref["actions"])
    # negative control: other actions give other frames, so the equality above means something
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{a}\n" for a in OTHER_ACTIONS))
    rollout_to_file(work.run, work.episode, other, tmp_path / "other.npz", context_frames=5, **FAST)
    o = np.load(tmp_path / "other.npz")
    assert np.array_equal(o["latents"][:2], ref["latents"][:2])
    assert np.abs(o["latents"][2:] - ref["latents"][2:]).max() > 1e-2
    assert not np.array_equal(o["frames"][5:], ref["frames"][5:])


def test_video_actions_not_a_multiple_of_k_exit_2(work, tmp_path):
    acts = tmp_path / "seven.txt"
    acts.write_text("1\n" * 7)
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, actions=acts)
    assert_one_line_error(result, 2, "7 video-frame actions", "takes 4", "multiple of 4")
    _nothing_written(out)


# ---- 3. context: the VAE's frame rule, or latents ----------------------------------------------


def test_context_breaking_the_frame_rule_exit_2(work, tmp_path):
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, frames=4)
    assert_one_line_error(result, 2, "4 context frames", "1 + 4k frames", "give 1 context frames", "--context-frames")
    _nothing_written(out)


def test_latent_context_gives_the_same_rollout(work, ref, tmp_path):
    out = tmp_path / "clip.npz"
    result = roll(work, out, context=work.latent_episode, frames=2)
    assert result.exit_code == 0, result.output
    z = np.load(out)
    assert int(z["context_frames"]) == 5  # 2 latent frames decode to 5 video frames
    assert np.array_equal(z["latents"], ref["latents"]) and np.array_equal(z["frames"], ref["frames"])


# ---- 4. conditioning -------------------------------------------------------------------------


def test_stored_conditioning_is_the_default(work, ref):
    final = work.run / "final"
    assert (final / "conditioning.safetensors").read_bytes() == work.empty.read_bytes()
    assert ref["meta"]["conditioning"] == "stored"  # the fixture's rollout, which warned about nothing
    with no_conditioning_warning():
        stored, source = resolve_conditioning(final, None)
        assert source == "stored"
        given, source = resolve_conditioning(final, work.empty)  # the same file given: no warning either
        assert source == "option"
    expected = load_conditioning_file(work.empty)
    for tensors in (stored, given):
        assert tensors.keys() == expected.keys() == {"encoder_hidden_states"}
        assert torch.equal(tensors["encoder_hidden_states"], expected["encoder_hidden_states"])


def test_another_prompt_warns_and_reaches_the_model(work, ref, tmp_path):
    out = tmp_path / "cat.npz"
    with pytest.warns(ConditioningWarning, match="differs from the conditioning the model was trained with"):
        report = rollout_to_file(
            work.run, work.episode, work.acts, out, context_frames=5, conditioning=work.cat, **FAST
        )
    assert report.conditioning == "option"
    cat = np.load(out)
    assert json.loads(str(cat["rollout"]))["conditioning"] == "option"
    assert np.array_equal(cat["latents"][:2], ref["latents"][:2])  # the same context
    assert np.abs(cat["latents"][2:] - ref["latents"][2:]).max() > 1e-4  # another prompt, other frames
    assert not np.array_equal(cat["frames"][5:], ref["frames"][5:])
    # the CLI shows the warning on stderr, and the same file again gives identical frames
    out2 = tmp_path / "cat-cli.npz"
    with warnings_to_stderr():
        result = roll(work, out2, "--conditioning", work.cat)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "differs from the conditioning" in result.stderr  # one line, no source
    assert "conditioning: option" in result.stderr
    again = np.load(out2)
    assert np.array_equal(again["latents"], cat["latents"]) and np.array_equal(again["frames"], cat["frames"])


@pytest.fixture(scope="module")
def bad_conditioning(tmp_path_factory, unet3d) -> dict[str, tuple[Path, tuple[str, ...]]]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad-conditioning")
    save_file({"encoder_hidden_states_image": torch.zeros(1, 4, 16)}, str(d / "image-only.safetensors"))
    save_file({"prompt_embeds": torch.zeros(1, 4, 16)}, str(d / "other-key.safetensors"))
    (d / "text.safetensors").write_text("not safetensors")
    return {
        # the UNet3D pipeline's text encoder: width 8, the Wan model takes 16
        "width": (unet3d.empty, ("'encoder_hidden_states'", "width 8", "width 16")),
        "missing": (d / "image-only.safetensors", ("missing 'encoder_hidden_states'",)),
        "unknown": (d / "other-key.safetensors", ("unknown tensor 'prompt_embeds'", "encoder_hidden_states")),
        "not-safetensors": (d / "text.safetensors", ("not a safetensors file",)),
        "absent": (d / "absent.safetensors", ("not found",)),
    }


@IGNORE_COND_WARNING  # a file that differs from the stored one is warned about before it is refused
@pytest.mark.parametrize("case", ["width", "missing", "unknown", "not-safetensors", "absent"])
def test_bad_conditioning_file_exit_2(work, bad_conditioning, tmp_path, case):
    path, needles = bad_conditioning[case]
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, "--conditioning", path)
    assert_one_line_error(result, 2, *needles)
    _nothing_written(out)


def test_model_trained_without_conditioning(work, tmp_path):
    final = work.nocond / "final"
    assert not (final / "conditioning.safetensors").exists()
    with no_conditioning_warning():
        assert resolve_conditioning(final, None) == ({}, "zeros")
    out = tmp_path / "clip.npz"
    with pytest.warns(ConditioningWarning, match="trained without conditioning"):
        report = rollout_to_file(
            work.nocond, work.episode, work.acts, out, context_frames=5, conditioning=work.empty, **FAST
        )
    assert report.conditioning == "option" and out.is_file()
    # the env goes through the same resolution
    lat = np.load(work.latent_episode)["latents"]
    with pytest.warns(ConditioningWarning, match="trained without conditioning"):
        env = WorldModelEnv.from_pretrained(
            work.nocond, context=lat[:2], vae=False, observation="latents", device="cpu", conditioning=work.empty
        )
    assert set(env.model_kwargs) == {"encoder_hidden_states"}


def test_stored_copy_lost_warns_about_zeros(work, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(work.run / "final", final)
    (final / "conditioning.safetensors").unlink()  # training.json still names the file it used
    with pytest.warns(ConditioningWarning, match="zeros are used"):
        assert resolve_conditioning(final, None) == ({}, "zeros")


# ---- 5. --vae: bad input -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory) -> Path:
    """A UNet3D world model on RGB pixels (3 channels), as in tests/test_rollout_cli.py."""
    from diffusers import UNet3DConditionModel

    root = tmp_path_factory.mktemp("pixel-model")
    plan = registries().plans.get("unet3d")
    torch.manual_seed(0)
    UNet3DConditionModel(**{**plan.tiny_config, "in_channels": 3, "out_channels": 3}).save_pretrained(root / "src")
    convert(root / "src", root / "wm", action_dim=N, action_type="discrete", verify=False)
    return root / "wm"


def test_vae_on_a_pixel_model_exit_2(work, pixel_model, tmp_path):
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, "--vae", work.pipe, model=pixel_model, frames=2)
    assert_one_line_error(result, 2, "4-channel latents", "works on pixels", "drop --vae")
    _nothing_written(out)
    result = roll(work, out, model=pixel_model, frames=2)  # negative control: without --vae it runs, on pixels
    assert result.exit_code == 0, result.output
    assert np.load(out)["frames"].shape == (10, 32, 32, 3)


def test_vae_that_is_not_a_vae_exit_2(work, tmp_path):
    d = tmp_path / "not-a-vae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, "--vae", d)
    assert_one_line_error(result, 2, "UNet3DConditionModel is not a VAE", "AutoencoderKLWan")
    _nothing_written(out)


def test_vae_path_missing_exit_2(work, tmp_path):
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, "--vae", tmp_path / "nowhere")
    assert_one_line_error(result, 2, "VAE not found", "nowhere")
    _nothing_written(out)


def test_recorded_vae_gone_exit_2_then_vae_option_works(work, ref, tmp_path):
    """A run whose pipeline moved: latent.json names a VAE that no longer exists."""
    moved_pipe = tmp_path / "old-place"
    shutil.copytree(work.pipe, moved_pipe)
    model = tmp_path / "model"
    shutil.copytree(work.run / "final", model)
    record = json.loads((model / "latent.json").read_text())
    record["vae"]["path"] = str(moved_pipe / "vae")
    (model / "latent.json").write_text(json.dumps(record))
    shutil.rmtree(moved_pipe)
    out = _out_dir(tmp_path) / "clip.npz"
    result = roll(work, out, model=model)
    assert_one_line_error(result, 2, str(moved_pipe / "vae"), "no longer exists", "pass --vae")
    _nothing_written(out)
    result = roll(work, out, "--vae", work.pipe, model=model)  # the VAE found again: the same rollout
    assert result.exit_code == 0, result.output
    z = np.load(out)
    assert json.loads(str(z["rollout"]))["vae"]["source"] == "option"
    assert np.array_equal(z["frames"], ref["frames"]) and np.array_equal(z["latents"], ref["latents"])


# ---- 6. the pixel gymnasium env of a latent model ------------------------------------------------


@pytest.fixture(scope="module")
def env(work) -> WorldModelEnv:
    config, _ = resolve_config(work.run, steps=2)  # as rollout_to_file(..., steps=2) resolves it
    return WorldModelEnv.from_pretrained(work.run, config, context=work.pixels[:5], device="cpu")


def test_env_serves_pixels_and_grouped_actions(env, work, ref):
    assert env.observation_space == spaces.Box(0, 255, (32, 32, 3), np.uint8)
    assert env.action_space == spaces.MultiDiscrete([N] * K)
    obs, info = env.reset(seed=SEED)
    assert info == {"seed": SEED, "context_frames": 5, "step": 0}
    # the last context frame as the VAE reconstructs it, the frame a file rollout writes there
    assert obs.dtype == np.uint8 and np.array_equal(obs, ref["frames"][4])
    for step in (1, 2):
        obs, reward, terminated, truncated, info = env.step(np.array(VIDEO_ACTIONS[:K]))
        assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
        assert info["frames"].shape == (K, 32, 32, 3) and info["frames"].dtype == np.uint8
        assert np.array_equal(obs, info["frames"][-1])
        assert (reward, terminated, truncated, info["step"]) == (0.0, False, False, step)
    with pytest.raises(UsageError, match="not in MultiDiscrete"):
        env.step(np.array([0, 1, 2, 3]))  # 3 is not a video action
    with pytest.raises(UsageError, match="not in MultiDiscrete"):
        env.step(np.array([0, 1, 2]))  # k = 4 per step


def _env_frames(env: WorldModelEnv, seed: int, actions: list[int]) -> np.ndarray:
    env.reset(seed=seed)
    return np.concatenate([env.step(np.array(actions[i : i + K]))[4]["frames"] for i in range(0, len(actions), K)])


def test_env_frames_equal_the_file_rollout(env, ref):
    """reset(seed=s) rolls out like `causalize rollout --seed s`, decoded frames included."""
    frames = _env_frames(env, SEED, VIDEO_ACTIONS)
    assert frames.shape == (8, 32, 32, 3)
    assert np.array_equal(frames, ref["frames"][5:])
    assert np.array_equal(_env_frames(env, SEED, VIDEO_ACTIONS), frames)  # again, after another reset
    assert not np.array_equal(_env_frames(env, SEED + 1, VIDEO_ACTIONS), frames)  # another seed
    assert not np.array_equal(_env_frames(env, SEED, OTHER_ACTIONS), frames)  # other actions


def test_env_passes_gymnasiums_checker(work):
    config, _ = resolve_config(work.run, steps=2)
    env = WorldModelEnv.from_pretrained(work.run, config, context=work.pixels[:1], device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)  # render_mode None: nothing to render
    assert not [str(w.message) for w in caught if "WARN" in str(w.message)]  # gymnasium's logger.warn


def test_env_without_vae_serves_latents_only(work, ref):
    config, _ = resolve_config(work.run, steps=2)
    lat = np.load(work.latent_episode)["latents"]
    with pytest.raises(UsageError, match="3 channels, the model's sample has 4"):
        WorldModelEnv.from_pretrained(work.run, config, context=work.pixels[:5], device="cpu", vae=False)
    with pytest.raises(UsageError, match="with a VAE the observations are pixels"):
        WorldModelEnv.from_pretrained(work.run, config, context=work.pixels[:5], device="cpu", observation="latents")
    env = WorldModelEnv.from_pretrained(
        work.run, config, context=lat[:2], device="cpu", vae=False, observation="latents", multi_hot=True
    )
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (4, 4, 4), np.float32)
    obs, _ = env.reset(seed=SEED)
    assert obs.dtype == np.float32 and np.array_equal(obs, lat[1])
    latents = []
    for row in ref["actions"]:  # the model's own rows
        obs, _, _, _, info = env.step(row)
        assert obs.shape == (4, 4, 4) and obs.dtype == np.float32 and "frames" not in info
        latents.append(obs)
    assert np.array_equal(np.stack(latents), ref["latents"][2:])  # the file rollout's latents


# ---- 7. UNet3D pipeline: a per-frame AutoencoderKL (k = 1) ---------------------------------------


@dataclass
class Unet3d:
    pipe: Path
    run: Path
    empty: Path


@pytest.fixture(scope="module")
def unet3d(work) -> Unet3d:
    root = work.root / "unet3d"
    root.mkdir()
    pipe = build_tiny_pipeline("unet3d", root / "pipe")
    encode_episodes(work.root / "episodes", root / "latents", pipe)
    convert(pipe, root / "wm", action_dim=N, action_type="discrete", verify=False)
    train(
        TrainConfig(
            model=str(root / "wm"),
            data=str(root / "latents"),
            output_dir=str(root / "run"),
            steps=1,
            window=3,
            batch_size=1,
            device="cpu",
        )
    )
    embed_prompt(pipe, "", root / "empty.safetensors")
    return Unet3d(pipe, root / "run", root / "empty.safetensors")


def test_unet3d_latent_rollout_decodes_each_frame_once(work, unet3d, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    decoded: list[int] = []
    original = AutoencoderKL.decode

    def counting(self, z, *args, **kwargs):
        decoded.append(int(z.shape[0]))
        return original(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", counting)
    acts = tmp_path / "acts.txt"
    acts.write_text("0\n2\n")
    out = tmp_path / "clip.npz"
    report = rollout_to_file(unet3d.run, work.episode, acts, out, context_frames=3, **FAST)
    assert sum(decoded) == 5 and len(report.decode_seconds) == 5  # 3 context + 2 generated, once each
    assert report.vae["class"] == "AutoencoderKL" and report.vae["decode"] == "per-frame"
    assert report.vae["source"] == "latent.json" and report.conditioning == "zeros"
    z = np.load(out)
    assert z["frames"].shape == (5, 32, 32, 3) and z["frames"].dtype == np.uint8
    assert z["latents"].shape == (5, 4, 16, 16) and z["actions"].tolist() == [0, 2]
    monkeypatch.undo()
    assert np.array_equal(_decode(load_vae(unet3d.pipe), z["latents"]), z["frames"])


def test_vae_other_than_the_recorded_one_exit_2(work, unet3d, tmp_path):
    """--vae may point at the recorded VAE's new place, not at another VAE: the model was trained on
    Wan latents, so the UNet pipeline's per-frame AutoencoderKL is refused (class and frame rule)."""
    out = tmp_path / "other.npz"
    result = roll(work, out, "--vae", unet3d.pipe)
    assert_one_line_error(result, 2, "differs from the VAE the model was trained on", "latent.json")
    assert not out.exists()
