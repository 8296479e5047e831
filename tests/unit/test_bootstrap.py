"""The toy bootstrap: loadable outputs, a manifest with its measurements, caching by config."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from unifl.cli import app
from unifl.config import ConfigError, ProjectConfig, load_params
from unifl.models.base import load_base_model
from unifl.models.reward import load_pretrained_reward_backbone
from unifl.models.segmenter import ToySegmenter
from unifl.toy.bootstrap import (
    VAE_DECODER_MODULES,
    bootstrap_config,
    bootstrap_toy_world,
    config_hash,
    load_cached,
)
from unifl.toy.dataset import read_manifest

DECODER_PREFIXES = tuple(f"{module}." for module in VAE_DECODER_MODULES)


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

    # The pretrained toy CLIP loads through the production reward-backbone loader.
    reward = load_pretrained_reward_backbone(str(result.clip_dir), head_hidden_dim=8)
    assert reward.image_size == 32
    assert reward(images, prompts=["a red circle", "a blue square"])["layout"].shape == (2,)
    assert manifest["metrics"]["clip_steps"] == 30
    assert 0.0 <= manifest["metrics"]["clip_eval_retrieval_chance"] <= 1.0
    assert manifest["timings"]["clip_s"] > 0
    assert 0.0 < manifest["metrics"]["vae_decoder_recon_mse"] < 10.0
    assert manifest["timings"]["vae_decoder_s"] > 0

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
    # A setting that is off (None) is left out, so adding one keeps the caches; on, it counts.
    assert "input_perturbation" not in bootstrap_config(params)["bootstrap"]
    perturbed = load_params(None, preset="ci", overrides=["bootstrap.input_perturbation=0.1"])
    assert bootstrap_config(perturbed)["bootstrap"]["input_perturbation"] == 0.1
    assert config_hash(perturbed) != config_hash(params)
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


def test_segmenter_trains_alike_in_a_side_process(tmp_path):
    """The bootstrap trains the segmenter in a spawned process on a spare core: same weights."""
    from safetensors.torch import load_file

    from unifl.toy.bootstrap import _side_process, _train_and_save_segmenter
    from unifl.toy.dataset import generate_toy_batch

    batch = generate_toy_batch(8, seed=3, resolution=32)
    job = dict(
        images=batch.image_tensor(),
        semantic_masks=batch.semantic_tensor(),
        steps=3,
        batch_size=4,
        seed=5,
        project=ProjectConfig(num_threads=1),
        progress=False,
    )
    results = {}
    for parallel in (True, False):
        with _side_process(parallel) as side:
            done = side.submit(_train_and_save_segmenter, out_dir=tmp_path / str(parallel), **job)
            results[parallel] = done.result()
    assert results[True]["steps"] == results[False]["steps"] == 3
    assert results[True]["final_loss"] == results[False]["final_loss"]
    weights = {p: load_file(next((tmp_path / str(p)).glob("*.safetensors"))) for p in results}
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name


def test_a_failure_beside_a_side_job_ends_the_job_instead_of_waiting_for_it(tmp_path):
    """A failed UNet training must not wait for the decoder training in the side process."""
    import runpy

    import psutil

    from unifl.toy.bootstrap import _side_process

    started, finished = tmp_path / "started", tmp_path / "finished"
    job = tmp_path / "job.py"
    job.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(30)\n"
        f"pathlib.Path({str(finished)!r}).write_text('done')\n"
    )
    with pytest.raises(RuntimeError, match="the UNet failed"), _side_process(True) as side:
        side.submit(runpy.run_path, path_name=str(job))
        while not started.exists():
            time.sleep(0.05)
        raise RuntimeError("the UNet failed")
    assert not psutil.pid_exists(int(started.read_text()))
    assert not finished.exists()


def test_unet_trained_by_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Data-parallel bootstrap training: each process takes half of every batch, gradients
    averaged; the weight average comes back from the processes as one process keeps it."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import denoiser_ema, train_denoiser, train_denoiser_in_processes
    from unifl.toy.dataset import generate_toy_batch

    batch = generate_toy_batch(12, seed=4, resolution=32)
    images = batch.image_tensor()
    training = dict(
        steps=4, batch_size=4, learning_rate=1e-3, caption_dropout=0.25, seed=9, min_snr_gamma=5.0
    )
    model = build_toy_model("toy-sd15", seed=2)

    two, averages = train_denoiser_in_processes(
        model,
        tmp_path / "base",
        images,
        batch.captions,
        2,
        ProjectConfig(num_threads=1),
        progress=False,
        ema_decay=0.5,
        **training,
    )
    ema = denoiser_ema(model, 0.5)
    one = train_denoiser(model, images, batch.captions, progress=False, ema=ema, **training)
    assert two["unet_loss"] == pytest.approx(one["unet_loss"], rel=1e-5)
    assert averages is not None and averages.keys() == ema.shadow.keys()
    for name, average in averages.items():
        torch.testing.assert_close(average, ema.shadow[name], atol=0.05 * 1e-3, rtol=0)

    def flat(*modules):
        return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])

    trained = load_base_model(tmp_path / "base")
    initial = build_toy_model("toy-sd15", seed=2)
    expected = flat(model.unet, model.text_encoder)
    update = expected - flat(initial.unet, initial.text_encoder)
    difference = (flat(trained.unet, trained.text_encoder) - expected).abs()
    assert update.abs().max() > 1e-3  # four AdamW steps at lr 1e-3 moved the weights
    # AdamW turns the float-order noise of a near-zero gradient into a visible step,
    # so a few elements differ a little; a wrong split or a missing reduction moves all.
    assert difference.max() < 0.05 * update.abs().max()
    assert (difference > 1e-6).float().mean() < 1e-3


def _average_in_process(rank, gradients, rendezvous, sizes, steps):
    """One process of the test below: random gradients and loss per rank and step, averaged
    by gloo's all-reduce (the reference) and then through `gradients`, step after step with
    no other synchronisation, so a process that runs ahead would overwrite sums in use."""
    import torch.distributed as dist

    processes = gradients.processes
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=processes
    )
    try:
        drawn = []
        for step in range(steps):
            generator = torch.Generator().manual_seed(100 * step + rank)
            drawn.append(
                (torch.randn(sum(sizes), generator=generator), torch.rand(1, generator=generator))
            )
        references = []
        for grads, loss in drawn:
            flat = torch.cat([grads, loss])
            dist.all_reduce(flat)
            references.append(flat / processes)
    finally:
        dist.destroy_process_group()
    parameters = [torch.nn.Parameter(torch.zeros(size)) for size in sizes]
    for step, ((grads, loss), reference) in enumerate(zip(drawn, references, strict=True)):
        for parameter, grad in zip(parameters, grads.split(sizes), strict=True):
            parameter.grad = grad.clone()
        mean_loss = gradients.average(rank, parameters, loss[0])
        averaged = torch.cat([p.grad for p in parameters])
        assert mean_loss == float(reference[-1]), (rank, step)
        if processes == 2:  # a + b == b + a: the same bits as the all-reduce
            assert torch.equal(averaged, reference[:-1]), (rank, step)
        else:  # the sums' order may differ
            torch.testing.assert_close(averaged, reference[:-1], rtol=1e-6, atol=1e-6)
        assert averaged.std() < 0.9  # a mean over processes, not one process's N(0, 1)


@pytest.mark.parametrize("processes", [2, 3])
def test_shared_gradients_average_as_an_all_reduce(tmp_path, processes):
    """Over several steps (the two buffers alternate), every process ends with the mean of
    all processes' gradients and losses; with two processes bit for bit gloo's."""
    import torch.multiprocessing as mp

    from unifl.toy.bootstrap import SharedGradients

    sizes = [5, 1000, 37]
    gradients = SharedGradients(sum(sizes) + 1, processes)
    mp.spawn(
        _average_in_process,
        args=(gradients, tmp_path / "rendezvous", sizes, 50),
        nprocs=processes,
        join=True,
    )


def test_unet_weight_average_by_hand():
    """One step: the average is min(decay, 1/10) of the initial weights and the rest the new."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import denoiser_ema, denoiser_parameters, train_denoiser
    from unifl.toy.dataset import generate_toy_batch

    batch = generate_toy_batch(8, seed=4, resolution=32)
    model = build_toy_model("toy-sd15", seed=2)
    initial = {name: p.detach().clone() for name, p in denoiser_parameters(model).items()}
    assert any(name.startswith("text_encoder_0.") for name in initial)
    ema = denoiser_ema(model, 0.5)
    train_denoiser(model, batch.image_tensor(), batch.captions, 1, 4, 1e-3, 0.0, 9, ema=ema,
                   progress=False)  # fmt: skip
    trained = denoiser_parameters(model)
    moved = max((trained[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-4
    for name, start in initial.items():
        expected = 0.1 * start + 0.9 * trained[name].detach()
        torch.testing.assert_close(ema.shadow[name], expected, rtol=0, atol=1e-6)
    assert denoiser_ema(model, None) is None


def test_vae_decoder_steps_train_the_decoder_alone():
    """The decoder-only steps sharpen the reconstructions and leave the encoder, and so every
    latent the UNet trains on, bit for bit as it was."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import train_vae
    from unifl.toy.dataset import generate_toy_batch

    images = generate_toy_batch(64, seed=5, resolution=32).image_tensor()
    vae = build_toy_model("toy-sd15", seed=3).vae
    train_vae(vae, images, 20, 16, 5e-3, 1e-6, seed=0, progress=False)
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}

    def reconstruct() -> tuple[float, torch.Tensor]:
        """The reconstruction error of the posterior means, and those means."""
        with torch.no_grad():
            pixels = images * 2 - 1
            latents = vae.encode(pixels).latent_dist.mean
            return float((vae.decode(latents).sample - pixels).pow(2).mean()), latents

    error_before, latents_before = reconstruct()
    metrics = train_vae(vae, images, 40, 16, 1e-3, 0.0, seed=1, progress=False,
                        decoder_only=True)  # fmt: skip
    error_after, latents_after = reconstruct()

    after = vae.state_dict()
    decoder = [n for n in after if n.startswith(DECODER_PREFIXES)]
    assert decoder and all(not torch.equal(after[n], before[n]) for n in decoder
                           if n.endswith("weight")), "every decoder weight trains"  # fmt: skip
    for name in after:
        if name not in decoder:
            assert torch.equal(after[name], before[name]), name
    assert torch.equal(latents_after, latents_before)
    assert error_after < 0.9 * error_before
    assert set(metrics) == {"vae_decoder_recon_mse"}
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_vae_decoder_trains_alike_in_the_side_process():
    """The decoder's phase runs in the side process beside the UNet: the weights it sends back
    are those it trains in this process, bit for bit, and only the decoder's."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import _side_process, _train_vae_decoder
    from unifl.toy.dataset import generate_toy_batch

    images = generate_toy_batch(32, seed=5, resolution=32).image_tensor()
    job = dict(images=images, steps=4, batch_size=8, learning_rate=1e-3, seed=1,
               project=ProjectConfig(num_threads=1), progress=False)  # fmt: skip
    results = {}
    for parallel in (True, False):
        vae = build_toy_model("toy-sd15", seed=3).vae
        with _side_process(parallel) as side:
            results[parallel] = side.submit(_train_vae_decoder, vae=vae, **job).result()
    state, serial = results[True]["state"], results[False]["state"]
    assert set(state) == set(serial) == set(VAE_DECODER_MODULES)
    for module, weights in state.items():
        assert weights.keys() == serial[module].keys()
        for name, tensor in weights.items():
            assert torch.equal(tensor, serial[module][name]), f"{module}.{name}"
    assert results[True]["metrics"] == results[False]["metrics"]
    assert results[True]["seconds"] > 0


def test_bootstrap_decoder_phase_changes_the_decoder_alone(ci_bootstrap, tmp_path):
    """The bootstrap trains the decoder beside the UNet: its base model carries the trained
    decoder, and every other weight is the one of a bootstrap without the decoder's phase."""
    from safetensors.torch import load_file

    params = load_params(None, preset="ci", overrides=["bootstrap.vae_decoder_steps=0"])
    without = bootstrap_toy_world(params, out_dir=tmp_path / "no-decoder", progress=False)

    def weights(result, part: str) -> dict[str, torch.Tensor]:
        return load_file(next((result.base_model_dir / part).glob("*.safetensors")))

    for part in ("unet", "text_encoder"):
        trained, plain = weights(ci_bootstrap, part), weights(without, part)
        assert all(torch.equal(trained[name], plain[name]) for name in plain), part
    trained, plain = weights(ci_bootstrap, "vae"), weights(without, "vae")
    decoder = [name for name in plain if name.startswith(DECODER_PREFIXES)]
    assert decoder and any(not torch.equal(trained[name], plain[name]) for name in decoder)
    for name in set(plain) - set(decoder):
        assert torch.equal(trained[name], plain[name]), name
    assert "vae_decoder_s" not in without.manifest["timings"]


def test_text_encoder_learning_rate_reaches_the_text_encoder_only():
    """A first AdamW step moves each weight by lr * (m / sqrt(v) + weight decay): a tenth of
    the rate moves the text encoder a tenth as far and leaves the UNet's step as it was."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import denoiser_parameters, train_denoiser
    from unifl.toy.dataset import generate_toy_batch

    batch = generate_toy_batch(8, seed=4, resolution=32)
    start = denoiser_parameters(build_toy_model("toy-sd15", seed=2))
    initial = {name: parameter.detach().clone() for name, parameter in start.items()}
    updates = {}
    for text_rate in (None, 1e-4):
        model = build_toy_model("toy-sd15", seed=2)
        train_denoiser(model, batch.image_tensor(), batch.captions, 1, 4, 1e-3, 0.0, 9,
                       text_encoder_learning_rate=text_rate, progress=False)  # fmt: skip
        trained = denoiser_parameters(model)
        updates[text_rate] = {n: trained[n].detach() - initial[n] for n in initial}
    for name, update in updates[None].items():
        slower = updates[1e-4][name]
        if name.startswith("unet."):
            assert torch.equal(slower, update), name
        else:
            assert name.startswith("text_encoder_0."), name
            torch.testing.assert_close(slower, 0.1 * update, rtol=1e-3, atol=1e-9)
    moved = max(u.abs().max().item() for n, u in updates[None].items() if n.startswith("text_"))
    assert moved > 5e-4


def test_bootstrap_saves_the_weight_average_beside_its_last_weights_baseline(
    ci_bootstrap, tmp_path
):
    """bootstrap.unet_ema_decay trains as the plain bootstrap does and saves the average; the
    manifest's last-weights caption-match is the plain bootstrap's own figure."""
    plain = load_params(None, preset="ci", overrides=[f"bootstrap.cache_dir={tmp_path}"])
    params = load_params(
        None,
        preset="ci",
        overrides=[f"bootstrap.cache_dir={tmp_path}", "bootstrap.unet_ema_decay=0.9"],
    )
    assert config_hash(params) != config_hash(plain)
    averaged = bootstrap_toy_world(params, progress=False)
    metrics, baseline = averaged.manifest["metrics"], ci_bootstrap.manifest["metrics"]
    assert metrics["unet_loss"] == baseline["unet_loss"]  # the average does not touch training
    last = metrics["caption_match_base_20_steps_last_weights"]
    assert last == baseline["caption_match_base_20_steps"]
    assert "caption_match_base_20_steps_last_weights" not in baseline

    def unet_weights(result):
        return load_base_model(result.base_model_dir).unet.conv_out.weight.detach()

    difference = (unet_weights(averaged) - unet_weights(ci_bootstrap)).abs().max()
    assert difference > 1e-6


def test_timestep_sampling():
    """Uniform covers the schedule evenly; logit-normal piles up in its middle, by its mean."""
    from unifl.toy.bootstrap import sample_timesteps

    def draw(sampling, mean=0.0, std=1.0):
        generator = torch.Generator().manual_seed(0)
        return sample_timesteps(20000, 1000, generator, sampling, mean, std).float()

    uniform = draw("uniform")
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert uniform.median() == pytest.approx(500, abs=15)
    assert ((uniform < 100) | (uniform >= 900)).float().mean() == pytest.approx(0.2, abs=0.01)

    centred = draw("logit_normal")
    assert centred.min() >= 0 and centred.max() <= 999
    assert centred.median() == pytest.approx(500, abs=15)
    # P(|n| > logit(0.9) = 2.197) for a standard normal: 0.028.
    assert ((centred < 100) | (centred >= 900)).float().mean() == pytest.approx(0.028, abs=0.005)
    # The mean shifts the pile: sigmoid(-1) = 0.269.
    assert draw("logit_normal", mean=-1.0).median() == pytest.approx(269, abs=15)
    with pytest.raises(ValueError, match="timestep sampling"):
        draw("cosine")


def test_min_snr_weights_by_hand():
    """min(SNR, gamma) / SNR: 1 where the timestep is noisier than gamma, gamma / SNR above."""
    from unifl.toy.bootstrap import min_snr_weights

    alphas = torch.tensor([10 / 11, 2 / 3, 0.5, 0.99])  # SNR 10, 2, 1, 99
    weights = min_snr_weights(alphas, gamma=5.0)
    assert weights.tolist() == pytest.approx([0.5, 1.0, 1.0, 5 / 99], rel=1e-6)


def test_min_snr_weighting_changes_the_unet_update():
    """The weighting reaches the loss: the same run without it trains other weights."""
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import train_denoiser
    from unifl.toy.dataset import generate_toy_batch

    batch = generate_toy_batch(8, seed=4, resolution=32)
    runs = {}
    for gamma in (None, 1e9, 1.0):
        model = build_toy_model("toy-sd15", seed=2)
        metrics = train_denoiser(
            model,
            batch.image_tensor(),
            batch.captions,
            3,
            4,
            1e-3,
            0.0,
            9,
            min_snr_gamma=gamma,
            progress=False,
        )
        runs[gamma] = (metrics["unet_loss"], model.unet.conv_out.weight.detach().clone())
    # A gamma above every SNR weighs each sample 1: plain MSE, bit for bit.
    assert runs[1e9][0] == runs[None][0]
    assert torch.equal(runs[1e9][1], runs[None][1])
    # Gamma 1 weighs all timesteps above SNR 1 down, so the loss is smaller.
    assert runs[1.0][0] < runs[None][0]
    assert not torch.allclose(runs[1.0][1], runs[None][1])


def test_bootstrap_starts_from_its_family_resolution_and_latent_channels():
    from unifl.toy.bootstrap import untrained_model

    params = load_params(
        None, preset="ci", overrides=["bootstrap.family=sdxl", "bootstrap.latent_channels=8"]
    )
    model = untrained_model(params, seed=3)
    assert (model.family, model.image_size, model.latent_channels) == ("sdxl", 32, 8)
    assert model.vae.config.latent_channels == 8


def test_input_perturbation_noises_the_input_and_keeps_the_target(monkeypatch):
    """The UNet's input carries gamma * extra noise on top of the target noise; the target,
    and so the loss of a fixed prediction, stays the noise's."""
    import unifl.models.base as base
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import train_denoiser
    from unifl.toy.dataset import generate_toy_batch

    real_predict = base.predict_noise
    seen = []

    def zero_prediction(model, latents, timesteps, embeds):
        seen.append((latents.detach().clone(), timesteps.clone()))
        # Zero, but still a function of the UNet so that backward has something to reach.
        return real_predict(model, latents, timesteps, embeds) * 0

    monkeypatch.setattr(base, "predict_noise", zero_prediction)
    batch = generate_toy_batch(16, seed=4, resolution=32)
    losses = {}
    for gamma in (None, 0.5):
        model = build_toy_model("toy-sd15", seed=2)
        metrics = train_denoiser(
            model, batch.image_tensor(), batch.captions, 1, 16, 1e-3, 0.0, 9,
            input_perturbation=gamma, progress=False,
        )  # fmt: skip
        losses[gamma] = metrics["unet_loss"]
    (plain, timesteps), (perturbed, same_timesteps) = seen
    assert torch.equal(timesteps, same_timesteps)
    # A zero prediction's loss is the mean square of the target: the noise's in both runs.
    assert losses[0.5] == pytest.approx(losses[None], rel=1e-6)
    alphas = model.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
    extra = (perturbed - plain) / (1 - alphas).sqrt()
    assert float(extra.std()) == pytest.approx(0.5, rel=0.1)
    assert abs(float(extra.mean())) < 0.05


def test_training_processes_follow_cores_threads_and_batch():
    """Process count: cores / threads, at least 16 samples a process, a divisor of the batch."""
    from unittest import mock

    from unifl.toy.bootstrap import process_slots, training_processes

    def processes(cores, count=training_processes, **overrides):
        sets = [f"{key}={value}" for key, value in overrides.items()]
        with mock.patch("unifl.toy.bootstrap.available_cores", return_value=cores):
            return count(load_params(None, overrides=sets))

    # The segmenter takes a side process wherever a second slot exists.
    assert processes(2, process_slots) == 2
    assert processes(1, process_slots) == 1
    assert processes(2, process_slots, **{"project.num_threads": "null"}) == 1

    assert processes(2) == 2  # the defaults: UNet batch 32, one thread each
    assert processes(2, **{"bootstrap.unet_batch_size": 16}) == 1
    assert processes(1, **{"bootstrap.unet_batch_size": 32}) == 1
    assert processes(16, **{"bootstrap.unet_batch_size": 32}) == 2  # at least 16 samples each
    assert processes(16, **{"bootstrap.unet_batch_size": 48}) == 3
    assert processes(16, **{"bootstrap.unet_batch_size": 56}) == 2  # a divisor of the batch
    assert processes(8, **{"bootstrap.unet_batch_size": 64, "project.num_threads": 4}) == 2
    assert processes(8, **{"bootstrap.unet_batch_size": 64, "project.num_threads": "null"}) == 1
    # The VAE's and segmenter's batch does not decide how the UNet trains.
    assert processes(2, **{"bootstrap.batch_size": 128}) == 2


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoders_start_from_the_pretrained_toy_clip(ci_bootstrap, family, tmp_path):
    """The base model's text encoders become the toy CLIP's text tower (SDXL's second one with
    its projection), encode prompts as the CLIP does, and survive a save and reload."""
    from transformers import CLIPModel

    from unifl.models.base import encode_prompt, save_base_model
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import text_encoders_from_clip

    clip = CLIPModel.from_pretrained(ci_bootstrap.clip_dir).eval()
    model = build_toy_model(f"toy-{family}", resolution=32, seed=0)
    prompts = ["a red circle above a blue square on a dark background", ""]
    with torch.no_grad():
        before = encode_prompt(model, prompts).prompt_embeds
        text_encoders_from_clip(model, ci_bootstrap.clip_dir)
        embeds = encode_prompt(model, prompts)
        ids = model.tokenizer(
            prompts,
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        tower = clip.text_model(input_ids=ids, output_hidden_states=True)
    assert not torch.allclose(before, embeds.prompt_embeds)
    if family == "sd15":
        torch.testing.assert_close(embeds.prompt_embeds, tower.last_hidden_state)
    else:
        # SDXL conditions on the penultimate layer of both encoders and pools the second.
        penultimate = tower.hidden_states[-2]
        torch.testing.assert_close(
            embeds.prompt_embeds, torch.cat([penultimate, penultimate], dim=-1)
        )
        torch.testing.assert_close(
            embeds.pooled_prompt_embeds, clip.text_projection(tower.pooler_output)
        )
    save_base_model(model, tmp_path / "base")
    with torch.no_grad():
        reloaded = encode_prompt(load_base_model(tmp_path / "base"), prompts)
    torch.testing.assert_close(reloaded.prompt_embeds, embeds.prompt_embeds)


def test_text_encoder_from_clip_needs_a_trained_clip():
    with pytest.raises(ConfigError, match=r"bootstrap\.text_encoder 'clip'.*clip_steps 0"):
        load_params(
            None, preset="ci", overrides=["bootstrap.text_encoder=clip", "bootstrap.clip_steps=0"]
        )
    with pytest.raises(ConfigError, match=r"bootstrap\.text_encoder 'clip'.*clip_steps 0"):
        load_params(None, preset="ci", overrides=["bootstrap.clip_steps=0"])  # clip: the default
    # The rule holds once all overrides are in, whatever their order.
    for overrides in (
        ["bootstrap.clip_steps=0", "bootstrap.text_encoder=scratch"],
        ["bootstrap.text_encoder=scratch", "bootstrap.clip_steps=0"],
    ):
        params = load_params(None, preset="ci", overrides=overrides)
        assert (params.bootstrap.clip_steps, params.bootstrap.text_encoder) == (0, "scratch")


def test_bootstrap_trains_its_text_encoder_from_the_toy_clip(ci_bootstrap, tmp_path):
    """bootstrap.text_encoder: clip (the default): the saved base model's text encoder has the
    CLIP's text config and was trained on from the CLIP's weights (it is neither the CLIP's
    nor the one 'scratch' trains from a random start)."""
    from transformers import CLIPModel

    assert ci_bootstrap.manifest["config"]["bootstrap"]["text_encoder"] == "clip"
    encoder = load_base_model(ci_bootstrap.base_model_dir).text_encoder
    clip = CLIPModel.from_pretrained(ci_bootstrap.clip_dir)
    assert encoder.config.num_attention_heads == clip.config.text_config.num_attention_heads
    trained = encoder.state_dict()
    start = {key.removeprefix("text_model."): value for key, value in trained.items()}
    clip_tower = clip.text_model.state_dict()
    assert start.keys() == clip_tower.keys()
    moved = max((start[key] - clip_tower[key]).abs().max() for key in clip_tower)
    assert 0 < moved < 0.5  # fine-tuned with the UNet, from the CLIP's weights
    params = load_params(
        None,
        preset="ci",
        overrides=[f"bootstrap.cache_dir={tmp_path}", "bootstrap.text_encoder=scratch"],
    )
    scratch = bootstrap_toy_world(params, progress=False)
    plain = load_base_model(scratch.base_model_dir).text_encoder.state_dict()
    assert any(not torch.equal(plain[key], value) for key, value in trained.items() if key in plain)


def test_bootstrap_samples_follow_the_sampling_spacing():
    from unifl.models.sampler import generate
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import sample_captions

    model = build_toy_model("toy-sd15")
    captions = ["a red circle on a dark background"]
    for spacing in ("leading", "trailing"):
        params = load_params(
            None, overrides=["sampling.steps=3", f"sampling.timestep_spacing={spacing}"]
        )
        samples = sample_captions(model, captions, params, progress=False)
        expected = generate(model, captions, steps=3, seed=0, timestep_spacing=spacing)
        torch.testing.assert_close(samples, expected)
    leading = generate(model, captions, steps=3, seed=0, timestep_spacing="leading")
    assert not torch.allclose(samples, leading)
