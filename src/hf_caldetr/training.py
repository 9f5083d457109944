"""What the example scripts share: methods as config settings, model building and loading, batch norms.

A method is a set of Cal settings on one architecture, so every arm of a comparison trains the same network:
``baseline`` is the Cal class with the method off (the stock transformers loss), the others with it on.
"""

from __future__ import annotations

import dataclasses
import inspect

import transformers

from .configuration import CAL_FIELDS, METHOD_FIELDS
from .families import (  # noqa: F401  (re-exported: the scripts' one import place)
    MODEL_FAMILIES,
    MODEL_PRESETS,
    ModelFamily,
    decoder_layer_logits,
    has_layer_logits,
    layer_logits_options,
    model_family,
    preset_config_kwargs,
    small_backbone_config,
)

__all__ = ["METHODS", "MODEL_FAMILIES", "MODEL_PRESETS", "ModelFamily", "build_model", "check_checkpoint",
           "check_config_overrides", "checkpoint_model_type", "decoder_layer_logits", "freeze_batch_norm",
           "has_layer_logits", "layer_logits_options", "method_settings", "model_family", "parse_config_overrides",
           "preset_config_kwargs", "small_backbone_config", "split_cal_overrides", "unfreeze_batch_norm"]

# method -> Cal settings. Every arm trains the Cal class, so that training choices outside the method
# (``num_boxes_normalization``) are the same for all; ``baseline`` has the method off: the stock transformers loss
# (tests/test_families.py: loss and gradients equal the stock model's), saved as a stock checkpoint.
METHODS = {
    "baseline": {"uncertainty_modulation": "none", "use_logit_mixing": False},
    "cal-detr": {"uncertainty_modulation": "multiplicative", "use_logit_mixing": True},
    # What the authors' released code trains: subtractive modulation; the mixing loss is computed then dropped.
    "released": {"uncertainty_modulation": "subtractive", "use_logit_mixing": False},
    "modulation-only": {"uncertainty_modulation": "multiplicative", "use_logit_mixing": False},
    "mixing-only": {"uncertainty_modulation": "none", "use_logit_mixing": True},
}


def parse_config_overrides(text: str | None) -> dict:
    """``"d_model=128,num_queries=30,with_box_refine=true"`` -> a dict of typed values (as transformers' scripts)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
        else:
            try:
                overrides[key] = int(value)
            except ValueError:
                try:
                    overrides[key] = float(value)
                except ValueError:
                    overrides[key] = value
    return overrides


def split_cal_overrides(overrides: dict | None) -> tuple[dict, dict]:
    """``(model config fields, Cal settings)`` of config overrides: a Cal field given as a config override is a Cal
    setting (it goes to the Cal model only, through the Cal settings' checks)."""
    overrides = dict(overrides or {})
    cal_settings = {name: overrides.pop(name) for name in list(overrides) if name in CAL_FIELDS}
    return overrides, cal_settings


def check_config_overrides(family, overrides: dict) -> None:
    """Refuse config overrides that are not fields of ``family``'s config: a transformers config keeps unknown keys
    as unused attributes, so a misspelt override would change nothing, silently."""
    known = {field.name for field in dataclasses.fields(family.config_class)} | set(
        inspect.signature(family.config_class.__init__).parameters)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--config_overrides: {unknown} are not fields of {family.config_class.__name__} (a config "
                         "keeps unknown keys unused); check the spelling")


def method_settings(method: str, **cal_overrides) -> dict:
    """The Cal settings of ``method`` with the explicit overrides (``None`` values ignored) applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    overrides = {k: v for k, v in cal_overrides.items() if v is not None}
    unknown = set(overrides) - set(CAL_FIELDS)
    if unknown:
        raise ValueError(f"unknown Cal settings {sorted(unknown)}; known: {CAL_FIELDS}")
    method_overrides = sorted(set(overrides) & set(METHOD_FIELDS))
    if method == "baseline" and method_overrides:
        raise ValueError(f"method 'baseline' trains without the method and takes no Cal settings, got "
                         f"{method_overrides}")
    return {**METHODS[method], **overrides}


def check_checkpoint(name_or_path: str, allow_onnx: bool = False) -> None:
    """Fail early, naming the problem, on a checkpoint that is neither a model folder nor a possible Hub id
    (transformers' own message for a missing folder is about the form of a Hub repo id)."""
    from pathlib import Path

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name_or_path} is a folder without config.json: not a model checkpoint "
                             "(save_pretrained writes one)")
        return
    if allow_onnx and path.is_file() and path.suffix == ".onnx":
        return
    if path.exists():
        kinds = "a checkpoint folder, an .onnx file" if allow_onnx else "a checkpoint folder"
        raise ValueError(f"{name_or_path} is a file; pass {kinds} or a Hub model id")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ValueError(f"checkpoint folder {name_or_path} does not exist (and it is not a Hub model id)") from None


def checkpoint_model_type(model_name_or_path: str) -> str:
    """The ``model_type`` of a checkpoint (Hub id or folder)."""
    return transformers.AutoConfig.from_pretrained(model_name_or_path).model_type


def build_model(method: str, id2label: dict[int, str], model_name_or_path: str | None = None,
                preset: str = "small", config_overrides: dict | None = None, model_type: str | None = None,
                **cal_overrides):
    """The model of ``method``: from a checkpoint (plain or Cal, Hub id or folder) or a fresh ``preset``.

    ``model_type`` defaults to the checkpoint's own, or ``deformable_detr`` for a fresh model. A checkpoint with
    another label set gets a new classification head (``ignore_mismatched_sizes``).
    """
    # A Cal field given as a config override goes through the Cal settings' checks (refused for the stock
    # baseline), and is not overwritten by the method's own settings.
    config_overrides, cal_fields = split_cal_overrides(config_overrides)
    for name, value in cal_fields.items():
        if cal_overrides.get(name) is not None:
            raise ValueError(f"{name} is given twice (as --{name} and in --config_overrides): give it once")
        cal_overrides[name] = value
    settings = method_settings(method, **cal_overrides)
    if model_type is None:
        model_type = checkpoint_model_type(model_name_or_path) if model_name_or_path else "deformable_detr"
    family = model_family(model_type)
    check_config_overrides(family, config_overrides)
    model_class = family.cal_model_class
    labels = {"num_labels": len(id2label), "id2label": dict(id2label),
              "label2id": {name: index for index, name in id2label.items()}}
    extra = {**config_overrides, **settings}
    if model_name_or_path:
        return model_class.from_pretrained(model_name_or_path, ignore_mismatched_sizes=True, **labels, **extra)
    return model_class(family.cal_config_class(**preset_config_kwargs(family, preset, **labels, **extra)))


def _is_frozen_batch_norm(module) -> bool:
    # transformers defines one per architecture (DeformableDetr..., Detr..., RTDetr...FrozenBatchNorm2d).
    return type(module).__name__.endswith("FrozenBatchNorm2d")


def unfreeze_batch_norm(model) -> int:
    """Swap the backbone's frozen batch norms for trainable ``nn.BatchNorm2d`` with the same statistics.

    transformers freezes the backbone's batch norms, which is right for a pretrained backbone; but a backbone
    trained from scratch (our offline presets) then has no normalisation at all and learns far slower. Call it
    before building the optimizer, and :func:`freeze_batch_norm` before saving, so the checkpoint stays a stock
    one (in eval mode both compute ``(x - mean) / sqrt(var + 1e-5) * weight + bias``). Returns the number swapped.
    """
    import torch
    from torch import nn

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_frozen_batch_norm(child):
                norm = nn.BatchNorm2d(child.weight.numel(), eps=1e-5).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(norm, key).copy_(getattr(child, key))
                norm.frozen_class = type(child)
                parent._modules[name] = norm
                swapped += 1
    return swapped


def freeze_batch_norm(model) -> int:
    """Undo :func:`unfreeze_batch_norm`: the learned statistics go back into the architecture's frozen norms."""
    import torch

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            frozen_class = getattr(child, "frozen_class", None)
            if frozen_class is not None:
                frozen = frozen_class(child.num_features).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, key).copy_(getattr(child, key))
                parent._modules[name] = frozen
                swapped += 1
    return swapped
