"""Plugins: built-ins through the same hooks as third parties, entry points, autoload switch, packaging."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from causalize.errors import NoPlanError, UsageError
from causalize.plugin_manager import AUTOLOAD_ENV, BUILTIN_PLUGINS, build_registries, registries

ROOT = Path(__file__).resolve().parents[1]

THIRD_PARTY = """
from dataclasses import dataclass
from causalize import hookimpl
from causalize.passes.base import Pass
from causalize.plan import Plan, Targets
from causalize.layout import FrameLayout
import causalize.plugins.unet3d as base


class Noop(Pass):
    name = "fake-noop"

    @dataclass(frozen=True)
    class Options:
        level: int = 1


@hookimpl
def causalize_register_passes(register):
    register(Noop)


@hookimpl
def causalize_register_plans(register):
    import dataclasses
    register(dataclasses.replace(base.PLAN, name="fake-unet3d"))
"""


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed distribution with a `causalize` entry point, as pip would leave it."""
    (tmp_path / "fake_causalize_plugin.py").write_text(THIRD_PARTY)
    dist = tmp_path / "fake_causalize_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-causalize-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[causalize]\nfake = fake_causalize_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("fake_causalize_plugin", None)


def test_builtins_load_through_the_hooks():
    regs = registries()
    names = [n for n, _ in regs.manager.list_name_plugin()]
    assert set(BUILTIN_PLUGINS) <= set(names)
    assert set(regs.plans.names()) >= {"unet3d", "svd", "animatediff", "i2vgenxl"}
    rows = {r["name"]: r for r in regs.plugin_rows()}
    assert rows["causalize.plugins.unet3d"]["plans"] == "unet3d"
    assert "causal-norm" in rows["causalize.passes"]["passes"]


def test_third_party_entry_point_plugin(fake_distribution, monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    regs = build_registries()
    assert "fake-noop" in regs.passes
    assert regs.plans.get("fake-unet3d").model_class == "UNet3DConditionModel"
    row = next(r for r in regs.plugin_rows() if r["name"] == "fake")
    assert row["origin"] == "fake-causalize-plugin 0.1"
    assert row["plans"] == "fake-unet3d" and row["passes"] == "fake-noop"


def test_autoload_can_be_disabled(fake_distribution, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    regs = build_registries()
    assert "fake-noop" not in regs.passes
    assert "unet3d" in regs.plans.names()  # built-ins still load


def test_plan_lookup_errors():
    plans = registries().plans
    with pytest.raises(NoPlanError) as exc:
        plans.for_class("UNet2DModel")
    assert "UNet3DConditionModel (unet3d)" in str(exc.value) and "plugin" in str(exc.value)
    with pytest.raises(UsageError, match="Did you mean 'unet3d'"):
        plans.get("unet3")


def test_duplicate_plan_is_an_error():
    plans = registries().plans
    plan = plans.get("unet3d")
    from causalize.plugin_manager import PlanRegistry

    fresh = PlanRegistry()
    fresh.register(plan, "a")
    with pytest.raises(ValueError, match="already registered"):
        fresh.register(plan, "b")


def test_every_plugin_file_is_packaged_and_registered():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert conf["package-dir"]["causalize.plugins"] == "plugins"
    assert conf["package-dir"]["causalize.cli"] == "cli"
    packages = set(conf["packages"])
    for init in ROOT.joinpath("causalize").rglob("__init__.py"):
        assert ".".join(init.parent.relative_to(ROOT).parts) in packages
    for folder in ROOT.joinpath("plugins").iterdir():
        if folder.is_dir() and not folder.name.startswith("__"):
            assert f"causalize.plugins.{folder.name}" in packages
    families = {p.stem for p in ROOT.joinpath("plugins").glob("*.py")} - {"__init__", "common"}
    assert {f"causalize.plugins.{f}" for f in families} <= set(BUILTIN_PLUGINS)


def test_library_import_is_light():
    """`import causalize` must not import torch (the CLI's --help relies on it)."""
    import subprocess

    code = "import sys, causalize, causalize.hookspecs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_plugins_are_an_explicit_list():
    """A stray module dropped into the plugins package is not loaded: only the listed families are."""
    from causalize.plugin_manager import BUILTIN_MODEL_PLUGINS

    assert BUILTIN_PLUGINS == ("causalize.passes", *(f"causalize.plugins.{n}" for n in BUILTIN_MODEL_PLUGINS))
    assert "causalize.plugins.common" not in BUILTIN_PLUGINS


def test_twins_register_through_the_hook():
    """Importing a plugin module registers nothing; building the registries does (the hook)."""
    from causalize.hookspecs import hookimpl
    from causalize.modules import frame_modulation

    class Twin:
        pass

    class Plugin:
        @hookimpl
        def causalize_register_twins(self, register):
            register("SomeNewNormZero", Twin)

    regs = build_registries(autoload=False)
    regs.manager.register(Plugin(), name="twin-plugin")
    assert "SomeNewNormZero" not in frame_modulation.TWINS
    regs.manager.hook.causalize_register_twins(register=frame_modulation.register_twin)
    assert frame_modulation.TWINS.pop("SomeNewNormZero") is Twin
    assert {"MochiRMSNormZero", "EasyAnimateLayerNormZero"} <= set(frame_modulation.TWINS)


def test_every_pass_option_has_help_and_passes_shows_it():
    import dataclasses
    import json as _json

    from typer.testing import CliRunner

    from causalize.cli.app import app
    from causalize.passes.base import option_help

    for cls in registries().passes:
        for fld in dataclasses.fields(cls.Options):
            assert option_help(fld), f"{cls.name}.{fld.name} has no help text"
    doc = _json.loads(CliRunner().invoke(app, ["passes", "--json"]).stdout)
    conv = next(p for p in doc["passes"] if p["name"] == "causal-temporal-conv")
    assert "extrapolation" in next(o for o in conv["options"] if o["name"] == "transfer")["help"]


def test_the_readme_worked_example_is_the_plugin_in_the_repository():
    """README's "Worked example" shows plugins/consisid.py verbatim: the guide cannot drift from the code."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example: (plugins/[\w.]+) -->\n```python\n(.*?)```", readme, re.S)
    assert m, "README has no worked example block"
    assert m.group(2) == (root / m.group(1)).read_text(encoding="utf-8")


def test_a_class_without_a_plan_gets_the_nearest_plan_and_a_refused_one_its_reason(tmp_path):
    import json

    from typer.testing import CliRunner

    from causalize.cli.app import app
    from causalize.errors import NoPlanError
    from causalize.plugin_manager import registries

    with pytest.raises(NoPlanError) as info:
        registries().plans.for_class("FutureWanTransformer3DModel")
    assert "nearest plan 'wan'" in info.value.hint
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "LTX2VideoTransformer3DModel"}))
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))  # the plan is looked up first
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 4, result.output
    assert "is not supported: joint audio and video streams" in result.stderr and "'ltx'" in result.stderr
