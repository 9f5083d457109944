"""LaECE: hand-computed values and a loop oracle."""

import math

import numpy as np
import pytest

from hf_caldetr.metrics import (
    detection_laece,
    label_aware_calibration_error,
    match_detections,
    synthetic_detections,
)


def loop_laece(scores, labels, ious, num_bins):
    """The definition written out: per class, per bin, |summed IoU / n - mean score| weighted by n / N_c."""
    edges = np.linspace(0, 1, num_bins + 1)
    per_class = []
    for label in sorted(set(labels)):
        rows = [i for i in range(len(scores)) if labels[i] == label]
        total = 0.0
        for k in range(num_bins):
            in_bin = [i for i in rows if edges[k] <= min(max(scores[i], 1e-16), 1 - 1e-15) < edges[k + 1]]
            if in_bin:
                accuracy = sum(ious[i] for i in in_bin) / len(in_bin)
                confidence = sum(scores[i] for i in in_bin) / len(in_bin)
                total += len(in_bin) / len(rows) * abs(accuracy - confidence)
        per_class.append(total)
    return sum(per_class) / len(per_class)


def test_hand_computed():
    # Class 1: 0.90 (TP, IoU 0.8) and 0.91 (FP) share bin 22 = [0.88, 0.92): |0.8 / 2 - 0.905| = 0.505.
    # Class 7: 0.5 (TP, IoU 0.6) in bin 12: |0.6 - 0.5| = 0.1; 0.1 (FP) in bin 2: |0 - 0.1| = 0.1; each weighs
    # 1/2, so 0.1. LaECE = (0.505 + 0.1) / 2 = 0.3025.
    result = label_aware_calibration_error([0.90, 0.91, 0.5, 0.1], [1, 1, 7, 7], [0.8, 0.0, 0.6, 0.0])
    assert result["laece_per_class"] == pytest.approx({1: 0.505, 7: 0.1})
    assert result["laece"] == pytest.approx(0.3025)
    assert result["num_classes"] == 2 and result["num_detections"] == 4


def test_end_to_end_hand_computed():
    # The 0.91 detection takes the box with IoU 80/100; its 0.90 duplicate is a false positive: the class-1
    # value above. A class-3 detection without a class-3 box is a false positive alone in its bin: |0 - 0.6|.
    predictions = [{"boxes": [[0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 10, 10]], "scores": [0.91, 0.90, 0.6],
                    "labels": [1, 1, 3]}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [1]}]
    result = detection_laece(predictions, references)
    assert result["laece_per_class"] == pytest.approx({1: 0.505, 3: 0.6})
    assert result["laece"] == pytest.approx((0.505 + 0.6) / 2)


@pytest.mark.parametrize("seed, num_bins", [(0, 25), (1, 10), (2, 7)])
def test_random_sets_equal_the_loop_oracle(seed, num_bins):
    predictions, references, _ = synthetic_detections(num_images=30, num_classes=5, seed=seed)
    matches = match_detections(predictions, references)
    expected = loop_laece(matches.scores.tolist(), matches.labels.tolist(), matches.ious.tolist(), num_bins)
    assert detection_laece(predictions, references, num_bins)["laece"] == pytest.approx(expected, abs=1e-12)


def test_perfect_boxes_and_scores_give_zero():
    assert label_aware_calibration_error([1.0, 1.0], [0, 4], [1.0, 1.0])["laece"] == pytest.approx(0.0, abs=1e-15)


def test_no_detections_give_nan():
    result = label_aware_calibration_error([], [], [])
    assert math.isnan(result["laece"]) and result["laece_per_class"] == {} and result["num_classes"] == 0


@pytest.mark.parametrize("scores, labels, ious, message", [
    ([0.5], [1], [1.5], r"ious must lie in \[0, 1\]"),
    ([0.5], [1, 2], [0.5], "same shape"),
    ([float("nan")], [1], [0.5], "scores contains NaN"),
])
def test_bad_input(scores, labels, ious, message):
    with pytest.raises(ValueError, match=message):
        label_aware_calibration_error(scores, labels, ious)
