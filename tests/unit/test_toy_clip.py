"""The toy CLIP's contrastive pretraining: loss by hand, retrieval, and the saved checkpoint."""

import math

import pytest
import torch

from unifl.models.reward import load_pretrained_reward_backbone
from unifl.toy.clip import (
    caption_targets,
    contrastive_loss,
    retrieval_accuracy,
    save_toy_clip,
    train_toy_clip,
)
from unifl.toy.dataset import generate_toy_batch


def test_caption_targets_share_each_row_among_equal_captions():
    targets = caption_targets(["a red circle", "a blue square", "a red circle"])
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    assert torch.equal(targets, expected)


def test_contrastive_loss_by_hand():
    # Unit embeddings: image 0 matches text 0 (cosine 1), image 1 is orthogonal to both.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # normalised: both (1, 0)
    scale = 10.0
    # logits = 10 * [[1, 1], [0, 0]], the same matrix in both directions' rows/columns.
    row_0 = -math.log(math.exp(10) / (math.exp(10) + math.exp(10)))  # log 2
    row_1 = -math.log(1 / 2)
    col_0 = -math.log(math.exp(10) / (math.exp(10) + 1))
    col_1 = -math.log(1 / (math.exp(10) + 1))
    expected = 0.5 * ((row_0 + row_1) / 2 + (col_0 + col_1) / 2)
    loss = contrastive_loss(images, texts, ["x", "y"], scale)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # Equal captions: each of the two texts is half a positive of each image.
    same = contrastive_loss(images, texts, ["x", "x"], scale)
    soft = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5))  # rows: uniform logits, half targets
    col = -(
        0.5 * math.log(math.exp(10) / (math.exp(10) + 1)) + 0.5 * math.log(1 / (math.exp(10) + 1))
    )
    assert same.item() == pytest.approx(0.5 * (soft + col), rel=1e-6)


def test_contrastive_loss_hard_negatives_by_hand():
    # Two images matching their own captions (cosine 1) and orthogonal to the other's.
    images, texts = torch.eye(2), torch.eye(2)
    scale = 2.0
    plain = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert contrastive_loss(images, texts, ["x", "y"], scale).item() == pytest.approx(plain)
    # A negative caption at cosine 1 with image 0 (and 0 with image 1) joins the rows only.
    negative = torch.tensor([[3.0, 0.0]])
    row_0 = -math.log(math.exp(2) / (2 * math.exp(2) + 1))
    row_1 = -math.log(math.exp(2) / (math.exp(2) + 2))
    expected = 0.5 * ((row_0 + row_1) / 2 + plain)
    loss = contrastive_loss(images, texts, ["x", "y"], scale, negative_text_embeds=negative)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # No negatives at all is the plain loss.
    empty = contrastive_loss(images, texts, ["x", "y"], scale, negative_text_embeds=texts[:0])
    assert empty.item() == pytest.approx(plain)


def test_contrastive_loss_clamps_the_scale_and_checks_sizes():
    images, texts = torch.eye(2), torch.eye(2)
    assert contrastive_loss(images, texts, ["x", "y"], 1e4).item() == pytest.approx(
        contrastive_loss(images, texts, ["x", "y"], 100.0).item()
    )
    with pytest.raises(ValueError, match="one of each"):
        contrastive_loss(images, texts, ["x"], 1.0)


def test_retrieval_accuracy_counts_equal_captions_as_right():
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    images = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.1]])
    accuracy, chance = retrieval_accuracy(images, texts, ["a", "b", "a"])
    # image 0 picks text 1 ("b", wrong); image 1 text 1 (right); image 2 text 0 ("a", right).
    assert accuracy == pytest.approx(2 / 3)
    assert chance == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)


def test_pretraining_learns_to_match_held_out_images_and_captions(tmp_path):
    train = generate_toy_batch(256, seed=11, resolution=32, max_objects=1)
    held_out = generate_toy_batch(64, seed=12, resolution=32, max_objects=1)
    clip, tokenizer, metrics = train_toy_clip(
        train.image_tensor(),
        train.captions,
        steps=150,
        batch_size=64,
        eval_images=held_out.image_tensor(),
        eval_captions=held_out.captions,
        progress=False,
    )
    assert metrics["steps"] == 150 and metrics["seconds"] > 0
    assert metrics["eval_retrieval"] > max(
        3 * metrics["eval_retrieval_chance"], metrics["eval_retrieval_init"] + 0.1
    ), metrics

    # Saved as a CLIP checkpoint, it loads through the production loader with the same outputs.
    save_toy_clip(clip, tokenizer, tmp_path / "clip")
    reward = load_pretrained_reward_backbone(str(tmp_path / "clip"), head_hidden_dim=8)
    images = held_out.image_tensor()[:4]
    with torch.no_grad():
        pixel_values = reward.preprocess(images)
        expected = clip.visual_projection(clip.vision_model(pixel_values).pooler_output)
        assert torch.allclose(reward.encode_images(images), expected, atol=1e-6)
        tokens = reward.tokenize(held_out.captions[:4])
        expected = clip.text_projection(clip.text_model(**tokens).pooler_output)
        assert torch.allclose(
            reward.encode_text(tokens["input_ids"], tokens["attention_mask"]), expected, atol=1e-6
        )


def test_pretraining_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        train_toy_clip(torch.rand(3, 3, 32, 32), ["a", "b"], steps=1, progress=False)
