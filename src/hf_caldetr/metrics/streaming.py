"""Accuracy and calibration of a detector in one pass: batch by batch, on one process or many.

``DetectionCalibrationMetric.update`` matches each batch as it arrives (matching is per image, so batches are
independent) and keeps only the kept detections' scores, outcomes, labels and IoUs, plus what COCO AP needs
(every detection's box, score and label, and the ground truth) when ``compute_ap`` is on. ``compute`` pools
them: COCO AP, D-ECE, LaECE, and when available position-dependent D-ECE and D-UCE, in one dict.

Distributed evaluation: gather each batch's per-image dicts with accelerate's
``accelerator.gather_for_metrics(outputs, use_gather_object=True)`` (the lists differ in length across
processes) and call ``update`` on every process or only on the main one; the result depends only on the
images seen, never on how they were batched.
"""

from __future__ import annotations

import numpy as np

from .coco import COCO_SUMMARY_KEYS, average_precision_flat, crowd_and_area
from .d_ece import box_position_features, calibration_error, position_calibration_error
from .inputs import FlatBoxes, flatten_pair, image_sizes_array, reference_crowd_flags
from .laece import label_aware_calibration_error
from .matching import match_flat
from .uncertainty import uncertainty_calibration_error


def _concatenate_flat(parts: list[FlatBoxes], with_scores: bool) -> FlatBoxes:
    """Batches of flattened boxes as one, image indices already offset to be global."""
    return FlatBoxes(
        boxes=np.concatenate([part.boxes for part in parts]),
        labels=np.concatenate([part.labels for part in parts]),
        scores=np.concatenate([part.scores for part in parts]) if with_scores else None,
        image_index=np.concatenate([part.image_index for part in parts]),
        position=np.concatenate([part.position for part in parts]),
        num_images=sum(part.num_images for part in parts),
        extras={},
    )


class DetectionCalibrationMetric:
    """Streaming COCO AP + D-ECE + LaECE (+ position-dependent D-ECE, + D-UCE).

    Args:
        num_bins: D-ECE confidence bins (the protocol's 10).
        laece_bins: LaECE bins per class (the LaECE paper's 25).
        position_bins: bins per feature of the position-dependent D-ECE (computed when every batch came with
            ``image_sizes``).
        score_threshold, iou_threshold, include_images_without_gt: the D-ECE protocol (spec section 4).
        compute_ap: also keep every detection for COCO AP (memory grows with all detections, not only the kept
            ones).
        uncertainty_key: a per-detection uncertainty in [0, 1) held by every prediction dict under this key;
            when given, ``compute`` adds D-UCE.
    """

    def __init__(self, num_bins: int = 10, laece_bins: int = 25, position_bins=5, score_threshold: float = 0.3,
                 iou_threshold: float = 0.5, include_images_without_gt: bool = False, compute_ap: bool = True,
                 uncertainty_key: str | None = None):
        self.num_bins = num_bins
        self.laece_bins = laece_bins
        self.position_bins = position_bins
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.include_images_without_gt = include_images_without_gt
        self.compute_ap = compute_ap
        self.uncertainty_key = uncertainty_key
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._kept = {"scores": [], "matched": [], "labels": [], "ious": [], "box_features": [],
                      "uncertainties": []}
        self._ap_predictions: list[FlatBoxes] = []
        self._ap_references: list[FlatBoxes] = []
        self._ap_crowd_and_area: list[tuple] = []
        self._sizes_given: bool | None = None
        self.num_images = 0
        self.num_images_evaluated = 0

    def update(self, predictions, references, image_sizes=None) -> None:
        """Add a batch.

        Args:
            predictions: list of per-image dicts (``boxes`` absolute xyxy, ``scores``, ``labels``), all
                post-processed detections: the score threshold is applied here.
            references: list of per-image dicts (``boxes`` absolute xyxy, ``labels``; optionally ``iscrowd``
                and ``area`` for AP).
            image_sizes: ``(height, width)`` per image, for the position-dependent D-ECE. Give it for every
                batch or for none.
        """
        sizes_given = image_sizes is not None
        if self._sizes_given is not None and sizes_given != self._sizes_given:
            raise ValueError("image_sizes must be given for every batch or for none")
        extra_keys = (self.uncertainty_key,) if self.uncertainty_key else ()
        flat_predictions, flat_references = flatten_pair(predictions, references, extra_keys=extra_keys)
        sizes = image_sizes_array(image_sizes, flat_predictions.num_images) if sizes_given else None
        crowd_area = crowd_and_area(references, flat_references) if self.compute_ap else None
        matches = match_flat(flat_predictions, flat_references, self.score_threshold, self.iou_threshold,
                             self.include_images_without_gt,
                             crowd=reference_crowd_flags(references, flat_references))

        self._sizes_given = sizes_given
        self._kept["scores"].append(matches.scores)
        self._kept["matched"].append(matches.matched)
        self._kept["labels"].append(matches.labels)
        self._kept["ious"].append(matches.ious)
        if sizes_given:
            self._kept["box_features"].append(box_position_features(matches.boxes, sizes[matches.image_index]))
        if self.uncertainty_key:
            starts = np.cumsum(flat_predictions.counts_per_image) - flat_predictions.counts_per_image
            flat_index = starts[matches.image_index] + matches.detection_index
            self._kept["uncertainties"].append(flat_predictions.extras[self.uncertainty_key][flat_index])
        if self.compute_ap:
            self._ap_predictions.append(self._offset(flat_predictions, with_scores=True))
            self._ap_references.append(self._offset(flat_references, with_scores=False))
            self._ap_crowd_and_area.append(crowd_area)
        self.num_images += matches.num_images
        self.num_images_evaluated += matches.num_images_evaluated

    def _offset(self, flat: FlatBoxes, with_scores: bool) -> FlatBoxes:
        """Only what AP needs, with image indices made global."""
        return FlatBoxes(flat.boxes, flat.labels, flat.scores if with_scores else None,
                         flat.image_index + self.num_images, flat.position, flat.num_images, {})

    def compute(self) -> dict:
        """Pool every batch.

        Returns:
            dict with ``calibration_error``'s keys (``d_ece``, ``num_detections``, ``precision``,
            ``mean_confidence``, ``bin_*``), ``laece``, ``num_images``, ``num_images_evaluated``; with
            ``compute_ap`` the COCO keys (``map``, ``map_50``, ...); ``position_d_ece`` when image sizes were
            given; ``d_uce`` with ``uncertainty_key``. No data at all gives NaN calibration values.
        """
        kept = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in self._kept.items()}
        matched = kept["matched"].astype(bool)
        result = calibration_error(kept["scores"], matched, self.num_bins)
        result["laece"] = label_aware_calibration_error(kept["scores"], kept["labels"].astype(np.int64),
                                                        kept["ious"], self.laece_bins)["laece"]
        result["num_images"] = self.num_images
        result["num_images_evaluated"] = self.num_images_evaluated
        if self._sizes_given:
            result["position_d_ece"] = position_calibration_error(
                kept["scores"], matched, kept["box_features"], self.position_bins)["d_ece"]
        if self.uncertainty_key:
            result["d_uce"] = uncertainty_calibration_error(kept["uncertainties"], matched, self.num_bins)["d_uce"]
        if self.compute_ap and self._ap_predictions:
            crowd, areas = (np.concatenate(column) for column in zip(*self._ap_crowd_and_area))
            result.update(average_precision_flat(_concatenate_flat(self._ap_predictions, with_scores=True),
                                                 _concatenate_flat(self._ap_references, with_scores=False),
                                                 crowd, areas))
        elif self.compute_ap:
            result.update(dict.fromkeys(COCO_SUMMARY_KEYS, float("nan")))
        return result


def evaluate_detections(predictions, references, image_sizes=None, **options) -> dict:
    """``DetectionCalibrationMetric(**options)`` on one batch holding every image: AP, D-ECE, LaECE, ... at once.

    See ``DetectionCalibrationMetric`` for the options and ``DetectionCalibrationMetric.compute`` for the keys.
    """
    metric = DetectionCalibrationMetric(**options)
    metric.update(predictions, references, image_sizes)
    return metric.compute()
