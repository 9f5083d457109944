"""hf_caldetr.evaluation: fitting a calibrator from a detector, and evaluating with one, against the metrics'
own functions applied by hand (match_detections, evaluate_detections, the calibrators' fit/transform)."""

import numpy as np
import pytest
import torch
from tiny import tiny_batch, tiny_deformable_kwargs
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

from hf_caldetr.calibrators import HistogramBinning, TemperatureScaling
from hf_caldetr.data import build_image_processor
from hf_caldetr.evaluation import (
    collect_matches,
    evaluate_model,
    fit_calibrator,
    labels_to_references,
    post_process,
)
from hf_caldetr.metrics import evaluate_detections, match_detections

GROUND_TRUTH_PER_IMAGE = 4
ORIG_SIZE = (48, 80)  # (height, width): not square, so a swapped axis would show


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(DeformableDetrConfig(**tiny_deformable_kwargs()))
    # The stock prior bias puts every score near 0.01, below the protocol's 0.3; at 0 they spread around 0.5.
    for layer in model.class_embed:
        torch.nn.init.zeros_(layer.bias)
    return model.eval()


@pytest.fixture(scope="module")
def image_processor():
    return build_image_processor(64)


@pytest.fixture(scope="module")
def batches(model, image_processor):
    """Two batches of two images whose ground truth is each image's top-4 detections (so true positives exist):
    in the model's own output format, normalised cxcywh relative to ``orig_size``."""
    height, width = ORIG_SIZE
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    batches = []
    for seed in range(2):
        pixel_values, _ = tiny_batch(batch_size=2, size=64, seed=seed)
        labels = [{"orig_size": torch.tensor(ORIG_SIZE)} for _ in range(2)]
        with torch.no_grad():
            predictions = post_process(model(pixel_values=pixel_values), labels, image_processor)
        for label, prediction in zip(labels, predictions):
            top = np.argsort(-prediction["scores"], kind="stable")[:GROUND_TRUTH_PER_IMAGE]
            xyxy = torch.from_numpy(prediction["boxes"][top]) / scale
            label["boxes"] = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            label["class_labels"] = torch.from_numpy(prediction["labels"][top])
        batches.append({"pixel_values": pixel_values, "pixel_mask": torch.ones(2, 64, 64, dtype=torch.int64),
                        "labels": labels})
    return batches


@pytest.fixture(scope="module")
def by_hand(model, image_processor, batches):
    """Every image's post-processed detections and references, gathered without the evaluation helpers."""
    predictions, references = [], []
    with torch.no_grad():
        for batch in batches:
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            predictions += post_process(outputs, batch["labels"], image_processor)
            references += labels_to_references(batch["labels"])
    return predictions, references


def test_collect_matches_is_match_detections_over_the_split(model, image_processor, batches, by_hand):
    outcomes = collect_matches(model, batches, image_processor)
    expected = match_detections(*by_hand, score_threshold=0.3, iou_threshold=0.5)
    np.testing.assert_array_equal(outcomes.scores, expected.scores)
    np.testing.assert_array_equal(outcomes.matched, expected.matched)
    np.testing.assert_array_equal(outcomes.labels, expected.labels)
    # Each ground-truth box is a top detection itself, which claims it: 4 true positives an image, the rest false.
    assert outcomes.matched.sum() == 4 * GROUND_TRUTH_PER_IMAGE
    kept = sum(int((prediction["scores"] >= 0.3).sum()) for prediction in by_hand[0])
    assert len(outcomes.scores) == kept > outcomes.matched.sum()
    assert outcomes.scores.dtype == np.float64 and outcomes.labels.dtype == np.int64

    stricter = collect_matches(model, batches, image_processor, score_threshold=0.5, iou_threshold=0.9)
    expected = match_detections(*by_hand, score_threshold=0.5, iou_threshold=0.9)
    np.testing.assert_array_equal(stricter.scores, expected.scores)
    np.testing.assert_array_equal(stricter.matched, expected.matched)


def test_fit_calibrator_fits_on_the_protocol_outcomes(model, image_processor, batches, by_hand):
    matches = match_detections(*by_hand)
    calibrator = TemperatureScaling()
    fitted = fit_calibrator(model, batches, image_processor, calibrator)
    assert fitted is calibrator
    assert fitted.temperature == TemperatureScaling().fit(matches.scores, matches.matched).temperature
    assert fitted.temperature != 1.0

    # Class-wise: the labels reach the calibrator, detection by detection.
    class_wise = fit_calibrator(model, batches, image_processor, HistogramBinning(class_wise=True,
                                                                                  min_class_detections=10))
    expected = HistogramBinning(class_wise=True, min_class_detections=10).fit(matches.scores, matches.matched,
                                                                             matches.labels)
    assert class_wise.class_params_ and class_wise.class_params_ == expected.class_params_
    assert class_wise.params_ == expected.params_


def test_evaluate_model_with_a_calibrator_measures_the_calibrated_scores(model, image_processor, batches, by_hand):
    predictions, references = by_hand
    sizes = [ORIG_SIZE] * len(predictions)
    calibrator = fit_calibrator(model, batches, image_processor, TemperatureScaling())
    calibrated = evaluate_model(model, batches, image_processor, calibrator=calibrator)
    raw = evaluate_model(model, batches, image_processor)

    expected_raw = evaluate_detections(predictions, references, image_sizes=sizes)
    by_hand_calibrated = [{**p, "scores": calibrator.transform(p["scores"])} for p in predictions]
    expected_calibrated = evaluate_detections(by_hand_calibrated, references, image_sizes=sizes)
    for key in ("map", "map_50", "d_ece", "laece", "position_d_ece", "num_detections", "precision"):
        assert raw[key] == pytest.approx(expected_raw[key], abs=1e-12), key
        assert calibrated[key] == pytest.approx(expected_calibrated[key], abs=1e-12), key
    # Temperature scaling keeps each image's ranking, so the AP; the confidences, and so the D-ECE, move.
    assert calibrated["map"] == raw["map"] > 0
    assert abs(calibrated["d_ece"] - raw["d_ece"]) > 1e-3


def test_accelerate_prepared_loader_with_a_short_last_batch(model, image_processor, batches):
    """Three images in batches of two: gather_for_metrics cuts the last batch to its one real image."""
    from accelerate import Accelerator

    images = [{"pixel_values": batch["pixel_values"][i], "labels": batch["labels"][i]}
              for batch in batches for i in range(2)][:3]

    def collate(items):
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        return {"pixel_values": pixel_values, "pixel_mask": torch.ones(len(items), 64, 64, dtype=torch.int64),
                "labels": [item["labels"] for item in items]}

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(images, batch_size=2, collate_fn=collate))
    gathered = collect_matches(model, loader, image_processor, accelerator, score_threshold=0.0)
    plain = collect_matches(model, [collate(images[:2]), collate(images[2:])], image_processor, score_threshold=0.0)
    np.testing.assert_array_equal(gathered.scores, plain.scores)
    np.testing.assert_array_equal(gathered.matched, plain.matched)
    # top_k is min(100, Q * C): all 12 * 5 scores of each image.
    assert len(plain.scores) == 3 * model.config.num_queries * model.config.num_labels
    assert plain.matched.sum() == 3 * GROUND_TRUTH_PER_IMAGE


def test_bad_calibration_input_is_named(model, image_processor, batches):
    model.train()
    with pytest.raises(ValueError, match="kept 0 detections .* fewer than the 10"):
        fit_calibrator(model, batches, image_processor, TemperatureScaling(), score_threshold=0.999)
    assert model.training  # the evaluation loop gives the model back in the mode it found it
    model.eval()
    with pytest.raises(TypeError, match="post-hoc calibrator with fit and transform"):
        fit_calibrator(model, batches, image_processor, "temperature")
