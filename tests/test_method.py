"""The method's pure functions on hand-computed numbers."""

import math

import pytest
import torch

from hf_caldetr.method import (
    logit_prototype,
    logit_uncertainty,
    mix_logits,
    mixed_targets,
    mixed_targets_from_counts,
    modulate_logits,
    pooled_logit_mixing,
    positive_rows,
)


def test_uncertainty_is_unbiased_variance_over_layers():
    # One image, 3 layers, 1 query, 2 classes: class 0 goes 1, 2, 3 (variance 1), class 1 stays at 5 (0).
    layers = torch.tensor([[[[1.0, 5.0]], [[2.0, 5.0]], [[3.0, 5.0]]]])
    assert layers.shape == (1, 3, 1, 2)
    assert torch.allclose(logit_uncertainty(layers), torch.tensor([[[1.0, 0.0]]]))
    # Two layers, 1 and 3: mean 2, squared deviations 1 + 1, over L - 1 = 1 -> 2.
    two = torch.tensor([[[[1.0]], [[3.0]]]])
    assert logit_uncertainty(two).item() == pytest.approx(2.0)


def test_uncertainty_refuses_one_layer_and_wrong_rank():
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        logit_uncertainty(torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="batch, layers, queries, classes"):
        logit_uncertainty(torch.zeros(3, 2, 2))


def test_modulation_modes_by_hand():
    z = torch.tensor([[[3.0, -2.0]]])
    u = torch.tensor([[[1.0, 0.0]]])
    t = math.tanh(1.0)  # 0.7615941559557649
    assert torch.allclose(modulate_logits(z, u, "multiplicative"), torch.tensor([[[3.0 * (1 - t), -2.0]]]))
    assert torch.allclose(modulate_logits(z, u, "subtractive"), torch.tensor([[[3.0 - t, -2.0]]]))
    assert torch.equal(modulate_logits(z, u, "none"), z)
    # The paper's form pulls a negative logit up towards 0; the released form pushes it further down.
    assert modulate_logits(torch.tensor([-2.0]), torch.tensor([1.0]), "multiplicative").item() == pytest.approx(-2 * (1 - t))
    assert modulate_logits(torch.tensor([-2.0]), torch.tensor([1.0]), "subtractive").item() == pytest.approx(-2 - t)
    with pytest.raises(ValueError, match="uncertainty_modulation"):
        modulate_logits(z, u, "divide")
    with pytest.raises(ValueError, match="one shape"):
        modulate_logits(z, u[..., :1], "multiplicative")


def test_prototype_and_mixed_logits_by_hand():
    positives = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    prototype = logit_prototype(positives)
    assert torch.allclose(prototype, torch.tensor([3.0, 2.0]))
    mixed = mix_logits(positives, prototype, alpha=0.9)
    assert torch.allclose(mixed[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 2]))
    assert torch.allclose(mixed[2], torch.tensor([0.9 * 5 + 0.1 * 3, 0.0 + 0.1 * 2]))
    with pytest.raises(ValueError, match="at least one positive"):
        logit_prototype(torch.zeros(0, 2))


def test_mixed_targets_repeated_classes_and_class_zero():
    # Classes 0, 0, 2 (class id 0 is a class like any other): P = 3, each other positive adds 0.1 / 2.
    targets = mixed_targets(torch.tensor([0, 0, 2]), num_columns=3, alpha=0.9)
    expected = torch.tensor([[0.95, 0.0, 0.05], [0.95, 0.0, 0.05], [0.10, 0.0, 0.90]])
    assert torch.allclose(targets, expected)
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_mixed_targets_distinct_classes_and_single_positive():
    targets = mixed_targets(torch.tensor([1, 3]), num_columns=4, alpha=0.9)
    assert torch.allclose(targets, torch.tensor([[0.0, 0.9, 0.0, 0.1], [0.0, 0.1, 0.0, 0.9]]))
    one = mixed_targets(torch.tensor([2]), num_columns=4, alpha=0.9)
    assert torch.equal(one, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    # One positive: mixing is the identity.
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    assert torch.allclose(mix_logits(z, logit_prototype(z), 0.9), z)


def test_pooled_mixing_in_one_process_equals_the_pure_functions():
    positives = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0], [5.0, 0.0, -1.0]])
    classes = torch.tensor([0, 0, 2])
    mixed, targets, total = pooled_logit_mixing(positives, classes, 3, 0.9)
    assert total == 3
    assert torch.allclose(mixed, mix_logits(positives, logit_prototype(positives), 0.9))
    assert torch.allclose(targets, mixed_targets(classes, 3, 0.9))
    # No positive at all.
    mixed, targets, total = pooled_logit_mixing(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3, 0.9)
    assert total == 0 and mixed.shape == (0, 3) and targets.shape == (0, 3)


def test_positive_rows_pool_images():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    targets = [{"class_labels": torch.tensor([2, 0])}, {"class_labels": torch.tensor([1])}]
    indices = [(torch.tensor([3, 1]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    rows, classes = positive_rows(targets, indices, num_queries=4)
    assert rows == [3, 1, 6]  # image 1, query 2: row 4 + 2
    assert classes == [0, 2, 1]
    assert torch.equal(logits.flatten(0, 1)[rows], torch.stack([logits[0, 3], logits[0, 1], logits[1, 2]]))


def test_scaled_mixed_targets():
    # Pool of classes 0, 0, 2 (P = 3, alpha 0.9): each other positive adds 0.1 / 2 to its class, so class 0's
    # target is [0.95, 0, 0.05] and class 2's [0.10, 0, 0.90]; the normaliser 1/4 folded in multiplies every entry.
    scaled = mixed_targets_from_counts([0, 2], [2, 0, 1], alpha=0.9, scale=0.25)
    expected = 0.25 * torch.tensor([[0.95, 0.0, 0.05], [0.10, 0.0, 0.90]])
    assert torch.allclose(scaled, expected)
    assert torch.allclose(scaled.sum(1), torch.full((2,), 0.25))


def test_gradient_flows_through_the_variance():
    layers = torch.tensor([[[[1.0, 2.0]], [[2.0, 0.0]], [[4.0, 1.0]]]], requires_grad=True)
    modulated = modulate_logits(layers[:, -1], logit_uncertainty(layers), "multiplicative")
    modulated.sum().backward()
    # Only the variance connects the first two layers to the output.
    assert layers.grad[:, :2].abs().sum() > 0
