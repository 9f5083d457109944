"""Cal-DETR (train-time calibration of detection transformers, NeurIPS 2023) for HuggingFace Transformers.

The Cal configs keep their parent's ``model_type`` so that saved checkpoints load in stock transformers; for that
reason they are not registered with the Auto classes under a name of their own (a model type maps to one config
class only). Submodules: ``calibration`` (the method), ``metrics``, ``calibrators`` (post-hoc), ``data``,
``evaluation``, ``training``, ``hub``, ``folding`` (calibrators
written into the weights), ``export`` (ONNX).
"""

from .calibrators import calibrate_pipeline_outputs
from .configuration import CalDeformableDetrConfig, CalDetrConfig, CalibrationConfigMixin, CalRTDetrConfig
from .folding import CalibrationFoldError, fold_calibrator
from .models import (
    CalDeformableDetrForObjectDetection,
    CalDeformableDetrObjectDetectionOutput,
    CalDetrForObjectDetection,
    CalDetrObjectDetectionOutput,
    CalRTDetrForObjectDetection,
    CalRTDetrObjectDetectionOutput,
)

__version__ = "0.1.0"

__all__ = [
    "CalDeformableDetrConfig",
    "CalDeformableDetrForObjectDetection",
    "CalDeformableDetrObjectDetectionOutput",
    "CalDetrConfig",
    "CalDetrForObjectDetection",
    "CalDetrObjectDetectionOutput",
    "CalRTDetrConfig",
    "CalRTDetrForObjectDetection",
    "CalRTDetrObjectDetectionOutput",
    "CalibrationConfigMixin",
    "CalibrationFoldError",
    "calibrate_pipeline_outputs",
    "fold_calibrator",
]
