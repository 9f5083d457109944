"""LaECE (SAOD conventions): hand-computed values, a loop oracle written from the definition, bad input.

The official numbers of the reference problems are in ``test_metrics_official.py``."""

import math

import numpy as np
import pytest

from hf_caldetr.metrics import localisation_aware_calibration_error, match_detections, synthetic_detections


def loop_laece(matches, categories, num_bins):
    """The definition written out: per class with ground truth and detections, per half-open bin (a score of 1.0
    in none), |summed TP IoU / n - mean score| weighted by n / N_c; every category in the mean, 0 if not
    evaluated."""
    edges = np.linspace(0, 1, num_bins + 1)
    per_class = []
    for label, has_gt in categories.items():
        rows = [i for i in range(len(matches.scores)) if matches.labels[i] == label]
        total = 0.0
        if has_gt and rows:
            for k in range(num_bins):
                in_bin = [i for i in rows if edges[k] <= matches.scores[i] < edges[k + 1]]
                if in_bin:
                    prec_iou = sum(matches.ious[i] for i in in_bin) / len(in_bin)
                    confidence = sum(matches.scores[i] for i in in_bin) / len(in_bin)
                    total += len(in_bin) / len(rows) * abs(prec_iou - confidence)
        per_class.append(total)
    return sum(per_class) / len(per_class)


def test_end_to_end_hand_computed():
    # The 0.91 detection takes the box (IoU 80/100); its 0.90 duplicate is a false positive; both share bin 22 =
    # [0.88, 0.92): |0.8 / 2 - 0.905| = 0.505 for class 1. The class-3 detection has no class-3 box anywhere:
    # the official code never scores a class without ground truth, so class 3 counts 0, as does class 5 (listed,
    # nothing). LaECE = (0.505 + 0 + 0) / 3.
    predictions = [{"boxes": [[0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 10, 10]], "scores": [0.91, 0.90, 0.6],
                    "labels": [1, 1, 3]}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [1]}]
    result = localisation_aware_calibration_error(predictions, references, [1, 3, 5])
    assert result["laece_per_class"] == pytest.approx({1: 0.505, 3: 0.0, 5: 0.0})
    assert result["laece"] == pytest.approx(0.505 / 3)
    assert localisation_aware_calibration_error(predictions, references, [1, 3, 5],
                                                empty_classes="exclude")["laece"] == pytest.approx(0.505)


@pytest.mark.parametrize("seed, num_bins", [(0, 25), (1, 10), (2, 7)])
def test_random_sets_equal_the_loop_oracle(seed, num_bins):
    predictions, references, _ = synthetic_detections(num_images=30, num_classes=5, seed=seed)
    matches = match_detections(predictions, references, include_images_without_gt=True,
                               max_detections_per_class=100)
    has_gt = {label: any(label in np.asarray(r["labels"]).tolist() for r in references) for label in range(6)}
    expected = loop_laece(matches, has_gt, num_bins)
    result = localisation_aware_calibration_error(predictions, references, 6, num_bins)
    assert result["laece"] == pytest.approx(expected, abs=1e-12)


def test_perfect_boxes_and_scores_give_zero_in_the_last_bin_option():
    predictions = [{"boxes": [[0, 0, 10, 10]], "scores": [1.0], "labels": [0]}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    assert localisation_aware_calibration_error(predictions, references, 1, score_one="last_bin")["laece"] == 0.0


def test_no_detections_give_zero_per_class_and_nan_when_excluding():
    predictions = [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    assert localisation_aware_calibration_error(predictions, references, 2)["laece"] == 0.0
    assert math.isnan(localisation_aware_calibration_error(predictions, references, 2,
                                                           empty_classes="exclude")["laece"])


@pytest.mark.parametrize("options, message", [
    ({"score_one": "top"}, "score_one must be one of"),
    ({"empty_classes": "drop"}, "empty_classes must be one of"),
    ({"num_bins": 0}, "num_bins must be a positive integer"),
])
def test_bad_options(options, message):
    predictions = [{"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    with pytest.raises(ValueError, match=message):
        localisation_aware_calibration_error(predictions, references, 1, **options)
