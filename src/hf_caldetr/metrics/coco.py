"""COCO average precision (pycocotools) on the same per-image predictions and references as D-ECE.

AP uses every detection given (no score threshold; pycocotools keeps the top 100 per image by score), boxes
converted from xyxy to xywh. References may carry ``iscrowd`` and ``area`` per box (COCO's own annotations do:
its ``area`` is the mask area, which decides small/medium/large); without them boxes are not crowd and the area
is ``w * h``. A summary value pycocotools cannot compute (no ground truth in that area range) is NaN, where
pycocotools prints -1.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .inputs import FlatBoxes, flatten_pair, optional_reference_column

# The order of COCOeval.stats, named as torchmetrics names them.
COCO_SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                     "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` ``(x1, y1, x2, y2)`` to ``(x1, y1, w, h)``, COCO's box format."""
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """``[N]`` areas of ``[N, 4]`` xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _ground_truth_dataset(references: FlatBoxes, iscrowd: np.ndarray, areas: np.ndarray) -> dict:
    xywh = xyxy_to_xywh(references.boxes)
    # Ids start at 1: COCOeval stores matched annotation ids with 0 meaning "unmatched".
    annotations = [
        {"id": i + 1, "image_id": int(image) + 1, "category_id": int(label), "bbox": box.tolist(),
         "area": float(area), "iscrowd": int(crowd)}
        for i, (image, label, box, area, crowd) in enumerate(
            zip(references.image_index, references.labels, xywh, areas, iscrowd))
    ]
    return {"images": [{"id": i + 1} for i in range(references.num_images)],
            "annotations": annotations, "categories": []}


def _quiet(function, *args):
    """Call a pycocotools function with its progress printing silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def average_precision_flat(predictions: FlatBoxes, references: FlatBoxes, iscrowd=None, areas=None) -> dict:
    """``coco_average_precision`` on flattened inputs; ``iscrowd`` and ``areas`` are ``[num references]``."""
    if iscrowd is None:
        iscrowd = np.zeros(len(references.labels))
    if areas is None:
        areas = box_areas(references.boxes)
    dataset = _ground_truth_dataset(references, iscrowd, areas)
    categories = np.union1d(references.labels, predictions.labels)
    dataset["categories"] = [{"id": int(c)} for c in categories]

    ground_truth = COCO()
    ground_truth.dataset = dataset
    _quiet(ground_truth.createIndex)
    if len(predictions.scores):
        rows = np.column_stack([predictions.image_index + 1, xyxy_to_xywh(predictions.boxes), predictions.scores,
                                predictions.labels])
        detections = _quiet(ground_truth.loadRes, rows)
    else:
        # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth.
        detections = COCO()
        detections.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
        _quiet(detections.createIndex)

    evaluator = COCOeval(ground_truth, detections, iouType="bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return {key: (float("nan") if value < 0 else float(value)) for key, value in zip(COCO_SUMMARY_KEYS,
                                                                                      evaluator.stats)}


def coco_average_precision(predictions, references) -> dict:
    """COCO AP@[.5:.95] and the other eleven COCO summary values.

    Args:
        predictions: list (one per image) of dicts with ``boxes`` (absolute xyxy), ``scores``, ``labels``; all
            detections, no score threshold.
        references: list of dicts with ``boxes`` (absolute xyxy), ``labels`` and optionally ``iscrowd`` and
            ``area`` per box.

    Returns:
        dict with ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``, ``mar_1``,
        ``mar_10``, ``mar_100``, ``mar_small``, ``mar_medium``, ``mar_large`` (fractions; NaN where undefined).
    """
    flat_predictions, flat_references = flatten_pair(predictions, references)
    return average_precision_flat(flat_predictions, flat_references, *crowd_and_area(references, flat_references))


def crowd_and_area(references, flat_references: FlatBoxes) -> tuple[np.ndarray, np.ndarray]:
    """Per-box ``iscrowd`` (default 0) and ``area`` (default the box area) of references, ``[M]`` each."""
    count = len(flat_references.labels)
    iscrowd = optional_reference_column(references, "iscrowd", count, np.zeros(count))
    return iscrowd, optional_reference_column(references, "area", count, box_areas(flat_references.boxes))
