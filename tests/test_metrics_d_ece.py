"""D-ECE and position-dependent D-ECE against netcal (the oracle) and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from netcal.metrics import ECE

from hf_caldetr.metrics import (
    box_position_features,
    calibration_error,
    detection_ece,
    match_detections,
    position_calibration_error,
    position_detection_ece,
    synthetic_detections,
)


def netcal_d_ece(scores, matched, bins=10):
    return ECE(bins=bins, detection=True).measure(np.asarray(scores, dtype=np.float64), np.asarray(matched))


def test_hand_computed():
    # Bins of 0.1: 0.95 and 0.91 (TP, FP) share bin 9, 0.42 (TP) is alone in bin 4.
    # D-ECE = 2/3 * |0.5 - 0.93| + 1/3 * |1 - 0.42| = (0.86 + 0.58) / 3 = 0.48.
    result = calibration_error([0.95, 0.91, 0.42], [True, False, True])
    assert result["d_ece"] == pytest.approx(0.48, abs=1e-12)
    assert result["bin_counts"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 2]
    assert result["bin_precisions"][9] == 0.5 and result["bin_confidences"][9] == pytest.approx(0.93)
    assert math.isnan(result["bin_precisions"][0])
    assert result["precision"] == pytest.approx(2 / 3) and result["mean_confidence"] == pytest.approx(0.76)
    assert result["bin_edges"] == np.linspace(0, 1, 11).tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_bins", [5, 10, 15, 20])
def test_random_sets_equal_netcal(seed, num_bins):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, 500)
    matched = rng.uniform(0, 1, 500) < scores ** 2
    assert calibration_error(scores, matched, num_bins)["d_ece"] == pytest.approx(
        netcal_d_ece(scores, matched, num_bins), abs=1e-9)


@pytest.mark.parametrize("dtype, expected_counts", [
    # linspace(0, 1, 11)[3] is 0.30000000000000004, so float64 0.3 falls in bin 2; likewise 0.6 -> 5, 0.7 -> 6;
    # 1.0 is clipped to 1 - eps and lands in bin 9.
    (np.float64, [0, 0, 2, 0, 0, 2, 2, 0, 0, 2]),
    # float32 0.3 is 0.3000000119 (bin 3), 0.6 is 0.6000000238 (bin 6), 0.7 is 0.6999999881 (bin 6).
    (np.float32, [0, 0, 0, 2, 0, 0, 4, 0, 0, 2]),
])
def test_scores_on_bin_edges(dtype, expected_counts):
    scores = np.array([0.3, 0.6, 0.7, 1.0, 0.3, 0.6, 0.7, 1.0], dtype=dtype)
    matched = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    result = calibration_error(scores, matched)
    assert result["bin_counts"] == expected_counts
    assert result["d_ece"] == pytest.approx(netcal_d_ece(scores.astype(np.float64), matched), abs=1e-9)


def test_netcal_on_raw_float32_disagrees_and_we_cast_first():
    # On raw float32 input netcal counts a bin with numpy and averages it with scipy, which place values next to
    # an edge (float32 0.9 is 0.89999998) in different bins: it reports 0.37 here. The protocol casts to float64
    # first and gets 0.28 (spec section 4).
    scores = np.array([0.3, 0.6, 0.7, 1.0, 0.3, 0.6, 0.7, 1.0, 0.9, 0.9], dtype=np.float32)
    matched = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    assert netcal_d_ece(scores.astype(np.float64), matched) == pytest.approx(0.28, abs=1e-6)
    assert ECE(bins=10, detection=True).measure(scores, matched) == pytest.approx(0.37, abs=1e-6)
    assert calibration_error(scores, matched)["d_ece"] == pytest.approx(netcal_d_ece(scores.astype(np.float64),
                                                                                     matched), abs=1e-9)


def test_float32_scores_equal_netcal_on_float64_cast():
    rng = np.random.default_rng(11)
    # Round to one decimal so many float32 values sit next to a bin edge.
    scores = np.round(rng.uniform(0, 1, 400), 1).astype(np.float32)
    matched = rng.uniform(0, 1, 400) < 0.5
    assert calibration_error(scores, matched)["d_ece"] == pytest.approx(
        netcal_d_ece(scores.astype(np.float64), matched), abs=1e-9)
    assert calibration_error(torch.from_numpy(scores), torch.from_numpy(matched))["d_ece"] == pytest.approx(
        calibration_error(scores, matched)["d_ece"], abs=0)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("num_bins, score_threshold, iou_threshold", [(10, 0.3, 0.5), (15, 0.5, 0.75), (20, 0.1, 0.3)])
def test_detection_ece_equals_netcal_on_the_protocol(include, num_bins, score_threshold, iou_threshold):
    # mean_boxes_per_image 1 leaves about a third of the images without ground truth.
    predictions, references, _ = synthetic_detections(num_images=60, mean_boxes_per_image=1.0, seed=5)
    assert sum(len(r["labels"]) == 0 for r in references) > 10
    # The matching itself is checked against a loop oracle in test_metrics_matching.py.
    matches = match_detections(predictions, references, score_threshold, iou_threshold, include)
    scores, matched = matches.scores, matches.matched
    result = detection_ece(predictions, references, num_bins, score_threshold, iou_threshold, include)
    assert result["num_detections"] == len(matches) > 0
    assert result["d_ece"] == pytest.approx(netcal_d_ece(scores, matched, num_bins), abs=1e-9)
    assert result["precision"] == pytest.approx(matched.mean(), abs=1e-12)


def test_including_images_without_ground_truth_adds_false_positives():
    predictions, references, _ = synthetic_detections(num_images=60, mean_boxes_per_image=1.0, seed=5)
    excluded = detection_ece(predictions, references)
    included = detection_ece(predictions, references, include_images_without_gt=True)
    assert included["num_detections"] > excluded["num_detections"]
    assert included["precision"] < excluded["precision"]
    assert included["num_images_evaluated"] == 60 > excluded["num_images_evaluated"]


def test_no_detections_give_nan():
    result = detection_ece([{"boxes": [[0, 0, 1, 1]], "scores": [0.1], "labels": [0]}],
                           [{"boxes": [[0, 0, 1, 1]], "labels": [0]}])
    assert result["num_detections"] == 0 and result["bin_counts"] == [0] * 10
    assert all(math.isnan(result[key]) for key in ("d_ece", "precision", "mean_confidence"))
    assert all(math.isnan(value) for value in result["bin_precisions"])
    assert math.isnan(detection_ece([], [])["d_ece"])


@pytest.mark.parametrize("scores, matched, num_bins, message", [
    ([0.5, float("nan")], [1, 0], 10, "scores contains NaN"),
    ([0.5, 1.2], [1, 0], 10, r"scores must lie in \[0, 1\]"),
    ([0.5], [1, 0], 10, "1 scores but 2 matched"),
    ([0.5, 0.6], [1, 2], 10, "matched must be boolean"),
    ([[0.5, 0.6]], [1, 0], 10, "scores must be one-dimensional"),
    ([0.5], [1], 0, "num_bins must be a positive integer"),
    ([0.5], [1], 2.5, "num_bins must be a positive integer"),
])
def test_calibration_error_bad_input(scores, matched, num_bins, message):
    with pytest.raises(ValueError, match=message):
        calibration_error(scores, matched, num_bins)


def test_box_position_features_hand_computed():
    features = box_position_features([[10.0, 20.0, 30.0, 60.0]], [[100.0, 50.0]])  # (height, width)
    assert features.tolist() == [[0.4, 0.4, 0.4, 0.4]]


@pytest.mark.parametrize("num_bins", [3, 5, [4, 2, 3, 2, 5]])
def test_position_d_ece_equals_netcal(num_bins):
    predictions, references, sizes = synthetic_detections(num_images=80, seed=9)
    matches = match_detections(predictions, references)
    features = box_position_features(matches.boxes, sizes[matches.image_index])
    bins = num_bins if isinstance(num_bins, list) else [num_bins] * 5
    expected = ECE(bins=bins, detection=True).measure(np.column_stack([matches.scores, features]), matches.matched)
    result = position_detection_ece(predictions, references, sizes, num_bins=num_bins)
    assert result["d_ece"] == pytest.approx(expected, abs=1e-9)
    assert result["num_detections"] == len(matches) and result["num_bins"] == bins


def test_position_d_ece_hand_computed():
    # Same confidence bin, different position bins: each detection is alone, so the gap is per detection.
    # Two bins per feature: centre 0.25 vs 0.75 separates them. D-ECE = (|1 - 0.8| + |0 - 0.8|) / 2 = 0.5.
    features = [[0.25, 0.5, 0.1, 0.1], [0.75, 0.5, 0.1, 0.1]]
    result = position_calibration_error([0.8, 0.8], [True, False], features, num_bins=2)
    assert result["d_ece"] == pytest.approx(0.5) and result["num_occupied_bins"] == 2
    # With one position bin they share a bin: |0.5 - 0.8| = 0.3, the plain D-ECE.
    assert position_calibration_error([0.8, 0.8], [True, False], features, num_bins=[2, 1, 1, 1, 1])["d_ece"] \
        == pytest.approx(0.3)


def test_position_d_ece_bad_input():
    with pytest.raises(ValueError, match="one count per feature"):
        position_calibration_error([0.5], [True], [[0.5] * 4], num_bins=[5, 5])
    with pytest.raises(ValueError, match=r"box_features must have shape \[1, 4\]"):
        position_calibration_error([0.5], [True], [[0.5] * 3])
    with pytest.raises(ValueError, match="image_sizes covers 2 images but predictions cover 1"):
        position_detection_ece([{"boxes": [], "scores": [], "labels": []}], [{"boxes": [], "labels": []}],
                               [[10, 10], [10, 10]])
    with pytest.raises(ValueError, match="image_sizes must be positive"):
        position_detection_ece([{"boxes": [], "scores": [], "labels": []}], [{"boxes": [], "labels": []}], [[0, 10]])


def test_image_sizes_as_a_list_of_tensors():
    # transformers' labels carry one ``orig_size`` tensor per image.
    predictions, references, sizes = synthetic_detections(num_images=10, seed=2)
    as_tensors = [torch.as_tensor(size) for size in sizes]
    assert position_detection_ece(predictions, references, as_tensors) == \
        position_detection_ece(predictions, references, sizes)
    with pytest.raises(ValueError, match=r"image_sizes\[1\] must be \(height, width\)"):
        position_detection_ece(predictions[:2], references[:2], [torch.tensor([480, 640]), torch.tensor([480])])
