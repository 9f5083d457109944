"""The shipped `evaluate` module loads offline and gives detection_ece's numbers."""

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

import hf_caldetr.metrics
from hf_caldetr.metrics import detection_ece, synthetic_detections


@pytest.fixture(scope="module")
def module():
    return evaluate.load(hf_caldetr.metrics.D_ECE_MODULE)


@pytest.fixture(scope="module")
def data():
    predictions, references, _ = synthetic_detections(num_images=24, mean_boxes_per_image=2.0, seed=6)
    return predictions, references


def test_module_folder_ships_script_and_card():
    folder = Path(hf_caldetr.metrics.D_ECE_MODULE)
    assert folder.is_absolute() and (folder / "d_ece.py").is_file() and (folder / "README.md").is_file()


def test_compute_equals_detection_ece(module, data):
    np.testing.assert_equal(module.compute(predictions=data[0], references=data[1]), detection_ece(*data))


def test_add_batch_with_tensors_and_options(module, data):
    predictions, references = data
    for start in range(0, len(predictions), 5):
        batch = [{key: torch.as_tensor(value) for key, value in p.items()} for p in predictions[start:start + 5]]
        module.add_batch(predictions=batch, references=references[start:start + 5])
    result = module.compute(num_bins=15, include_images_without_gt=True)
    np.testing.assert_equal(result, detection_ece(predictions, references, num_bins=15,
                                                  include_images_without_gt=True))


def test_docstring_example(module):
    result = module.compute(predictions=[{"boxes": [[0, 0, 10, 10]], "scores": [0.8], "labels": [1]}],
                            references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}])
    assert result["d_ece"] == pytest.approx(0.2) and result["num_detections"] == 1


def test_images_without_boxes_and_no_detections(module):
    result = module.compute(predictions=[{"boxes": [], "scores": [], "labels": []}],
                            references=[{"boxes": [], "labels": []}])
    assert math.isnan(result["d_ece"]) and result["num_images_evaluated"] == 0


def test_card_example(module):
    result = module.compute(
        predictions=[{"boxes": [[0, 0, 10, 10], [0, 0, 10, 10]], "scores": [0.9, 0.6], "labels": [1, 1]}],
        references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}])
    assert result["d_ece"] == pytest.approx(0.35)


SQUARE = [0, 0, 10, 10]


def test_float_labels_are_refused_like_detection_ece(module):
    # The module's int64 feature would truncate 2.7 to class 2 and call it a true positive.
    predictions = [{"boxes": [SQUARE], "scores": [0.8], "labels": [2.7]}]
    references = [{"boxes": [SQUARE], "labels": [2]}]
    with pytest.raises(ValueError) as core:
        detection_ece(predictions, references)
    with pytest.raises(ValueError) as wrapped:
        module.compute(predictions=predictions, references=references)
    assert str(wrapped.value) == str(core.value) == "predictions[0]['labels'] must be integer class ids"
    with pytest.raises(ValueError, match=r"references\[0\]\['labels'\] must be integer class ids"):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [2]}],
                       references=[{"boxes": [SQUARE], "labels": [2.5]}])


def test_float_labels_are_refused_by_add_and_add_batch(module):
    with pytest.raises(ValueError, match=r"predictions\[1\]\['labels'\] must be integer class ids"):
        module.add_batch(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [1]},
                                      {"boxes": [SQUARE], "scores": [0.8], "labels": torch.tensor([1.5])}],
                         references=[{"boxes": [SQUARE], "labels": [1]}] * 2)
    with pytest.raises(ValueError, match=r"must be integer class ids"):
        module.add(prediction={"boxes": [SQUARE], "scores": [0.8], "labels": [0.5]},
                   reference={"boxes": [SQUARE], "labels": [0]})
    # Nothing was stored by the refused calls: a fresh compute sees only its own inputs.
    result = module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8], "labels": [2.0]}],
                            references=[{"boxes": [SQUARE], "labels": [2]}])
    assert result["num_detections"] == 1 and result["precision"] == 1.0  # integral floats are fine, as in the core


@pytest.mark.parametrize("side, extra", [("predictions", "uncertainties"), ("references", "iscrowd")])
def test_unexpected_key_is_named_with_the_expected_keys(module, side, extra):
    inputs = {"predictions": [{"boxes": [SQUARE], "scores": [0.8], "labels": [1]}],
              "references": [{"boxes": [SQUARE], "labels": [1]}]}
    inputs[side][0][extra] = [0]
    expected = "'boxes', 'scores', 'labels'" if side == "predictions" else "'boxes', 'labels'"
    message = rf"{side}\[0\] has unexpected key\(s\) '{extra}': .* takes exactly the keys {expected}; remove"
    with pytest.raises(ValueError, match=message):
        module.compute(**inputs)


def test_missing_key_gets_the_core_message(module):
    with pytest.raises(ValueError, match=r"predictions\[0\] is missing 'labels'"):
        module.compute(predictions=[{"boxes": [SQUARE], "scores": [0.8]}],
                       references=[{"boxes": [SQUARE], "labels": [1]}])
