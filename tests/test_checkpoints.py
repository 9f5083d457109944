"""Save/load round trips, the same for every Cal model: a Cal checkpoint is a stock checkpoint, keeps its Cal
settings for the Cal class, and a plain checkpoint (also with a new label set) loads into the Cal class."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import (
    AutoModelForObjectDetection,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    RTDetrConfig,
    RTDetrForObjectDetection,
)

from hf_caldetr import (
    CalDeformableDetrConfig,
    CalDeformableDetrForObjectDetection,
    CalDetrConfig,
    CalDetrForObjectDetection,
    CalRTDetrConfig,
    CalRTDetrForObjectDetection,
)
from tiny import tiny_batch, tiny_deformable_kwargs, tiny_detr_kwargs, tiny_rt_detr_kwargs


@dataclass(frozen=True)
class Family:
    model_type: str
    kwargs: Callable[..., dict]
    config: type
    model: type
    cal_config: type
    cal_model: type
    variants: dict
    classifier: Callable  # model -> the final classification layer
    no_object_column: int  # 1 for a softmax head with a no-object class, else 0


FAMILIES = {
    "deformable_detr": Family(
        "deformable_detr", tiny_deformable_kwargs, DeformableDetrConfig, DeformableDetrForObjectDetection,
        CalDeformableDetrConfig, CalDeformableDetrForObjectDetection,
        {"plain": {}, "box_refine": {"with_box_refine": True},
         "two_stage": {"with_box_refine": True, "two_stage": True}, "auxiliary_loss": {"auxiliary_loss": True}},
        lambda model: model.class_embed[0], 0),
    "detr": Family(
        "detr", tiny_detr_kwargs, DetrConfig, DetrForObjectDetection, CalDetrConfig, CalDetrForObjectDetection,
        {"plain": {}, "auxiliary_loss": {"auxiliary_loss": True}}, lambda model: model.class_labels_classifier, 1),
    "rt_detr": Family(
        "rt_detr", tiny_rt_detr_kwargs, RTDetrConfig, RTDetrForObjectDetection, CalRTDetrConfig,
        CalRTDetrForObjectDetection, {"auxiliary_loss": {}, "no_auxiliary_loss": {"auxiliary_loss": False}},
        lambda model: model.model.decoder.class_embed[0], 0),
}
VARIANT_CASES = [(name, variant) for name, family in FAMILIES.items() for variant in family.variants]


def make_model(family: Family, cal=True, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = family.kwargs(**overrides)
    return family.cal_model(family.cal_config(**kwargs)) if cal else family.model(family.config(**kwargs))


def forward(model, pixel_values, labels=None):
    """A forward with a fixed seed: RT-DETR's denoising group draws random label flips and box noise."""
    torch.manual_seed(1)
    return model(pixel_values=pixel_values, labels=labels)


@pytest.mark.parametrize("name, variant", VARIANT_CASES)
def test_cal_checkpoint_is_a_stock_checkpoint(tmp_path, name, variant):
    family = FAMILIES[name]
    model = make_model(family, **family.variants[variant]).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family.model_type
    assert config["architectures"] == [family.model.__name__]
    assert "auto_map" not in config
    assert config["uncertainty_modulation"] == "multiplicative"
    stock = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert type(stock) is family.model
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        a, b = model(pixel_values=pixel_values), stock(pixel_values=pixel_values)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.pred_boxes, b.pred_boxes)


@pytest.mark.parametrize("name", FAMILIES)
def test_cal_checkpoint_keeps_cal_settings(tmp_path, name):
    family = FAMILIES[name]
    settings = dict(uncertainty_modulation="subtractive", modulate_at_inference=True, use_logit_mixing=False,
                    logit_mixing_alpha=0.8, logit_mixing_loss_coefficient=1.0)
    make_model(family, **settings).save_pretrained(tmp_path)
    loaded = family.cal_model.from_pretrained(tmp_path).eval()
    assert type(loaded.config) is family.cal_config
    for setting, value in settings.items():
        assert getattr(loaded.config, setting) == value
    # The loaded settings act: logits modulated at inference, the subtractive way.
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        out = loaded(pixel_values=pixel_values)
    assert torch.allclose(out.logits, out.intermediate_logits[:, -1] - torch.tanh(out.logit_uncertainty))


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_checkpoint_loads_into_cal(tmp_path, name):
    family = FAMILIES[name]
    plain = make_model(family, cal=False).eval()
    plain.save_pretrained(tmp_path)
    cal = family.cal_model.from_pretrained(tmp_path).eval()
    assert cal.config.uncertainty_modulation == "multiplicative" and cal.config.use_logit_mixing
    assert cal.config.logit_mixing_alpha == 0.9 and cal.config.logit_mixing_loss_coefficient == 0.5
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        assert torch.equal(cal(pixel_values=pixel_values).logits, plain(pixel_values=pixel_values).logits)
    # Fine-tuning on a new label set.
    relabelled = family.cal_model.from_pretrained(
        tmp_path, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
        ignore_mismatched_sizes=True,
    ).train()
    columns = 3 + family.no_object_column
    assert family.classifier(relabelled).weight.shape == (columns, 32)
    _, labels = tiny_batch(num_labels=3)
    out = forward(relabelled, pixel_values, labels)
    assert out.logit_uncertainty.shape == (2, 12, columns) and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", FAMILIES)
def test_invalid_settings_passed_to_from_pretrained(tmp_path, name):
    family = FAMILIES[name]
    make_model(family, cal=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="uncertainty_modulation"):
        family.cal_model.from_pretrained(tmp_path, uncertainty_modulation="bad")
    loaded = family.cal_model.from_pretrained(tmp_path, logit_mixing_alpha=0.8)
    assert loaded.config.logit_mixing_alpha == 0.8
