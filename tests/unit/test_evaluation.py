"""Evaluation: Fréchet distance and CLIP score against closed forms, grids, prompt loading,
throughput, and one end-to-end evaluation (library and CLI) of a random toy model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel
from typer.testing import CliRunner

from unifl.config import EvaluateConfig
from unifl.evaluation import (
    EvaluationError,
    clip_score,
    evaluate_model,
    extract_features,
    frechet_distance,
    frechet_distance_from_statistics,
    load_eval_prompts,
    load_reference_images,
    measure_throughput,
    metric_name,
    save_comparison_grid,
)
from unifl.evaluation.clip_score import cosine_to_clip_score
from unifl.evaluation.evaluate import resolve_guidance_scale, resolve_timestep_spacing
from unifl.evaluation.frechet import FrechetError, gaussian_statistics
from unifl.evaluation.grids import GridError
from unifl.models.tokenizer import EOS_TOKEN_ID, toy_tokenizer

# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_of_diagonal_gaussians_matches_the_closed_form() -> None:
    # Commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2.
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    value = frechet_distance_from_statistics(mean_a, np.diag(var_a), mean_b, np.diag(var_b), eps=0)
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_of_non_commuting_covariances_matches_a_general_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov_a, cov_b = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mean_a, mean_b = rng.normal(size=4), rng.normal(size=4)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    value = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps=0)
    assert value == pytest.approx(expected, rel=1e-9)
    assert value == pytest.approx(
        frechet_distance_from_statistics(mean_b, cov_b, mean_a, cov_a, eps=0), rel=1e-9
    )


def test_frechet_of_feature_sets_uses_their_mean_and_unbiased_covariance() -> None:
    # 1-D by hand: a = [0, 2] (mean 1, var 2), b = [3, 5] (mean 4, var 2): FD = 9 + 2 + 2 - 2*2.
    a = torch.tensor([[0.0], [2.0]])
    b = torch.tensor([[3.0], [5.0]])
    assert frechet_distance(a, b, eps=0) == pytest.approx(9.0, rel=1e-12)

    rng = np.random.default_rng(1)
    features_a = rng.normal(size=(50, 6))
    features_b = rng.normal(loc=0.5, scale=2.0, size=(40, 6))
    mean, cov = gaussian_statistics(features_a)
    assert np.allclose(cov, np.cov(features_a, rowvar=False))
    direct = frechet_distance_from_statistics(
        features_a.mean(0),
        np.cov(features_a, rowvar=False),
        features_b.mean(0),
        np.cov(features_b, rowvar=False),
    )
    assert frechet_distance(features_a, features_b) == pytest.approx(direct, rel=1e-12)
    assert frechet_distance(features_a, features_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_samples_converges_to_the_population_value() -> None:
    rng = np.random.default_rng(2)
    cov_a = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    cov_b = np.diag([1.0, 2.0, 1.5])
    mean_a, mean_b = np.zeros(3), np.array([1.0, -1.0, 0.5])
    population = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps=0)
    samples_a = rng.multivariate_normal(mean_a, cov_a, size=20000)
    samples_b = rng.multivariate_normal(mean_b, cov_b, size=20000)
    assert frechet_distance(samples_a, samples_b) == pytest.approx(population, rel=0.05)


def test_frechet_with_fewer_samples_than_dimensions_stays_finite() -> None:
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(3, 16)), rng.normal(size=(4, 16)))
    assert math.isfinite(value) and value > 0
    with pytest.raises(FrechetError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(FrechetError, match="dimensions differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(FrechetError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_extract_features_batches_and_flattens() -> None:
    images = torch.rand(5, 3, 4, 4)
    features = extract_features(lambda x: x[:, :, :2, :2] * 2, images, batch_size=2)
    assert features.shape == (5, 12)
    assert torch.allclose(features, (images[:, :, :2, :2] * 2).reshape(5, -1))


# --------------------------------------------------------------------------- CLIP score


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "eos_token_id": EOS_TOKEN_ID,
        },
        vision_config={
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    return CLIPModel(config).eval()


def test_clip_score_is_100_times_the_clamped_cosine() -> None:
    assert cosine_to_clip_score(torch.tensor([-0.5, 0.0, 0.25])).tolist() == [0.0, 0.0, 25.0]

    model, tokenizer = tiny_clip(), toy_tokenizer()
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square on a dark background", "a green triangle"]
    scores = clip_score(model, tokenizer, images, prompts, batch_size=2)

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = F.interpolate(images, size=(16, 16), mode="bicubic", antialias=True)
        image_embeds = model.get_image_features(pixel_values=(pixels - mean) / std)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(**tokens)
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    assert torch.allclose(scores, 100 * cosine.clamp(min=0), atol=1e-4)
    assert (scores >= 0).all() and (scores <= 100).all()
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(model, tokenizer, images, prompts[:2])


def test_backbone_features_from_saved_cnn_and_clip_checkpoints(tmp_path) -> None:
    from transformers import ResNetConfig, ResNetModel

    from unifl.evaluation import BackboneFeatureExtractor
    from unifl.evaluation.clip_score import ClipScorer

    torch.manual_seed(0)
    resnet = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )
    resnet.save_pretrained(tmp_path / "resnet")
    extractor = BackboneFeatureExtractor.from_pretrained(tmp_path / "resnet")
    images = torch.rand(3, 3, 32, 32)
    features = extract_features(extractor, images, batch_size=2)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = resnet.eval()((images - mean) / std).pooler_output.reshape(3, -1)
    assert features.shape == (3, 16)
    assert torch.allclose(features, expected, atol=1e-5)

    clip, tokenizer = tiny_clip(), toy_tokenizer()
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    clip_features = BackboneFeatureExtractor.from_pretrained(tmp_path / "clip")(images)
    assert clip_features.shape == (3, 8)  # the projected image embedding
    scorer = ClipScorer.from_pretrained(tmp_path / "clip")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    assert torch.allclose(scorer(images, prompts), clip_score(clip, tokenizer, images, prompts))


# --------------------------------------------------------------------------- grids


def test_comparison_grid_is_a_png_showing_the_images(tmp_path) -> None:
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    blue = torch.zeros(2, 3, 8, 8)
    blue[:, 2] = 1.0
    path = save_comparison_grid(
        {"before": red, "after": blue}, ["a red circle", "a long prompt " * 5], tmp_path / "g.png"
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    pure_red = np.all(pixels == [255, 0, 0], axis=1).sum()
    pure_blue = np.all(pixels == [0, 0, 255], axis=1).sum()
    assert pure_red > 1000 and pure_blue > 1000
    assert pure_red == pytest.approx(pure_blue, rel=0.05)
    with pytest.raises(GridError, match="row 'after': 1 images for 2 prompts"):
        save_comparison_grid({"after": blue[:1]}, ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_stage_chart_draws_one_panel_per_metric_and_a_line_per_step_count(tmp_path) -> None:
    from unifl.evaluation.charts import mean_std, save_stage_chart

    assert mean_std([0.25, 0.5, 0.75]) == (0.5, 0.25)
    assert mean_std([0.4]) == (0.4, 0.0)
    results = {
        "base": [
            {"caption_match_20steps": 0.5, "caption_match_4steps": 0.35, "frechet_20steps": 0.2}
        ],
        "+PeFL": [
            {"caption_match_20steps": 0.52, "caption_match_4steps": 0.36, "frechet_20steps": 0.25},
            {"caption_match_20steps": 0.50, "caption_match_4steps": 0.38, "frechet_20steps": 0.24},
            {"caption_match_20steps": 0.51},  # a summary without the 4-step metrics
        ],
    }

    def colours(path):
        with Image.open(path) as image:
            assert image.format == "PNG"
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        # matplotlib's first two line colours: one line per step count.
        return [
            int(np.all(pixels == rgb, axis=1).sum()) for rgb in ([31, 119, 180], [255, 127, 14])
        ]

    both = save_stage_chart(results, ["caption_match", "frechet"], [20, 4], tmp_path / "c.png")
    with Image.open(both) as image:
        assert image.size == (640, 300)  # two panels side by side
    first, second = colours(both)
    assert first > 50 and second > 50
    only_20 = save_stage_chart(results, ["caption_match"], [20], tmp_path / "one.png")
    assert colours(only_20)[1] == 0
    with pytest.raises(ValueError, match="at least one metric"):
        save_stage_chart(results, [], [20], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- inputs


def test_prompts_load_from_text_csv_and_curated_tables_with_stable_ids(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue   square \na red circle\n")
    from_text = load_eval_prompts(tmp_path / "p.txt")
    assert from_text["prompt"].tolist() == ["a red circle", "a blue square"]
    pd.DataFrame({"prompt": ["a blue square", "a red circle"]}).to_csv(tmp_path / "p.csv")
    from_csv = load_eval_prompts(tmp_path / "p.csv", limit=1)
    assert from_csv["prompt"].tolist() == ["a blue square"]
    assert from_csv["prompt_id"][0] == from_text["prompt_id"][1]
    pd.DataFrame({"prompt_id": ["x1", "x2"], "prompt": ["one two", "three four"]}).to_parquet(
        tmp_path / "prompts.parquet"
    )
    assert load_eval_prompts(tmp_path)["prompt_id"].tolist() == ["x1", "x2"]
    pd.DataFrame({"prompt": ["fine", None]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(EvaluationError, match=r"bad.parquet: row 2: missing prompt"):
        load_eval_prompts(tmp_path / "bad.parquet")
    with pytest.raises(EvaluationError, match="not found"):
        load_eval_prompts(tmp_path / "missing.txt")


def test_reference_images_load_and_resize(tmp_path) -> None:
    for index in range(3):
        array = np.full((16, 16, 3), 60 * index, dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / f"{index}.png")
    images = load_reference_images(tmp_path, limit=2, size=8)
    assert images.shape == (2, 3, 8, 8)
    assert images[1].mean().item() == pytest.approx(60 / 255, abs=1e-6)
    with pytest.raises(EvaluationError, match="at least 2"):
        load_reference_images(tmp_path, limit=1)


def test_auto_spacing_is_trailing_for_few_steps() -> None:
    config = EvaluateConfig()
    assert resolve_timestep_spacing(config, 4) == "trailing"
    assert resolve_timestep_spacing(config, 20) == "leading"
    assert resolve_timestep_spacing(EvaluateConfig(timestep_spacing="linspace"), 4) == "linspace"


def test_few_step_guidance_applies_up_to_few_step_max() -> None:
    assert resolve_guidance_scale(EvaluateConfig(), 4) == 7.5
    config = EvaluateConfig(few_step_guidance_scale=3.0)
    assert resolve_guidance_scale(config, 4) == 3.0
    assert resolve_guidance_scale(config, 8) == 3.0
    assert resolve_guidance_scale(config, 9) == 7.5


# --------------------------------------------------------------------------- end to end

PROMPTS = [
    "a red circle on a dark background",
    "a large blue square above a green triangle on a gray background",
    "a small yellow circle on a bright background",
]


@pytest.fixture(scope="module")
def toy_world():
    from unifl.models.reward import build_toy_reward_model
    from unifl.models.segmenter import ToySegmenter
    from unifl.models.toy_presets import build_toy_model

    torch.manual_seed(0)
    segmenter = ToySegmenter(width=4).eval()
    return {
        "model": build_toy_model("toy-sd15", seed=0),
        "baseline": build_toy_model("toy-sd15", seed=1),
        "segmenter": segmenter,
        "reward": build_toy_reward_model(seed=0),
    }


def test_throughput_counts_every_image_and_excludes_warm_up(toy_world, monkeypatch) -> None:
    import unifl.models.sampler as sampler

    calls: list[int] = []
    real_generate = sampler.generate

    def counting_generate(model, prompts, **kwargs):
        calls.append(len(prompts))
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(sampler, "generate", counting_generate)
    result = measure_throughput(toy_world["model"], PROMPTS, steps=1, batch_size=2)
    assert calls == [2, 3]  # one warm-up batch, then the timed run over all prompts
    assert result.num_images == 3 and result.steps == 1
    assert result.images_per_second == pytest.approx(3 / result.seconds)


def test_evaluate_model_end_to_end_on_a_random_toy_model(toy_world, tmp_path, caplog) -> None:
    from unifl.toy.caption_match import caption_match, predicted_masks
    from unifl.toy.oracle import oracle_scores

    segmenter = toy_world["segmenter"]
    torch.manual_seed(2)
    real_features = extract_features(segmenter.features, torch.rand(6, 3, 32, 32))
    config = EvaluateConfig(
        num_prompts=3, seeds=[0], steps=[2, 1], batch_size=2, grid_prompts=2, warmup=False
    )
    result = evaluate_model(
        toy_world["model"],
        PROMPTS,
        config,
        segmenter=segmenter,
        reward_model=toy_world["reward"],
        real_features=real_features,
        out_dir=tmp_path / "eval",
        baseline=toy_world["baseline"],
        progress=False,
    )
    # Per-step summaries are the means of the per-prompt columns.
    for steps in (2, 1):
        for metric in ("oracle_color", "oracle_layout", "reward_detail"):
            column = result.per_prompt[metric_name(metric, steps)]
            assert result.summary[metric_name(metric, steps)] == pytest.approx(column.mean())
        # Caption-match pools objects: prompts name 1, 2 and 1 objects.
        shares = result.per_prompt[metric_name("caption_match", steps)].to_numpy()
        pooled = float((shares * [1, 2, 1]).sum() / 4)
        assert result.summary[metric_name("caption_match", steps)] == pytest.approx(pooled)
        assert 0 <= result.summary[metric_name("caption_match", steps)] <= 1
        assert result.summary[metric_name("frechet", steps)] > 0
        assert result.summary[metric_name("images_per_second", steps)] > 0
    assert len(result.per_prompt) == 3 and len(result.per_sample) == 6
    # The Fréchet distance depends on the samples and the feature width: both recorded, and
    # 3 samples of many-dimensional features are called out.
    dims = real_features.shape[1]
    assert result.settings["frechet_feature_dims"] == dims > 3
    assert result.settings["frechet_real_samples"] == 6
    warnings = [r.getMessage() for r in caplog.records if "Fréchet distance" in r.getMessage()]
    assert len(warnings) == 2 and f"from 3 samples of {dims}-dimensional features" in warnings[0]

    # The per-prompt numbers are the toy modules' numbers on the same samples.
    from unifl.models.sampler import generate

    images = generate(toy_world["model"], PROMPTS, steps=2, seed=0, timestep_spacing="trailing")
    with torch.no_grad():
        match = caption_match(segmenter, images, PROMPTS)
        expected_match = torch.as_tensor(match.per_image)
        oracle = oracle_scores(images, PROMPTS, predicted_masks(segmenter, images))
        rewards = toy_world["reward"](images, PROMPTS)
    row = result.per_sample[result.per_sample["steps"] == 2]
    assert np.allclose(row["caption_match"], expected_match.numpy())
    assert np.allclose(row["extra_objects"], match.extra_objects.numpy())
    assert result.summary["extra_objects_2steps"] == pytest.approx(
        float(match.extra_objects.double().mean())
    )
    assert np.allclose(row["oracle_color"], oracle["color"].numpy(), atol=1e-6)
    assert np.allclose(row["reward_lighting"], rewards["lighting"].numpy(), atol=1e-5)
    assert result.summary["caption_match_2steps"] == pytest.approx(match.rate)
    real = frechet_distance(extract_features(segmenter.features, images), real_features)
    assert result.summary["frechet_2steps"] == pytest.approx(real, rel=1e-5)

    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["caption_match_2steps"] == pytest.approx(result.summary["caption_match_2steps"])
    table = pd.read_csv(out / "per_prompt.csv")
    assert list(table.columns[:3]) == ["prompt_id", "prompt", "seed"]
    assert "oracle_lighting_1steps" in table.columns
    for name in ("grid_2steps.png", "grid_1steps.png", "grid_steps.png"):
        with Image.open(out / name) as grid:
            assert grid.format == "PNG" and grid.width > 200
    report = (out / "report.md").read_text()
    assert "caption_match" in report and "grid_2steps.png" in report
    assert "<table>" in (out / "report.html").read_text()


def test_cli_evaluate_writes_the_stage_outputs_and_rejects_bad_prompts(toy_world, tmp_path) -> None:
    from unifl.cli import app
    from unifl.models.base import save_base_model
    from unifl.toy.dataset import write_toy_dataset

    save_base_model(toy_world["model"], tmp_path / "model")
    toy_world["segmenter"].save(tmp_path / "segmenter")
    write_toy_dataset(tmp_path / "data", num_images=4, seed=0, progress=False)
    (tmp_path / "params.yaml").write_text("{}\n")
    settings = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--set",
        "evaluate.steps=[1]",
        "--set",
        "evaluate.num_prompts=2",
        "--set",
        "evaluate.grid_prompts=2",
        "--set",
        "evaluate.warmup=false",
        "--set",
        "project.device=cpu",
    ]
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "stage",
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--prompts",
            str(tmp_path / "data"),
            "--real-data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
            "--segmenter",
            str(tmp_path / "segmenter"),
            *settings,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "caption_match" in result.output and "frechet" in result.output
    table = pd.read_csv(tmp_path / "out" / "per_prompt.csv")
    captions = [
        json.loads(line)["caption"] for line in (tmp_path / "data" / "annotations.jsonl").open()
    ]
    assert table["prompt"].tolist() == captions[:2]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["frechet_1steps"] > 0 and "caption_match_1steps" in table.columns

    (tmp_path / "empty.txt").write_text("\n")
    bad = runner.invoke(
        app,
        [
            "stage",
            "evaluate",
            "--model",
            str(tmp_path / "model"),
            "--prompts",
            str(tmp_path / "empty.txt"),
            "--out",
            str(tmp_path / "out2"),
            *settings,
        ],
    )
    assert bad.exit_code == 2
    assert "empty.txt" in bad.output and "no prompts" in bad.output
    assert not (tmp_path / "out2").exists()


def test_evaluation_samples_few_steps_at_the_few_step_guidance(toy_world, monkeypatch) -> None:
    import unifl.models.sampler as sampler

    calls: list[tuple[int, float]] = []
    real_generate = sampler.generate

    def recording_generate(model, prompts, **kwargs):
        calls.append((kwargs["steps"], kwargs["guidance_scale"]))
        return real_generate(model, prompts, **kwargs)

    monkeypatch.setattr(sampler, "generate", recording_generate)
    config = EvaluateConfig(
        num_prompts=3,
        steps=[9, 2],
        batch_size=3,
        grid_prompts=2,
        warmup=False,
        few_step_guidance_scale=2.0,
    )
    result = evaluate_model(
        toy_world["model"],
        PROMPTS,
        config,
        segmenter=toy_world["segmenter"],
        reward_model=toy_world["reward"],
        progress=False,
    )
    assert set(calls) == {(9, 7.5), (2, 2.0)}
    assert result.settings["guidance_scale"] == {"9": 7.5, "2": 2.0}
