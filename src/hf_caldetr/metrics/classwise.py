"""Per-class evaluation shared by the class-averaged metrics (LaECE, LaECE_0, LaACE_0, LRP, oLRP).

These metrics follow COCO's evaluator, as their official code does (``../shared/calibration_oracles/README.md``
records the conventions, found on the official code): detections are cut at a score threshold (one for all
classes, or one per class), the ``max_detections`` highest-scoring of each (image, class) are kept, matched
greedily by ``matching.match_flat`` (pycocotools' rule: equal IoUs go to the box listed last, crowd regions are
ignore regions), and the evaluated detections of each class are pooled over images and sorted by descending
score (stable: image order, then each image's own order), as ``COCOeval.accumulate`` pools them.

The dataset's categories are an input, never guessed from the detections: every official average runs over the
categories of the ground-truth file, including those without ground truth or without detections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .inputs import FlatBoxes, to_numpy
from .matching import PreparedMatching, match_kept, prepare_matching


def category_ids(categories) -> np.ndarray:
    """The dataset's category ids, ``[K]`` int64 ascending.

    Args:
        categories: the number of classes ``K`` (ids ``0..K-1``, a transformers model's ``config.num_labels``),
            a sequence of ids, or a mapping keyed by id (``config.id2label``; COCO ``[{id, name}]`` lists of
            dicts are read by their ``id``).
    """
    if isinstance(categories, bool):
        raise ValueError(f"categories must be a number of classes, a list of ids or an id2label mapping, got "
                         f"{categories!r}")
    if isinstance(categories, (int, np.integer)):
        if categories < 1:
            raise ValueError(f"categories: the number of classes must be positive, got {categories}")
        return np.arange(int(categories), dtype=np.int64)
    if isinstance(categories, Mapping):
        ids = [int(key) for key in categories]
    elif isinstance(categories, Sequence) or hasattr(categories, "__array__"):
        items = list(categories.tolist() if hasattr(categories, "tolist") else categories)
        ids = [int(item["id"]) if isinstance(item, Mapping) else item for item in items]
    else:
        raise ValueError(f"categories must be a number of classes, a list of ids or an id2label mapping, got "
                         f"{type(categories).__name__}")
    array = to_numpy(ids)
    if array.ndim != 1 or not len(array) or array.dtype.kind not in "iu":
        raise ValueError(f"categories must be a non-empty list of integer class ids, got {ids!r}")
    if len(np.unique(array)) != len(array):
        raise ValueError(f"categories lists a class id twice: {ids!r}")
    return np.sort(array.astype(np.int64))


def class_positions(labels: np.ndarray, categories: np.ndarray, what: str) -> np.ndarray:
    """Position of each label in ``categories``; ``ValueError`` naming ``what`` for a label not in the list."""
    if len(labels) and categories[0] >= 0 and categories[-1] < 1 << 20:  # small ids: a lookup table
        table = np.full(int(categories[-1]) + 1, -1, dtype=np.int64)
        table[categories] = np.arange(len(categories))
        inside = (labels >= 0) & (labels <= categories[-1])
        position = np.where(inside, table[np.clip(labels, 0, categories[-1])], -1)
        unknown = position < 0
        if not unknown.any():
            return position
    position = np.searchsorted(categories, labels)
    unknown = (position >= len(categories)) | (categories[np.minimum(position, len(categories) - 1)] != labels)
    if unknown.any():
        missing = sorted(set(labels[unknown].tolist()))[:10]
        raise ValueError(f"{what} has class id(s) {missing} that are not in the dataset's categories "
                         f"{categories.tolist()[:20]}{' ...' if len(categories) > 20 else ''}; pass every class "
                         "of the dataset as categories")
    return position


def class_threshold_mask(detections: FlatBoxes, categories: np.ndarray, thresholds,
                         detection_class: np.ndarray | None = None) -> np.ndarray:
    """``[N]`` keep mask for per-class score thresholds, the official rule: a detection is dropped iff
    ``score < threshold`` of its class, so a NaN threshold (no true positive on the validation split) or -1 (no
    ground truth there) keeps every detection of the class.

    ``thresholds``: mapping ``{class id: threshold}`` covering every category, or ``[K]`` in category order.
    """
    if isinstance(thresholds, Mapping):
        missing = [int(c) for c in categories if int(c) not in {int(k) for k in thresholds}]
        if missing:
            raise ValueError(f"thresholds has no value for class id(s) {missing[:10]}; give one per category "
                             "(NaN keeps every detection of a class)")
        lookup = {int(k): float(v) for k, v in thresholds.items()}
        values = np.array([lookup[int(c)] for c in categories], dtype=np.float64)
    else:
        values = to_numpy(thresholds, dtype=np.float64)
        if values.shape != categories.shape:
            raise ValueError(f"thresholds must give one value per category ({len(categories)}), got shape "
                             f"{values.shape}")
    if detection_class is None:
        detection_class = class_positions(detections.labels, categories, "predictions")
    per_detection = values[detection_class]
    with np.errstate(invalid="ignore"):
        return ~(detections.scores < per_detection)


@dataclass(frozen=True)
class ClassEvaluation:
    """Evaluated detections pooled per class.

    Attributes:
        categories: ``[K]`` the dataset's category ids, ascending.
        num_gt: ``[K]`` ground-truth boxes (crowd regions excluded) per category.
        starts: ``[K + 1]`` the detections of category ``k`` are ``starts[k]:starts[k + 1]`` of the arrays below.
        scores, matched, ious: ``[N]`` per evaluated detection, class-major; within a class by descending score
            when ``ranked`` (ties in priority order: image, then each image's own order), else in priority order.
        iou_threshold: the matching threshold used.
        ranked: whether each class's detections are sorted by descending score (oLRP needs it; sums do not).
    """

    categories: np.ndarray
    num_gt: np.ndarray
    starts: np.ndarray
    scores: np.ndarray
    matched: np.ndarray
    ious: np.ndarray
    iou_threshold: float
    ranked: bool = True

    @property
    def class_index(self) -> np.ndarray:
        """``[N]`` position of each detection's class in ``categories``."""
        return np.repeat(np.arange(len(self.categories)), np.diff(self.starts))

    @property
    def num_detections(self) -> np.ndarray:
        """``[K]`` evaluated detections per category."""
        return np.diff(self.starts)

    def per_class_sum(self, values: np.ndarray) -> np.ndarray:
        """``[K]`` sums of a per-detection ``[N]`` array over each class."""
        return np.bincount(self.class_index, weights=values, minlength=len(self.categories))


@dataclass
class ClasswiseContext:
    """What every per-class evaluation of one split shares (``prepare_classwise``), computed once."""

    categories: np.ndarray
    matching: PreparedMatching
    detection_class: np.ndarray
    num_gt: np.ndarray
    _pooled_order: np.ndarray | None = None

    @property
    def pooled_order(self) -> np.ndarray:
        """All detections class-major, then descending score, ties in priority order (computed on first use)."""
        if self._pooled_order is None:
            matching = self.matching
            # By descending score, ties in priority order; then a stable sort by class keeps that within classes.
            order = descending_order(matching.detections.scores, None if matching.identity_order else matching.rank)
            classes = self.detection_class[order]
            small = classes.astype(np.int16) if len(self.categories) < 1 << 15 else classes  # radix sort
            self._pooled_order = order[np.argsort(small, kind="stable")]
        return self._pooled_order


def descending_order(scores: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Indices by descending score, equal scores by ascending ``rank`` (default: their index), as a stable sort
    gives; computed with the fast unstable sort and only the groups of equal scores re-sorted."""
    order = np.argsort(-scores)
    if len(order) < 2:
        return order
    ranks = order if rank is None else rank[order]
    sorted_scores = scores[order]
    tied = sorted_scores[1:] == sorted_scores[:-1]
    if not tied.any():
        return order
    in_tie = np.r_[tied, False] | np.r_[False, tied]
    run_id = np.cumsum(np.r_[True, ~tied])  # one id per group of equal scores
    positions = np.flatnonzero(in_tie)
    fixed = np.lexsort((ranks[positions], run_id[positions]))
    order[positions] = order[positions][fixed]
    return order


def prepare_classwise(detections: FlatBoxes, references: FlatBoxes, categories, crowd: np.ndarray | None = None,
                      max_detections: int | None = 100) -> ClasswiseContext:
    """Check the classes against ``categories``, count the ground truth per class, prepare the matching."""
    ids = category_ids(categories)
    detection_class = class_positions(detections.labels, ids, "predictions")
    reference_class = class_positions(references.labels, ids, "references")
    ordinary = np.ones(len(reference_class), dtype=bool) if crowd is None else ~np.asarray(crowd, dtype=bool)
    num_gt = np.bincount(reference_class[ordinary], minlength=len(ids))
    return ClasswiseContext(ids, prepare_matching(detections, references, crowd, max_detections), detection_class,
                            num_gt)


def evaluate_prepared(context: ClasswiseContext, iou_threshold: float, score_threshold: float = 0.0,
                      thresholds=None, iou_ties: str = "last", include_images_without_gt: bool = True,
                      ranked: bool = True) -> ClassEvaluation:
    """``evaluate_per_class`` on a ``prepare_classwise`` result; ``ranked=False`` leaves each class's detections
    in priority order (enough for every metric but oLRP, and cheaper)."""
    ids = context.categories
    keep = None
    if thresholds is not None:
        keep = class_threshold_mask(context.matching.detections, ids, thresholds, context.detection_class)
    kept, matched_gt, matched_iou, _ = match_kept(context.matching, score_threshold, iou_threshold,
                                                  include_images_without_gt, iou_ties, keep)
    counts = np.bincount(context.detection_class[kept], minlength=len(ids))
    if not ranked:  # class-major by a stable integer sort: each class keeps the priority order
        classes = context.detection_class[kept]
        order = np.argsort(classes.astype(np.int16) if len(ids) < 1 << 15 else classes, kind="stable")
        return ClassEvaluation(ids, context.num_gt, np.r_[0, np.cumsum(counts)],
                               context.matching.detections.scores[kept[order]], (matched_gt >= 0)[order],
                               matched_iou[order], float(iou_threshold), ranked=False)
    # Ranked: the evaluated detections in the context's pooled order, selected without sorting again.
    num_detections = len(context.detection_class)
    evaluated = np.zeros(num_detections, dtype=bool)
    evaluated[kept] = True
    matched = np.zeros(num_detections, dtype=bool)
    matched[kept] = matched_gt >= 0
    ious = np.zeros(num_detections)
    ious[kept] = matched_iou
    order = context.pooled_order[evaluated[context.pooled_order]]
    return ClassEvaluation(
        categories=ids,
        num_gt=context.num_gt,
        starts=np.r_[0, np.cumsum(counts)],
        scores=context.matching.detections.scores[order],
        matched=matched[order],
        ious=ious[order],
        iou_threshold=float(iou_threshold),
    )


def evaluate_per_class(detections: FlatBoxes, references: FlatBoxes, categories, iou_threshold: float,
                       score_threshold: float = 0.0, thresholds=None, max_detections: int | None = 100,
                       crowd: np.ndarray | None = None, iou_ties: str = "last",
                       include_images_without_gt: bool = True, ranked: bool = True) -> ClassEvaluation:
    """Cut, keep the top ``max_detections`` per (image, class), match, and pool per class (module docstring).

    Args:
        categories: the dataset's classes (``category_ids``).
        score_threshold: one cut for every class (``score >= score_threshold`` kept).
        thresholds: per-class cuts (``class_threshold_mask``), applied together with ``score_threshold``.
        include_images_without_gt: the official code evaluates them (their detections are false positives).
    """
    context = prepare_classwise(detections, references, categories, crowd, max_detections)
    return evaluate_prepared(context, iou_threshold, score_threshold, thresholds, iou_ties, include_images_without_gt,
                             ranked)


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite values; NaN when there are none (``np.nanmean`` without its warning)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def per_class_dict(categories: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """``{class id: value}`` with Python floats (NaN kept), JSON-ready."""
    return {int(c): float(v) for c, v in zip(categories, values)}
