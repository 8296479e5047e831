"""Base-model loading, saving, conditioning and precision, on toy and tiny real-layout models."""

import json
import shutil

import pytest
import torch

from unifl.models.base import (
    CheckpointError,
    PromptEmbeds,
    decode_latents,
    detect_family,
    encode_images,
    encode_prompt,
    load_base_model,
    predict_noise,
    save_base_model,
    unconditional_embeds,
)
from unifl.models.precision import resolve_device, resolve_dtypes
from unifl.models.sampler import generate
from unifl.models.tokenizer import TOY_MAX_LENGTH
from unifl.models.toy_presets import (
    PRESETS,
    build_tiny_reference_model,
    build_toy_model,
    count_parameters,
    is_toy_preset,
    toy_configs,
    write_tiny_reference_checkpoint,
)

PROMPTS = ["a red circle above a blue square", "a small green triangle on a dark background"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models: OpenMP start-up and spin-waits cost more than two threads gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy_models():
    return {preset: build_toy_model(preset, seed=0) for preset in PRESETS}


@pytest.fixture(scope="module")
def saved_toys(tmp_path_factory, toy_models):
    root = tmp_path_factory.mktemp("toys")
    return {preset: save_base_model(model, root / preset) for preset, model in toy_models.items()}


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {
        family: write_tiny_reference_checkpoint(root / family, family, seed=3)
        for family in ("sd15", "sdxl")
    }


def _latents(model, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (count, model.latent_channels, model.latent_size, model.latent_size)
    return torch.randn(shape, generator=generator)


# --------------------------------------------------------------------------- toy presets


def test_toy_presets_use_the_real_classes_and_sdxl_conditioning(toy_models):
    sd15, sdxl = toy_models["toy-sd15"], toy_models["toy-sdxl"]
    assert (sd15.family, sdxl.family) == ("sd15", "sdxl")
    assert is_toy_preset("toy-sdxl") and not is_toy_preset("runwayml/stable-diffusion-v1-5")
    for model in (sd15, sdxl):
        assert (model.image_size, model.latent_size, model.latent_channels) == (32, 8, 4)
        assert model.vae_scale_factor == 4
        assert type(model.scheduler).__name__ == "DDIMScheduler"
        config = model.scheduler.config
        assert (config.num_train_timesteps, config.beta_schedule, config.steps_offset) == (
            1000,
            "scaled_linear",
            1,
        )
        assert config.clip_sample is False and config.set_alpha_to_one is False
        assert model.text_encoder.config.eos_token_id == model.tokenizer.eos_token_id
    unet = sdxl.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == 64
    assert unet.projection_class_embeddings_input_dim == 32 + 6 * unet.addition_time_embed_dim
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    counts = count_parameters(sd15)
    assert 5e5 < counts["unet"] < 5e6 and counts["vae"] < 2e6


def test_toy_build_is_deterministic_per_seed_and_keeps_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_toy_model("toy-sd15", seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    again = build_toy_model("toy-sd15", seed=5)
    other = build_toy_model("toy-sd15", seed=6)
    weight = "conv_in.weight"
    assert torch.equal(first.unet.state_dict()[weight], again.unet.state_dict()[weight])
    assert not torch.equal(first.unet.state_dict()[weight], other.unet.state_dict()[weight])


def test_toy_resolution_64_keeps_8x8_latents_and_bad_presets_fail():
    model = build_toy_model("toy-sd15", resolution=64)
    assert (model.image_size, model.latent_size, model.vae_scale_factor) == (64, 8, 8)
    with torch.no_grad():
        assert decode_latents(model, _latents(model, 1)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown toy preset"):
        toy_configs("toy-sd3")
    with pytest.raises(ValueError, match="resolution"):
        toy_configs("toy-sd15", resolution=48)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_latent_channels_set_the_vae_and_unet_together_and_survive_a_reload(preset, tmp_path):
    model = build_toy_model(preset, seed=0, latent_channels=8)
    assert model.vae.config.latent_channels == 8
    assert (model.unet.config.in_channels, model.unet.config.out_channels) == (8, 8)
    assert model.latent_channels == 8
    images = generate(model, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    assert images.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert encode_images(model, images).shape == (2, 8, 8, 8)
    loaded = load_base_model(save_base_model(model, tmp_path / preset))
    assert loaded.latent_channels == 8
    reloaded = generate(loaded, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    torch.testing.assert_close(reloaded, images, rtol=0, atol=0)


def test_compact_unet_layout_attends_below_8x8_only_and_survives_a_reload(tmp_path):
    from unifl.config import load_params
    from unifl.toy.bootstrap import untrained_model

    params = load_params(None, overrides=["bootstrap.unet_layout=compact"])
    model = untrained_model(params, seed=0)
    unet = model.unet
    assert not hasattr(unet.down_blocks[0], "attentions")
    assert not hasattr(unet.up_blocks[2], "attentions")
    assert isinstance(unet.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    assert isinstance(unet.mid_block.attentions[0].proj_out, torch.nn.Linear)
    own = build_toy_model("toy-sd15", seed=0)
    assert isinstance(own.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert count_parameters(model)["unet"] < count_parameters(own)["unet"]
    images = generate(model, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    loaded = load_base_model(save_base_model(model, tmp_path / "compact"))
    reloaded = generate(loaded, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    torch.testing.assert_close(reloaded, images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="UNet layout 'compact' for toy-sdxl"):
        toy_configs("toy-sdxl", unet_layout="compact")


def test_frozen_modules_are_eval_without_gradients(toy_models):
    model = toy_models["toy-sdxl"]
    frozen = model.frozen_modules()
    assert frozen == [model.vae, model.text_encoder, model.text_encoder_2]
    for module in frozen:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_save_load_round_trip_gives_the_same_outputs(preset, toy_models, saved_toys):
    original = toy_models[preset]
    loaded = load_base_model(saved_toys[preset])
    assert loaded.family == original.family
    assert loaded.source == str(saved_toys[preset])
    for module in loaded.frozen_modules():
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    latents = _latents(original)
    with torch.no_grad():
        embeds = encode_prompt(original, PROMPTS)
        embeds_loaded = encode_prompt(loaded, PROMPTS)
        torch.testing.assert_close(
            embeds_loaded.prompt_embeds, embeds.prompt_embeds, rtol=0, atol=0
        )
        torch.testing.assert_close(
            predict_noise(loaded, latents, 500, embeds_loaded),
            predict_noise(original, latents, 500, embeds),
            rtol=0,
            atol=0,
        )
    images = generate(original, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    images_loaded = generate(loaded, PROMPTS, steps=2, guidance_scale=3.0, seed=7)
    torch.testing.assert_close(images_loaded, images, rtol=0, atol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_saved_directory_is_a_diffusers_pipeline(preset, saved_toys):
    from diffusers import DiffusionPipeline

    index = json.loads((saved_toys[preset] / "model_index.json").read_text())
    expected = "StableDiffusionXLPipeline" if preset == "toy-sdxl" else "StableDiffusionPipeline"
    assert index["_class_name"] == expected
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    pipeline = DiffusionPipeline.from_pretrained(saved_toys[preset])
    assert type(pipeline).__name__ == expected
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"


def test_save_is_atomic_and_replaces_an_existing_directory(toy_models, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_base_model(toy_models["toy-sd15"], target)
    assert not (target / "stale.txt").exists()
    assert (target / "unet" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --------------------------------------------------------------------------- real layouts


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_real_architecture_checkpoints_load_through_the_production_loader(
    family, reference_dirs
):
    directory = reference_dirs[family]
    assert detect_family(directory) == family
    model = load_base_model(directory)  # family="auto"
    assert model.family == family
    assert type(model.tokenizer).__name__ == "CLIPTokenizer"
    assert type(model.scheduler).__name__ == "DDIMScheduler"  # from a PNDM / Euler config
    assert model.scheduler.config.steps_offset == 1
    assert model.scheduler.config.beta_schedule == "scaled_linear"
    assert model.image_size == 64
    assert model.force_zeros_for_empty_prompt is (family == "sdxl")
    block_types = model.unet.config.down_block_types
    if family == "sd15":
        assert list(block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    else:
        assert list(model.unet.config.transformer_layers_per_block) == [1, 2, 3]
        assert model.unet.config.use_linear_projection
    # The same seed rebuilt in memory has the same weights: the loader lost nothing.
    built = build_tiny_reference_model(family, seed=3)
    latents = _latents(model)
    with torch.no_grad():
        embeds = encode_prompt(model, ["a photo of a cat", "a red circle on the table"])
        output = predict_noise(model, latents, torch.tensor([999, 1]), embeds)
        expected = predict_noise(
            built, latents, torch.tensor([999, 1]),
            encode_prompt(built, ["a photo of a cat", "a red circle on the table"]),
        )  # fmt: skip
    assert output.shape == latents.shape and torch.isfinite(output).all()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    if family == "sdxl":
        assert embeds.prompt_embeds.shape == (2, 77, 32 + 48)
        assert embeds.pooled_prompt_embeds.shape == (2, 48)


def test_legacy_eos_id_pools_on_the_end_of_text_token(reference_dirs):
    model = load_base_model(reference_dirs["sdxl"])
    tokenizer = model.tokenizer_2
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    end = (ids.input_ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # highest id, as in real CLIP
    with torch.no_grad():
        out = model.text_encoder_2(input_ids=ids.input_ids)
        manual = model.text_encoder_2.text_projection(out.last_hidden_state[0, end])
    torch.testing.assert_close(out.text_embeds[0], manual)


def test_family_mismatch_and_broken_directories_are_clear_errors(reference_dirs, tmp_path):
    with pytest.raises(CheckpointError, match=r"asked for family 'sdxl' but .* 'sd15'"):
        load_base_model(reference_dirs["sd15"], family="sdxl")
    broken = tmp_path / "broken"
    shutil.copytree(reference_dirs["sdxl"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing or empty subfolder") as info:
        load_base_model(broken)
    assert str(broken) in str(info.value)
    assert "unet" in str(info.value) and "text_encoder_2" in str(info.value)
    # Without model_index.json the family comes from the subfolders.
    no_index = tmp_path / "no_index"
    shutil.copytree(reference_dirs["sdxl"], no_index)
    (no_index / "model_index.json").unlink()
    assert detect_family(no_index) == "sdxl"
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        detect_family(tmp_path / "nothing-here")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model_index.json: not valid JSON"):
        load_base_model(bad_json)


# --------------------------------------------------------------------------- conditioning


def test_encode_prompt_sd15_is_the_last_hidden_state(toy_models):
    model = toy_models["toy-sd15"]
    embeds = encode_prompt(model, PROMPTS)
    assert embeds.prompt_embeds.shape == (2, TOY_MAX_LENGTH, 32)
    assert embeds.pooled_prompt_embeds is None and embeds.add_time_ids is None
    ids = model.tokenizer(
        PROMPTS, padding="max_length", max_length=TOY_MAX_LENGTH, return_tensors="pt"
    )
    expected = model.text_encoder(input_ids=ids.input_ids).last_hidden_state
    torch.testing.assert_close(embeds.prompt_embeds, expected)
    with pytest.raises(TypeError, match="list of prompts"):
        encode_prompt(model, "a red circle")


def test_encode_prompt_sdxl_concatenates_penultimate_states_and_adds_pooled_and_time_ids(
    toy_models,
):
    model = toy_models["toy-sdxl"]
    embeds = encode_prompt(model, PROMPTS)
    assert embeds.prompt_embeds.shape == (2, TOY_MAX_LENGTH, 64)
    assert embeds.pooled_prompt_embeds.shape == (2, 32)
    assert embeds.add_time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    ids = model.tokenizer(
        PROMPTS, padding="max_length", max_length=TOY_MAX_LENGTH, return_tensors="pt"
    )
    out_1 = model.text_encoder(input_ids=ids.input_ids, output_hidden_states=True)
    out_2 = model.text_encoder_2(input_ids=ids.input_ids, output_hidden_states=True)
    torch.testing.assert_close(embeds.prompt_embeds[..., :32], out_1.hidden_states[-2])
    torch.testing.assert_close(embeds.prompt_embeds[..., 32:], out_2.hidden_states[-2])
    assert not torch.allclose(out_2.hidden_states[-2], out_2.last_hidden_state)
    torch.testing.assert_close(embeds.pooled_prompt_embeds, out_2.text_embeds)


def test_gradients_reach_a_text_encoder_that_requires_them(toy_models):
    model = build_toy_model("toy-sd15", seed=1)
    model.text_encoder.requires_grad_(True)
    embeds = encode_prompt(model, PROMPTS)
    predict_noise(model, _latents(model), 10, embeds).square().mean().backward()
    grad = model.text_encoder.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    frozen = toy_models["toy-sd15"]
    assert not encode_prompt(frozen, PROMPTS).prompt_embeds.requires_grad


def test_unconditional_embeds_follow_force_zeros_for_sdxl(toy_models):
    model = toy_models["toy-sdxl"]
    with torch.no_grad():
        plain = unconditional_embeds(model, 3)
        assert len(plain) == 3 and plain.prompt_embeds.abs().sum() > 0
        model.force_zeros_for_empty_prompt = True
        try:
            zeros = unconditional_embeds(model, 3)
            negative = unconditional_embeds(model, 3, "noisy background")
        finally:
            model.force_zeros_for_empty_prompt = False
    assert zeros.prompt_embeds.abs().sum() == 0 and zeros.pooled_prompt_embeds.abs().sum() == 0
    assert zeros.add_time_ids.tolist() == plain.add_time_ids.tolist()
    assert negative.prompt_embeds.abs().sum() > 0


def test_prompt_embeds_batch_operations(toy_models):
    with torch.no_grad():
        cond = encode_prompt(toy_models["toy-sdxl"], PROMPTS)
        uncond = unconditional_embeds(toy_models["toy-sdxl"], 2)
    both = cond.with_unconditional(uncond)
    assert len(both) == 4
    assert torch.equal(both.select(slice(2, 4)).prompt_embeds, cond.prompt_embeds)
    assert torch.equal(both.select([0, 1]).pooled_prompt_embeds, uncond.pooled_prompt_embeds)
    repeated = cond.repeat(3)
    assert len(repeated) == 6 and torch.equal(repeated.add_time_ids[2], cond.add_time_ids[0])
    assert repeated.select(slice(3, 6)).prompt_embeds.equal(cond.prompt_embeds[1:].repeat(3, 1, 1))
    half = cond.to(dtype=torch.float64)
    assert (
        half.prompt_embeds.dtype == torch.float64
        and half.pooled_prompt_embeds.dtype == torch.float64
    )
    with pytest.raises(ValueError, match="rows"):
        cond.with_unconditional(uncond.select([0]))
    with pytest.raises(ValueError, match="some items only"):
        PromptEmbeds.cat([cond, PromptEmbeds(prompt_embeds=cond.prompt_embeds)])


# --------------------------------------------------------------------------- UNet and VAE


def test_predict_noise_timesteps_scalar_per_sample_and_range(toy_models):
    model = toy_models["toy-sdxl"]
    latents = _latents(model, 2)
    with torch.no_grad():
        embeds = encode_prompt(model, PROMPTS)
        per_sample = predict_noise(model, latents, torch.tensor([999, 10]), embeds)
        first = predict_noise(model, latents[:1], 999, embeds.select([0]))
        second = predict_noise(model, latents[1:], torch.tensor(10), embeds.select([1]))
        torch.testing.assert_close(per_sample, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(first, predict_noise(model, latents[:1], 10, embeds.select([0])))
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            predict_noise(model, latents, 1000, embeds)
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            predict_noise(model, latents, -1, embeds)
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            predict_noise(model, latents, torch.tensor([5, 1000]), embeds)
        with pytest.raises(ValueError, match="one per sample"):
            predict_noise(model, latents, torch.tensor([1, 2, 3]), embeds)
        with pytest.raises(ValueError, match="prompt embeddings"):
            predict_noise(model, latents, 1, embeds.select([0]))


def test_decode_and_encode_images(toy_models):
    model = toy_models["toy-sd15"]
    latents = _latents(model, 2).requires_grad_(True)
    images = decode_latents(model, latents)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    pictures = images.detach()
    with torch.no_grad():
        mode = encode_images(model, pictures)
        assert mode.shape == (2, 4, 8, 8)
        torch.testing.assert_close(encode_images(model, pictures), mode)
        sampled = encode_images(model, pictures, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(sampled, mode)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            encode_images(model, pictures * 2 - 1)
        with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
            encode_images(model, pictures[:, :1])


def test_scaling_factor_is_applied_both_ways(toy_models):
    model = build_toy_model("toy-sd15", seed=2)
    latents = _latents(model, 1)
    with torch.no_grad():
        base_images = decode_latents(model, latents)
        base_latents = encode_images(model, base_images)
        model.vae.register_to_config(scaling_factor=0.5)
        torch.testing.assert_close(decode_latents(model, latents * 0.5), base_images)
        torch.testing.assert_close(encode_images(model, base_images), base_latents * 0.5)


# --------------------------------------------------------------------------- precision


def test_precision_policy():
    assert resolve_dtypes("cpu", "bf16", vae_fp32=False) == (torch.float32, torch.float32)
    assert resolve_dtypes("cuda", "bf16", vae_fp32=True) == (torch.bfloat16, torch.float32)
    assert resolve_dtypes("cuda", "fp16", vae_fp32=False) == (torch.float16, torch.float16)
    assert resolve_dtypes("cuda", "no") == (torch.float32, torch.float32)
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_dtypes("cuda", "fp8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_half_precision_unet_with_fp32_vae_keeps_caller_dtypes():
    # bf16 runs on CPU too (slowly): this exercises the casts used on GPUs.
    model = build_toy_model("toy-sdxl", seed=0).to(dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert model.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    latents = _latents(model, 1)
    with torch.no_grad():
        embeds = encode_prompt(model, PROMPTS[:1])
        assert embeds.prompt_embeds.dtype == torch.bfloat16
        noise = predict_noise(model, latents, 500, embeds)
        images = decode_latents(model, latents)
    assert noise.dtype == torch.float32 and torch.isfinite(noise).all()
    assert images.dtype == torch.float32
    model.to(vae_dtype=torch.bfloat16)
    with torch.no_grad():
        assert decode_latents(model, latents).dtype == torch.float32
        assert encode_images(model, images).dtype == torch.float32
