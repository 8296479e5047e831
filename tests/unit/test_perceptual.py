"""Perceptual losses of PeFL: hand-computed values, gradients to pixels only, frozen models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPImageProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    ResNetModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    SwinConfig,
)

from unifl.config import PerceptualModelConfig, load_params
from unifl.feedback.perceptual import (
    INSTANCE_CLASSES,
    INSTANCE_MASKS,
    SEMANTIC_MASKS,
    STYLE_IMAGES,
    CombinedPerceptualLoss,
    ImagePreprocessing,
    InstanceSegmentationLoss,
    PerceptualLossError,
    SemanticSegmentationLoss,
    StyleGramLoss,
    ToySegmenterLoss,
    TransformersFeatureMaps,
    build_perceptual_loss,
    gram_matrix,
    gram_style_loss,
    instance_targets_from_maps,
    masked_cross_entropy,
)
from unifl.models.segmenter import ToySegmenter

NUM_CLASSES = 5


def tiny_segformer() -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=NUM_CLASSES,
        initializer_range=0.5,
    )
    return SegformerForSemanticSegmentation(config)


def tiny_resnet() -> ResNetModel:
    torch.manual_seed(0)
    return ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    )


def tiny_mask2former(num_labels: int = 3) -> Mask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=5,
        num_labels=num_labels,
        train_num_points=64,
    )
    return Mask2FormerForUniversalSegmentation(config)


def assert_frozen_without_grads(module: torch.nn.Module) -> None:
    assert not module.training
    for name, parameter in module.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name


def test_masked_cross_entropy_matches_hand_value_and_ignores_255() -> None:
    # Pixel 0: logits (0, ln 3), label 1 -> p = 3/4; pixel 1: (ln 2, 0), label 0 -> p = 2/3;
    # pixel 2 is ignored. Mean CE = (ln 4/3 + ln 3/2) / 2 = ln(2) / 2.
    logits = torch.tensor([[0.0, math.log(2), 5.0], [math.log(3), 0.0, -5.0]]).reshape(1, 2, 1, 3)
    masks = torch.tensor([[[1, 0, 255]]])
    assert masked_cross_entropy(logits, masks).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_masked_cross_entropy_upsamples_logits_to_the_mask() -> None:
    # Constant logits per class survive bilinear upsampling unchanged.
    logits = torch.tensor([0.0, math.log(3)]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()
    masks = torch.ones(1, 8, 8, dtype=torch.long)
    assert masked_cross_entropy(logits, masks).item() == pytest.approx(math.log(4 / 3), rel=1e-6)


def test_masked_cross_entropy_without_labelled_pixels_is_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_semantic_loss_is_cross_entropy_of_the_model_and_grads_reach_only_images() -> None:
    model = tiny_segformer()
    preprocessing = ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=(64, 64))
    perceptual = SemanticSegmentationLoss(model, preprocessing)
    perceptual.train()  # a trainer calling .train() must not unfreeze the perceptual model
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    masks = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    masks[0, :4] = 255

    loss = perceptual(images, {SEMANTIC_MASKS: masks})
    loss.backward()

    with torch.no_grad():
        pixels = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
        logits = model(pixel_values=(pixels - 0.5) / 0.25).logits
        logits = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(logits, masks, ignore_index=255)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > 0.5  # random logits: far from a perfect fit
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert_frozen_without_grads(model)


def test_semantic_loss_names_bad_annotations() -> None:
    perceptual = SemanticSegmentationLoss(tiny_segformer())
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(PerceptualLossError, match="semantic_masks"):
        perceptual(images, {})
    with pytest.raises(PerceptualLossError, match="class id 7"):
        perceptual(images, {SEMANTIC_MASKS: torch.full((1, 32, 32), 7)})
    with pytest.raises(PerceptualLossError, match=r"shape \[N=1, H, W\]"):
        perceptual(images, {SEMANTIC_MASKS: torch.zeros(2, 32, 32, dtype=torch.long)})
    with pytest.raises(PerceptualLossError, match=r"\[N, 3, H, W\]"):
        perceptual(torch.rand(1, 1, 32, 32), {SEMANTIC_MASKS: torch.zeros(1, 32, 32).long()})


def test_gram_matrix_and_style_loss_match_hand_values() -> None:
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    # F F^T = [[5, 11], [11, 25]], divided by C*H*W = 4.
    expected = torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4
    assert torch.allclose(gram_matrix(features), expected)

    style = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    # Gram(style) = I / 4; difference = [[4, 11], [11, 24]] / 4; squared sum = 834 / 16.
    assert gram_style_loss([features], [style]).item() == pytest.approx(834 / 16)
    two_layers = gram_style_loss([features, style], [style, style], layer_weights=[0.5, 3.0])
    assert two_layers.item() == pytest.approx(0.5 * 834 / 16)


def test_style_loss_on_a_cnn_matches_its_hidden_states_and_reaches_pixels() -> None:
    model = tiny_resnet()
    perceptual = StyleGramLoss(TransformersFeatureMaps(model, layers=[1, 2]), layer_weights=[1, 2])
    torch.manual_seed(2)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    style = torch.rand(1, 3, 48, 48)  # one reference of another size, broadcast to the batch

    loss = perceptual(images, {STYLE_IMAGES: style})
    loss.backward()

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model((images - mean) / std, output_hidden_states=True).hidden_states
        hidden_style = model((style - mean) / std, output_hidden_states=True).hidden_states
    expected = 0.0
    for weight, layer in zip([1, 2], [1, 2], strict=True):
        x, s = hidden[layer], hidden_style[layer]
        n, c, h, w = x.shape
        gram_x = torch.einsum("nchw,ndhw->ncd", x, x) / (c * h * w)
        c, h, w = s.shape[1:]
        gram_s = torch.einsum("nchw,ndhw->ncd", s, s) / (c * h * w)
        expected += weight * ((gram_x - gram_s) ** 2).sum(dim=(1, 2)).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > 0
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert_frozen_without_grads(model)

    same = perceptual(images.detach(), {STYLE_IMAGES: images.detach()})
    assert same.item() == pytest.approx(0.0, abs=1e-10)


def test_style_loss_rejects_a_reference_batch_of_the_wrong_size_and_bad_layers() -> None:
    perceptual = StyleGramLoss(TransformersFeatureMaps(tiny_resnet(), layers=[1]))
    with pytest.raises(PerceptualLossError, match="1 or N=3"):
        perceptual(torch.rand(3, 3, 32, 32), {STYLE_IMAGES: torch.rand(2, 3, 32, 32)})
    with pytest.raises(PerceptualLossError, match="style_images"):
        perceptual(torch.rand(3, 3, 32, 32), {SEMANTIC_MASKS: torch.zeros(3, 32, 32)})
    wrong_layer = StyleGramLoss(TransformersFeatureMaps(tiny_resnet(), layers=[9]))
    with pytest.raises(PerceptualLossError, match="layer 9"):
        wrong_layer(torch.rand(1, 3, 32, 32), {STYLE_IMAGES: torch.rand(1, 3, 32, 32)})


def instance_annotations() -> dict[str, list[torch.Tensor]]:
    first = torch.zeros(2, 32, 32)
    first[0, :10, :10] = 1
    first[1, 16:, 16:] = 1
    second = torch.zeros(1, 32, 32)
    second[0, 5:20, 5:25] = 1
    return {
        INSTANCE_MASKS: [first, second],
        INSTANCE_CLASSES: [torch.tensor([0, 2]), torch.tensor([1])],
    }


def test_mask2former_loss_is_finite_and_differentiable_to_pixels_only() -> None:
    model = tiny_mask2former()
    perceptual = InstanceSegmentationLoss(model, ImagePreprocessing(size=(64, 64), size_divisor=32))
    torch.manual_seed(3)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    annotations = instance_annotations()

    torch.manual_seed(4)
    loss = perceptual(images, annotations)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert_frozen_without_grads(model)

    # The same inputs and seed give the model's own loss on the same targets.
    pixels = ImagePreprocessing(size=(64, 64), size_divisor=32)(images.detach())
    masks = [
        F.interpolate(m[None], size=(64, 64), mode="nearest")[0]
        for m in annotations[INSTANCE_MASKS]
    ]
    torch.manual_seed(4)
    reference = model(
        pixel_values=pixels, mask_labels=masks, class_labels=annotations[INSTANCE_CLASSES]
    ).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_instance_targets_come_from_toy_label_maps() -> None:
    instance = torch.zeros(2, 4, 4, dtype=torch.long)
    semantic = torch.zeros(2, 4, 4, dtype=torch.long)
    instance[0, :2, :2], semantic[0, :2, :2] = 1, 5
    instance[0, 2:, 2:], semantic[0, 2:, 2:] = 2, 3
    semantic[0, 3, 3] = 7  # a stray pixel does not change the majority class
    targets = instance_targets_from_maps(instance, semantic, class_offset=1)
    assert targets[INSTANCE_CLASSES][0].tolist() == [4, 2]
    assert targets[INSTANCE_MASKS][0].shape == (2, 4, 4)
    assert targets[INSTANCE_MASKS][0][0].sum() == 4 and targets[INSTANCE_MASKS][0][0, 0, 0] == 1
    assert targets[INSTANCE_MASKS][1].shape == (0, 4, 4)
    assert targets[INSTANCE_CLASSES][1].numel() == 0
    loss = InstanceSegmentationLoss(tiny_mask2former(num_labels=6))
    torch.manual_seed(7)
    value = loss(torch.rand(2, 3, 4, 4), targets)
    assert torch.isfinite(value)


def test_mask2former_loss_names_bad_instance_annotations() -> None:
    perceptual = InstanceSegmentationLoss(tiny_mask2former())
    images = torch.rand(2, 3, 32, 32)
    annotations = instance_annotations()
    with pytest.raises(PerceptualLossError, match="one 'instance_masks'"):
        perceptual(images, {**annotations, INSTANCE_CLASSES: annotations[INSTANCE_CLASSES][:1]})
    bad_classes = [torch.tensor([0, 9]), torch.tensor([1])]
    with pytest.raises(PerceptualLossError, match="image 0: class id 9"):
        perceptual(images, {**annotations, INSTANCE_CLASSES: bad_classes})
    bad_count = [torch.tensor([0]), torch.tensor([1])]
    with pytest.raises(PerceptualLossError, match="image 0"):
        perceptual(images, {**annotations, INSTANCE_CLASSES: bad_count})


def toy_segmenter() -> ToySegmenter:
    torch.manual_seed(0)
    return ToySegmenter(width=4)


def test_toy_segmenter_loss_wraps_its_own_loss_and_freezes_it() -> None:
    segmenter = toy_segmenter()
    perceptual = ToySegmenterLoss(segmenter)
    torch.manual_seed(5)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    masks = torch.randint(0, 4, (2, 32, 32))
    loss = perceptual(images, {SEMANTIC_MASKS: masks})
    loss.backward()
    with torch.no_grad():
        expected = segmenter.loss(images.detach(), masks)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert_frozen_without_grads(segmenter)
    with pytest.raises(PerceptualLossError, match=r"\.loss"):
        ToySegmenterLoss(torch.nn.Linear(2, 2))


def test_combined_loss_is_the_weighted_sum_and_names_the_term_missing_annotations() -> None:
    structure = SemanticSegmentationLoss(tiny_segformer())
    style = StyleGramLoss(TransformersFeatureMaps(tiny_resnet(), layers=[2]))
    combined = CombinedPerceptualLoss(
        {"structure": structure, "style": style}, {"structure": 0.5, "style": 3.0}
    )
    torch.manual_seed(6)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    annotations = {
        SEMANTIC_MASKS: torch.randint(0, NUM_CLASSES, (2, 32, 32)),
        STYLE_IMAGES: torch.rand(1, 3, 32, 32),
    }
    total = combined(images, annotations)
    total.backward()
    expected = 0.5 * structure(images, annotations) + 3.0 * style(images, annotations)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(combined.last_terms) == {"structure", "style"}
    assert combined.required_annotations == (SEMANTIC_MASKS, STYLE_IMAGES)
    with pytest.raises(PerceptualLossError, match="term 'style'"):
        combined(images, {SEMANTIC_MASKS: annotations[SEMANTIC_MASKS]})


def test_preprocessing_reads_a_processor_and_is_differentiable() -> None:
    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 12, "width": 12}, do_center_crop=True
    )
    preprocessing = ImagePreprocessing.from_processor(processor)
    assert preprocessing.size == 16 and preprocessing.crop == (12, 12)
    assert preprocessing.mean == pytest.approx(tuple(processor.image_mean))
    images = torch.full((1, 3, 32, 48), 0.5, requires_grad=True)
    out = preprocessing(images)
    assert out.shape == (1, 3, 12, 12)
    expected = (0.5 - processor.image_mean[0]) / processor.image_std[0]
    assert out[0, 0].mean().item() == pytest.approx(expected, rel=1e-5)
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    divisor = ImagePreprocessing(size=20, size_divisor=32)
    assert divisor.output_size(40, 60) == (32, 32)


def test_preprocessing_gives_mobilevit_what_its_processor_gives() -> None:
    # MobileViT / DeepLabV3 checkpoints take BGR in [0, 1]: their processor does not normalise
    # (do_normalize None) although it carries a mean and std.
    from transformers import MobileViTImageProcessor

    processor = MobileViTImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    preprocessing = ImagePreprocessing.from_processor(processor)
    assert preprocessing.flip_channels and preprocessing.mean == (0.0, 0.0, 0.0)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    expected = processor(images=pixels.numpy(), return_tensors="pt")["pixel_values"]
    ours = preprocessing(pixels.permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=0)


def test_segmentation_losses_keep_the_whole_image_for_their_label_maps(tmp_path) -> None:
    from transformers import MobileViTImageProcessor

    tiny_segformer().save_pretrained(tmp_path)
    MobileViTImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48}
    ).save_pretrained(tmp_path)
    semantic = SemanticSegmentationLoss.from_pretrained(tmp_path)
    assert semantic.preprocessing.crop is None and semantic.preprocessing.flip_channels
    assert semantic.preprocessing.output_size(64, 64) == (64, 64)
    instance_dir = tmp_path / "mask2former"
    tiny_mask2former().save_pretrained(instance_dir)
    MobileViTImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48}
    ).save_pretrained(instance_dir)
    instance = InstanceSegmentationLoss.from_pretrained(instance_dir)
    assert instance.preprocessing.crop is None and instance.preprocessing.size_divisor == 32


def test_build_from_config_loads_saved_checkpoints_with_their_processor(tmp_path) -> None:
    segformer_dir, resnet_dir = tmp_path / "segformer", tmp_path / "resnet"
    tiny_segformer().save_pretrained(segformer_dir)
    SegformerImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(segformer_dir)
    tiny_resnet().save_pretrained(resnet_dir)
    params = load_params(
        None,
        overrides=[
            f"pefl.perceptual=[{{kind: semantic_segmentation, model: '{segformer_dir}', weight: 0.5}},"
            f" {{kind: style_gram, model: '{resnet_dir}', layers: [1, 2], weight: 2.0}}]"
        ],
    )
    combined = build_perceptual_loss(params.pefl.perceptual)
    semantic = combined.losses["semantic_segmentation"]
    assert isinstance(semantic, SemanticSegmentationLoss)
    assert semantic.preprocessing.size == (64, 64)
    assert semantic.preprocessing.mean == (0.5, 0.5, 0.5)
    assert combined.losses["style_gram"].feature_maps.layers == (1, 2)
    assert combined.weights == {"semantic_segmentation": 0.5, "style_gram": 2.0}
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = combined(
        images,
        {SEMANTIC_MASKS: torch.zeros(1, 32, 32).long(), STYLE_IMAGES: torch.rand(1, 3, 32, 32)},
    )
    loss.backward()
    assert torch.isfinite(loss) and images.grad.abs().sum() > 0


def test_build_reports_unusable_specs() -> None:
    with pytest.raises(PerceptualLossError, match="toy_segmenter="):
        build_perceptual_loss(PerceptualModelConfig())
    with pytest.raises(PerceptualLossError, match=r"pefl.perceptual\[0\].*cannot load"):
        build_perceptual_loss({"kind": "semantic_segmentation", "model": "/nonexistent/model"})
    with pytest.raises(PerceptualLossError, match="named 'toy_segmenter' exists"):
        build_perceptual_loss([{}, {}], toy_segmenter=toy_segmenter())
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(PerceptualLossError, match="torchvision"):
            build_perceptual_loss({"kind": "style_gram", "model": "torchvision:vgg16"})
    built = build_perceptual_loss({"weight": 0.25}, toy_segmenter=toy_segmenter())
    assert built.weights == {"toy_segmenter": 0.25}


def test_build_loads_a_saved_toy_segmenter_directory(tmp_path) -> None:
    segmenter = toy_segmenter()
    segmenter.save(tmp_path / "segmenter")
    built = build_perceptual_loss({"kind": "toy_segmenter", "model": str(tmp_path / "segmenter")})
    images = torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 4, (2, 32, 32))
    with torch.no_grad():
        expected = segmenter.loss(images, masks)
    assert built(images, {SEMANTIC_MASKS: masks}).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(PerceptualLossError, match="cannot load"):
        build_perceptual_loss({"kind": "toy_segmenter", "model": str(tmp_path / "missing")})
