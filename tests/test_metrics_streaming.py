"""Streaming metric: batch-independence, agreement with the one-shot functions, accelerate gathering."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from hf_caldetr.metrics import (
    DetectionCalibrationMetric,
    coco_average_precision,
    detection_ece,
    detection_uce,
    evaluate_detections,
    localisation_aware_calibration_error,
    lrp_error,
    optimal_lrp,
    position_detection_ece,
    synthetic_detections,
)


CATEGORIES = 80  # synthetic_detections' default classes


@pytest.fixture(scope="module")
def data():
    predictions, references, sizes = synthetic_detections(num_images=40, mean_boxes_per_image=3.0, seed=4)
    rng = np.random.default_rng(0)
    for prediction in predictions:
        prediction["uncertainties"] = rng.uniform(0, 0.99, len(prediction["scores"]))
    return predictions, references, sizes


def batched_result(predictions, references, sizes, batch_size, **options):
    metric = DetectionCalibrationMetric(**options)
    for start in range(0, len(predictions), batch_size):
        stop = start + batch_size
        metric.update(predictions[start:stop], references[start:stop], sizes[start:stop])
    return metric.compute()


def test_batches_give_the_one_call_result(data):
    one_call = evaluate_detections(*data, uncertainty_key="uncertainties", categories=CATEGORIES)
    for batch_size in (1, 7, 40):
        np.testing.assert_equal(batched_result(*data, batch_size, uncertainty_key="uncertainties",
                                               categories=CATEGORIES), one_call)


def test_equals_the_one_shot_functions(data):
    predictions, references, sizes = data
    result = evaluate_detections(predictions, references, sizes, uncertainty_key="uncertainties",
                                 categories=CATEGORIES)
    d_ece = detection_ece(predictions, references)
    for key in d_ece:
        np.testing.assert_equal(result[key], d_ece[key])
    assert result["laece"] == localisation_aware_calibration_error(predictions, references, CATEGORIES)["laece"]
    assert result["laece_iou_0.1"] == localisation_aware_calibration_error(predictions, references, CATEGORIES,
                                                                           iou_threshold=0.1)["laece"]
    lrp = lrp_error(predictions, references, CATEGORIES)
    assert [result[key] for key in ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")] == [
        lrp[key] for key in ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")]
    olrp = optimal_lrp(predictions, references, CATEGORIES)
    assert result["olrp"] == olrp["olrp"] and result["olrp_fn"] == olrp["olrp_fn"]
    assert result["position_d_ece"] == pytest.approx(
        position_detection_ece(predictions, references, sizes)["d_ece"], abs=1e-12)
    assert result["d_uce"] == pytest.approx(detection_uce(predictions, references)["d_uce"], abs=1e-12)
    coco = coco_average_precision(predictions, references)
    assert {key: result[key] for key in coco} == pytest.approx(coco, nan_ok=True)


def test_options_reach_every_metric(data):
    predictions, references, sizes = data
    options = {"num_bins": 15, "laece_bins": 10, "score_threshold": 0.5, "iou_threshold": 0.6,
               "include_images_without_gt": True}
    result = evaluate_detections(predictions, references, sizes, categories=CATEGORIES, **options)
    protocol = {"score_threshold": 0.5, "iou_threshold": 0.6, "include_images_without_gt": True}
    assert result["d_ece"] == detection_ece(predictions, references, 15, **protocol)["d_ece"]
    assert result["laece"] == localisation_aware_calibration_error(
        predictions, references, CATEGORIES, 10, score_threshold=0.5, iou_threshold=0.6)["laece"]
    assert len(result["bin_counts"]) == 15 and "d_uce" not in result


def test_image_order_does_not_matter(data):
    # gather_for_metrics interleaves processes' batches, so the image order differs from the dataset's.
    predictions, references, sizes = data
    order = np.random.default_rng(1).permutation(len(predictions))
    shuffled = evaluate_detections([predictions[i] for i in order], [references[i] for i in order], sizes[order])
    straight = evaluate_detections(predictions, references, sizes)
    assert shuffled.keys() == straight.keys()
    for key in straight:
        np.testing.assert_allclose(shuffled[key], straight[key], rtol=0, atol=1e-12, err_msg=key)


def test_accelerate_gather_for_metrics(data):
    predictions, references, sizes = data
    accelerator = Accelerator()
    metric = DetectionCalibrationMetric()
    for start in range(0, len(predictions), 8):
        batch = [{key: torch.as_tensor(value) for key, value in p.items()} for p in predictions[start:start + 8]]
        gathered = accelerator.gather_for_metrics(batch, use_gather_object=True)
        gathered_refs = accelerator.gather_for_metrics(references[start:start + 8], use_gather_object=True)
        gathered_sizes = accelerator.gather_for_metrics(torch.as_tensor(sizes[start:start + 8]))
        metric.update(gathered, gathered_refs, gathered_sizes)
    result = metric.compute()
    assert result["d_ece"] == detection_ece(predictions, references)["d_ece"]
    assert result["num_images"] == len(predictions)


def test_without_ap_or_sizes(data):
    predictions, references, _ = data
    result = evaluate_detections(predictions, references, compute_ap=False)
    assert "map" not in result and "position_d_ece" not in result
    assert result["d_ece"] == detection_ece(predictions, references)["d_ece"]


def test_image_sizes_for_every_batch_or_none(data):
    predictions, references, sizes = data
    metric = DetectionCalibrationMetric()
    metric.update(predictions[:2], references[:2], sizes[:2])
    with pytest.raises(ValueError, match="every batch or for none"):
        metric.update(predictions[2:4], references[2:4])


def test_reset_and_empty(data):
    metric = DetectionCalibrationMetric(categories=CATEGORIES)
    metric.update(*data)
    metric.reset()
    result = metric.compute()
    assert result["num_images"] == 0 and result["num_detections"] == 0
    for key in ("d_ece", "laece", "lrp", "olrp", "laece_0", "laace_0", "oce", "map"):
        assert math.isnan(result[key]), key


def test_values_are_checked_together_and_named_by_their_position_among_all_images(data, monkeypatch):
    from hf_caldetr.metrics import streaming

    predictions, references, sizes = data
    # Flushing every 5 images (the default is every FLUSH_IMAGES) gives the one-call result.
    monkeypatch.setattr(streaming, "FLUSH_IMAGES", 5)
    expected = evaluate_detections(predictions, references, sizes, categories=CATEGORIES)
    np.testing.assert_equal(batched_result(predictions, references, sizes, 3, categories=CATEGORIES), expected)
    assert batched_result(predictions, references, sizes, 3).keys() <= expected.keys()

    # A NaN score in the third image of the fifth batch of 3: named as image 14 of all those given.
    broken = [dict(prediction) for prediction in predictions]
    broken[14]["scores"] = np.where(np.arange(len(broken[14]["scores"])) == 0, np.nan, broken[14]["scores"])
    metric = DetectionCalibrationMetric()
    with pytest.raises(ValueError, match=r"predictions\[14\]\['scores'\] contains NaN"):
        for start in range(0, 18, 3):
            metric.update(broken[start:start + 3], references[start:start + 3], sizes[start:start + 3])
        metric.compute()
    metric = DetectionCalibrationMetric()
    metric.update(predictions[:2], references[:2])
    assert metric.num_images == 2
    with pytest.raises(ValueError, match="predictions cover 2 images but references cover 1"):
        metric.update(predictions[:2], references[:1])
