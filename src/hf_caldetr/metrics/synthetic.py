"""Seeded synthetic detections with realistic overlaps, for tests, benchmarks and examples.

Each image gets a Poisson number of ground-truth boxes (so a few images have none). Of its detections, some are
copies of its boxes (several per box: duplicates, as DETR's top-100 holds) and the rest background boxes. Each
detection draws a latent log-odds; a copy is tight and of the right class with that probability, else loose
(and sometimes of another class); later copies of a box are never tight and score lower, yet some pass the
score threshold as real duplicates do. The score is ``sigmoid(sharpness * latent)``. With the defaults about 6
detections per image pass 0.3, precision is about 0.59 and D-ECE about 0.10 (a DETR-like baseline);
``sharpness`` 2 is over-confident (D-ECE about 0.14).
Detections come sorted by descending score, as ``post_process_object_detection`` returns them.
"""

from __future__ import annotations

import numpy as np


def _random_boxes(rng, count: int, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """``[count, 4]`` xyxy boxes inside their images, sides log-uniform between 5 % and 50 % of the image."""
    box_w = widths * np.exp(rng.uniform(np.log(0.05), np.log(0.5), count))
    box_h = heights * np.exp(rng.uniform(np.log(0.05), np.log(0.5), count))
    x1 = rng.uniform(0, 1, count) * (widths - box_w)
    y1 = rng.uniform(0, 1, count) * (heights - box_h)
    return np.column_stack([x1, y1, x1 + box_w, y1 + box_h])


def _jitter(rng, boxes: np.ndarray, sigma: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Shift and rescale each box by a random amount of relative scale ``sigma`` ``[N]``, clipped to the image."""
    sigma = sigma[:, None]
    size = np.column_stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.normal(0, 1, (len(boxes), 2)) * sigma * size
    size = size * np.exp(rng.normal(0, 1, (len(boxes), 2)) * sigma)
    limits = np.column_stack([widths, heights])
    return np.column_stack([np.clip(centre - size / 2, 0, limits), np.clip(centre + size / 2, 0, limits)])


def _copy_rank(source: np.ndarray) -> np.ndarray:
    """For each entry, how many earlier entries share its ``source``: 0 for the first copy of a box."""
    by_source = np.argsort(source, kind="stable")
    sorted_source = source[by_source]
    group_start = np.flatnonzero(np.r_[True, sorted_source[1:] != sorted_source[:-1]])
    group_size = np.diff(np.r_[group_start, len(source)])
    rank = np.empty(len(source), dtype=np.int64)
    rank[by_source] = np.arange(len(source)) - np.repeat(group_start, group_size)
    return rank


def synthetic_detections(num_images: int = 100, detections_per_image: int = 100, mean_boxes_per_image: float = 7.0,
                         num_classes: int = 80, object_fraction: float = 0.15, duplicate_penalty: float = 4.5,
                         sharpness: float = 1.0,
                         image_size: tuple[int, int] = (480, 640), seed: int = 0):
    """Synthetic per-image predictions and references.

    Args:
        num_images: images to generate.
        detections_per_image: detections per image (the post-processor's top-k).
        mean_boxes_per_image: Poisson mean of ground-truth boxes per image.
        num_classes: class ids are ``0 .. num_classes - 1``.
        object_fraction: share of detections that copy a ground-truth box (in images that have one).
        duplicate_penalty: logit penalty of every copy of a box after its first.
        sharpness: logit scale; larger is more over-confident.
        image_size: ``(height, width)`` of every image.
        seed: random seed.

    Returns:
        ``(predictions, references, image_sizes)``: lists of per-image dicts of numpy arrays (``boxes`` xyxy,
        ``scores`` float32, ``labels`` int64; references ``boxes``, ``labels``) and ``[num_images, 2]`` sizes.
    """
    rng = np.random.default_rng(seed)
    height, width = image_size
    gt_counts = rng.poisson(mean_boxes_per_image, num_images)
    gt_image = np.repeat(np.arange(num_images), gt_counts)
    gt_boxes = _random_boxes(rng, len(gt_image), np.full(len(gt_image), height), np.full(len(gt_image), width))
    gt_labels = rng.integers(0, num_classes, len(gt_image))

    det_image = np.repeat(np.arange(num_images), detections_per_image)
    total = len(det_image)
    heights, widths = np.full(total, float(height)), np.full(total, float(width))
    copies_object = (rng.uniform(0, 1, total) < object_fraction) & (gt_counts[det_image] > 0)
    gt_starts = np.cumsum(gt_counts) - gt_counts
    source = gt_starts[det_image] + np.floor(rng.uniform(0, 1, total) * gt_counts[det_image]).astype(int)
    source = np.where(copies_object, source, 0)

    # A latent log-odds per detection: background boxes are unlikely, later copies of a box less likely.
    latent = rng.normal(-4.5, 1.5, total)
    copied = np.flatnonzero(copies_object)
    latent[copied] = rng.normal(1.0, 2.0, len(copied))
    # A first copy is "good" (tight box, right class) with probability sigmoid(latent); duplicates never are.
    first_copy = _copy_rank(source[copied]) == 0
    latent[copied] -= duplicate_penalty * ~first_copy
    good = first_copy & (rng.uniform(0, 1, len(copied)) < 1 / (1 + np.exp(-latent[copied])))
    det_boxes = _random_boxes(rng, total, heights, widths)
    det_labels = rng.integers(0, num_classes, total)
    sigma = np.where(good, 0.04, 0.6)
    det_boxes[copied] = _jitter(rng, gt_boxes[source[copied]], sigma, heights[copied], widths[copied])
    wrong_class = ~good & (rng.uniform(0, 1, len(copied)) < 0.3)
    det_labels[copied] = np.where(wrong_class, det_labels[copied], gt_labels[source[copied]])
    scores = (1 / (1 + np.exp(-sharpness * latent))).astype(np.float32)

    predictions, references = [], []
    for i in range(num_images):
        rows = slice(i * detections_per_image, (i + 1) * detections_per_image)
        order = np.argsort(-scores[rows], kind="stable")
        predictions.append({"boxes": det_boxes[rows][order], "scores": scores[rows][order],
                            "labels": det_labels[rows][order]})
        gt_rows = slice(gt_starts[i], gt_starts[i] + gt_counts[i])
        references.append({"boxes": gt_boxes[gt_rows], "labels": gt_labels[gt_rows]})
    return predictions, references, np.tile([height, width], (num_images, 1))
