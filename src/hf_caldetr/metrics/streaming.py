"""Accuracy and calibration of a detector in one pass: batch by batch, on one process or many.

``DetectionCalibrationMetric.update`` collects the batches; every ``FLUSH_IMAGES`` images (and at ``compute``) they
are checked and flattened together (one pass over many images is much cheaper than one per small batch; an error
names the image by its position among all the images given) and every detection is kept (box, score, label, and
the uncertainty and box position when given) with the ground truth and its crowd flags;
``compute`` pools them and runs every metric once (``protocol.calibration_protocol``: D-ECE, LaECE, LRP, oLRP,
LaECE_0, LaACE_0, OCE, and when available position-dependent D-ECE and D-UCE; both protocols when per-class
thresholds are given), plus COCO AP when ``compute_ap`` is on. Matching is per image, so pooling first gives
exactly what per-batch matching would.

Distributed evaluation: gather each batch's per-image dicts with accelerate's
``accelerator.gather_for_metrics(outputs, use_gather_object=True)`` (the lists differ in length across
processes) and call ``update`` on every process or only on the main one; the result depends only on the
images seen, never on how they were batched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from .coco import COCO_SUMMARY_KEYS, average_precision_flat, crowd_and_area
from .d_ece import box_position_features
from .inputs import FlatBoxes, flatten_pair, image_sizes_array, reference_crowd_flags
from .protocol import calibration_protocol


# Images collected before they are checked and flattened together.
FLUSH_IMAGES = 1024


def _shifted(error: ValueError, offset: int) -> ValueError:
    """``error`` with the image positions it names (``predictions[3]``) counted among all the images given."""
    message = re.sub(r"\b(predictions|references)\[(\d+)\]",
                     lambda match: f"{match.group(1)}[{int(match.group(2)) + offset}]", str(error))
    return ValueError(message)


def _concatenate_flat(parts: list[FlatBoxes], with_scores: bool) -> FlatBoxes:
    """Batches of flattened boxes as one, image indices already offset to be global."""
    if not parts:
        return FlatBoxes(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0) if with_scores else None,
                         np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0, {})
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
    """Streaming COCO AP + every calibration metric (``protocol.calibration_protocol``).

    Args:
        num_bins: D-ECE / D-UCE confidence bins (the protocol's 10).
        laece_bins: LaECE / LaECE_0 bins per class (the LaECE paper's 25).
        position_bins: bins per feature of the position-dependent D-ECE (computed when every batch came with
            ``image_sizes``).
        score_threshold, iou_threshold, include_images_without_gt: the D-ECE protocol (spec section 4).
        compute_ap: also compute COCO AP (pycocotools).
        uncertainty_key: a per-detection uncertainty in [0, 1) held by every prediction dict under this key;
            when given, ``compute`` adds D-UCE.
        categories: the dataset's classes (their number, e.g. ``config.num_labels``, a list of ids or
            ``config.id2label``): needed by the class-averaged metrics (LaECE, LRP, oLRP, LaECE_0, LaACE_0),
            which are left out without it.
        class_thresholds: per-class score thresholds found on a validation split (``lrp_optimal_thresholds``
            of its result): adds the LRP-optimal-threshold protocol (``at_lrp_optimal_thresholds``).
    """

    def __init__(self, num_bins: int = 10, laece_bins: int = 25, position_bins=5, score_threshold: float = 0.3,
                 iou_threshold: float = 0.5, include_images_without_gt: bool = False, compute_ap: bool = True,
                 uncertainty_key: str | None = None, categories=None, class_thresholds=None):
        self.num_bins = num_bins
        self.laece_bins = laece_bins
        self.position_bins = position_bins
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.include_images_without_gt = include_images_without_gt
        self.compute_ap = compute_ap
        self.uncertainty_key = uncertainty_key
        self.categories = categories
        self.class_thresholds = class_thresholds
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._predictions: list[FlatBoxes] = []
        self._references: list[FlatBoxes] = []
        self._crowd: list[np.ndarray] = []
        self._areas: list[np.ndarray] = []
        self._box_features: list[np.ndarray] = []
        self._uncertainties: list[np.ndarray] = []
        self._pending: tuple[list, list, list] = ([], [], [])
        self._sizes_given: bool | None = None
        self._num_flushed = 0

    @property
    def num_images(self) -> int:
        """Images added so far."""
        return self._num_flushed + len(self._pending[0])

    def update(self, predictions, references, image_sizes=None) -> None:
        """Add a batch.

        Args:
            predictions: list of per-image dicts (``boxes`` absolute xyxy, ``scores``, ``labels``), all
                post-processed detections: the score threshold is applied here.
            references: list of per-image dicts (``boxes`` absolute xyxy, ``labels``; optionally ``iscrowd``
                (crowd regions, ignored by every metric as COCO ignores them) and ``area`` for AP).
            image_sizes: ``(height, width)`` per image, for the position-dependent D-ECE. Give it for every
                batch or for none.

        The batch's structure is checked here; its values with the next ``FLUSH_IMAGES`` images (or at
        ``compute``), each problem named with the image's position among all the images given.
        """
        sizes_given = image_sizes is not None
        if self._sizes_given is not None and sizes_given != self._sizes_given:
            raise ValueError("image_sizes must be given for every batch or for none")
        for value, name in ((predictions, "predictions"), (references, "references")):
            if isinstance(value, Mapping) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a list of per-image dicts, got {type(value).__name__}")
        if len(predictions) != len(references):
            raise ValueError(f"predictions cover {len(predictions)} images but references cover {len(references)}")
        sizes = image_sizes_array(image_sizes, len(predictions)) if sizes_given else None
        self._sizes_given = sizes_given
        pending_predictions, pending_references, pending_sizes = self._pending
        pending_predictions.extend(predictions)
        pending_references.extend(references)
        if sizes_given:
            pending_sizes.append(sizes)
        if len(pending_predictions) >= FLUSH_IMAGES:
            self._flush()

    def _flush(self) -> None:
        """Check and flatten the collected images together, then keep their flat arrays."""
        predictions, references, sizes = self._pending
        if not predictions:
            return
        self._pending = ([], [], [])
        extra_keys = (self.uncertainty_key,) if self.uncertainty_key else ()
        try:
            flat_predictions, flat_references = flatten_pair(predictions, references, extra_keys=extra_keys)
            crowd = reference_crowd_flags(references, flat_references)
            _, areas = crowd_and_area(references, flat_references) if self.compute_ap else (None, None)
        except ValueError as error:
            raise _shifted(error, self._num_flushed) from None
        if self._sizes_given:
            sizes = np.concatenate(sizes)
            self._box_features.append(box_position_features(flat_predictions.boxes,
                                                            sizes[flat_predictions.image_index]))
        if self.uncertainty_key:
            self._uncertainties.append(flat_predictions.extras[self.uncertainty_key])
        self._predictions.append(self._offset(flat_predictions, with_scores=True))
        self._references.append(self._offset(flat_references, with_scores=False))
        self._crowd.append(np.zeros(len(flat_references.labels), dtype=bool) if crowd is None else crowd)
        if self.compute_ap:
            self._areas.append(areas)
        self._num_flushed += flat_predictions.num_images

    def _offset(self, flat: FlatBoxes, with_scores: bool) -> FlatBoxes:
        """The boxes with image indices made global."""
        return FlatBoxes(flat.boxes, flat.labels, flat.scores if with_scores else None,
                         flat.image_index + self._num_flushed, flat.position, flat.num_images, {})

    def compute(self) -> dict:
        """Pool every batch.

        Returns:
            ``protocol.calibration_protocol``'s dict (``d_ece``, ``num_detections``, ``precision``,
            ``mean_confidence``, ``bin_*``, ``num_images``, ``num_images_evaluated``, ``num_ignored``, ``oce``;
            with categories ``laece``, ``laece_iou_0.1``, ``laece_calibration``, ``lrp`` (+ components),
            ``olrp`` (+ components), ``laece_0``, ``laace_0``, ``lrp_optimal_thresholds``; with class thresholds
            ``at_lrp_optimal_thresholds``); ``position_d_ece`` when image sizes were given; ``d_uce`` and its bins
            (``uncertainty_calibration``) with ``uncertainty_key``; with ``compute_ap`` the COCO keys (``map``,
            ``map_50``, ...). No data at all gives NaN calibration values.
        """
        self._flush()
        predictions = _concatenate_flat(self._predictions, with_scores=True)
        references = _concatenate_flat(self._references, with_scores=False)
        crowd = np.concatenate(self._crowd) if self._crowd else np.zeros(0, dtype=bool)
        result = calibration_protocol(
            predictions, references, crowd if crowd.any() else None, self.categories, num_bins=self.num_bins,
            laece_bins=self.laece_bins, position_bins=self.position_bins,
            box_features=np.concatenate(self._box_features) if self._sizes_given else None,
            uncertainties=np.concatenate(self._uncertainties) if self.uncertainty_key and self._uncertainties
            else (np.zeros(0) if self.uncertainty_key else None),
            score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
            include_images_without_gt=self.include_images_without_gt, class_thresholds=self.class_thresholds)
        if self.compute_ap and self._predictions:
            result.update(average_precision_flat(predictions, references, crowd.astype(np.float64),
                                                 np.concatenate(self._areas)))
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
