"""Localisation-aware calibration error, LaECE (Oksuz et al., CVPR 2023).

Per class ``c``, over equal-width confidence bins (25 by default, the paper's choice):

    LaECE_c = sum_k (n_ck / N_c) * |accuracy_ck - confidence_ck|,
    accuracy_ck = (sum of the IoUs of the true positives in bin k) / n_ck,

so a detection is only fully "correct" when its box is perfect. ``LaECE`` is the mean of ``LaECE_c`` over the
classes that have at least one kept detection (a class without detections has nothing to calibrate). Matching,
thresholds and binning follow the D-ECE protocol (spec section 4): the IoU of a false positive counts as 0.
No detections at all give ``laece`` NaN.
"""

from __future__ import annotations

import numpy as np

from .binning import bin_index, check_num_bins, clip_to_open_unit
from .inputs import to_numpy, unit_interval_vector
from .matching import match_detections


def label_aware_calibration_error(scores, labels, ious, num_bins: int = 25) -> dict:
    """LaECE of scored detections.

    Args:
        scores: ``[N]`` confidences in [0, 1].
        labels: ``[N]`` predicted classes.
        ious: ``[N]`` IoU with the matched ground truth, 0 for false positives (``DetectionMatches.ious``).
        num_bins: equal-width confidence bins per class.

    Returns:
        dict with ``laece`` (float), ``laece_per_class`` (``{class id: LaECE_c}``), ``num_classes`` (classes
        with detections) and ``num_detections``.
    """
    num_bins = check_num_bins(num_bins)
    scores = unit_interval_vector(scores, "scores")
    ious = unit_interval_vector(ious, "ious")
    labels = to_numpy(labels)
    if not (scores.shape == ious.shape == labels.shape):
        raise ValueError(f"scores, labels and ious must have the same shape [N], got {scores.shape}, "
                         f"{labels.shape} and {ious.shape}")
    if len(scores) == 0:
        return {"laece": float("nan"), "laece_per_class": {}, "num_classes": 0, "num_detections": 0}

    classes, class_id = np.unique(labels, return_inverse=True)
    clipped = clip_to_open_unit(scores)
    # One flat bin per (class, confidence bin), so every class is handled in the same few bincounts.
    class_bin = class_id * num_bins + bin_index(clipped, num_bins)
    size = len(classes) * num_bins
    score_sums = np.bincount(class_bin, weights=clipped, minlength=size)
    iou_sums = np.bincount(class_bin, weights=ious, minlength=size)
    # n_ck / N_c * |acc_ck - conf_ck| = |iou_sum_ck - score_sum_ck| / N_c: empty bins add 0.
    detections_per_class = np.bincount(class_id, minlength=len(classes))
    gap_per_class = np.abs(iou_sums - score_sums).reshape(len(classes), num_bins).sum(axis=1)
    per_class = gap_per_class / detections_per_class
    return {
        "laece": float(per_class.mean()),
        "laece_per_class": {int(c): float(value) for c, value in zip(classes, per_class)},
        "num_classes": len(classes),
        "num_detections": len(scores),
    }


def detection_laece(predictions, references, num_bins: int = 25, score_threshold: float = 0.3,
                    iou_threshold: float = 0.5, include_images_without_gt: bool = False) -> dict:
    """LaECE of a detector's outputs; inputs as in ``detection_ece``."""
    matches = match_detections(predictions, references, score_threshold, iou_threshold, include_images_without_gt)
    return label_aware_calibration_error(matches.scores, matches.labels, matches.ious, num_bins)
