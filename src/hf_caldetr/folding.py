"""Fold a fitted post-hoc calibrator into a detector's weights, so the saved folder stays an ordinary checkpoint
whose stock transformers model, ``pipeline("object-detection")`` and Hub widget return calibrated scores.

Temperature and Platt scaling are affine maps of a detection's logit: ``q = sigmoid(a_c * z + b_c)`` with
``a = 1 / T, b = 0`` (temperature) or ``a, b`` fitted (Platt), one pair for all classes or one per class. A
sigmoid head's logit is ``z = W h + bias``, so the map is the head ``W' = a * W``, ``bias' = a * bias + b``
(row ``c`` scaled by ``a_c``). What makes it more than that, per family:

- Deformable DETR: in transformers 5.x every decoder layer's class head is tied to ``class_embed.0`` when
  ``tie_word_embeddings`` is on (the default, box refinement or not). The fold unties (every shared module and
  parameter becomes its own copy, ``tie_word_embeddings=False``, so stock transformers loads every copy as
  saved) and scales only the final layer's head: the other layers' logits are unchanged. (A Cal model's
  uncertainty, the variance over all layers including the last, does change; it matters only to further
  training, and train.py unfolds a calibrated checkpoint before fine-tuning it. The per-detection uncertainty
  that evaluation reports for D-UCE undoes the fold on the logits: ``hf_caldetr.training.decoder_layer_logits``.) In two-stage models the encoder's proposal head (``class_embed[decoder_layers]``) is left as
  it is, so the same proposals are selected.
- RT-DETR: one head per layer already; the final one is scaled. Queries are selected by the separate
  ``enc_score_head``, which is not touched.
- DETR (softmax with a no-object column): the score ``max_{c<C} softmax(z)_c`` depends on every column. A
  temperature over all columns (``SoftmaxTemperatureScaling``) is foldable: ``W' = W / T``. A sigmoid-style
  calibrator of the score (``TemperatureScaling``, ``PlattScaling``), class-wise or not, is not: no affine map
  of the logits turns ``softmax(z)_c`` into ``sigmoid(a * logit(softmax(z)_c) + b)`` for every input, because
  the softmax normaliser mixes all columns; it is refused with that reason. DETR has one classifier for every
  decoder layer, so its intermediate (auxiliary) logits are divided by ``T`` too; they matter only in training.

Isotonic regression and histogram binning are not affine: they stay a ``calibrator.json`` applied to the
pipeline's output with ``hf_caldetr.calibrators.calibrate_pipeline_outputs``.

The config records each fold (``config.folded_calibration``: kind, parameters, the per-class slope and offset
written, the data it was fitted on); a second fold is refused unless ``compose=True``, which states that the new
calibrator was fitted on the already folded model's scores.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .calibrators import (
    PlattScaling,
    PostHocCalibrator,
    SoftmaxTemperatureScaling,
    TemperatureScaling,
)

__all__ = ["FOLD_RECORD_KEY", "CalibrationFoldError", "affine_logit_map", "fold_calibrator", "is_foldable",
           "unfold_calibration"]

FOLD_RECORD_KEY = "folded_calibration"
"""The config attribute (and ``config.json`` key) listing the calibrators folded into the weights, in order."""


class CalibrationFoldError(ValueError):
    """The calibrator cannot be written into this model's weights; the message says why and what to do."""


def is_foldable(calibrator, softmax_head: bool = False) -> bool:
    """Whether ``fold_calibrator`` accepts ``calibrator`` for a sigmoid (default) or softmax head."""
    if softmax_head:
        return isinstance(calibrator, SoftmaxTemperatureScaling)
    return isinstance(calibrator, (TemperatureScaling, PlattScaling))


def _affine(params: dict) -> tuple[float, float]:
    if "temperature" in params:
        return 1.0 / params["temperature"], 0.0
    return params["slope"], params["bias"]


def affine_logit_map(calibrator: PostHocCalibrator, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(slope, offset)``, each ``[num_labels]``: the calibrated logit of class ``c`` is ``slope[c] * z + offset[c]``.

    Classes without a map of their own use the class-agnostic one, as ``calibrator.transform`` does.
    """
    if not isinstance(calibrator, (TemperatureScaling, PlattScaling)):
        raise CalibrationFoldError(
            f"{type(calibrator).__name__} is not an affine map of the logit, so it cannot be written into the "
            "weights; keep it as calibrator.json and apply it to the pipeline's output with "
            "hf_caldetr.calibrators.calibrate_pipeline_outputs (temperature and Platt scaling can be folded)")
    if calibrator.params_ is None:
        raise CalibrationFoldError(f"this {type(calibrator).__name__} is not fitted: fit it before folding")
    slope, offset = (np.full(num_labels, value, dtype=np.float64) for value in _affine(calibrator.params_))
    for label, params in calibrator.class_params_.items():
        if not 0 <= label < num_labels:
            raise CalibrationFoldError(f"the calibrator has a map for class {label}, but the model has "
                                       f"{num_labels} classes (0..{num_labels - 1}): it was fitted for another model")
        slope[label], offset[label] = _affine(params)
    if np.any(slope <= 0) or not np.all(np.isfinite(slope)) or not np.all(np.isfinite(offset)):
        raise CalibrationFoldError(
            f"the calibrator's slopes must be positive and finite (got {slope.tolist()}): a zero slope makes every "
            "score of a class equal, a negative one reverses their ranking")
    return slope, offset


def untie_weights(model: nn.Module) -> int:
    """Give every module and parameter that appears more than once in ``model`` its own copy, and switch off
    ``config.tie_word_embeddings`` so that transformers neither re-ties them on load nor drops copies on save.
    The values are unchanged. Returns the number of copies made.

    Where the architecture itself places one module at two paths (transformers 5.20's two-stage Deformable DETR
    hands its ``class_embed`` list to the decoder), its ``__init__`` rebuilds that sharing on load: the copies must
    then keep equal values, which ``fold_calibrator`` ensures by folding every path the head was reachable at.
    """
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    copies, seen_modules, seen_parameters = 0, set(), set()
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in seen_modules:
                parent._modules[name] = copy.deepcopy(child)
                copies += 1
            seen_modules.add(id(parent._modules[name]))
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) in seen_parameters:
                module._parameters[name] = nn.Parameter(parameter.detach().clone(),
                                                        requires_grad=parameter.requires_grad)
                copies += 1
            else:
                seen_parameters.add(id(parameter))
    return copies


def head_paths(model, head: nn.Module) -> list[str]:
    """Every path at which the module object ``head`` is reachable in ``model``."""
    return [name for name, module in model.named_modules(remove_duplicate=False) if module is head]


def _family(model):
    from .families import MODEL_FAMILIES

    model_type = model.config.model_type
    if model_type not in MODEL_FAMILIES:
        raise CalibrationFoldError(f"no fold is defined for model_type {model_type!r}; supported: "
                                   f"{sorted(MODEL_FAMILIES)}")
    family = MODEL_FAMILIES[model_type]
    if family.final_class_head is None:
        raise CalibrationFoldError(f"{model_type}'s final logits add a term after the class head (D-FINE's "
                                   "localisation-quality estimate), so no affine calibrator can be written into its "
                                   "weights; keep the calibrator as a file (calibrator.json, calibrate_pipeline_outputs)")
    return family


def _softmax_refusal(calibrator) -> str:
    return (f"{type(calibrator).__name__} cannot be folded into a softmax head ({'class-wise' if getattr(calibrator, 'class_wise', False) else 'class-agnostic'}): "
            "the score max_c softmax(z)_c depends on every column through the shared normaliser, so no affine "
            "map of the logits turns it into sigmoid(a * logit(score) + b) for every input, and a per-class slope "
            "or offset would change the other classes' scores too. Fit SoftmaxTemperatureScaling (one temperature "
            "over all columns, foldable) instead, or keep this calibrator as calibrator.json and apply it with "
            "hf_caldetr.calibrators.calibrate_pipeline_outputs")


@torch.no_grad()
def fold_calibrator(model, calibrator, fitted_on: dict | None = None, compose: bool = False):
    """Write a fitted affine calibrator into ``model``'s final class head, in place; returns ``model``.

    Works on the stock transformers model and its Cal subclass alike (DETR, Deformable DETR, RT-DETR). After
    the fold the model's post-processed scores are the calibrator's output on the unfolded model's scores
    (sigmoid heads: ``sigmoid(a_c * z + b_c)``; DETR: ``softmax(z / T)``), and ``save_pretrained`` writes an
    ordinary checkpoint carrying ``config.folded_calibration``.

    Args:
        model: a detector of a supported family (the unwrapped module, not a DDP wrapper).
        calibrator: ``TemperatureScaling`` or ``PlattScaling`` (class-agnostic or class-wise) for sigmoid heads;
            ``SoftmaxTemperatureScaling`` for DETR.
        fitted_on: a JSON-able description of the data the calibrator was fitted on, recorded in the config.
        compose: allow a fold on a model that already holds one (the calibrator must have been fitted on the
            folded model's scores: the two maps then compose).

    Raises:
        CalibrationFoldError: naming the reason (not affine, softmax head, already folded, modulated at
            inference, not fitted, wrong class count).
    """
    config = model.config
    family = _family(model)
    previous = list(getattr(config, FOLD_RECORD_KEY, None) or [])
    if previous and not compose:
        kinds = [record["kind"] for record in previous]
        raise CalibrationFoldError(
            f"this model already holds a folded calibrator ({kinds}): its scores are calibrated. Fold another only "
            "if it was fitted on these calibrated scores, with compose=True; otherwise fold into the raw model")
    if getattr(config, "modulate_at_inference", False):
        raise CalibrationFoldError(
            "the model modulates its logits at inference (modulate_at_inference=True), which stock transformers "
            "does not do, and the modulation depends on every layer's logits: a fold cannot reproduce it. Set "
            "modulate_at_inference=False and fit the calibrator on the raw scores")
    if family.softmax_head:
        if not isinstance(calibrator, SoftmaxTemperatureScaling):
            raise CalibrationFoldError(_softmax_refusal(calibrator))
        if calibrator.params_ is None:
            raise CalibrationFoldError("this SoftmaxTemperatureScaling is not fitted: fit it before folding")
        num_columns = config.num_labels + 1
        slope, offset = np.full(num_columns, 1.0 / calibrator.temperature), np.zeros(num_columns)
    else:
        if isinstance(calibrator, SoftmaxTemperatureScaling):
            raise CalibrationFoldError("SoftmaxTemperatureScaling is for softmax heads (DETR); this model's head "
                                       "is a per-class sigmoid: fit TemperatureScaling or PlattScaling")
        slope, offset = affine_logit_map(calibrator, config.num_labels)
    paths = head_paths(model, family.final_class_head(model))
    if not family.softmax_head:
        untie_weights(model)
    for path in paths:
        head = model.get_submodule(path)
        weight_slope = torch.as_tensor(slope, dtype=head.weight.dtype, device=head.weight.device)
        head.weight.mul_(weight_slope[:, None])
        head.bias.mul_(weight_slope).add_(torch.as_tensor(offset, dtype=head.bias.dtype, device=head.bias.device))
    record = {
        "kind": type(calibrator).__name__,
        "class_wise": bool(getattr(calibrator, "class_wise", False)),
        "calibrator": calibrator.to_dict(),
        "logit_slope": slope.tolist(),
        "logit_offset": offset.tolist(),
        "fitted_on": fitted_on,
        "head_paths": paths,
    }
    setattr(config, FOLD_RECORD_KEY, previous + [record])
    return model


@torch.no_grad()
def unfold_calibration(model):
    """Undo every fold recorded in ``config.folded_calibration`` (newest first), in place; returns ``model``.

    The inverse of ``fold_calibrator``: ``W = W' / a``, ``bias = (bias' - b) / a``, exact up to float rounding
    (about 1e-7 relative in float32). The heads stay untied, with the same values as before the fold. Use it to
    measure a shipped calibrated checkpoint's raw scores, or to fold another calibrator fitted on raw scores.
    """
    records = list(getattr(model.config, FOLD_RECORD_KEY, None) or [])
    if not records:
        raise CalibrationFoldError("this model holds no folded calibration (config.folded_calibration is empty)")
    family = _family(model)
    for record in reversed(records):
        # Modules at distinct paths may be one object again after loading (see untie_weights): undo each once.
        heads = {id(module): module for module in (model.get_submodule(path) for path in record.get("head_paths") or [])}
        for head in heads.values() or [family.final_class_head(model)]:
            slope = torch.as_tensor(record["logit_slope"], dtype=head.weight.dtype, device=head.weight.device)
            offset = torch.as_tensor(record["logit_offset"], dtype=head.bias.dtype, device=head.bias.device)
            head.bias.sub_(offset).div_(slope)
            head.weight.div_(slope[:, None])
    setattr(model.config, FOLD_RECORD_KEY, None)
    return model
