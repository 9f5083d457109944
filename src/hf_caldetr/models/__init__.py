"""The Cal models: ``Cal`` + each registered parent's name (``hf_caldetr.families.MODEL_FAMILIES``), all made by
``hf_caldetr.models.calibrated`` from one registration entry each."""

from .calibrated import CAL_MODEL_CLASSES, CalibratedDetectorMixin, calibrated_loss

globals().update({cls.__name__: cls for cls in CAL_MODEL_CLASSES.values()})

__all__ = ["CAL_MODEL_CLASSES", "CalibratedDetectorMixin", "calibrated_loss",
           *(cls.__name__ for cls in CAL_MODEL_CLASSES.values())]
