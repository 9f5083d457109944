"""Detection calibration metrics: D-ECE (Cal-DETR protocol), position-dependent D-ECE, LaECE (official SAOD
conventions), LRP Error and oLRP with per-class LRP-optimal thresholds, LaECE_0 / LaACE_0, OCE, D-UCE, COCO AP,
reliability diagrams (D-ECE, LaECE, D-UCE), a streaming metric and two ``evaluate`` modules. The README's Metrics
section lists each with its definition, reference and the official code it equals.

``D_ECE_MODULE`` and ``DETECTION_CALIBRATION_MODULE`` are the folders of the ``evaluate`` modules:
``evaluate.load(D_ECE_MODULE)`` works offline. (The folders have no ``__init__.py``, so ``hf_caldetr.metrics.d_ece``
still imports the module ``d_ece.py``.)
"""

from pathlib import Path

from .coco import coco_average_precision
from .d_ece import (
    box_position_features,
    calibration_error,
    detection_ece,
    position_calibration_error,
    position_detection_ece,
)
from .laece import calibration_errors_at_iou_0, localisation_aware_calibration_error
from .lrp import apply_class_thresholds, lrp_error, lrp_optimal_thresholds, optimal_lrp
from .matching import DetectionMatches, match_detections
from .oce import object_calibration_error
from .reliability import plot_laece_diagram, plot_reliability_diagram, plot_uncertainty_diagram
from .streaming import DetectionCalibrationMetric, evaluate_detections
from .synthetic import synthetic_detections
from .uncertainty import detection_uce, uncertainty_calibration_error

D_ECE_MODULE = str(Path(__file__).resolve().parent / "evaluate_modules" / "d_ece")
DETECTION_CALIBRATION_MODULE = str(Path(__file__).resolve().parent / "evaluate_modules" / "detection_calibration")

__all__ = [
    "D_ECE_MODULE",
    "DETECTION_CALIBRATION_MODULE",
    "DetectionCalibrationMetric",
    "DetectionMatches",
    "box_position_features",
    "calibration_error",
    "coco_average_precision",
    "detection_ece",
    "apply_class_thresholds",
    "calibration_errors_at_iou_0",
    "detection_uce",
    "evaluate_detections",
    "localisation_aware_calibration_error",
    "lrp_error",
    "lrp_optimal_thresholds",
    "match_detections",
    "object_calibration_error",
    "optimal_lrp",
    "plot_laece_diagram",
    "plot_reliability_diagram",
    "plot_uncertainty_diagram",
    "position_calibration_error",
    "position_detection_ece",
    "synthetic_detections",
    "uncertainty_calibration_error",
]
