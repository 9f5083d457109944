"""What the example scripts share: methods as config settings, model presets, model loading, data loading.

A method is a set of Cal settings on one architecture, so every arm of a comparison trains the same network:
``baseline`` is the stock transformers model; the others are the Cal subclass with these settings.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import transformers
from transformers import ResNetConfig

from . import configuration, models
from .models.detr import decoder_layer_states

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


def small_backbone_config(hidden_sizes=(32, 64, 128, 256), config_class=ResNetConfig, levels=3, first_stage=2):
    """A small basic-block ResNet (random init: nothing is downloaded), ``levels`` stages from ``first_stage`` on
    as features (stage k has stride 2^(k+1))."""
    stages = [f"stage{k}" for k in range(first_stage, first_stage + levels)]
    return config_class(layer_type="basic", hidden_sizes=list(hidden_sizes), embedding_size=hidden_sizes[0],
                        depths=[1, 1, 1, 1], out_features=stages)


def _rt_detr_backbone(hidden_sizes):
    return small_backbone_config(hidden_sizes, transformers.RTDetrResNetConfig)


_SMALL = dict(encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0)
_TINY = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
             encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its stock and Cal classes, its image processor, and fresh-model presets.

    Presets build models with random weights (no pretrained weights exist offline); values that are callables
    are called at build time.
    """

    config_class: type
    model_class: type
    cal_config_class: type
    cal_model_class: type
    image_processor_class: str
    presets: dict
    # The final decoder layer's class head (what post-processing reads), for folding a calibrator into it.
    final_class_head: Callable
    # A softmax head with a no-object column (DETR) rather than per-class sigmoids.
    softmax_head: bool = False
    # ``(model, outputs) -> [B, L, Q, C]``: every decoder layer's class logits, from the outputs of one inference
    # forward run with ``layer_logits_options`` (stock or Cal model, unwrapped); see ``decoder_layer_logits``.
    layer_logits: Callable | None = None
    # ``model -> [L modules]``: the class head of each decoder layer (to undo a folded calibration on its logits).
    layer_class_heads: Callable | None = None
    # What the forward must be asked for so that ``layer_logits`` finds every layer's logits in its outputs.
    layer_logits_options: Mapping = field(default_factory=dict)
    # How the image processor's ``post_process_object_detection`` picks its detections from the final logits:
    # ``"top_k"`` (the top ``min(top_k, Q * C)`` sigmoid scores), ``"top_queries"`` (the top ``Q`` sigmoid scores
    # over ``Q * C``) or ``"per_query"`` (one per query: the softmax argmax over the real classes).
    detection_selection: str = "top_k"


# Every decoder layer's class logits, per family: what D-UCE's per-detection uncertainty ``tanh(Var_l(Z))`` is
# computed from. All come from the outputs of the evaluation's one forward pass; none runs the model again.


def _deformable_detr_layer_logits(model, outputs) -> torch.Tensor:
    """The Cal model returns them (``intermediate_logits``). The stock one returns every decoder layer's hidden
    state (``intermediate_hidden_states`` ``[B, L, Q, d]``) and keeps only the last layer's logits: each layer's
    own head ``class_embed[l]`` gives them, the computation of its forward (``L`` small linear maps)."""
    logits = getattr(outputs, "intermediate_logits", None)
    if logits is not None:
        return logits
    hidden_states = outputs.intermediate_hidden_states
    return torch.stack([model.class_embed[level](hidden_states[:, level]) for level in range(hidden_states.shape[1])],
                       dim=1)


def _detr_layer_logits(model, outputs) -> torch.Tensor:
    """The Cal model returns them (``intermediate_logits``). The stock one returns per-layer logits only as the
    auxiliary outputs of a forward with labels and ``auxiliary_loss`` (which changes its decoder); run with
    ``output_hidden_states=True`` it returns the decoder's hidden states, which its decoder layer norm and its one
    classifier turn into every layer's logits (as the auxiliary heads see them; the last is exactly
    ``outputs.logits``), ``L`` small linear maps (``models.detr.decoder_layer_states``)."""
    logits = getattr(outputs, "intermediate_logits", None)
    if logits is not None:
        return logits
    return model.class_labels_classifier(decoder_layer_states(model, outputs))


def _rt_detr_layer_logits(model, outputs) -> torch.Tensor:
    """Stock and Cal RT-DETR return them (``intermediate_logits``); at inference there are no denoising queries."""
    return outputs.intermediate_logits


MODEL_FAMILIES = {
    "deformable_detr": ModelFamily(
        transformers.DeformableDetrConfig, transformers.DeformableDetrForObjectDetection,
        configuration.CalDeformableDetrConfig, models.CalDeformableDetrForObjectDetection,
        "DeformableDetrImageProcessor",
        {
            "tiny": dict(_TINY, backbone_config=lambda: small_backbone_config((16, 32, 64, 128)), num_feature_levels=3,
                         encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=12),
            # Measured on the digits default (2-core CPU, AP50 at 1500 steps): features from strides 4-16 rather
            # than 8-32 (digits are 14-32 px) and deep supervision of every decoder layer (the original recipe's
            # auxiliary loss, off by default in transformers) took AP50 from 0.09 to 0.12; then a learning rate of
            # 1e-3 rather than 5e-4 to 0.25, and focal_alpha 0.5 rather than 0.25 to 0.43 (with 0.25, a detector
            # trained for minutes scores almost nothing above the protocol's 0.3 threshold).
            "small": dict(_SMALL, backbone_config=lambda: small_backbone_config(first_stage=1), d_model=64,
                          encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=20,
                          num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=20,
                          auxiliary_loss=True, focal_alpha=0.5),
            # The paper's recipe on a random timm ResNet-50.
            "r50": dict(num_queries=300),
        },
        # class_embed[decoder_layers] exists in two-stage models: the encoder's proposal head.
        final_class_head=lambda model: model.class_embed[model.config.decoder_layers - 1],
        layer_logits=_deformable_detr_layer_logits,
        layer_class_heads=lambda model: [model.class_embed[level] for level in range(model.config.decoder_layers)],
        detection_selection="top_k",
    ),
    "detr": ModelFamily(
        transformers.DetrConfig, transformers.DetrForObjectDetection,
        configuration.CalDetrConfig, models.CalDetrForObjectDetection,
        "DetrImageProcessor",
        {
            "tiny": dict(_TINY, backbone_config=lambda: small_backbone_config((16, 32, 64, 128), levels=1, first_stage=4),
                         use_timm_backbone=False),
            "small": dict(_SMALL, backbone_config=lambda: small_backbone_config(levels=1, first_stage=4), use_timm_backbone=False,
                          d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256,
                          num_queries=20),
            "r50": dict(num_queries=100),
        },
        # One classifier serves every decoder layer (the auxiliary outputs too).
        final_class_head=lambda model: model.class_labels_classifier,
        softmax_head=True,
        layer_logits=_detr_layer_logits,
        layer_class_heads=lambda model: [model.class_labels_classifier] * model.config.decoder_layers,
        layer_logits_options={"output_hidden_states": True},
        detection_selection="per_query",
    ),
    "rt_detr": ModelFamily(
        transformers.RTDetrConfig, transformers.RTDetrForObjectDetection,
        configuration.CalRTDetrConfig, models.CalRTDetrForObjectDetection,
        "RTDetrImageProcessor",
        {
            "tiny": dict(backbone_config=lambda: _rt_detr_backbone((16, 32, 64, 128)), encoder_hidden_dim=32,
                         encoder_in_channels=[32, 64, 128], encoder_layers=1, encoder_ffn_dim=64,
                         encoder_attention_heads=2, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                         decoder_layers=2, decoder_attention_heads=2, decoder_n_points=2, num_queries=12,
                         num_denoising=10),
            "small": dict(backbone_config=lambda: _rt_detr_backbone((32, 64, 128, 256)), encoder_hidden_dim=64,
                          encoder_in_channels=[64, 128, 256], encoder_layers=1, encoder_ffn_dim=256,
                          encoder_attention_heads=4, d_model=64, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=256,
                          decoder_layers=3, decoder_attention_heads=4, decoder_n_points=2, num_queries=20,
                          num_denoising=20),
            "r50": dict(),
        },
        # Query selection uses model.enc_score_head, a separate head.
        final_class_head=lambda model: model.model.decoder.class_embed[-1],
        layer_logits=_rt_detr_layer_logits,
        layer_class_heads=lambda model: list(model.model.decoder.class_embed),
        detection_selection="top_queries",
    ),
}

# Backwards-compatible view: the Deformable DETR presets.
MODEL_PRESETS = MODEL_FAMILIES["deformable_detr"].presets


def has_layer_logits(model) -> bool:
    """Whether ``decoder_layer_logits`` can give ``model``'s per-layer logits: a PyTorch model (unwrapped) of a
    registered family with at least 2 decoder layers (the variance over one layer is undefined). An ONNX model
    (``hf_caldetr.export.OnnxDetector``) returns the final logits only."""
    config = getattr(model, "config", None)
    family = MODEL_FAMILIES.get(getattr(config, "model_type", None))
    return (isinstance(model, torch.nn.Module) and family is not None and family.layer_logits is not None
            and getattr(config, "decoder_layers", 0) >= 2)


def layer_logits_options(model) -> dict:
    """The forward options under which ``model``'s outputs hold what ``decoder_layer_logits`` reads."""
    return dict(model_family(model.config.model_type).layer_logits_options)


def decoder_layer_logits(model, outputs, raw: bool = True) -> torch.Tensor:
    """Every decoder layer's class logits ``[B, L, Q, C]`` from the outputs of one forward of ``model`` (the
    unwrapped stock or Cal model, run with ``layer_logits_options(model)``): ``C`` labels for sigmoid heads,
    labels + 1 for DETR. No forward runs here.

    ``raw``: a calibration folded into the weights (``config.folded_calibration``, ``hf_caldetr.folding``) is
    undone on the logits of the layers whose head it was written into (the final layer; DETR: all of them, one
    classifier), so the logits, and the uncertainty computed from them, are the raw model's: a post-hoc
    calibrator changes the scores, not the uncertainty.
    """
    family = model_family(model.config.model_type)
    logits = family.layer_logits(model, outputs)
    if logits is None or logits.dim() != 4:
        raise ValueError(f"{type(model).__name__}'s outputs hold no per-layer logits [batch, layers, queries, "
                         f"classes] (run it with {dict(family.layer_logits_options) or 'its defaults'})")
    records = list(getattr(model.config, "folded_calibration", None) or []) if raw else []
    if records:
        heads = family.layer_class_heads(model)
        logits = logits.clone()
        for record in reversed(records):  # the newest fold first, as unfold_calibration does
            folded = set()
            for path in record.get("head_paths") or []:
                try:
                    folded.add(id(model.get_submodule(path)))
                except AttributeError:
                    continue
            folded = folded or {id(family.final_class_head(model))}
            layers = [level for level, head in enumerate(heads) if id(head) in folded]
            slope = torch.as_tensor(record["logit_slope"], dtype=logits.dtype, device=logits.device)
            offset = torch.as_tensor(record["logit_offset"], dtype=logits.dtype, device=logits.device)
            logits[:, layers] = (logits[:, layers] - offset) / slope
    return logits


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


def model_family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_FAMILIES)}, got {model_type!r}")
    return MODEL_FAMILIES[model_type]


def build_model(method: str, id2label: dict[int, str], model_name_or_path: str | None = None,
                preset: str = "small", config_overrides: dict | None = None, model_type: str | None = None,
                **cal_overrides):
    """The model of ``method``: from a checkpoint (plain or Cal, Hub id or folder) or a fresh ``preset``.

    ``model_type`` defaults to the checkpoint's own, or ``deformable_detr`` for a fresh model. A checkpoint with
    another label set gets a new classification head (``ignore_mismatched_sizes``).
    """
    config_overrides = dict(config_overrides or {})
    # A Cal field given as a config override is a Cal setting: it goes through the same checks (refused for the
    # stock baseline), and is not overwritten by the method's own settings.
    for name in [key for key in config_overrides if key in CAL_FIELDS]:
        if cal_overrides.get(name) is not None:
            raise ValueError(f"{name} is given twice (as --{name} and in --config_overrides): give it once")
        cal_overrides[name] = config_overrides.pop(name)
    settings = method_settings(method, **cal_overrides)
    if model_type is None:
        model_type = checkpoint_model_type(model_name_or_path) if model_name_or_path else "deformable_detr"
    family = model_family(model_type)
    known = {field.name for field in dataclasses.fields(family.config_class)} | set(
        inspect.signature(family.config_class.__init__).parameters)
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ValueError(f"--config_overrides: {unknown} are not fields of {family.config_class.__name__} (a config "
                         "keeps unknown keys unused); check the spelling")
    model_class = family.model_class if settings is None else family.cal_model_class
    labels = {"num_labels": len(id2label), "id2label": dict(id2label),
              "label2id": {name: index for index, name in id2label.items()}}
    extra = {**config_overrides, **(settings or {})}
    if model_name_or_path:
        return model_class.from_pretrained(model_name_or_path, ignore_mismatched_sizes=True, **labels, **extra)
    if preset not in family.presets:
        raise ValueError(f"model preset must be one of {sorted(family.presets)}, got {preset!r}")
    kwargs = {k: (v() if callable(v) else v) for k, v in family.presets[preset].items()}
    config_class = family.config_class if settings is None else family.cal_config_class
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
