"""Greedy, score-ordered, class-aware, one-to-one matching of detections to ground truth (spec section 4).

The rule, per image: keep detections with ``score >= score_threshold``; visit them by descending score; each
takes the highest-IoU still-unclaimed ground-truth box of its own class and is a true positive when that IoU is
``>= iou_threshold``. Only a true positive claims its box, so a detection whose best IoU is too low claims
nothing and cannot block a later one.

Ties, fixed so results never depend on the sort algorithm: detections with equal scores are visited in the
order the image lists them (stable sort); ground-truth boxes with equal IoU go to the one listed first.

The sequential rule is computed without a Python loop over detections: candidate (detection, box) pairs are
the same-image, same-class pairs with IoU over the threshold, and rounds of vectorised "proposals" settle them
(see ``_resolve_greedy``). The rounds reproduce the sequential result exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .inputs import FlatBoxes, flatten_pair

# Candidate pairs are built in chunks of at most this many so that one image with hundreds of same-class
# detections and boxes cannot allocate unbounded memory.
_MAX_PAIRS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class DetectionMatches:
    """The kept detections of all images and their matching outcome, as flat arrays.

    Detections are ordered by image, then by descending score (the matching order).

    Attributes:
        scores: ``[N]`` float64 confidences.
        matched: ``[N]`` bool, true positive or not.
        labels: ``[N]`` int64 predicted classes.
        ious: ``[N]`` float64 IoU with the matched ground-truth box, 0 for false positives.
        image_index: ``[N]`` int64, the image (position in the input lists).
        boxes: ``[N, 4]`` float64 absolute xyxy.
        detection_index: ``[N]`` int64, the detection's position in its image's prediction lists.
        matched_reference: ``[N]`` int64, the matched box's position in its image's reference lists, -1 for
            false positives.
        num_images: images given; ``num_images_evaluated``: those whose detections were kept (all of them when
            images without ground truth are included).
    """

    scores: np.ndarray
    matched: np.ndarray
    labels: np.ndarray
    ious: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    detection_index: np.ndarray
    matched_reference: np.ndarray
    num_images: int
    num_images_evaluated: int

    def __len__(self) -> int:
        return len(self.scores)


def pairwise_box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of paired rows: ``boxes_a[i]`` with ``boxes_b[i]``, both ``[P, 4]`` xyxy; returns ``[P]``.

    ``IoU = |A ∩ B| / (|A| + |B| - |A ∩ B|)``; two zero-area boxes have IoU 0 rather than 0/0.
    """
    inter_w = np.clip(np.minimum(boxes_a[:, 2], boxes_b[:, 2]) - np.maximum(boxes_a[:, 0], boxes_b[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(boxes_a[:, 3], boxes_b[:, 3]) - np.maximum(boxes_a[:, 1], boxes_b[:, 1]), 0, None)
    intersection = inter_w * inter_h
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _candidate_pairs(det_keys, det_boxes, gt_keys, gt_boxes, iou_threshold):
    """Same-key (image, class) pairs with ``IoU >= iou_threshold``.

    Returns ``(pair_det, pair_gt, pair_iou)``, sorted by detection, then IoU descending, then box index, so a
    detection's first pair is its preferred box.
    """
    gt_order = np.argsort(gt_keys, kind="stable")
    sorted_gt_keys = gt_keys[gt_order]
    first_gt = np.searchsorted(sorted_gt_keys, det_keys, side="left")
    pairs_per_det = np.searchsorted(sorted_gt_keys, det_keys, side="right") - first_gt

    # Split the detections into chunks of about _MAX_PAIRS_PER_CHUNK pairs to cap memory.
    chunk_of_det = (np.cumsum(pairs_per_det) - pairs_per_det) // _MAX_PAIRS_PER_CHUNK
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of_det)) + 1, [len(det_keys)]])
    parts = []
    for start, stop in itertools.pairwise(bounds):
        counts = pairs_per_det[start:stop]
        block_starts = np.cumsum(counts) - counts
        pair_det = np.repeat(np.arange(start, stop), counts)
        offset_in_block = np.arange(counts.sum()) - np.repeat(block_starts, counts)
        pair_gt = gt_order[np.repeat(first_gt[start:stop], counts) + offset_in_block]
        pair_iou = pairwise_box_iou(det_boxes[pair_det], gt_boxes[pair_gt])
        keep = pair_iou >= iou_threshold
        parts.append((pair_det[keep], pair_gt[keep], pair_iou[keep]))
    pair_det, pair_gt, pair_iou = (np.concatenate(column) for column in zip(*parts))
    order = np.lexsort((pair_gt, -pair_iou, pair_det))
    return pair_det[order], pair_gt[order], pair_iou[order]


def _resolve_greedy(pair_det, pair_gt, pair_iou, num_dets, num_gts):
    """Settle candidate pairs exactly as the sequential greedy rule would.

    Detections are numbered in priority order (image, then descending score); pairs come sorted as
    ``_candidate_pairs`` returns them. Each round, every unsettled detection proposes its best live box, and a
    proposal ``(d, g)`` is accepted when ``d`` is the highest-priority detection still holding a live pair with
    ``g``. Then nobody ahead of ``d`` can take ``g`` and every box ``d`` prefers is already taken by someone
    ahead of it, which is what the sequential rule would give ``d``. In every image the highest-priority detection
    with live pairs always wins, so each round settles at least one per image; in practice a few rounds suffice.

    Returns ``(matched_gt [num_dets] int64, -1 when unmatched; matched_iou [num_dets] float64)``.
    """
    matched_gt = np.full(num_dets, -1, dtype=np.int64)
    matched_iou = np.zeros(num_dets, dtype=np.float64)
    gt_taken = np.zeros(num_gts, dtype=bool)
    while len(pair_det):
        is_proposal = np.empty(len(pair_det), dtype=bool)
        is_proposal[0] = True
        is_proposal[1:] = pair_det[1:] != pair_det[:-1]
        first_claimant = np.full(num_gts, num_dets, dtype=np.int64)
        np.minimum.at(first_claimant, pair_gt, pair_det)
        accepted = is_proposal & (first_claimant[pair_gt] == pair_det)
        matched_gt[pair_det[accepted]] = pair_gt[accepted]
        matched_iou[pair_det[accepted]] = pair_iou[accepted]
        gt_taken[pair_gt[accepted]] = True
        live = ~gt_taken[pair_gt] & (matched_gt[pair_det] < 0)
        pair_det, pair_gt, pair_iou = pair_det[live], pair_gt[live], pair_iou[live]
    return matched_gt, matched_iou


def _group_keys(det_labels, det_image, gt_labels, gt_image):
    """One int64 key per (image, class), shared by detections and boxes."""
    _, label_ids = np.unique(np.concatenate([det_labels, gt_labels]), return_inverse=True)
    num_label_ids = int(label_ids.max()) + 1 if len(label_ids) else 1
    keys = np.concatenate([det_image, gt_image]) * num_label_ids + label_ids
    return keys[: len(det_labels)], keys[len(det_labels):]


def match_flat(detections: FlatBoxes, references: FlatBoxes, score_threshold: float = 0.3,
               iou_threshold: float = 0.5, include_images_without_gt: bool = False) -> DetectionMatches:
    """``match_detections`` on already checked and flattened inputs (see ``inputs.flatten_pair``)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    has_gt = references.counts_per_image > 0
    keep = detections.scores >= score_threshold
    if not include_images_without_gt:
        keep &= has_gt[detections.image_index]
    kept = np.flatnonzero(keep)
    # Priority order: by image, then descending score; lexsort is stable, so equal scores keep list order.
    kept = kept[np.lexsort((-detections.scores[kept], detections.image_index[kept]))]

    det_image, det_labels, det_boxes = (detections.image_index[kept], detections.labels[kept],
                                        detections.boxes[kept])
    det_keys, gt_keys = _group_keys(det_labels, det_image, references.labels, references.image_index)
    pairs = _candidate_pairs(det_keys, det_boxes, gt_keys, references.boxes, iou_threshold)
    matched_gt, matched_iou = _resolve_greedy(*pairs, num_dets=len(kept), num_gts=len(references.labels))

    matched = matched_gt >= 0
    matched_reference = np.full(len(kept), -1, dtype=np.int64)
    matched_reference[matched] = references.position[matched_gt[matched]]
    images_evaluated = detections.num_images if include_images_without_gt else int(has_gt.sum())
    return DetectionMatches(
        scores=detections.scores[kept],
        matched=matched,
        labels=det_labels,
        ious=matched_iou,
        image_index=det_image,
        boxes=det_boxes,
        detection_index=detections.position[kept],
        matched_reference=matched_reference,
        num_images=detections.num_images,
        num_images_evaluated=images_evaluated,
    )


def match_detections(predictions, references, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                     include_images_without_gt: bool = False) -> DetectionMatches:
    """Match per-image detections to ground truth with the D-ECE protocol's greedy rule.

    Args:
        predictions: list (one per image) of dicts with ``boxes`` ``[n_i, 4]`` absolute xyxy, ``scores``
            ``[n_i]`` in [0, 1] and ``labels`` ``[n_i]``; torch tensors, numpy arrays or lists.
        references: list of dicts with ``boxes`` ``[m_i, 4]`` absolute xyxy and ``labels`` ``[m_i]``.
        score_threshold: detections with ``score >= score_threshold`` are kept.
        iou_threshold: a detection is a true positive when its IoU with the box it takes is ``>=`` this.
        include_images_without_gt: keep the detections of images without ground truth (all false positives);
            the protocol's default drops them.

    Returns:
        ``DetectionMatches`` over the kept detections (see the module docstring for the rule and ties).

    Raises:
        ValueError: naming the image and the problem for malformed input.
    """
    flat_predictions, flat_references = flatten_pair(predictions, references)
    return match_flat(flat_predictions, flat_references, score_threshold, iou_threshold, include_images_without_gt)
