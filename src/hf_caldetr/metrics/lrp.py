"""LRP Error (Oksuz et al., ECCV 2018 and TPAMI 2021), its components, and per-class LRP-optimal thresholds.

For one class with ``G`` ground-truth boxes, evaluated at IoU threshold ``tau`` with ``TP`` true positives,
``FP`` false positives and ``FN = G - TP`` misses:

    LRP = (sum_TP (1 - IoU) / (1 - tau) + FP + FN) / (TP + FP + FN)
    LRP_loc = sum_TP (1 - IoU) / TP,   LRP_FP = FP / (TP + FP),   LRP_FN = FN / G.

``lrp_error`` is the LRP of a fixed detection set (the official SAOD code's ``compute_LRP``, here after a score
cut of 0.3 by default). ``optimal_lrp`` is oLRP (the official LRP-Error ``COCOeval``): over all detections of a
class sorted by descending score, every prefix is a candidate cut, and oLRP is the smallest LRP, taken at the
first prefix that reaches it; the score of that prefix's last detection is the class's LRP-optimal threshold.
Prefixes ending inside a group of equal scores are candidates too, as in the official code.

Conventions of the official code, kept (``../shared/calibration_oracles/README.md``):

- a class without ground truth: the fixed-set values are NaN; oLRP, its components and the threshold are -1
  (the official "absent" value). Both drop out of the class means.
- a class with ground truth but no true positive: LRP 1 and LRP_FN 1, LRP_loc and LRP_FP NaN (and for oLRP the
  threshold NaN). Class means take the finite values only, so such a class counts 1 in LRP and LRP_FN and drops
  out of LRP_loc and LRP_FP.
"""

from __future__ import annotations

import numpy as np

from .classwise import ClassEvaluation, category_ids, evaluate_per_class, nanmean, per_class_dict
from .inputs import flatten_pair, reference_crowd_flags

COMPONENTS = ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")


def _check_tau(iou_threshold: float) -> float:
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"LRP needs an IoU threshold in [0, 1) (it divides by 1 - tau), got {iou_threshold}")
    return float(iou_threshold)


def lrp_components(evaluation: ClassEvaluation) -> dict:
    """LRP and its components of each class's evaluated detections, and their class means (module docstring)."""
    tau = _check_tau(evaluation.iou_threshold)
    tp = evaluation.per_class_sum(evaluation.matched.astype(np.float64))
    fp = evaluation.num_detections - tp
    gt = evaluation.num_gt.astype(np.float64)
    fn = gt - tp
    localisation = evaluation.per_class_sum(np.where(evaluation.matched, 1.0 - evaluation.ious, 0.0))
    has_gt, has_tp = gt > 0, tp > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {
            "lrp": np.where(has_tp, (localisation / (1.0 - tau) + fp + fn) / (tp + fp + fn), 1.0),
            "lrp_loc": np.where(has_tp, localisation / tp, np.nan),
            "lrp_fp": np.where(has_tp, fp / (tp + fp), np.nan),
            "lrp_fn": np.where(has_tp, fn / gt, 1.0),
        }
    values = {key: np.where(has_gt, value, np.nan) for key, value in values.items()}
    result = {key: nanmean(value) for key, value in values.items()}
    result["per_class"] = {int(c): {key: float(values[key][k]) for key in COMPONENTS}
                           | {"num_tp": int(tp[k]), "num_fp": int(fp[k]), "num_gt": int(gt[k])}
                           for k, c in enumerate(evaluation.categories)}
    return result


def lrp_error(predictions, references, categories, iou_threshold: float = 0.5, score_threshold: float = 0.3,
              thresholds=None, max_detections: int | None = 100) -> dict:
    """LRP Error of the detections kept at a fixed cut (the official SAOD protocol: ``score >= 0.3``).

    Args:
        predictions: list (one per image) of dicts with ``boxes`` (absolute xyxy), ``scores``, ``labels``.
        references: list of dicts with ``boxes``, ``labels`` and optionally ``iscrowd``.
        categories: the dataset's classes: their number, a list of ids or ``config.id2label``.
        iou_threshold: tau, in [0, 1).
        score_threshold: one cut for all classes; thresholds: per-class cuts (``lrp_optimal_thresholds``).
        max_detections: per image and class (COCO's 100).

    Returns:
        dict with ``lrp``, ``lrp_loc``, ``lrp_fp``, ``lrp_fn`` (class means over finite values) and
        ``per_class`` (``{class id: {the four, num_tp, num_fp, num_gt}}``).
    """
    _check_tau(iou_threshold)
    flat_predictions, flat_references = flatten_pair(predictions, references)
    evaluation = evaluate_per_class(flat_predictions, flat_references, categories, iou_threshold, score_threshold,
                                    thresholds=thresholds, max_detections=max_detections,
                                    crowd=reference_crowd_flags(references, flat_references))
    return lrp_components(evaluation)


def optimal_lrp_of_evaluation(evaluation: ClassEvaluation) -> dict:
    """oLRP, its components and the LRP-optimal thresholds of evaluated detections (all of them, no cut)."""
    tau = _check_tau(evaluation.iou_threshold)
    if not evaluation.ranked:
        raise ValueError("oLRP scans each class's detections by descending score: evaluate them with ranked=True")
    num_classes = len(evaluation.categories)
    values = {key: np.full(num_classes, -1.0) for key in (*COMPONENTS, "threshold")}
    tp_all = np.cumsum(evaluation.matched)
    loc_all = np.cumsum(np.where(evaluation.matched, 1.0 - evaluation.ious, 0.0))
    for k in range(num_classes):
        gt = float(evaluation.num_gt[k])
        if gt == 0:
            continue
        start, stop = evaluation.starts[k], evaluation.starts[k + 1]
        base_tp = tp_all[start - 1] if start else 0
        base_loc = loc_all[start - 1] if start else 0.0
        tp = (tp_all[start:stop] - base_tp).astype(np.float64)
        if not len(tp) or tp[-1] == 0:
            values["lrp"][k], values["lrp_fn"][k] = 1.0, 1.0
            values["lrp_loc"][k] = values["lrp_fp"][k] = values["threshold"][k] = np.nan
            continue
        localisation = loc_all[start:stop] - base_loc
        fp = np.arange(1, stop - start + 1, dtype=np.float64) - tp
        lrp = (localisation / (1.0 - tau) + fp + (gt - tp)) / (gt + fp)
        best = int(np.argmin(lrp))
        with np.errstate(invalid="ignore", divide="ignore"):
            values["lrp"][k] = lrp[best]
            values["lrp_loc"][k] = localisation[best] / tp[best]
            values["lrp_fp"][k] = fp[best] / (tp[best] + fp[best])
            values["lrp_fn"][k] = (gt - tp[best]) / gt
        values["threshold"][k] = evaluation.scores[start + best]

    def class_mean(value):
        return nanmean(np.where(value <= -1, np.nan, value))

    return {
        "olrp": class_mean(values["lrp"]),
        "olrp_loc": class_mean(values["lrp_loc"]),
        "olrp_fp": class_mean(values["lrp_fp"]),
        "olrp_fn": class_mean(values["lrp_fn"]),
        "thresholds": per_class_dict(evaluation.categories, values["threshold"]),
        "per_class": {int(c): {"olrp": float(values["lrp"][k]), "olrp_loc": float(values["lrp_loc"][k]),
                               "olrp_fp": float(values["lrp_fp"][k]), "olrp_fn": float(values["lrp_fn"][k]),
                               "lrp_optimal_threshold": float(values["threshold"][k])}
                      for k, c in enumerate(evaluation.categories)},
    }


def optimal_lrp(predictions, references, categories, iou_threshold: float = 0.5,
                max_detections: int | None = 100) -> dict:
    """oLRP (optimal LRP Error) with its components and the per-class LRP-optimal thresholds.

    All detections are used (no score cut), the top ``max_detections`` per image and class, matched at
    ``iou_threshold`` (the official LRP-Error code: 0.5).

    Returns:
        dict with ``olrp``, ``olrp_loc``, ``olrp_fp``, ``olrp_fn`` (class means, official rule: NaN and -1 values
        dropped), ``thresholds`` (``{class id: LRP-optimal threshold}``; -1 for a class without ground truth,
        NaN for a class without a true positive) and ``per_class``.
    """
    _check_tau(iou_threshold)
    flat_predictions, flat_references = flatten_pair(predictions, references)
    evaluation = evaluate_per_class(flat_predictions, flat_references, categories, iou_threshold, 0.0,
                                    max_detections=max_detections,
                                    crowd=reference_crowd_flags(references, flat_references))
    return optimal_lrp_of_evaluation(evaluation)


def lrp_optimal_thresholds(predictions, references, categories, iou_threshold: float = 0.0,
                           max_detections: int | None = 100) -> dict[int, float]:
    """Per-class LRP-optimal score thresholds of a **validation** split, ``{class id: threshold}``.

    The default IoU threshold 0 is fiveai/detection_calibration's (Kuzucu et al., ECCV 2024), which evaluates at
    the thresholds of a validation split with LaECE_0 / LaACE_0; pass 0.5 for the LRP-Error code's. Apply them
    to another split with ``calibration_errors_at_iou_0(..., thresholds=...)``, ``lrp_error(...,
    thresholds=...)`` or ``apply_class_thresholds``: a class whose threshold is NaN (no true positive) or -1 (no
    ground truth) keeps all its detections, as the official code does.
    """
    return optimal_lrp(predictions, references, categories, iou_threshold, max_detections)["thresholds"]


def apply_class_thresholds(predictions, thresholds, categories=None) -> list[dict]:
    """The per-image prediction dicts with each detection kept iff ``not score < threshold of its class``.

    Args:
        predictions: list of per-image dicts (any extra per-detection keys, e.g. ``uncertainties``, are filtered
            alike; numpy arrays are returned).
        thresholds: ``{class id: threshold}`` (``lrp_optimal_thresholds``).
        categories: the dataset's classes; default the keys of ``thresholds``.
    """
    from .classwise import class_threshold_mask
    from .inputs import flatten_boxes, to_numpy

    ids = category_ids(categories if categories is not None else sorted(int(k) for k in thresholds))
    flat = flatten_boxes(predictions, "predictions", with_scores=True)
    keep = class_threshold_mask(flat, ids, thresholds)
    counts = flat.counts_per_image
    bounds = np.r_[0, np.cumsum(counts)]
    result = []
    for index, entry in enumerate(predictions):
        mask = keep[bounds[index]:bounds[index + 1]]
        filtered = {}
        for key, value in entry.items():
            array = to_numpy(value)
            filtered[key] = array[mask] if array.ndim >= 1 and len(array) == len(mask) else array
        result.append(filtered)
    return result
