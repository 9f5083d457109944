"""Object-level calibration error, OCE (Park, Sobolewski, Azizan, "Quantifying the Reliability of Predictions in
Detection Transformers", arXiv 2412.01782), with the conventions of the authors' ``uq_detr.oce``.

OCE scores the predictions *per ground-truth object* rather than per detection:

1. For each ground-truth (GT) object and IoU threshold ``tau``, every detection of the same image with
   ``IoU >= tau`` (float64 IoU from xyxy; an IoU exactly equal to ``tau`` counts) is gathered, **whatever its
   class** (class-agnostic) and **whether or not it also serves another GT** (not one-to-one).
2. The gathered detections are aggregated into one prediction ``(p, label)``:

   * ``"mean"`` (default): ``p`` = mean score; ``label`` = majority vote of their labels, ties going to the
     smallest class id (as ``np.bincount(labels).argmax()``);
   * ``"max_iou"``: the detection with the highest IoU (the first one in the image's list on ties);
   * ``"iou_weighted"``: ``p`` = IoU-weighted mean score; ``label`` of the highest-IoU detection.

3. The object's Brier score is the binary approximation of the official code for one score per detection:
   ``2 (1 - p)^2`` if ``label`` equals the GT class, else ``2 p^2``. A GT object without any gathered detection
   scores 1.0.
4. ``OCE_tau`` = mean Brier over all GT objects; ``OCE`` = mean of ``OCE_tau`` over the thresholds.

Exact multi-class Brier: when every prediction dict carries ``probabilities`` (``[n_i, C]``, the full class
distribution of each detection, column ``c`` = class id ``c``), the gathered distributions are aggregated the
same way (mean, the highest-IoU one, or IoU-weighted mean) and the Brier score is
``sum_c (q_c - onehot(gt)_c)^2`` of the aggregated distribution ``q``. A GT object without detections predicts
the all-zero distribution, Brier 1.0, the same as in the binary form. Rows need not sum to 1 (sigmoid heads);
a background / no-object column may be included as an extra column that no GT carries. ``labels`` are then
not used for the Brier score; ``scores`` still decide ``score_threshold``.

Other conventions:

* Images without GT objects are skipped: their detections never count.
* No top-k and, by default, no score threshold: the caller decides which detections to pass.
  ``score_threshold`` keeps detections with ``score >= score_threshold`` (the official evaluation of
  Park et al. compares sets such as ``score >= 0.3`` and all detections).
* References may carry ``iscrowd`` (one 0/1 per box, COCO style): crowd boxes are not objects. They get no
  Brier score (NaN in ``per_object_brier``), do not count in ``num_objects`` and their detections are not
  gathered for anything (a detection may still serve the non-crowd objects it overlaps).
* No GT object at all: ``oce`` and every ``oce_per_threshold`` value are NaN (the official code would count
  such a threshold as 1.0): the calibration of nothing is undefined, and NaN keeps an empty evaluation from
  reporting a number.

How it is computed: the same-image (detection, GT) pairs are built with ``np.repeat`` on the flattened,
image-ordered arrays (in chunks of about ``_MAX_PAIRS_PER_CHUNK`` pairs, so memory stays bounded), their IoU is
computed once, and only pairs with IoU at or above the smallest threshold are kept. Everything per threshold is
then a few ``bincount`` / ``reduceat`` calls on the (GT-sorted) pairs: no Python loop over images or objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .inputs import FlatBoxes, check_unit_interval, flatten_pair, reference_crowd_flags, to_numpy

AGGREGATIONS = ("mean", "max_iou", "iou_weighted")

# Same-image (detection, GT) pairs whose IoU is computed at once.
_MAX_PAIRS_PER_CHUNK = 1 << 17


def check_iou_thresholds(iou_thresholds) -> tuple[float, ...]:
    """``iou_thresholds`` (one number or a sequence) as a tuple of distinct floats in (0, 1], or ``ValueError``."""
    if isinstance(iou_thresholds, (int, float, np.integer, np.floating)) and not isinstance(iou_thresholds, bool):
        iou_thresholds = (iou_thresholds,)
    if isinstance(iou_thresholds, (str, bytes)):
        raise ValueError(f"iou_thresholds must be numbers in (0, 1], e.g. (0.5, 0.75), got the string "
                         f"{iou_thresholds!r}")
    try:
        values = tuple(float(value) for value in iou_thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"iou_thresholds must be a sequence of numbers in (0, 1], got {iou_thresholds!r}") from None
    if not values:
        raise ValueError("iou_thresholds is empty: give at least one IoU threshold in (0, 1], e.g. (0.5, 0.75)")
    bad = [value for value in values if not (0.0 < value <= 1.0)]  # also catches NaN
    if bad:
        raise ValueError(f"iou_thresholds must lie in (0, 1] (IoU >= threshold gathers a detection), got {bad[0]!r} "
                         f"in {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"iou_thresholds must be distinct, got {values!r}")
    return values


def check_aggregation(aggregation) -> str:
    """``aggregation`` if it is one of ``AGGREGATIONS``, else ``ValueError`` listing them."""
    if not isinstance(aggregation, str) or aggregation not in AGGREGATIONS:
        accepted = ", ".join(repr(name) for name in AGGREGATIONS)
        raise ValueError(f"aggregation must be one of {accepted}, got {aggregation!r}")
    return aggregation


def _probabilities(predictions, counts: np.ndarray):
    """``[N, C]`` float64 class distributions when every prediction dict has ``probabilities``, else ``None``."""
    present = [isinstance(entry, Mapping) and "probabilities" in entry for entry in predictions]
    if not any(present):
        return None
    if not all(present):
        missing = present.index(False)
        raise ValueError(f"predictions[{missing}] has no 'probabilities' but other images do: give the full class "
                         "distribution for every image or for none")
    rows, num_classes = [], None
    for index, entry in enumerate(predictions):
        array = to_numpy(entry["probabilities"], dtype=np.float64)
        if counts[index] == 0 and array.size == 0:
            continue  # an image without detections may give [] or [0, C]
        if array.ndim != 2 or len(array) != counts[index]:
            raise ValueError(f"predictions[{index}]['probabilities'] must have shape [{counts[index]}, num_classes], "
                             f"got {tuple(array.shape)}")
        if num_classes is not None and array.shape[1] != num_classes:
            raise ValueError(f"predictions[{index}]['probabilities'] has {array.shape[1]} classes, earlier images "
                             f"have {num_classes}")
        num_classes = array.shape[1]
        rows.append(array)
    if num_classes is None:  # no detections anywhere: every object scores 1.0 whatever the classes
        return np.zeros((0, 0))
    probabilities = np.concatenate(rows)
    check_unit_interval(probabilities.reshape(-1), "predictions' 'probabilities'")
    return probabilities


def _candidate_pairs(det_boxes, det_image, gt_boxes, gt_image, num_images, min_threshold):
    """Same-image (det, gt, iou) with ``iou >= min_threshold``, sorted by gt, then det (input order)."""
    det_counts = np.bincount(det_image, minlength=num_images)
    det_starts = np.cumsum(det_counts) - det_counts
    per_gt = det_counts[gt_image]
    first_det = det_starts[gt_image]
    ends = np.cumsum(per_gt)
    det_x1, det_y1, det_x2, det_y2 = (np.ascontiguousarray(det_boxes[:, k]) for k in range(4))
    gt_x1, gt_y1, gt_x2, gt_y2 = (np.ascontiguousarray(gt_boxes[:, k]) for k in range(4))
    det_area = (det_x2 - det_x1) * (det_y2 - det_y1)
    gt_area = (gt_x2 - gt_x1) * (gt_y2 - gt_y1)

    out_gt, out_det, out_iou = [], [], []
    start_gt = 0
    while start_gt < len(gt_boxes):
        done = ends[start_gt - 1] if start_gt else 0
        # Whole GTs per chunk; at least one, however many detections its image has.
        stop_gt = max(int(np.searchsorted(ends, done + _MAX_PAIRS_PER_CHUNK, side="right")), start_gt + 1)
        lengths = per_gt[start_gt:stop_gt]
        total = int(ends[stop_gt - 1] - done)
        if total:
            # Pair k of the chunk: GT gt[k] with the detection det[k] of the same image.
            gt = np.repeat(np.arange(start_gt, stop_gt), lengths)
            det = np.arange(total) + np.repeat(first_det[start_gt:stop_gt] - (np.cumsum(lengths) - lengths), lengths)
            # Narrow down in steps, the cheapest test first: overlap in x, then in y, then the IoU itself.
            inter_w = np.minimum(det_x2[det], gt_x2[gt]) - np.maximum(det_x1[det], gt_x1[gt])
            pair = np.flatnonzero(inter_w > 0)
            gt, det, inter_w = gt[pair], det[pair], inter_w[pair]
            inter_h = np.minimum(det_y2[det], gt_y2[gt]) - np.maximum(det_y1[det], gt_y1[gt])
            pair = np.flatnonzero(inter_h > 0)
            gt, det = gt[pair], det[pair]
            intersection = inter_w[pair] * inter_h[pair]
            union = det_area[det] + gt_area[gt] - intersection
            iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
            keep = np.flatnonzero(iou >= min_threshold)
            out_gt.append(gt[keep])
            out_det.append(det[keep])
            out_iou.append(iou[keep])
        start_gt = stop_gt
    if not out_gt:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_gt), np.concatenate(out_det), np.concatenate(out_iou)


def _first_max_per_group(values: np.ndarray, starts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Position (into ``values``) of the first maximum of each group; groups are contiguous, given by ``starts``."""
    group_max = np.maximum.reduceat(values, starts)
    is_max = np.flatnonzero(values == group_max[group])
    first = np.ones(len(is_max), dtype=bool)
    first[1:] = group[is_max[1:]] != group[is_max[:-1]]
    return is_max[first]


def _majority_labels(pair_group: np.ndarray, labels: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the most frequent label; ties to the smallest label (``np.bincount(labels).argmax()``)."""
    classes, dense = np.unique(labels, return_inverse=True)
    keys, counts = np.unique(pair_group * len(classes) + dense, return_counts=True)
    key_group, key_class = np.divmod(keys, len(classes))
    # Keys are sorted by (group, class); a stable sort on -count keeps the smallest class first among ties.
    order = np.lexsort((-counts, key_group))
    winners = order[np.r_[True, key_group[order][1:] != key_group[order][:-1]]]
    result = np.empty(num_groups, dtype=labels.dtype)
    result[key_group[winners]] = classes[key_class[winners]]
    return result


def _brier_per_object(pair_gt, pair_det, pair_iou, scores, labels, probabilities, gt_labels, aggregation):
    """``[M]`` Brier scores of the GT objects for one threshold's pairs (sorted by gt)."""
    num_gts = len(gt_labels)
    brier = np.ones(num_gts)
    if len(pair_gt) == 0:
        return brier
    starts = np.r_[0, np.flatnonzero(pair_gt[1:] != pair_gt[:-1]) + 1]
    matched = pair_gt[starts]
    counts = np.diff(np.r_[starts, len(pair_gt)])
    group = np.repeat(np.arange(len(starts)), counts)
    if aggregation != "mean":
        best = pair_det[_first_max_per_group(pair_iou, starts, group)]

    if probabilities is not None:
        if aggregation == "max_iou":
            distribution = probabilities[best]
        elif aggregation == "mean":
            distribution = np.add.reduceat(probabilities[pair_det], starts, axis=0) / counts[:, None]
        else:
            weights = np.add.reduceat(pair_iou, starts)
            distribution = np.add.reduceat(probabilities[pair_det] * pair_iou[:, None], starts, axis=0)
            distribution /= weights[:, None]
        onehot = np.zeros_like(distribution)
        onehot[np.arange(len(matched)), gt_labels[matched]] = 1.0
        brier[matched] = ((distribution - onehot) ** 2).sum(axis=1)
        return brier

    if aggregation == "max_iou":
        p, label = scores[best], labels[best]
    elif aggregation == "mean":
        p = np.add.reduceat(scores[pair_det], starts) / counts
        label = _majority_labels(group, labels[pair_det], len(starts))
    else:
        p = np.add.reduceat(scores[pair_det] * pair_iou, starts) / np.add.reduceat(pair_iou, starts)
        label = labels[best]
    correct = label == gt_labels[matched]
    brier[matched] = np.where(correct, 2.0 * (1.0 - p) ** 2, 2.0 * p ** 2)
    return brier


def object_calibration_error(predictions, references, iou_thresholds: Sequence[float] = (0.5, 0.75),
                             aggregation: str = "mean", score_threshold: float = 0.0) -> dict:
    """OCE of a detector's outputs against ground truth (see the module docstring for the conventions).

    Args:
        predictions: list (one per image) of dicts with ``boxes`` (absolute xyxy), ``scores``, ``labels``, as
            ``post_process_object_detection`` returns them (torch tensors, numpy arrays or lists); optionally
            ``probabilities`` ``[n_i, C]`` (every image or none) for the exact multi-class Brier score.
        references: list of dicts with ``boxes`` (absolute xyxy) and ``labels``; optionally ``iscrowd``
            (0/1 per box; crowd boxes are not objects).
        iou_thresholds: distinct thresholds in (0, 1] (one number is also accepted); OCE averages over them.
        aggregation: ``"mean"``, ``"max_iou"`` or ``"iou_weighted"``.
        score_threshold: detections with ``score >= score_threshold`` are used; the default 0 uses all.

    Returns:
        dict with ``oce`` (float; NaN without GT objects), ``oce_per_threshold`` (``{tau: OCE_tau}``),
        ``num_objects`` (non-crowd GT boxes), ``num_images``, ``num_images_evaluated`` (images with at least one
        object), ``num_detections`` (detections kept by ``score_threshold``), ``per_object_brier`` (one per
        reference box in flattened order, image by image, averaged over the thresholds; NaN for crowd boxes),
        ``iou_thresholds``, ``aggregation`` and ``brier`` (``"binary"`` or ``"multiclass"``).

    Raises:
        ValueError: for an unknown aggregation, thresholds outside (0, 1], an empty threshold list, a score
            threshold outside [0, 1] or malformed inputs (naming the image and the problem).
    """
    detections, gts = flatten_pair(predictions, references)
    probabilities = _probabilities(predictions, detections.counts_per_image)
    return oce_flat(detections, gts, reference_crowd_flags(references, gts), iou_thresholds, aggregation,
                    score_threshold, probabilities)


def oce_flat(detections: FlatBoxes, gts: FlatBoxes, crowd: np.ndarray | None = None,
             iou_thresholds: Sequence[float] = (0.5, 0.75), aggregation: str = "mean",
             score_threshold: float = 0.0, probabilities: np.ndarray | None = None, keep: np.ndarray | None = None) -> dict:
    """``object_calibration_error`` on already flattened inputs; ``crowd`` ``[M]`` bool or ``None``,
    ``probabilities`` ``[N, C]`` or ``None``, ``keep`` an extra ``[N]`` mask of detections to use."""
    thresholds = check_iou_thresholds(iou_thresholds)
    aggregation = check_aggregation(aggregation)
    if not isinstance(score_threshold, (int, float, np.integer, np.floating)) or not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold!r}")
    if crowd is None:
        crowd = np.zeros(len(gts.labels), dtype=bool)

    keep = detections.scores >= score_threshold if keep is None else keep & (detections.scores >= score_threshold)
    det_boxes, det_image = detections.boxes[keep], detections.image_index[keep]
    scores, labels = detections.scores[keep], detections.labels[keep]
    if probabilities is not None:
        probabilities = probabilities[keep]

    objects = np.flatnonzero(~crowd)
    gt_boxes, gt_image, gt_labels = gts.boxes[objects], gts.image_index[objects], gts.labels[objects]
    if probabilities is not None and len(objects) and probabilities.shape[1]:
        bad = (gt_labels < 0) | (gt_labels >= probabilities.shape[1])
        if bad.any():
            raise ValueError(f"references' label {gt_labels[bad][0]} has no column in 'probabilities' "
                             f"({probabilities.shape[1]} classes)")

    pair_gt, pair_det, pair_iou = _candidate_pairs(det_boxes, det_image, gt_boxes, gt_image, gts.num_images,
                                                   min(thresholds))
    per_threshold, brier_sum = {}, np.zeros(len(objects))
    for tau in thresholds:
        selected = pair_iou >= tau
        brier = _brier_per_object(pair_gt[selected], pair_det[selected], pair_iou[selected], scores, labels,
                                  probabilities, gt_labels, aggregation)
        brier_sum += brier
        per_threshold[tau] = float(brier.mean()) if len(objects) else math.nan

    per_object = np.full(len(gts.labels), np.nan)
    per_object[objects] = brier_sum / len(thresholds)
    return {
        "oce": float(np.mean(list(per_threshold.values()))) if len(objects) else math.nan,
        "oce_per_threshold": per_threshold,
        "num_objects": len(objects),
        "num_images": gts.num_images,
        "num_images_evaluated": len(np.unique(gt_image)),
        "num_detections": int(keep.sum()),
        "per_object_brier": per_object.tolist(),
        "iou_thresholds": list(thresholds),
        "aggregation": aggregation,
        "brier": "binary" if probabilities is None else "multiclass",
    }
