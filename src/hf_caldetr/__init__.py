"""Cal-DETR (train-time calibration of detection transformers, NeurIPS 2023) for HuggingFace Transformers.

One Cal config and model class per registered DETR family (``hf_caldetr.families.MODEL_FAMILIES``): ``Cal`` + the
transformers class name (``CalDeformableDetrForObjectDetection``, ``CalDFineConfig``, ...). The Cal configs keep
their parent's ``model_type`` so that saved checkpoints load in stock transformers; for that reason they are not
registered with the Auto classes under a name of their own (a model type maps to one config class only).
Submodules: ``method`` (the method's tensor functions), ``models`` (the Cal models: the method around the
parent's own loss), ``families`` (the registry), ``metrics``, ``calibrators`` (post-hoc), ``data``, ``evaluation``,
``training``, ``hub``, ``folding`` (calibrators written into the weights), ``export`` (ONNX).
"""

from . import configuration as _configuration
from . import models as _models
from .calibrators import calibrate_pipeline_outputs
from .configuration import CalibrationConfigMixin
from .families import decoder_layer_logits
from .folding import CalibrationFoldError, fold_calibrator

_CAL_CLASSES = {cls.__name__: cls for cls in [*_configuration.CAL_CONFIG_CLASSES.values(),
                                             *_models.CAL_MODEL_CLASSES.values()]}
globals().update(_CAL_CLASSES)

__version__ = "0.1.0"

__all__ = [
    *sorted(_CAL_CLASSES),
    "CalibrationConfigMixin",
    "CalibrationFoldError",
    "calibrate_pipeline_outputs",
    "decoder_layer_logits",
    "fold_calibrator",
]
