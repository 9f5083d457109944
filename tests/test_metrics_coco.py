"""COCO AP through pycocotools on per-image dicts: perfect predictions and hand-checkable cases."""

import math

import numpy as np
import pytest

from hf_caldetr.metrics import coco_average_precision, synthetic_detections
from hf_caldetr.metrics.coco import COCO_SUMMARY_KEYS

TWO_BOXES = {"boxes": [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]], "labels": [4, 4]}


def test_perfect_predictions_give_one():
    _, references, _ = synthetic_detections(num_images=15, seed=2)
    predictions = [{"boxes": r["boxes"], "scores": np.ones(len(r["labels"])), "labels": r["labels"]}
                   for r in references]
    result = coco_average_precision(predictions, references)
    assert set(result) == set(COCO_SUMMARY_KEYS)
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert result[key] == pytest.approx(1.0, abs=1e-9)


def test_half_recall_hand_checked():
    # One exact detection of two boxes: precision 1 up to recall 0.5, so 51 of COCO's 101 recall points score 1
    # at every IoU threshold: AP = 51 / 101. Both boxes are 10 x 10 = 100 px, "small"; no "large" ground truth,
    # so pycocotools' -1 becomes NaN.
    predictions = [{"boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [4]}]
    result = coco_average_precision(predictions, [TWO_BOXES])
    assert result["map"] == pytest.approx(51 / 101) and result["map_small"] == pytest.approx(51 / 101)
    assert result["mar_100"] == pytest.approx(0.5)
    assert math.isnan(result["map_large"])


def test_false_positive_ranked_first_halves_precision():
    # A higher-scored miss first: at recall 0.5 precision is 1/2, so AP = 0.5 * 51 / 101.
    predictions = [{"boxes": [[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]], "scores": [0.95, 0.9],
                    "labels": [4, 4]}]
    assert coco_average_precision(predictions, [TWO_BOXES])["map"] == pytest.approx(0.5 * 51 / 101)


def test_given_area_decides_the_size_range():
    # COCO's area is the mask area: 5000 px is "medium" although the box is 100 px.
    references = [{**TWO_BOXES, "area": [5000.0, 5000.0]}]
    predictions = [{"boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [4]}]
    result = coco_average_precision(predictions, references)
    assert result["map_medium"] == pytest.approx(51 / 101) and math.isnan(result["map_small"])


def test_crowd_boxes_are_ignored():
    references = [{**TWO_BOXES, "iscrowd": [0, 1]}]
    predictions = [{"boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [4]}]
    assert coco_average_precision(predictions, references)["map"] == pytest.approx(1.0)


def test_no_detections_give_zero():
    predictions = [{"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    result = coco_average_precision(predictions, [TWO_BOXES])
    assert result["map"] == 0.0 and result["mar_100"] == 0.0


def test_prints_nothing(capsys):
    coco_average_precision([{"boxes": [[0.0, 0.0, 10.0, 10.0]], "scores": [0.9], "labels": [4]}], [TWO_BOXES])
    assert capsys.readouterr().out == ""


def test_bad_area_length():
    with pytest.raises(ValueError, match="one value per box"):
        coco_average_precision([{"boxes": [], "scores": [], "labels": []}], [{**TWO_BOXES, "area": [1.0]}])
