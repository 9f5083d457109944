"""OCE (Park et al. 2024): the official uq_detr numbers, hand-computed cases and a loop oracle."""

import json
import math

import numpy as np
import pytest
import torch
from oracles import ORACLES  # the shared folder, or the project's copy

from hf_caldetr.metrics import oce as oce_module
from hf_caldetr.metrics import synthetic_detections
from hf_caldetr.metrics.oce import object_calibration_error

PROBLEMS = [f"p{number:02d}" for number in range(1, 9)]
DETECTION_SETS = ["score_ge_0.3", "all_detections"]
VARIANTS = [(aggregation, thresholds) for aggregation in ("mean", "max_iou", "iou_weighted")
            for thresholds in ([0.5, 0.75], [0.5], [0.75])]

needs_oracles = pytest.mark.skipif(
    not (ORACLES / "p01_official.json").is_file(),
    reason=f"official OCE reference values not found in {ORACLES} (the shared calibration_oracles folder)")

_cache = {}


def load_problem(problem: str):
    """``(predictions for each detection set, references, GT ids in flattened order, official oce_uq_detr)``."""
    if problem not in _cache:
        inputs = json.loads((ORACLES / f"{problem}_inputs.json").read_text())
        official = json.loads((ORACLES / f"{problem}_official.json").read_text())["oce_uq_detr"]
        position = {image["id"]: index for index, image in enumerate(inputs["images"])}

        def per_image(entries, keys):
            images = [{key: [] for key in keys} for _ in position]
            for entry in entries:
                image = images[position[entry["image_id"]]]
                image["boxes"].append(entry["bbox"])
                image["labels"].append(entry["category_id"])
                if "scores" in keys:
                    image["scores"].append(entry["score"])
            return [{key: np.asarray(value, dtype=np.float64 if key != "labels" else np.int64).reshape(
                (-1, 4) if key == "boxes" else (-1,)) for key, value in image.items()} for image in images]

        detections = inputs["detections"]
        predictions = {
            "score_ge_0.3": per_image([d for d in detections if d["score"] >= 0.3], ("boxes", "scores", "labels")),
            "all_detections": per_image(detections, ("boxes", "scores", "labels")),
        }
        references = per_image(inputs["ground_truths"], ("boxes", "labels"))
        gt_ids = [gt["id"] for gt in sorted(inputs["ground_truths"], key=lambda gt: position[gt["image_id"]])]
        _cache[problem] = predictions, references, gt_ids, official
    return _cache[problem]


@needs_oracles
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("detection_set", DETECTION_SETS)
@pytest.mark.parametrize("aggregation, thresholds", VARIANTS)
def test_official_values(problem, detection_set, aggregation, thresholds):
    predictions, references, _, official = load_problem(problem)
    expected = official[detection_set][f"aggregation={aggregation},iou_thresholds={thresholds}"]
    result = object_calibration_error(predictions[detection_set], references, thresholds, aggregation)
    assert result["oce"] == pytest.approx(expected, rel=0, abs=1e-9)
    assert result["num_objects"] == len(result["per_object_brier"]) > 0


@needs_oracles
@pytest.mark.parametrize("problem", PROBLEMS)
def test_official_per_object_brier(problem):
    predictions, references, gt_ids, official = load_problem(problem)
    result = object_calibration_error(predictions["score_ge_0.3"], references)
    expected = official["score_ge_0.3"]["per_gt_brier_default"]
    assert sorted(map(int, expected)) == sorted(gt_ids)
    actual = dict(zip(gt_ids, result["per_object_brier"]))
    for gt_id, value in expected.items():
        assert actual[int(gt_id)] == pytest.approx(value, rel=0, abs=1e-9), f"GT {gt_id}"
    # OCE is the mean over objects of the per-object values (averaged over the thresholds).
    assert result["oce"] == pytest.approx(np.mean(result["per_object_brier"]), abs=1e-12)


@needs_oracles
@pytest.mark.parametrize("problem", ["p02", "p05"])
def test_score_threshold_equals_cutting_first(problem):
    predictions, references, _, official = load_problem(problem)
    result = object_calibration_error(predictions["all_detections"], references, score_threshold=0.3)
    expected = official["score_ge_0.3"]["aggregation=mean,iou_thresholds=[0.5, 0.75]"]
    assert result["oce"] == pytest.approx(expected, rel=0, abs=1e-9)
    assert result["num_detections"] == sum(len(p["scores"]) for p in predictions["score_ge_0.3"])


@needs_oracles
@pytest.mark.parametrize("aggregation", ["mean", "max_iou", "iou_weighted"])
def test_torch_inputs_equal_numpy(aggregation):
    predictions, references, _, _ = load_problem("p07")
    predictions = predictions["all_detections"]
    as_torch = [{key: torch.as_tensor(value, dtype=torch.float32 if key == "scores" else None)
                 for key, value in entry.items()} for entry in predictions]
    # float32 scores are widened exactly; compare with the same float32-rounded scores in numpy.
    as_numpy = [{**entry, "scores": entry["scores"].astype(np.float32)} for entry in predictions]
    torch_refs = [{key: torch.as_tensor(value) for key, value in entry.items()} for entry in references]
    expected = object_calibration_error(as_numpy, references, aggregation=aggregation)
    actual = object_calibration_error(as_torch, torch_refs, aggregation=aggregation)
    assert actual["oce"] == expected["oce"]
    assert actual["per_object_brier"] == expected["per_object_brier"]
    float64 = [{key: torch.as_tensor(value) for key, value in entry.items()} for entry in predictions]
    assert object_calibration_error(float64, torch_refs, aggregation=aggregation)["oce"] == \
        object_calibration_error(predictions, references, aggregation=aggregation)["oce"]


@needs_oracles
def test_small_chunks_give_the_same_result(monkeypatch):
    predictions, references, _, _ = load_problem("p05")
    expected = object_calibration_error(predictions["all_detections"], references)
    monkeypatch.setattr(oce_module, "_MAX_PAIRS_PER_CHUNK", 7)
    actual = object_calibration_error(predictions["all_detections"], references)
    assert actual["per_object_brier"] == expected["per_object_brier"]


# One GT [0, 0, 10, 10] (area 100) and two detections of different classes overlapping it:
#   A = [0, 0, 10, 8], class 1, score 0.9: IoU 80 / 100 = 0.8
#   B = [0, 0, 10, 6], class 2, score 0.6: IoU 60 / 100 = 0.6
TWO_DETECTIONS = {"boxes": [[0, 0, 10, 8], [0, 0, 10, 6]], "scores": [0.9, 0.6], "labels": [1, 2]}
ONE_GT = [[0, 0, 10, 10]]


@pytest.mark.parametrize("gt_class, aggregation, expected", [
    # mean: p = (0.9 + 0.6) / 2 = 0.75; the vote is a tie 1:1, won by the smallest class, 1.
    (1, "mean", 2 * 0.25 ** 2),  # = 0.125, right class
    (2, "mean", 2 * 0.75 ** 2),  # = 1.125, wrong class (2 loses the tie)
    # max_iou: A (IoU 0.8), p = 0.9, class 1.
    (1, "max_iou", 2 * 0.1 ** 2),  # = 0.02
    (2, "max_iou", 2 * 0.9 ** 2),  # = 1.62
    # iou_weighted: p = (0.8 * 0.9 + 0.6 * 0.6) / (0.8 + 0.6) = 1.08 / 1.4 = 27 / 35; class of A, 1.
    (1, "iou_weighted", 2 * (8 / 35) ** 2),  # = 128 / 1225 = 0.104489...
    (2, "iou_weighted", 2 * (27 / 35) ** 2),  # = 1458 / 1225 = 1.190204...
])
def test_two_overlapping_detections_by_hand(gt_class, aggregation, expected):
    references = [{"boxes": ONE_GT, "labels": [gt_class]}]
    result = object_calibration_error([TWO_DETECTIONS], references, [0.5], aggregation)
    assert result["oce"] == pytest.approx(expected, abs=1e-12)
    assert result["per_object_brier"] == pytest.approx([expected], abs=1e-12)
    # At tau 0.75 only A (IoU 0.8) is gathered, whatever the aggregation: p = 0.9, class 1.
    at_075 = 2 * 0.1 ** 2 if gt_class == 1 else 2 * 0.9 ** 2
    both = object_calibration_error([TWO_DETECTIONS], references, (0.5, 0.75), aggregation)
    assert both["oce_per_threshold"] == pytest.approx({0.5: expected, 0.75: at_075}, abs=1e-12)
    assert both["oce"] == pytest.approx((expected + at_075) / 2, abs=1e-12)


def test_majority_vote():
    # Three detections over the GT: classes 2, 1, 2 -> the vote is 2 (2 votes to 1) although class 1 is smaller.
    # p = (0.9 + 0.6 + 0.3) / 3 = 0.6; GT class 2: Brier 2 * 0.4^2 = 0.32.
    predictions = [{"boxes": [[0, 0, 10, 8], [0, 0, 10, 9], [0, 0, 10, 7]], "scores": [0.9, 0.6, 0.3],
                    "labels": [2, 1, 2]}]
    result = object_calibration_error(predictions, [{"boxes": ONE_GT, "labels": [2]}], [0.5])
    assert result["oce"] == pytest.approx(0.32, abs=1e-12)


def test_max_iou_takes_the_first_on_ties():
    # Both detections have IoU 0.8 (mirror images); the first one listed (score 0.7, class 1) decides:
    # GT class 1: 2 * 0.3^2 = 0.18 (the second, class 3, would give 2 * 0.2^2 = 0.08).
    predictions = [{"boxes": [[0, 0, 10, 8], [0, 2, 10, 10]], "scores": [0.7, 0.2], "labels": [1, 3]}]
    result = object_calibration_error(predictions, [{"boxes": ONE_GT, "labels": [1]}], [0.5], "max_iou")
    assert result["oce"] == pytest.approx(0.18, abs=1e-12)


def test_unmatched_gt_scores_one_and_images_without_gt_are_skipped():
    # Image 0: GT class 1 with A and B (mean, tau 0.5: 0.125) and a second GT far from every detection: 1.0.
    # Image 1: no GT, a confident wrong detection: skipped. Image 2: no GT, no detections.
    predictions = [TWO_DETECTIONS,
                   {"boxes": [[0, 0, 10, 10]], "scores": [0.99], "labels": [5]},
                   {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    references = [{"boxes": ONE_GT + [[50, 50, 60, 60]], "labels": [1, 1]},
                  {"boxes": np.zeros((0, 4)), "labels": []},
                  {"boxes": [], "labels": []}]
    result = object_calibration_error(predictions, references, [0.5])
    assert result["per_object_brier"] == pytest.approx([0.125, 1.0], abs=1e-12)
    assert result["oce"] == pytest.approx((0.125 + 1.0) / 2, abs=1e-12)
    assert result["num_objects"] == 2
    assert result["num_images"] == 3 and result["num_images_evaluated"] == 1


def test_not_one_to_one_and_class_agnostic():
    # One detection [0, 0, 10, 10] (class 7, score 0.8) covers two identical GTs of classes 7 and 3: it serves
    # both. GT class 7: 2 * 0.2^2 = 0.08; GT class 3 (other class, still gathered): 2 * 0.8^2 = 1.28.
    predictions = [{"boxes": [[0, 0, 10, 10]], "scores": [0.8], "labels": [7]}]
    references = [{"boxes": [[0, 0, 10, 10], [0, 0, 10, 10]], "labels": [7, 3]}]
    result = object_calibration_error(predictions, references, [0.5, 0.75], "max_iou")
    assert result["per_object_brier"] == pytest.approx([0.08, 1.28], abs=1e-12)


def test_iou_exactly_075_matches():
    # The hand-built image's G2 / D2: GT [200, 40, 300, 140], detection [200, 40, 275, 140], IoU 7500 / 10000
    # = 0.75 exactly in float64. Score 0.8, right class: Brier 2 * 0.2^2 = 0.08 at 0.75, 1.0 just above it.
    predictions = [{"boxes": [[200, 40, 275, 140]], "scores": [0.8], "labels": [3]}]
    references = [{"boxes": [[200, 40, 300, 140]], "labels": [3]}]
    assert object_calibration_error(predictions, references, [0.75])["oce"] == pytest.approx(0.08, abs=1e-12)
    assert object_calibration_error(predictions, references, [0.75 + 1e-12])["oce"] == 1.0
    assert object_calibration_error(predictions, references, 0.75)["oce"] == pytest.approx(0.08, abs=1e-12)


def test_score_threshold_cuts_before_aggregation():
    # score >= 0.7 keeps only A: p = 0.9, class 1, Brier 0.02 (mean, tau 0.5); a score equal to it is kept.
    references = [{"boxes": ONE_GT, "labels": [1]}]
    result = object_calibration_error([TWO_DETECTIONS], references, [0.5], score_threshold=0.7)
    assert result["oce"] == pytest.approx(0.02, abs=1e-12)
    assert result["num_detections"] == 1
    result = object_calibration_error([TWO_DETECTIONS], references, [0.5], score_threshold=0.6)
    assert result["oce"] == pytest.approx(0.125, abs=1e-12)


def test_crowd_boxes_are_not_objects():
    # The second box is crowd: not an object (NaN in per_object_brier, not counted); the first as above.
    references = [{"boxes": ONE_GT + [[0, 0, 10, 8]], "labels": [1, 2], "iscrowd": torch.tensor([0, 1])}]
    result = object_calibration_error([TWO_DETECTIONS], references, [0.5])
    assert result["num_objects"] == 1
    assert result["per_object_brier"][0] == pytest.approx(0.125, abs=1e-12)
    assert math.isnan(result["per_object_brier"][1])
    assert result["oce"] == pytest.approx(0.125, abs=1e-12)
    # Only crowd boxes: no objects at all.
    only_crowd = [{"boxes": ONE_GT, "labels": [1], "iscrowd": [1]}]
    assert math.isnan(object_calibration_error([TWO_DETECTIONS], only_crowd)["oce"])
    with pytest.raises(ValueError, match="iscrowd"):
        object_calibration_error([TWO_DETECTIONS], [{"boxes": ONE_GT, "labels": [1], "iscrowd": [0, 1]}])
    with pytest.raises(ValueError, match="0 or 1"):
        object_calibration_error([TWO_DETECTIONS], [{"boxes": ONE_GT, "labels": [1], "iscrowd": [2]}])


def test_no_objects_gives_nan():
    predictions = [TWO_DETECTIONS, {"boxes": [], "scores": [], "labels": []}]
    references = [{"boxes": [], "labels": []}, {"boxes": [], "labels": []}]
    result = object_calibration_error(predictions, references)
    assert math.isnan(result["oce"])
    assert all(math.isnan(value) for value in result["oce_per_threshold"].values())
    assert result["num_objects"] == 0 and result["per_object_brier"] == []
    assert math.isnan(object_calibration_error([], [])["oce"])


def test_no_detections_at_all_scores_one():
    predictions = [{"boxes": [], "scores": [], "labels": []}]
    result = object_calibration_error(predictions, [{"boxes": ONE_GT, "labels": [1]}])
    assert result["oce"] == 1.0 and result["oce_per_threshold"] == {0.5: 1.0, 0.75: 1.0}


# Exact multi-class Brier: the same GT (class 1) and detections with full distributions over 3 classes:
#   A (IoU 0.8): [0.1, 0.7, 0.2];  B (IoU 0.6): [0.2, 0.2, 0.6].
PROBABILITIES = [[0.1, 0.7, 0.2], [0.2, 0.2, 0.6]]


@pytest.mark.parametrize("aggregation, expected", [
    # mean: q = [0.15, 0.45, 0.40]; 0.15^2 + 0.55^2 + 0.40^2 = 0.0225 + 0.3025 + 0.16 = 0.485.
    ("mean", 0.485),
    # max_iou: q = A; 0.1^2 + 0.3^2 + 0.2^2 = 0.01 + 0.09 + 0.04 = 0.14.
    ("max_iou", 0.14),
    # iou_weighted: q = (0.8 A + 0.6 B) / 1.4 = [0.2, 0.68, 0.52] / 1.4 = [5, 17, 13] / 35;
    # (5^2 + 18^2 + 13^2) / 35^2 = (25 + 324 + 169) / 1225 = 518 / 1225 = 0.422857...
    ("iou_weighted", 518 / 1225),
])
def test_multiclass_brier_by_hand(aggregation, expected):
    predictions = [{**TWO_DETECTIONS, "probabilities": np.array(PROBABILITIES)},
                   {"boxes": [], "scores": [], "labels": [], "probabilities": []}]
    # Second image: a GT without detections predicts the all-zero distribution: Brier 1.
    references = [{"boxes": ONE_GT, "labels": [1]}, {"boxes": ONE_GT, "labels": [0]}]
    result = object_calibration_error(predictions, references, [0.5], aggregation)
    assert result["brier"] == "multiclass"
    assert result["per_object_brier"] == pytest.approx([expected, 1.0], abs=1e-12)
    as_torch = [{key: torch.as_tensor(value, dtype=torch.float64) if key != "labels" else torch.as_tensor(value)
                 for key, value in entry.items()} for entry in predictions]
    assert object_calibration_error(as_torch, references, [0.5], aggregation)["per_object_brier"] == \
        pytest.approx([expected, 1.0], abs=1e-15)


@pytest.mark.parametrize("aggregation", ["max_iou", "mean", "iou_weighted"])
def test_two_class_distributions_reduce_to_the_binary_form(aggregation):
    # With [1 - s, s] and label 1 everywhere: sum_c (q_c - onehot_c)^2 = 2 (1 - p)^2 for GT class 1 and
    # 2 p^2 for GT class 0, which is the binary form (the vote / best label is 1).
    predictions, references, _ = synthetic_detections(num_images=20, num_classes=2, seed=3)
    binary = [{"boxes": p["boxes"], "scores": p["scores"].astype(np.float64),
               "labels": np.ones(len(p["scores"]), np.int64)} for p in predictions]
    exact = [{**p, "probabilities": np.column_stack([1 - p["scores"], p["scores"]])} for p in binary]
    expected = object_calibration_error(binary, references, aggregation=aggregation)
    actual = object_calibration_error(exact, references, aggregation=aggregation)
    assert actual["per_object_brier"] == pytest.approx(expected["per_object_brier"], abs=1e-12)


def test_probabilities_are_checked():
    references = [{"boxes": ONE_GT, "labels": [1]}]
    with pytest.raises(ValueError, match="every image or for none"):
        object_calibration_error([{**TWO_DETECTIONS, "probabilities": PROBABILITIES}, TWO_DETECTIONS],
                                 references * 2)
    with pytest.raises(ValueError, match="shape"):
        object_calibration_error([{**TWO_DETECTIONS, "probabilities": [0.1, 0.2]}], references)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        object_calibration_error([{**TWO_DETECTIONS, "probabilities": [[0.1, 1.7, 0.2], [0.2, 0.2, 0.6]]}],
                                 references)
    with pytest.raises(ValueError, match="no column"):
        object_calibration_error([{**TWO_DETECTIONS, "probabilities": PROBABILITIES}],
                                 [{"boxes": ONE_GT, "labels": [3]}])


def loop_oce(predictions, references, thresholds, aggregation, probabilities=False):
    """The conventions written out: per image with GT, per GT, per threshold."""
    per_threshold, per_object = [], []
    for tau in thresholds:
        briers = []
        for prediction, reference in zip(predictions, references):
            for gt_box, gt_label in zip(np.asarray(reference["boxes"]).reshape(-1, 4), reference["labels"]):
                gathered = []
                for k, box in enumerate(np.asarray(prediction["boxes"]).reshape(-1, 4)):
                    iw = min(box[2], gt_box[2]) - max(box[0], gt_box[0])
                    ih = min(box[3], gt_box[3]) - max(box[1], gt_box[1])
                    inter = max(iw, 0) * max(ih, 0)
                    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt_box[2] - gt_box[0]) * (gt_box[3] - gt_box[1])
                    iou = inter / (union - inter) if union - inter > 0 else 0.0
                    if iou >= tau:
                        gathered.append((k, iou))
                if not gathered:
                    briers.append(1.0)
                    continue
                best = max(gathered, key=lambda pair: pair[1])[0]  # first on ties
                ious = np.array([iou for _, iou in gathered])
                if probabilities:
                    rows = np.asarray(prediction["probabilities"])[[k for k, _ in gathered]]
                    q = {"mean": rows.mean(axis=0), "max_iou": np.asarray(prediction["probabilities"])[best],
                         "iou_weighted": (rows * ious[:, None]).sum(axis=0) / ious.sum()}[aggregation]
                    onehot = np.eye(rows.shape[1])[gt_label]
                    briers.append(float(((q - onehot) ** 2).sum()))
                    continue
                all_scores = np.asarray(prediction["scores"], dtype=np.float64)
                scores = all_scores[[k for k, _ in gathered]]
                labels = np.asarray(prediction["labels"])[[k for k, _ in gathered]]
                if aggregation == "mean":
                    p, label = scores.mean(), np.bincount(labels).argmax()
                elif aggregation == "max_iou":
                    p, label = all_scores[best], prediction["labels"][best]
                else:
                    p, label = (scores * ious).sum() / ious.sum(), prediction["labels"][best]
                briers.append(2 * (1 - p) ** 2 if label == gt_label else 2 * p ** 2)
        per_threshold.append(np.mean(briers))
        per_object.append(briers)
    return float(np.mean(per_threshold)), np.mean(per_object, axis=0)


@pytest.mark.parametrize("seed, aggregation, thresholds", [
    (0, "mean", (0.5, 0.75)), (1, "max_iou", (0.3, 0.5, 0.9)), (2, "iou_weighted", (0.6,))])
def test_random_sets_equal_the_loop_oracle(seed, aggregation, thresholds):
    predictions, references, _ = synthetic_detections(num_images=12, detections_per_image=30, num_classes=4,
                                                      seed=seed)
    rng = np.random.default_rng(seed)
    for prediction in predictions:
        logits = rng.normal(size=(len(prediction["scores"]), 5))
        prediction["probabilities"] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected, expected_objects = loop_oce(predictions, references, thresholds, aggregation)
    binary = [{key: value for key, value in p.items() if key != "probabilities"} for p in predictions]
    result = object_calibration_error(binary, references, thresholds, aggregation)
    assert result["oce"] == pytest.approx(expected, abs=1e-12)
    assert result["per_object_brier"] == pytest.approx(expected_objects.tolist(), abs=1e-12)
    expected, expected_objects = loop_oce(predictions, references, thresholds, aggregation, probabilities=True)
    result = object_calibration_error(predictions, references, thresholds, aggregation)
    assert result["oce"] == pytest.approx(expected, abs=1e-12)
    assert result["per_object_brier"] == pytest.approx(expected_objects.tolist(), abs=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"aggregation": "median"}, "aggregation must be one of 'mean', 'max_iou', 'iou_weighted'"),
    ({"aggregation": None}, "aggregation must be one of"),
    ({"iou_thresholds": ()}, "iou_thresholds is empty"),
    ({"iou_thresholds": []}, "iou_thresholds is empty"),
    ({"iou_thresholds": (0.0, 0.5)}, r"iou_thresholds must lie in \(0, 1\]"),
    ({"iou_thresholds": (0.5, 1.5)}, r"iou_thresholds must lie in \(0, 1\]"),
    ({"iou_thresholds": (-0.5,)}, r"iou_thresholds must lie in \(0, 1\]"),
    ({"iou_thresholds": (float("nan"),)}, r"iou_thresholds must lie in \(0, 1\]"),
    ({"iou_thresholds": (0.5, 0.5)}, "distinct"),
    ({"iou_thresholds": "0.5"}, "iou_thresholds"),
    ({"score_threshold": 1.5}, r"score_threshold must lie in \[0, 1\]"),
    ({"score_threshold": -0.1}, r"score_threshold must lie in \[0, 1\]"),
])
def test_invalid_arguments(kwargs, message):
    references = [{"boxes": ONE_GT, "labels": [1]}]
    with pytest.raises(ValueError, match=message):
        object_calibration_error([TWO_DETECTIONS], references, **kwargs)


def test_threshold_one_is_accepted():
    # IoU 1 only for an identical box: the detection [0, 0, 10, 10] of the right class, score 0.5: 2 * 0.25.
    predictions = [{"boxes": [[0, 0, 10, 10], [0, 0, 10, 8]], "scores": [0.5, 0.9], "labels": [1, 1]}]
    result = object_calibration_error(predictions, [{"boxes": ONE_GT, "labels": [1]}], [1.0])
    assert result["oce"] == pytest.approx(0.5, abs=1e-12)


def test_malformed_inputs_name_the_image():
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        object_calibration_error([{"boxes": ONE_GT, "scores": [1.5], "labels": [1]}],
                                 [{"boxes": ONE_GT, "labels": [1]}])
    with pytest.raises(ValueError, match="cover"):
        object_calibration_error([TWO_DETECTIONS], [])
