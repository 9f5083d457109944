"""The shipped `evaluate` module of every calibration metric loads offline and gives evaluate_detections' numbers."""

import json
import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

import hf_caldetr.metrics
from hf_caldetr.metrics import DETECTION_CALIBRATION_MODULE, evaluate_detections, synthetic_detections

SQUARE = [0, 0, 10, 10]


@pytest.fixture(scope="module")
def module():
    return evaluate.load(DETECTION_CALIBRATION_MODULE)


@pytest.fixture(scope="module")
def data():
    predictions, references, _ = synthetic_detections(num_images=20, seed=0)
    return predictions, references


@pytest.fixture(scope="module")
def expected(data):
    return evaluate_detections(*data, categories=80, compute_ap=False)


@pytest.fixture(scope="module")
def crowded(data):
    """The references with every third box of each image marked as a crowd region (``iscrowd`` given for every
    image, also those without boxes)."""
    return [{**reference, "iscrowd": (np.arange(len(reference["labels"])) % 3 == 1).astype(np.int64)}
            for reference in data[1]]


def test_module_folder_ships_script_and_card():
    folder = Path(DETECTION_CALIBRATION_MODULE)
    assert folder.is_absolute() and folder.name == "detection_calibration"
    assert (folder / "detection_calibration.py").is_file() and (folder / "README.md").is_file()
    assert not (folder / "__init__.py").exists()
    assert "DETECTION_CALIBRATION_MODULE" in hf_caldetr.metrics.__all__


def test_compute_equals_evaluate_detections(module, data, expected):
    result = module.compute(predictions=data[0], references=data[1], categories=80)
    assert list(result) == list(expected)
    for key in expected:
        np.testing.assert_equal(result[key], expected[key], err_msg=key)
    for key in ("d_ece", "laece", "laece_iou_0.1", "lrp", "olrp", "laece_0", "laace_0", "oce"):
        assert math.isfinite(result[key]), key
    assert "at_lrp_optimal_thresholds" not in result


def test_add_batch_in_several_batches_equals_one_compute(module, data, expected):
    predictions, references = data
    for start in range(0, len(predictions), 6):  # batches of 6, 6, 6 and 2; tensors in every other one
        batch = predictions[start:start + 6]
        if start % 12 == 0:
            batch = [{key: torch.as_tensor(value) for key, value in p.items()} for p in batch]
        module.add_batch(predictions=batch, references=references[start:start + 6])
    np.testing.assert_equal(module.compute(categories=80), expected)


def test_add_one_image_at_a_time(module, data, expected):
    for prediction, reference in zip(*data):
        module.add(prediction=prediction, reference=reference)
    np.testing.assert_equal(module.compute(categories=80), expected)


def test_options_are_passed_through(module, data):
    options = dict(categories=list(range(80)), num_bins=15, laece_bins=10, score_threshold=0.2, iou_threshold=0.6,
                   include_images_without_gt=True)
    np.testing.assert_equal(module.compute(predictions=data[0], references=data[1], **options),
                            evaluate_detections(*data, compute_ap=False, **options))


def test_compute_ap_is_passed_through(module, data):
    pytest.importorskip("pycocotools")
    result = module.compute(predictions=data[0], references=data[1], categories=80, compute_ap=True)
    np.testing.assert_equal(result, evaluate_detections(*data, categories=80, compute_ap=True))
    assert 0 < result["map"] < 1


def test_iscrowd_is_accepted_and_changes_the_result_as_the_function_does(module, data, expected, crowded):
    result = module.compute(predictions=data[0], references=crowded, categories=80)
    function = evaluate_detections(data[0], crowded, categories=80, compute_ap=False)
    np.testing.assert_equal(result, function)
    assert result["laece"] != expected["laece"] and result["olrp"] != expected["olrp"]
    assert result["oce"] != expected["oce"]


def test_iscrowd_given_for_some_images_or_batches_only(module, data, crowded):
    """An image without ``iscrowd`` has no crowd region, whichever batch it comes in (the schema always holds
    the flags; the module fills in zeros)."""
    references = [crowded[i] if i % 2 else data[1][i] for i in range(len(crowded))]
    function = evaluate_detections(data[0], references, categories=80, compute_ap=False)
    module.add_batch(predictions=data[0][:10], references=data[1][:10])  # first batch: no image has iscrowd
    module.add_batch(predictions=data[0][10:], references=references[10:])
    mixed = [data[1][i] for i in range(10)] + references[10:]
    np.testing.assert_equal(module.compute(categories=80),
                            evaluate_detections(data[0], mixed, categories=80, compute_ap=False))
    np.testing.assert_equal(module.compute(predictions=data[0], references=references, categories=80), function)


def test_crowd_region_ignores_a_detection(module):
    predictions = [{"boxes": [SQUARE, [20, 20, 30, 30]], "scores": [0.9, 0.8], "labels": [1, 1]}]
    references = [{"boxes": [SQUARE, [20, 20, 30, 30]], "labels": [1, 1], "iscrowd": [0, 1]}]
    result = module.compute(predictions=predictions, references=references, categories=2)
    assert result["num_ignored"] == 1 and result["num_detections"] == 1 and result["precision"] == 1.0
    assert result["lrp"] == 0.0  # the crowd box is neither missed nor claimed
    np.testing.assert_equal(result, evaluate_detections(predictions, references, categories=2, compute_ap=False))


@pytest.mark.parametrize("form", ["dict", "json", "list"])
def test_class_thresholds_give_at_lrp_optimal_thresholds(module, data, form):
    val_predictions, val_references, _ = synthetic_detections(num_images=20, seed=1)
    thresholds = module.compute(predictions=val_predictions, references=val_references,
                                categories=80)["lrp_optimal_thresholds"]
    np.testing.assert_equal(thresholds, evaluate_detections(val_predictions, val_references, categories=80,
                                                            compute_ap=False)["lrp_optimal_thresholds"])
    assert any(math.isnan(value) for value in thresholds.values())  # classes without a true positive: keep all
    expected = evaluate_detections(*data, categories=80, compute_ap=False, class_thresholds=thresholds)
    if form == "json":  # a validation result saved as JSON: string keys, NaN
        thresholds = json.loads(json.dumps(thresholds))
        assert all(isinstance(key, str) for key in thresholds)
    elif form == "list":
        thresholds = [thresholds[c] for c in range(80)]
    result = module.compute(predictions=data[0], references=data[1], categories=80, class_thresholds=thresholds)
    np.testing.assert_equal(result, expected)
    at = result["at_lrp_optimal_thresholds"]
    assert set(at) == {"laece_0", "laace_0", "lrp", "lrp_loc", "lrp_fp", "lrp_fn", "d_ece", "d_uce", "oce",
                       "num_detections"}
    assert at["d_uce"] is None and math.isfinite(at["laece_0"]) and math.isfinite(at["d_ece"])


def test_result_serialises(module, data):
    result = module.compute(predictions=data[0], references=data[1], categories=80, class_thresholds=[0.5] * 80)
    loaded = json.loads(json.dumps(result))
    assert set(loaded) == set(result)
    np.testing.assert_equal(loaded["lrp_optimal_thresholds"],
                            {str(c): v for c, v in result["lrp_optimal_thresholds"].items()})
    np.testing.assert_equal(loaded["at_lrp_optimal_thresholds"], result["at_lrp_optimal_thresholds"])


def test_docstring_and_card_example(module):
    result = module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [1]}],
                            references=[{"boxes": [SQUARE], "labels": [1]}], categories=2)
    assert (round(result["d_ece"], 6), round(result["lrp"], 6), result["lrp_optimal_thresholds"]) == \
        (0.2, 0.0, {0: -1.0, 1: 0.8})


def test_images_without_boxes_and_no_detections(module):
    result = module.compute(predictions=[{"boxes": [], "scores": [], "labels": []}],
                            references=[{"boxes": [], "labels": []}], categories=3)
    assert math.isnan(result["d_ece"]) and math.isnan(result["laece"]) and math.isnan(result["olrp"])
    assert result["num_images"] == 1 and result["num_images_evaluated"] == 0


# Refused inputs and options.


def test_missing_categories_names_the_fix_and_keeps_the_batches(module, data, expected):
    module.add_batch(predictions=data[0], references=data[1])
    for call in (lambda: module.compute(), lambda: module.compute(categories=None)):
        with pytest.raises(ValueError, match=r"categories is required: pass the dataset's classes to compute\(\), "
                                             r"e\.g\. compute\(\.\.\., categories=80\)") as error:
            call()
        assert "never guessed from the data" in str(error.value)
    np.testing.assert_equal(module.compute(categories=80), expected)  # nothing was lost
    with pytest.raises(ValueError, match=r"categories is required"):
        module.compute(predictions=data[0], references=data[1])


@pytest.mark.parametrize("options, message", [
    ({"iou_threshold": 1.0}, r"LRP needs an IoU threshold in \[0, 1\)"),
    ({"score_threshold": 1.5}, r"score_threshold must lie in \[0, 1\], got 1.5"),
    ({"num_bins": 0}, r"num_bins must be a positive integer, got 0"),
    ({"class_thresholds": {1: 0.3}}, r"thresholds has no value for class id\(s\) \[0, 2, 3"),
    ({"class_thresholds": [0.3] * 3}, r"thresholds must give one value per category \(80\)"),
    ({"categories": 0}, r"categories: the number of classes must be positive, got 0"),
    ({"bins": 10}, r"unknown option\(s\) 'bins' for the detection calibration evaluate module; it takes "
                   r"categories, class_thresholds, num_bins"),
])
def test_refused_options_get_the_core_messages_and_keep_the_batches(module, data, expected, options, message):
    module.add_batch(predictions=data[0], references=data[1])
    with pytest.raises(ValueError, match=message):
        module.compute(**{"categories": 80, **options})
    np.testing.assert_equal(module.compute(categories=80), expected)


def test_labels_outside_categories_get_the_core_message(module, data):
    with pytest.raises(ValueError) as core:
        evaluate_detections(*data, categories=10, compute_ap=False)
    with pytest.raises(ValueError) as wrapped:
        module.compute(predictions=data[0], references=data[1], categories=10)
    assert str(wrapped.value) == str(core.value)
    assert "not in the dataset's categories" in str(core.value)


def test_float_labels_are_refused_like_evaluate_detections(module):
    # The module's int64 feature would truncate 2.7 to class 2 and call it a true positive.
    predictions = [{"boxes": [SQUARE], "scores": [0.8], "labels": [2.7]}]
    references = [{"boxes": [SQUARE], "labels": [2]}]
    with pytest.raises(ValueError) as core:
        evaluate_detections(predictions, references, categories=3, compute_ap=False)
    with pytest.raises(ValueError) as wrapped:
        module.compute(predictions=predictions, references=references, categories=3)
    assert str(wrapped.value) == str(core.value) == "predictions[0]['labels'] must be integer class ids"
    with pytest.raises(ValueError, match=r"references\[0\]\['labels'\] must be integer class ids"):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [2]}],
                       references=[{"boxes": [SQUARE], "labels": [2.5]}], categories=3)


def test_refused_batches_store_nothing(module):
    with pytest.raises(ValueError, match=r"predictions\[1\]\['labels'\] must be integer class ids"):
        module.add_batch(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [1]},
                                      {"boxes": [SQUARE], "scores": [0.8], "labels": torch.tensor([1.5])}],
                         references=[{"boxes": [SQUARE], "labels": [1]}] * 2)
    with pytest.raises(ValueError, match=r"must be integer class ids"):
        module.add(prediction={"boxes": [SQUARE], "scores": [0.8], "labels": [0.5]},
                   reference={"boxes": [SQUARE], "labels": [0]})
    with pytest.raises(ValueError, match=r"references\[0\]\['iscrowd'\] must be 0 or 1 per box"):
        module.add(prediction={"boxes": [SQUARE], "scores": [0.8], "labels": [0]},
                   reference={"boxes": [SQUARE], "labels": [0], "iscrowd": [0.5]})
    result = module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [2.0]}],
                            references=[{"boxes": [SQUARE], "labels": [2]}], categories=3)
    assert result["num_images"] == 1 and result["num_detections"] == 1 and result["precision"] == 1.0


@pytest.mark.parametrize("side, extra", [("predictions", "uncertainties"), ("references", "area"),
                                         ("predictions", "iscrowd")])
def test_unexpected_key_is_named_with_the_expected_keys(module, side, extra):
    inputs = {"predictions": [{"boxes": [SQUARE], "scores": [0.8], "labels": [1]}],
              "references": [{"boxes": [SQUARE], "labels": [1], "iscrowd": [0]}]}
    inputs[side][0][extra] = [0]
    if side == "predictions":
        expected = r"the detection calibration evaluate module takes exactly the keys 'boxes', 'scores', 'labels'"
    else:
        expected = (r"the detection calibration evaluate module, besides an optional 'iscrowd', takes exactly the "
                    r"keys 'boxes', 'labels'")
    message = rf"{side}\[0\] has unexpected key\(s\) '{extra}': {expected}; remove the others before passing {side}"
    with pytest.raises(ValueError, match=message):
        module.compute(**inputs, categories=2)


def test_missing_key_gets_the_core_message(module):
    with pytest.raises(ValueError, match=r"predictions\[0\] is missing 'labels'"):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8]}],
                       references=[{"boxes": [SQUARE], "labels": [1]}], categories=2)
    with pytest.raises(ValueError, match=r"references\[0\] is missing 'labels' \(found 'class_labels'"):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [1]}],
                       references=[{"boxes": [SQUARE], "class_labels": [1], "iscrowd": [0]}], categories=2)


@pytest.mark.parametrize("iscrowd, message", [
    ([2], r"references\[0\]\['iscrowd'\] must be 0 or 1 per box"),
    ([0, 1], r"references\[0\] has 1 boxes but 'iscrowd' of shape \(2,\): give one 0/1 flag per box"),
])
def test_bad_iscrowd_gets_the_core_message(module, iscrowd, message):
    with pytest.raises(ValueError, match=message):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [1]}],
                       references=[{"boxes": [SQUARE], "labels": [1], "iscrowd": iscrowd}], categories=2)
