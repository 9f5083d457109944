"""Calibrators folded into the weights: the stock pipeline on the saved folder returns calibrated scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_caldetr.families import decoder_layer_logits
from PIL import Image
from tiny import tiny_deformable_kwargs, tiny_detr_kwargs, tiny_rt_detr_kwargs
from transformers import AutoModelForObjectDetection, pipeline

from hf_caldetr import CalibrationFoldError, calibrate_pipeline_outputs, fold_calibrator
from hf_caldetr.folding import unfold_calibration
from hf_caldetr.calibrators import (
    HistogramBinning,
    IsotonicCalibrator,
    PlattScaling,
    SoftmaxTemperatureScaling,
    TemperatureScaling,
)
from hf_caldetr.data import build_image_processor
from hf_caldetr.metrics import coco_average_precision
from hf_caldetr.training import MODEL_FAMILIES

NUM_LABELS = 5


def _config(family: str, cal: bool = False, names=None, **overrides):
    names = names or [f"c{i}" for i in range(NUM_LABELS)]
    kwargs = {"deformable_detr": tiny_deformable_kwargs, "detr": tiny_detr_kwargs,
              "rt_detr": tiny_rt_detr_kwargs}[family](**overrides, num_labels=len(names))
    spec = MODEL_FAMILIES[family]
    return (spec.cal_config_class if cal else spec.config_class)(
        **kwargs, id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})


def build(family: str, cal: bool = False, seed: int = 0, names=None, **overrides):
    torch.manual_seed(seed)
    spec = MODEL_FAMILIES[family]
    model = (spec.cal_model_class if cal else spec.model_class)(_config(family, cal, names, **overrides))
    # Random heads give logits near 0; spread them so the calibrators have something to do.
    with torch.no_grad():
        head = spec.final_class_head(model)
        head.weight.mul_(8.0)
    return model.eval()


def fitted(kind: str, class_wise: bool = False, seed: int = 0):
    """A calibrator fitted on synthetic over-confident detections (precision = score^2)."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.01, 0.99, 2000)
    labels = rng.integers(0, NUM_LABELS, 2000)
    # Class-dependent miscalibration, so class-wise maps differ.
    matched = rng.uniform(0, 1, 2000) < scores ** (1.5 + 0.3 * labels)
    calibrator = {"temperature": TemperatureScaling, "platt": PlattScaling, "isotonic": IsotonicCalibrator,
                  "histogram": HistogramBinning}[kind](class_wise=class_wise, min_class_detections=50)
    return calibrator.fit(scores, matched, labels)


def fitted_softmax(seed: int = 0) -> SoftmaxTemperatureScaling:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (1000, NUM_LABELS + 1))
    # Over-confident by construction: a true positive 30 % of the time, whatever the score.
    calibrator = SoftmaxTemperatureScaling().fit(logits, rng.uniform(0, 1, 1000) < 0.3)
    assert calibrator.temperature > 1.0
    return calibrator


def images(count: int = 2, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(count)]


def save(model, path) -> str:
    model.save_pretrained(path)
    build_image_processor(64, MODEL_FAMILIES[model.config.model_type].image_processor_class).save_pretrained(path)
    return str(path)


def pipeline_scores(folder: str, image_list) -> list[list[dict]]:
    detector = pipeline("object-detection", model=folder, device="cpu")
    return [detector(image, threshold=0.0) for image in image_list]


def by_label(detections: list[dict]) -> dict[str, np.ndarray]:
    labels = sorted({item["label"] for item in detections})
    return {label: np.sort([item["score"] for item in detections if item["label"] == label]) for label in labels}


# family, Cal subclass or stock, config overrides, calibrator. Every row keeps all detections in the pipeline's
# output (Deformable DETR: top 100 of 12 x 5; DETR: one per query), except RT-DETR, which keeps the top 12 of
# 12 x 5 and so gets a class-agnostic (ranking-preserving) map here; its class-wise fold is checked on the logits.
PIPELINE_CASES = [
    ("deformable_detr", False, {}, "platt", False),
    ("deformable_detr", False, {}, "platt", True),
    ("deformable_detr", True, {}, "temperature", True),
    ("deformable_detr", False, {"with_box_refine": True}, "temperature", False),
    ("deformable_detr", True, {"with_box_refine": True, "two_stage": True}, "platt", True),
    ("rt_detr", False, {}, "platt", False),
    ("rt_detr", True, {}, "temperature", False),
    ("detr", False, {}, "softmax_temperature", False),
    ("detr", True, {}, "softmax_temperature", False),
]


@pytest.mark.parametrize(("family", "cal", "overrides", "kind", "class_wise"), PIPELINE_CASES)
def test_stock_pipeline_on_folded_checkpoint_returns_the_calibrated_scores(tmp_path, family, cal, overrides, kind,
                                                                            class_wise):
    model = build(family, cal, **overrides)
    raw_folder = save(model, tmp_path / "raw")
    calibrator = fitted_softmax() if kind == "softmax_temperature" else fitted(kind, class_wise)
    fold_calibrator(model, calibrator, fitted_on={"images": "synthetic"})
    folded_folder = save(model, tmp_path / "folded")

    image_list = images()
    raw, folded = pipeline_scores(raw_folder, image_list), pipeline_scores(folded_folder, image_list)
    label2id = model.config.label2id
    for raw_image, folded_image in zip(raw, folded):
        assert len(raw_image) == len(folded_image) > 0
        if kind == "softmax_temperature":
            # The pipeline has no logits; compare with the model's own logits run through the calibrator.
            continue
        expected = by_label(calibrate_pipeline_outputs(raw_image, calibrator, label2id))
        actual = by_label(folded_image)
        assert expected.keys() == actual.keys()
        for label in expected:
            np.testing.assert_allclose(actual[label], expected[label], atol=1e-5)
    if kind == "softmax_temperature":
        # DETR: one detection per query; the folded model's scores = the calibrator on the raw logit rows.
        processor = build_image_processor(64, "DetrImageProcessor")
        inputs = processor(images=image_list[0], return_tensors="pt")
        stock_raw = AutoModelForObjectDetection.from_pretrained(raw_folder).eval()
        with torch.no_grad():
            rows = stock_raw(**inputs).logits[0]
        expected = np.sort(calibrator.transform(rows.numpy()))
        np.testing.assert_allclose(np.sort([item["score"] for item in folded[0]]), expected, atol=1e-5)
    assert AutoModelForObjectDetection.from_pretrained(folded_folder).config.folded_calibration[0]["kind"] == (
        type(calibrator).__name__)


def fold_class_wise(family: str, seed: int, **overrides):
    """A Cal model's outputs on random images before and after a class-wise Platt fold; asserts that every
    (query, class) score, not only the top ones, is the calibrator's output and that the other decoder layers'
    logits and the boxes are untouched (the head is untied first)."""
    model = build(family, cal=True, **overrides)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(pixel_values=pixel_values)
    calibrator = fitted("platt", class_wise=True)
    assert len(calibrator.class_params_) == NUM_LABELS
    fold_calibrator(model, calibrator)
    with torch.no_grad():
        after = model(pixel_values=pixel_values)
    labels = np.broadcast_to(np.arange(NUM_LABELS), before.logits.shape).reshape(-1)
    expected = calibrator.transform(before.logits.sigmoid().reshape(-1).numpy(), labels)
    np.testing.assert_allclose(after.logits.sigmoid().reshape(-1).double().numpy(), expected, atol=1e-6)
    layers_before = decoder_layer_logits(model, before, raw=False)  # folded or not: the weights' own logits
    layers_after = decoder_layer_logits(model, after, raw=False)
    torch.testing.assert_close(layers_after[:, :-1], layers_before[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, rtol=0, atol=0)
    return before, after


@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": True, "two_stage": True}])
def test_deformable_detr_class_wise_fold_keeps_other_layers_and_proposals(overrides):
    before, after = fold_class_wise("deformable_detr", 1, **overrides)
    if overrides.get("two_stage"):
        torch.testing.assert_close(after.init_reference_points, before.init_reference_points, rtol=0, atol=0)
        torch.testing.assert_close(after.enc_outputs_coord_logits, before.enc_outputs_coord_logits, rtol=0, atol=0)


def test_rt_detr_class_wise_fold_keeps_other_layers_and_query_selection():
    before, after = fold_class_wise("rt_detr", 2)
    torch.testing.assert_close(after.enc_topk_bboxes, before.enc_topk_bboxes, rtol=0, atol=0)


def _coco_ap(model, processor_class, pixel_values, references):
    processor = build_image_processor(64, processor_class)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    sizes = torch.tensor([[64, 64]] * len(pixel_values))
    predictions = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    return coco_average_precision(predictions, references)


@pytest.mark.parametrize(("family", "kind"), [("deformable_detr", "platt"), ("rt_detr", "temperature"),
                                              ("detr", "softmax_temperature")])
def test_class_agnostic_fold_leaves_coco_ap_exactly_unchanged(family, kind):
    model = build(family)
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(6, 3, 64, 64, generator=generator)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    # References: some of the model's own boxes, not its best ones (so AP is neither 0 nor 1), with their predicted labels.
    processor_class = MODEL_FAMILIES[family].image_processor_class
    raw_predictions = build_image_processor(64, processor_class).post_process_object_detection(
        outputs, threshold=0.0, target_sizes=torch.tensor([[64, 64]] * 6))
    references = [{"boxes": p["boxes"][1:6:2], "labels": p["labels"][1:6:2]} for p in raw_predictions]
    before = _coco_ap(model, processor_class, pixel_values, references)
    calibrator = fitted_softmax() if kind == "softmax_temperature" else fitted(kind)
    fold_calibrator(model, calibrator)
    after = _coco_ap(model, processor_class, pixel_values, references)
    assert 0 < before["map"] < 1
    assert after.keys() == before.keys()
    for key in before:  # exactly equal, NaN (an empty size range) included
        np.testing.assert_array_equal(after[key], before[key])


def test_refusals_name_the_reason(tmp_path):
    deformable, detr = build("deformable_detr"), build("detr")
    with pytest.raises(CalibrationFoldError, match="not an affine map.*calibrate_pipeline_outputs"):
        fold_calibrator(deformable, fitted("isotonic"))
    with pytest.raises(CalibrationFoldError, match="not an affine map"):
        fold_calibrator(deformable, fitted("histogram", class_wise=True))
    with pytest.raises(CalibrationFoldError, match="softmax head .class-wise.*shared normaliser"):
        fold_calibrator(detr, fitted("platt", class_wise=True))
    with pytest.raises(CalibrationFoldError, match="softmax head .class-agnostic"):
        fold_calibrator(detr, fitted("temperature"))
    with pytest.raises(CalibrationFoldError, match="for softmax heads"):
        fold_calibrator(deformable, fitted_softmax())
    with pytest.raises(CalibrationFoldError, match="not fitted"):
        fold_calibrator(deformable, PlattScaling())
    reversed_map = fitted("platt")
    reversed_map.params_ = {"slope": -1.0, "bias": 0.0}
    with pytest.raises(CalibrationFoldError, match="slopes must be positive"):
        fold_calibrator(deformable, reversed_map)
    modulating = build("deformable_detr", cal=True)
    modulating.config.modulate_at_inference = True
    with pytest.raises(CalibrationFoldError, match="modulate_at_inference"):
        fold_calibrator(modulating, fitted("temperature"))
    # Nothing was written by the refused folds.
    assert getattr(deformable.config, "folded_calibration", None) is None


def test_second_fold_refused_unless_composed(tmp_path):
    model = build("deformable_detr")
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = model(pixel_values=pixel_values).logits.sigmoid().reshape(-1).double().numpy()
    first, second = fitted("temperature"), fitted("platt", seed=1)
    fold_calibrator(model, first, fitted_on={"split": "a"})
    with pytest.raises(CalibrationFoldError, match="already holds a folded calibrator.*compose=True"):
        fold_calibrator(model, second)
    fold_calibrator(model, second, fitted_on={"split": "b"}, compose=True)
    with torch.no_grad():
        twice = model(pixel_values=pixel_values).logits.sigmoid().reshape(-1).double().numpy()
    np.testing.assert_allclose(twice, second.transform(first.transform(raw)), atol=1e-6)
    model.save_pretrained(tmp_path)
    records = AutoModelForObjectDetection.from_pretrained(tmp_path).config.folded_calibration
    assert [record["fitted_on"]["split"] for record in records] == ["a", "b"]
    assert records[0]["logit_slope"] == pytest.approx([1 / first.temperature] * NUM_LABELS)


def test_isotonic_on_pipeline_outputs(tmp_path):
    model = build("deformable_detr")
    folder = save(model, tmp_path / "raw")
    calibrator = fitted("isotonic", class_wise=True)
    (detections,) = pipeline_scores(folder, images(1))
    calibrated = calibrate_pipeline_outputs(detections, calibrator, model.config.label2id, threshold=0.2)
    scores = np.array([d["score"] for d in detections])
    labels = np.array([model.config.label2id[d["label"]] for d in detections])
    expected = calibrator.transform(scores, labels)
    assert [d["score"] for d in calibrated] == pytest.approx(sorted(expected[expected >= 0.2], reverse=True))
    with pytest.raises(ValueError, match="not in label2id"):
        calibrate_pipeline_outputs([{"score": 0.5, "label": "zebra", "box": {}}], calibrator, model.config.label2id)


def test_softmax_temperature_by_hand():
    """q = max_c softmax(z / T)_c over the real classes, computed directly."""
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
    calibrator = SoftmaxTemperatureScaling()
    calibrator.params_ = {"temperature": 2.0}
    scaled = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(calibrator.transform(logits), scaled[:, :-1].max(axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="class-agnostic"):
        SoftmaxTemperatureScaling(class_wise=True)


def test_unfold_restores_the_raw_scores():
    model = build("rt_detr")
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        raw = model(pixel_values=pixel_values).logits
    fold_calibrator(model, fitted("temperature"))
    fold_calibrator(model, fitted("platt", class_wise=True), compose=True)
    unfold_calibration(model)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, raw, rtol=1e-5, atol=1e-5)
    assert model.config.folded_calibration is None
    with pytest.raises(CalibrationFoldError, match="holds no folded calibration"):
        unfold_calibration(model)
