"""`causalize embed-prompt` and causalize.prompt: a prompt embedded by the pipeline's own text
encoder, checked against converted world models; and the tiny pipelines of causalize.testing.pipelines.

The guarantee under test: the file holds exactly what the pipeline's own `encode_prompt` gives its
denoiser (compared with the full pipeline, and with what a real pipeline call feeds the denoiser).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error
from safetensors import safe_open
from typer.testing import CliRunner

from causalize import __version__
from causalize.cli.app import app
from causalize.errors import UsageError
from causalize.prompt import (
    PROMPT_SPECS,
    _encode_kwargs,
    check_conditioning,
    embed_prompt,
    load_conditioning_file,
)
from causalize.testing.pipelines import build_tiny_pipeline, tiny_pipeline, tiny_vae

runner = CliRunner()
TEXT = "a red cat jumps left"


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in ("wan", "unet3d")}


@pytest.fixture(scope="module")
def loaded(pipelines):
    from diffusers import DiffusionPipeline

    return {kind: DiffusionPipeline.from_pretrained(path, local_files_only=True) for kind, path in pipelines.items()}


def own_embedding(pipe, text: str) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt for one prompt, as its __call__ runs it (no grad, no CFG)."""
    spec = PROMPT_SPECS[type(pipe).__name__]
    with torch.no_grad():
        outputs = pipe.encode_prompt(**_encode_kwargs(type(pipe), text, torch.device("cpu")))
    return {name: value for name, value in zip(spec.outputs, outputs) if name}


# --- the tiny pipelines -------------------------------------------------------------------------


def test_tiny_pipelines_build_and_load(pipelines, loaded):
    from transformers import AutoTokenizer

    expected = {
        "wan": ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan"),
        "unet3d": ("TextToVideoSDPipeline", "UNet3DConditionModel", "AutoencoderKL"),
    }
    for kind, (pipe_cls, denoiser_cls, vae_cls) in expected.items():
        pipe = loaded[kind]
        assert type(pipe).__name__ == pipe_cls
        denoiser = pipe.transformer if kind == "wan" else pipe.unet
        assert type(denoiser).__name__ == denoiser_cls and type(pipe.vae).__name__ == vae_cls
        assert pipe.text_encoder is not None and pipe.scheduler is not None
        tok = AutoTokenizer.from_pretrained(pipelines[kind] / "tokenizer")
        assert tok(TEXT).input_ids != tok("").input_ids
        assert (pipelines[kind] / "transformer" if kind == "wan" else pipelines[kind] / "unet").is_dir()
    wan = loaded["wan"]
    assert wan.vae.config.temperal_downsample == [False, True, True] and wan.vae.config.z_dim == 4
    assert wan.vae.config.latents_std == [1.5, 0.8, 1.2, 2.0]
    assert wan.transformer.config.text_dim == wan.text_encoder.config.d_model
    unet3d = loaded["unet3d"]
    assert unet3d.unet.config.cross_attention_dim == unet3d.text_encoder.config.hidden_size


@pytest.mark.parametrize("kind", ["wan", "unet3d"])
def test_tiny_pipeline_generates(loaded, kind):
    """The pieces fit together: a real (latent) generation runs end to end."""
    pipe = loaded[kind]
    pipe.set_progress_bar_config(disable=True)
    size = 16 if kind == "wan" else 32
    out = pipe(
        TEXT,
        num_inference_steps=2,
        height=size,
        width=size,
        num_frames=5 if kind == "wan" else 2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out.frames).all()


def test_tiny_pipelines_are_seeded():
    a, b, c = (tiny_pipeline("wan", seed=s) for s in (0, 0, 1))
    for name in ("transformer", "text_encoder", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name
    vae = tiny_vae("wan")
    assert all(torch.equal(v, a.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert tiny_vae("unet3d").config.latent_channels == 4


def test_tiny_pipeline_main(tmp_path, capsys):
    from causalize.testing.pipelines import main

    assert main(["unet3d", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p")
    assert (tmp_path / "p" / "model_index.json").is_file()
    assert main(["unet3d", str(tmp_path / "p")]) == 2  # no clobber


# --- embed-prompt: the pipeline's own outputs ----------------------------------------------------


@pytest.mark.parametrize("kind", ["wan", "unet3d"])
@pytest.mark.parametrize("text", ["", TEXT])
def test_cli_writes_the_pipelines_own_embedding(pipelines, loaded, tmp_path, kind, text):
    out = tmp_path / "prompt.safetensors"
    result = cli("embed-prompt", pipelines[kind], text, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and "wrote" in result.stderr
    assert files(tmp_path) == {"prompt.safetensors"}  # no temporaries left
    tensors = load_conditioning_file(out)
    expected = own_embedding(loaded[kind], text)
    assert set(tensors) == set(expected) == {"encoder_hidden_states"}
    assert tensors["encoder_hidden_states"].shape[0] == 1
    assert torch.equal(tensors["encoder_hidden_states"], expected["encoder_hidden_states"])
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["pipeline_class"] == type(loaded[kind]).__name__ and meta["prompt"] == text
    assert meta["causalize_version"] == __version__ and json.loads(meta["tensors"]) == ["encoder_hidden_states"]
    assert meta["denoiser_class"] == ("WanTransformer3DModel" if kind == "wan" else "UNet3DConditionModel")


@pytest.mark.parametrize("kind", ["wan", "unet3d"])
def test_embedding_is_what_a_pipeline_call_feeds_the_denoiser(pipelines, loaded, tmp_path, kind):
    """The end-to-end guarantee: a real `pipe(TEXT)` call (no guidance) hands its denoiser this tensor."""
    pipe = loaded[kind]
    denoiser = pipe.transformer if kind == "wan" else pipe.unet
    seen = []
    handle = denoiser.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    size = 16 if kind == "wan" else 32
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(
            TEXT, num_inference_steps=1, height=size, width=size, num_frames=1, guidance_scale=1.0, output_type="latent"
        )
    finally:
        handle.remove()
    report = embed_prompt(pipelines[kind], TEXT, tmp_path / "p.safetensors")
    assert seen and torch.equal(load_conditioning_file(report.out)["encoder_hidden_states"], seen[0])


def test_different_prompts_differ(pipelines, tmp_path):
    for kind in ("wan", "unet3d"):
        a = embed_prompt(pipelines[kind], "a red cat", tmp_path / f"{kind}-a.safetensors")
        b = embed_prompt(pipelines[kind], "a blue dog", tmp_path / f"{kind}-b.safetensors")
        ta, tb = (load_conditioning_file(r.out)["encoder_hidden_states"] for r in (a, b))
        assert ta.shape == tb.shape and not torch.equal(ta, tb)


def test_json_report_and_overwrite(pipelines, tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"old")
    result = cli("embed-prompt", pipelines["wan"], TEXT, out, "--overwrite", "--json", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pipeline_class"] == "WanPipeline" and doc["prompt"] == TEXT
    assert doc["tensors"]["encoder_hidden_states"] == {"shape": [1, 512, 16], "dtype": "float32"}
    assert "encoder_hidden_states" in load_conditioning_file(out)


def test_bf16_text_encoder(pipelines, tmp_path):
    report = embed_prompt(pipelines["unet3d"], TEXT, tmp_path / "p.safetensors", dtype="bf16")
    assert load_conditioning_file(report.out)["encoder_hidden_states"].dtype == torch.bfloat16


# --- other families: text-only tiny pipelines ----------------------------------------------------


def _t5_parts():
    from transformers import T5Config, T5EncoderModel

    from causalize.testing.pipelines import _t5_tokenizer

    tok = _t5_tokenizer(512)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return {"tokenizer": tok, "text_encoder": T5EncoderModel(config).eval()}


def _hunyuan_parts():
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, LlamaTokenizer

    from causalize.testing.pipelines import _clip_tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:!?'<>|_- ĠĊ":
        vocab.setdefault(c, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=512)
    clip_tok = _clip_tokenizer(77)  # the pipeline's CLIP length
    torch.manual_seed(0)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,  # the pipeline reads the third-to-last hidden state
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=3,
        )
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    ).eval()
    return {"tokenizer": tok, "text_encoder": llama, "tokenizer_2": clip_tok, "text_encoder_2": clip}


TEXT_ONLY = {
    "CogVideoXPipeline": (_t5_parts, {"encoder_hidden_states"}),
    "LTXPipeline": (_t5_parts, {"encoder_hidden_states", "encoder_attention_mask"}),
    "HunyuanVideoPipeline": (_hunyuan_parts, {"encoder_hidden_states", "encoder_attention_mask", "pooled_projections"}),
}


@pytest.mark.parametrize("cls_name", sorted(TEXT_ONLY))
def test_other_families_embed_their_own_outputs(tmp_path, cls_name):
    """A pipeline saved with only its text components (the others null in model_index.json)."""
    import diffusers

    parts, names = TEXT_ONLY[cls_name]
    cls = getattr(diffusers, cls_name)
    pipe = cls(**parts(), vae=None, scheduler=None, transformer=None)
    pipe.save_pretrained(tmp_path / "pipe")
    for text in ("", TEXT):
        report = embed_prompt(tmp_path / "pipe", text, tmp_path / f"{len(text)}.safetensors")
        tensors, expected = load_conditioning_file(report.out), own_embedding(pipe, text)
        assert set(tensors) == set(expected) == names
        for name in names:
            assert tensors[name].shape[0] == 1 and torch.equal(tensors[name], expected[name]), name


def test_every_spec_names_its_denoisers_arguments():
    import diffusers

    for cls_name, spec in PROMPT_SPECS.items():
        assert hasattr(diffusers, cls_name), cls_name
        forward = getattr(diffusers, spec.denoiser).forward
        params = __import__("inspect").signature(forward).parameters
        assert all(name in params for name in spec.outputs if name), (cls_name, spec)


# --- check_conditioning -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_world_model():
    from world_models import tiny_world_model  # convert_model(..., "<pipeline>,frame-conditioning{...}")

    return tiny_world_model("wan", action_dim=3)


@pytest.fixture(scope="module")
def embedded(pipelines, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedded")
    return {kind: embed_prompt(path, TEXT, root / f"{kind}.safetensors").out for kind, path in pipelines.items()}


def test_check_conditioning_accepts_the_pipelines_file(wan_world_model, embedded):
    wm = wan_world_model
    tensors = load_conditioning_file(embedded["wan"])
    check_conditioning(tensors, wm, str(embedded["wan"]))
    frames = 2
    sample = torch.randn(1, 4, frames, 16, 16)
    kwargs = wm.unconditional_inputs(1, frames, overrides=tensors)
    assert torch.equal(kwargs["encoder_hidden_states"], tensors["encoder_hidden_states"])
    with torch.no_grad():
        out = wm(sample, torch.full((1, frames), 500.0), torch.zeros(1, frames, 3), **kwargs)
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_check_conditioning_refuses_a_wrong_width(wan_world_model, embedded):
    tensors = load_conditioning_file(embedded["unet3d"])  # CLIP width 8, the Wan model takes 16
    with pytest.raises(UsageError) as exc:
        check_conditioning(tensors, wan_world_model, "unet3d.safetensors")
    msg = str(exc.value)
    assert "unet3d.safetensors" in msg and "encoder_hidden_states" in msg and "8" in msg and "16" in msg
    assert "causalize embed-prompt" in msg


def test_check_conditioning_refuses_missing_unknown_and_batched(wan_world_model, embedded):
    wm = wan_world_model
    good = load_conditioning_file(embedded["wan"])["encoder_hidden_states"]
    cases = {
        "missing": ({}, "encoder_hidden_states"),
        "unknown": ({"encoder_hidden_states": good, "prompt_embeds": good}, "prompt_embeds"),
        "batch": ({"encoder_hidden_states": good.repeat(2, 1, 1)}, "batch 1"),
        "rank": ({"encoder_hidden_states": good[0]}, "dimensions"),
        "sample": ({"encoder_hidden_states": good, "hidden_states": good}, "hidden_states"),
    }
    for case, (tensors, needle) in cases.items():
        with pytest.raises(UsageError) as exc:
            check_conditioning(tensors, wm, "f.safetensors")
        assert needle in str(exc.value) and "f.safetensors" in str(exc.value), (case, str(exc.value))
    check_conditioning({"encoder_hidden_states": good[:, :7]}, wm, "f")  # another sequence length is fine


def test_load_conditioning_file_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_conditioning_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file")
    with pytest.raises(UsageError, match="not a safetensors file"):
        load_conditioning_file(bad)
    with pytest.raises(UsageError, match="not a regular file"):
        load_conditioning_file(tmp_path)


def test_load_conditioning_file_truncated(embedded, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = embedded["wan"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a safetensors file"):
        load_conditioning_file(cut)


# --- bad inputs: exit 2, nothing written ---------------------------------------------------------


def _fake_pipeline(root: Path, index: dict) -> Path:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_bad_inputs_exit_2_and_write_nothing(pipelines, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "p.safetensors"
    no_text = _fake_pipeline(
        tmp_path / "svd",
        {
            "_class_name": "StableVideoDiffusionPipeline",
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
            "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
        },
    )
    unsupported = _fake_pipeline(
        tmp_path / "animatediff",
        {
            "_class_name": "AnimateDiffPipeline",
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
    )
    cases = [
        ((tmp_path / "nope", TEXT, out), "does not exist"),
        ((pipelines["wan"] / "transformer", TEXT, out), "no model_index.json"),
        ((no_text, TEXT, out), "has no text encoder: nothing to embed"),
        ((unsupported, TEXT, out), "does not support AnimateDiffPipeline"),
        ((pipelines["wan"], TEXT, tmp_path / "missing-dir" / "p.safetensors"), "does not exist"),
        ((pipelines["wan"], TEXT, outdir), "is a directory"),
        ((pipelines["wan"], TEXT, out, "--dtype", "fp64"), "unknown dtype"),
        ((pipelines["wan"], TEXT, out, "--device", "nonsense"), "unknown device"),
    ]
    for args, needle in cases:
        result = cli("embed-prompt", *args)
        assert_one_line_error(result, 2, needle)
        assert files(outdir) == set(), args
    assert "WanPipeline" in cli("embed-prompt", unsupported, TEXT, out).stderr  # the hint lists the supported
    assert not (tmp_path / "missing-dir").exists()


def test_existing_out_is_kept(pipelines, tmp_path):
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    result = cli("embed-prompt", pipelines["wan"], TEXT, out, "--json")
    assert_one_line_error(result, 2, "already exists", "--overwrite")
    assert json.loads(result.stdout)["error"]["kind"] == "usage-error"
    assert out.read_bytes() == b"keep me" and files(tmp_path) == {"p.safetensors"}


def test_a_failure_while_encoding_leaves_nothing(pipelines, tmp_path, monkeypatch):
    import causalize.prompt

    def boom(*args, **kwargs):
        raise RuntimeError("text encoder exploded")

    monkeypatch.setattr(causalize.prompt, "prompt_tensors", boom)
    result = cli("embed-prompt", pipelines["wan"], TEXT, tmp_path / "p.safetensors")
    assert result.exit_code == 3 and "internal error: RuntimeError: text encoder exploded" in result.stderr
    assert "Traceback" not in result.output
    assert files(tmp_path) == set()


def test_help_and_bad_paths_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from causalize.cli.app import app\n"
        "r = CliRunner()\n"
        "res = r.invoke(app, ['embed-prompt', '--help'])\n"
        "assert res.exit_code == 0 and 'Exit codes' in res.output, res.output\n"
        f"res = r.invoke(app, ['embed-prompt', {str(tmp_path / 'nope')!r}, 'a cat', {str(tmp_path / 'o')!r}])\n"
        "assert res.exit_code == 2, res.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_image_to_video_pipeline_embeds_its_prompt_or_names_ftfy(tmp_path):
    """WanImageToVideoPipeline's encode_prompt calls ftfy unguarded: with ftfy installed the
    embedding is made; without it the error names the package (not a NameError)."""
    import importlib.util

    from causalize.errors import UsageError
    from causalize.prompt import prompt_tensors
    from causalize.testing.pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan-i2v", tmp_path / "i2v")
    if importlib.util.find_spec("ftfy") is None:
        with pytest.raises(UsageError, match="ftfy"):
            prompt_tensors(pipe, "")
    else:
        assert prompt_tensors(pipe, "")["encoder_hidden_states"].shape[0] == 1
