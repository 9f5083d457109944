"""Detection expected calibration error, D-ECE (Küppers et al., CVPR-W 2020), by the Cal-DETR protocol.

``D-ECE = sum_k (n_k / N) * |precision_k - confidence_k|`` over equal-width confidence bins, where
``precision_k`` is the fraction of true positives among the ``n_k`` kept detections in bin ``k`` and
``confidence_k`` their mean score; pooled over classes. A fraction: papers print it times 100.

No detections (nothing kept, or no images evaluated): every aggregate (``d_ece``, ``precision``,
``mean_confidence``) is NaN and all bin counts are 0. A calibration error of nothing is undefined, and NaN
keeps an untrained or broken model from reporting a perfect 0.

The position-dependent variant bins jointly over the confidence and the box's centre and size normalised by the
image size, ``(confidence, cx / W, cy / H, w / W, h / H)``, as netcal's multivariate ECE does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .binning import (
    bin_edges,
    bin_index,
    binned_means,
    check_num_bins,
    clip_to_open_unit,
    weighted_gap,
)
from .inputs import image_sizes_array, outcome_vector, to_numpy, unit_interval_vector
from .matching import DetectionMatches, match_detections

POSITION_FEATURES = ("confidence", "cx", "cy", "w", "h")


def check_scores_and_outcomes(scores, outcomes, score_name: str = "scores", outcome_name: str = "matched",
                              upper_open: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` ``[N]`` in [0, 1] (or [0, 1)) as float64 and ``outcomes`` ``[N]`` (bool or 0/1) as bool, or
    ``ValueError``."""
    scores = unit_interval_vector(scores, score_name, upper_open)
    return scores, outcome_vector(outcomes, outcome_name, len(scores), score_name)


def calibration_error(scores, matched, num_bins: int = 10) -> dict:
    """D-ECE of scored detections whose outcome (true positive or not) is known.

    Args:
        scores: ``[N]`` confidences in [0, 1] (any float dtype; cast to float64 first).
        matched: ``[N]`` bool, true positive or not.
        num_bins: equal-width bins over [0, 1], half-open ``[e_k, e_k+1)``.

    Returns:
        dict with ``d_ece``, ``num_detections``, ``precision``, ``mean_confidence``, and per bin
        ``bin_counts``, ``bin_precisions``, ``bin_confidences`` (NaN for empty bins) and ``bin_edges``
        (``num_bins + 1`` values). Lists and Python floats, so the result serialises as JSON.
    """
    num_bins = check_num_bins(num_bins)
    scores, matched = check_scores_and_outcomes(scores, matched)
    clipped = clip_to_open_unit(scores)
    counts, precisions, confidences = binned_means(bin_index(clipped, num_bins), num_bins, matched, clipped)
    empty = len(scores) == 0
    return {
        "d_ece": weighted_gap(counts, precisions, confidences),
        "num_detections": len(scores),
        "precision": float("nan") if empty else float(matched.mean()),
        "mean_confidence": float("nan") if empty else float(clipped.mean()),
        "bin_counts": counts.tolist(),
        "bin_precisions": precisions.tolist(),
        "bin_confidences": confidences.tolist(),
        "bin_edges": bin_edges(num_bins).tolist(),
    }


def _image_counts(matches: DetectionMatches) -> dict:
    return {"num_images": matches.num_images, "num_images_evaluated": matches.num_images_evaluated}


def detection_ece(predictions, references, num_bins: int = 10, score_threshold: float = 0.3,
                  iou_threshold: float = 0.5, include_images_without_gt: bool = False) -> dict:
    """D-ECE of a detector's outputs against ground truth, by the protocol of spec section 4.

    Args:
        predictions: list (one per image) of dicts with ``boxes`` (absolute xyxy), ``scores``, ``labels``, as
            ``post_process_object_detection`` returns them (torch tensors, numpy arrays or lists).
        references: list of dicts with ``boxes`` (absolute xyxy) and ``labels``.
        num_bins, score_threshold, iou_threshold, include_images_without_gt: see ``calibration_error`` and
            ``match_detections``.

    Returns:
        ``calibration_error``'s dict plus ``num_images`` and ``num_images_evaluated``.
    """
    matches = match_detections(predictions, references, score_threshold, iou_threshold, include_images_without_gt)
    return {**calibration_error(matches.scores, matches.matched, num_bins), **_image_counts(matches)}


def box_position_features(boxes, image_sizes) -> np.ndarray:
    """Box centre and size relative to the image.

    Args:
        boxes: ``[N, 4]`` absolute xyxy.
        image_sizes: ``[N, 2]`` ``(height, width)`` of each box's image.

    Returns:
        ``[N, 4]`` float64 ``(cx / W, cy / H, w / W, h / H)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    height, width = sizes[:, 0], sizes[:, 1]
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / width, (boxes[:, 1] + boxes[:, 3]) / 2 / height,
                     (boxes[:, 2] - boxes[:, 0]) / width, (boxes[:, 3] - boxes[:, 1]) / height], axis=1)


def _position_bins(num_bins) -> tuple[int, ...]:
    if isinstance(num_bins, Sequence):
        if len(num_bins) != len(POSITION_FEATURES):
            raise ValueError(f"num_bins must give one count per feature {POSITION_FEATURES}, got {num_bins!r}")
        return tuple(check_num_bins(count) for count in num_bins)
    return (check_num_bins(num_bins),) * len(POSITION_FEATURES)


def position_calibration_error(scores, matched, box_features, num_bins=5) -> dict:
    """Position-dependent D-ECE: the gap over joint bins of ``(confidence, cx, cy, w, h)``.

    Every feature is cast to float64, clipped to ``[eps, 1 - eps]`` (boxes reaching past the image border go
    to the outer bins) and binned into equal-width half-open bins over [0, 1]; then
    ``sum_b (n_b / N) * |precision_b - confidence_b|`` over the occupied joint bins ``b``.

    Args:
        scores: ``[N]`` confidences; matched: ``[N]`` bool.
        box_features: ``[N, 4]`` from ``box_position_features``.
        num_bins: bins per feature, one int for all or five ints in the order confidence, cx, cy, w, h.
            The default 5 gives 5**5 = 3125 joint bins.

    Returns:
        dict with ``d_ece``, ``num_detections``, ``num_bins`` (per feature) and ``num_occupied_bins``.
    """
    bins_per_feature = _position_bins(num_bins)
    scores, matched = check_scores_and_outcomes(scores, matched)
    box_features = np.asarray(box_features, dtype=np.float64)
    if box_features.shape != (len(scores), 4):
        raise ValueError(f"box_features must have shape [{len(scores)}, 4], got {box_features.shape}")
    if not np.isfinite(box_features).all():
        raise ValueError("box_features contains NaN or infinite values")
    features = clip_to_open_unit(np.column_stack([scores, box_features]))
    per_feature_bins = [bin_index(features[:, i], count) for i, count in enumerate(bins_per_feature)]
    joint_bin = np.ravel_multi_index(per_feature_bins, bins_per_feature) if len(scores) else np.zeros(0, int)
    # Only occupied joint bins matter: renumber them densely instead of allocating every joint bin.
    occupied, dense_bin = np.unique(joint_bin, return_inverse=True)
    counts, precisions, confidences = binned_means(dense_bin, len(occupied), matched, features[:, 0])
    return {
        "d_ece": weighted_gap(counts, precisions, confidences),
        "num_detections": len(scores),
        "num_bins": list(bins_per_feature),
        "num_occupied_bins": len(occupied),
    }


def position_detection_ece(predictions, references, image_sizes, num_bins=5, score_threshold: float = 0.3,
                           iou_threshold: float = 0.5, include_images_without_gt: bool = False) -> dict:
    """Position-dependent D-ECE of a detector's outputs (see ``position_calibration_error``).

    Args:
        image_sizes: one ``(height, width)`` per image (list, array or tensor ``[num_images, 2]``), the size the
            boxes are expressed in (for transformers, the ``target_sizes`` given to post-processing).
        Others as in ``detection_ece``.
    """
    matches = match_detections(predictions, references, score_threshold, iou_threshold, include_images_without_gt)
    sizes = image_sizes_array(image_sizes, matches.num_images)
    features = box_position_features(matches.boxes, sizes[matches.image_index])
    return {**position_calibration_error(matches.scores, matches.matched, features, num_bins),
            **_image_counts(matches)}
