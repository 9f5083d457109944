"""hf_caldetr.evaluation: fitting a calibrator from a detector, and evaluating with one, against the metrics'
own functions applied by hand (match_detections, evaluate_detections, the calibrators' fit/transform)."""

import json

import numpy as np
import pytest
import torch
from tiny import tiny_batch, tiny_deformable_kwargs
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

from hf_caldetr.calibrators import HistogramBinning, TemperatureScaling
from hf_caldetr.data import build_image_processor, load_coco_folder, make_collate_fn
from hf_caldetr.evaluation import (
    collect_matches,
    evaluate_model,
    fit_calibrator,
    labels_to_references,
    post_process,
)
from hf_caldetr.metrics import coco_average_precision, evaluate_detections, match_detections

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

    categories = model.config.num_labels  # evaluate_model averages over the model's classes
    expected_raw = evaluate_detections(predictions, references, image_sizes=sizes, categories=categories)
    by_hand_calibrated = [{**p, "scores": calibrator.transform(p["scores"])} for p in predictions]
    expected_calibrated = evaluate_detections(by_hand_calibrated, references, image_sizes=sizes,
                                              categories=categories)
    for key in ("map", "map_50", "d_ece", "laece", "lrp", "olrp", "laece_0", "laace_0", "oce", "position_d_ece",
                "num_detections", "precision"):
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


# ------------------------------------------------------------------------------------------------ crowd regions

# (width, height) of each image and its annotations: (COCO category id, x, y, w, h). Every 4th annotation is a
# crowd region; image 2's only annotation is one; crowd regions overlap ordinary boxes of their class.
CROWD_IMAGES = [(64, 48), (40, 40), (80, 60), (50, 70)]
CROWD_BOXES = [
    [(1, 2, 3, 20, 10), (7, 30.5, 10, 33.5, 38), (3, 5, 20, 12, 14)],
    [(3, 0, 0, 40, 40)],
    [(1, 4, 4, 20, 16), (1, 10, 8, 60, 40), (7, 50, 30, 25, 25), (3, 60, 2, 18, 10)],
    [(7, 5, 5, 20, 30), (1, 25, 35, 20, 30), (3, 2, 40, 46, 28), (7, 0, 0, 50, 70)],
]


def write_crowded_coco(folder):
    """A COCO folder whose every 4th annotation is a crowd region; returns (json path, images dir, coco dict)."""
    from PIL import Image

    images_dir = folder / "images"
    images_dir.mkdir()
    images, annotations = [], []
    for image_id, ((width, height), boxes) in enumerate(zip(CROWD_IMAGES, CROWD_BOXES), start=1):
        pixels = np.random.default_rng(image_id).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        for category_id, *box in boxes:
            annotations.append({"id": 100 + len(annotations), "image_id": image_id, "category_id": category_id,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(len(annotations) % 4 == 3)})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "truck"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(path), str(images_dir), coco


def pycocotools_map(annotations_json, detections) -> float:
    """COCO AP@[.5:.95] of pycocotools itself on the JSON file, ``detections`` in its results format."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(annotations_json)
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_crowd_regions_reach_the_references_not_the_training_targets(tmp_path):
    annotations_json, images_dir, coco = write_crowded_coco(tmp_path)
    crowd_count = sum(annotation["iscrowd"] for annotation in coco["annotations"])
    assert crowd_count == 3 and len(coco["annotations"]) == 12
    data = load_coco_folder(annotations_json, images_dir)
    assert data.crowd_regions == crowd_count
    label_of = {1: 0, 3: 1, 7: 2}  # ClassLabel ids follow the COCO ids' order

    # Training: no crowd box among the targets, augmented or not.
    for augment in (False, True):
        loader = torch.utils.data.DataLoader(
            data.dataset, batch_size=2, collate_fn=make_collate_fn(build_image_processor(64), augment, seed=0))
        labels = [label for batch in loader for label in batch["labels"]]
        for label, image in zip(labels, coco["images"]):
            own = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            ordinary = [label_of[a["category_id"]] for a in own if not a["iscrowd"]]
            if augment:
                assert len(label["class_labels"]) <= len(ordinary)
            else:
                assert label["class_labels"].tolist() == ordinary
                assert label["crowd_class_labels"].tolist() == [label_of[a["category_id"]] for a in own
                                                                if a["iscrowd"]]
            assert (label["class_labels"] >= 0).all() and len(label["boxes"]) == len(label["class_labels"])

    # Evaluation: the references of the collated batches hold every box, crowd regions flagged, in absolute xyxy
    # of the original image (the 64x64 resize undone).
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=3,
                                         collate_fn=make_collate_fn(build_image_processor(64)))
    references = [reference for batch in loader for reference in labels_to_references(batch["labels"])]
    assert len(references) == len(coco["images"])
    for reference, image in zip(references, coco["images"]):
        own = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert set(reference) >= {"boxes", "labels", "iscrowd"} and reference["iscrowd"].dtype == np.int64
        for crowd in (0, 1):
            expected = [a for a in own if a["iscrowd"] == crowd]
            chosen = reference["iscrowd"] == crowd
            assert reference["labels"][chosen].tolist() == [label_of[a["category_id"]] for a in expected]
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in expected)]
            np.testing.assert_allclose(reference["boxes"][chosen], np.reshape(xyxy, (-1, 4)), atol=1e-3)
    assert sum(int(reference["iscrowd"].sum()) for reference in references) == crowd_count

    # A perfect detector (each ordinary box found, score 1) has AP 1, as pycocotools has on the JSON file; so has
    # one that also fires on the crowd regions: detections on crowd regions are ignored.
    def detections(with_crowd):
        return [{"boxes": r["boxes"][keep], "labels": r["labels"][keep], "scores": np.ones(int(keep.sum()))}
                for r in references for keep in [(r["iscrowd"] == 0) | with_crowd]]

    def coco_detections(with_crowd):
        return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in coco["annotations"] if with_crowd or not a["iscrowd"]]

    for with_crowd in (False, True):
        ours = coco_average_precision(detections(with_crowd), references)["map"]
        assert ours == pycocotools_map(annotations_json, coco_detections(with_crowd)) == 1.0
    # Dropping the crowd regions (what the loader used to do) turns the detections on them into false positives.
    uncrowded = [{key: value[r["iscrowd"] == 0] for key, value in r.items()} for r in references]
    assert coco_average_precision(detections(True), uncrowded)["map"] < 0.95
    # Every matching-based metric sees the same detections as pycocotools: the detections on crowd regions are
    # ignored, the others are true positives with IoU 1 at score 1 - so D-ECE, LaECE and LRP are 0, and OCE
    # (binary Brier 2 (1 - 1)^2 per object) is 0 too. The score is just below 1: a score of exactly 1.0 lies in
    # no LaECE bin in the official convention.
    near_one = float(np.nextafter(1.0, 0.0))
    for with_crowd in (False, True):
        predictions = [{**entry, "scores": np.full(len(entry["scores"]), near_one)} for entry in detections(with_crowd)]
        result = evaluate_detections(predictions, references, categories=3, compute_ap=False)
        assert result["num_ignored"] == (3 if with_crowd else 0)
        assert result["num_detections"] == 9 and result["precision"] == 1.0
        for key in ("d_ece", "laece", "lrp", "laece_0", "laace_0", "oce"):
            assert result[key] == pytest.approx(0.0, abs=1e-12), key
    # Without the flags, the detections on the regions are false positives: 9 / 11 (image 2, whose only annotation
    # is a crowd region, then has no ground truth and the D-ECE protocol leaves its detection out).
    assert evaluate_detections(detections(True), uncrowded, compute_ap=False)["precision"] == pytest.approx(9 / 11)
