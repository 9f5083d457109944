"""D-UCE: hand-computed values."""

import math

import pytest

from hf_caldetr.metrics import detection_uce, uncertainty_calibration_error


def test_hand_computed():
    # Bin 0: u 0.05 (TP) and 0.08 (FP): error rate 0.5, mean u 0.065 -> 0.435, weight 2/4.
    # Bin 5: u 0.5 (FP): |1 - 0.5| = 0.5, weight 1/4. Bin 9: u 0.95 (FP): |1 - 0.95| = 0.05, weight 1/4.
    result = uncertainty_calibration_error([0.05, 0.08, 0.5, 0.95], [True, False, False, False])
    assert result["d_uce"] == pytest.approx(0.5 * 0.435 + 0.25 * 0.5 + 0.25 * 0.05)
    assert result["bin_counts"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert result["bin_error_rates"][0] == 0.5 and result["bin_uncertainties"][0] == pytest.approx(0.065)
    assert result["error_rate"] == 0.75 and result["mean_uncertainty"] == pytest.approx(0.395)


def test_detection_uce_keeps_uncertainties_with_their_detections():
    # Listed out of score order: matching sorts by score, and each uncertainty must follow its detection.
    # The 0.9 detection (u 0.1) is the TP, the 0.95 one of another class (u 0.7) a FP, 0.2 is dropped.
    predictions = [{"boxes": [[0, 0, 10, 10]] * 3, "scores": [0.2, 0.9, 0.95], "labels": [1, 1, 2],
                    "uncertainties": [0.99, 0.1, 0.7]}]
    references = [{"boxes": [[0, 0, 10, 10]], "labels": [1]}]
    result = detection_uce(predictions, references, num_bins=2)
    # Bin 0: u 0.1, TP: |0 - 0.1|; bin 1: u 0.7, FP: |1 - 0.7|. D-UCE = (0.1 + 0.3) / 2.
    assert result["d_uce"] == pytest.approx(0.2)
    assert result["bin_counts"] == [1, 1]


def test_no_detections_give_nan():
    assert math.isnan(uncertainty_calibration_error([], [])["d_uce"])


@pytest.mark.parametrize("uncertainties, message", [
    ([0.5, 1.0], r"uncertainties must lie in \[0, 1\)"),
    ([-0.1, 0.5], r"uncertainties must lie in \[0, 1\)"),
    ([float("nan"), 0.5], "uncertainties contains NaN"),
])
def test_bad_uncertainties(uncertainties, message):
    with pytest.raises(ValueError, match=message):
        uncertainty_calibration_error(uncertainties, [True, False])


def test_missing_uncertainty_key():
    with pytest.raises(ValueError, match=r"predictions\[0\] is missing 'uncertainties'"):
        detection_uce([{"boxes": [], "scores": [], "labels": []}], [{"boxes": [], "labels": []}])
