"""Greedy, score-ordered, class-aware, one-to-one matching of detections to ground truth (spec section 4).

The rule, per image, is pycocotools' ``COCOeval.evaluateImg``: keep detections with ``score >= score_threshold``
(optionally only the ``max_detections_per_class`` highest-scoring of each class); visit them by descending
score; each takes the highest-IoU still-unclaimed ground-truth box of its own class and is a true positive when
that IoU is ``>= iou_threshold`` (an IoU exactly at the threshold matches; the threshold is capped at
``1 - 1e-10`` as pycocotools caps it). Only a true positive claims its box, so a detection whose best IoU is too
low claims nothing and cannot block a later one. At ``iou_threshold = 0`` every same-class box is a candidate,
even one without overlap (the official LaECE_0 / LRP code at tau 0 does exactly this).

Crowd regions (references with ``iscrowd = 1``) are COCO's ignore regions: never claimed, never missed. A
detection that takes no ordinary box but covers a same-class crowd region with ``intersection / its own area >=
iou_threshold`` is ignored: neither a true nor a false positive, and dropped from the matches (counted in
``num_ignored``).

Ties, fixed so results never depend on the sort algorithm: detections with equal scores are visited in the
order the image lists them (stable sort); ground-truth boxes with equal IoU go to the one listed **last**
(``iou_ties="last"``, pycocotools' loop replaces its best box on an equal IoU; the official LaECE, LRP and
LaECE_0 code all inherit this). ``iou_ties="first"`` gives them to the box listed first instead.

How it is computed, without a Python loop over detections and in bounded memory:

1. Candidate pairs: the same-image, same-class (detection, box) pairs with IoU over the threshold; a detection
   without one is a false positive whatever happens (most detections, in practice) and is never looked at
   again. Small (image, class) groups pair every detection with every box, all groups at once, in chunks of
   ``_MAX_PAIRS_PER_CHUNK`` pairs. Large groups (``_LARGE_GROUP_PAIRS`` pairs or more, e.g. one image with a
   million detections) use a sweep over box centres instead (``_spatial_candidates``): ``IoU >= t`` implies
   ``|cx_a - cx_b| <= f(t) min(w_a, w_b)`` and the same in y, so each block of detections, sorted by centre,
   is compared only with the boxes whose centres lie in its window, and the exact IoU is computed only for
   the pairs that pass both centre tests. Work is roughly proportional to detections x nearby boxes; when the
   threshold is 0 (every pair is a candidate) it falls back to all pairs.
2. Settling (``_settle``): detections are visited in priority order in windows of ``_SETTLE_WINDOW`` pairs,
   with every box claimed so far removed. Within a window, rounds of vectorised "proposals" settle the
   uncontested detections; when a round makes little progress (a long chain of detections wanting the same
   boxes) the rest of the window is settled by a plain sequential scan of its pairs. Both reproduce the
   sequential rule exactly, ties included.

Memory stays bounded by the chunk sizes: a large group whose candidates exceed ``_MAX_PAIRS_PER_CHUNK`` is
settled in priority-order chunks of detections, each against the boxes still unclaimed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .inputs import FlatBoxes, flatten_pair, reference_crowd_flags

# Pairs built at once (all-pairs chunks of small groups) and candidate pairs held at once (large groups).
_MAX_PAIRS_PER_CHUNK = 4_000_000
# Candidate pairs of small groups kept for every matching of a split (about 32 bytes each).
_MAX_CACHED_PAIRS = 8_000_000
# (image, class) groups with at least this many detection x box pairs use the centre sweep.
_LARGE_GROUP_PAIRS = 1 << 18
# Block shape of the centre sweep: detections x boxes compared at once (about 8 MB per float64 temporary).
_BLOCK_DETECTIONS = 256
_BLOCK_BOXES = 4096
# Candidate pairs settled together; claimed boxes are dropped between windows.
_SETTLE_WINDOW = 1 << 16
# A round of proposals that removes less than this fraction of the live pairs hands over to the sequential scan.
_MIN_ROUND_PROGRESS = 1 / 8


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
        num_ignored: kept detections dropped because they fell on a crowd region.
        flat_index: ``[N]`` int64, each detection's position in the flattened input (all images concatenated).
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
    num_ignored: int = 0
    flat_index: np.ndarray | None = None

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


def _radius_factor(iou_threshold: float) -> float:
    """``f(t)`` such that ``IoU(a, b) >= t > 0`` implies ``|cx_a - cx_b| <= f(t) min(w_a, w_b)`` (and in y).

    With ``iw`` the overlap in x: ``iw <= (w_a + w_b) / 2 - |cx_a - cx_b|``, and ``IoU >= t`` needs
    ``iw >= t max(w_a, w_b)`` (the union is at least the larger area, the overlap in y at most either height)
    and ``t w_a <= w_b <= w_a / t``. So ``|cx_a - cx_b| <= (w_a + w_b) / 2 - t max(w_a, w_b)``, at most
    ``max(1 - t, (1/t - 1) / 2) min(w_a, w_b)``. ``t`` is lowered by a relative 1e-9 so that rounding in the
    computed IoU can never make the bound exclude a pair the IoU would keep. ``inf`` for ``t <= 0``.
    """
    if iou_threshold <= 0:
        return math.inf
    relaxed = iou_threshold * (1 - 1e-9)
    return max(1 - relaxed, (1 / relaxed - 1) / 2)


def _centres_and_radii(boxes: np.ndarray, factor: float, slack: float):
    """``(cx, cy, rx, ry)``: box centres and the half-widths of their candidate windows."""
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    if math.isinf(factor):
        return cx, cy, np.full(len(boxes), np.inf), np.full(len(boxes), np.inf)
    return cx, cy, factor * (boxes[:, 2] - boxes[:, 0]) + slack, factor * (boxes[:, 3] - boxes[:, 1]) + slack


def _spatial_candidates(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float, budget: float):
    """Candidate pairs of one (image, class) group by a sweep over box centres.

    Detections are sorted by the size of their window (powers of two), then by centre x, and taken in blocks of
    ``_BLOCK_DETECTIONS``; each block is compared, in column blocks of ``_BLOCK_BOXES``, with the boxes whose
    centre x lies in the union of its windows (boxes sorted by centre x). A pair survives when both centre
    tests of ``_radius_factor`` pass (an absolute slack of 1e-9 of the coordinates' magnitude covers rounding);
    its exact IoU (``pairwise_box_iou``, the same arithmetic as the all-pairs path) decides.

    Returns:
        ``(det, gt, iou)`` in group-local indices, unsorted; ``None`` as soon as there are more than ``budget``
        (the sweep stops there, so memory stays bounded and little work is wasted).
    """
    num_dets = len(det_boxes)
    factor = _radius_factor(iou_threshold)
    scale = max(float(np.abs(det_boxes).max(initial=0.0)), float(np.abs(gt_boxes).max(initial=0.0)))
    slack = 1e-9 * scale * (1 + factor) if math.isfinite(factor) else math.inf
    dcx, dcy, drx, dry = _centres_and_radii(det_boxes, factor, slack)
    gcx, gcy, grx, gry = _centres_and_radii(gt_boxes, factor, slack)

    gt_order = np.argsort(gcx, kind="stable")
    gcx, gcy, grx, gry = gcx[gt_order], gcy[gt_order], grx[gt_order], gry[gt_order]
    det_order = np.lexsort((dcx, np.frexp(drx)[1]))
    dcx, dcy, drx, dry = dcx[det_order], dcy[det_order], drx[det_order], dry[det_order]
    if math.isfinite(factor):
        lows = np.searchsorted(gcx, dcx - drx - slack, side="left")
        highs = np.searchsorted(gcx, dcx + drx + slack, side="right")
    else:
        lows, highs = np.zeros(num_dets, dtype=np.int64), np.full(num_dets, len(gcx), dtype=np.int64)

    parts, stored = [], 0
    size = _BLOCK_DETECTIONS * _BLOCK_BOXES
    distance, limit = np.empty(size), np.empty(size)
    close_x, close_y = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    for start in range(0, num_dets, _BLOCK_DETECTIONS):
        stop = min(start + _BLOCK_DETECTIONS, num_dets)
        rows = stop - start
        low, high = int(lows[start:stop].min()), int(highs[start:stop].max())
        for column in range(low, high, _BLOCK_BOXES):
            columns = slice(column, min(column + _BLOCK_BOXES, high))
            shape = (rows, columns.stop - column)
            cells = shape[0] * shape[1]
            d, r = distance[:cells].reshape(shape), limit[:cells].reshape(shape)
            near_x, near_y = close_x[:cells].reshape(shape), close_y[:cells].reshape(shape)
            np.subtract(dcx[start:stop, None], gcx[None, columns], out=d)
            np.abs(d, out=d)
            np.minimum(drx[start:stop, None], grx[None, columns], out=r)
            np.less_equal(d, r, out=near_x)
            np.subtract(dcy[start:stop, None], gcy[None, columns], out=d)
            np.abs(d, out=d)
            np.minimum(dry[start:stop, None], gry[None, columns], out=r)
            np.less_equal(d, r, out=near_y)
            np.logical_and(near_x, near_y, out=near_x)
            row, col = np.nonzero(near_x)
            if not len(row):
                continue
            pair_det, pair_gt = det_order[start + row], gt_order[column + col]
            pair_iou = pairwise_box_iou(det_boxes[pair_det], gt_boxes[pair_gt])
            keep = pair_iou >= iou_threshold
            if not keep.any():
                continue
            stored += int(keep.sum())
            if stored > budget:
                return None
            parts.append((pair_det[keep], pair_gt[keep], pair_iou[keep]))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    return tuple(np.concatenate(column) for column in zip(*parts))


def _all_pairs_candidates(dets, det_keys, det_boxes, gt_keys, gt_boxes, iou_threshold):
    """Yield the candidate pairs of detections ``dets`` (ascending) with every same-key box, in chunks.

    Each chunk covers a contiguous run of ``dets`` with about ``_MAX_PAIRS_PER_CHUNK`` pairs before the IoU test
    and is ``(pair_det, pair_gt, pair_iou)`` in global indices, pairs with ``IoU >= iou_threshold`` only.
    """
    gt_order = np.argsort(gt_keys, kind="stable")
    sorted_gt_keys = gt_keys[gt_order]
    keys = det_keys[dets]
    first_gt = np.searchsorted(sorted_gt_keys, keys, side="left")
    pairs_per_det = np.searchsorted(sorted_gt_keys, keys, side="right") - first_gt

    chunk_of_det = (np.cumsum(pairs_per_det) - pairs_per_det) // _MAX_PAIRS_PER_CHUNK
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of_det)) + 1, [len(dets)]])
    for start, stop in itertools.pairwise(bounds):
        counts = pairs_per_det[start:stop]
        total = int(counts.sum())
        if total == 0:
            continue
        block_starts = np.cumsum(counts) - counts
        pair_det = np.repeat(dets[start:stop], counts)
        offset_in_block = np.arange(total) - np.repeat(block_starts, counts)
        pair_gt = gt_order[np.repeat(first_gt[start:stop], counts) + offset_in_block]
        pair_iou = pairwise_box_iou(det_boxes[pair_det], gt_boxes[pair_gt])
        keep = pair_iou >= iou_threshold
        yield pair_det[keep], pair_gt[keep], pair_iou[keep]


def _settle(pair_det, pair_gt, pair_iou, matched_gt, matched_iou, gt_taken, last_wins: bool = True,
            presorted: bool = False) -> None:
    """Settle candidate pairs exactly as the sequential greedy rule would, updating the outputs in place.

    Detection indices are priority ranks (image, then descending score). Every detection that could have
    claimed one of these pairs' boxes and was settled before ranks ahead of every detection here, so boxes in
    ``gt_taken`` are simply gone for them (calls go group by group, each in priority order). Pairs are sorted
    by detection, then IoU descending, then box index (the preference order: ties to the box listed last when
    ``last_wins``, else first), and settled in windows of about ``_SETTLE_WINDOW`` pairs in priority order.
    ``presorted``: the pairs come in that order already.
    """
    if not presorted:
        order = np.lexsort((-pair_gt if last_wins else pair_gt, -pair_iou, pair_det))
        pair_det, pair_gt, pair_iou = pair_det[order], pair_gt[order], pair_iou[order]
    live = ~gt_taken[pair_gt]
    pair_det, pair_gt, pair_iou = pair_det[live], pair_gt[live], pair_iou[live]
    if not len(pair_det):
        return
    det_starts = np.flatnonzero(np.r_[True, pair_det[1:] != pair_det[:-1]])
    # Windows end on detection boundaries: each window holds whole detections, at least one.
    window_of_det = det_starts // _SETTLE_WINDOW
    bounds = np.r_[det_starts[np.r_[True, window_of_det[1:] != window_of_det[:-1]]], len(pair_det)]
    for start, stop in itertools.pairwise(bounds.tolist()):
        window = slice(start, stop)
        live = ~gt_taken[pair_gt[window]]
        _settle_window(pair_det[window][live], pair_gt[window][live], pair_iou[window][live],
                       matched_gt, matched_iou, gt_taken)


def _settle_window(pair_det, pair_gt, pair_iou, matched_gt, matched_iou, gt_taken) -> None:
    """Settle sorted pairs on unclaimed boxes: rounds of proposals, then a sequential scan if they stall.

    Each round, every unsettled detection proposes its best live box, and a proposal ``(d, g)`` is accepted
    when ``d`` is the highest-priority detection still holding a live pair with ``g``. Then nobody ahead of ``d``
    can take ``g`` and every box ``d`` prefers is already taken by someone ahead of it, which is what the
    sequential rule would give ``d``. The highest-priority detection with live pairs always wins, so each round
    settles at least one; usually a few rounds settle everything. When many detections want the same few boxes
    one after another (a chain), a round settles only the head of the chain: once a round removes less than
    ``_MIN_ROUND_PROGRESS`` of the live pairs, the rest is settled by a sequential scan (the rule itself,
    visiting the remaining pairs once), so the work stays proportional to the pairs.
    """
    if not len(pair_det):
        return
    boxes, local_gt = np.unique(pair_gt, return_inverse=True)
    num_dets_bound = int(pair_det[-1]) + 1
    while len(pair_det):
        is_proposal = np.empty(len(pair_det), dtype=bool)
        is_proposal[0] = True
        is_proposal[1:] = pair_det[1:] != pair_det[:-1]
        first_claimant = np.full(len(boxes), num_dets_bound, dtype=np.int64)
        np.minimum.at(first_claimant, local_gt, pair_det)
        accepted = is_proposal & (first_claimant[local_gt] == pair_det)
        matched_gt[pair_det[accepted]] = pair_gt[accepted]
        matched_iou[pair_det[accepted]] = pair_iou[accepted]
        gt_taken[pair_gt[accepted]] = True
        live = ~gt_taken[pair_gt] & (matched_gt[pair_det] < 0)
        remaining = int(live.sum())
        stalled = len(pair_det) - remaining < _MIN_ROUND_PROGRESS * len(pair_det)
        pair_det, pair_gt, pair_iou, local_gt = pair_det[live], pair_gt[live], pair_iou[live], local_gt[live]
        if stalled and remaining:
            _settle_sequentially(pair_det, pair_gt, pair_iou, matched_gt, matched_iou, gt_taken)
            return


def _settle_sequentially(pair_det, pair_gt, pair_iou, matched_gt, matched_iou, gt_taken) -> None:
    """The rule itself on sorted live pairs: each detection in turn takes its first pair whose box is free."""
    starts = np.flatnonzero(np.r_[True, pair_det[1:] != pair_det[:-1]]).tolist()
    ends = starts[1:] + [len(pair_det)]
    boxes = pair_gt.tolist()
    taken = set()
    chosen = []
    for start, stop in zip(starts, ends):
        for index in range(start, stop):
            if boxes[index] not in taken:
                taken.add(boxes[index])
                chosen.append(index)
                break
    chosen = np.asarray(chosen, dtype=np.int64)
    matched_gt[pair_det[chosen]] = pair_gt[chosen]
    matched_iou[pair_det[chosen]] = pair_iou[chosen]
    gt_taken[pair_gt[chosen]] = True


def _match_large_group(dets, gts, det_boxes, gt_boxes, iou_threshold, matched_gt, matched_iou, gt_taken,
                       last_wins: bool) -> None:
    """Match one large (image, class) group: detections ``dets`` (ascending priority) to boxes ``gts`` (listed
    order), by the centre sweep.

    Usually one sweep over all the detections finds every candidate. When there are more than
    ``_MAX_PAIRS_PER_CHUNK`` (many detections piled on many boxes), the detections are taken in priority-order
    chunks, each swept against the boxes still unclaimed: a chunk whose sweep overflows is cut to a quarter and
    retried, a chunk that fits lets the next one double. Once every box is claimed the rest are false positives.
    """
    group_det_boxes, group_gt_boxes = det_boxes[dets], gt_boxes[gts]
    position, chunk_size = 0, len(dets)
    while position < len(dets):
        unclaimed = np.flatnonzero(~gt_taken[gts])
        if not len(unclaimed):
            return
        chunk = slice(position, position + chunk_size)
        budget = _MAX_PAIRS_PER_CHUNK if chunk_size > 1 else math.inf  # one detection's pairs always fit
        pairs = _spatial_candidates(group_det_boxes[chunk], group_gt_boxes[unclaimed], iou_threshold, budget)
        if pairs is None:
            chunk_size = max(1, chunk_size // 4)
            continue
        pair_det, pair_gt, pair_iou = pairs
        _settle(dets[position + pair_det], gts[unclaimed[pair_gt]], pair_iou, matched_gt, matched_iou, gt_taken,
                last_wins)
        position += chunk_size
        chunk_size *= 2


def _match_all(det_keys, det_boxes, gt_keys, gt_boxes, iou_threshold, last_wins: bool = True):
    """Greedy matching of detections (in priority order) to same-key boxes.

    Returns ``(matched_gt [num_dets] int64, -1 when unmatched; matched_iou [num_dets] float64)``.
    """
    num_dets = len(det_keys)
    matched_gt = np.full(num_dets, -1, dtype=np.int64)
    matched_iou = np.zeros(num_dets, dtype=np.float64)
    gt_taken = np.zeros(len(gt_keys), dtype=bool)
    if not num_dets or not len(gt_keys):
        return matched_gt, matched_iou

    sorted_gt_keys = np.sort(gt_keys)
    boxes_per_det = (np.searchsorted(sorted_gt_keys, det_keys, side="right")
                     - np.searchsorted(sorted_gt_keys, det_keys, side="left"))
    _, det_group, dets_per_group = np.unique(det_keys, return_inverse=True, return_counts=True)
    is_large = dets_per_group[det_group] * boxes_per_det >= _LARGE_GROUP_PAIRS

    small = np.flatnonzero(~is_large & (boxes_per_det > 0))
    for pairs in _all_pairs_candidates(small, det_keys, det_boxes, gt_keys, gt_boxes, iou_threshold):
        _settle(*pairs, matched_gt, matched_iou, gt_taken, last_wins)

    large = np.flatnonzero(is_large)
    if len(large):
        large = large[np.argsort(det_keys[large], kind="stable")]  # by group, each in priority order
        gt_order = np.argsort(gt_keys, kind="stable")  # by group, each in listed order
        group_starts = np.flatnonzero(np.r_[True, det_keys[large][1:] != det_keys[large][:-1]])
        for start, stop in itertools.pairwise(np.r_[group_starts, len(large)].tolist()):
            key = det_keys[large[start]]
            first, last = np.searchsorted(sorted_gt_keys, key, "left"), np.searchsorted(sorted_gt_keys, key, "right")
            _match_large_group(large[start:stop], gt_order[first:last], det_boxes, gt_boxes, iou_threshold,
                               matched_gt, matched_iou, gt_taken, last_wins)
    return matched_gt, matched_iou


IOU_TIES = ("last", "first")
# pycocotools compares IoUs with min(threshold, 1 - 1e-10), so a threshold of 1 still matches near-perfect boxes.
_MAX_IOU_THRESHOLD = 1 - 1e-10


def top_per_image_and_class(image_index: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    """Mask ``[N]`` of the first ``limit`` entries of every (image, class), for entries already in priority order
    (by image, then descending score, stable): pycocotools' ``maxDets`` per image and class."""
    if not len(labels):
        return np.ones(0, dtype=bool)
    order = np.lexsort((labels, image_index))  # stable: priority order kept inside each (image, class)
    key_image, key_label = image_index[order], labels[order]
    starts = np.r_[True, (key_image[1:] != key_image[:-1]) | (key_label[1:] != key_label[:-1])]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    keep = np.empty(len(order), dtype=bool)
    keep[order] = np.arange(len(order)) - group_start < limit
    return keep


def _on_crowd_regions(det_keys, det_boxes, crowd_keys, crowd_boxes, iou_threshold) -> np.ndarray:
    """``[N]`` bool: the detection covers a same-key crowd region with ``intersection / detection area >=
    iou_threshold`` (pycocotools' IoU with a crowd box, whose union is the detection alone)."""
    covered = np.zeros(len(det_keys), dtype=bool)
    if not len(crowd_keys) or not len(det_keys):
        return covered
    order = np.argsort(crowd_keys, kind="stable")
    sorted_keys = crowd_keys[order]
    first = np.searchsorted(sorted_keys, det_keys, side="left")
    counts = np.searchsorted(sorted_keys, det_keys, side="right") - first
    pair_det = np.repeat(np.arange(len(det_keys)), counts)
    offsets = np.arange(len(pair_det)) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_crowd = order[np.repeat(first, counts) + offsets]
    a, b = det_boxes[pair_det], crowd_boxes[pair_crowd]
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    intersection = inter_w * inter_h
    ioa = np.divide(intersection, area, out=np.zeros_like(area), where=area > 0)
    np.logical_or.at(covered, pair_det[ioa >= iou_threshold], True)
    return covered


def _subset(flat: FlatBoxes, keep: np.ndarray) -> FlatBoxes:
    return FlatBoxes(flat.boxes[keep], flat.labels[keep], None if flat.scores is None else flat.scores[keep],
                     flat.image_index[keep], flat.position[keep], flat.num_images,
                     {key: value[keep] for key, value in flat.extras.items()})


def check_iou_ties(iou_ties: str) -> bool:
    """``True`` for ``"last"`` (pycocotools), ``False`` for ``"first"``; ``ValueError`` otherwise."""
    if iou_ties not in IOU_TIES:
        raise ValueError(f"iou_ties must be one of {IOU_TIES} (the box listed last wins an IoU tie, as in "
                         f"pycocotools, or the one listed first), got {iou_ties!r}")
    return iou_ties == "last"


@dataclass(frozen=True)
class PreparedMatching:
    """What every matching of the same detections and references shares, computed once (``prepare_matching``):
    the priority order, the top-k mask, the (image, class) keys and the crowd regions. Several matchings of one
    split (other IoU thresholds, other cuts) then only select and match.

    Attributes:
        detections: all detections; references: the ordinary boxes (crowd regions removed).
        crowd_regions: the crowd regions, or ``None``.
        order: ``[N]`` detection indices in priority order (image, then descending score, stable).
        top_k: ``[N]`` bool, within the ``max_detections_per_class`` best of its (image, class), or ``None``.
        det_keys, gt_keys, crowd_keys: (image, class) keys of detections, boxes and crowd regions.
        has_gt: ``[num_images]`` bool, the image has a box or a crowd region.
        has_box: ``[N]`` bool, an ordinary box of the detection's class lies in its image (the others are false
            positives whatever the threshold, and are never matched).
        near_crowd: ``[N]`` bool, a crowd region of the detection's class lies in its image, or ``None``.
    """

    detections: FlatBoxes
    references: FlatBoxes
    crowd_regions: FlatBoxes | None
    order: np.ndarray
    top_k: np.ndarray | None
    det_keys: np.ndarray
    gt_keys: np.ndarray
    crowd_keys: np.ndarray | None
    has_gt: np.ndarray
    has_box: np.ndarray
    near_crowd: np.ndarray | None
    identity_order: bool = False  # the detections came in priority order already (``order`` is ``arange``)
    det_has_gt: np.ndarray | None = None  # ``[N]`` ``has_gt`` of each detection's image
    cache: dict = field(default_factory=dict)  # the candidate pairs of small groups, built on first use

    @property
    def rank(self) -> np.ndarray:
        """``[N]`` each detection's position in the priority order."""
        if "rank" not in self.cache:
            rank = np.empty(len(self.order), dtype=np.int64)
            rank[self.order] = np.arange(len(self.order))
            self.cache["rank"] = rank
        return self.cache["rank"]

    def small_group_pairs(self, last_wins: bool):
        """Every same-(image, class) (detection, box) pair of the groups small enough for all-pairs matching,
        with its IoU, sorted in settling order (priority rank, IoU descending, box by the tie rule), computed once
        and shared by every threshold: ``(small [N] bool, pair_rank, pair_det, pair_gt, pair_iou)``; ``None``
        when there would be more than ``_MAX_CACHED_PAIRS`` (then each matching builds its own)."""
        key = ("pairs", last_wins)
        if key not in self.cache:
            self.cache[key] = self._build_pairs(last_wins)
        return self.cache[key]

    def _build_pairs(self, last_wins: bool):
        candidates = np.flatnonzero(self.has_box)
        keys = self.det_keys[candidates]
        bound = max(int(keys.max(initial=0)), int(self.gt_keys.max(initial=0))) + 1
        if bound <= _DENSE_KEYS:
            boxes_per_det = np.bincount(self.gt_keys, minlength=bound)[keys]
            dets_in_group = np.bincount(keys, minlength=bound)[keys]
        else:
            sorted_gt_keys = np.sort(self.gt_keys)
            boxes_per_det = (np.searchsorted(sorted_gt_keys, keys, side="right")
                             - np.searchsorted(sorted_gt_keys, keys, side="left"))
            _, group, dets_per_group = np.unique(keys, return_inverse=True, return_counts=True)
            dets_in_group = dets_per_group[group]
        small_candidates = dets_in_group * boxes_per_det < _LARGE_GROUP_PAIRS
        if int(boxes_per_det[small_candidates].sum()) > _MAX_CACHED_PAIRS:
            return None
        small = np.zeros(len(self.det_keys), dtype=bool)
        small[candidates[small_candidates]] = True
        dets = candidates[small_candidates]
        parts = list(_all_pairs_candidates(dets, self.det_keys, self.detections.boxes, self.gt_keys,
                                           self.references.boxes, 0.0))
        pair_det, pair_gt, pair_iou = (np.concatenate(column) if parts else np.zeros(0, dtype)
                                       for column, dtype in zip(zip(*parts) if parts else ((), (), ()),
                                                                (np.int64, np.int64, np.float64)))
        pair_rank = pair_det if self.identity_order else self.rank[pair_det]
        order = np.lexsort((-pair_gt if last_wins else pair_gt, -pair_iou, pair_rank))
        return small, pair_rank[order], pair_det[order], pair_gt[order], pair_iou[order]


def _priority_order(image_index: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Detections by image, then descending score, stable. Post-processed outputs usually come in that order
    already (each image sorted by score): then no sort is needed."""
    if len(scores) < 2:
        return np.arange(len(scores))
    same_image = image_index[1:] == image_index[:-1]
    if np.all((image_index[1:] > image_index[:-1]) | (same_image & (scores[1:] <= scores[:-1]))):
        return np.arange(len(scores))
    return np.lexsort((-scores, image_index))


def _keys(images: list[np.ndarray], labels: list[np.ndarray]) -> list[np.ndarray]:
    """One int64 key per (image, class), shared by every array of ``images`` / ``labels``."""
    all_labels = np.concatenate(labels)
    if not len(all_labels):
        return [np.zeros(0, dtype=np.int64) for _ in labels]
    low, high = int(all_labels.min()), int(all_labels.max())
    if high - low < 1 << 20:  # small ids (the usual case): no np.unique needed
        span = high - low + 1
        return [image * span + (label - low) for image, label in zip(images, labels)]
    _, label_ids = np.unique(all_labels, return_inverse=True)
    span = int(label_ids.max()) + 1
    bounds = np.cumsum([0] + [len(label) for label in labels])
    return [image * span + label_ids[start:stop] for image, start, stop in zip(images, bounds[:-1], bounds[1:])]


# Keys below this bound are counted and looked up in dense tables (bincount, indexing) instead of sorting.
_DENSE_KEYS = 1 << 25


def _present(keys: np.ndarray, in_keys: np.ndarray) -> np.ndarray:
    """``[len(keys)]`` bool: the key occurs in ``in_keys``."""
    if not len(in_keys):
        return np.zeros(len(keys), dtype=bool)
    bound = max(int(keys.max(initial=0)), int(in_keys.max())) + 1
    if bound <= _DENSE_KEYS:
        table = np.zeros(bound, dtype=bool)
        table[in_keys] = True
        return table[keys]
    table = np.unique(in_keys)
    position = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return table[position] == keys


def _check_max_detections(max_detections_per_class) -> None:
    if max_detections_per_class is not None and (isinstance(max_detections_per_class, bool)
                                                 or not isinstance(max_detections_per_class, (int, np.integer))
                                                 or max_detections_per_class < 1):
        raise ValueError(f"max_detections_per_class must be a positive integer or None, got "
                         f"{max_detections_per_class!r}")


def prepare_matching(detections: FlatBoxes, references: FlatBoxes, crowd: np.ndarray | None = None,
                     max_detections_per_class: int | None = None) -> PreparedMatching:
    """The shared part of ``match_flat`` (see ``PreparedMatching``)."""
    _check_max_detections(max_detections_per_class)
    crowd_regions = None
    if crowd is not None:
        crowd = np.asarray(crowd).astype(bool)
        if crowd.shape != references.labels.shape:
            raise ValueError(f"crowd must have one flag per reference box ({len(references.labels)}), got shape "
                             f"{crowd.shape}")
        if crowd.any():
            crowd_regions = _subset(references, crowd)
            references = _subset(references, ~crowd)
    # An image counts as having ground truth through its ordinary boxes or its crowd regions (pycocotools
    # evaluates an image whenever it has any annotation of the class).
    has_gt = references.counts_per_image > 0
    if crowd_regions is not None:
        has_gt |= crowd_regions.counts_per_image > 0
    # Priority order: by image, then descending score; stable, so equal scores keep list order.
    order = _priority_order(detections.image_index, detections.scores)
    # One key per (image, class) shared by detections, boxes and crowd regions.
    images = [detections.image_index, references.image_index]
    labels = [detections.labels, references.labels]
    if crowd_regions is not None:
        images.append(crowd_regions.image_index)
        labels.append(crowd_regions.labels)
    keys = _keys(images, labels)
    det_keys, gt_keys = keys[0], keys[1]
    crowd_keys = keys[2] if crowd_regions is not None else None
    top_k = None
    if max_detections_per_class is not None and len(det_keys):
        # Only needed when some (image, class) holds more detections than the limit.
        bound = int(det_keys.max()) + 1
        group_sizes = np.bincount(det_keys) if bound <= _DENSE_KEYS else np.unique(det_keys, return_counts=True)[1]
        if group_sizes.max() > max_detections_per_class:
            top_k = np.empty(len(order), dtype=bool)
            top_k[order] = top_per_image_and_class(detections.image_index[order], detections.labels[order],
                                                   int(max_detections_per_class))
    has_box = _present(det_keys, gt_keys)
    near_crowd = _present(det_keys, crowd_keys) if crowd_keys is not None else None
    identity = bool(len(order) == 0 or (order[-1] == len(order) - 1 and np.all(np.diff(order) == 1)))
    return PreparedMatching(detections, references, crowd_regions, order, top_k, det_keys, gt_keys, crowd_keys,
                            has_gt, has_box, near_crowd, identity, has_gt[detections.image_index])


def match_kept(prepared: PreparedMatching, score_threshold: float = 0.3, iou_threshold: float = 0.5,
               include_images_without_gt: bool = False, iou_ties: str = "last", keep: np.ndarray | None = None,
               top_k: bool = True):
    """The matching itself: ``(kept, matched_gt, matched_iou, num_ignored)``, ``kept`` the flat indices of the
    evaluated detections in priority order (crowd-ignored ones removed), ``matched_gt`` the matched ordinary box
    (index into ``prepared.references``) or -1, ``matched_iou`` its IoU (0 when unmatched)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    last_wins = check_iou_ties(iou_ties)
    threshold = min(iou_threshold, _MAX_IOU_THRESHOLD)
    detections, references, crowd_regions = prepared.detections, prepared.references, prepared.crowd_regions
    # The top-k before or after a score cut keeps the same detections (both keep the highest scores).
    kept_mask = detections.scores >= score_threshold if score_threshold > 0 else None
    for mask in (keep, prepared.top_k if top_k else None,
                 None if include_images_without_gt else prepared.det_has_gt):
        if mask is not None:
            kept_mask = mask.copy() if kept_mask is None else kept_mask & mask
    if kept_mask is None:
        kept = prepared.order
    elif prepared.identity_order:
        kept = np.flatnonzero(kept_mask)
    else:
        kept = prepared.order[kept_mask[prepared.order]]

    # Only detections with a same-class box in their image can match: the rest stay false positives.
    matched_gt = np.full(len(kept), -1, dtype=np.int64)
    matched_iou = np.zeros(len(kept))
    cached = prepared.small_group_pairs(last_wins) if len(kept) else None
    if cached is None:
        candidates = np.flatnonzero(prepared.has_box[kept])
        chosen = kept[candidates]
        matched_gt[candidates], matched_iou[candidates] = _match_all(
            prepared.det_keys[chosen], detections.boxes[chosen], prepared.gt_keys, references.boxes, threshold,
            last_wins)
    else:
        small, pair_rank, pair_det, pair_gt, pair_iou = cached
        is_kept = np.zeros(len(detections.scores), dtype=bool)
        is_kept[kept] = True
        selected = is_kept[pair_det] & (pair_iou >= threshold)
        by_rank_gt = np.full(len(detections.scores), -1, dtype=np.int64)
        by_rank_iou = np.zeros(len(detections.scores))
        _settle(pair_rank[selected], pair_gt[selected], pair_iou[selected], by_rank_gt, by_rank_iou,
                np.zeros(len(prepared.gt_keys), dtype=bool), last_wins, presorted=True)
        kept_rank = kept if prepared.identity_order else prepared.rank[kept]
        matched_gt, matched_iou = by_rank_gt[kept_rank], by_rank_iou[kept_rank]
        # Groups too large for all pairs (e.g. one image with a million detections): the centre sweep, per call.
        large = np.flatnonzero(prepared.has_box[kept] & ~small[kept])
        if len(large):
            chosen = kept[large]
            matched_gt[large], matched_iou[large] = _match_all(
                prepared.det_keys[chosen], detections.boxes[chosen], prepared.gt_keys, references.boxes, threshold,
                last_wins)
    num_ignored = 0
    if crowd_regions is not None:
        near = np.flatnonzero((matched_gt < 0) & prepared.near_crowd[kept])
        ignored = np.zeros(len(kept), dtype=bool)
        chosen = kept[near]
        ignored[near] = _on_crowd_regions(prepared.det_keys[chosen], detections.boxes[chosen], prepared.crowd_keys,
                                          crowd_regions.boxes, threshold)
        num_ignored = int(ignored.sum())
        if num_ignored:
            stay = ~ignored
            kept, matched_gt, matched_iou = kept[stay], matched_gt[stay], matched_iou[stay]
    return kept, matched_gt, matched_iou, num_ignored


def match_prepared(prepared: PreparedMatching, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                   include_images_without_gt: bool = False, iou_ties: str = "last",
                   keep: np.ndarray | None = None, top_k: bool = True) -> DetectionMatches:
    """``match_flat`` on a ``prepare_matching`` result; ``top_k=False`` ignores the top-k it was prepared with."""
    kept, matched_gt, matched_iou, num_ignored = match_kept(prepared, score_threshold, iou_threshold,
                                                            include_images_without_gt, iou_ties, keep, top_k)
    detections, references = prepared.detections, prepared.references
    matched = matched_gt >= 0
    matched_reference = np.full(len(kept), -1, dtype=np.int64)
    matched_reference[matched] = references.position[matched_gt[matched]]
    images_evaluated = detections.num_images if include_images_without_gt else int(prepared.has_gt.sum())
    return DetectionMatches(
        scores=detections.scores[kept],
        matched=matched,
        labels=detections.labels[kept],
        ious=matched_iou,
        image_index=detections.image_index[kept],
        boxes=detections.boxes[kept],
        detection_index=detections.position[kept],
        matched_reference=matched_reference,
        num_images=detections.num_images,
        num_images_evaluated=images_evaluated,
        num_ignored=num_ignored,
        flat_index=kept,
    )


def match_flat(detections: FlatBoxes, references: FlatBoxes, score_threshold: float = 0.3,
               iou_threshold: float = 0.5, include_images_without_gt: bool = False, *,
               crowd: np.ndarray | None = None, max_detections_per_class: int | None = None,
               iou_ties: str = "last", keep: np.ndarray | None = None) -> DetectionMatches:
    """``match_detections`` on already checked and flattened inputs (see ``inputs.flatten_pair``).

    ``crowd`` is a ``[num references]`` mask of crowd regions; ``keep`` an extra ``[num detections]`` mask applied
    with the score threshold (e.g. per-class thresholds).
    """
    check_iou_ties(iou_ties)
    prepared = prepare_matching(detections, references, crowd, max_detections_per_class)
    return match_prepared(prepared, score_threshold, iou_threshold, include_images_without_gt, iou_ties, keep)


def match_detections(predictions, references, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                     include_images_without_gt: bool = False, *, max_detections_per_class: int | None = None,
                     iou_ties: str = "last") -> DetectionMatches:
    """Match per-image detections to ground truth with pycocotools' greedy rule (the D-ECE protocol's).

    Args:
        predictions: list (one per image) of dicts with ``boxes`` ``[n_i, 4]`` absolute xyxy, ``scores``
            ``[n_i]`` in [0, 1] and ``labels`` ``[n_i]``; torch tensors, numpy arrays or lists.
        references: list of dicts with ``boxes`` ``[m_i, 4]`` absolute xyxy, ``labels`` ``[m_i]`` and optionally
            ``iscrowd`` ``[m_i]`` (1 marks a crowd region: an ignore region, see the module docstring).
        score_threshold: detections with ``score >= score_threshold`` are kept.
        iou_threshold: a detection is a true positive when its IoU with the box it takes is ``>=`` this.
        include_images_without_gt: keep the detections of images without ground truth (all false positives);
            the D-ECE protocol's default drops them.
        max_detections_per_class: keep only this many highest-scoring detections per image and class (COCO's
            ``maxDets``; the official LaECE and LRP code uses 100); ``None`` keeps all.
        iou_ties: ``"last"`` (pycocotools) or ``"first"``: which of two boxes with equal IoU a detection takes.

    Returns:
        ``DetectionMatches`` over the kept detections (see the module docstring for the rule and ties).

    Raises:
        ValueError: naming the image and the problem for malformed input.
    """
    flat_predictions, flat_references = flatten_pair(predictions, references)
    return match_flat(flat_predictions, flat_references, score_threshold, iou_threshold, include_images_without_gt,
                      crowd=reference_crowd_flags(references, flat_references),
                      max_detections_per_class=max_detections_per_class, iou_ties=iou_ties)
