"""Time the whole calibration protocol on the user's path against a straightforward per-image loop.

The input is what an evaluation loop holds: for each of 5,000 COCO-val-sized synthetic images
(``synthetic_detections(seed=0)``: 100 detections, about 7 ground-truth boxes each) the dict that transformers'
``post_process_object_detection`` returns (torch tensors ``boxes`` float32 ``[100, 4]``, ``scores`` float32
``[100]``, ``labels`` int64 ``[100]``) and the reference that ``hf_caldetr.evaluation.labels_to_references``
returns (numpy ``boxes`` float32 ``[m, 4]``, ``labels`` int64 ``[m]``, ``iscrowd`` int64 ``[m]``, here all 0).

Two paths of the library are timed:

* one call: ``evaluate_detections(predictions, references, categories=80, compute_ap=False)``;
* streaming: ``DetectionCalibrationMetric(categories=80, compute_ap=False)``, ``update`` once per batch of 16
  images (the lists of per-image dicts that accelerate's ``gather_for_metrics(..., use_gather_object=True)``
  returns; on one process that is the batch's own list), then ``compute``.

Both compute the whole protocol: D-ECE (score >= 0.3, IoU 0.5, images without ground truth left out), LaECE at
IoU 0.5 and 0.1 with its pooled bins, the fixed-cut LRP and its components, oLRP and its components (IoU 0.5,
all detections), the LRP-optimal thresholds (IoU 0, all detections), LaECE_0 / LaACE_0 (0.3 cut, IoU 0) and
OCE (mean aggregation, IoU 0.5 and 0.75, score >= 0.3). COCO AP is left out of the timing (``compute_ap=False``):
both pipelines would call the same pycocotools.

The baseline (``LoopProtocol``, written here with no call into hf_caldetr's metric code) converts, cuts, sorts
and matches image by image: a numpy IoU matrix per image, then a Python greedy loop over the detections (one loop
per IoU threshold and detection set: the 0.3 cut at IoU 0.5, 0.1 and 0, all detections at IoU 0.5 and 0), then
pools per class and applies the formulas. The loop visits only detections whose class has a box in the image
(the others are false positives whatever happens) and stops once every box is taken, as anyone writing it would;
visiting every detection makes it about twice as slow. It is fed the same streaming batches for the streaming
comparison.

It is also a second, independent implementation: the script checks that it gives every reported number of the
library (to 1e-9; both widen the float32 inputs to float64 first) and, when ``shared/calibration_oracles`` sits
next to the repository, the official-code numbers of those reference problems, and fails loudly otherwise.

The script prints the median times, their ratios (goal: at most 0.1), the largest disagreement and where the
library's time goes (cProfile of one extra, untimed call), writes ``benchmarks/results/metrics.md`` and
``metrics.json``, and a reliability diagram of the same kind of data to ``benchmarks/results/reliability_example.png``.

    python benchmarks/metrics.py [--images 5000] [--repeats 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hf_caldetr
from hf_caldetr.metrics import (
    DetectionCalibrationMetric,
    detection_ece,
    evaluate_detections,
    plot_reliability_diagram,
    synthetic_detections,
)

RESULTS = Path(__file__).resolve().parent / "results"
# The official-code reference problems (shared/calibration_oracles, next to the repository), if present.
ORACLES = Path(__file__).resolve().parents[2] / "shared" / "calibration_oracles"
if not ORACLES.is_dir():  # the project's copy of the same files
    ORACLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "calibration_oracles"
NUM_CLASSES = 80
TOLERANCE = 1e-9


# ---------------------------------------------------------------- the user's input

def post_processed_inputs(num_images: int, seed: int = 0):
    """``synthetic_detections`` as ``post_process_object_detection`` outputs (torch) and ``labels_to_references``
    references (numpy float32 boxes, int64 labels and iscrowd)."""
    predictions, references, _ = synthetic_detections(num_images=num_images, detections_per_image=100,
                                                      mean_boxes_per_image=7.0, seed=seed)
    outputs = [{"scores": torch.from_numpy(np.asarray(p["scores"], dtype=np.float32)),
                "labels": torch.from_numpy(np.asarray(p["labels"], dtype=np.int64)),
                "boxes": torch.from_numpy(np.asarray(p["boxes"], dtype=np.float32))} for p in predictions]
    targets = [{"boxes": np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(r["labels"], dtype=np.int64),
                "iscrowd": np.zeros(len(r["labels"]), dtype=np.int64)} for r in references]
    return outputs, targets


def gathered_batches(predictions: list, references: list, size: int) -> list[tuple[list, list]]:
    """The images in batches of ``size``, each passed through accelerate's ``gather_for_metrics(...,
    use_gather_object=True)`` as an evaluation loop does (on one process it returns the batch's own list of
    per-image dicts); done once, outside the timing."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    return [(accelerator.gather_for_metrics(predictions[start:start + size], use_gather_object=True),
             accelerator.gather_for_metrics(references[start:start + size], use_gather_object=True))
            for start in range(0, len(predictions), size)]


# ---------------------------------------------------------------- the straightforward baseline

SCORE_CUT = 0.3
MAX_DETECTIONS = 100
D_ECE_BINS = 10
LAECE_BINS = 25
OCE_THRESHOLDS = (0.5, 0.75)
EPS = np.finfo(np.float64).eps


def to_float64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def to_int64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value).astype(np.int64)


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """``[n, m]`` IoU of every box in ``boxes_a`` with every box in ``boxes_b`` (xyxy)."""
    inter_w = np.clip(np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
                      - np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
                      - np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1]), 0, None)
    intersection = inter_w * inter_h
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def greedy_match(rows: np.ndarray, iou: np.ndarray, same_class: np.ndarray, threshold: float):
    """pycocotools' greedy rule for one image: detections ``rows`` (priority order) each take the unclaimed
    same-class box with the largest IoU (the one listed last on ties) if that IoU is >= ``threshold``.

    Returns ``(matched [len(rows)] bool, iou of the matched box [len(rows)] float64, 0 when unmatched)``.
    """
    matched = np.zeros(len(rows), dtype=bool)
    matched_iou = np.zeros(len(rows))
    num_gt = iou.shape[1]
    if not num_gt or not len(rows):
        return matched, matched_iou
    threshold = min(threshold, 1 - 1e-10)  # pycocotools' cap
    taken = np.zeros(num_gt, dtype=bool)
    for k in np.flatnonzero(same_class[rows].any(axis=1)).tolist():  # others have no candidate at all
        row = rows[k]
        candidates = np.where(same_class[row] & ~taken, iou[row], -1.0)
        best = num_gt - 1 - int(np.argmax(candidates[::-1]))  # the last of equal maxima
        if candidates[best] >= threshold:
            taken[best] = True
            matched[k] = True
            matched_iou[k] = candidates[best]
            if taken.all():
                break
    return matched, matched_iou


def top_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Mask of the first ``limit`` entries of each class, for entries in priority order."""
    if not len(labels) or np.bincount(labels - labels.min()).max() <= limit:
        return np.ones(len(labels), dtype=bool)
    seen: dict[int, int] = {}
    keep = np.zeros(len(labels), dtype=bool)
    for index, label in enumerate(labels.tolist()):
        seen[label] = seen.get(label, 0) + 1
        keep[index] = seen[label] <= limit
    return keep


def oce_briers(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, thresholds):
    """Per GT object and threshold, the binary Brier score of the mean-aggregated detections with IoU >= tau
    (class-agnostic, not one-to-one); 1.0 for an object without any."""
    iou = iou_matrix(det_boxes, gt_boxes)
    briers = []
    for tau in thresholds:
        per_object = []
        for g in range(len(gt_labels)):
            gathered = np.flatnonzero(iou[:, g] >= tau)
            if not len(gathered):
                per_object.append(1.0)
                continue
            p = det_scores[gathered].mean()
            label = np.bincount(det_labels[gathered]).argmax()
            per_object.append(2.0 * (1.0 - p) ** 2 if label == gt_labels[g] else 2.0 * p ** 2)
        briers.append(per_object)
    return briers


class LoopProtocol:
    """The whole protocol, image by image, with a Python greedy loop (the module docstring).

    ``update`` does the per-image work (conversion, cut, sort, IoU, matching, OCE); ``compute`` pools per class
    and applies the formulas. Crowd regions are not supported (the benchmark has none).
    """

    def __init__(self, categories=range(NUM_CLASSES)):
        self.categories = [int(c) for c in categories]  # the dataset's class ids
        self.num_images = 0
        self.images_with_gt = 0
        self.gt_labels = []
        self.dece = {"scores": [], "matched": []}
        self.cut = {key: [] for key in ("labels", "scores", "m05", "i05", "m01", "i01", "m00", "i00")}
        self.all = {key: [] for key in ("labels", "scores", "m05", "i05", "m00", "i00")}
        self.oce = [[] for _ in OCE_THRESHOLDS]

    def update(self, predictions, references) -> None:
        for prediction, reference in zip(predictions, references, strict=True):
            self._image(prediction, reference)

    def _image(self, prediction, reference) -> None:
        scores = to_float64(prediction["scores"])
        boxes = to_float64(prediction["boxes"]).reshape(-1, 4)
        labels = to_int64(prediction["labels"])
        gt_boxes = to_float64(reference["boxes"]).reshape(-1, 4)
        gt_labels = to_int64(reference["labels"])
        if "iscrowd" in reference and to_int64(reference["iscrowd"]).any():
            raise NotImplementedError("the baseline has no crowd regions")
        self.num_images += 1
        self.gt_labels.append(gt_labels)

        order = np.argsort(-scores, kind="stable")  # priority: descending score, equal scores in list order
        iou = iou_matrix(boxes, gt_boxes)
        same_class = labels[:, None] == gt_labels[None, :]
        everything = order[top_per_class(labels[order], MAX_DETECTIONS)]  # oLRP / thresholds: no cut
        cut = everything[scores[everything] >= SCORE_CUT]  # class-averaged metrics: cut, top-100
        cut_unlimited = order[scores[order] >= SCORE_CUT]  # D-ECE, OCE: cut, no top-k

        for name, rows, thresholds in (("cut", cut, (("05", 0.5), ("01", 0.1), ("00", 0.0))),
                                       ("all", everything, (("05", 0.5), ("00", 0.0)))):
            store = getattr(self, name)
            store["labels"].append(labels[rows])
            store["scores"].append(scores[rows])
            for suffix, threshold in thresholds:
                matched, matched_iou = greedy_match(rows, iou, same_class, threshold)
                store["m" + suffix].append(matched)
                store["i" + suffix].append(matched_iou)

        if len(gt_labels):  # D-ECE and OCE leave images without ground truth out
            self.images_with_gt += 1
            if len(cut_unlimited) == len(cut):
                matched = self.cut["m05"][-1]
            else:
                matched, _ = greedy_match(cut_unlimited, iou, same_class, 0.5)
            self.dece["scores"].append(scores[cut_unlimited])
            self.dece["matched"].append(matched)
            for store, briers in zip(self.oce, oce_briers(boxes[cut_unlimited], scores[cut_unlimited],
                                                          labels[cut_unlimited], gt_boxes, gt_labels,
                                                          OCE_THRESHOLDS)):
                store.extend(briers)

    # ------------------------------------------------------------ pooling and formulas

    def compute(self) -> dict:
        result = self._d_ece()
        result.update(num_images=self.num_images, num_images_evaluated=self.images_with_gt, num_ignored=0)
        result["oce"] = float(np.mean([np.mean(briers) for briers in self.oce]))
        gt_labels = np.concatenate(self.gt_labels)
        classes = self.categories
        num_gt = np.array([np.count_nonzero(gt_labels == c) for c in classes])
        cut = {key: np.concatenate(value) for key, value in self.cut.items()}
        every = {key: np.concatenate(value) for key, value in self.all.items()}
        per_class_cut = [self._class_rows(cut, c) for c in classes]
        per_class_all = [self._class_rows(every, c) for c in classes]

        result["laece"] = self._laece(cut, per_class_cut, num_gt, "05")
        result["laece_calibration"] = self._pooled_laece_bins(cut, result["laece"])
        lrp = [self._lrp(cut, rows, gt, "05", 0.5) for gt, rows in zip(num_gt, per_class_cut)]
        for index, key in enumerate(("lrp", "lrp_loc", "lrp_fp", "lrp_fn")):
            result[key] = nan_mean([values[index] for values in lrp])
        result["laece_iou_0.1"] = self._laece(cut, per_class_cut, num_gt, "01")
        laece_0, laace_0 = [], []
        for gt, rows in zip(num_gt, per_class_cut):
            value, absolute = self._errors_at_0(cut, rows, gt)
            laece_0.append(math.nan if value == 0 else value)
            laace_0.append(math.nan if absolute == 0 else absolute)
        result["laece_0"], result["laace_0"] = nan_mean(laece_0), nan_mean(laace_0)

        olrp = [self._optimal_lrp(every, rows, gt, "05", 0.5) for gt, rows in zip(num_gt, per_class_all)]
        for index, key in enumerate(("olrp", "olrp_loc", "olrp_fp", "olrp_fn")):
            result[key] = nan_mean([values[index] for values in olrp if values[index] > -1])
        result["lrp_optimal_thresholds"] = {
            c: self._optimal_lrp(every, rows, gt, "00", 0.0)[4] for c, gt, rows in zip(classes, num_gt, per_class_all)}
        return result

    def _d_ece(self) -> dict:
        scores = np.concatenate(self.dece["scores"])
        matched = np.concatenate(self.dece["matched"])
        clipped = np.clip(scores, EPS, 1 - EPS)
        edges = np.linspace(0, 1, D_ECE_BINS + 1)
        counts, precisions, confidences, total = [], [], [], 0.0
        for k in range(D_ECE_BINS):
            in_bin = (clipped >= edges[k]) & (clipped < edges[k + 1])
            counts.append(int(in_bin.sum()))
            precisions.append(matched[in_bin].mean() if in_bin.any() else math.nan)
            confidences.append(clipped[in_bin].mean() if in_bin.any() else math.nan)
            if in_bin.any():
                total += in_bin.sum() / len(scores) * abs(precisions[-1] - confidences[-1])
        return {"d_ece": float(total), "num_detections": len(scores), "precision": float(matched.mean()),
                "mean_confidence": float(clipped.mean()), "bin_counts": counts, "bin_precisions": precisions,
                "bin_confidences": confidences, "bin_edges": edges.tolist()}

    @staticmethod
    def _class_rows(store: dict, c: int) -> np.ndarray:
        """A class's entries pooled over images: descending score, ties in image order, then list order."""
        rows = np.flatnonzero(store["labels"] == c)
        return rows[np.argsort(-store["scores"][rows], kind="stable")]

    @staticmethod
    def _laece(store, per_class_rows, num_gt, suffix) -> float:
        """SAOD: half-open bins, a score of 1.0 in no bin but counted, classes without GT or detections 0."""
        edges = np.linspace(0, 1, LAECE_BINS + 1)
        values = []
        for gt, rows in zip(num_gt, per_class_rows):
            if gt == 0 or not len(rows):
                values.append(0.0)
                continue
            scores = store["scores"][rows]
            tp_iou = np.where(store["m" + suffix][rows], store["i" + suffix][rows], 0.0)
            bins = np.searchsorted(edges, scores, side="right") - 1
            value = 0.0
            for k in np.unique(bins[bins < LAECE_BINS]):
                in_bin = bins == k
                value += in_bin.sum() / len(rows) * abs(tp_iou[in_bin].mean() - scores[in_bin].mean())
            values.append(value)
        return float(np.mean(values)) if num_gt.any() else math.nan

    @staticmethod
    def _pooled_laece_bins(store, laece) -> dict:
        edges = np.linspace(0, 1, LAECE_BINS + 1)
        bins = np.searchsorted(edges, store["scores"], side="right") - 1
        tp_iou = np.where(store["m05"], store["i05"], 0.0)
        counts, precisions, confidences = [], [], []
        for k in range(LAECE_BINS):
            in_bin = bins == k
            counts.append(int(in_bin.sum()))
            precisions.append(tp_iou[in_bin].mean() if in_bin.any() else math.nan)
            confidences.append(store["scores"][in_bin].mean() if in_bin.any() else math.nan)
        return {"d_ece": laece, "bin_counts": counts, "bin_precisions": precisions,
                "bin_confidences": confidences, "bin_edges": edges.tolist(), "num_detections": sum(counts)}

    @staticmethod
    def _lrp(store, rows, gt, suffix, tau):
        """(LRP, loc, FP, FN) of a fixed set; NaN without GT; 1, NaN, NaN, 1 without a true positive."""
        if gt == 0:
            return (math.nan,) * 4
        matched = store["m" + suffix][rows]
        tp = int(matched.sum())
        if tp == 0:
            return 1.0, math.nan, math.nan, 1.0
        fp, fn = len(rows) - tp, gt - tp
        loc = float(np.sum(1.0 - store["i" + suffix][rows][matched]))
        return (loc / (1 - tau) + fp + fn) / (tp + fp + fn), loc / tp, fp / (tp + fp), fn / gt

    @staticmethod
    def _errors_at_0(store, rows, gt):
        """detection_calibration's LaECE_0 (bins closed on the right, 1.0 in the last) and LaACE_0 of a class."""
        if gt == 0 or not len(rows):
            return 0.0, 0.0
        scores = store["scores"][rows]
        tp_iou = np.where(store["m00"][rows], store["i00"][rows], 0.0)
        edges = np.linspace(0, 1, LAECE_BINS + 1)
        bins = np.maximum(np.searchsorted(edges, scores, side="left") - 1, 0)
        value = 0.0
        for k in np.unique(bins):
            in_bin = bins == k
            value += in_bin.sum() / len(rows) * abs(tp_iou[in_bin].mean() - scores[in_bin].mean())
        return value, float(np.mean(np.abs(tp_iou - scores)))

    @staticmethod
    def _optimal_lrp(store, rows, gt, suffix, tau):
        """(oLRP, loc, FP, FN, threshold) of a class over its pooled sorted detections; every prefix a cut, the
        first minimum wins; -1 without GT; 1, NaN, NaN, 1, NaN without a true positive."""
        if gt == 0:
            return (-1.0,) * 5
        matched = store["m" + suffix][rows]
        if not matched.any():
            return 1.0, math.nan, math.nan, 1.0, math.nan
        tp = np.cumsum(matched).astype(np.float64)
        loc = np.cumsum(np.where(matched, 1.0 - store["i" + suffix][rows], 0.0))
        fp = np.arange(1, len(rows) + 1) - tp
        lrp = (loc / (1 - tau) + fp + (gt - tp)) / (gt + fp)
        best = int(np.argmin(lrp))
        loc_best = loc[best] / tp[best] if tp[best] else math.nan
        return (float(lrp[best]), loc_best, fp[best] / (tp[best] + fp[best]), (gt - tp[best]) / gt,
                float(store["scores"][rows][best]))


def nan_mean(values) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def loop_protocol(predictions, references) -> dict:
    metric = LoopProtocol()
    metric.update(predictions, references)
    return metric.compute()


def loop_streaming(batched) -> dict:
    metric = LoopProtocol()
    for predictions, references in batched:
        metric.update(predictions, references)
    return metric.compute()


def check_loop_against_oracles(folder: Path = ORACLES) -> dict | None:
    """The baseline on the official-code reference problems (``folder``'s README): LaECE at IoU 0.5 and 0.1, the
    fixed-cut LRP and components (saod), oLRP and components (LRP-Error), LaECE_0 / LaACE_0 at the 0.3 cut and
    the per-class LRP-optimal thresholds (detection_calibration), OCE (uq_detr). ``None`` without the folder."""
    problems = sorted(folder.glob("p*_inputs.json"))
    if not problems:
        return None
    worst, compared, bad = 0.0, 0, []
    for path in problems:
        inputs = json.loads(path.read_text())
        official = json.loads(path.with_name(path.name.replace("_inputs", "_official")).read_text())
        predictions, references = [], []
        for image in inputs["images"]:
            dets = [d for d in inputs["detections"] if d["image_id"] == image["id"]]
            gts = [g for g in inputs["ground_truths"] if g["image_id"] == image["id"]]
            predictions.append({"boxes": np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4),
                                "scores": np.array([d["score"] for d in dets], dtype=np.float64),
                                "labels": np.array([d["category_id"] for d in dets], dtype=np.int64)})
            references.append({"boxes": np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4),
                               "labels": np.array([g["category_id"] for g in gts], dtype=np.int64)})
        categories = [category["id"] for category in inputs["categories"]]
        loop = LoopProtocol(categories)
        loop.update(predictions, references)
        got = loop.compute()
        saod = official["saod_laece_and_lrp_score_ge_0.3"]
        olrp = official["lrp_error_olrp_all_detections"]
        calibration = official["detection_calibration"]
        expected = {"laece": saod["tau_0.5"]["laece"], "laece_iou_0.1": saod["tau_0.1"]["laece"],
                    **{key: saod["tau_0.5"][key] for key in ("lrp", "lrp_loc", "lrp_fp", "lrp_fn")},
                    **{key: olrp[key] for key in ("olrp", "olrp_loc", "olrp_fp", "olrp_fn")},
                    "laece_0": calibration["fixed_threshold_0.3"]["laece_0"],
                    "laace_0": calibration["fixed_threshold_0.3"]["laace_0"],
                    "oce": official["oce_uq_detr"]["score_ge_0.3"]["aggregation=mean,iou_thresholds=[0.5, 0.75]"]}
        for c in categories:
            expected[f"lrp_optimal_thresholds.{c}"] = calibration["default_lrp_optimal_thresholds"]["per_class"][
                str(c)]["pre_calibration_threshold"]
            got[f"lrp_optimal_thresholds.{c}"] = got["lrp_optimal_thresholds"][c]
        for key, value in expected.items():
            for name, difference in differences(math.nan if value is None else value, got[key], key):
                compared += 1
                worst = max(worst, difference)
                if not difference <= TOLERANCE:
                    bad.append((f"{path.name[:3]}.{name}", difference))
    return {"folder": str(folder), "problems": len(problems), "numbers_compared": compared, "max_difference": worst,
            "disagreements": bad}


# ---------------------------------------------------------------- this package

def package_protocol(predictions, references) -> dict:
    return evaluate_detections(predictions, references, categories=NUM_CLASSES, compute_ap=False)


def package_streaming(batched) -> dict:
    metric = DetectionCalibrationMetric(categories=NUM_CLASSES, compute_ap=False)
    for predictions, references in batched:
        metric.update(predictions, references)
    return metric.compute()


# ---------------------------------------------------------------- checking and timing

def differences(library, loop, path: str = "") -> list[tuple[str, float]]:
    """Every number of ``library`` against ``loop``: ``[(key, |difference|)]``, inf for a missing or NaN-vs-number
    entry."""
    if isinstance(library, dict):
        found = []
        for key, value in library.items():
            if key not in loop:
                found.append((f"{path}{key}", math.inf))
            else:
                found.extend(differences(value, loop[key], f"{path}{key}."))
        return found
    if isinstance(library, (list, tuple)):
        if len(library) != len(loop):
            return [(path.rstrip("."), math.inf)]
        return [item for a, b in zip(library, loop) for item in differences(a, b, path)]
    a, b = float(library), float(loop)
    if math.isnan(a) or math.isnan(b):
        return [] if math.isnan(a) and math.isnan(b) else [(path.rstrip("."), math.inf)]
    return [(path.rstrip("."), abs(a - b))]


def interleaved_median_seconds(tasks: dict, repeats: int):
    """Median wall time of each ``name: (function, args)``, run in turns so load from other processes hits all
    alike; returns ``({name: median}, {name: every time}, {name: last result})``."""
    times = {name: [] for name in tasks}
    results = {}
    for _ in range(repeats):
        for name, (function, args) in tasks.items():
            start = time.perf_counter()
            results[name] = function(*args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, times, results


def profile_top(function, args, count: int = 20) -> dict:
    """One profiled call: the ``count`` functions with the largest own time, and hf_caldetr's functions with the
    largest cumulative time (the stages), each with calls, own and cumulative seconds."""
    profiler = cProfile.Profile()
    profiler.enable()
    function(*args)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename.split("/src/")[-1] if "/src/" in filename else Path(filename).name
        rows.append({"function": f"{where}:{line}({name})" if line else name, "calls": calls,
                     "own_s": round(own, 4), "cumulative_s": round(cumulative, 4),
                     "package": where.startswith("hf_caldetr/")})
    total = sum(row["own_s"] for row in rows)
    for row in rows:
        row["share_of_total"] = round(row["own_s"] / total, 3)
    by_own = sorted(rows, key=lambda row: -row["own_s"])[:count]
    stages = sorted((row for row in rows if row["package"]), key=lambda row: -row["cumulative_s"])[:count]
    return {"total_s": round(total, 4), "by_own_time": by_own, "package_by_cumulative_time": stages}


def write_report(path: Path, report: dict) -> None:
    t, check = report["median_seconds"], report["agreement"]
    lines = [
        "# The whole calibration protocol on the user's path: library vs per-image loop",
        "",
        f"Produced by `{report['command']}` (module docstring of `benchmarks/metrics.py`).",
        "",
        "## Input",
        "",
        report["input"],
        "",
        "## Median seconds",
        "",
        f"Median of {report['repeats']} runs each, all four taken in turns in one process; the machine is shared, "
        "so single runs are noisy (every run is in `metrics.json`).",
        "",
        "| path | hf_caldetr | per-image loop | ratio (goal <= 0.1) |",
        "|---|---|---|---|",
        f"| one call: `evaluate_detections(..., categories=80, compute_ap=False)` | {t['library']:.3f} | "
        f"{t['loop']:.3f} | {report['ratio']:.3f} |",
        f"| streaming: `DetectionCalibrationMetric(categories=80, compute_ap=False)`, `update` per batch of "
        f"{report['batch_size']}, `compute` | {t['library_streaming']:.3f} | {t['loop_streaming']:.3f} | "
        f"{report['ratio_streaming']:.3f} |",
        "",
        "COCO AP is not included: both pipelines would call the same pycocotools.",
        "",
        "## Agreement",
        "",
        f"The loop and the library agree on all {check['numbers_compared']} reported numbers (every key of the "
        f"result, bins and per-class thresholds included); largest difference {check['max_difference']:.2e} "
        f"(`{check['max_difference_key']}`), tolerance {TOLERANCE:g}." if check["agree"] else
        f"**The loop and the library disagree** on {len(check['disagreements'])} numbers: "
        + ", ".join(f"`{key}` ({value:.3g})" for key, value in check["disagreements"][:20]),
        "",
        "The baseline is itself checked on the official-code reference problems (`shared/calibration_oracles`): "
        + ("not found on this run." if report["baseline_on_official_problems"] is None else
           f"{report['baseline_on_official_problems']['numbers_compared']} official numbers of "
           f"{report['baseline_on_official_problems']['problems']} problems (LaECE at IoU 0.5 and 0.1, LRP and "
           f"components, oLRP and components, LaECE_0 / LaACE_0 at the 0.3 cut, per-class LRP-optimal thresholds, "
           f"OCE), largest difference {report['baseline_on_official_problems']['max_difference']:.1e}"
           + (f"; **it disagrees on** {report['baseline_on_official_problems']['disagreements']}."
              if report["baseline_on_official_problems"]["disagreements"] else ".")),
        "",
        "| value | library |",
        "|---|---|",
        *[f"| {key} | {value:.10f} |" for key, value in report["headline"].items()],
        "",
        "## Where the library's time goes",
        "",
        f"cProfile of one extra `evaluate_detections` call (not timed; profiling slows Python-level code): "
        f"{report['profile']['total_s']:.3f} s in all.",
        "",
        "Largest own time:",
        "",
        "| function | calls | own s | cumulative s | share of own time |",
        "|---|---|---|---|---|",
        *[f"| `{row['function']}` | {row['calls']} | {row['own_s']:.3f} | {row['cumulative_s']:.3f} | "
          f"{row['share_of_total']:.1%} |" for row in report["profile"]["by_own_time"]],
        "",
        "hf_caldetr's functions by cumulative time (the stages):",
        "",
        "| function | calls | cumulative s | own s |",
        "|---|---|---|---|",
        *[f"| `{row['function']}` | {row['calls']} | {row['cumulative_s']:.3f} | {row['own_s']:.3f} |"
          for row in report["profile"]["package_by_cumulative_time"]],
        "",
        "## Machine",
        "",
        report["machine"],
        "",
    ]
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000,
                        help="number of synthetic images, 100 detections and about 7 ground-truth boxes each "
                             "(default: %(default)s, COCO val's size)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each pipeline, taken in turns; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per streaming update (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only, leave benchmarks/results alone (default: write the report there)")
    args = parser.parse_args()

    predictions, references = post_processed_inputs(args.images, seed=0)
    batched = gathered_batches(predictions, references, args.batch_size)
    assert sum(len(batch) for batch, _ in batched) == len(predictions)
    tasks = {
        "library": (package_protocol, (predictions, references)),
        "loop": (loop_protocol, (predictions, references)),
        "library_streaming": (package_streaming, (batched,)),
        "loop_streaming": (loop_streaming, (batched,)),
    }
    medians, all_times, results = interleaved_median_seconds(tasks, args.repeats)

    compared = differences(results["library"], results["loop"])
    found = (compared + differences(results["library_streaming"], results["library"])
             + differences(results["loop_streaming"], results["loop"]))
    bad = [(key, value) for key, value in found if not value <= TOLERANCE]
    worst_key, worst = max(found, key=lambda item: item[1])
    agreement = {"agree": not bad, "numbers_compared": len(compared), "max_difference": worst,
                 "max_difference_key": worst_key, "disagreements": bad}
    ratio = medians["library"] / medians["loop"]
    ratio_streaming = medians["library_streaming"] / medians["loop_streaming"]
    library = results["library"]
    headline = {key: library[key] for key in (
        "d_ece", "precision", "laece", "laece_iou_0.1", "lrp", "lrp_loc", "lrp_fp", "lrp_fn", "olrp", "olrp_loc",
        "olrp_fp", "olrp_fn", "laece_0", "laace_0", "oce")}

    print(f"{args.images} images, {library['num_detections']} detections kept at score >= 0.3, "
          f"{sum(len(p['scores']) for p in predictions)} in all")
    print(f"one call   library {medians['library']:.3f} s   loop {medians['loop']:.3f} s   ratio {ratio:.3f} "
          "(goal <= 0.1)")
    print(f"streaming  library {medians['library_streaming']:.3f} s   loop {medians['loop_streaming']:.3f} s   "
          f"ratio {ratio_streaming:.3f} (goal <= 0.1)")
    if bad:
        print(f"DISAGREEMENT on {len(bad)} numbers (tolerance {TOLERANCE:g}):")
        for key, value in bad[:40]:
            print(f"  {key}: {value:.3g}")
    else:
        print(f"the loop and the library agree on all {agreement['numbers_compared']} numbers "
              f"(largest difference {worst:.2e}, {worst_key})")

    oracles = check_loop_against_oracles()
    if oracles is None:
        print(f"the official-code reference problems are not at {ORACLES}: the baseline was not checked on them")
    else:
        print(f"the baseline on the {oracles['problems']} official-code reference problems: "
              f"{oracles['numbers_compared']} numbers, largest difference {oracles['max_difference']:.2e}"
              + (f", DISAGREES on {oracles['disagreements']}" if oracles["disagreements"] else ""))

    profile = profile_top(package_protocol, (predictions, references))
    print(f"one profiled evaluate_detections call, {profile['total_s']:.3f} s; largest own times:")
    for row in profile["by_own_time"][:10]:
        print(f"  {row['own_s']:7.3f} s  {row['share_of_total']:6.1%}  {row['function']}")
    print("hf_caldetr by cumulative time:")
    for row in profile["package_by_cumulative_time"][:12]:
        print(f"  {row['cumulative_s']:7.3f} s  {row['function']}")

    cores = os.cpu_count()
    machine = (f"{platform.platform()}, {platform.machine()}, {platform.processor() or 'cpu'}, {cores} CPU cores "
               f"(shared with other work while measured); Python {platform.python_version()}, numpy "
               f"{np.__version__}, torch {torch.__version__}, hf_caldetr "
               f"{getattr(hf_caldetr, '__version__', 'unknown')}.")
    report = {
        "command": " ".join(["python benchmarks/metrics.py", *sys.argv[1:]]),
        "input": (f"{args.images} synthetic images (`synthetic_detections(num_images={args.images}, seed=0)`), "
                  f"each a `post_process_object_detection`-style dict of torch tensors (`boxes` float32 [100, 4], "
                  f"`scores` float32 [100], `labels` int64 [100]); references as `labels_to_references` gives "
                  f"them (numpy `boxes` float32, `labels` int64, `iscrowd` int64, all 0), "
                  f"{sum(len(r['labels']) for r in references)} boxes. {library['num_detections']} detections "
                  f"have score >= 0.3 in images with ground truth. Streaming batches: {args.batch_size} images, "
                  f"lists of per-image dicts as `gather_for_metrics(..., use_gather_object=True)` returns them."),
        "images": args.images, "repeats": args.repeats, "batch_size": args.batch_size,
        "median_seconds": medians, "all_seconds": all_times, "ratio": ratio, "ratio_streaming": ratio_streaming,
        "agreement": agreement, "baseline_on_official_problems": oracles, "headline": headline, "profile": profile,
        "machine": machine,
        "platform": platform.platform(), "cpu_count": cores,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
    }
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        write_report(RESULTS / "metrics.md", report)
        (RESULTS / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

        # The reliability example: the same generator, an over-confident run next to a better-calibrated one.
        runs = [detection_ece(*synthetic_detections(num_images=2000, sharpness=sharpness, seed=1)[:2])
                for sharpness in (2.0, 1.0)]
        plot_reliability_diagram(runs, RESULTS / "reliability_example.png",
                                 titles=["synthetic: sharpness 2 (over-confident)",
                                         "synthetic: sharpness 1 (DETR-like)"])
        print(f"wrote {RESULTS / 'metrics.md'}, {RESULTS / 'metrics.json'} and {RESULTS / 'reliability_example.png'}")
    if bad or (oracles and oracles["disagreements"]):
        raise SystemExit("the per-image loop disagrees with the library or the official numbers (see above)")


if __name__ == "__main__":
    main()
