"""The toy bootstrap: loadable outputs, a manifest with its measurements, caching by config."""

import json

import torch
from typer.testing import CliRunner

from unifl.cli import app
from unifl.config import load_params
from unifl.models.base import load_base_model
from unifl.models.segmenter import ToySegmenter
from unifl.toy.bootstrap import bootstrap_toy_world, config_hash, load_cached
from unifl.toy.dataset import read_manifest


def test_outputs_load_and_manifest_records_measurements(ci_bootstrap):
    result = ci_bootstrap
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest == result.manifest
    for key in ("caption_match_real", "caption_match_base_20_steps", "vae_recon_mse", "unet_loss"):
        assert 0.0 <= manifest["metrics"][key] < 10.0, key
    assert manifest["timings"]["total_s"] > 0
    assert manifest["peak_rss_gib"] > 0

    model = load_base_model(result.base_model_dir)
    assert model.family == "sd15"
    scale = model.vae.config.scaling_factor
    assert abs(scale - manifest["metrics"]["vae_scaling_factor"]) < 1e-6
    assert scale != 1.0  # calibrated from the latents, not the preset's placeholder

    segmenter = ToySegmenter.load(result.segmenter_dir)
    images = torch.rand(2, 3, 32, 32)
    assert segmenter(images).shape[0] == 2

    params = load_params(None, preset="ci")
    assert read_manifest(result.train_data_dir)["count"] == params.toy.num_train
    assert read_manifest(result.eval_data_dir)["count"] == params.toy.num_eval
    assert manifest["data"]["train"]["hash"] == read_manifest(result.train_data_dir)["content_hash"]
    assert (result.directory / "samples.png").stat().st_size > 0


def test_cached_by_config_hash(ci_bootstrap, tmp_path):
    cache = ci_bootstrap.directory.parent
    params = load_params(None, preset="ci", overrides=[f"bootstrap.cache_dir={cache}"])
    weights = next((ci_bootstrap.base_model_dir / "unet").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    again = bootstrap_toy_world(params, progress=False)
    assert again.cached and again.directory == ci_bootstrap.directory
    assert weights.stat().st_mtime_ns == written  # nothing retrained or rewritten

    changed = load_params(None, preset="ci", overrides=["bootstrap.unet_steps=31"])
    assert config_hash(changed) != config_hash(params)
    assert load_cached(ci_bootstrap.directory, changed) is None
    # Where the cache lives does not change what is trained.
    moved = load_params(None, preset="ci", overrides=[f"bootstrap.cache_dir={tmp_path}"])
    assert config_hash(moved) == config_hash(params)


def test_cli_prints_the_summary_of_a_cached_bootstrap(ci_bootstrap):
    out = CliRunner().invoke(
        app,
        ["toy", "bootstrap", "--preset", "ci", "--out", str(ci_bootstrap.directory)],
    )
    assert out.exit_code == 0, out.output
    assert "toy bootstrap (cached)" in out.output
    assert "caption_match_base_20_steps" in out.output
