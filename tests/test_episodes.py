"""The causalize.episodes package: the reader (public numpy / zipfile APIs only, memory-mapped
stored members, every .npy header version), the writer's no-clobber race, the package boundary
and the deprecated causalize.training.data re-export. The format itself is tested in test_data.py."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import causalize.episodes as episodes
from causalize.episodes import (
    ActionSpace,
    DataError,
    EpisodeDataset,
    create_dataset,
    episode_path,
    load_arrays,
    read_arrays,
    read_headers,
    write_episode,
)

H, W, C = 4, 5, 3
PACKAGE = Path(episodes.__file__).parent


def _frames(T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(T, H, W, C), dtype=np.uint8)


def _actions(T: int) -> np.ndarray:
    return np.stack([np.arange(T, dtype=np.float32), 100 + np.arange(T, dtype=np.float32)], axis=1)


def _npz(
    path: Path, arrays: dict, version: tuple[int, int] | None = None, compression: int = zipfile.ZIP_STORED
) -> Path:
    """An .npz written member by member, so the .npy header version can be chosen."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arr), version=version, allow_pickle=False)
    return path


# ------------------------------------------------------------------------- public APIs only


def _numpy_private_uses(source: str) -> list[str]:
    """`np._x`, `numpy.lib.format._x`, `from numpy... import _x`, `import numpy._x` in `source`."""
    tree = ast.parse(source)
    numpy_names = {"np", "numpy", "npy_format"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            numpy_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "numpy"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy":
            numpy_names |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in numpy_names:
                found.append(ast.unparse(node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            if module.split(".")[0] == "numpy" or any(a.name.startswith("numpy") for a in node.names):
                parts = module.split(".") + [p for a in node.names for p in a.name.split(".")]
                found += [ast.unparse(node)] if any(p.startswith("_") and not p.endswith("__") for p in parts) else []
    return found


def test_the_scan_finds_private_numpy_names():
    bad = "import numpy as np\nfrom numpy.lib import format as f\nfrom numpy.lib._format_impl import x\nnp.lib.format._read_array_header(a, b)\nf._x\n"
    assert len(_numpy_private_uses(bad)) == 3
    assert _numpy_private_uses("import numpy as np\nnp.lib.format.read_magic(f)\nx._private\n") == []


def test_episodes_use_no_private_numpy_name():
    files = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in files} >= {"format.py", "reader.py", "writer.py", "dataset.py"}
    for path in files:
        assert _numpy_private_uses(path.read_text()) == [], path


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_header_version_is_read_and_mapped(tmp_path, monkeypatch, version):
    # whatever numpy keeps privately, the public module namespace is all the reader may use
    monkeypatch.delattr(np.lib.format, "_read_array_header", raising=False)
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.continuous(2), frame_shape=(H, W, C), extras=("rewards",))
    frames, actions, rewards = _frames(6), _actions(6), np.arange(6, dtype=np.float32)
    path = _npz(episode_path(root, 0), {"frames": frames, "actions": actions, "rewards": rewards}, version)
    headers = read_headers(path)
    assert headers["frames"].shape == (6, H, W, C) and headers["frames"].dtype == np.uint8
    assert all(h.mappable for h in headers.values())
    raw = path.read_bytes()
    off = headers["actions"].offset
    assert raw[off : off + actions.nbytes] == actions.tobytes()  # the offset is the data's
    arrays = read_arrays(path)
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    np.testing.assert_array_equal(arrays["frames"], frames)
    item = EpisodeDataset(root, window=3, check_values=True)[3]
    np.testing.assert_array_equal(item["actions"].numpy(), actions[2:5])
    np.testing.assert_array_equal(item["rewards"].numpy(), rewards[2:5])


def test_compressed_and_fortran_members(tmp_path):
    data = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.arange(6).reshape(2, 3))}
    stored = _npz(tmp_path / "s.npz", data)
    arrays = read_arrays(stored)
    assert isinstance(arrays["f"], np.memmap) and read_headers(stored)["f"].fortran_order
    for k, v in data.items():
        np.testing.assert_array_equal(arrays[k], v)
    packed = tmp_path / "c.npz"
    np.savez_compressed(packed, **data)
    assert not any(h.mappable for h in read_headers(packed).values())
    arrays = read_arrays(packed, ["a"])
    assert list(arrays) == ["a"] and not isinstance(arrays["a"], np.memmap)
    np.testing.assert_array_equal(arrays["a"], data["a"])


def test_reader_errors_name_the_file(tmp_path):
    path = _npz(tmp_path / "e.npz", {"a": np.arange(4)})
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"XXXX"  # the member's local header signature
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt or unreadable npz") as e:
        read_headers(path)
    assert e.value.path == str(path)
    replaced = _npz(tmp_path / "r.npz", {"a": np.arange(4)}, compression=zipfile.ZIP_DEFLATED)
    headers = read_headers(replaced)
    _npz(replaced, {"a": np.arange(5)}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(DataError, match="changed on disk"):
        load_arrays(replaced, headers, ["a"])


# ------------------------------------------------------------------------------------ writer


def test_write_episode_never_replaces_an_episode_that_appears_meanwhile(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    create_dataset(root, ActionSpace.continuous(2), frame_shape=(H, W, C))
    dest = episode_path(root, 0)
    real_savez = np.savez

    def racing_savez(f, **arrays):  # another writer finishes the same index while we write
        real_savez(f, **arrays)
        dest.write_bytes(b"the other writer's episode")

    monkeypatch.setattr(np, "savez", racing_savez)
    with pytest.raises(DataError, match="already exists") as e:
        write_episode(root, 0, frames=_frames(3), actions=_actions(3))
    assert e.value.path == str(dest) and dest.read_bytes() == b"the other writer's episode"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["000000.npz"]  # no temporary left


# ---------------------------------------------------------------------------------- boundaries


def test_package_boundary_and_no_torch_for_files(tmp_path):
    """episodes never imports training; writing and reading files does not import torch."""
    code = f"""
import sys
import numpy as np
from causalize.episodes import ActionSpace, create_dataset, write_episode, read_arrays
root = {str(tmp_path / "ds")!r}
create_dataset(root, ActionSpace.discrete(3), frame_shape=(2, 2, 1))
p = write_episode(root, 0, frames=np.zeros((2, 2, 2, 1), np.uint8), actions=np.array([0, 2]))
assert read_arrays(p)["actions"].tolist() == [0, 2]
assert "torch" not in sys.modules, "torch imported"
import causalize.episodes.dataset
bad = sorted(m for m in sys.modules if m.startswith("causalize.training"))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in PACKAGE.glob("*.py"):  # also lazy imports inside functions
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("causalize.training") for n in names), (path, node.lineno)
            assert not (isinstance(node, ast.ImportFrom) and node.level > 1), (path, node.lineno)


def test_training_data_is_a_deprecated_alias():
    module = importlib.import_module("causalize.training.data")
    for name in module.__all__:
        with pytest.warns(DeprecationWarning, match="causalize.episodes"):
            assert getattr(module, name) is getattr(episodes, name)
    with pytest.raises(AttributeError):
        module._atomic_write_bytes  # noqa: B018  (private helpers are gone, not re-exported)
