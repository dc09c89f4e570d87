"""Untrusted checkpoints and awkward outputs (issue 13): index paths, FIFOs, malformed JSON shapes,
config memory bombs, header shape checks, OUT inside a pipeline SRC, OUT checked before the work,
stale temporaries, hints that name real options.

Every command runs in-process through typer's CliRunner, except the memory bombs: those run in a
child process with a capped address space, so that a regression fails instead of exhausting the
machine's memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from causalize.cli.app import app

CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"
runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _save_tiny(plan: str, path: Path) -> Path:
    from causalize.plugin_manager import registries

    registries().plans.get(plan).build_tiny().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny UNet3DConditionModel checkpoint (config.json + safetensors)."""
    return _save_tiny("unet3d", tmp_path_factory.mktemp("tiny") / "unet3d")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    """A tiny WanTransformer3DModel checkpoint: its RoPE tables are buffers computed from config.json."""
    return _save_tiny("wan", tmp_path_factory.mktemp("tiny") / "wan")


@pytest.fixture
def src(tiny, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "src"))


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command builds the model or reads weights (checks must come before)."""
    import causalize.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built or weights were read before the check")

    monkeypatch.setattr(causalize.checkpoint, "build_empty", refuse)
    monkeypatch.setattr(causalize.checkpoint, "load_state_dict", refuse)


def _shard(src: Path, name: str = SHARD, target: str | None = None) -> dict:
    """Turn src's weights into a one-shard checkpoint whose index names `target` (default: `name`)."""
    from safetensors import safe_open

    with safe_open(str(src / WEIGHTS), framework="pt") as fh:
        keys = list(fh.keys())
    (src / WEIGHTS).rename(src / name)
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, target or name)}
    (src / INDEX).write_text(json.dumps(index))
    return index


# --- 1. shards: plain files inside the model directory; JSON of the wrong shape ------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "subdir"])
def test_index_cannot_pull_weights_from_outside(src, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(src / WEIGHTS, outside)  # real weights: without the check the conversion would succeed
    (src / "sub").mkdir()
    shutil.copy(src / WEIGHTS, src / "sub" / "inner.safetensors")
    target = {"parent": "../outside.safetensors", "absolute": str(outside), "subdir": "sub/inner.safetensors"}[where]
    index = _shard(src, target=target)
    out = tmp_path / "out"
    result = cli("convert", src, out, "--no-verify")
    assert_one_line_error(result, 4, INDEX, repr(target), "not a file name", next(iter(index["weight_map"])))
    assert not out.exists()


POKER = """
import os, sys, time
time.sleep(float(sys.argv[2]))
while True:  # open the write end now and then: a reader blocked on the FIFO gets end-of-file
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader
        pass
    time.sleep(0.1)
"""


def _unblock_later(fifo: Path, after: float = 10.0) -> subprocess.Popen:
    """If a reader blocks on the FIFO (the bug), unblock it after `after` seconds so the test ends.
    A process, not a thread: the blocked reader may hold the GIL (safetensors opens files in Rust)."""
    return subprocess.Popen([sys.executable, "-c", POKER, str(fifo), str(after)])


@pytest.mark.parametrize("what", ["shard", "linked-shard", "weights", "config"])
def test_fifo_is_refused_not_read(src, tmp_path, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if what in ("shard", "linked-shard"):
        _shard(src)
        (src / SHARD).unlink()
        if what == "shard":
            os.rename(fifo, src / SHARD)
            fifo = src / SHARD
        else:
            (src / SHARD).symlink_to(fifo)
    else:
        name = WEIGHTS if what == "weights" else CONFIG
        (src / name).unlink()
        os.rename(fifo, src / name)
        fifo = src / name
    poker = _unblock_later(fifo)
    t0 = time.monotonic()
    try:
        result = cli("convert", src, tmp_path / "out", "--no-verify")
    finally:
        poker.kill()
        poker.wait()
    assert time.monotonic() - t0 < 10, "the FIFO was opened for reading"
    assert_one_line_error(result, 4, "is a FIFO")
    if what != "config":
        assert str(src / (WEIGHTS if what == "weights" else SHARD)) in result.stderr
    if what in ("shard", "linked-shard"):
        assert INDEX in result.stderr


def test_shard_that_is_a_directory_is_refused(src, tmp_path):
    _shard(src)
    (src / SHARD).unlink()
    (src / SHARD).mkdir()
    result = cli("convert", src, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 4, "is a directory", SHARD)


def test_hugging_face_cache_symlinks_are_followed(tiny, tmp_path):
    """Snapshot files are symlinks to ../../blobs/<hash>: outside the model directory, but accepted."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    model = repo / "snapshots" / "0123abcd" / "unet"
    model.mkdir(parents=True)
    shutil.copy(tiny / WEIGHTS, repo / "blobs" / "aaa")
    shutil.copy(tiny / CONFIG, repo / "blobs" / "bbb")
    staging = tmp_path / "staging"
    shutil.copytree(tiny, staging)
    _shard(staging)
    shutil.copy(staging / INDEX, repo / "blobs" / "ccc")
    for name, blob in ((SHARD, "aaa"), (CONFIG, "bbb"), (INDEX, "ccc")):
        (model / name).symlink_to(Path("../../../blobs") / blob)
    out = tmp_path / "out"
    result = cli("convert", model, out, "--no-verify")
    assert result.exit_code == 0, result.output
    assert (out / "causalize.json").is_file()


@pytest.mark.parametrize(
    "doc",
    [
        {"weight_map": ["a", "b"]},
        {"weight_map": {"w": 5}},
        {"weight_map": {}},
        {"metadata": {}},
        ["weight_map"],
        "text",
    ],
    ids=["map-is-a-list", "int-value", "empty-map", "no-map", "file-is-a-list", "file-is-a-string"],
)
def test_malformed_index_is_a_conversion_error(src, tmp_path, doc):
    _shard(src)
    (src / INDEX).write_text(json.dumps(doc))
    result = cli("convert", src, tmp_path / "out", "--no-verify", "--json")
    assert_one_line_error(result, 4, INDEX)
    assert json.loads(result.stdout)["error"]["kind"] == "bad-checkpoint"


@pytest.mark.parametrize(
    "config, needle",
    [
        (["_class_name", "UNet3DConditionModel"], "not an object"),
        ({"_class_name": 5}, "'_class_name' is 5"),
        ({"_class_name": ["UNet3DConditionModel"]}, "'_class_name'"),
        ({"_class_name": None}, "'_class_name'"),
    ],
)
def test_malformed_config_is_a_conversion_error(src, tmp_path, config, needle):
    (src / CONFIG).write_text(json.dumps(config))
    result = cli("convert", src, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 4, str(src / CONFIG), needle)


def test_deeply_nested_config_is_a_conversion_error(src, tmp_path):
    (src / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    result = cli("convert", src, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 4, CONFIG)


# --- 2. sizes from config.json are checked on the meta device, shapes against the headers -------

BOMB_CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a regression fails instead of eating the machine
from typer.testing import CliRunner
from causalize.cli.app import app
import torch
runner, rows = CliRunner(), []
for args in json.loads(sys.argv[1]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    r = runner.invoke(app, args)
    rows.append({"code": r.exit_code, "stderr": r.stderr, "seconds": time.monotonic() - t0,
                 "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before})
print(json.dumps(rows))
"""


def test_config_memory_bombs_fail_fast_and_small(tiny_wan, tmp_path):
    """rope_max_seq_len=10**9 asks Wan for terabytes of RoPE tables (buffers no checkpoint holds);
    num_layers=10**6 for a million blocks. Both are refused from a meta build: quickly, with a
    message naming the cause, and without the process growing."""
    rope, layers = (
        Path(shutil.copytree(tiny_wan, tmp_path / "rope")),
        Path(shutil.copytree(tiny_wan, tmp_path / "layers")),
    )
    for path, key, value in ((rope, "rope_max_seq_len", 10**9), (layers, "num_layers", 10**6)):
        config = json.loads((path / CONFIG).read_text())
        config[key] = value
        (path / CONFIG).write_text(json.dumps(config))
    runs = [
        ["convert", str(rope), str(tmp_path / "out1"), "--no-verify"],
        ["verify", str(rope)],
        ["convert", str(layers), str(tmp_path / "out2"), "--no-verify"],
        ["convert", str(tiny_wan), str(tmp_path / "ok"), "--no-verify"],  # the control: still converts
    ]
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, json.dumps(runs)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows[:3]:
        assert row["code"] == 4, row
        assert row["seconds"] < 20, row
        assert row["grew_kb"] < 512 * 1024, row  # peak memory grew by less than 512 MiB
    for row in rows[:2]:
        assert "rope.freqs_" in row["stderr"] and "not in the weights" in row["stderr"], row
        assert "rope_max_seq_len" in row["stderr"], row
    assert "larger than its weights" in rows[2]["stderr"], rows[2]
    assert rows[3]["code"] == 0, rows[3]
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def _reshape_one(src: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / WEIGHTS))
    key = next(k for k, v in sorted(state.items()) if v.dim() >= 1 and v.shape[0] > 1)
    state[key] = state[key][:1].clone()
    save_file(state, str(src / WEIGHTS))
    return key


def test_header_shape_mismatch_is_refused_before_reading_weights(src, tmp_path, monkeypatch):
    import causalize.checkpoint

    key = _reshape_one(src)

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the headers were compared")

    monkeypatch.setattr(causalize.checkpoint, "load_state_dict", refuse)
    result = cli("convert", src, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 4, "do not fit config.json", key, "in the weights")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_refused_before_reading_weights(src, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import causalize.checkpoint

    state = load_file(str(src / WEIGHTS))
    state.pop(sorted(state)[0])
    save_file(state, str(src / WEIGHTS))
    monkeypatch.setattr(causalize.checkpoint, "load_state_dict", lambda *a, **k: pytest.fail("weights were read"))
    result = cli("convert", src, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 4, "do not match config.json", "1 missing")


def _plans():
    from causalize.plugin_manager import registries

    return sorted(p.name for p in registries().plans)


@pytest.mark.parametrize("plan", _plans())
def test_build_empty_keeps_computed_buffers(plan):
    """The meta pre-build must not cost correctness: buffers diffusers computes in __init__ (RoPE
    tables, position encodings) that no state dict holds still get their real values."""
    import torch

    from causalize import checkpoint
    from causalize.plugin_manager import registries

    stock = registries().plans.get(plan).build_tiny()
    model = checkpoint.build_empty(type(stock).__name__, dict(stock.config))
    assert all(p.is_meta for p in model.parameters()), plan
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(stock.named_buffers()).keys()
    for name, buf in stock.named_buffers():
        assert not buffers[name].is_meta, (plan, name)
        assert torch.equal(buffers[name], buf), (plan, name)


# --- 3. OUT inside a pipeline SRC, whatever the denoiser subfolder is called ---------------------


@pytest.fixture
def pipeline_dir(tiny, tmp_path) -> Path:
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe / "denoiser")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "denoiser": ["diffusers", "Y"]}))
    return pipe


@pytest.mark.parametrize("rel", ["causal", "denoiser/causal", "vae/causal"])
def test_out_inside_a_pipeline_named_with_subfolder_is_refused(pipeline_dir, rel, no_work):
    before = sorted(p.relative_to(pipeline_dir) for p in pipeline_dir.rglob("*"))
    result = cli("convert", pipeline_dir, pipeline_dir / rel, "--subfolder", "denoiser")
    assert_one_line_error(result, 2, "inside SRC")
    assert sorted(p.relative_to(pipeline_dir) for p in pipeline_dir.rglob("*")) == before


def test_out_containing_the_pipeline_is_refused(pipeline_dir, no_work):
    result = cli("convert", pipeline_dir, pipeline_dir.parent, "--subfolder", "denoiser", "--overwrite")
    assert_one_line_error(result, 2, "contains SRC")


def test_standalone_unet_dir_may_have_a_sibling_out(tiny, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny, models / "unet")
    result = cli("convert", models / "unet", models / "unet-causal", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (models / "unet-causal" / "causalize.json").is_file()


def test_pipeline_with_subfolder_converts_to_outside(pipeline_dir, tmp_path):
    result = cli("convert", pipeline_dir, tmp_path / "out", "--subfolder", "denoiser", "--no-verify")
    assert result.exit_code == 0, result.output


# --- 4. OUT is checked before the work: exit 2 with a hint ---------------------------------------


def test_out_parent_is_a_file(tiny, tmp_path, no_work):
    (tmp_path / "file").write_text("x")
    result = cli("convert", tiny, tmp_path / "file" / "sub" / "out")
    assert_one_line_error(result, 2, "not a directory", str(tmp_path / "file"), "hint:")
    assert (tmp_path / "file").read_text() == "x"


def test_out_parent_is_read_only(tiny, tmp_path, no_work):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = cli("convert", tiny, ro / "out")
        assert_one_line_error(result, 2, "not writable", "hint:")
    finally:
        ro.chmod(0o755)


def test_dangling_symlink_out_needs_overwrite_and_is_replaced(tiny, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "missing-target")
    result = cli("convert", tiny, out, "--no-verify")
    assert_one_line_error(result, 2, "already exists", "symlink", "--overwrite")
    assert out.is_symlink()

    ok = cli("convert", tiny, out, "--no-verify", "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not out.is_symlink() and (out / "causalize.json").is_file()
    assert not (tmp_path / "missing-target").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .causalize-old-* / -tmp-* left


def test_missing_parents_are_made(tiny, tmp_path):
    result = cli("convert", tiny, tmp_path / "a" / "b" / "out", "--no-verify")
    assert result.exit_code == 0, result.output


def test_write_failure_after_the_check_is_a_usage_error(tiny, tmp_path, monkeypatch):
    """Permissions that change during the run still give a one-line exit 2, not an internal error."""
    import causalize.fs

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(causalize.fs, "new_directory", denied)
    result = cli("convert", tiny, tmp_path / "out", "--no-verify")
    assert_one_line_error(result, 2, "cannot write", "Permission denied")


# --- 5. stale temporaries of a killed run are removed early and reported; nothing else -----------

DEAD_PID = 99_999_999  # above any pid_max: no such process


def _litter(tmp_path: Path) -> tuple[Path, list[Path]]:
    stale = tmp_path / f".out.causalize-tmp-{DEAD_PID}-1"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "w.safetensors").write_bytes(b"x" * 100)
    keep = [
        tmp_path / f".out.causalize-tmp-{os.getpid()}-2",  # ours, but its writer is alive
        tmp_path / f".other.causalize-tmp-{DEAD_PID}-3",  # another target's
        tmp_path / ".out.backup",  # not our naming
        tmp_path / f"out.causalize-tmp-{DEAD_PID}-4",  # not hidden: not our naming
    ]
    for k in keep:
        k.mkdir()
    return stale, keep


@pytest.mark.parametrize("pipeline", [None, "causal-temporal-conv,causal-temporal-attention"])
def test_stale_temporaries_are_removed_and_reported(tiny, tmp_path, pipeline):
    """Removed before the work, so also when the run then writes nothing (a leak)."""
    stale, keep = _litter(tmp_path)
    args = ["convert", tiny, tmp_path / "out"] + (["--pipeline", pipeline] if pipeline else ["--no-verify"])
    result = cli(*args)
    assert result.exit_code == (1 if pipeline else 0), result.output
    assert not stale.exists()
    assert f"removed {stale}" in " ".join(result.stderr.split()), result.stderr
    assert all(k.exists() for k in keep)


def test_dry_run_removes_nothing(tiny, tmp_path):
    stale, keep = _litter(tmp_path)
    result = cli("convert", tiny, tmp_path / "out", "--dry-run", "--no-verify")
    assert result.exit_code == 0, result.output
    assert stale.exists() and all(k.exists() for k in keep)


# --- 6. hints name options that exist ---------------------------------------------------------


def test_hints_name_real_cli_options():
    import typer

    import causalize.api
    import causalize.checkpoint

    group = typer.main.get_command(app)
    options = {o for cmd in group.commands.values() for p in cmd.params for o in getattr(p, "opts", [])}
    for module in (causalize.checkpoint, causalize.api):
        text = Path(module.__file__).read_text()
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
        assert named <= options, (module.__name__, sorted(named - options))
        assert not re.search(r"--[a-z-]+ \(\w+=", text), module.__name__  # one language per hint: the CLI's


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "/nonexistent-src", "/tmp/never-out"],
        ["verify", "/nonexistent-src"],
        ["inspect", "/nonexistent-src"],
    ],
)
def test_a_missing_source_is_reported_before_torch_is_imported(command):
    import subprocess as _subprocess
    import sys as _sys

    code = (
        "import sys\nfrom causalize.cli.app import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, code)"
    )
    done = _subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "4"], done.stdout + done.stderr
    assert "does not exist" in done.stderr
