"""The latent path's VAE side (causalize.latents): frame rules read from class and config and
checked against real (tiny) VAEs, the pipelines' normalisation, streaming decode against the VAE's
own whole-clip decode, actions grouped onto latent frames, and `causalize encode`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from causalize.cli.app import app
from causalize.episodes import ActionSpace, EpisodeDataset, create_dataset, read_info, write_episode
from causalize.latents.actions import group_actions, latent_action_space, slot_rows
from causalize.latents.encode import encode_episodes
from causalize.latents.record import read_dataset_record
from causalize.latents.spec import LatentNorm, TimeGrouping, VaeError, encodes_video, read_spec
from causalize.latents.vae import StreamingDecoder, decode_clip, denormalise, encode_clip, load_vae, normalise
from causalize.testing.pipelines import WAN_VAE_CONFIG
from tests.cli_helpers import assert_one_line_error

runner = CliRunner()
WAN_MEAN, WAN_STD = WAN_VAE_CONFIG["latents_mean"], WAN_VAE_CONFIG["latents_std"]


def _wan():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**WAN_VAE_CONFIG)  # the tiny Wan pipeline's VAE


def _kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.1,
    )


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        temporal_compression_ratio=4,
    )


def _hunyuan():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


def _ltx():
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        latent_channels=8,
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
    )


VAES = {"wan": _wan, "kl": _kl, "cogvideox": _cogvideox, "hunyuan": _hunyuan, "ltx": _ltx}


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, build in VAES.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name / "vae")
        out[name] = root / name
    return out


# ---- frame rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VAES))
def test_frame_rule_matches_what_the_vae_encodes(vae_dirs, name):
    """The rule read from class + config predicts the latent shape of a real encode, for several
    fitting lengths; a clip that breaks the rule is refused before the VAE runs."""
    vae, spec = load_vae(vae_dirs[name])
    g = spec.grouping
    lengths = [1 + g.granule, 1 + 2 * g.granule] if g.first_alone else [1, 3]
    for t in lengths:
        clip = torch.rand(1, 3, t, 32, 32) * 2 - 1
        z = encode_clip(vae, spec, clip)
        assert z.shape == (
            1,
            spec.latent_channels,
            g.latent_frames(t),
            32 // spec.spatial_factor,
            32 // spec.spatial_factor,
        )
        assert [len(g.covers(j)) for j in range(z.shape[2])] == (
            [1] + [g.factor] * (z.shape[2] - 1) if g.first_alone else [1] * z.shape[2]
        )
        assert g.video_frames(z.shape[2]) == t
    if g.first_alone:
        with pytest.raises(VaeError, match="1 \\+ "):
            encode_clip(vae, spec, torch.zeros(1, 3, 2 + g.granule, 32, 32))


def test_expected_rules():
    """What the issue names: Wan 1 + 4k (first frame alone), CogVideoX batches of 8, image VAEs per frame."""
    assert TimeGrouping(4, True, 4).rule().startswith("1 + 4k")
    assert [TimeGrouping(4, True, 4).fits(t) for t in (1, 4, 5, 9, 10)] == [True, False, True, True, False]
    assert TimeGrouping(4, True, 8).trimmed(16) == 9
    assert TimeGrouping(1, False, 1).fits(7)


@pytest.mark.parametrize(
    ("config", "video"),
    [
        ({"_class_name": "AutoencoderKL"}, False),
        ({"_class_name": "AutoencoderKLTemporalDecoder"}, False),  # per-frame encoder, video decoder
        ({"_class_name": "AutoencoderKLWan", "temperal_downsample": [False, False, False]}, True),  # causal cache
        ({"_class_name": "AutoencoderKLMochi"}, True),  # known, no reader
        ({"_class_name": "AutoencoderKLSomethingNew", "temporal_compression_ratio": 4}, True),  # declared
        ({"_class_name": "AutoencoderKLSomethingNew", "temporal_compression_ratio": 1}, False),
        ({"_class_name": "AutoencoderKLSomethingNew", "temperal_downsample": [False, True]}, True),
        ({"_class_name": "AutoencoderKLSomethingNew", "patch_size_t": 2}, True),
        ({"_class_name": "AutoencoderKLSomethingNew", "scale_factor_temporal": 4}, True),
    ],
)
def test_encodes_video_refuses_video_vaes_for_per_frame_encoding(config, video):
    """Per-frame encoding (training with --vae) is refused for a known video VAE, even one that
    keeps the number of frames, and for any config declaring temporal compression."""
    assert encodes_video(config) is video


def test_unknown_and_non_vae_classes_are_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(VaeError, match="not a VAE"):
        read_spec(tmp_path / "unet")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMagvit"}))
    with pytest.raises(VaeError, match="no frame rule"):
        read_spec(tmp_path / "odd")
    with pytest.raises(VaeError, match="neither"):
        read_spec(tmp_path)


# ---- normalisation ----------------------------------------------------------------------------


def test_wan_normalisation_is_the_pipelines(vae_dirs):
    """WanPipeline decodes with latents / (1 / std) + mean; denormalise must be exactly that."""
    _, spec = load_vae(vae_dirs["wan"])
    z = torch.randn(2, 4, 3, 4, 4)
    mean = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(denormalise(z, spec.norm), z / inv_std + mean)
    torch.testing.assert_close(normalise(denormalise(z, spec.norm), spec.norm), z)


def test_autoencoder_kl_normalisation_uses_shift_and_scale(vae_dirs):
    _, spec = load_vae(vae_dirs["kl"])
    assert spec.norm == LatentNorm(0.5, shift=0.1)
    z = torch.randn(1, 4, 2, 8, 8)
    torch.testing.assert_close(normalise(z, spec.norm), (z - 0.1) * 0.5)


# ---- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_streaming_decode_equals_whole_clip_decode(vae_dirs, dtype):
    """Each latent frame pushed once through the VAE's own cache = diffusers' decode of the whole
    clip (exact in fp32; bf16 within its rounding). Negative control: the same frames after a
    different first latent frame differ, so the cache carries history the test would miss."""
    vae, spec = load_vae(vae_dirs["wan"], dtype="bf16" if dtype == torch.bfloat16 else None)
    z = torch.randn(1, 4, 4, 4, 4)
    whole = decode_clip(vae, spec, z)
    dec = StreamingDecoder(vae, spec)
    parts = [dec.push(z[:, :, j]) for j in range(4)]
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]
    stream = torch.cat(parts, dim=2)
    if dtype == torch.float32:
        assert torch.equal(stream, whole)
    else:
        assert (stream - whole).abs().max() < 0.05
    other = StreamingDecoder(vae, spec)
    other.push(torch.zeros_like(z[:, :, 0]))
    later = torch.cat([other.push(z[:, :, j]) for j in range(1, 4)], dim=2)
    assert (later - whole[:, :, 1:]).abs().max() > 1e-3


def test_per_frame_vae_streams_frame_by_frame(vae_dirs):
    vae, spec = load_vae(vae_dirs["kl"])
    z = torch.randn(1, 4, 3, 8, 8)
    dec = StreamingDecoder(vae, spec)
    stream = torch.cat([dec.push(z[:, :, j]) for j in range(3)], dim=2)
    torch.testing.assert_close(stream, decode_clip(vae, spec, z), rtol=0, atol=1e-5)


def test_whole_mode_redecodes_and_counts_it(vae_dirs):
    """A VAE without an exposed cache: every push decodes the clip so far (counted), and returns
    exactly the newest frames of that decode."""
    vae, spec = load_vae(vae_dirs["hunyuan"])
    z = torch.randn(1, 4, 3, 4, 4)
    dec = StreamingDecoder(vae, spec)
    assert dec.mode == "whole"
    last = [dec.push(z[:, :, j]) for j in range(3)][-1]
    torch.testing.assert_close(last, decode_clip(vae, spec, z)[:, :, -4:])
    assert dec.redecodes == 1 + 5


# ---- actions on latent frames -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    k=st.sampled_from([1, 2, 4]),
    groups=st.integers(1, 4),
    dim=st.integers(1, 3),
    discrete=st.booleans(),
)
def test_latent_frame_j_carries_the_actions_of_its_video_frames(k, groups, dim, discrete):
    """After the loader's shift, latent frame j (j ≥ 1) is conditioned on the actions that produced
    exactly the video frames it covers, slot by slot in frame order."""
    g = TimeGrouping(k, k > 1, k)
    t = g.video_frames(groups + 1)
    rng = np.random.default_rng(k * 100 + groups * 10 + dim)
    space = ActionSpace.discrete(dim + 1) if discrete else ActionSpace.continuous(dim)
    actions = rng.integers(0, dim + 1, t) if discrete else rng.normal(size=(t, dim)).astype(np.float32)
    rows = group_actions(actions, space, g, groups + 1)
    width = space.width
    per_frame = slot_rows(actions, space)
    assert latent_action_space(space, k).width == k * width
    for j in range(1, groups + 1):
        got = (
            np.asarray(rows[j - 1], dtype=np.float32).reshape(k, width) if k > 1 else slot_rows(rows[j - 1 : j], space)
        )
        want = np.stack([per_frame[v - 1] for v in g.covers(j)])
        np.testing.assert_array_equal(got, want)


# ---- causalize encode ---------------------------------------------------------------------------------


def _pixels(root, lengths, shape=(32, 32, 3), extras=("rewards",)):
    create_dataset(root, ActionSpace.discrete(3), frame_shape=shape, extras=extras)
    rng = np.random.default_rng(0)
    for i, t in enumerate(lengths):
        write_episode(
            root,
            i,
            frames=rng.integers(0, 256, (t, *shape), dtype=np.uint8),
            actions=rng.integers(0, 3, t),
            rewards=np.arange(t, dtype=np.float32),
        )
    return root


def test_encode_writes_latents_the_pipeline_way_and_records_it(vae_dirs, tmp_path):
    src = _pixels(tmp_path / "px", [9, 5, 9])
    report = encode_episodes(src, tmp_path / "lat", vae_dirs["wan"], batch_size=2)
    assert (report.episodes, report.video_frames, report.latent_frames) == (3, 23, 8)
    info = read_info(tmp_path / "lat")
    assert info.kind == "latents" and info.shape == (4, 4, 4)
    assert info.action_space == ActionSpace.discrete(12, multi_hot=True)
    record = read_dataset_record(tmp_path / "lat")
    assert record.vae.class_name == "AutoencoderKLWan" and record.slots == 4
    assert record.vae.norm.mean == tuple(WAN_MEAN)
    vae, spec = load_vae(vae_dirs["wan"])
    frames = np.load(src / "episodes" / "000000.npz")["frames"]
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    want = encode_clip(vae, spec, clip)[0].movedim(1, 0).numpy()
    got = np.load(tmp_path / "lat" / "episodes" / "000000.npz")
    np.testing.assert_allclose(got["latents"], want, atol=1e-6)
    np.testing.assert_array_equal(got["rewards"], [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8])
    item = EpisodeDataset(tmp_path / "lat", window=3, split=None, skip_short=True)[0]
    assert item["frames"].shape == (3, 4, 4, 4) and item["action_mask"].tolist() == [False, True, True]


def test_encode_resumes_after_an_interruption(vae_dirs, tmp_path):
    src = _pixels(tmp_path / "px", [5, 5, 9])
    calls = []

    def stop_after_first(done, total, frames, seconds):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_episodes(src, tmp_path / "lat", vae_dirs["wan"], progress=stop_after_first)
    assert not (tmp_path / "lat").exists() and (tmp_path / "lat.encoding").is_dir()
    report = encode_episodes(src, tmp_path / "lat", vae_dirs["wan"])
    assert (report.resumed, report.encoded) == (1, 2)
    assert not (tmp_path / "lat.encoding").exists()
    fresh = encode_episodes(src, tmp_path / "again", vae_dirs["wan"])
    for i in range(3):
        a = np.load(tmp_path / "lat" / "episodes" / f"{i:06d}.npz")["latents"]
        b = np.load(tmp_path / "again" / "episodes" / f"{i:06d}.npz")["latents"]
        np.testing.assert_array_equal(a, b)
    assert fresh.resumed == 0


def test_resume_with_other_settings_is_refused(vae_dirs, tmp_path):
    src = _pixels(tmp_path / "px", [5, 5])

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_episodes(src, tmp_path / "lat", vae_dirs["wan"], progress=stop)
    result = runner.invoke(app, ["encode", str(src), str(tmp_path / "lat"), "--vae", str(vae_dirs["wan"]), "--sample"])
    assert_one_line_error(result, 2, "posterior")


def test_trim_rule_is_enforced_and_reported(vae_dirs, tmp_path):
    src = _pixels(tmp_path / "px", [9, 11])
    result = runner.invoke(app, ["encode", str(src), str(tmp_path / "lat"), "--vae", str(vae_dirs["wan"])])
    assert_one_line_error(result, 2, "000001.npz (11 frames)", "1 + 4k", "--trim")
    assert not (tmp_path / "lat").exists() and not (tmp_path / "lat.encoding").exists()
    result = runner.invoke(app, ["encode", str(src), str(tmp_path / "lat"), "--vae", str(vae_dirs["wan"]), "--trim"])
    assert result.exit_code == 0, result.output
    assert "trimmed episode 1: 11 → 9 frames" in result.stderr
    assert "--action-dim 12 --action-type discrete" in result.stderr
    assert result.stdout.strip() == str(tmp_path / "lat")


@pytest.mark.parametrize(
    "case, needle",
    [
        ("exists", "exists"),
        ("not-a-vae", "not a VAE"),
        ("size", "spatial factor 8"),
        ("channels", "channels"),
        ("latents", "already stores latents"),
    ],
)
def test_encode_bad_input_is_one_line_and_writes_nothing(vae_dirs, tmp_path, case, needle):
    src = _pixels(
        tmp_path / "px", [5], shape=(36, 32, 3) if case == "size" else (32, 32, 1 if case == "channels" else 3)
    )
    out = tmp_path / "lat"
    vae = vae_dirs["wan"]
    if case == "exists":
        out.mkdir()
    if case == "not-a-vae":
        vae = tmp_path / "unet"
        vae.mkdir()
        (vae / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    if case == "latents":
        src = tmp_path / "lat_src"
        create_dataset(src, ActionSpace.discrete(3), frame_shape=(4, 4, 4), kind="latents")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["encode", str(src), str(out), "--vae", str(vae)])
    assert_one_line_error(result, 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- causality per latent frame with grouped actions ----------------------------------------------------


def _grouped_probe_inputs(wm, frames: int = 4):
    plan = wm.plan
    extra = plan.make_inputs(wm.model, frames, torch.Generator().manual_seed(0))
    sample = extra.pop(plan.conditioning.sample_arg)
    extra.pop(plan.conditioning.timestep_arg)
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(0, 3, (1, frames, 4), generator=g)
    actions = torch.nn.functional.one_hot(slots, 3).flatten(2).float()  # (1, F, 12): 4 one-hot slots
    return {
        "sample": sample,
        "timesteps": torch.randint(0, 1000, (1, frames), generator=g),
        "actions": actions,
        **extra,
    }


@pytest.mark.parametrize("converted", [True, False], ids=["causal", "negative-control"])
def test_grouped_actions_keep_causality_exact_per_latent_frame(converted):
    """A Wan world model whose adapter takes 4 grouped video actions per latent frame (12 = 4 × 3
    one-hot) is exactly causal per latent frame over latents, timesteps and actions; the same model
    with only frame conditioning (no causal passes) leaks, so the probe would see a leak."""
    from causalize.api import convert_model
    from causalize.layout import FrameLayout
    from causalize.plugin_manager import registries
    from causalize.verify import check_causality
    from causalize.world_model import WorldModel

    plan = registries().plans.get("wan")
    torch.manual_seed(0)
    model = plan.build_tiny()
    adapter = "frame-conditioning{action_dim=12,action_type=discrete}"
    convert_model(model, plan, f"{plan.pipeline},{adapter}" if converted else adapter)
    wm = WorldModel(model, plan)
    with torch.no_grad():
        for p in wm.parameters():  # zero-initialised layers would hide what they carry
            if not p.abs().sum():
                p.normal_(0, 0.3)
    inputs = _grouped_probe_inputs(wm)
    leaks = {}
    for name in ("sample", "timesteps", "actions"):
        layout = FrameLayout(inputs={name: 1 if name != "sample" else 2}, output_axis=2, block_size=1)
        report = check_causality(wm, inputs, layout, lambda w, x: w(**x))
        leaks[name] = report.passed
        if converted:
            assert report.passed, name + ": " + report.summary()
            assert all(report.matrix[j, j] > 0 for j in range(4)), name  # each frame sees its own input
    if not converted:  # bidirectional attention: latents and timesteps of later frames reach earlier ones
        assert not leaks["sample"] and not leaks["timesteps"]
