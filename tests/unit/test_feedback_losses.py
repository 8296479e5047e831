"""The feedback losses against values computed by hand on small tensors."""

import math

import pytest
import torch

from unifl.feedback.losses import (
    FeedbackLossError,
    aesthetic_hinge_loss,
    discriminator_loss,
    generator_adversarial_loss,
    noise_prediction_mse,
)


def test_aesthetic_hinge_loss_by_hand():
    color = torch.tensor([1.0, 2.5], requires_grad=True)
    layout = torch.tensor([0.1, -0.2], requires_grad=True)
    rewards = {"color": color, "layout": layout, "detail": torch.tensor([9.0, 9.0])}
    alphas = {"color": 1.8, "layout": 0.25, "detail": 0.0}
    weights = {"color": 1.0, "layout": 2.0}
    total, terms = aesthetic_hinge_loss(rewards, alphas, weights)
    # color: relu(0.8), relu(-0.7) -> mean 0.4; layout: relu(0.15), relu(0.45) -> mean 0.3.
    assert float(terms["color"].detach()) == pytest.approx(0.4)
    assert float(terms["layout"].detach()) == pytest.approx(0.3)
    assert set(terms) == {"color", "layout"}  # detail has no weight: not part of L_aes
    assert float(total.detach()) == pytest.approx(0.4 + 2.0 * 0.3)
    total.backward()
    # The hinge passes gradient only below alpha: -w/N per image under its target.
    assert color.grad.tolist() == pytest.approx([-0.5, 0.0])
    assert layout.grad.tolist() == pytest.approx([-1.0, -1.0])


def test_aesthetic_hinge_loss_is_zero_at_or_above_alpha():
    rewards = {"color": torch.tensor([1.8, 3.0])}
    total, _ = aesthetic_hinge_loss(rewards, {"color": 1.8}, {"color": 1.0})
    assert float(total) == 0.0


def test_aesthetic_hinge_loss_names_the_missing_dimension():
    rewards = {"color": torch.zeros(2)}
    with pytest.raises(FeedbackLossError, match="'lighting'"):
        aesthetic_hinge_loss(rewards, {"color": 0.0}, {"lighting": 1.0})
    with pytest.raises(FeedbackLossError, match="no alpha"):
        aesthetic_hinge_loss(rewards, {}, {"color": 1.0})
    with pytest.raises(FeedbackLossError, match="one per image"):
        aesthetic_hinge_loss({"color": torch.zeros(2, 1)}, {"color": 0.0}, {"color": 1.0})
    with pytest.raises(FeedbackLossError, match="no dimension"):
        aesthetic_hinge_loss(rewards, {"color": 0.0}, {})


def test_discriminator_loss_by_hand():
    real = torch.tensor([0.0, 2.0])
    fake = torch.tensor([0.0, -1.0])
    # -log sigmoid(x) = log(1 + e^-x); -log(1 - sigmoid(x)) = log(1 + e^x).
    expected_real = (math.log(2.0) + math.log(1 + math.exp(-2.0))) / 2
    expected_fake = (math.log(2.0) + math.log(1 + math.exp(-1.0))) / 2
    value = discriminator_loss(real, fake)
    assert float(value) == pytest.approx(expected_real + expected_fake, rel=1e-6)
    assert float(value) == pytest.approx(0.410038 + 0.503204, abs=1e-5)
    # A confident, correct discriminator has a loss near zero; a fooled one a large loss.
    assert float(discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0]))) < 1e-8
    assert float(discriminator_loss(torch.tensor([-5.0]), torch.tensor([5.0]))) > 10


def test_discriminator_loss_gradient_pushes_real_up_and_fake_down():
    real = torch.tensor([0.0], requires_grad=True)
    fake = torch.tensor([0.0], requires_grad=True)
    discriminator_loss(real, fake).backward()
    assert float(real.grad) == pytest.approx(-0.5)  # sigmoid(0) - 1
    assert float(fake.grad) == pytest.approx(0.5)  # sigmoid(0) - 0


def test_generator_adversarial_loss_is_minus_the_mean_score():
    scores = torch.tensor([1.0, -3.0], requires_grad=True)
    value = generator_adversarial_loss(scores)
    assert float(value.detach()) == pytest.approx(1.0)
    value.backward()
    assert scores.grad.tolist() == pytest.approx([-0.5, -0.5])
    with pytest.raises(FeedbackLossError, match="one per image"):
        generator_adversarial_loss(torch.zeros(2, 2))


def test_noise_prediction_mse_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    assert float(noise_prediction_mse(pred, torch.zeros(2, 2))) == pytest.approx(7.5)
    assert noise_prediction_mse(pred, torch.zeros(2, 2)).dtype == torch.float32
    with pytest.raises(FeedbackLossError, match="differ"):
        noise_prediction_mse(torch.zeros(2, 2), torch.zeros(2, 3))
