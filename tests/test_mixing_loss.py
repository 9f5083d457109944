"""The two forms of the logit-mixing loss by hand: softmax heads with a no-object column (DETR's), and sigmoid heads,
whose negatives are weighted as in the varifocal loss when the focal alpha is ``1 - focal_loss_alpha``."""

import math

import pytest
import torch

from hf_caldetr.models.criterion import sigmoid_logit_mixing_loss, softmax_logit_mixing_loss


def _softmax_mixing(logits, targets, indices, num_boxes):
    return softmax_logit_mixing_loss(logits, targets, indices, num_boxes, alpha=0.9)


def _two_positives(first, second):
    """Two images, two queries each, 2 labels + no-object; query 1 of image 0 is class 0, query 0 of image 1
    class 1; the other two queries are unmatched and carry extreme logits that must not matter."""
    logits = torch.tensor([[[5.0, -3.0, 7.0], first], [second, [9.0, 9.0, 9.0]]])
    targets = [{"class_labels": torch.tensor([0])}, {"class_labels": torch.tensor([1])}]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    return logits, targets, indices


def test_softmax_mixing_loss_by_hand_identical_positives():
    # Both positives [ln 2, 0, 0]: the prototype is the same vector, mixing changes nothing, softmax [1/2, 1/4, 1/4].
    # Targets (alpha 0.9, P = 2): [0.9, 0.1, 0] and [0.1, 0.9, 0]; no-object target 0 but in the softmax.
    # CE = -(0.9 ln 1/2 + 0.1 ln 1/4) = 1.1 ln 2 and -(0.1 ln 1/2 + 0.9 ln 1/4) = 1.9 ln 2; over 2 boxes: 1.5 ln 2.
    logits, targets, indices = _two_positives([math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0])
    loss = _softmax_mixing(logits, targets, indices, num_boxes=2)
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_softmax_mixing_loss_by_hand_distinct_positives():
    # z1 = [2, 0, 1] (class 0), z2 = [0, 1, 0] (class 1); prototype [1, 0.5, 0.5];
    # mixed: 0.9 z + 0.1 prototype = [1.9, 0.05, 0.95] and [0.1, 0.95, 0.05].
    # With targets summing to 1, CE_i = logsumexp(mixed_i) - t_i . mixed_i:
    ce1 = math.log(math.exp(1.9) + math.exp(0.05) + math.exp(0.95)) - (0.9 * 1.9 + 0.1 * 0.05)
    ce2 = math.log(math.exp(0.1) + math.exp(0.95) + math.exp(0.05)) - (0.1 * 0.1 + 0.9 * 0.95)
    expected = (ce1 + ce2) / 2  # = 0.65542...
    logits, targets, indices = _two_positives([2.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    loss = _softmax_mixing(logits, targets, indices, num_boxes=2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.65542, abs=1e-5)
    # One positive: mixing is the identity and the target the one-hot: plain cross-entropy, over num_boxes.
    one = _softmax_mixing(
        logits, targets[:1] + [{"class_labels": torch.tensor([], dtype=torch.long)}],
        [indices[0], (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))], num_boxes=1,
    )
    assert one.item() == pytest.approx(math.log(math.exp(2) + 1 + math.exp(1)) - 2, rel=1e-6)



def test_negatives_are_weighted_as_in_the_varifocal_loss():
    """Far from any positive the mixing loss is the varifocal loss's negative term: 0.75 * p**2 * BCE(z, 0)."""

    logits = torch.tensor([[[1.5, -0.5], [0.0, 2.0]]])  # query 0 matched to class 1, query 1 a negative
    targets = [{"class_labels": torch.tensor([1])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    full = sigmoid_logit_mixing_loss(logits, targets, indices, 1, alpha=0.9, focal_alpha=0.25, focal_gamma=2.0)
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # One positive: mixing is the identity and its target the one-hot [0, 1].
    positive = 0.75 * p[0, 0, 0] ** 2 * bce(logits[0, 0, 0], torch.tensor(0.0)) + 0.25 * (1 - p[0, 0, 1]) ** 2 * bce(
        logits[0, 0, 1], torch.tensor(1.0))
    negative = sum(0.75 * p[0, 1, c] ** 2 * bce(logits[0, 1, c], torch.tensor(0.0)) for c in range(2))
    assert torch.allclose(full, positive + negative, rtol=1e-6)


