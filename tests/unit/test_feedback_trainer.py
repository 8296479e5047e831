"""The feedback trainer: what trains, exact resume, NaN stops, export, data order, EMA, warm-up."""

import hashlib
from pathlib import Path

import pytest
import torch

from unifl.config import PerceptualModelConfig, load_params
from unifl.feedback.adversarial import AdversarialTrainer
from unifl.feedback.decoupled import DecoupledTrainer
from unifl.feedback.pefl import PeflTrainer
from unifl.feedback.perceptual import build_perceptual_loss
from unifl.feedback.trainer import (
    DataStream,
    ExponentialMovingAverage,
    LinearWarmup,
    NonFiniteLossError,
    ResumeError,
    checkpoint_steps,
)
from unifl.models.reward import build_toy_reward_model
from unifl.models.segmenter import ToySegmenter
from unifl.models.toy_presets import build_toy_model
from unifl.toy.dataset import generate_toy_batch

ALPHAS = {"color": 1.0, "layout": 1.0, "detail": 1.0, "lighting": 1.0}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_params(*overrides: str):
    """A short schedule and tiny batches: every step costs a few UNet calls on 8x8 latents."""
    return load_params(
        None,
        overrides=[
            "project.device=cpu",
            "trainer.num_inference_steps=4",
            "trainer.batch_size=2",
            "trainer.guidance_scale=2.0",
            "trainer.checkpoint_every=1",
            "pefl.start_step=2",
            "pefl.max_step=1",
            "decoupled.max_step=1",
            "adversarial.start_step=2",
            *overrides,
        ],
    )


def toy_items(count: int = 4, seed: int = 3) -> list[dict]:
    arrays = generate_toy_batch(count, seed)
    images, semantic, instance = (
        arrays.image_tensor(),
        arrays.semantic_tensor(),
        arrays.instance_tensor(),
    )
    return [
        {
            "image": images[i],
            "caption": arrays.captions[i],
            "semantic_mask": semantic[i],
            "instance_mask": instance[i],
        }
        for i in range(count)
    ]


def reward_model(seed: int = 0):
    model = build_toy_reward_model(seed=seed)
    model.set_alphas(ALPHAS)  # above the random rewards: every hinge is active
    return model


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def directory_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- pieces


def test_data_stream_shards_processes_and_covers_each_epoch():
    streams = [DataStream(10, 2, seed=7, process_index=p, num_processes=2) for p in range(2)]
    first_epoch = [i for m in range(2) for s in streams for i in s.indices(m)]
    # Two processes x two micro-batches x two items: 8 distinct items of the first permutation.
    assert len(set(first_epoch)) == 8
    assert not set(streams[0].indices(0)) & set(streams[1].indices(0))
    # Positions 10..11 of micro-batch 2 start the second epoch; all 10 items came once before.
    seen = first_epoch + streams[0].indices(2)
    assert sorted(seen[:10]) == list(range(10))
    # A pure function of the micro-batch: a fresh stream (a resumed run) gives the same items.
    again = DataStream(10, 2, seed=7, process_index=1, num_processes=2)
    assert [again.indices(m) for m in (5, 0, 3)] == [streams[1].indices(m) for m in (5, 0, 3)]
    assert DataStream(10, 2, seed=8).indices(0) != DataStream(10, 2, seed=7).indices(0) or (
        DataStream(10, 2, seed=8).indices(1) != DataStream(10, 2, seed=7).indices(1)
    )


def test_linear_warmup_and_ema_by_hand():
    warmup = LinearWarmup(3)
    assert [warmup(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert LinearWarmup(0)(0) == 1.0
    weight = torch.nn.Parameter(torch.tensor([0.0]))
    ema = ExponentialMovingAverage({"w": weight}, decay=0.9)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update({"w": weight})  # decay min(0.9, 1/10) = 0.1 -> 0.9 * 1
    assert float(ema.shadow["w"]) == pytest.approx(0.9)
    with torch.no_grad():
        weight.fill_(2.0)
    ema.update({"w": weight})  # decay min(0.9, 2/11) -> 0.9 * 2/11 + 2 * 9/11
    assert float(ema.shadow["w"]) == pytest.approx(0.9 * 2 / 11 + 2 * 9 / 11)
    restored = ExponentialMovingAverage({"w": weight}, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and restored.decay == 0.9
    target = torch.nn.Parameter(torch.tensor([5.0]))
    restored.copy_to({"w": target})
    assert float(target.detach()) == pytest.approx(float(ema.shadow["w"]))


# --------------------------------------------------------------------------- what trains


def test_pefl_gradients_reach_only_the_lora_adapters(tmp_path):
    model = build_toy_model("toy-sd15")
    reward = reward_model()
    perceptual = build_perceptual_loss(PerceptualModelConfig(), toy_segmenter=ToySegmenter())
    trainer = PeflTrainer(
        model,
        toy_items(),
        perceptual,
        tiny_params("pefl.steps=1", "pefl.learning_rate=0.01"),
        tmp_path,
        reward_model=reward,
        progress=False,
    )
    trainer._prepare()
    frozen = {
        "vae": model.vae,
        "text_encoder": model.text_encoder,
        "reward": reward,
        "perceptual": perceptual,
    }
    output = trainer.compute_loss(trainer.batch(0), trainer.generator_for(0))
    output.loss.backward()
    assert {"pefl", "aes", "reward_color", "t", "timestep"} <= set(output.logs)
    for name, module in frozen.items():
        assert not module.training, name
        assert all(not p.requires_grad and p.grad is None for p in module.parameters()), name
    lora = {n: p for n, p in model.unet.named_parameters() if "lora_" in n}
    base = {n: p for n, p in model.unet.named_parameters() if "lora_" not in n}
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert all(p.grad is None and not p.requires_grad for p in base.values())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    for module in trainer.groups[0].optimizer.optimizer.param_groups[0]["params"]:
        module.grad = None

    before = {name: snapshot(module) for name, module in frozen.items()}
    unet_before = snapshot(model.unet)
    trainer.train()
    for name, module in frozen.items():
        assert not changed(before[name], module), name
    moved = changed(unet_before, model.unet)
    assert moved and all("lora_" in n for n in moved)


def test_full_unet_and_discriminator_train_while_the_reward_model_stays_frozen(tmp_path):
    model = build_toy_model("toy-sdxl")
    reward = reward_model()
    trainer = AdversarialTrainer(
        model,
        toy_items(),
        reward,
        tiny_params("trainer.use_lora=false", "adversarial.steps=1"),
        tmp_path,
        progress=False,
    )
    trainer._prepare()
    output = trainer.compute_loss(trainer.batch(0), trainer.generator_for(0))
    output.loss.backward()
    assert {"g_loss", "d_loss", "d_accuracy", "aes"} <= set(output.logs)
    unet_grads = [p.grad for p in model.unet.parameters()]
    assert all(p.requires_grad for p in model.unet.parameters())
    assert (
        sum(g is not None and float(g.abs().sum()) > 0 for g in unet_grads) > len(unet_grads) // 2
    )
    discriminator = trainer.discriminator
    assert discriminator.dimensions == ("detail",)
    assert any(p.grad is not None for p in discriminator.heads["detail"].parameters())
    for module in (reward, model.vae, model.text_encoder, model.text_encoder_2):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    # The generator's view of the discriminator passes gradients to the images only.
    discriminator.zero_grad(set_to_none=True)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    trainer._scores_without_parameter_gradients(images, ["a red circle"] * 2).sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert all(p.grad is None for p in discriminator.parameters())


WIDE_LORA = '["to_q","to_k","to_v","to_out.0","conv1","conv2","conv_shortcut","time_emb_proj"]'


@pytest.mark.parametrize("targets", [None, WIDE_LORA], ids=["attention", "with-convolutions"])
def test_exported_model_and_adapter_reproduce_the_tuned_unet(tmp_path, targets):
    from diffusers import UNet2DConditionModel

    from unifl.models.base import load_base_model

    model = build_toy_model("toy-sd15")
    overrides = ["decoupled.steps=1", "decoupled.learning_rate=0.05", "trainer.lora_rank=4"]
    if targets:
        overrides.append(f"trainer.lora_target_modules={targets}")
    params = tiny_params(*overrides)
    trainer = DecoupledTrainer(
        model, reward_model(), ["a red circle"], params, tmp_path, progress=False
    )
    trainer.train()
    adapted_layers = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1]
        for name, _ in model.unet.named_parameters()
        if ".lora_A" in name
    }
    expected = {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    if targets:
        expected |= {"conv1", "conv2", "conv_shortcut", "time_emb_proj"}
    assert adapted_layers == expected
    # Move the (zero-initialised) B matrices away from zero so the check has teeth.
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    exported = trainer.export()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tuned = model.unet(latents, 501, encoder_hidden_states=context).sample
        loaded = load_base_model(exported.model_dir)
        merged = loaded.unet(latents, 501, encoder_hidden_states=context).sample
        untuned = build_toy_model("toy-sd15").unet(latents, 501, encoder_hidden_states=context)
    assert not any("lora" in key for key in loaded.unet.state_dict())
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-5)
    # The adapter file alone, loaded onto the untuned base, gives the tuned UNet again.
    base = build_toy_model("toy-sd15").unet
    base.load_lora_adapter(
        str(exported.lora_dir), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    with torch.no_grad():
        adapted = base(latents, 501, encoder_hidden_states=context).sample
    torch.testing.assert_close(adapted, tuned, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untuned.sample, tuned, atol=1e-4)  # the adapter does something
    assert isinstance(loaded.unet, UNet2DConditionModel)


# --------------------------------------------------------------------------- checkpoints


class Interrupt(Exception):
    pass


def adversarial_run(out_dir: Path, steps: int, stop_after: int | None = None):
    params = tiny_params(
        f"adversarial.steps={steps}",
        "trainer.checkpoint_every=2",
        "trainer.gradient_accumulation_steps=2",
        "trainer.warmup_steps=3",
        "trainer.ema_decay=0.9",
        "adversarial.learning_rate=0.01",
        "adversarial.discriminator_learning_rate=0.01",
    )

    def callback(step, row):
        if stop_after is not None and step == stop_after:
            raise Interrupt(f"killed after step {step}")

    trainer = AdversarialTrainer(
        build_toy_model("toy-sd15"),
        toy_items(6),
        reward_model(),
        params,
        out_dir,
        metrics_callback=callback,
        progress=False,
    )
    return trainer


def test_interrupted_run_resumed_from_its_checkpoint_ends_like_an_uninterrupted_one(tmp_path):
    straight = adversarial_run(tmp_path / "straight", 4)
    straight.train()

    interrupted = adversarial_run(tmp_path / "resumed", 4, stop_after=3)
    with pytest.raises(Interrupt):
        interrupted.train()
    assert [step for step, _ in checkpoint_steps(tmp_path / "resumed")] == [2]

    resumed = adversarial_run(tmp_path / "resumed", 4)
    summary = resumed.train()
    assert summary.resumed_from == 2
    assert [row["step"] for row in summary.history] == [1, 2, 3, 4]
    for key in ("loss", "d_loss", "lr_unet", "grad_norm_discriminator"):
        assert [r[key] for r in summary.history] == pytest.approx(
            [r[key] for r in straight.history], rel=1e-6, abs=1e-9
        ), key
    assert summary.history[0]["lr_unet"] == pytest.approx(0.01 * 0.5)  # warm-up continued
    for name in ("unet", "discriminator"):
        mine = resumed.group(name).named_trainable()
        reference = straight.group(name).named_trainable()
        assert set(mine) == set(reference)
        for key in mine:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-6, atol=1e-8)
    for key, value in resumed.ema.shadow.items():
        torch.testing.assert_close(value, straight.ema.shadow[key], rtol=1e-6, atol=1e-8)
    assert resumed.ema.num_updates == straight.ema.num_updates == 4
    # The run moved away from its start: resuming is not trivially equal.
    fresh = adversarial_run(tmp_path / "fresh", 4)
    fresh._prepare()
    start = fresh.group("unet").named_trainable()
    assert any(
        not torch.allclose(start[k], v) for k, v in resumed.group("unet").named_trainable().items()
    )


def test_nan_loss_stops_with_the_step_named_and_the_last_checkpoint_intact(tmp_path):
    reward = reward_model()

    def poison(step, row):
        if step == 2:  # after step 2's checkpoint is due: the reward model starts giving NaN
            with torch.no_grad():
                reward.heads["color"][-1].bias.fill_(float("nan"))

    params = tiny_params("decoupled.steps=4", "trainer.checkpoint_every=2")
    trainer = DecoupledTrainer(
        build_toy_model("toy-sd15"),
        reward,
        ["a red circle", "a blue square"],
        params,
        tmp_path,
        metrics_callback=poison,
        progress=False,
    )
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan") as info:
        trainer.train()
    assert str(checkpoint) in str(info.value) and "reward_color=nan" in str(info.value)
    assert [step for step, _ in checkpoint_steps(tmp_path)] == [2]
    digest = directory_digest(checkpoint)
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no half-written checkpoint

    # A healthy rerun resumes from the intact checkpoint and leaves it untouched until it saves.
    healthy = DecoupledTrainer(
        build_toy_model("toy-sd15"),
        reward_model(),
        ["a red circle", "a blue square"],
        tiny_params("decoupled.steps=2", "trainer.checkpoint_every=2"),
        tmp_path,
        progress=False,
    )
    assert healthy.train().resumed_from == 2
    assert directory_digest(checkpoint) == digest
    assert [row["step"] for row in healthy.history] == [1, 2]

    other = DecoupledTrainer(
        build_toy_model("toy-sd15"),
        reward_model(),
        ["a red circle"],
        tiny_params("decoupled.steps=4", "trainer.lora_rank=4"),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ResumeError, match="lora_rank: 8 -> 4"):
        other.train()
    wider = DecoupledTrainer(
        build_toy_model("toy-sd15"),
        reward_model(),
        ["a red circle"],
        tiny_params("decoupled.steps=4", f"trainer.lora_target_modules={WIDE_LORA}"),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ResumeError, match="lora_target_modules: "):
        wider.train()
    # What the checkpoint restores with the optimiser (or bakes into the merged model) must
    # not change without a word either.
    for override, message in (
        ("trainer.lora_alpha=64", r"lora_alpha: None -> 64"),
        (
            "decoupled.learning_rate=1e-6",
            r"learning_rates: \{'unet': 0.0001\} -> \{'unet': 1e-06\}",
        ),
        ("trainer.warmup_steps=7", r"warmup_steps: \d+ -> 7"),
        ("trainer.ema_decay=0.9", r"ema_decay: None -> 0.9"),
    ):
        changed = DecoupledTrainer(
            build_toy_model("toy-sd15"),
            reward_model(),
            ["a red circle"],
            tiny_params("decoupled.steps=4", override),
            tmp_path,
            progress=False,
        )
        with pytest.raises(ResumeError, match=message):
            changed.train()
    other_base = build_toy_model("toy-sd15")
    with torch.no_grad():
        other_base.unet.conv_in.bias.add_(0.5)
    moved = DecoupledTrainer(
        other_base,
        reward_model(),
        ["a red circle"],
        tiny_params("decoupled.steps=4"),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ResumeError, match=r"base_model: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        moved.train()


def test_the_base_models_digest_follows_its_weights_not_its_path_or_precision(tmp_path):
    from unifl.feedback.trainer import weights_digest
    from unifl.models.base import load_base_model, save_base_model

    model = build_toy_model("toy-sd15")
    save_base_model(model, tmp_path / "a")
    save_base_model(model, tmp_path / "b")
    first, second = load_base_model(tmp_path / "a"), load_base_model(tmp_path / "b")
    assert weights_digest(first.unet, first.vae) == weights_digest(second.unet, second.vae)
    assert weights_digest(first.unet) == weights_digest(second.unet.to(torch.bfloat16))
    with torch.no_grad():
        second.unet.conv_in.bias[0] += 0.5
    assert weights_digest(first.unet) != weights_digest(second.unet)
