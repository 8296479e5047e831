"""Feedback sampling math: scheduler timesteps (not loop indices), DDIM against diffusers, truncation."""

import pytest
import torch
from diffusers import DDIMScheduler

from unifl.feedback.sampling import (
    FeedbackSchedule,
    ddim_step,
    denoise,
    feedback_sample,
    guided_noise,
    merged_lora,
    noise_latents,
    predict_x0,
    sample_step,
)
from unifl.models.base import encode_prompt, predict_noise, unconditional_embeds
from unifl.models.toy_presets import SD_SCHEDULER_CONFIG, build_toy_model

PROMPTS = ["a red circle", "a blue square above a green triangle"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_toy_model("toy-sd15", seed=0)


@pytest.fixture(scope="module")
def embeds(model):
    with torch.no_grad():
        return encode_prompt(model, PROMPTS), unconditional_embeds(model, len(PROMPTS))


class UNetRecorder:
    """Records what every UNet call receives: the timestep and whether grad mode was on."""

    def __init__(self, unet):
        self.timesteps: list[list[int]] = []
        self.grad_enabled: list[bool] = []
        self.input_requires_grad: list[bool] = []
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample, timestep = args[0], args[1]
        self.timesteps.append(torch.as_tensor(timestep).reshape(-1).tolist())
        self.grad_enabled.append(torch.is_grad_enabled())
        self.input_requires_grad.append(bool(sample.requires_grad))

    def close(self):
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_schedule_counts_steps_from_the_clean_end():
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    schedule = FeedbackSchedule.from_scheduler(scheduler, 20)
    assert schedule.num_steps == 20
    assert schedule.timesteps.tolist() == list(range(1, 1000, 50))
    assert (
        schedule.timestep(0) == 1 and schedule.timestep(10) == 501 and schedule.timestep(19) == 951
    )
    assert schedule.alpha(19) == pytest.approx(float(scheduler.alphas_cumprod[951]))
    assert schedule.alpha_after(5) == schedule.alpha(4)
    # set_alpha_to_one=False: the step after the last one lands on abar[0], as DDIM does.
    assert schedule.alpha_after(0) == pytest.approx(float(scheduler.alphas_cumprod[0]))
    trailing = FeedbackSchedule.from_scheduler(scheduler, 20, spacing="trailing")
    assert trailing.timestep(19) == 999 and trailing.timestep(0) == 49
    # 20 trailing steps contain every timestep of 4-step trailing inference.
    assert {999, 749, 499, 249} <= set(trailing.timesteps.tolist())
    with pytest.raises(ValueError, match="outside the 20-step schedule"):
        schedule.timestep(20)
    assert scheduler.num_inference_steps is None  # the template scheduler is not configured


def test_unet_receives_scheduler_timesteps_not_loop_indices(model, embeds):
    """The ReFL loop-index bug passes 0..19 to the UNet; the scheduler timesteps are 951..1."""
    cond, uncond = embeds
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, 20)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with UNetRecorder(model.unet) as recorder:
        sample = feedback_sample(model, latents, schedule, 19, 0, cond, uncond, 7.5, decode=False)
    expected = list(range(951, 0, -50))
    # With guidance each call carries [uncond; cond]: four rows of the same timestep.
    assert [calls[0] for calls in recorder.timesteps] == expected
    assert all(len(set(calls)) == 1 for calls in recorder.timesteps)
    assert sample.timestep == 1 and sample.step == 0

    with UNetRecorder(model.unet) as recorder:
        sample = feedback_sample(model, latents, schedule, 10, 3, cond, None, 1.0, decode=False)
    assert [calls[0] for calls in recorder.timesteps] == [501, 451, 401, 351, 301, 251, 201, 151]
    assert sample.timestep == 151

    with UNetRecorder(model.unet) as recorder:
        denoise(model, latents, schedule, 4, 1, cond)
    assert [calls[0] for calls in recorder.timesteps] == [201, 151, 101]


@pytest.mark.parametrize("spacing,steps", [("leading", 20), ("trailing", 4)])
def test_predict_x0_and_ddim_step_match_diffusers(spacing, steps):
    config = {**SD_SCHEDULER_CONFIG, "timestep_spacing": spacing}
    reference = DDIMScheduler(**config)
    reference.set_timesteps(steps)
    schedule = FeedbackSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER_CONFIG), steps, spacing)
    generator = torch.Generator().manual_seed(1)
    for position, timestep in enumerate(reference.timesteps.tolist()):
        step = steps - 1 - position
        assert schedule.timestep(step) == timestep
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        eps = torch.randn(2, 4, 8, 8, generator=generator)
        out = reference.step(eps, timestep, latents, eta=0.0)
        x0 = predict_x0(latents, eps, schedule.alpha(step))
        prev = ddim_step(latents, eps, schedule.alpha(step), schedule.alpha_after(step))
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prev, out.prev_sample, rtol=1e-5, atol=1e-5)


def test_noise_latents_matches_add_noise():
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    schedule = FeedbackSchedule.from_scheduler(scheduler, 20)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = noise_latents(latents, noise, schedule.alpha(10))
    theirs = scheduler.add_noise(latents, noise, torch.tensor([501] * 3))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # x0 prediction from the true noise recovers the clean latents.
    torch.testing.assert_close(
        predict_x0(ours, noise, schedule.alpha(10)), latents, atol=1e-4, rtol=0
    )


def test_denoise_and_final_step_equal_the_diffusers_ddim_loop(model, embeds):
    cond, _ = embeds
    steps = 4
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, steps)
    reference = DDIMScheduler.from_config(model.scheduler.config)
    reference.set_timesteps(steps)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = start.clone()
        for timestep in reference.timesteps:
            eps = predict_noise(model, expected, timestep, cond)
            expected = reference.step(eps, timestep, expected, eta=0.0).prev_sample
        ours = denoise(model, start, schedule, steps - 1, 0, cond)
        eps = predict_noise(model, ours, schedule.timestep(0), cond)
        ours = ddim_step(ours, eps, schedule.alpha(0), schedule.alpha_after(0))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def lora_toy_model(dtype=torch.float32):
    """The toy model with LoRA adapters whose B matrices are random (so that they matter)."""
    from peft import LoraConfig

    lora_model = build_toy_model("toy-sd15", seed=0)
    lora_model.unet.to(dtype)
    lora_model.unet.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )
    generator = torch.Generator().manual_seed(9)
    for name, parameter in lora_model.unet.named_parameters():
        if "lora_" in name:
            parameter.data = 0.2 * torch.randn(parameter.shape, generator=generator)
    return lora_model


def base_weights(unet):
    return {
        name: parameter.detach().clone()
        for name, parameter in unet.named_parameters()
        if "lora_" not in name
    }


def test_denoise_with_lora_folds_the_adapters_in_and_restores_the_weights(embeds):
    from peft.tuners.lora import LoraLayer

    cond, uncond = embeds
    lora_model = lora_toy_model()
    before = base_weights(lora_model.unet)
    schedule = FeedbackSchedule.from_scheduler(lora_model.scheduler, 20)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = start.clone()  # the adapters run as layers, unmerged
        for step in range(10, 3, -1):
            eps = guided_noise(lora_model, expected, schedule.timestep(step), cond, uncond, 3.0)
            expected = ddim_step(expected, eps, schedule.alpha(step), schedule.alpha_after(step))
        lora_model.unet.disable_adapters()
        without = denoise(lora_model, start, schedule, 10, 3, cond, uncond, 3.0)
        lora_model.unet.enable_adapters()
    with UNetRecorder(lora_model.unet) as recorder:
        merged = []
        lora_model.unet.register_forward_pre_hook(
            lambda unet, args: merged.append(
                all(layer.merged for layer in unet.modules() if isinstance(layer, LoraLayer))
            )
        )
        ours = denoise(lora_model, start, schedule, 10, 3, cond, uncond, 3.0)
    assert len(recorder.timesteps) == 7 and merged == [True] * 7
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (ours - without).abs().max() > 100 * (ours - expected).abs().max()
    after = base_weights(lora_model.unet)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(
        layer.merged for layer in lora_model.unet.modules() if isinstance(layer, LoraLayer)
    )


def test_merged_lora_restores_bf16_weights_exactly_even_on_error():
    from peft.tuners.lora import LoraLayer

    lora_model = lora_toy_model(torch.bfloat16)
    before = base_weights(lora_model.unet)
    layers = [layer for layer in lora_model.unet.modules() if isinstance(layer, LoraLayer)]
    assert len(layers) == 3 * 14  # to_q, to_k, to_v of the toy UNet's 14 attention layers
    with pytest.raises(RuntimeError, match="inside"), merged_lora(lora_model.unet):
        assert all(layer.merged for layer in layers)
        changed = base_weights(lora_model.unet)
        assert any(not torch.equal(before[name], changed[name]) for name in before)
        raise RuntimeError("inside")
    after = base_weights(lora_model.unet)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(layer.merged for layer in layers)


def test_guided_noise_is_uncond_plus_scale_times_difference(model, embeds):
    cond, uncond = embeds
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        guided = guided_noise(model, latents, 501, cond, uncond, 3.0)
        eps_cond = predict_noise(model, latents, 501, cond)
        eps_uncond = predict_noise(model, latents, 501, uncond)
        plain = guided_noise(model, latents, 501, cond, uncond, 1.0)
    torch.testing.assert_close(
        guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(plain, eps_cond, atol=1e-6, rtol=0)


def test_truncation_keeps_gradients_in_the_last_k_calls_only(model, embeds):
    cond, _ = embeds
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, 20)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    model.unet.requires_grad_(True)
    try:
        with UNetRecorder(model.unet) as recorder:
            sample = feedback_sample(
                model, latents, schedule, 10, 2, cond, truncate=3, decode=False
            )
        # Steps 10..2 are nine calls; only the last three (steps 4, 3, 2) run with gradients.
        assert recorder.grad_enabled == [False] * 6 + [True] * 3
        # The first call with gradients starts from detached latents; the later ones do not.
        assert recorder.input_requires_grad == [False] * 7 + [True] * 2
        assert sample.x0_latents.requires_grad
        sample.x0_latents.square().mean().backward()
        grads = [p.grad for p in model.unet.parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    finally:
        model.unet.zero_grad(set_to_none=True)
        model.unet.requires_grad_(False)


def test_gradient_checkpointing_gives_the_same_values_and_gradients(model, embeds):
    cond, _ = embeds
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, 4)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    weight = model.unet.conv_in.weight
    weight.requires_grad_(True)
    results = []
    try:
        for checkpointing in (False, True):
            sample = feedback_sample(
                model,
                latents,
                schedule,
                3,
                1,
                cond,
                truncate=2,
                gradient_checkpointing=checkpointing,
            )
            sample.images.mean().backward()
            results.append((sample.images.detach(), weight.grad.clone()))
            weight.grad = None
    finally:
        weight.requires_grad_(False)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert results[0][0].shape == (2, 3, 32, 32)
    assert float(results[0][0].min()) >= 0 and float(results[0][0].max()) <= 1


def test_bad_step_arguments_are_errors(model, embeds):
    cond, _ = embeds
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, 4)
    latents = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="grad_step"):
        feedback_sample(model, latents, schedule, 1, 2, cond)
    with pytest.raises(ValueError, match="grad_step"):
        feedback_sample(model, latents, schedule, 4, 0, cond)
    with pytest.raises(ValueError, match="truncate"):
        feedback_sample(model, latents, schedule, 2, 0, cond, truncate=0)
    with pytest.raises(ValueError, match="cannot denoise"):
        denoise(model, latents, schedule, 1, 2, cond)


def test_sample_step_is_inclusive_and_seeded():
    draws = {sample_step(0, 3, torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1, 2, 3}
    first = [sample_step(0, 19, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert len(set(first)) == 1
    assert sample_step(5, 5) == 5
    with pytest.raises(ValueError, match="empty step range"):
        sample_step(3, 2)
