"""Every calibration metric of a detector's outputs, from one set of flattened detections and references.

Two protocols, side by side (``calibration_protocol``):

1. **The fixed cut** (Cal-DETR's protocol, and the official SAOD and detection_calibration metrics at the same
   cut): detections with ``score >= 0.3``. D-ECE, position-dependent D-ECE and D-UCE follow the Cal-DETR protocol
   (IoU 0.5, images without ground truth left out by default); LaECE (IoU 0.5, and 0.1 as ``laece_iou_0.1``) and
   the LRP Error with its components follow the SAOD code; LaECE_0 / LaACE_0 follow detection_calibration's
   fixed-threshold variant; OCE is Park et al.'s (mean aggregation, IoU 0.5 and 0.75).
2. **LRP-optimal thresholds** (Kuzucu et al., ECCV 2024): each class is cut at its LRP-optimal threshold found on a
   *validation* split (``class_thresholds``, never the evaluated split: pass what ``lrp_optimal_thresholds`` of
   this function's result on the validation split holds), then LaECE_0, LaACE_0 and LRP at IoU 0 are measured,
   with D-ECE and OCE of the same detections (under ``at_lrp_optimal_thresholds``).

Threshold-free: oLRP with its components (all detections, IoU 0.5), and the per-class LRP-optimal thresholds of
the evaluated split at IoU 0 (``lrp_optimal_thresholds``), to be used on the *next* split.

Every matching-based metric sees crowd regions as ignore regions (``matching``).
"""

from __future__ import annotations

import numpy as np

from .classwise import class_threshold_mask, evaluate_prepared, prepare_classwise
from .d_ece import calibration_error, position_calibration_error
from .laece import errors_at_iou_0_of_evaluation, laece_of_evaluation
from .lrp import lrp_components, optimal_lrp_of_evaluation
from .matching import match_prepared, prepare_matching
from .inputs import FlatBoxes
from .oce import oce_flat
from .uncertainty import uncertainty_calibration_error

LRP_KEYS = ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")
OLRP_KEYS = ("olrp", "olrp_loc", "olrp_fp", "olrp_fn")


def _kept_index(detections: FlatBoxes, matches) -> np.ndarray:
    """Flat index (into ``detections``) of each matched detection."""
    starts = np.cumsum(detections.counts_per_image) - detections.counts_per_image
    return starts[matches.image_index] + matches.detection_index


def _fixed_cut_metrics(detections, prepared, *, num_bins, position_bins, score_threshold, iou_threshold,
                       include_images_without_gt, box_features, uncertainties, keep=None) -> dict:
    """D-ECE (+ position D-ECE, + D-UCE) of the detections kept by ``score_threshold`` (and ``keep``); the
    Cal-DETR protocol has no top-k per class (post-processing already keeps the top 100 per image)."""
    matches = match_prepared(prepared, score_threshold, iou_threshold, include_images_without_gt, keep=keep,
                             top_k=False)
    result = calibration_error(matches.scores, matches.matched, num_bins)
    result.update(num_images=matches.num_images, num_images_evaluated=matches.num_images_evaluated,
                  num_ignored=matches.num_ignored)
    index = _kept_index(detections, matches)
    if box_features is not None:
        result["position_d_ece"] = position_calibration_error(matches.scores, matches.matched, box_features[index],
                                                              position_bins)["d_ece"]
    if uncertainties is not None:
        uncertainty = uncertainty_calibration_error(uncertainties[index], matches.matched, num_bins)
        result["d_uce"] = uncertainty["d_uce"]
        result["uncertainty_calibration"] = uncertainty
    return result


def calibration_protocol(detections: FlatBoxes, references: FlatBoxes, crowd: np.ndarray | None = None,
                         categories=None, *, num_bins: int = 10, laece_bins: int = 25, position_bins=5,
                         box_features: np.ndarray | None = None, uncertainties: np.ndarray | None = None,
                         score_threshold: float = 0.3, iou_threshold: float = 0.5,
                         include_images_without_gt: bool = False, class_thresholds=None,
                         max_detections: int | None = 100) -> dict:
    """Both protocols of the module docstring on flattened inputs.

    Args:
        detections, references: ``inputs.flatten_pair``'s output; ``crowd`` ``[M]`` crowd flags or ``None``.
        categories: the dataset's classes (number, ids or ``id2label``); the class-averaged metrics (LaECE,
            LRP, oLRP, LaECE_0, LaACE_0, the thresholds) need them and are left out without.
        num_bins: D-ECE / D-UCE bins (10); laece_bins: LaECE / LaECE_0 bins (25).
        box_features: ``[N, 4]`` per detection (``d_ece.box_position_features``) for the position D-ECE.
        uncertainties: ``[N]`` per detection in [0, 1) for D-UCE.
        score_threshold, iou_threshold, include_images_without_gt: the Cal-DETR protocol of D-ECE.
        class_thresholds: per-class thresholds from a validation split, for the second protocol.
        max_detections: per image and class for the class-averaged metrics (COCO's 100).

    Returns:
        dict with ``calibration_error``'s keys, ``num_images``, ``num_images_evaluated``, ``num_ignored``,
        ``position_d_ece``, ``d_uce`` and ``uncertainty_calibration`` (when given), ``oce``; with categories
        ``laece``, ``laece_iou_0.1``, ``laece_calibration`` (pooled bins for a LaECE reliability diagram),
        ``lrp``, ``lrp_loc``, ``lrp_fp``, ``lrp_fn``, ``olrp`` (+ components), ``laece_0``, ``laace_0``,
        ``lrp_optimal_thresholds``; with ``class_thresholds`` also ``at_lrp_optimal_thresholds``.
    """
    common = dict(num_bins=num_bins, position_bins=position_bins, score_threshold=score_threshold, iou_threshold=iou_threshold,
                  include_images_without_gt=include_images_without_gt, box_features=box_features,
                  uncertainties=uncertainties)
    context = None
    if categories is not None:
        context = prepare_classwise(detections, references, categories, crowd, max_detections)
        prepared = context.matching
    else:
        prepared = prepare_matching(detections, references, crowd)
    result = _fixed_cut_metrics(detections, prepared, **common)
    result["oce"] = oce_flat(detections, references, crowd, score_threshold=score_threshold)["oce"]
    if categories is None:
        return result
    fixed = evaluate_prepared(context, iou_threshold, score_threshold, ranked=False)
    laece = laece_of_evaluation(fixed, laece_bins)
    result["laece"] = laece["laece"]
    result["laece_calibration"] = _pooled_laece_bins(laece)
    lrp = lrp_components(fixed)
    result.update({key: lrp[key] for key in LRP_KEYS})
    result["laece_iou_0.1"] = laece_of_evaluation(evaluate_prepared(context, 0.1, score_threshold, ranked=False),
                                                  laece_bins)["laece"]
    at_zero = errors_at_iou_0_of_evaluation(evaluate_prepared(context, 0.0, score_threshold, ranked=False),
                                            laece_bins)
    result["laece_0"], result["laace_0"] = at_zero["laece_0"], at_zero["laace_0"]

    olrp = optimal_lrp_of_evaluation(evaluate_prepared(context, iou_threshold))
    result.update({key: olrp[key] for key in OLRP_KEYS})
    result["lrp_optimal_thresholds"] = optimal_lrp_of_evaluation(evaluate_prepared(context, 0.0))["thresholds"]

    if class_thresholds is not None:
        errors = errors_at_iou_0_of_evaluation(evaluate_prepared(context, 0.0, thresholds=class_thresholds,
                                                                 ranked=False),
                                               laece_bins)
        keep = class_threshold_mask(detections, context.categories, class_thresholds, context.detection_class)
        cut = _fixed_cut_metrics(detections, prepared, **{**common, "score_threshold": 0.0}, keep=keep)
        result["at_lrp_optimal_thresholds"] = {
            "laece_0": errors["laece_0"], "laace_0": errors["laace_0"],
            **{key: errors[key] for key in LRP_KEYS},
            "d_ece": cut["d_ece"],
            "d_uce": cut.get("d_uce"),
            "oce": oce_flat(detections, references, crowd, keep=keep)["oce"],
            "num_detections": errors["num_detections"],
        }
    return result


def _pooled_laece_bins(laece: dict) -> dict:
    """LaECE's bins pooled over classes, in ``calibration_error``'s layout for a reliability diagram: per bin the
    detections, the IoU-weighted precision (summed TP IoU / detections) and the mean confidence; ``d_ece`` holds
    the LaECE (the class mean, not a pooled gap)."""
    tables = list(laece["per_class_bins"].values())
    counts = np.sum([table["counts"] for table in tables], axis=0)
    iou_sums = np.nansum([np.nan_to_num(table["prec_iou"]) * table["counts"] for table in tables], axis=0)
    score_sums = np.nansum([np.nan_to_num(table["confidence"]) * table["counts"] for table in tables], axis=0)
    occupied = counts > 0
    return {
        "d_ece": laece["laece"],
        "bin_counts": counts.tolist(),
        "bin_precisions": np.divide(iou_sums, counts, out=np.full(len(counts), np.nan), where=occupied).tolist(),
        "bin_confidences": np.divide(score_sums, counts, out=np.full(len(counts), np.nan), where=occupied).tolist(),
        "bin_edges": laece["bin_edges"],
        "num_detections": int(counts.sum()),
    }
