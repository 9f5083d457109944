"""Per-detection uncertainty for D-UCE: ``post_process(..., uncertainties=True)`` against an independent
computation for every family (stock and Cal), folded calibrations, processors that reorder their output, and the
D-UCE that ``evaluate_model`` / ``write_metrics`` report and draw."""

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from tiny import tiny_batch, tiny_deformable_kwargs, tiny_detr_kwargs, tiny_rt_detr_kwargs

from hf_caldetr.calibrators import PlattScaling, SoftmaxTemperatureScaling
from hf_caldetr.data import build_image_processor
from hf_caldetr.evaluation import (
    UNCERTAINTY_KEY,
    evaluate_model,
    iter_detections,
    labels_to_references,
    post_process,
    select_detections,
    write_metrics,
)
from hf_caldetr.folding import fold_calibrator
from hf_caldetr.metrics import detection_uce
from hf_caldetr.training import MODEL_FAMILIES, decoder_layer_logits, layer_logits_options

ORIG_SIZE = (48, 80)  # (height, width): not square
KWARGS = {"deformable_detr": tiny_deformable_kwargs, "detr": tiny_detr_kwargs, "rt_detr": tiny_rt_detr_kwargs}
CASES = [(family, cal) for family in KWARGS for cal in (False, True)]


def build(family: str, cal: bool, seed: int = 0, **overrides):
    """A tiny random model whose decoder layers disagree enough for uncertainties spread over (0, 1), with scores
    around 0.5: every layer's class head gets its own random weights. DETR has one classifier, and its tiny random
    decoder layers barely change their input: they get larger weights, and its queries distinct embeddings."""
    spec = MODEL_FAMILIES[family]
    config_class, model_class = ((spec.cal_config_class, spec.cal_model_class) if cal
                                 else (spec.config_class, spec.model_class))
    torch.manual_seed(seed)
    model = model_class(config_class(**KWARGS[family](**overrides)))
    generator = torch.Generator().manual_seed(seed + 1)

    def randn(tensor, std):
        return torch.randn(tensor.shape, generator=generator) * std

    with torch.no_grad():
        if family == "detr":
            queries = model.model.query_position_embeddings.weight
            queries.copy_(randn(queries, 1.0))
            for module in model.model.decoder.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(randn(module.weight, 0.15))
            classifier = model.class_labels_classifier
            classifier.weight.copy_(randn(classifier.weight, 0.3))
            classifier.bias.zero_()
            classifier.bias[-1] = -1.0  # the no-object column
        else:
            for head in spec.layer_class_heads(model):  # tied heads get their own parameters: untied
                head.weight = torch.nn.Parameter(randn(head.weight, 0.1))
                head.bias = torch.nn.Parameter(randn(head.bias, 0.5))
    return model.eval()


def processor(family: str):
    return build_image_processor(64, MODEL_FAMILIES[family].image_processor_class)


def labels_of(batch_size: int) -> list[dict]:
    return [{"orig_size": torch.tensor(ORIG_SIZE)} for _ in range(batch_size)]


def layer_logits_by_hooks(model, family: str, pixel_values) -> tuple[torch.Tensor, object]:
    """Every decoder layer's class logits ``[B, L, Q, C]`` read off the modules as the forward calls them (forward
    hooks), not from any output field, and the outputs of that forward."""
    captured, hooks = {}, []
    layers = model.config.decoder_layers
    if family == "detr":  # each decoder layer's output, through the decoder's final layer norm and the classifier
        modules = model.model.decoder.layers
    elif family == "deformable_detr":
        modules = [model.class_embed[level] for level in range(layers)]
    else:
        modules = model.model.decoder.class_embed
    for level, module in enumerate(modules):
        def hook(_, __, output, level=level):
            captured[level] = output[0] if isinstance(output, tuple) else output
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values)
    finally:
        for handle in hooks:
            handle.remove()
    if family == "detr":
        with torch.no_grad():
            per_layer = [model.class_labels_classifier(model.model.decoder.layernorm(captured[level]))
                         for level in range(layers - 1)] + [outputs.logits]
    else:
        per_layer = [captured[level] for level in range(layers)]
    return torch.stack(per_layer, dim=1), outputs


def hand_uncertainties(model, family: str, pixel_values, predictions) -> list[np.ndarray]:
    """By hand: ``tanh(torch.var(Z[:, q, c], unbiased=True))`` for each detection, its ``(q, c)`` found by matching
    its box and score against every query's box and score of its label."""
    layer_logits, outputs = layer_logits_by_hooks(model, family, pixel_values)
    uncertainty = torch.tanh(torch.var(layer_logits.double(), dim=1, unbiased=True))  # [B, Q, C]
    softmax = MODEL_FAMILIES[family].softmax_head
    scores = outputs.logits.softmax(-1) if softmax else outputs.logits.sigmoid()
    height, width = ORIG_SIZE
    expected = []
    for image, prediction in enumerate(predictions):
        cx, cy, w, h = outputs.pred_boxes[image].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor(
            [width, height, width, height])
        values = []
        for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
            distance = (boxes - torch.from_numpy(box)).abs().amax(-1) + (scores[image, :, label] - float(score)).abs()
            query = int(distance.argmin())
            assert float(distance[query]) < 1e-4, "a detection with no query of its box and score"
            values.append(float(uncertainty[image, query, label]))
        expected.append(np.array(values))
    return expected


@pytest.mark.parametrize("family, cal", CASES, ids=[f"{f}-{'cal' if c else 'stock'}" for f, c in CASES])
def test_uncertainties_equal_the_hand_computation(family, cal):
    model = build(family, cal)
    pixel_values, _ = tiny_batch(batch_size=2, size=64)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, **layer_logits_options(model))
    predictions = post_process(outputs, labels_of(2), processor(family), uncertainties=True, model=model)
    expected = hand_uncertainties(model, family, pixel_values, predictions)
    for prediction, values in zip(predictions, expected):
        assert prediction[UNCERTAINTY_KEY].dtype == np.float64
        assert prediction[UNCERTAINTY_KEY].shape == prediction["scores"].shape
        assert len(values) > 0
        np.testing.assert_allclose(prediction[UNCERTAINTY_KEY], values, rtol=1e-6, atol=1e-6)
        assert np.all((prediction[UNCERTAINTY_KEY] >= 0) & (prediction[UNCERTAINTY_KEY] < 1))
    # The uncertainties are spread, not all ~0 or all saturated: the comparison above means something.
    pooled = np.concatenate([prediction[UNCERTAINTY_KEY] for prediction in predictions])
    assert 0.02 < np.median(pooled) < 0.98 and pooled.std() > 0.02
    # Without uncertainties=True the predictions are what they were.
    plain = post_process(outputs, labels_of(2), processor(family))
    assert all(UNCERTAINTY_KEY not in prediction for prediction in plain)
    for with_u, without in zip(predictions, plain):
        np.testing.assert_array_equal(with_u["scores"], without["scores"])


@pytest.mark.parametrize("family", list(KWARGS))
def test_the_selection_is_the_processors_own(family):
    """select_detections redoes the processor's selection on the same logits: same labels, scores, order."""
    model = build(family, cal=False)
    pixel_values, _ = tiny_batch(batch_size=2, size=64)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    results = processor(family).post_process_object_detection(
        outputs, threshold=0.0, target_sizes=torch.tensor([ORIG_SIZE] * 2),
        **({"top_k": 100} if family == "deformable_detr" else {}))
    softmax = MODEL_FAMILIES[family].softmax_head
    for image, (queries, classes) in enumerate(select_detections(outputs.logits,
                                                                 MODEL_FAMILIES[family].detection_selection)):
        scores = outputs.logits[image].softmax(-1) if softmax else outputs.logits[image].sigmoid()
        assert torch.equal(results[image]["labels"], classes)
        # (A sigmoid over another tensor shape may round differently in the last bit.)
        torch.testing.assert_close(results[image]["scores"], scores[queries, classes], rtol=1e-6, atol=1e-7)


class ReversingProcessor:
    """An image processor whose detections come in reverse order: not the order the selection gives."""

    def __init__(self, inner):
        self.inner = inner

    def post_process_object_detection(self, outputs, threshold=0.5, target_sizes=None):
        results = self.inner.post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes)
        return [{key: value.flip(0) for key, value in result.items()} for result in results]


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr"])
def test_each_uncertainty_follows_its_detection_whatever_the_processors_order(family):
    model = build(family, cal=False)
    pixel_values, _ = tiny_batch(batch_size=2, size=64)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, **layer_logits_options(model))
    # Deformable DETR's processor without top_k keeps its default 100 of the 12 * 5 scores: all of them.
    straight = post_process(outputs, labels_of(2), processor(family), uncertainties=True, model=model)
    reversed_ = post_process(outputs, labels_of(2), ReversingProcessor(processor(family)), uncertainties=True,
                             model=model)
    for a, b in zip(straight, reversed_):
        np.testing.assert_array_equal(b["scores"], a["scores"][::-1])
        np.testing.assert_array_equal(b[UNCERTAINTY_KEY], a[UNCERTAINTY_KEY][::-1])


def test_uncertainties_need_the_model():
    model = build("rt_detr", cal=False)
    with torch.no_grad():
        outputs = model(pixel_values=tiny_batch(batch_size=1, size=64)[0])
    with pytest.raises(ValueError, match="needs the model"):
        post_process(outputs, labels_of(1), processor("rt_detr"), uncertainties=True)


@pytest.mark.parametrize("family, calibrator", [
    ("deformable_detr", "platt"), ("rt_detr", "platt"), ("detr", "softmax_temperature")])
def test_a_folded_calibration_changes_the_scores_not_the_uncertainties(family, calibrator):
    rng = np.random.default_rng(0)
    if calibrator == "platt":
        scores = rng.uniform(0.01, 0.99, 2000)
        labels = rng.integers(0, 5, 2000)
        fitted = PlattScaling(class_wise=True, min_class_detections=50).fit(
            scores, rng.uniform(0, 1, 2000) < scores ** (1.5 + 0.3 * labels), labels)
    else:
        fitted = SoftmaxTemperatureScaling().fit(rng.normal(0, 3, (1000, 6)), rng.uniform(0, 1, 1000) < 0.3)
    model = build(family, cal=False)
    pixel_values, _ = tiny_batch(batch_size=2, size=64)

    def detections():
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, **layer_logits_options(model))
        return post_process(outputs, labels_of(2), processor(family), uncertainties=True, model=model), outputs

    raw, raw_outputs = detections()
    raw_layers = decoder_layer_logits(model, raw_outputs)
    fold_calibrator(model, fitted)
    folded, folded_outputs = detections()
    # The fold moved the final logits, but the logits the uncertainty is computed from are the raw ones again.
    assert not torch.allclose(folded_outputs.logits, raw_outputs.logits, atol=1e-3)
    torch.testing.assert_close(decoder_layer_logits(model, folded_outputs), raw_layers, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoder_layer_logits(model, folded_outputs, raw=False), raw_layers, atol=1e-3)
    # Each detection (a query's box and a class) keeps the uncertainty it had before the fold, wherever the
    # calibrated scores put it in the processor's order.
    def by_detection(predictions, key):
        return {(image, tuple(np.round(box, 3)), int(label)): value for image, prediction in enumerate(predictions)
                for box, label, value in zip(prediction["boxes"], prediction["labels"], prediction[key])}

    before, after = by_detection(raw, UNCERTAINTY_KEY), by_detection(folded, UNCERTAINTY_KEY)
    # RT-DETR keeps the top Q of the Q * C scores, which the class-wise map reorders: compare the ones in both.
    common = after.keys() & before.keys()
    assert len(common) >= len(before) // 2
    for detection in common:
        assert after[detection] == pytest.approx(before[detection], abs=1e-5)
    raw_scores, folded_scores = by_detection(raw, "scores"), by_detection(folded, "scores")
    assert max(abs(folded_scores[key] - raw_scores[key]) for key in common) > 0.01


def test_a_one_layer_model_has_no_uncertainty():
    from hf_caldetr.training import has_layer_logits

    model = build("detr", cal=False, decoder_layers=1)
    assert not has_layer_logits(model) and has_layer_logits(build("detr", cal=False))
    batch = {"pixel_values": tiny_batch(batch_size=1, size=64)[0], "labels": labels_of(1)}
    for label in batch["labels"]:
        label.update(boxes=torch.zeros(0, 4), class_labels=torch.zeros(0, dtype=torch.int64))
    (predictions, _, _), = list(iter_detections(model, [batch], processor("detr")))
    assert UNCERTAINTY_KEY not in predictions[0]
    with pytest.raises(ValueError, match="does not expose every decoder layer's logits"):
        list(iter_detections(model, [batch], processor("detr"), uncertainties=True))


# ------------------------------------------------------------------------------ evaluate_model and its files


@pytest.fixture(scope="module", params=list(KWARGS))
def evaluated(request):
    """A tiny model of each family over two batches whose ground truth is each image's top-4 detections (so
    both outcomes occur), with its predictions and references gathered by hand."""
    family = request.param
    model = build(family, cal=False)
    image_processor = processor(family)
    height, width = ORIG_SIZE
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    batches, predictions, references = [], [], []
    for seed in range(2):
        pixel_values, _ = tiny_batch(batch_size=2, size=64, seed=seed)
        labels = labels_of(2)
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, **layer_logits_options(model))
        detected = post_process(outputs, labels, image_processor, uncertainties=True, model=model)
        for label, prediction in zip(labels, detected):
            top = np.argsort(-prediction["scores"], kind="stable")[:4]
            xyxy = torch.from_numpy(prediction["boxes"][top]) / scale
            label["boxes"] = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            label["class_labels"] = torch.from_numpy(prediction["labels"][top])
        batches.append({"pixel_values": pixel_values, "pixel_mask": torch.ones(2, 64, 64, dtype=torch.int64),
                        "labels": labels})
        predictions += detected
        references += labels_to_references(labels)
    return family, model, image_processor, batches, predictions, references


def test_evaluate_model_reports_d_uce(evaluated):
    family, model, image_processor, batches, predictions, references = evaluated
    result = evaluate_model(model, batches, image_processor)
    assert np.isfinite(result["d_uce"]) and 0 <= result["d_uce"] <= 1
    expected = detection_uce(predictions, references)
    assert result["d_uce"] == pytest.approx(expected["d_uce"], abs=1e-12)
    assert result["uncertainty_calibration"]["bin_counts"] == expected["bin_counts"]
    assert sum(expected["bin_counts"]) == result["num_detections"] > 0
    # Asked not to, it measures no D-UCE.
    assert "d_uce" not in evaluate_model(model, batches, image_processor, uncertainties=False)


def test_a_calibrator_keeps_the_uncertainties(evaluated):
    """A score-space calibrator maps the scores only: D-UCE is measured on the detections its scores keep, with
    their own (raw) uncertainties."""
    family, model, image_processor, batches, predictions, references = evaluated

    counted = np.concatenate([prediction["scores"] for prediction in predictions])
    cut = float(np.median(counted[counted >= 0.3]))

    def halve(scores):
        return np.where(scores >= cut, scores, scores / 2)

    class Halved:
        """Halves the scores below the median counted one: fewer detections reach the protocol's 0.3."""

        def transform(self, scores, labels=None):
            return halve(np.asarray(scores))

    result = evaluate_model(model, batches, image_processor, calibrator=Halved())
    halved = [{**prediction, "scores": halve(prediction["scores"])} for prediction in predictions]
    expected = detection_uce(halved, references)
    assert expected["num_detections"] < detection_uce(predictions, references)["num_detections"]
    assert result["d_uce"] == pytest.approx(expected["d_uce"], abs=1e-12) and np.isfinite(result["d_uce"])


def test_write_metrics_writes_d_uce_and_its_diagram(evaluated, tmp_path):
    family, model, image_processor, batches, _, _ = evaluated
    results = {"in_domain": evaluate_model(model, batches, image_processor),
               "out_of_domain": evaluate_model(model, batches[:1], image_processor)}
    metrics = write_metrics(results, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for split in results:
        assert saved[split]["d_uce"] == metrics[split]["d_uce"] == pytest.approx(results[split]["d_uce"])
    path = tmp_path / "uncertainty_diagram.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[:2] == (720, 1200)  # two 5 x 6 inch panels at 120 dpi
    for half in (pixels[:, :600], pixels[:, 600:]):
        assert (half[..., :3] < 0.9).mean() > 0.02  # drawn on, not blank
    assert (tmp_path / "reliability_diagram.png").is_file()


def test_no_uncertainties_no_diagram(evaluated, tmp_path):
    family, model, image_processor, batches, _, _ = evaluated
    results = {"in_domain": evaluate_model(model, batches, image_processor, uncertainties=False)}
    metrics = write_metrics(results, tmp_path)
    assert "d_uce" not in metrics["in_domain"]
    assert (tmp_path / "reliability_diagram.png").is_file() and not (tmp_path / "uncertainty_diagram.png").exists()
