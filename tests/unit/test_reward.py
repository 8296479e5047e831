"""The decoupled reward model: rewards per dimension, differentiable preprocessing, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unifl.config import DIMENSIONS
from unifl.models.reward import (
    CLIP_MEAN,
    CLIP_STD,
    HEADS_FILE,
    DecoupledRewardModel,
    RewardModelError,
    build_reward_model,
    build_toy_reward_model,
    preprocess_images,
    reward_for_dimension,
    toy_clip_config,
)
from unifl.models.tokenizer import toy_tokenizer

PROMPTS = ["a red circle above a blue square", "a small green triangle", "a large yellow square"]


@pytest.fixture(scope="module")
def model() -> DecoupledRewardModel:
    return build_toy_reward_model(image_size=32, seed=0)


def _images(count: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, height, width, generator=generator)


def test_forward_gives_one_finite_reward_per_dimension_and_image(model: DecoupledRewardModel):
    rewards = model(_images(3), prompts=PROMPTS)

    assert tuple(rewards) == DIMENSIONS
    for values in rewards.values():
        assert values.shape == (3,)
        assert torch.isfinite(values).all()
    # Heads are separate functions of the same features: their rewards differ.
    assert not torch.allclose(rewards["color"], rewards["lighting"])


def test_token_ids_and_prompts_give_the_same_rewards(model: DecoupledRewardModel):
    images = _images(3)
    tokens = model.tokenize(PROMPTS)

    by_prompt = model(images, prompts=PROMPTS)
    by_ids = model(images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])

    for dim in DIMENSIONS:
        torch.testing.assert_close(by_prompt[dim], by_ids[dim], rtol=0, atol=0)


def test_the_prompt_changes_the_reward(model: DecoupledRewardModel):
    images = _images(1).repeat(2, 1, 1, 1)
    with torch.no_grad():
        rewards = model(images, prompts=["a red circle", "a blue striped square"])

    assert all(abs(float(values[0] - values[1])) > 1e-6 for values in rewards.values())


def test_reward_for_dimension_is_that_heads_reward(model: DecoupledRewardModel):
    images = _images(2)
    full = model(images, prompts=PROMPTS[:2])

    detail = reward_for_dimension(model, images, PROMPTS[:2], "detail")

    torch.testing.assert_close(detail, full["detail"], rtol=0, atol=0)
    with pytest.raises(RewardModelError, match="unknown reward dimensions \\['sharpness'\\]"):
        reward_for_dimension(model, images, PROMPTS[:2], "sharpness")


def test_preprocessing_normalises_with_clip_statistics():
    images = torch.full((1, 3, 32, 32), 0.25)

    out = preprocess_images(images, image_size=32)

    expected = [(0.25 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[0, channel], torch.full((32, 32), value))


def test_preprocessing_resizes_the_short_side_and_centre_crops():
    # Already 32 high: no resampling, only the central 32 of 48 columns are kept.
    wide = _images(1, height=32, width=48)
    out = preprocess_images(wide, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, wide[..., :, 8:40], rtol=0, atol=0)

    # Downscaling a constant image keeps it constant (antialias filters sum to one).
    large = torch.full((2, 3, 96, 64), 0.6)
    out = preprocess_images(large, image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, 0.6), rtol=0, atol=1e-5)


def test_preprocessing_rejects_bad_shapes_and_integer_images():
    with pytest.raises(RewardModelError, match=r"\[N, 3, H, W\]"):
        preprocess_images(torch.rand(3, 32, 32), image_size=32)
    with pytest.raises(RewardModelError, match="float tensor"):
        preprocess_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), image_size=32)


def test_gradients_flow_from_every_reward_to_the_pixels():
    model = build_toy_reward_model(image_size=32, seed=1).double()
    model.requires_grad_(False)  # frozen, as in feedback learning
    images = _images(2, height=48, width=48).double().requires_grad_(True)

    for dim in DIMENSIONS:
        images.grad = None
        reward_for_dimension(model, images, PROMPTS[:2], dim).sum().backward()
        grad = images.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert (grad.flatten(1).abs().sum(dim=1) > 0).all(), dim


def test_pixel_gradient_matches_finite_differences():
    """The analytic gradient through resize + normalise + CLIP + head is the true derivative."""
    model = build_toy_reward_model(image_size=32, seed=2).double()
    model.requires_grad_(False)
    images = _images(1, height=40, width=40, seed=3).double().requires_grad_(True)
    direction = _images(1, height=40, width=40, seed=4).double() - 0.5
    prompts = PROMPTS[:1]

    reward_for_dimension(model, images, prompts, "lighting").sum().backward()
    analytic = float((images.grad * direction).sum())
    eps = 1e-4
    with torch.no_grad():
        plus = reward_for_dimension(model, images + eps * direction, prompts, "lighting")
        minus = reward_for_dimension(model, images - eps * direction, prompts, "lighting")
    numeric = float((plus - minus).sum()) / (2 * eps)

    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_only_the_scored_dimensions_head_gets_gradients():
    model = build_toy_reward_model(image_size=32, seed=0)
    reward_for_dimension(model, _images(2), PROMPTS[:2], "layout").sum().backward()

    for dim in DIMENSIONS:
        grads = [p.grad for p in model.heads[dim].parameters()]
        if dim == "layout":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_same_seed_same_weights_other_seed_other_weights():
    first = build_toy_reward_model(seed=5)
    again = build_toy_reward_model(seed=5)
    other = build_toy_reward_model(seed=6)
    images = _images(2)

    a = first(images, prompts=PROMPTS[:2])
    b = again(images, prompts=PROMPTS[:2])
    c = other(images, prompts=PROMPTS[:2])

    torch.testing.assert_close(a["color"], b["color"], rtol=0, atol=0)
    assert not torch.allclose(a["color"], c["color"])


def test_save_and_load_give_identical_rewards_alphas_and_tokens(tmp_path: Path):
    model = build_toy_reward_model(image_size=32, seed=3)
    model.set_alphas({"color": 1.8, "layout": 0.25, "detail": 0.0, "lighting": 0.65})
    images = _images(3)
    before = model(images, prompts=PROMPTS)

    model.save(tmp_path / "reward")
    model.set_alphas({"color": 9.0})  # saving again must replace the directory as a whole
    model.save(tmp_path / "reward")
    loaded = DecoupledRewardModel.load(tmp_path / "reward")
    after = loaded(images, prompts=PROMPTS)

    for dim in DIMENSIONS:
        torch.testing.assert_close(after[dim], before[dim], rtol=0, atol=0)
    assert loaded.alphas == {"color": 9.0, "layout": 0.25, "detail": 0.0, "lighting": 0.65}
    assert loaded.dimensions == DIMENSIONS
    assert loaded.settings() == model.settings()
    torch.testing.assert_close(
        loaded.tokenize(PROMPTS)["input_ids"], model.tokenize(PROMPTS)["input_ids"]
    )
    settings = json.loads((tmp_path / "reward" / "reward_config.json").read_text())
    assert settings["preprocessing"]["image_size"] == 32
    assert settings["preprocessing"]["antialias"] is True
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["reward"]  # no temporary leftovers


def test_load_names_the_missing_file(tmp_path: Path):
    model = build_toy_reward_model(seed=0)
    model.save(tmp_path / "reward")
    (tmp_path / "reward" / HEADS_FILE).unlink()

    with pytest.raises(RewardModelError, match=f"missing .*{HEADS_FILE}"):
        DecoupledRewardModel.load(tmp_path / "reward")


def test_load_rejects_an_unknown_format_version(tmp_path: Path):
    build_toy_reward_model(seed=0).save(tmp_path / "reward")
    config_path = tmp_path / "reward" / "reward_config.json"
    settings = json.loads(config_path.read_text())
    settings["format_version"] = 99
    config_path.write_text(json.dumps(settings))

    with pytest.raises(RewardModelError, match="format_version 99"):
        DecoupledRewardModel.load(tmp_path / "reward")


def test_unknown_alpha_dimension_is_an_error(model: DecoupledRewardModel):
    with pytest.raises(RewardModelError, match="unknown dimensions \\['contrast'\\]"):
        model.set_alphas({"contrast": 1.0})


def test_select_dimensions_keeps_one_head_with_the_same_rewards(model: DecoupledRewardModel):
    detail_only = model.select_dimensions(["detail"])
    images = _images(2)

    rewards = detail_only(images, prompts=PROMPTS[:2])

    assert tuple(rewards) == ("detail",)
    torch.testing.assert_close(
        rewards["detail"], model(images, prompts=PROMPTS[:2])["detail"], rtol=0, atol=0
    )
    assert tuple(model.heads) == DIMENSIONS  # the original is untouched


def test_a_pretrained_backbone_directory_loads_with_its_preprocessing(tmp_path: Path):
    """Production path: CLIPModel + tokenizer + preprocessor config from a directory."""
    from transformers import CLIPModel

    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    CLIPModel(toy_clip_config(tokenizer, image_size=32)).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(str(tmp_path / "clip"))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "CLIPImageProcessor", "image_mean": mean, "image_std": std}
        )
    )

    model = build_reward_model(str(tmp_path / "clip"), head_hidden_dim=16)
    rewards = model(_images(2), prompts=PROMPTS[:2])

    assert model.image_mean == tuple(mean) and model.image_std == tuple(std)
    assert model.image_size == 32 and model.head_hidden_dim == 16
    assert all(torch.isfinite(values).all() for values in rewards.values())


def test_a_tokenizer_whose_eos_is_two_is_refused():
    from unifl.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(["red", "circle"], max_length=8)
    tokenizer.add_special_tokens({"eos_token": "<bos>"})  # an eos with id 2
    assert tokenizer.eos_token_id == 2

    with pytest.raises(RewardModelError, match="eos id 2"):
        toy_clip_config(tokenizer)
