"""Run a detector over a dataloader and measure it: COCO AP and the calibration metrics, on one or many processes.

Shared by ``examples/train.py``, ``examples/evaluate.py`` and the benchmarks. Detections are the model's
post-processed output (the top 100 over the ``Q * C`` sigmoid scores, as ``post_process_object_detection``
returns them, spec section 4); the references come from the batch's labels.

Post-hoc calibration (``hf_caldetr.calibrators``) plugs in at both ends: ``fit_calibrator`` fits one on a
held-out split's detections, matched as the D-ECE protocol matches them (``collect_matches``), and
``evaluate_model(..., calibrator=...)`` measures the detector with its scores calibrated.

Each detection also carries its uncertainty (``post_process(..., uncertainties=True)``): ``tanh`` of the unbiased
variance of its class logit over the decoder layers, ``u = tanh(Var_l(Z[l, q, c]))`` for the query ``q`` and class
``c`` it came from, computed from the evaluation's own forward pass (every family exposes every layer's logits:
``hf_caldetr.training.decoder_layer_logits``). ``evaluate_model`` then reports D-UCE (``d_uce``) too.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .metrics import (
    DetectionCalibrationMetric,
    match_detections,
    plot_reliability_diagram,
)
from .metrics.reliability import plot_laece_diagram, plot_uncertainty_diagram

TOP_K = 100
UNCERTAINTY_KEY = "uncertainties"
"""The prediction key of each detection's uncertainty (``post_process``), which D-UCE reads."""
_BELOW_ONE = float(np.nextafter(1.0, 0.0))  # tanh of a variance above ~19 rounds to 1.0; D-UCE takes [0, 1)


def labels_to_references(labels: list[dict]) -> list[dict]:
    """Batch labels (normalised ``cx, cy, w, h``) to references (absolute ``x1, y1, x2, y2`` in the original image).

    The boxes are scaled by ``orig_size`` exactly as ``post_process_object_detection`` scales the predictions, so
    both sides share one convention whatever the processor's resizing. Each reference has ``boxes`` ``[n + m, 4]``,
    ``labels`` ``[n + m]`` (int64) and ``iscrowd`` ``[n + m]`` (int64): the label's ``boxes`` / ``class_labels``
    with ``iscrowd`` 0, then its crowd regions (``crowd_boxes`` / ``crowd_class_labels``, normalised as ``boxes``;
    none when the label has no such keys) with ``iscrowd`` 1, which the metrics treat as ignore regions.
    """
    references = []
    for label in labels:
        height, width = (float(v) for v in label["orig_size"])
        normalised = [label["boxes"].detach().float().cpu().reshape(-1, 4)]
        classes = [label["class_labels"].detach().cpu().to(torch.int64).reshape(-1)]
        if label.get("crowd_boxes") is not None:
            normalised.append(label["crowd_boxes"].detach().float().cpu().reshape(-1, 4))
            classes.append(label["crowd_class_labels"].detach().cpu().to(torch.int64).reshape(-1))
        boxes = torch.cat(normalised) * torch.tensor([width, height, width, height])
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
        iscrowd = torch.cat([torch.full((len(part),), crowd, dtype=torch.int64) for crowd, part in enumerate(classes)])
        references.append({"boxes": xyxy.numpy(), "labels": torch.cat(classes).numpy(), "iscrowd": iscrowd.numpy()})
    return references


def softmax_head_logit_rows(logits: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the full logit row ``[C + 1]`` of each detection DETR's post-processing returns at threshold 0:
    one per query whose best real-class probability is above 0, in query order (its own rule)."""
    keep = logits.softmax(-1)[..., :-1].max(-1).values > 0
    return [image_logits[image_keep] for image_logits, image_keep in zip(logits, keep)]


def select_detections(logits: torch.Tensor, selection: str, top_k: int = TOP_K,
                      threshold: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the ``(queries, classes)`` ``[n]`` of the detections ``post_process_object_detection`` returns
    from the final ``logits`` ``[B, Q, C]`` at ``threshold``, in its order: the same selection, the same ``topk``.

    ``selection`` (``ModelFamily.detection_selection``): ``"top_k"`` (Deformable DETR: the top
    ``min(top_k, Q * C)`` sigmoid scores), ``"top_queries"`` (RT-DETR: the top ``Q`` sigmoid scores over ``Q * C``)
    or ``"per_query"`` (DETR: each query's best real class under the softmax, in query order).
    """
    batch, num_queries, num_columns = logits.shape
    if selection == "per_query":
        scores, classes = logits.softmax(-1)[..., :-1].max(-1)
        keep = scores > threshold
        return [(image_keep.nonzero().squeeze(1), image_classes[image_keep])
                for image_classes, image_keep in zip(classes, keep)]
    if selection not in ("top_k", "top_queries"):
        raise ValueError(f"selection must be 'top_k', 'top_queries' or 'per_query', got {selection!r}")
    k = min(top_k, num_queries * num_columns) if selection == "top_k" else num_queries
    scores, indices = torch.topk(logits.sigmoid().reshape(batch, -1), k, dim=1)
    keep = scores > threshold
    return [(torch.div(image_indices[image_keep], num_columns, rounding_mode="floor"),
             image_indices[image_keep] % num_columns) for image_indices, image_keep in zip(indices, keep)]


def _absolute_xyxy(boxes: torch.Tensor, size) -> torch.Tensor:
    """Normalised ``cx, cy, w, h`` to absolute ``x1, y1, x2, y2``, as ``post_process_object_detection`` scales."""
    height, width = (float(v) for v in size)
    center_x, center_y, box_width, box_height = boxes.float().unbind(-1)
    xyxy = torch.stack([center_x - 0.5 * box_width, center_y - 0.5 * box_height,
                        center_x + 0.5 * box_width, center_y + 0.5 * box_height], dim=-1)
    return xyxy * torch.tensor([width, height, width, height], device=boxes.device)


def _class_scores(logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    """``[Q, C]`` scores of one image's final logits: softmax over all columns (DETR) or per-class sigmoid, in
    the logits' own dtype (as the image processors compute them), then float32."""
    return (logits.softmax(-1) if softmax else logits.sigmoid()).float()


def _tolerance(tensor: torch.Tensor) -> float:
    """Relative tolerance of a value computed in ``tensor``'s dtype (1e-5 in float32; looser in half precision)."""
    return max(1e-5, 4 * torch.finfo(tensor.dtype).eps)


def _agrees(result: dict, logits, pred_boxes, size, queries, classes, softmax: bool) -> bool:
    """Whether ``(queries, classes)`` give exactly the image processor's detections ``result``: the same number,
    labels, and (to float rounding) scores and boxes."""
    if len(queries) != len(result["scores"]):
        return False
    if not torch.equal(result["labels"].to(classes.device).long(), classes.long()):
        return False
    scores = _class_scores(logits, softmax)[queries, classes]
    tolerance = _tolerance(logits)
    if not torch.allclose(result["scores"].float().to(scores.device), scores, rtol=tolerance, atol=tolerance / 10):
        return False
    boxes = _absolute_xyxy(pred_boxes[queries], size)
    tolerance = _tolerance(pred_boxes)
    return torch.allclose(result["boxes"].float().to(boxes.device), boxes, rtol=tolerance,
                          atol=tolerance * max(float(v) for v in size))


def _nearest_queries(result: dict, logits, pred_boxes, size, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, classes)`` of ``result``'s detections found by value: for each, the query whose box and score
    of the detection's label are nearest to it (the fallback when the selection was not reproduced)."""
    classes = result["labels"].to(logits.device).long()
    score_gap = (_class_scores(logits, softmax)[:, classes] - result["scores"].float().to(logits.device)).abs()
    boxes = _absolute_xyxy(pred_boxes, size)  # [Q, 4]
    box_gap = (boxes[:, None] - result["boxes"].float().to(boxes.device)[None]).abs().amax(-1)
    return (score_gap + box_gap / max(float(v) for v in size)).argmin(0), classes


def detection_uncertainties(layer_logits: torch.Tensor, queries: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """``u = tanh(Var_l(Z[l, q, c]))`` of each detection ``(q, c)`` of one image: the unbiased variance over the
    decoder layers of its class logit (``hf_caldetr.method.logit_uncertainty``), in float64, squashed.

    Args:
        layer_logits: ``[L, Q, C]``, every decoder layer's logits of the image (``L >= 2``).
        queries, classes: ``[n]``.

    Returns:
        ``[n]`` float64 in [0, 1) (a variance so large that ``tanh`` rounds to 1 is kept just below 1).
    """
    values = layer_logits[:, queries.to(layer_logits.device), classes.to(layer_logits.device)].double()  # [L, n]
    return np.minimum(torch.tanh(values.var(dim=0, correction=1)).cpu().numpy(), _BELOW_ONE)


def prediction_uncertainties(model, outputs, results: list[dict], target_sizes, top_k: int = TOP_K) -> list[np.ndarray]:
    """Per image, the uncertainty of each detection ``results`` holds (``post_process_object_detection``'s output
    on ``outputs``, at threshold 0), in its order: ``detection_uncertainties`` of the query and class it came from.

    The ``(query, class)`` of each detection comes from ``select_detections`` (the family's selection redone on the
    same logits), checked against the processor's labels, scores and boxes; where they disagree (another processor,
    another order), each detection is found by value among the queries instead, and checked again.
    ``model``: the unwrapped stock or Cal model ``outputs`` came from, run with ``layer_logits_options``.
    """
    from .training import decoder_layer_logits, model_family

    family = model_family(model.config.model_type)
    with torch.no_grad():
        layer_logits = decoder_layer_logits(model, outputs).detach()
    logits, pred_boxes = outputs.logits.detach(), outputs.pred_boxes.detach()
    if layer_logits.shape[1] < 2 or layer_logits.shape[2:] != logits.shape[1:]:
        raise ValueError(f"per-layer logits {tuple(layer_logits.shape)} do not fit the final logits "
                         f"{tuple(logits.shape)}: at least 2 decoder layers of the same queries and classes needed")
    located = select_detections(logits, family.detection_selection, top_k)
    uncertainties = []
    for image, (result, (queries, classes)) in enumerate(zip(results, located)):
        state = (logits[image], pred_boxes[image], target_sizes[image])
        if not _agrees(result, *state, queries, classes, family.softmax_head):
            queries, classes = _nearest_queries(result, *state, family.softmax_head)
            if not _agrees(result, *state, queries, classes, family.softmax_head):
                raise ValueError(
                    f"image {image}: the image processor's {len(result['scores'])} detections match no (query, "
                    "class) of the model's final logits and boxes, so their uncertainties cannot be found: is the "
                    "image processor the model's own?")
        uncertainties.append(detection_uncertainties(layer_logits[image], queries, classes))
    return uncertainties


def post_process(outputs, labels: list[dict], image_processor, top_k: int = TOP_K,
                 logit_rows: bool = False, uncertainties: bool = False, model=None) -> list[dict]:
    """The model's detections per image, absolute xyxy boxes in the original image.

    Each architecture's own post-processing: Deformable DETR's top ``top_k`` over the ``Q * C`` sigmoid scores;
    DETR's one detection per query (softmax, no-object excluded); RT-DETR's top ``Q`` sigmoid scores.
    ``logit_rows=True`` (softmax heads only) adds each detection's full logit row as ``"logit_rows"``
    ``[n, C + 1]``, which ``SoftmaxTemperatureScaling`` is fitted on. ``uncertainties=True`` adds each detection's
    uncertainty ``tanh(Var_l(Z[l, q, c]))`` as ``"uncertainties"`` ``[n]`` float64 in [0, 1)
    (``prediction_uncertainties``); it needs the (unwrapped) ``model`` the outputs came from, run with
    ``hf_caldetr.training.layer_logits_options(model)``.
    """
    target_sizes = torch.stack([label["orig_size"] for label in labels]).to(outputs.logits.device)
    options = {}
    if "top_k" in inspect.signature(image_processor.post_process_object_detection).parameters:
        options["top_k"] = min(top_k, outputs.logits[0].numel())
    results = image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=target_sizes, **options
    )
    predictions = [
        {
            "boxes": result["boxes"].float().cpu().numpy(),
            "scores": result["scores"].float().cpu().numpy(),
            "labels": result["labels"].cpu().numpy(),
        }
        for result in results
    ]
    if logit_rows:
        for prediction, rows in zip(predictions, softmax_head_logit_rows(outputs.logits)):
            if len(rows) != len(prediction["scores"]):
                raise ValueError("logit_rows: the post-processing kept other detections than one per query; "
                                 "logit rows exist for softmax heads (DETR) only")
            prediction["logit_rows"] = rows.double().cpu().numpy()
    if uncertainties:
        if model is None:
            raise ValueError("post_process(uncertainties=True) needs the model the outputs came from (model=...): "
                             "its family says where every decoder layer's logits are")
        for prediction, values in zip(predictions, prediction_uncertainties(model, outputs, results, target_sizes,
                                                                           options.get("top_k", top_k))):
            prediction[UNCERTAINTY_KEY] = values
    return predictions


def _unwrapped(model, accelerator=None):
    """The model itself, out of a (distributed) data-parallel wrapper; anything that is not a torch module (an
    ONNX model) as it is."""
    if not isinstance(model, torch.nn.Module):
        return model
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, parallel) else model


@torch.no_grad()
def iter_detections(model, dataloader, image_processor, accelerator=None, progress: bool = False,
                    desc: str = "evaluating", logit_rows: bool = False, uncertainties: bool | None = None):
    """Run ``model`` (in eval mode) over ``dataloader``; yield ``(predictions, references, image_sizes)`` per batch.

    ``predictions`` and ``references`` are lists of per-image dicts (``post_process``, ``labels_to_references``),
    ``image_sizes`` the ``(height, width)`` of each original image. With an ``accelerator`` the dataloader is
    expected prepared; each batch is gathered from every process (``gather_for_metrics``, which also drops the
    duplicates that pad the last batch), so every process sees every image.

    ``uncertainties``: each prediction also holds ``"uncertainties"`` (see ``post_process``), from the same
    forward pass. ``None`` (default): whenever the model exposes every decoder layer's logits (a PyTorch model of
    a known family with 2 or more decoder layers; not an ONNX model).
    """
    from tqdm.auto import tqdm

    from .training import has_layer_logits, layer_logits_options

    unwrapped = _unwrapped(model, accelerator)
    if uncertainties is None:
        uncertainties = has_layer_logits(unwrapped)
    elif uncertainties and not has_layer_logits(unwrapped):
        raise ValueError(f"uncertainties=True: {type(unwrapped).__name__} does not expose every decoder layer's "
                         "logits (a PyTorch DETR, Deformable DETR or RT-DETR with 2 or more decoder layers does)")
    forward_options = layer_logits_options(unwrapped) if uncertainties else {}
    was_training = model.training
    model.eval()
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not show, leave=False):
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"), **forward_options)
            predictions = post_process(outputs, batch["labels"], image_processor, logit_rows=logit_rows,
                                       uncertainties=uncertainties, model=unwrapped)
            references = labels_to_references(batch["labels"])
            sizes = [tuple(int(v) for v in label["orig_size"]) for label in batch["labels"]]
            if accelerator is not None:
                # One record per image: gather_object concatenates the processes' lists one level deep, and
                # gather_for_metrics then cuts the padded duplicates off that list, counting images.
                images = accelerator.gather_for_metrics(list(zip(predictions, references, sizes)),
                                                        use_gather_object=True)
                predictions, references, sizes = (list(column) for column in zip(*images)) if images else ([], [], [])
            yield predictions, references, sizes
    finally:
        model.train(was_training)


def calibrate_predictions(predictions: list[dict], calibrator) -> list[dict]:
    """Per-image detections with each score replaced by ``calibrator.transform(scores, labels)``.

    Boxes and labels are kept, so the calibrated detector is the same detector with other confidences.
    """
    return [{**prediction, "scores": calibrator.transform(prediction["scores"], prediction["labels"])}
            for prediction in predictions]


def measure_detections(batches, calibrator=None, **metric_options) -> dict:
    """``DetectionCalibrationMetric(**metric_options)`` over ``(predictions, references, image_sizes)`` batches
    (``iter_detections``), the scores first calibrated when a fitted ``calibrator`` is given.

    When the first batch's predictions carry ``"uncertainties"`` (and ``uncertainty_key`` is not given), D-UCE is
    measured too (``d_uce``, and its bins as ``uncertainty_calibration``). A calibrator maps the scores, not the
    uncertainties: the calibrated detector's D-UCE differs from the raw one's only through the detections its
    calibrated scores keep (score >= 0.3).
    """
    metric = None
    for predictions, references, sizes in batches:
        if metric is None:
            options = dict(metric_options)
            if "uncertainty_key" not in options and predictions and all(
                    UNCERTAINTY_KEY in prediction for prediction in predictions):
                options["uncertainty_key"] = UNCERTAINTY_KEY
            metric = DetectionCalibrationMetric(**options)
        if calibrator is not None:
            predictions = calibrate_predictions(predictions, calibrator)
        metric.update(predictions, references, image_sizes=sizes)
    if metric is None:
        metric = DetectionCalibrationMetric(**metric_options)
    return metric.compute()


def evaluate_model(model, dataloader, image_processor, accelerator=None, progress: bool = False, calibrator=None,
                   uncertainties: bool | None = None, **metric_options) -> dict:
    """AP (``map``, ``map_50``, ...), D-ECE and LaECE (and position D-ECE) of ``model`` over ``dataloader``; D-UCE
    (``d_uce``, its bins as ``uncertainty_calibration``) whenever the model gives per-detection uncertainties
    (``uncertainties``, see ``iter_detections``; every PyTorch model of the three families, raw or calibrated).

    With an ``accelerator`` the dataloader is expected prepared (see ``iter_detections``).

    A fitted post-hoc ``calibrator`` (``hf_caldetr.calibrators``) maps every post-processed score (the top 100
    per image) before the metrics, so AP and the protocol's score threshold see the calibrated scores: the
    calibrated detector is measured exactly as the raw one. Its set of kept detections (score >= 0.3) can
    therefore differ from the raw detector's: a calibrator fitted on kept detections only (``fit_calibrator``'s
    default) extrapolates below the threshold, where isotonic regression holds its lowest value.
    """
    metric_options.setdefault("categories", model_categories(model, accelerator))
    batches = iter_detections(model, dataloader, image_processor, accelerator, progress, uncertainties=uncertainties)
    return measure_detections(batches, calibrator, **metric_options)


def model_categories(model, accelerator=None) -> list[int] | None:
    """The class ids a detector predicts (``config.id2label``'s keys): the dataset's categories, which the
    class-averaged metrics (LaECE, LRP, ...) average over; ``None`` when the model has no config."""
    config = getattr(_unwrapped(model, accelerator), "config", None)
    id2label = getattr(config, "id2label", None)
    return sorted(int(key) for key in id2label) if id2label else None


class DetectionOutcomes(NamedTuple):
    """Kept detections pooled over a split, in matching order: ``scores`` [N] float64, ``matched`` [N] bool
    (true positive under the D-ECE protocol), ``labels`` [N] int64 predicted classes; ``logit_rows`` [N, C + 1]
    (softmax heads, when asked for) or None."""

    scores: np.ndarray
    matched: np.ndarray
    labels: np.ndarray
    logit_rows: np.ndarray | None = None


def collect_matches(model, dataloader, image_processor, accelerator=None, score_threshold: float = 0.3,
                    iou_threshold: float = 0.5, include_images_without_gt: bool = False,
                    progress: bool = False, logit_rows: bool = False) -> DetectionOutcomes:
    """The ``(scores, matched, labels)`` of the D-ECE protocol over a split: ``model``'s post-processed detections
    with ``score >= score_threshold``, matched per image by ``match_detections`` (the metrics' own rule).

    Matching is per image, so matching batch by batch equals matching the split at once. With an
    ``accelerator``, every process returns the outcomes of the whole split.
    """
    parts, rows = [], []
    for predictions, references, _ in iter_detections(model, dataloader, image_processor, accelerator, progress,
                                                      desc="matching", logit_rows=logit_rows, uncertainties=False):
        image_rows = [prediction.pop("logit_rows", None) for prediction in predictions]
        part = match_detections(predictions, references, score_threshold, iou_threshold, include_images_without_gt)
        parts.append(part)
        if logit_rows:
            rows.extend(image_rows[image][detection]
                        for image, detection in zip(part.image_index, part.detection_index))
    return DetectionOutcomes(
        scores=np.concatenate([part.scores for part in parts] or [np.zeros(0)]).astype(np.float64),
        matched=np.concatenate([part.matched for part in parts] or [np.zeros(0, dtype=bool)]),
        labels=np.concatenate([part.labels for part in parts] or [np.zeros(0, dtype=np.int64)]).astype(np.int64),
        logit_rows=np.stack(rows) if rows else None,
    )


def fit_calibrator(model, dataloader, image_processor, calibrator, accelerator=None, score_threshold: float = 0.3,
                   iou_threshold: float = 0.5, include_images_without_gt: bool = False, progress: bool = False):
    """Fit a post-hoc ``calibrator`` (``hf_caldetr.calibrators``) on ``model``'s detections over a held-out split.

    The calibrator is fitted on the kept detections only (``score >= score_threshold``, 0.3 in the protocol),
    with the outcomes the D-ECE protocol gives them (``collect_matches``): it learns the map where the metric
    measures it. Pass ``score_threshold=0`` to fit on all top-100 detections instead. ``dataloader`` must not
    hold the images the calibrated model is evaluated on. Returns the fitted calibrator (fitted in place).
    """
    from .calibrators import MIN_DETECTIONS, SoftmaxTemperatureScaling

    if not callable(getattr(calibrator, "fit", None)) or not callable(getattr(calibrator, "transform", None)):
        raise TypeError(f"calibrator must be a post-hoc calibrator with fit and transform (hf_caldetr.calibrators), "
                        f"got {type(calibrator).__name__}")
    softmax = isinstance(calibrator, SoftmaxTemperatureScaling)
    outcomes = collect_matches(model, dataloader, image_processor, accelerator, score_threshold, iou_threshold,
                               include_images_without_gt, progress, logit_rows=softmax)
    if len(outcomes.scores) < MIN_DETECTIONS:
        raise ValueError(
            f"the model kept {len(outcomes.scores)} detections (score >= {score_threshold}) on the calibration "
            f"split, fewer than the {MIN_DETECTIONS} a calibrator needs: use more calibration images or a lower "
            "score threshold"
        )
    if softmax:
        return calibrator.fit(outcomes.logit_rows, outcomes.matched)
    return calibrator.fit(outcomes.scores, outcomes.matched, outcomes.labels)


SUMMARY_KEYS = ("map", "map_50", "map_75", "d_ece", "laece", "laece_iou_0.1", "lrp", "lrp_loc", "lrp_fp", "lrp_fn",
                "olrp", "olrp_loc", "olrp_fp", "olrp_fn", "laece_0", "laace_0", "oce", "position_d_ece", "d_uce",
                "precision", "mean_confidence", "num_detections", "num_images", "num_images_evaluated", "num_ignored")
# The LRP-optimal-threshold protocol (Kuzucu et al.), a nested dict of the result when thresholds were given.
THRESHOLD_PROTOCOL_KEY = "at_lrp_optimal_thresholds"


def _plain(value):
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def summarize(result: dict) -> dict:
    """The scalar metrics of an ``evaluate_model`` result, as plain floats/ints for JSON; the LRP-optimal-threshold
    protocol's values (when measured) under ``at_lrp_optimal_thresholds``."""
    summary = {key: _plain(result[key]) for key in SUMMARY_KEYS if key in result and result[key] is not None}
    nested = result.get(THRESHOLD_PROTOCOL_KEY)
    if nested:
        summary[THRESHOLD_PROTOCOL_KEY] = {key: _plain(value) for key, value in nested.items() if value is not None}
    return summary


def flatten_summary(summary: dict) -> dict:
    """A ``summarize`` dict with its nested protocol under dotted keys (``at_lrp_optimal_thresholds.laece_0``), for
    logs, trackers and tables."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = value
    return flat


def lrp_thresholds(model, dataloader, image_processor, accelerator=None, calibrator=None, progress: bool = False,
                   **metric_options) -> dict[int, float]:
    """Per-class LRP-optimal score thresholds (Kuzucu et al., ECCV 2024: IoU 0, as fiveai/detection_calibration)
    of ``model``'s detections, scores calibrated by ``calibrator`` when given, on a **validation** split
    (``dataloader``, never the split the thresholds are then evaluated on). Pass the result as
    ``evaluate_model(..., class_thresholds=...)`` for the second protocol."""
    result = evaluate_model(model, dataloader, image_processor, accelerator, progress=progress, calibrator=calibrator,
                            uncertainties=False, compute_ap=False, **metric_options)
    return result["lrp_optimal_thresholds"]


UNCERTAINTY_DIAGRAM = "uncertainty_diagram.png"
LAECE_DIAGRAM = "laece_diagram.png"


def plot_uncertainty_panels(results: list[dict], path, titles: list[str] | None = None) -> bool:
    """The D-UCE diagram (``plot_uncertainty_diagram``) of the ``evaluate_model`` results that measured D-UCE
    (``uncertainty_calibration``), side by side; False (nothing written) when none did, e.g. ONNX models."""
    chosen = [index for index, result in enumerate(results) if "uncertainty_calibration" in result]
    if not chosen:
        return False
    plot_uncertainty_diagram([results[index] for index in chosen], path,
                             titles=None if titles is None else [titles[index] for index in chosen])
    return True


def write_metrics(results: dict[str, dict], output_dir, extra: dict | None = None, titles: dict | None = None) -> dict:
    """Write ``metrics.json`` (``{"in_domain": {...}, "out_of_domain": {...}, ...}``), the reliability diagram and,
    when the results measured D-UCE, the D-UCE diagram (``uncertainty_diagram.png``: error rate against
    uncertainty per bin).

    ``results`` maps a split name to an ``evaluate_model`` result; each diagram puts the splits side by side.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = {name: summarize(result) for name, result in results.items()}
    if extra:
        metrics.update(extra)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    names = list(results)
    panel_titles = [(titles or {}).get(name, name.replace("_", "-")) for name in names]
    plot_reliability_diagram([results[name] for name in names], output_dir / "reliability_diagram.png",
                             titles=panel_titles)
    plot_uncertainty_panels([results[name] for name in names], output_dir / UNCERTAINTY_DIAGRAM, panel_titles)
    if all("laece_calibration" in results[name] for name in names):
        plot_laece_diagram([results[name] for name in names], output_dir / LAECE_DIAGRAM, panel_titles)
    return metrics


CALIBRATOR_KINDS = ("auto", "none", "temperature", "platt", "isotonic", "histogram")
"""Post-hoc calibrators the example scripts fit; temperature and Platt scaling are folded into the weights.
``auto``: the best foldable one measured on the main job (benchmarks/results/calibrator_choice.md), class-wise Platt
scaling, for sigmoid heads; the one foldable one, a temperature over all columns, for softmax heads (DETR)."""


def make_calibrator(kind: str, class_wise: bool | None = False, softmax_head: bool = False,
                    fold_required: bool = True):
    """An unfitted calibrator of ``kind`` (``CALIBRATOR_KINDS``) for a sigmoid or softmax (DETR) head; None for
    ``"none"``. ``class_wise=None`` means class-wise where the head allows it (sigmoid heads). With
    ``fold_required`` (train.py: its checkpoint must carry the calibration) the combinations that cannot be folded
    into a softmax head are refused, before any training; without it they are score-space calibrators."""
    if kind == "auto":
        kind = "temperature" if softmax_head else "platt"
    if class_wise is None:
        class_wise = not softmax_head
    from .calibrators import (
        HistogramBinning,
        IsotonicCalibrator,
        PlattScaling,
        SoftmaxTemperatureScaling,
        TemperatureScaling,
    )

    if kind not in CALIBRATOR_KINDS:
        raise ValueError(f"calibrator must be one of {CALIBRATOR_KINDS}, got {kind!r}")
    if kind == "none":
        return None
    if softmax_head and kind == "temperature" and not class_wise:
        return SoftmaxTemperatureScaling()  # one temperature over all columns: foldable
    if softmax_head and kind in ("temperature", "platt") and fold_required:
        raise ValueError(
            f"{'class-wise ' if class_wise else ''}{kind} scaling cannot be folded into a softmax head (DETR): "
            "its score depends on every column through the softmax normaliser, so only one temperature over "
            "all columns can be written into the weights. Use --calibrator temperature (class-agnostic), or "
            "isotonic / histogram (kept as calibrator.json)")
    classes = {"temperature": TemperatureScaling, "platt": PlattScaling, "isotonic": IsotonicCalibrator,
               "histogram": HistogramBinning}
    return classes[kind](class_wise=class_wise)


def fit_and_fold(model, unwrapped_model, dataloader, image_processor, calibrator, accelerator=None,
                 fitted_on: dict | None = None, progress: bool = False, **match_options) -> bool:
    """Fit ``calibrator`` on ``model``'s detections over ``dataloader`` (a held-out split) and fold it into
    ``unwrapped_model``'s weights when it is an affine map (``hf_caldetr.fold_calibrator``). Returns whether it was
    folded; a calibrator that was not must be applied to the scores (``evaluate_model(..., calibrator=...)``)."""
    from .folding import fold_calibrator, is_foldable
    from .training import MODEL_FAMILIES

    fit_calibrator(model, dataloader, image_processor, calibrator, accelerator, progress=progress, **match_options)
    family = MODEL_FAMILIES.get(unwrapped_model.config.model_type)
    if family is None or family.final_class_head is None or not is_foldable(calibrator, family.softmax_head):
        return False
    fold_calibrator(unwrapped_model, calibrator, fitted_on=fitted_on)
    return True
