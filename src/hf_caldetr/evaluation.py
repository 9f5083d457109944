"""Run a detector over a dataloader and measure it: COCO AP and the calibration metrics, on one or many processes.

Shared by ``examples/train.py``, ``examples/evaluate.py`` and the benchmarks. Detections are the model's
post-processed output (the top 100 over the ``Q * C`` sigmoid scores, as ``post_process_object_detection``
returns them, spec section 4); the references come from the batch's labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .metrics import DetectionCalibrationMetric, plot_reliability_diagram

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


def post_process(outputs, labels: list[dict], image_processor, top_k: int = TOP_K) -> list[dict]:
    """The model's detections per image, absolute xyxy boxes in the original image."""
    target_sizes = torch.stack([label["orig_size"] for label in labels]).to(outputs.logits.device)
    results = image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=target_sizes, top_k=min(top_k, outputs.logits[0].numel())
    )
    return [
        {
            "boxes": result["boxes"].float().cpu().numpy(),
            "scores": result["scores"].float().cpu().numpy(),
            "labels": result["labels"].cpu().numpy(),
        }
        for result in results
    ]


@torch.no_grad()
def evaluate_model(model, dataloader, image_processor, accelerator=None, progress: bool = False, **metric_options) -> dict:
    """AP (``map``, ``map_50``, ...), D-ECE and LaECE (and position D-ECE) of ``model`` over ``dataloader``.

    With an ``accelerator`` the dataloader is expected prepared; each batch's detections are gathered from every
    process (``gather_for_metrics``, which also drops the duplicates that pad the last batch).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    metric = DetectionCalibrationMetric(**metric_options)
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    for batch in tqdm(dataloader, desc="evaluating", disable=not show, leave=False):
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"))
        predictions = post_process(outputs, batch["labels"], image_processor)
        references = labels_to_references(batch["labels"])
        sizes = [tuple(int(v) for v in label["orig_size"]) for label in batch["labels"]]
        if accelerator is not None:
            predictions, references, sizes = accelerator.gather_for_metrics(
                (predictions, references, sizes), use_gather_object=True
            )
        metric.update(predictions, references, image_sizes=sizes)
    model.train(was_training)
    return metric.compute()


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
