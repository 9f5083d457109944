"""LaECE, LRP, oLRP, LRP-optimal thresholds, LaECE_0 and LaACE_0 against the numbers the official code gives on the
reference problems of ``shared/calibration_oracles`` (its README names repository, commit and function of each),
to 1e-9; hand-computed cases for the conventions; and both sides of every deliberate departure."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import PROBLEMS, assert_close, load_problem, needs_oracles

from hf_caldetr.metrics import (
    apply_class_thresholds,
    calibration_errors_at_iou_0,
    localisation_aware_calibration_error,
    lrp_error,
    lrp_optimal_thresholds,
    match_detections,
    optimal_lrp,
)

pytestmark = needs_oracles
LRP_KEYS = ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")


@pytest.fixture(scope="module", params=PROBLEMS, ids=lambda n: f"p{n:02d}")
def problem(request):
    return request.param, *load_problem(request.param)


@pytest.mark.parametrize("tau", ["0.5", "0.1"])
def test_saod_laece_and_fixed_threshold_lrp(problem, tau):
    number, predictions, references, categories, official, _ = problem
    expected = official["saod_laece_and_lrp_score_ge_0.3"][f"tau_{tau}"]
    laece = localisation_aware_calibration_error(predictions, references, categories, iou_threshold=float(tau))
    assert_close(laece["laece"], expected["laece"], f"p{number} LaECE")
    lrp = lrp_error(predictions, references, categories, iou_threshold=float(tau))
    for key in LRP_KEYS:
        assert_close(lrp[key], expected[key], f"p{number} {key}")
    for class_id, values in expected["per_class"].items():
        cls = int(class_id)
        assert_close(laece["laece_per_class"][cls], values["laece"], f"p{number} class {cls} LaECE")
        for key in LRP_KEYS:
            assert_close(lrp["per_class"][cls][key], values[key], f"p{number} class {cls} {key}")
        if "num_tp" in values:  # absent for classes the official code never fills
            assert lrp["per_class"][cls]["num_tp"] == values["num_tp"]
            assert lrp["per_class"][cls]["num_fp"] == values["num_fp"]
            assert lrp["per_class"][cls]["num_gt"] == values["num_gt"]
        if "nonempty_bins" in values:  # tau 0.5: the official per-bin table
            bins = laece["per_class_bins"][cls]
            occupied = [k for k, count in enumerate(bins["counts"]) if count]
            assert occupied == [row[0] for row in values["nonempty_bins"]]
            for index, count, weight, prec_iou, error in values["nonempty_bins"]:
                assert bins["counts"][index] == count
                assert_close(bins["prec_iou"][index], prec_iou, f"p{number} class {cls} bin {index} prec_iou")
                assert_close(abs(bins["prec_iou"][index] - bins["confidence"][index]), error, "bin error")
                assert_close(count / values["num_detections_evaluated"], weight, "bin weight")
            assert values["num_detections_evaluated"] - sum(bins["counts"]) == values["num_detections_in_no_bin"]


def test_olrp_components_and_lrp_optimal_thresholds(problem):
    number, predictions, references, categories, official, _ = problem
    expected = official["lrp_error_olrp_all_detections"]
    result = optimal_lrp(predictions, references, categories)
    for key in ("olrp", "olrp_loc", "olrp_fp", "olrp_fn"):
        assert_close(result[key], expected[key], f"p{number} {key}")
    for class_id, values in expected["per_class"].items():
        cls = int(class_id)
        for key in ("olrp", "olrp_loc", "olrp_fp", "olrp_fn", "lrp_optimal_threshold"):
            assert_close(result["per_class"][cls][key], values[key], f"p{number} class {cls} {key}")
        assert_close(result["thresholds"][cls], values["lrp_optimal_threshold"], "threshold")


def test_lrp_when_keeping_scores_at_or_above_the_optimal_threshold(problem):
    # The README's extra field: the LRP at IoU 0.5 of each class's detections with score >= its threshold. It
    # differs from oLRP only when the optimum falls inside a group of equal scores (problem 5, class 0).
    number, predictions, references, categories, official, _ = problem
    expected = official["lrp_error_olrp_all_detections"]["per_class"]
    thresholds = optimal_lrp(predictions, references, categories)["thresholds"]
    kept = lrp_error(predictions, references, categories, iou_threshold=0.5, score_threshold=0.0,
                     thresholds=thresholds)
    for class_id, values in expected.items():
        actual = kept["per_class"][int(class_id)]["lrp"]
        reference = values["lrp_keeping_scores_ge_threshold"]
        if reference == -1:  # the official "absent" value of a class without ground truth; ours is NaN
            assert np.isnan(actual)
        else:
            assert_close(actual, reference, f"p{number} class {class_id} LRP at the threshold")


@pytest.mark.parametrize("variant", ["default_lrp_optimal_thresholds", "fixed_threshold_0.3"])
def test_detection_calibration_laece_0_laace_0_and_lrp_at_iou_0(problem, variant):
    number, predictions, references, categories, official, _ = problem
    expected = official["detection_calibration"][variant]
    if variant == "fixed_threshold_0.3":
        result = calibration_errors_at_iou_0(predictions, references, categories, score_threshold=0.3)
    else:  # the validation split is the problem itself, as the official numbers were produced
        thresholds = lrp_optimal_thresholds(predictions, references, categories)
        result = calibration_errors_at_iou_0(predictions, references, categories, thresholds=thresholds)
    for key, official_key in (("laece_0", "laece_0"), ("laace_0", "laace_0"), ("lrp", "lrp_tau0"),
                              ("lrp_loc", "lrp_loc_tau0"), ("lrp_fp", "lrp_fp_tau0"), ("lrp_fn", "lrp_fn_tau0")):
        assert_close(result[key], expected[official_key], f"p{number} {variant} {key}")
    for class_id, values in expected["per_class"].items():
        cls = int(class_id)
        assert_close(result["laece_0_per_class"][cls], values["laece_0"], f"p{number} class {cls} LaECE_0")
        assert_close(result["laace_0_per_class"][cls], values["laace_0"], f"p{number} class {cls} LaACE_0")
        lrp = result["lrp_per_class"][cls]
        for key in LRP_KEYS:
            assert_close(lrp[key], values[f"{key}_tau0"], f"p{number} class {cls} {key} at tau 0")
        if "num_tp_tau0" in values:
            assert lrp["num_tp"] == values["num_tp_tau0"] and lrp["num_fp"] == values["num_fp_tau0"]
            assert lrp["num_tp"] + lrp["num_fp"] == values["num_detections_evaluated"]
        if variant == "default_lrp_optimal_thresholds":
            assert_close(thresholds[cls], values["pre_calibration_threshold"], f"class {cls} threshold")


def test_exact_geometry_image_matches_as_the_official_code(problem):
    # Hand-built image: an IoU of exactly 0.5 matches; D3 (IoU 0.6 with G3 and G4) takes the later box G4; of two
    # equal scores the first listed takes G5 and the second is a false positive though its IoU is higher.
    number, predictions, references, categories, official, inputs = problem
    expected = official.get("exact_geometry_image_matching")
    if expected is None:
        pytest.skip(f"problem {number} has no hand-built image")
    image_ids = [image["id"] for image in inputs["images"]]
    image = image_ids.index(expected["image_id"])
    first_detection = sum(len(p["scores"]) for p in predictions[:image])
    first_box = sum(len(r["labels"]) for r in references[:image])
    for tau in ("0.5", "0.1"):
        matches = match_detections([predictions[image]], [references[image]], iou_threshold=float(tau),
                                   max_detections_per_class=100)
        outcome = {int(index): (int(box), float(iou)) for index, box, iou in
                   zip(matches.detection_index, matches.matched_reference, matches.ious)}
        for row in expected[f"saod_tau_{tau}"]:
            box, iou = outcome[row["detection_index"] - first_detection]
            official_box = row["matched_gt_id"] - 1 - first_box if row["matched_gt_id"] else -1
            assert (box, iou) == (official_box, row["iou_with_matched_gt"])


# ------------------------------------------------------------------ conventions, by hand

SQUARE = [0.0, 0.0, 10.0, 10.0]


def one_image(boxes, scores, labels, gt_boxes, gt_labels):
    return ([{"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": scores, "labels": labels}],
            [{"boxes": np.asarray(gt_boxes, float).reshape(-1, 4), "labels": gt_labels}])


def test_laece_by_hand_and_the_empty_class_rule():
    # Class 0: a TP with IoU 0.5 at score 0.9 (bin [0.88, 0.92)) and an FP at 0.5 (bin [0.48, 0.52)):
    # LaECE_0 = 1/2 |0.5 - 0.9| + 1/2 |0 - 0.5| = 0.45. Class 1 has ground truth but no detection, class 2
    # nothing: official mean over the 3 categories = 0.15; excluding classes with nothing to calibrate = 0.45.
    predictions, references = one_image([[0, 0, 5, 10], [20, 20, 30, 30]], [0.9, 0.5], [0, 0],
                                        [SQUARE, SQUARE], [0, 1])
    official = localisation_aware_calibration_error(predictions, references, [0, 1, 2])
    assert official["laece_per_class"] == pytest.approx({0: 0.45, 1: 0.0, 2: 0.0}, abs=1e-15)
    assert official["laece"] == pytest.approx(0.15, abs=1e-15)
    excluded = localisation_aware_calibration_error(predictions, references, [0, 1, 2], empty_classes="exclude")
    assert excluded["laece"] == pytest.approx(0.45, abs=1e-15) and excluded["num_classes_averaged"] == 1


def test_a_score_of_one_is_in_no_bin_officially_and_in_the_last_bin_as_an_option():
    # A perfect detection (IoU 1) at score 1.0 and an FP at 0.3. Official: the 1.0 is in no bin but counts in the
    # total, so LaECE = 1/2 |0 - 0.3| = 0.15, though the 1.0 detection is perfectly calibrated. Last bin: the 1.0
    # adds 1/2 |1 - 1| = 0, same value here; with IoU 0.5 instead it adds 1/2 |0.5 - 1| = 0.25 (official: still
    # 0.15, the error of that detection is invisible).
    for iou_box, last_bin_value in (([0, 0, 10, 10], 0.15), ([0, 0, 5, 10], 0.15 + 0.25)):
        predictions, references = one_image([iou_box, [20, 20, 30, 30]], [1.0, 0.3], [0, 0], [SQUARE], [0])
        official = localisation_aware_calibration_error(predictions, references, 1)
        assert official["laece"] == pytest.approx(0.15, abs=1e-15)
        last_bin = localisation_aware_calibration_error(predictions, references, 1, score_one="last_bin")
        assert last_bin["laece"] == pytest.approx(last_bin_value, abs=1e-15)


def test_lrp_by_hand():
    # Class 0, 2 boxes: a TP with IoU 0.75 (score 0.9), an FP (0.8), a TP with IoU 1 (0.4). At tau 0.5 and the
    # 0.3 cut: LRP = (0.25 / 0.5 + 1 + 0) / 3 = 0.5; loc = 0.25 / 2; FP = 1/3; FN = 0. oLRP: prefixes give
    # (0.5 + 0 + 1) / 2 = 0.75, (0.5 + 1 + 1) / 3 = 0.8333, (0.5 + 1 + 0) / 3 = 0.5 -> 0.5 at threshold 0.4.
    predictions, references = one_image([[0, 0, 7.5, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [0.9, 0.8, 0.4],
                                        [0, 0, 0], [SQUARE, [20, 0, 30, 10]], [0, 0])
    fixed = lrp_error(predictions, references, 1)
    assert (fixed["lrp"], fixed["lrp_loc"], fixed["lrp_fp"], fixed["lrp_fn"]) == pytest.approx((0.5, 0.125, 1 / 3, 0))
    best = optimal_lrp(predictions, references, 1)
    assert best["olrp"] == pytest.approx(0.5) and best["thresholds"] == {0: 0.4}
    # Raising the cut to 0.85 leaves one TP: (0.5 + 0 + 1) / 2.
    assert lrp_error(predictions, references, 1, score_threshold=0.85)["lrp"] == pytest.approx(0.75)


def test_lrp_sentinels_for_classes_without_ground_truth_or_true_positives():
    # Class 0: ground truth, only a far-away FP. Class 1: an FP, no ground truth. Class 2: nothing.
    predictions, references = one_image([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 1], [SQUARE], [0])
    fixed = lrp_error(predictions, references, 3)
    assert fixed["per_class"][0]["lrp"] == 1.0 and fixed["per_class"][0]["lrp_fn"] == 1.0
    assert np.isnan(fixed["per_class"][0]["lrp_loc"]) and np.isnan(fixed["per_class"][0]["lrp_fp"])
    assert all(np.isnan(fixed["per_class"][1][key]) for key in LRP_KEYS)
    assert fixed["lrp"] == 1.0 and np.isnan(fixed["lrp_loc"])
    best = optimal_lrp(predictions, references, 3)
    assert best["per_class"][0]["olrp"] == 1.0 and np.isnan(best["thresholds"][0])
    assert best["thresholds"][1] == -1.0 and best["thresholds"][2] == -1.0


def test_class_thresholds_keep_scores_at_the_threshold_and_nan_keeps_everything():
    predictions = [{"boxes": np.zeros((4, 4)), "scores": [0.5, 0.49, 0.1, 0.05], "labels": [0, 0, 1, 2],
                    "uncertainties": [0.1, 0.2, 0.3, 0.4]}]
    kept = apply_class_thresholds(predictions, {0: 0.5, 1: float("nan"), 2: -1.0})
    assert kept[0]["scores"].tolist() == [0.5, 0.1, 0.05]
    assert kept[0]["uncertainties"].tolist() == [0.1, 0.3, 0.4]
    with pytest.raises(ValueError, match="no value for class id"):
        apply_class_thresholds(predictions, {0: 0.5, 1: 0.2}, categories=3)


def test_categories_must_cover_every_class_and_are_never_guessed():
    predictions, references = one_image([SQUARE], [0.9], [5], [SQUARE], [5])
    with pytest.raises(ValueError, match=r"class id\(s\) \[5\] that are not in the dataset's categories"):
        localisation_aware_calibration_error(predictions, references, 3)
    with pytest.raises(ValueError, match="categories lists a class id twice"):
        optimal_lrp(predictions, references, [5, 5])
    assert localisation_aware_calibration_error(predictions, references, {5: "five"})["laece"] == pytest.approx(0.1)


def test_crowd_regions_are_ignored_by_laece_and_lrp():
    # A perfect detection, and one inside a crowd region of the same class: the latter is neither TP nor FP.
    predictions = [{"boxes": np.array([SQUARE, [110.0, 110, 120, 120]]), "scores": [1.0 - 1e-9, 0.8],
                    "labels": [0, 0]}]
    references = [{"boxes": np.array([SQUARE, [100.0, 100, 200, 200]]), "labels": [0, 0], "iscrowd": [0, 1]}]
    lrp = lrp_error(predictions, references, 1)
    assert lrp["lrp"] == pytest.approx(0.0) and lrp["per_class"][0]["num_fp"] == 0
    assert lrp["per_class"][0]["num_gt"] == 1
    assert localisation_aware_calibration_error(predictions, references, 1)["laece"] == pytest.approx(1e-9)


def test_laece_diagram_bins_by_hand(tmp_path):
    # Class 0: a TP with IoU 0.5 at 0.9 and an FP at 0.5; class 1: a TP with IoU 1 at 0.95. Pooled 25-bin table:
    # [0.48, 0.52): 1 detection, IoU-weighted precision 0, confidence 0.5; [0.88, 0.92): 1, 0.5, 0.9;
    # [0.92, 0.96): 1, 1.0, 0.95. The panel's value is LaECE itself: class 0 = (0.5 + 0.4) / 2 = 0.45, class 1 =
    # 0.05, mean 0.25.
    from hf_caldetr.metrics import evaluate_detections, plot_laece_diagram

    predictions = [{"boxes": np.array([[0, 0, 5, 10], [50, 50, 60, 60], [20, 0, 30, 10]], float),
                    "scores": [0.9, 0.5, 0.95], "labels": [0, 0, 1]}]
    references = [{"boxes": np.array([SQUARE, [20, 0, 30, 10]], float), "labels": [0, 1]}]
    result = evaluate_detections(predictions, references, categories=2, compute_ap=False)
    bins = result["laece_calibration"]
    occupied = {k: (bins["bin_counts"][k], bins["bin_precisions"][k], bins["bin_confidences"][k])
                for k in range(25) if bins["bin_counts"][k]}
    assert occupied == {12: (1, 0.0, 0.5), 22: (1, 0.5, 0.9), 23: (1, 1.0, 0.95)}
    assert bins["d_ece"] == result["laece"] == pytest.approx(0.25)
    path = plot_laece_diagram([result, result], tmp_path / "laece.png", titles=["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
