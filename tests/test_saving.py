"""Conversions survive saving (issue 13): a converted model's own save_pretrained (and a pipeline's)
keeps what causalize.load needs; plain diffusers loading of a converted folder warns loudly."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import causalize
from causalize.api import convert, convert_model, example_inputs, verify_model
from causalize.manifest import CONFIG_MARKER
from causalize.plugin_manager import registries


@pytest.mark.parametrize("name", ["wan", "unet3d"])
def test_a_resaved_converted_model_loads_causal(tmp_path, name):
    plan = registries().plans.get(name)
    model = plan.build_tiny()
    convert_model(model, plan)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "causalize.json").is_file()
    loaded = causalize.load(tmp_path / "saved")
    assert verify_model(loaded, plan).max_leak == 0
    inputs = example_inputs(model, plan)
    with torch.no_grad():
        assert torch.equal(plan.forward(loaded, inputs), plan.forward(model, inputs))


def test_loaded_checkpoints_resave_with_their_recipe_and_world_models_too(tmp_path):
    plan = registries().plans.get("wan")
    src = tmp_path / "src"
    plan.build_tiny().save_pretrained(src)
    convert(src, tmp_path / "wm", action_dim=2)
    wm = causalize.WorldModel.from_pretrained(tmp_path / "wm")
    wm.model.save_pretrained(tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / "causalize.json").read_text())
    assert "frame-conditioning{action_dim=2" in manifest["pipeline"]
    again = causalize.WorldModel.from_pretrained(tmp_path / "again")
    assert again.action_encoder is not None


def test_plain_diffusers_loading_warns_loudly(tmp_path, caplog):
    """Negative control: the stock folder loads silently; the converted one names causalize."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as dlogging

    plan = registries().plans.get("wan")
    src = tmp_path / "src"
    plan.build_tiny().save_pretrained(src)
    convert(src, tmp_path / "out")
    assert CONFIG_MARKER in json.loads((tmp_path / "out" / "config.json").read_text())
    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            WanTransformer3DModel.from_pretrained(src)
        assert "CAUSAL CHECKPOINT" not in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            WanTransformer3DModel.from_pretrained(tmp_path / "out")
        assert "CAUSAL CHECKPOINT: load it with causalize.load" in caplog.text
    finally:
        dlogging.disable_propagation()
    assert causalize.load(tmp_path / "out") is not None  # causalize drops the marker


def test_unconvert_removes_the_recipe_saver(tmp_path):
    plan = registries().plans.get("wan")
    model = plan.build_tiny()
    convert_model(model, plan)
    causalize.unconvert(model)
    model.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / "causalize.json").exists()
    assert CONFIG_MARKER not in json.loads((tmp_path / "stock" / "config.json").read_text())


def test_a_pipeline_save_keeps_its_denoiser_causal(tmp_path):
    """DiffusionPipeline.save_pretrained calls the denoiser's own save_pretrained: the unet/ folder
    gets causalize.json and loads causal."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    class TinyPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    plan = registries().plans.get("unet3d")
    unet = plan.build_tiny()
    convert_model(unet, plan)
    TinyPipeline(unet, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "causalize.json").is_file()
    assert verify_model(causalize.load(tmp_path / "pipe" / "unet"), plan).max_leak == 0
