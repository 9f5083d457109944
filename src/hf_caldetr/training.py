"""What the example scripts share: methods as config settings, model presets, model loading, data loading.

A method is a set of Cal settings on one architecture, so every arm of a comparison trains the same network:
``baseline`` is the stock transformers model; the others are the Cal subclass with these settings.
"""

from __future__ import annotations

from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

from .configuration import CalDeformableDetrConfig
from .models import CalDeformableDetrForObjectDetection

# method -> Cal settings (None: the stock transformers model).
METHODS = {
    "baseline": None,
    "cal-detr": {"uncertainty_modulation": "multiplicative", "use_logit_mixing": True},
    # What the authors' released code trains: subtractive modulation; the mixing loss is computed then dropped.
    "released": {"uncertainty_modulation": "subtractive", "use_logit_mixing": False},
    "modulation-only": {"uncertainty_modulation": "multiplicative", "use_logit_mixing": False},
    "mixing-only": {"uncertainty_modulation": "none", "use_logit_mixing": True},
}

CAL_FIELDS = ("uncertainty_modulation", "modulate_at_inference", "use_logit_mixing", "logit_mixing_alpha",
              "logit_mixing_loss_coefficient")


def small_backbone_config(hidden_sizes=(32, 64, 128, 256)) -> ResNetConfig:
    """A small basic-block ResNet (random init: nothing is downloaded), three feature levels (strides 8, 16, 32)."""
    return ResNetConfig(layer_type="basic", hidden_sizes=list(hidden_sizes), embedding_size=hidden_sizes[0],
                        depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])


# Fresh-model presets (no pretrained weights exist offline). "r50" is the paper's recipe on a random timm ResNet-50.
MODEL_PRESETS = {
    "tiny": dict(backbone_config=lambda: small_backbone_config((16, 32, 64, 128)), d_model=32, encoder_layers=1,
                 decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                 decoder_attention_heads=2, num_queries=12, num_feature_levels=3, encoder_n_points=2,
                 decoder_n_points=2, two_stage_num_proposals=12),
    "small": dict(backbone_config=small_backbone_config, d_model=64, encoder_layers=2, decoder_layers=3,
                  encoder_ffn_dim=256, decoder_ffn_dim=256, encoder_attention_heads=4, decoder_attention_heads=4,
                  num_queries=20, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2,
                  two_stage_num_proposals=20, dropout=0.0),
    "r50": dict(num_queries=300),
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


def method_settings(method: str, **cal_overrides) -> dict | None:
    """The Cal settings of ``method`` with the explicit overrides (``None`` values ignored) applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    settings = METHODS[method]
    overrides = {k: v for k, v in cal_overrides.items() if v is not None}
    if settings is None:
        if overrides:
            raise ValueError(f"method 'baseline' is the stock model and takes no Cal settings, got {sorted(overrides)}")
        return None
    unknown = set(overrides) - set(CAL_FIELDS)
    if unknown:
        raise ValueError(f"unknown Cal settings {sorted(unknown)}; known: {CAL_FIELDS}")
    return {**settings, **overrides}


def build_model(method: str, id2label: dict[int, str], model_name_or_path: str | None = None,
                preset: str = "small", config_overrides: dict | None = None, **cal_overrides):
    """The model of ``method``: from a checkpoint (plain or Cal, Hub id or folder) or a fresh ``preset``.

    A checkpoint with another label set gets a new classification head (``ignore_mismatched_sizes``).
    """
    settings = method_settings(method, **cal_overrides)
    model_class = DeformableDetrForObjectDetection if settings is None else CalDeformableDetrForObjectDetection
    labels = {"num_labels": len(id2label), "id2label": dict(id2label),
              "label2id": {name: index for index, name in id2label.items()}}
    extra = {**(config_overrides or {}), **(settings or {})}
    if model_name_or_path:
        return model_class.from_pretrained(model_name_or_path, ignore_mismatched_sizes=True, **labels, **extra)
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    kwargs = {k: (v() if callable(v) else v) for k, v in MODEL_PRESETS[preset].items()}
    config_class = DeformableDetrConfig if settings is None else CalDeformableDetrConfig
    return model_class(config_class(**{**kwargs, **labels, **extra}))


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
