"""Inference never imports training (docs/ARCHITECTURE.md): rollout shares the noise schedule
through causalize.noise, so a deployment can drop the training stack (accelerate, data loaders)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import causalize.rollout

ROLLOUT = Path(causalize.rollout.__file__).parent
FORBIDDEN = "causalize.training"


def _package(path: Path) -> str:
    """The dotted package a file under causalize/ belongs to, e.g. causalize.rollout."""
    return ".".join(path.parent.relative_to(ROLLOUT.parent.parent).parts)


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, also those inside functions (lazy imports);
    relative imports resolved against ``package``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _is_training(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def test_no_rollout_source_imports_training():
    files = sorted(ROLLOUT.rglob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(ROLLOUT.parent.parent)}:{line}: {module}"
        for path in files
        for line, module in _imported_modules(path, _package(path))
        if _is_training(module)
    ]
    assert not offending, "causalize.rollout imports training code:\n" + "\n".join(offending)


def test_the_check_sees_a_lazy_relative_import(tmp_path):
    """Negative control: an import inside a function, written relatively, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..training.objective import diffusion_forcing_loss\n")
    assert any(_is_training(m) for _, m in _imported_modules(bad, "causalize.rollout"))


_BLOCKER = """
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "causalize.training" or name.startswith("causalize.training."):
            raise ImportError(f"inference imported {name}")

sys.meta_path.insert(0, Block())
import causalize.rollout
for info in pkgutil.iter_modules(causalize.rollout.__path__):
    importlib.import_module("causalize.rollout." + info.name)
"""


def test_every_rollout_module_imports_without_training():
    """Transitively too: every rollout module imports with causalize.training blocked."""
    proc = subprocess.run([sys.executable, "-c", _BLOCKER], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------- the house's other rules

ROOT = ROLLOUT.parent.parent
LIBRARY = [p for d in ("causalize", "plugins", "cli") for p in (ROOT / d).rglob("*.py")]


def _private_imports(path: Path) -> list[str]:
    """`from causalize... import _name`: a private name taken from another module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("causalize")):
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            found += [f"{path.name}:{node.lineno} {name}" for name in names]
    return found


def test_no_module_imports_a_private_name_from_another():
    bad = [hit for p in LIBRARY for hit in _private_imports(p)]
    assert not bad, bad


def test_the_private_name_check_sees_one(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("from causalize.api import _hidden\nfrom causalize.api import say\n")
    assert _private_imports(sample) == ["m.py:1 _hidden"]


def test_no_library_file_is_much_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text(encoding="utf-8").splitlines())) > 620
    }
    assert not long, long


def test_no_atari_study_module_is_much_over_600_lines():
    """The study was one 2,260-line file once; a module per concern keeps a change findable."""
    long = {
        p.name: n
        for p in sorted((ROOT / "benchmarks" / "atari").glob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 620
    }
    assert not long, long


def test_plugins_do_not_import_the_rollout_runtime():
    hits = [(p.name, m) for p in (ROOT / "plugins").glob("*.py") for _, m in _imported_modules(p, "causalize.plugins")]
    assert not [h for h in hits if h[1].startswith("causalize.rollout")], hits


def test_every_method_citation_resolves():
    """Every "METHOD.md §N" in code and docs names a section that docs/METHOD.md has."""
    import re

    method = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", method, re.M))
    files = LIBRARY + list((ROOT / "tests").glob("*.py")) + [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    files += list((ROOT / "benchmarks").rglob("*.py")) + list((ROOT / "benchmarks").rglob("README.md"))
    cited = {
        (p.name, c) for p in files for c in re.findall(r"METHOD\.md §(\d+(?:\.\d+)?)", p.read_text(encoding="utf-8"))
    }
    assert cited and sections >= {"1", "3", "4.2", "10"}
    assert not [c for c in cited if c[1] not in sections], sorted(c for c in cited if c[1] not in sections)
