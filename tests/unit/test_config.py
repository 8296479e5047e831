"""The one configuration: defaults < params.yaml < preset < overrides, with errors that name key and file."""

import pytest
from typer.testing import CliRunner

from unifl.cli import app
from unifl.config import ConfigError, Params, describe_params, load_params, parse_override


def test_params_yaml_loads_and_every_section_is_typed():
    params = load_params("params.yaml")
    assert isinstance(params, Params)
    assert Params().pefl.start_step == 10  # the paper's T_a is the default
    assert params.pefl.start_step == 5  # params.yaml sets the toy world's (see its comment)
    assert params.curate.tau1 == 1


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pefl:\n  steps: 7\ndecoupled:\n  steps: 9\n")
    params = load_params(path, preset="ci", overrides=["decoupled.steps=5", "reward.tie_rule=drop"])
    assert params.pefl.steps == 2  # the ci preset overrides the file
    assert params.decoupled.steps == 5  # the override overrides the preset
    assert params.reward.tie_rule == "drop"
    assert params.evaluate.num_prompts == 8  # from the preset
    assert params.sampling.steps == 20  # a default nobody changed


def test_a_stage_mse_weight_overrides_the_trainer_one_for_that_stage_only():
    assert Params().mse_weight("decoupled") == 0  # the paper's objective has no MSE term
    params = load_params(None, overrides=["trainer.mse_weight=0.3"])
    assert [params.mse_weight(s) for s in ("pefl", "decoupled", "adversarial")] == [0.3] * 3
    params = load_params(None, overrides=["trainer.mse_weight=0.3", "decoupled.mse_weight=0"])
    assert [params.mse_weight(s) for s in ("pefl", "decoupled", "adversarial")] == [0.3, 0, 0.3]
    params = load_params(None, overrides=["decoupled.mse_weight=0.02"])
    assert [params.mse_weight(s) for s in ("pefl", "decoupled", "adversarial")] == [0, 0.02, 0]


def test_the_adversarial_grad_guidance_scale_overrides_the_trainer_one_for_that_stage_only():
    stages = ("pefl", "decoupled", "adversarial")
    params = load_params(None, overrides=["trainer.grad_guidance_scale=3"])
    assert [params.stage_value(s, "grad_guidance_scale") for s in stages] == [3, 3, 3]
    params = load_params(None, overrides=["adversarial.grad_guidance_scale=7.5"])
    assert [params.stage_value(s, "grad_guidance_scale") for s in stages] == [1, 1, 7.5]
    with pytest.raises(ConfigError, match="adversarial.grad_guidance_scale"):
        load_params(None, overrides=["adversarial.grad_guidance_scale=0.5"])


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("pefl:\n  stpes: 7\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert "pefl.stpes" in str(error.value) and str(path) in str(error.value)


def test_unknown_section_and_wrong_type(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("pfel:\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key 'pfel'"):
        load_params(path)
    path.write_text("pefl:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"'pefl.steps'.*'many'") as error:
        load_params(path)
    assert str(path) in str(error.value)


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"override 'trainer.lora_rank=0'.*trainer.lora_rank"):
        load_params(None, overrides=["trainer.lora_rank=0"])
    with pytest.raises(ConfigError, match="expected stage.key=value"):
        parse_override("trainer.lora_rank")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_params(None, preset="nope")
    assert parse_override("curate.blocked_words=[nsfw, gore]") == (
        ["curate", "blocked_words"],
        ["nsfw", "gore"],
    )


def test_the_compact_unet_layout_is_refused_for_sdxl():
    assert load_params(None, overrides=["bootstrap.unet_layout=compact"]).bootstrap.unet_layout == (
        "compact"
    )
    with pytest.raises(ConfigError, match="bootstrap.unet_layout 'compact'.*family 'sdxl'"):
        load_params(None, overrides=["bootstrap.unet_layout=compact", "bootstrap.family=sdxl"])
    with pytest.raises(ConfigError, match="unet_layout"):
        load_params(None, overrides=["bootstrap.unet_layout=small"])


def test_broken_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pefl: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_params(path)
    assert str(path) in str(error.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "absent.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"project:\n  seed: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{latin1}: not UTF-8 text \(byte 0xe9 at offset 20\)"):
        load_params(latin1)
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot be read \(Is a directory\)"):
        load_params(tmp_path)


def test_every_field_is_documented():
    listing = describe_params()
    for line in listing.splitlines():
        if line.startswith("  "):
            assert "#" in line and not line.rstrip().endswith("# None"), line


def test_cli_reports_config_errors_without_a_traceback():
    out = CliRunner().invoke(app, ["config", "show", "--set", "pefl.stepz=1"])
    assert out.exit_code == 2
    assert "unknown key 'pefl.stepz'" in out.output
    assert "Traceback" not in out.output


def test_num_threads_sets_the_torch_threads_of_the_process() -> None:
    import torch

    from unifl.models.precision import apply_num_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_num_threads(load_params(None, overrides=["project.num_threads=1"]).project)
        assert torch.get_num_threads() == 1
        apply_num_threads(load_params(None, overrides=["project.num_threads=null"]).project)
        assert torch.get_num_threads() == 1  # null leaves torch's setting alone
    finally:
        torch.set_num_threads(before)
