"""Localisation-aware calibration errors: LaECE (Oksuz et al., CVPR 2023), LaECE_0 and LaACE_0 (Kuzucu et al.,
ECCV 2024).

Per class ``c``, over 25 equal-width confidence bins:

    LaECE_c = sum_k (n_ck / N_c) * |prec_iou_ck - confidence_ck|,
    prec_iou_ck = (sum of the IoUs of the true positives in bin k) / n_ck,

so a detection is only fully "correct" when its box is perfect; ``N_c`` counts the class's evaluated detections.
Matching, pooling and the top 100 per image and class are COCO's (``classwise``).

``localisation_aware_calibration_error`` (LaECE) follows the official SAOD code (fiveai/saod, the authors'):
detections with ``score >= 0.3``, IoU threshold 0.5 (``iou_threshold=0.1`` is the SAOD default), images
without ground truth evaluated, bins half-open ``[e_k, e_k+1)``, and LaECE the mean over **all** the dataset's
categories, where a class without ground truth, or with ground truth but no kept detection, counts 0. Two
conventions of that code are, in our judgement, slips; each has an explicit option that departs from it:

- a score of exactly 1.0 falls in no bin but still counts in ``N_c`` (``score_one="no_bin"``, official); so a
  class's bin weights sum to less than 1 and a perfectly confident, perfectly localised detection lowers its
  class's error instead of adding nothing. ``score_one="last_bin"`` puts it in the last bin.
- classes with nothing to calibrate count 0 in the mean (``empty_classes="zero"``, official), so a detector that
  never fires on a hard class looks better calibrated. ``empty_classes="exclude"`` averages over the classes
  with ground truth and at least one evaluated detection.

Without any ground truth at all LaECE is NaN (the official code cannot run on such a split).

``calibration_errors_at_iou_0`` gives LaECE_0 and LaACE_0 as fiveai/detection_calibration (Kuzucu et al.)
computes them: matching at IoU threshold 0 (every same-class box is a candidate, so a detection without overlap
can be a true positive with IoU 0), bins closed on the right (``[0, e_1]``, then ``(e_k, e_k+1]``: a score of 1.0
falls in the last bin), and the mean over classes whose value is not exactly 0 (classes without ground truth
or without detections drop out). LaACE_0 is the unbinned ``mean |IoU - score|`` per class. Detections are
usually cut at per-class LRP-optimal thresholds found on a validation split (``lrp.lrp_optimal_thresholds``).
"""

from __future__ import annotations

import numpy as np

from .binning import bin_edges, check_num_bins
from .classwise import ClassEvaluation, evaluate_per_class, nanmean, per_class_dict
from .inputs import flatten_pair, reference_crowd_flags
from .lrp import lrp_components

SCORE_ONE_RULES = ("no_bin", "last_bin")
EMPTY_CLASS_RULES = ("zero", "exclude")


def _binned_laece(evaluation: ClassEvaluation, num_bins: int, right_closed: bool, score_one_in_last_bin: bool):
    """Per-class ``sum_k (n_ck / N_c) |prec_iou_ck - confidence_ck|`` (``[K]``; 0 where ``N_c = 0``) and the
    per-bin table ``(counts, prec_iou, confidence)``, each ``[K, num_bins]`` (NaN for empty bins)."""
    edges = bin_edges(num_bins)
    scores = evaluation.scores
    if right_closed:
        bins = np.maximum(np.searchsorted(edges, scores, side="left") - 1, 0)
    else:
        bins = np.searchsorted(edges, scores, side="right") - 1
        if score_one_in_last_bin:
            bins = np.minimum(bins, num_bins - 1)
    in_a_bin = bins < num_bins  # saod: a score of exactly 1.0 is in no bin
    num_classes = len(evaluation.categories)
    flat_bin = (evaluation.class_index * num_bins + bins)[in_a_bin]
    size = num_classes * num_bins
    counts = np.bincount(flat_bin, minlength=size).reshape(num_classes, num_bins)
    tp_ious = np.where(evaluation.matched, evaluation.ious, 0.0)[in_a_bin]
    iou_sums = np.bincount(flat_bin, weights=tp_ious, minlength=size).reshape(num_classes, num_bins)
    score_sums = np.bincount(flat_bin, weights=scores[in_a_bin], minlength=size).reshape(num_classes, num_bins)
    occupied = counts > 0
    prec_iou = np.divide(iou_sums, counts, out=np.full(counts.shape, np.nan), where=occupied)
    confidence = np.divide(score_sums, counts, out=np.full(counts.shape, np.nan), where=occupied)
    totals = evaluation.num_detections[:, None]
    weights = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    gaps = np.where(occupied, weights * np.abs(prec_iou - confidence), 0.0)
    return gaps.sum(axis=1), (counts, prec_iou, confidence)


def laece_of_evaluation(evaluation: ClassEvaluation, num_bins: int = 25, score_one: str = "no_bin",
                        empty_classes: str = "zero") -> dict:
    """LaECE (SAOD conventions unless an option departs) of already evaluated detections; see the module."""
    num_bins = check_num_bins(num_bins)
    if score_one not in SCORE_ONE_RULES:
        raise ValueError(f"score_one must be one of {SCORE_ONE_RULES}, got {score_one!r}")
    if empty_classes not in EMPTY_CLASS_RULES:
        raise ValueError(f"empty_classes must be one of {EMPTY_CLASS_RULES}, got {empty_classes!r}")
    per_class, (counts, prec_iou, confidence) = _binned_laece(evaluation, num_bins, right_closed=False,
                                                              score_one_in_last_bin=score_one == "last_bin")
    evaluated = (evaluation.num_gt > 0) & (evaluation.num_detections > 0)
    # The official code never fills a class without ground truth: its detections are not scored.
    per_class = np.where(evaluated, per_class, 0.0)
    averaged = per_class if empty_classes == "zero" else per_class[evaluated]
    # No ground truth at all (the official code cannot even load such a file): NaN, not a perfect 0.
    undefined = not len(averaged) or not evaluation.num_gt.any()
    return {
        "laece": float("nan") if undefined else float(averaged.mean()),
        "laece_per_class": per_class_dict(evaluation.categories, per_class),
        "num_classes_averaged": int(len(averaged)),
        "num_detections": int(evaluation.num_detections.sum()),
        "bin_counts": counts.sum(axis=0).tolist(),
        "bin_edges": bin_edges(num_bins).tolist(),
        "per_class_bins": {int(c): {"counts": counts[k].tolist(), "prec_iou": prec_iou[k].tolist(),
                                    "confidence": confidence[k].tolist()}
                           for k, c in enumerate(evaluation.categories)},
    }


def localisation_aware_calibration_error(predictions, references, categories, num_bins: int = 25,
                                         score_threshold: float = 0.3, iou_threshold: float = 0.5,
                                         max_detections: int | None = 100, include_images_without_gt: bool = True,
                                         score_one: str = "no_bin", empty_classes: str = "zero") -> dict:
    """LaECE of a detector's outputs, as the official SAOD code computes it (see the module docstring).

    Args:
        predictions: list (one per image) of dicts with ``boxes`` (absolute xyxy), ``scores``, ``labels``, as
            ``post_process_object_detection`` returns them.
        references: list of dicts with ``boxes`` (absolute xyxy), ``labels`` and optionally ``iscrowd``.
        categories: the dataset's classes: their number, a list of ids or ``config.id2label``.
        num_bins: 25, the paper's. score_threshold: 0.3, the paper's fixed cut.
        iou_threshold: 0.5, or 0.1 (the SAOD code's default).
        max_detections: per image and class (COCO's 100); ``None`` keeps all.
        include_images_without_gt: the official code evaluates them.
        score_one, empty_classes: official conventions or the departures of the module docstring.

    Returns:
        dict with ``laece``, ``laece_per_class`` (``{class id: value}``, 0 for classes not evaluated),
        ``num_classes_averaged``, ``num_detections``, ``bin_counts`` (pooled), ``bin_edges`` and
        ``per_class_bins`` (``counts``, ``prec_iou``, ``confidence`` per bin, NaN when empty).
    """
    flat_predictions, flat_references = flatten_pair(predictions, references)
    evaluation = evaluate_per_class(flat_predictions, flat_references, categories, iou_threshold, score_threshold,
                                    max_detections=max_detections,
                                    crowd=reference_crowd_flags(references, flat_references),
                                    include_images_without_gt=include_images_without_gt)
    return laece_of_evaluation(evaluation, num_bins, score_one, empty_classes)


def errors_at_iou_0_of_evaluation(evaluation: ClassEvaluation, num_bins: int = 25) -> dict:
    """LaECE_0, LaACE_0 and LRP (with components) of detections evaluated at IoU threshold 0."""
    num_bins = check_num_bins(num_bins)
    laece, _ = _binned_laece(evaluation, num_bins, right_closed=True, score_one_in_last_bin=True)
    evaluated = (evaluation.num_gt > 0) & (evaluation.num_detections > 0)
    laece = np.where(evaluated, laece, 0.0)
    gaps = np.abs(np.where(evaluation.matched, evaluation.ious, 0.0) - evaluation.scores)
    laace = np.divide(evaluation.per_class_sum(gaps), evaluation.num_detections,
                      out=np.zeros(len(evaluation.categories)), where=evaluated)
    # The official code turns exact zeros into NaN before its nanmean: classes not evaluated drop out.
    laece_0, laace_0 = (np.where(values == 0, np.nan, values) for values in (laece, laace))
    lrp = lrp_components(evaluation)
    return {
        "laece_0": nanmean(laece_0),
        "laace_0": nanmean(laace_0),
        "lrp": lrp["lrp"], "lrp_loc": lrp["lrp_loc"], "lrp_fp": lrp["lrp_fp"], "lrp_fn": lrp["lrp_fn"],
        "laece_0_per_class": per_class_dict(evaluation.categories, laece),
        "laace_0_per_class": per_class_dict(evaluation.categories, laace_0),
        "lrp_per_class": lrp["per_class"],
        "num_detections": int(evaluation.num_detections.sum()),
    }


def calibration_errors_at_iou_0(predictions, references, categories, thresholds=None, score_threshold: float = 0.0,
                                num_bins: int = 25, max_detections: int | None = 100) -> dict:
    """LaECE_0, LaACE_0 and the LRP at IoU threshold 0, as fiveai/detection_calibration computes them.

    Args:
        predictions, references, categories: as in ``localisation_aware_calibration_error``.
        thresholds: per-class score thresholds (``{class id: threshold}`` or ``[K]`` in category order), usually
            ``lrp_optimal_thresholds`` of a validation split; a detection is dropped iff ``score < threshold``,
            so NaN or -1 keeps the whole class, as the official code does. ``None``: only ``score_threshold``.
        score_threshold: one cut for every class (Kuzucu et al.'s fixed-threshold variant uses 0.3).

    Returns:
        dict with ``laece_0``, ``laace_0``, ``lrp``, ``lrp_loc``, ``lrp_fp``, ``lrp_fn`` (class means),
        ``laece_0_per_class`` (0 for classes not evaluated), ``laace_0_per_class`` (NaN for those),
        ``lrp_per_class`` and ``num_detections``.
    """
    flat_predictions, flat_references = flatten_pair(predictions, references)
    evaluation = evaluate_per_class(flat_predictions, flat_references, categories, 0.0, score_threshold,
                                    thresholds=thresholds, max_detections=max_detections,
                                    crowd=reference_crowd_flags(references, flat_references))
    return errors_at_iou_0_of_evaluation(evaluation, num_bins)

