"""Every feedback stage runs one step on toy-sd15 and toy-sdxl from directories, and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from unifl.cli import app
from unifl.config import load_params
from unifl.feedback.stages import run_adversarial, run_decoupled, run_pefl
from unifl.models.base import load_base_model, save_base_model
from unifl.models.reward import DecoupledRewardModel, build_toy_reward_model
from unifl.models.sampler import generate
from unifl.models.segmenter import ToySegmenter
from unifl.models.toy_presets import build_toy_model
from unifl.toy.dataset import write_toy_dataset

PRESETS = ["toy-sd15", "toy-sdxl"]
STAGE_SETTINGS = [
    "project.device=cpu",
    "trainer.num_inference_steps=5",
    "trainer.batch_size=2",
    "trainer.guidance_scale=2.0",
    "pefl.steps=1",
    "pefl.start_step=2",
    "pefl.max_step=1",
    "decoupled.steps=1",
    "decoupled.max_step=1",
    "adversarial.steps=1",
    "adversarial.start_step=3",
    "adversarial.eval_prompts=2",
]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=PRESETS)
def inputs(request, tmp_path_factory):
    """A saved toy base model, four toy images, a reward model and a segmenter."""
    root = tmp_path_factory.mktemp(request.param)
    save_base_model(build_toy_model(request.param), root / "base")
    write_toy_dataset(root / "data", 4, seed=5, progress=False)
    reward = build_toy_reward_model()
    reward.set_alphas({"color": 1.0, "layout": 1.0, "detail": 1.0, "lighting": 1.0})
    reward.save(root / "reward")
    ToySegmenter().save(root / "segmenter")
    return root


def params(*extra: str):
    return load_params(None, overrides=[*STAGE_SETTINGS, *extra])


def adversarial_run(inputs: Path, tmp_path: Path, *settings: str):
    """One adversarial stage run on the fixture's model, images and reward model."""
    return run_adversarial(
        params(*settings),
        inputs / "base",
        inputs / "data",
        inputs / "reward",
        tmp_path / "adv",
        progress=False,
    )


def adversarial_trainer(inputs: Path, *settings: str, out: Path | None = None):
    """The adversarial stage's trainer on the fixture's inputs, not yet trained."""
    from unifl.feedback.adversarial import AdversarialTrainer
    from unifl.feedback.stages import load_image_data, load_reward, load_stage_model

    p = params(*settings)
    return AdversarialTrainer(
        load_stage_model(p, inputs / "base"),
        load_image_data(inputs / "data"),
        load_reward(inputs / "reward"),
        p,
        out or inputs / "unused",
        progress=False,
    )


def check_common_outputs(out: Path, stage: str, family: str) -> dict:
    model = load_base_model(out / "model")
    assert model.family == family
    assert not any("lora" in key for key in model.unet.state_dict())
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "step-00000001" / "trainer_state.json").is_file()
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss") and history[1].startswith("1,")
    assert json.loads((out / "stage.json").read_text())["stage"] == stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["final_loss"] > 0
    return metrics


def test_pefl_runs_one_step(inputs, tmp_path):
    family = load_base_model(inputs / "base").family
    result = run_pefl(
        params(),
        inputs / "base",
        inputs / "data",
        tmp_path / "pefl",
        reward=inputs / "reward",
        segmenter=inputs / "segmenter",
        progress=False,
    )
    metrics = check_common_outputs(result.out_dir, "pefl", family)
    assert {"final_pefl", "final_pefl_toy_segmenter", "final_aes", "final_reward_color"} <= set(
        metrics
    )
    assert result.lora_dir == tmp_path / "pefl" / "lora"
    assert 0 <= result.history[0]["t"] <= 1 and "final_t" not in metrics


@pytest.mark.parametrize("weight", ["trainer.mse_weight=0.5", "decoupled.mse_weight=0.5"])
def test_decoupled_runs_one_step_with_the_mse_regulariser(inputs, tmp_path, weight):
    family = load_base_model(inputs / "base").family
    result = run_decoupled(
        params(weight),
        inputs / "base",
        inputs / "data",  # its captions are the prompts; its images feed the regulariser
        inputs / "reward",
        tmp_path / "dec",
        data=inputs / "data",
        progress=False,
    )
    metrics = check_common_outputs(result.out_dir, "decoupled", family)
    assert metrics["final_hinge_color"] > 0  # alpha 1.0 is above the random rewards
    assert metrics["final_mse"] > 0
    assert metrics["final_loss"] == pytest.approx(metrics["final_aes"] + 0.5 * metrics["final_mse"])
    assert (
        json.loads((tmp_path / "dec" / "stage.json").read_text())["config"]["decoupled"]["max_step"]
        == 1
    )


def test_adversarial_runs_one_step_and_samples_in_four_trailing_steps(inputs, tmp_path):
    family = load_base_model(inputs / "base").family
    result = adversarial_run(inputs, tmp_path)
    metrics = check_common_outputs(result.out_dir, "adversarial", family)
    assert {"final_d_loss", "final_g_loss", "final_d_accuracy"} <= set(metrics)
    assert {"reward_detail_4steps", "reward_detail_5steps", "discriminator_4steps"} <= set(metrics)
    assert result.history[0]["timestep"] in (999, 749, 499, 249)  # the 4-step sampler's own
    discriminator = DecoupledRewardModel.load(result.discriminator_dir)
    assert discriminator.dimensions == ("detail",)
    tuned = load_base_model(result.model_dir)
    images = generate(
        tuned, ["a red circle", "a blue square"], steps=4, timestep_spacing="trailing"
    )
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())


def test_patch_discriminator_starts_as_the_reward_head_and_scores_each_patch():
    from unifl.feedback.adversarial import make_discriminator

    reward = build_toy_reward_model()
    discriminator = make_discriminator(reward, "detail", patches=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        start = discriminator(images, prompts=prompts, dimensions=["detail"])["detail"]
        expected = reward(images, prompts=prompts, dimensions=["detail"])["detail"]
    # The patch head's last layer starts at zero: r_a is the reward model's score.
    torch.testing.assert_close(start, expected)
    # The patch logits are averaged: a head that scores every patch 1 adds exactly 1.
    last = discriminator.patch_head[-1]
    with torch.no_grad():
        last.bias.fill_(1.0)
        shifted = discriminator(images, prompts=prompts, dimensions=["detail"])["detail"]
    torch.testing.assert_close(shifted, expected + 1.0)
    # Training reaches the patch head and the reward head alike.
    discriminator(images, prompts=prompts)["detail"].sum().backward()
    assert float(last.weight.grad.abs().sum()) > 0
    assert float(discriminator.reward_model.heads["detail"][0].weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="'detail' only"):
        discriminator(images, prompts=prompts, dimensions=["color"])


def test_adversarial_with_the_patch_discriminator_saves_both_heads(inputs, tmp_path):
    from safetensors.torch import load_file

    from unifl.feedback.adversarial import PATCH_HEAD_FILE

    result = adversarial_run(inputs, tmp_path, "adversarial.discriminator_patches=true")
    assert "final_d_loss" in json.loads((result.out_dir / "metrics.json").read_text())
    assert DecoupledRewardModel.load(result.discriminator_dir).dimensions == ("detail",)
    head = load_file(str(result.discriminator_dir / PATCH_HEAD_FILE))
    # One discriminator step moved the patch head's last layer off its zero start.
    assert float(head["2.weight"].abs().sum()) > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_unet_feature_discriminator_starts_as_the_reward_head_and_reads_the_latents(preset):
    from unifl.feedback.adversarial import make_discriminator
    from unifl.models.base import encode_images, encode_prompt

    model = build_toy_model(preset)
    reward = build_toy_reward_model()
    discriminator = make_discriminator(reward, "detail", feature_model=model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        inputs = {"latents": encode_images(model, images), "embeds": encode_prompt(model, prompts)}
        start = discriminator(images, prompts=prompts, **inputs)["detail"]
        expected = reward(images, prompts=prompts, dimensions=["detail"])["detail"]
    # The heads' last layers start at zero: r_a is the reward model's score.
    torch.testing.assert_close(start, expected)
    # Positions and levels are averaged: heads that score every position 1 add exactly 1.
    with torch.no_grad():
        for head in discriminator.heads:
            head.out.bias.fill_(1.0)
        shifted = discriminator(images, prompts=prompts, **inputs)["detail"]
    torch.testing.assert_close(shifted, expected + 1.0)
    # The heads read the latents: other latents, other scores (weights off zero).
    with torch.no_grad():
        for head in discriminator.heads:
            head.out.weight.normal_(generator=torch.Generator().manual_seed(1))
        scored = discriminator(images, prompts=prompts, **inputs)["detail"]
        moved = dict(inputs, latents=inputs["latents"] + 1.0)
        other = discriminator(images, prompts=prompts, **moved)["detail"]
    assert float((scored - other).abs().min()) > 1e-4
    # The caption's embedding enters the heads through their text projection too.
    with torch.no_grad():
        for head in discriminator.heads:
            head.text.weight.normal_(generator=torch.Generator().manual_seed(2))
        projected = discriminator(images, prompts=prompts, **inputs)["detail"]
    assert float((projected - scored).abs().min()) > 1e-4
    # The gradient reaches the heads, the reward head and the latents, never the frozen UNet.
    latents = inputs["latents"].clone().requires_grad_(True)
    discriminator(images, prompts=prompts, **dict(inputs, latents=latents))[
        "detail"
    ].sum().backward()
    assert float(discriminator.heads[0].out.weight.grad.abs().sum()) > 0
    assert float(discriminator.heads[0].text.weight.grad.abs().sum()) > 0
    assert float(discriminator.inner.heads["detail"][0].weight.grad.abs().sum()) > 0
    assert float(latents.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in discriminator.unet.parameters())
    # A copy: changing the base model's UNet leaves the discriminator's scores as they were.
    with torch.no_grad():
        before = discriminator(images, prompts=prompts, **inputs)["detail"]
        for parameter in model.unet.parameters():
            parameter.add_(0.1)
        after = discriminator(images, prompts=prompts, **inputs)["detail"]
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="max_timestep"):
        make_discriminator(reward, "detail", feature_model=model, feature_max_timestep=1000)


def test_the_discriminator_heads_are_drawn_from_the_seed_not_the_process_state():
    from unifl.feedback.adversarial import make_discriminator

    model = build_toy_model("toy-sd15")
    reward = build_toy_reward_model()

    def first_layers(seed: int) -> list[torch.Tensor]:
        made = make_discriminator(reward, "detail", True, feature_model=model, seed=seed)
        layers = [head.hidden[0].weight for head in made.heads]
        return [made.inner.patch_head[0].weight, *layers]

    torch.manual_seed(1)
    first = first_layers(seed=3)
    torch.rand(1000)  # another process history
    again = first_layers(seed=3)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    other = first_layers(seed=4)
    assert not torch.equal(first[1], other[1])


def test_adversarial_with_unet_features_saves_the_heads_and_applies_r1(inputs, tmp_path):
    from safetensors.torch import load_file

    from unifl.feedback.adversarial import FEATURE_HEADS_FILE

    result = adversarial_run(
        inputs, tmp_path, "adversarial.discriminator_unet_features=true", "adversarial.r1_weight=1"
    )
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert {"final_d_loss", "discriminator_4steps"} <= set(metrics)
    assert result.history[0]["r1"] > 0
    assert DecoupledRewardModel.load(result.discriminator_dir).dimensions == ("detail",)
    heads = load_file(str(result.discriminator_dir / FEATURE_HEADS_FILE))
    # One discriminator step moved every head's last layer off its zero start.
    last_layers = [name for name in heads if name.endswith((".out.weight", ".text.weight"))]
    assert len(last_layers) == 8
    assert all(float(heads[name].abs().sum()) > 0 for name in last_layers)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_shared_unet_gives_the_copys_features_and_is_left_as_it_was(preset):
    from peft import LoraConfig

    from unifl.feedback.adversarial import make_discriminator
    from unifl.models.base import encode_images, encode_prompt, predict_noise

    model = build_toy_model(preset)
    reward = build_toy_reward_model()
    copied = make_discriminator(reward, "detail", feature_model=model)
    shared = make_discriminator(reward, "detail", feature_model=model, share_unet=True)
    assert shared.shares_unet and shared.unet is model.unet and not copied.shares_unet
    assert not {id(p) for p in model.unet.parameters()} & {id(p) for p in shared.parameters()}
    # The model as the trainer holds it: an adapter trained away from zero, gradient
    # checkpointing on, train mode.
    model.unet.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=generator)
        for head in copied.heads:  # heads off their zero start, the same in both
            head.out.weight.normal_(generator=generator)
    shared.heads.load_state_dict(copied.heads.state_dict())
    model.unet.enable_gradient_checkpointing()
    model.unet.train()
    images = torch.rand(2, 3, 32, 32, generator=generator)
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        latents = encode_images(model, images)
        embeds = encode_prompt(model, prompts)
    scores, grads = [], []
    for discriminator in (copied, shared):
        read = latents.clone().requires_grad_(True)
        score = discriminator(images, prompts=prompts, latents=read, embeds=embeds)["detail"]
        score.sum().backward()
        scores.append(score.detach())
        grads.append(read.grad)
    # The starting UNet's features and their gradient, as the copy gives them.
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert float(grads[1].abs().sum()) > 0
    # The model's UNet is as it was: adapter on, checkpointing and train mode back, no hooks
    # left, and its adapter got no gradient from the features.
    assert model.unet.is_gradient_checkpointing and model.unet.training
    assert not any(
        block._forward_hooks for block in [*model.unet.down_blocks, model.unet.mid_block]
    )
    assert all(p.grad is None for name, p in model.unet.named_parameters() if "lora" in name)
    with torch.no_grad():
        tuned = predict_noise(model, latents, 500, embeds)
        starting = predict_noise(copied._model, latents, 500, embeds)
    assert float((tuned - starting).abs().max()) > 1e-4


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_feature_discriminator_reads_the_starting_unet_in_the_compute_dtype(
    inputs, tmp_path, monkeypatch, lora
):
    # The trainer runs mixed precision on GPUs only; bf16 autocast runs on the CPU as well, so
    # the accelerator is made bf16 here to take the casts that a GPU run takes.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from unifl.feedback.trainer import FeedbackTrainer

    def bf16_accelerator(self) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's "no"
        return Accelerator(mixed_precision="bf16", cpu=True)

    monkeypatch.setattr(FeedbackTrainer, "_make_accelerator", bf16_accelerator)
    try:
        trainer = adversarial_trainer(
            inputs,
            "adversarial.discriminator_unet_features=true",
            "adversarial.r1_weight=1",
            f"trainer.use_lora={str(lora).lower()}",
            out=tmp_path / "adv",
        )
        discriminator = trainer.discriminator
        assert trainer.compute_dtype == torch.bfloat16
        unet = discriminator.unet
        if lora:
            # The model's own UNet with its adapter off: no copy, and none of its parameters
            # are the discriminator's; its frozen weights take the compute dtype.
            assert discriminator.shares_unet and unet is trainer.model.unet
            assert not {id(p) for p in unet.parameters()} & {
                id(p) for p in discriminator.parameters()
            }
        else:
            # Full fine-tuning trains the model's UNet in fp32; the copy is only read.
            assert not discriminator.shares_unet and trainer.model.unet.dtype == torch.float32
        frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
        assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}
        trainable = [p for p in discriminator.parameters() if p.requires_grad]
        assert trainable and {p.dtype for p in trainable} == {torch.float32}
        trainer.train()
        row = trainer.history[0]
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "d_loss", "g_loss"))
        assert row["r1"] > 0 and row["grad_norm_discriminator"] > 0 and row["grad_norm_unet"] > 0
        # One step moved the heads' zero-started last layers and left the frozen weights as
        # they were.
        assert all(float(head.out.weight.detach().abs().sum()) > 0 for head in discriminator.heads)
        after = dict(unet.named_parameters())
        assert all(torch.equal(value, after[name]) for name, value in frozen.items())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_the_adversarial_stage_takes_its_own_grad_guidance_scale(inputs):
    def trainer(*settings: str):
        return adversarial_trainer(inputs, *settings)

    assert trainer().grad_guidance_scale == 1.0
    guided = trainer("adversarial.grad_guidance_scale=7.5")
    assert guided.grad_guidance_scale == 7.5
    # The guided gradient step needs the unconditional branch even without no-grad guidance.
    embeds, uncond = trainer(
        "trainer.guidance_scale=1", "adversarial.grad_guidance_scale=7.5"
    ).prompt_embeds(["a red circle"])
    assert uncond is not None and len(uncond) == 1


def test_the_aesthetic_subset_keeps_the_images_the_reward_model_scores_highest(inputs):
    from unifl.feedback.adversarial import aesthetic_subset
    from unifl.feedback.pefl import collate_images
    from unifl.feedback.stages import load_image_data, load_reward

    data = load_image_data(inputs / "data")
    reward = load_reward(inputs / "reward")
    batch = collate_images([data[i] for i in range(len(data))])
    with torch.no_grad():
        color = reward(batch.images, prompts=batch.captions, dimensions=["color"])["color"]
    kept = aesthetic_subset(data, reward, {"color": 1.0}, 0.5, batch_size=3)
    assert len(kept) == len(data) // 2
    dropped = sorted(set(range(len(data))) - set(kept.indices))
    assert float(color[kept.indices].min()) > float(color[dropped].max())
    # The subset serves the images themselves.
    torch.testing.assert_close(kept[0]["image"], data[kept.indices[0]]["image"])


def test_adversarial_trains_on_the_high_aesthetic_real_images(inputs):
    from unifl.feedback.adversarial import aesthetic_subset
    from unifl.feedback.decoupled import resolve_aesthetic_weights
    from unifl.feedback.stages import load_image_data, load_reward

    trainer = adversarial_trainer(inputs, "adversarial.real_aesthetic_quantile=0.5")
    data, reward = load_image_data(inputs / "data"), load_reward(inputs / "reward")
    weights = resolve_aesthetic_weights(params().decoupled.weights, reward)
    kept = aesthetic_subset(data, reward, weights, 0.5)
    assert len(trainer.data_set) == len(kept) == len(data) // 2
    assert trainer.data_set.indices == kept.indices
    # Its batches come from the kept images only.
    captions = {data[i]["caption"] for i in kept.indices}
    assert set(trainer.batch(0).captions) <= captions
    assert len(adversarial_trainer(inputs).data_set) == len(data)


SAMPLE_SETTINGS = ("adversarial.real_images=samples", "sampling.steps=3", "sampling.batch_size=2")


def test_adversarial_learns_real_from_the_starting_models_own_samples(inputs, tmp_path):
    from unifl.feedback.adversarial import ModelSamples
    from unifl.feedback.stages import load_image_data
    from unifl.feedback.trainer import derive_seed

    settings = (*SAMPLE_SETTINGS, "adversarial.real_sample_count=3")
    trainer = adversarial_trainer(inputs, *settings, out=tmp_path)
    data = load_image_data(inputs / "data")
    samples = trainer.data_set
    assert isinstance(samples, ModelSamples) and len(samples) == 3
    assert trainer.data.num_items == 3
    captions = [data[i]["caption"] for i in range(len(data))]
    assert [data.caption(i) for i in range(len(data))] == captions
    assert set(samples.captions) <= set(captions)
    # They are the starting model's samples at the full sampler (the LoRA adapter starts at
    # zero), not the data's images.
    p = params(*SAMPLE_SETTINGS)
    expected = generate(
        load_base_model(inputs / "base"),
        samples.captions,
        steps=3,
        guidance_scale=p.sampling.guidance_scale,
        seed=derive_seed(p.project.seed, 0xAD5),
        timestep_spacing=p.sampling.timestep_spacing,
        batch_size=2,
    )
    got = torch.stack([samples[i]["image"] for i in range(3)])
    torch.testing.assert_close(got, expected, atol=1 / 255 + 1e-6, rtol=0)
    first = captions.index(samples.captions[0])
    assert (got[0] - data[first]["image"]).abs().mean() > 0.05
    # A batch of samples has no label maps.
    batch = trainer.batch(0)
    assert batch.semantic_masks is None and batch.instance_masks is None
    assert set(batch.captions) <= set(samples.captions)


def test_the_samples_are_written_once_and_read_back_by_a_resumed_run(inputs, tmp_path):
    from unifl.feedback.images import save_image

    settings = (*SAMPLE_SETTINGS, "adversarial.real_sample_count=3")
    first = adversarial_trainer(inputs, *settings, out=tmp_path)
    directory = tmp_path / "real_samples"
    files = sorted(directory.glob("*.png"))
    assert len(files) == 3 and (directory / "manifest.json").is_file()
    # A resumed run reads the files back instead of sampling again: a changed file shows.
    save_image(torch.zeros(3, 32, 32), files[0])
    again = adversarial_trainer(inputs, *settings, out=tmp_path)
    assert float(again.data_set[0]["image"].max()) == 0
    torch.testing.assert_close(again.data_set[1]["image"], first.data_set[1]["image"])
    # Other sampler settings sample again.
    other = adversarial_trainer(inputs, *settings, "sampling.steps=2", out=tmp_path)
    assert float(other.data_set[0]["image"].max()) > 0
    assert json.loads((directory / "manifest.json").read_text())["steps"] == 2
    assert len(list(directory.glob("*.png"))) == 3


def test_another_stages_directory_fails_before_the_samples_are_drawn(inputs, tmp_path):
    from unifl.feedback.trainer import ResumeError

    run_pefl(
        params(),
        inputs / "base",
        inputs / "data",
        tmp_path,
        segmenter=inputs / "segmenter",
        progress=False,
    )
    settings = (*SAMPLE_SETTINGS, "adversarial.real_sample_count=3")
    with pytest.raises(ResumeError, match=r"stage: 'pefl' -> 'adversarial'"):
        adversarial_trainer(inputs, *settings, out=tmp_path)
    assert not (tmp_path / "real_samples").exists()


def test_a_run_stopped_while_sampling_samples_only_the_chunks_it_did_not_finish(
    inputs, tmp_path, monkeypatch
):
    import unifl.models.sampler
    from unifl.feedback import adversarial
    from unifl.feedback.images import load_image_uint8, save_image

    # Chunks of one sampler batch (sampling.batch_size 2): images 0-1, then image 2.
    monkeypatch.setattr(adversarial, "SAMPLE_CHUNK_BATCHES", 1)
    settings = (*SAMPLE_SETTINGS, "adversarial.real_sample_count=3")
    reference = adversarial_trainer(inputs, *settings, out=tmp_path / "whole")
    whole = sorted((tmp_path / "whole" / "real_samples").glob("*.png"))
    assert len(whole) == 3

    generate_chunk = unifl.models.sampler.generate
    calls = []

    def stopped_at_the_second_chunk(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_chunk(*args, **kwargs)

    monkeypatch.setattr(unifl.models.sampler, "generate", stopped_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        adversarial_trainer(inputs, *settings, out=tmp_path)
    directory = tmp_path / "real_samples"
    assert (directory / "manifest.json").is_file()
    assert sorted(f.name for f in directory.glob("*.png")) == [f.name for f in whole[:2]]
    # The resumed run samples the second chunk only: a changed file of the first one shows.
    monkeypatch.setattr(unifl.models.sampler, "generate", generate_chunk)
    save_image(torch.zeros(3, 32, 32), directory / whole[0].name)
    resumed = adversarial_trainer(inputs, *settings, out=tmp_path)
    assert float(resumed.data_set[0]["image"].max()) == 0
    for index in (1, 2):
        torch.testing.assert_close(
            resumed.data_set[index]["image"], reference.data_set[index]["image"]
        )
    assert torch.equal(load_image_uint8(directory / whole[2].name), load_image_uint8(whole[2]))
    # A chunk with a file missing is sampled whole again.
    (directory / whole[1].name).unlink()
    adversarial_trainer(inputs, *settings, out=tmp_path)
    for index in (0, 1):
        assert torch.equal(
            load_image_uint8(directory / whole[index].name), load_image_uint8(whole[index])
        )


def test_adversarial_on_samples_keeps_the_top_quantile_and_trains(inputs, tmp_path):
    settings = (*SAMPLE_SETTINGS, "adversarial.real_sample_count=100")
    trainer = adversarial_trainer(
        inputs, *settings, "adversarial.real_aesthetic_quantile=0.5", out=tmp_path / "q"
    )
    # At most one sample per caption of the data; the quantile keeps the top half of them.
    assert len(trainer.data_set) == 2 and trainer.data.num_items == 2
    result = adversarial_run(inputs, tmp_path, *settings)
    assert len(result.history) == 1
    assert {"d_loss", "g_loss", "d_accuracy"} <= set(result.history[0])
    assert DecoupledRewardModel.load(result.discriminator_dir).dimensions == ("detail",)
    # The sampler's settings made its real images, so the run records them.
    config = json.loads((tmp_path / "adv" / "stage.json").read_text())["config"]
    assert config["sampling"]["steps"] == 3


def test_a_toy_preset_name_as_base_takes_the_bootstraps_latents_and_layout():
    from unifl.feedback.stages import load_stage_model

    settings = ["bootstrap.latent_channels=8", "bootstrap.unet_layout=compact"]
    sd15 = load_stage_model(params(*settings), "toy-sd15")
    assert sd15.unet.config.in_channels == sd15.vae.config.latent_channels == 8
    assert sd15.unet.config.down_block_types[0] == "DownBlock2D"
    assert sd15.unet.config.use_linear_projection
    # The layout is toy-sd15's: toy-sdxl keeps its own and takes the latent channels only.
    sdxl = load_stage_model(params(*settings), "toy-sdxl")
    assert sdxl.unet.config.in_channels == 8
    assert list(sdxl.unet.config.down_block_types) == list(
        build_toy_model("toy-sdxl").unet.config.down_block_types
    )


def test_pefl_names_the_missing_label_maps():
    from unifl.feedback.pefl import collate_images, perceptual_annotations

    batch = collate_images([{"image": torch.zeros(3, 8, 8), "caption": "a red circle"}])
    assert batch.semantic_masks is None
    with pytest.raises(ValueError, match="no label maps"):
        perceptual_annotations(batch, ["semantic_masks"], torch.device("cpu"))
    style = perceptual_annotations(batch, ["style_images"], torch.device("cpu"))
    assert torch.equal(style["style_images"], batch.images)


def test_cli_stage_decoupled_resumes_and_names_bad_inputs(tmp_path):
    root = tmp_path
    save_base_model(build_toy_model("toy-sd15"), root / "base")
    build_toy_reward_model().save(root / "reward")
    (root / "prompts.txt").write_text("a red circle\na blue square on a dark background\n")
    (root / "params.yaml").write_text("")
    settings = [arg for item in STAGE_SETTINGS for arg in ("--set", item)]
    command = [
        "stage", "decoupled", "--base", str(root / "base"), "--prompts", str(root / "prompts.txt"),
        "--reward", str(root / "reward"), "--out", str(root / "out"),
        "--params", str(root / "params.yaml"), *settings,
    ]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    assert "decoupled: 1 steps" in first.output
    second = runner.invoke(app, [*command, "--set", "decoupled.steps=2"])
    assert second.exit_code == 0, second.output
    assert "2 steps, resumed from step 1" in second.output
    assert len((root / "out" / "history.csv").read_text().splitlines()) == 3

    missing = runner.invoke(app, [*command[:6], "--reward", str(root / "nowhere"), *command[8:]])
    assert missing.exit_code == 2
    assert "nowhere" in missing.output
    bad = runner.invoke(app, [*command, "--set", "decoupled.weights={sharpness: 1.0}"])
    assert bad.exit_code == 2
    assert "sharpness" in bad.output


def test_stage_settings_that_cannot_work_are_named(inputs, tmp_path):
    from unifl.feedback.adversarial import AdversarialTrainer
    from unifl.feedback.decoupled import DecoupledTrainer
    from unifl.feedback.pefl import PeflTrainer

    model = load_base_model(inputs / "base")
    reward = build_toy_reward_model()
    images = [{"image": torch.zeros(3, 32, 32), "caption": "a red circle"}]
    with pytest.raises(ValueError, match=r"pefl.max_step \(3\) must not exceed pefl.start_step"):
        PeflTrainer(model, images, None, params("pefl.max_step=3"), tmp_path)
    with pytest.raises(ValueError, match=r"pefl.start_step \(7\) must be below"):
        PeflTrainer(model, images, None, params("pefl.start_step=7"), tmp_path)
    with pytest.raises(ValueError, match="images are 32x32 px but the model makes 64x64"):
        PeflTrainer(build_toy_model("toy-sd15", resolution=64), images, None, params(), tmp_path)
    with pytest.raises(ValueError, match=r"decoupled.max_step \(5\) must be below"):
        DecoupledTrainer(model, reward, ["a"], params("decoupled.max_step=5"), tmp_path)
    with pytest.raises(ValueError, match=r"MSE regulariser \(weight 0.1: decoupled.mse_weight"):
        DecoupledTrainer(model, reward, ["a"], params("trainer.mse_weight=0.1"), tmp_path)
    with pytest.raises(ValueError, match="needs real images: pass regulariser_data"):
        DecoupledTrainer(model, reward, ["a"], params("decoupled.mse_weight=0.1"), tmp_path)
    with pytest.raises(ValueError, match="at least one prompt"):
        DecoupledTrainer(model, reward, [], params(), tmp_path)
    with pytest.raises(ValueError, match=r"adversarial.max_step \(4\) must not exceed"):
        AdversarialTrainer(model, images, reward, params("adversarial.max_step=4"), tmp_path)
    with pytest.raises(ValueError, match="no such head"):
        AdversarialTrainer(
            model, images, reward, params("adversarial.discriminator_dimension=sharpness"), tmp_path
        )
    with pytest.raises(ValueError, match=r"adversarial.min_step \(4\) must not exceed the largest"):
        AdversarialTrainer(model, images, reward, params("adversarial.min_step=4"), tmp_path)
    with pytest.raises(
        ValueError, match=r"adversarial.start_step \(3\) must be below the schedule's 3"
    ):
        AdversarialTrainer(model, images, reward, params("adversarial.schedule_steps=3"), tmp_path)


def test_adversarial_trains_on_the_few_step_samplers_schedule(inputs, tmp_path):
    from unifl.feedback.adversarial import AdversarialTrainer

    model = load_base_model(inputs / "base")
    images = [{"image": torch.zeros(3, 32, 32), "caption": "a red circle"}]
    reward = build_toy_reward_model()
    trainer = AdversarialTrainer(
        model, images, reward, params("adversarial.start_step=null"), tmp_path / "four"
    )
    # adversarial.inference_steps (4) trailing steps, noisiest at T_a; not trainer's 5.
    assert trainer.schedule.timesteps.tolist() == [249, 499, 749, 999]
    assert (trainer.start_step, trainer.max_step) == (3, 3)
    paper = params("adversarial.start_step=null", "adversarial.schedule_steps=5")
    model = load_base_model(inputs / "base")  # the first trainer owns the first copy
    trainer = AdversarialTrainer(model, images, reward, paper, tmp_path / "five")
    assert trainer.schedule.timesteps.tolist() == [199, 399, 599, 799, 999]
    assert (trainer.start_step, trainer.max_step) == (4, 4)


def test_adversarial_gradient_steps_stay_in_min_step_to_max_step(inputs, tmp_path):
    from unifl.feedback.adversarial import AdversarialTrainer
    from unifl.feedback.pefl import collate_images

    masks = {"semantic_mask": torch.zeros(32, 32), "instance_mask": torch.zeros(32, 32)}
    items = [{"image": torch.rand(3, 32, 32), "caption": "a red circle", **masks}] * 2

    def drawn(*settings: str) -> set[int]:
        trainer = AdversarialTrainer(
            load_base_model(inputs / "base"),
            items,
            build_toy_reward_model(),
            params("adversarial.start_step=null", *settings),
            tmp_path / "-".join(settings),
            progress=False,
        )
        trainer._prepare()
        batch = collate_images(items)
        return {
            trainer.compute_loss(batch, torch.Generator().manual_seed(seed)).logs["timestep"]
            for seed in range(12)
        }

    assert drawn("adversarial.min_step=2") == {749, 999}  # the two noisiest of 4 trailing steps
    assert drawn("adversarial.min_step=1", "adversarial.max_step=1") == {499}


def test_adversarial_from_noise_ignores_the_real_images_until_the_discriminator(inputs, tmp_path):
    from unifl.feedback.adversarial import AdversarialTrainer
    from unifl.feedback.pefl import collate_images

    reward = build_toy_reward_model()
    caption = "a red circle"
    masks = {"semantic_mask": torch.zeros(32, 32), "instance_mask": torch.zeros(32, 32)}
    dark = [{"image": torch.zeros(3, 32, 32), "caption": caption, **masks}] * 2
    bright = [{"image": torch.ones(3, 32, 32), "caption": caption, **masks}] * 2

    def losses(start_latents: str) -> list[dict]:
        trainer = AdversarialTrainer(
            load_base_model(inputs / "base"),
            dark,
            reward,
            params("adversarial.start_step=null", f"adversarial.start_latents={start_latents}"),
            tmp_path / start_latents,
            progress=False,
        )
        trainer._prepare()
        return [
            trainer.compute_loss(collate_images(items), trainer.generator_for(0)).logs
            for items in (dark, bright)
        ]

    # From pure noise the generator's x0' (hence L_G) is the same whatever the real images.
    from_noise = losses("noise")
    assert from_noise[0]["g_loss"] == pytest.approx(from_noise[1]["g_loss"], abs=1e-6)
    assert from_noise[0]["d_real"] != pytest.approx(from_noise[1]["d_real"], abs=1e-3)
    # Noised real latents at t=999 still carry the images (sqrt(alpha_bar) = 0.07).
    from_real = losses("real")
    assert from_real[0]["g_loss"] != pytest.approx(from_real[1]["g_loss"], abs=1e-6)
    with pytest.raises(ValueError, match=r"'noise' starts at the schedule's noisiest step \(3\)"):
        AdversarialTrainer(
            load_base_model(inputs / "base"),
            dark,
            reward,
            params("adversarial.start_step=2", "adversarial.start_latents=noise"),
            tmp_path / "bad",
        )


def test_r1_penalty_adds_half_gamma_times_the_real_images_gradient_norm(inputs, tmp_path):
    from unifl.feedback.adversarial import AdversarialTrainer
    from unifl.feedback.pefl import collate_images

    masks = {"semantic_mask": torch.zeros(32, 32), "instance_mask": torch.zeros(32, 32)}
    items = [
        {"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), **masks}
        | {"caption": caption}
        for i, caption in enumerate(["a red circle", "a blue square"])
    ]

    def trainer_for(gamma: float) -> AdversarialTrainer:
        trainer = AdversarialTrainer(
            load_base_model(inputs / "base"),
            items,
            build_toy_reward_model(),
            params(f"adversarial.r1_weight={gamma}"),
            tmp_path / str(gamma),
            progress=False,
        )
        trainer._prepare()
        return trainer

    batch = collate_images(items)
    plain = trainer_for(0.0).compute_loss(batch, torch.Generator().manual_seed(0))
    penalised_trainer = trainer_for(4.0)
    penalised = penalised_trainer.compute_loss(batch, torch.Generator().manual_seed(0))
    assert "r1" not in plain.logs
    # r1 is the mean over the real images of the squared gradient norm of their logits.
    real = batch.images.clone().requires_grad_(True)
    logits = penalised_trainer.discriminator(real, prompts=batch.captions, dimensions=["detail"])[
        "detail"
    ]
    (grad,) = torch.autograd.grad(logits.sum(), real)
    expected = float(grad.pow(2).flatten(1).sum(1).mean())
    assert expected > 0
    assert penalised.logs["r1"] == pytest.approx(expected, rel=1e-4)
    assert penalised.logs["d_loss"] - plain.logs["d_loss"] == pytest.approx(
        2.0 * penalised.logs["r1"], rel=1e-4
    )
    # The penalty reaches the discriminator's parameters through the double backward.
    penalised.loss.backward()
    head = penalised_trainer.discriminator.heads["detail"]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in head.parameters())
