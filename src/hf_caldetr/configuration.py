"""The Cal-DETR configuration fields, shared by every Cal config.

A Cal config is the stock transformers config of its architecture plus the fields below (a dataclass mixin,
validated after the parent's own checks). It keeps the parent's ``model_type`` and, on disk, the parent's
architecture name, so a saved folder is an ordinary checkpoint that stock transformers loads; the Cal fields
ride along in ``config.json`` as extra keys, which stock configs keep and ignore.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import transformers
from huggingface_hub.dataclasses import strict

from .method import MODULATION_MODES
from .families import MODEL_FAMILIES

NUM_BOXES_NORMALIZATIONS = ("global", "transformers")

CAL_CLASS_PREFIX = "Cal"


def stock_architecture_name(name: str) -> str:
    """``"CalDeformableDetrForObjectDetection"`` -> ``"DeformableDetrForObjectDetection"``; other names unchanged."""
    stock = name.removeprefix(CAL_CLASS_PREFIX)
    if name.startswith(CAL_CLASS_PREFIX) and hasattr(transformers, stock):
        return stock
    return name


@dataclass(repr=False)
class CalibrationConfigMixin:
    """The Cal-DETR fields. Put it first among the bases: ``class CalXConfig(CalibrationConfigMixin, XConfig)``.

    Args:
        uncertainty_modulation (`str`, defaults to `"multiplicative"`):
            How the final layer's logits are scaled by their uncertainty ``U = Var_l(Z)`` (spec section 2).
            `"multiplicative"`: the paper's equation, ``Z_L * (1 - tanh(U))``. `"subtractive"`: the authors'
            released code, ``Z_L - tanh(U)`` (an operator-precedence slip). `"none"`: no modulation.
        modulate_at_inference (`bool`, defaults to `False`):
            Whether the returned ``logits`` are modulated outside training too. The paper and the released code
            modulate in training only, so a trained model is an ordinary detector at inference.
        use_logit_mixing (`bool`, defaults to `True`):
            Whether to add the logit-mixing regulariser ``L_R`` (spec section 3). The released code computes it
            and then drops it from the loss.
        logit_mixing_alpha (`float`, defaults to 0.9):
            ``alpha`` of ``ztilde_i = alpha * z_i + (1 - alpha) * zbar`` and of the smoothed targets; in (0, 1].
        logit_mixing_loss_coefficient (`float`, defaults to 0.5):
            ``lambda`` of ``L = L_det + lambda * L_R`` (the released code's weight; its first upload used 1.0).
        num_boxes_normalization (`str`, defaults to `"global"`):
            What the box-normalised losses are divided by when training runs in several processes. `"global"`: the
            boxes of the whole batch (summed over processes) over the process count, so 2 processes train as 1.
            `"transformers"`: the installed transformers loss's own rule (DETR-style losses average the boxes over
            processes and divide by the process count again; RT-DETR-style ones use each process's own boxes).
            One process: both are the same. Set it alike for every arm of a comparison
            (``examples/train.py --num_boxes_normalization``, which the baseline arm follows too).
    """

    uncertainty_modulation: str = "multiplicative"
    modulate_at_inference: bool = False
    use_logit_mixing: bool = True
    logit_mixing_alpha: float | int = 0.9
    logit_mixing_loss_coefficient: float | int = 0.5
    num_boxes_normalization: str = "global"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_calibration_settings()

    def validate_calibration_settings(self) -> None:
        """Raise ``ValueError`` naming the field when a Cal setting cannot work."""
        for name in ("modulate_at_inference", "use_logit_mixing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r} (a string such as "
                                 "'false' would count as true)")
        for name in ("logit_mixing_alpha", "logit_mixing_loss_coefficient"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.num_boxes_normalization not in NUM_BOXES_NORMALIZATIONS:
            raise ValueError(f"num_boxes_normalization must be one of {NUM_BOXES_NORMALIZATIONS}, got "
                             f"{self.num_boxes_normalization!r}")
        if self.uncertainty_modulation not in MODULATION_MODES:
            raise ValueError(
                f"uncertainty_modulation must be one of {MODULATION_MODES}, got {self.uncertainty_modulation!r}"
            )
        if not 0 < self.logit_mixing_alpha <= 1:
            raise ValueError(f"logit_mixing_alpha must lie in (0, 1], got {self.logit_mixing_alpha}")
        if self.logit_mixing_loss_coefficient < 0:
            raise ValueError(
                f"logit_mixing_loss_coefficient must be non-negative, got {self.logit_mixing_loss_coefficient}"
            )
        if self.uncertainty_modulation != "none" and self.decoder_layers < 2:
            raise ValueError(
                f"decoder_layers={self.decoder_layers}: uncertainty_modulation={self.uncertainty_modulation!r} "
                "needs at least 2 decoder layers (the variance over one layer is undefined); "
                "set uncertainty_modulation='none' or add layers"
            )

    def to_dict(self) -> dict:
        """Differs from the parent in writing the stock architecture names, so stock transformers loads the folder."""
        output = super().to_dict()
        if output.get("architectures"):
            output["architectures"] = [stock_architecture_name(name) for name in output["architectures"]]
        return output


CAL_FIELDS = tuple(field.name for field in dataclasses.fields(CalibrationConfigMixin))
# The method's own fields (every Cal config.json has them); ``num_boxes_normalization`` is a training choice.
METHOD_FIELDS = CAL_FIELDS[:5]


def calibration_is_on(config) -> bool:
    """Whether a config (object or ``config.json`` dict) trains with Cal-DETR: it has the method's fields and
    modulates or mixes. The baseline arm is the Cal class with both off: the stock transformers loss."""
    values = config if isinstance(config, dict) else vars(config)
    if not all(name in values for name in METHOD_FIELDS):
        return False
    return values["uncertainty_modulation"] != "none" or bool(values["use_logit_mixing"])


def _cal_config_class(parent: type) -> type:
    """``Cal`` + ``parent``'s name: ``parent`` with the fields of :class:`CalibrationConfigMixin`."""
    name = CAL_CLASS_PREFIX + parent.__name__
    namespace = {"__module__": __name__, "__qualname__": name,
                 "__doc__": f"Differs from `{parent.__name__}` in the Cal-DETR fields of :class:`CalibrationConfigMixin`."}
    return strict(type(name, (CalibrationConfigMixin, parent), namespace))


CAL_CONFIG_CLASSES = {model_type: _cal_config_class(family.config_class) for model_type, family in MODEL_FAMILIES.items()}
globals().update({cls.__name__: cls for cls in CAL_CONFIG_CLASSES.values()})
__all__ = ["CAL_FIELDS", "METHOD_FIELDS", "CalibrationConfigMixin", "calibration_is_on", "stock_architecture_name",
           *(cls.__name__ for cls in CAL_CONFIG_CLASSES.values())]
