"""DDIM sampling: timesteps, determinism, guidance, and the image writers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from unifl.models.base import decode_latents, encode_prompt, predict_noise
from unifl.models.sampler import (
    ddim_timesteps,
    generate,
    initial_noise,
    prompt_seed,
    save_images,
    to_pil,
)
from unifl.models.toy_presets import SD_SCHEDULER_CONFIG, build_toy_model

PROMPTS = [
    "a red circle",
    "a blue square above a green triangle",
    "a large yellow circle on a striped background",
    "a small red triangle left of a blue circle",
    "a green square",
]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models: OpenMP start-up and spin-waits cost more than two threads gain."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_toy_model("toy-sd15", seed=0)


def test_trailing_and_leading_timesteps_for_4_of_1000_steps():
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    assert ddim_timesteps(scheduler, 4, "trailing") == [999, 749, 499, 249]
    assert ddim_timesteps(scheduler, 4, "leading") == [751, 501, 251, 1]
    assert ddim_timesteps(scheduler, 20, "leading")[:3] == [951, 901, 851]
    assert ddim_timesteps(scheduler, 20, "leading")[-1] == 1
    # The same numbers as diffusers' own DDIM with each spacing.
    for spacing in ("leading", "trailing", "linspace"):
        reference = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "timestep_spacing": spacing})
        reference.set_timesteps(4)
        assert ddim_timesteps(scheduler, 4, spacing) == reference.timesteps.tolist()
    # The source scheduler is a template: never configured in place.
    assert scheduler.num_inference_steps is None
    assert scheduler.config.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim_timesteps(scheduler, 4, "karras")
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(scheduler, 0, "leading")


def test_prompt_seeds_are_stable_and_distinct():
    seeds = {prompt_seed(seed, index) for seed in range(4) for index in range(50)}
    assert len(seeds) == 200
    assert prompt_seed(3, 7) == prompt_seed(3, 7)
    assert all(0 <= value < 2**63 for value in seeds)


def test_generate_is_deterministic_per_seed_and_independent_of_batch_size(model):
    images = generate(model, PROMPTS, steps=3, guidance_scale=5.0, seed=11, batch_size=16)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    again = generate(model, PROMPTS, steps=3, guidance_scale=5.0, seed=11, batch_size=16)
    torch.testing.assert_close(again, images, rtol=0, atol=0)
    for batch_size in (1, 4):
        split = generate(
            model, PROMPTS, steps=3, guidance_scale=5.0, seed=11, batch_size=batch_size
        )
        torch.testing.assert_close(split, images, rtol=0, atol=1e-5)
    other_seed = generate(model, PROMPTS, steps=3, guidance_scale=5.0, seed=12, batch_size=16)
    assert (other_seed - images).abs().mean() > 1e-2
    # Prompt i's image does not depend on the other prompts in the list.
    tail = generate(model, PROMPTS[:2], steps=3, guidance_scale=5.0, seed=11)
    torch.testing.assert_close(tail, images[:2], rtol=0, atol=1e-5)
    # A list sampled in parts, each told where it starts, gives the images of one call.
    rest = generate(model, PROMPTS[2:], steps=3, guidance_scale=5.0, seed=11, first_index=2)
    torch.testing.assert_close(rest, images[2:], rtol=0, atol=1e-5)
    unplaced = generate(model, PROMPTS[2:], steps=3, guidance_scale=5.0, seed=11)
    assert (unplaced - images[2:]).abs().mean() > 1e-2


def test_one_trailing_step_is_the_ddim_update_from_t_999(model):
    images = generate(model, PROMPTS[:2], steps=1, guidance_scale=1.0, timestep_spacing="trailing")
    alphas = model.scheduler.alphas_cumprod
    with torch.no_grad():
        noise = initial_noise(model, 2, seed=0)
        eps = predict_noise(model, noise, 999, encode_prompt(model, PROMPTS[:2]))
        x0 = (noise - (1 - alphas[999]).sqrt() * eps) / alphas[999].sqrt()
        # set_alpha_to_one=False: the final "previous" step is alphas_cumprod[0].
        latents = alphas[0].sqrt() * x0 + (1 - alphas[0]).sqrt() * eps
        expected = decode_latents(model, latents)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_is_a_single_conditional_pass(model):
    batch_sizes = []
    hook = model.unet.register_forward_hook(
        lambda module, args, kwargs_or_output: batch_sizes.append(args[0].shape[0])
    )
    try:
        plain = generate(model, PROMPTS[:3], steps=2, guidance_scale=1.0, seed=4)
        assert batch_sizes == [3, 3]
        batch_sizes.clear()
        guided = generate(model, PROMPTS[:3], steps=2, guidance_scale=7.5, seed=4)
        assert batch_sizes == [6, 6]
    finally:
        hook.remove()
    assert (guided - plain).abs().mean() > 1e-3
    # With the prompt itself as the negative prompt, guidance cancels: cond-only again.
    same = generate(
        model, PROMPTS[:1], steps=2, guidance_scale=7.5, seed=4, negative_prompt=PROMPTS[0]
    )
    torch.testing.assert_close(same, plain[:1], rtol=0, atol=1e-4)


def test_generate_on_sdxl_toy_and_bad_arguments(model):
    sdxl = build_toy_model("toy-sdxl", seed=0)
    images = generate(sdxl, PROMPTS[:2], steps=2, seed=1, timestep_spacing="trailing")
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, "a red circle")
    with pytest.raises(ValueError, match="guidance_scale"):
        generate(model, PROMPTS, guidance_scale=0.5)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [])


def test_to_pil_and_save_images_round_trip(tmp_path):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pictures = to_pil(images)
    assert [p.size for p in pictures] == [(8, 8)] * 3 and pictures[0].mode == "RGB"
    paths = save_images(images, tmp_path / "out", ["a", "b.png", "c_1"])
    assert [p.name for p in paths] == ["a.png", "b.png", "c_1.png"]
    pixels = np.asarray(Image.open(paths[1]))
    expected = (images[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels, expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c_1.png"]
    with pytest.raises(ValueError, match="3 images but 2 names"):
        save_images(images, tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="plain file name"):
        save_images(images, tmp_path, ["a", "../b", "c"])
    with pytest.raises(ValueError, match="unique"):
        save_images(images, tmp_path, ["a", "a.png", "c"])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_pil(images[:, :2])
