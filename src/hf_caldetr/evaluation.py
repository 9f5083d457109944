"""Run a detector over a dataloader and measure it: COCO AP and the calibration metrics, on one or many processes.

Shared by ``examples/train.py``, ``examples/evaluate.py`` and the benchmarks. Detections are the model's
post-processed output (the top 100 over the ``Q * C`` sigmoid scores, as ``post_process_object_detection``
returns them, spec section 4); the references come from the batch's labels.

Post-hoc calibration (``hf_caldetr.calibrators``) plugs in at both ends: ``fit_calibrator`` fits one on a
held-out split's detections, matched as the D-ECE protocol matches them (``collect_matches``), and
``evaluate_model(..., calibrator=...)`` measures the detector with its scores calibrated.
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

TOP_K = 100


def labels_to_references(labels: list[dict]) -> list[dict]:
    """Batch labels (normalised ``cx, cy, w, h``) to references (absolute ``x1, y1, x2, y2`` in the original image).

    The boxes are scaled by ``orig_size`` exactly as ``post_process_object_detection`` scales the predictions, so
    both sides share one convention whatever the processor's resizing.
    """
    references = []
    for label in labels:
        height, width = (float(v) for v in label["orig_size"])
        boxes = label["boxes"].detach().float().cpu() * torch.tensor([width, height, width, height])
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
        references.append({"boxes": xyxy.numpy(), "labels": label["class_labels"].cpu().numpy()})
    return references


def softmax_head_logit_rows(logits: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the full logit row ``[C + 1]`` of each detection DETR's post-processing returns at threshold 0:
    one per query whose best real-class probability is above 0, in query order (its own rule)."""
    keep = logits.softmax(-1)[..., :-1].max(-1).values > 0
    return [image_logits[image_keep] for image_logits, image_keep in zip(logits, keep)]


def post_process(outputs, labels: list[dict], image_processor, top_k: int = TOP_K,
                 logit_rows: bool = False) -> list[dict]:
    """The model's detections per image, absolute xyxy boxes in the original image.

    Each architecture's own post-processing: Deformable DETR's top ``top_k`` over the ``Q * C`` sigmoid scores;
    DETR's one detection per query (softmax, no-object excluded); RT-DETR's top ``Q`` sigmoid scores.
    ``logit_rows=True`` (softmax heads only) adds each detection's full logit row as ``"logit_rows"``
    ``[n, C + 1]``, which ``SoftmaxTemperatureScaling`` is fitted on.
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
    return predictions


@torch.no_grad()
def iter_detections(model, dataloader, image_processor, accelerator=None, progress: bool = False,
                    desc: str = "evaluating", logit_rows: bool = False):
    """Run ``model`` (in eval mode) over ``dataloader``; yield ``(predictions, references, image_sizes)`` per batch.

    ``predictions`` and ``references`` are lists of per-image dicts (``post_process``, ``labels_to_references``),
    ``image_sizes`` the ``(height, width)`` of each original image. With an ``accelerator`` the dataloader is
    expected prepared; each batch is gathered from every process (``gather_for_metrics``, which also drops the
    duplicates that pad the last batch), so every process sees every image.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        for batch in tqdm(dataloader, desc=desc, disable=not show, leave=False):
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"))
            predictions = post_process(outputs, batch["labels"], image_processor, logit_rows=logit_rows)
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
    (``iter_detections``), the scores first calibrated when a fitted ``calibrator`` is given."""
    metric = DetectionCalibrationMetric(**metric_options)
    for predictions, references, sizes in batches:
        if calibrator is not None:
            predictions = calibrate_predictions(predictions, calibrator)
        metric.update(predictions, references, image_sizes=sizes)
    return metric.compute()


def evaluate_model(model, dataloader, image_processor, accelerator=None, progress: bool = False, calibrator=None,
                   **metric_options) -> dict:
    """AP (``map``, ``map_50``, ...), D-ECE and LaECE (and position D-ECE) of ``model`` over ``dataloader``.

    With an ``accelerator`` the dataloader is expected prepared (see ``iter_detections``).

    A fitted post-hoc ``calibrator`` (``hf_caldetr.calibrators``) maps every post-processed score (the top 100
    per image) before the metrics, so AP and the protocol's score threshold see the calibrated scores: the
    calibrated detector is measured exactly as the raw one. Its set of kept detections (score >= 0.3) can
    therefore differ from the raw detector's: a calibrator fitted on kept detections only (``fit_calibrator``'s
    default) extrapolates below the threshold, where isotonic regression holds its lowest value.
    """
    batches = iter_detections(model, dataloader, image_processor, accelerator, progress)
    return measure_detections(batches, calibrator, **metric_options)


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
                                                      desc="matching", logit_rows=logit_rows):
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


SUMMARY_KEYS = ("map", "map_50", "map_75", "d_ece", "laece", "position_d_ece", "precision", "mean_confidence",
                "num_detections", "num_images", "num_images_evaluated")


def summarize(result: dict) -> dict:
    """The scalar metrics of an ``evaluate_model`` result, as plain floats/ints for JSON."""
    summary = {}
    for key in SUMMARY_KEYS:
        if key in result:
            value = result[key]
            summary[key] = int(value) if isinstance(value, (int, np.integer)) else float(value)
    return summary


def write_metrics(results: dict[str, dict], output_dir, extra: dict | None = None, titles: dict | None = None) -> dict:
    """Write ``metrics.json`` (``{"in_domain": {...}, "out_of_domain": {...}, ...}``) and the reliability diagram.

    ``results`` maps a split name to an ``evaluate_model`` result; the diagram puts the splits side by side.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = {name: summarize(result) for name, result in results.items()}
    if extra:
        metrics.update(extra)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    names = list(results)
    plot_reliability_diagram(
        [results[name] for name in names],
        output_dir / "reliability_diagram.png",
        titles=[(titles or {}).get(name, name.replace("_", "-")) for name in names],
    )
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
    if family is None or not is_foldable(calibrator, family.softmax_head):
        return False
    fold_calibrator(unwrapped_model, calibrator, fitted_on=fitted_on)
    return True
