import pytest
import torch

from hf_caldetr.configuration import calibration_is_on

from hf_caldetr.training import (
    METHODS,
    build_model,
    freeze_batch_norm,
    method_settings,
    parse_config_overrides,
    unfreeze_batch_norm,
)

LABELS = {0: "a", 1: "b", 2: "c"}


def test_config_overrides_are_typed():
    assert parse_config_overrides("d_model=128, with_box_refine=true,dropout=0.0,activation_function=gelu") == {
        "d_model": 128, "with_box_refine": True, "dropout": 0.0, "activation_function": "gelu"}
    assert parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("d_model")


def test_methods():
    # The baseline is the Cal class with the method off (the stock loss, tests/test_families.py), so it shares
    # every other training choice with the Cal arms.
    assert method_settings("baseline") == {"uncertainty_modulation": "none", "use_logit_mixing": False}
    assert method_settings("baseline", num_boxes_normalization="transformers")["num_boxes_normalization"] == (
        "transformers")
    assert method_settings("released") == {"uncertainty_modulation": "subtractive", "use_logit_mixing": False}
    assert method_settings("cal-detr", logit_mixing_alpha=0.8, use_logit_mixing=None)["logit_mixing_alpha"] == 0.8
    with pytest.raises(ValueError, match="method must be one of"):
        method_settings("magic")
    with pytest.raises(ValueError, match="takes no Cal settings"):
        method_settings("baseline", logit_mixing_alpha=0.8)
    for method in METHODS:
        model = build_model(method, LABELS, preset="tiny")
        assert model.config.num_labels == 3
        assert type(model).__name__ == "CalDeformableDetrForObjectDetection"
        assert calibration_is_on(model.config) == (method != "baseline")


def test_trainable_batch_norm_round_trip_keeps_inference():
    torch.manual_seed(0)
    model = build_model("cal-detr", LABELS, preset="tiny")
    pixel_values = torch.randn(2, 3, 64, 64)
    count = unfreeze_batch_norm(model)
    assert count > 0
    model.train()
    model(pixel_values=pixel_values)  # a training forward updates the running statistics
    model.eval()
    with torch.no_grad():
        trained = model(pixel_values=pixel_values).logits
    assert freeze_batch_norm(model) == count
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        frozen = model(pixel_values=pixel_values).logits
    assert torch.allclose(trained, frozen, atol=1e-5)
    running_means = [m.running_mean for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d")]
    assert any(not torch.equal(mean, torch.zeros_like(mean)) for mean in running_means)


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("cal-detr", {"logit_mixing_alfa": 0.7}, r"\['logit_mixing_alfa'\] are not fields of DeformableDetrConfig"),
    ("baseline", {"logit_mixing_alpha": 0.7}, "takes no Cal settings"),
    # --config_overrides modulate_at_inference=no: parsed as the string "no", which counted as true before
    ("cal-detr", parse_config_overrides("modulate_at_inference=no"), "modulate_at_inference must be True or False"),
    ("cal-detr", parse_config_overrides("logit_mixing_loss_coefficient=nan"), "must be a finite number"),
])
def test_config_overrides_are_checked(method, overrides, message):
    from hf_caldetr.training import build_model

    with pytest.raises(ValueError, match=message):
        build_model(method, {0: "a", 1: "b"}, preset="tiny", config_overrides=overrides)


def test_a_cal_field_in_config_overrides_is_applied():
    """Before, the method's own settings silently replaced it."""
    from hf_caldetr.training import build_model

    model = build_model("cal-detr", {0: "a", 1: "b"}, preset="tiny",
                        config_overrides={"logit_mixing_alpha": 0.7, "d_model": 64})
    assert model.config.logit_mixing_alpha == 0.7 and model.config.d_model == 64
    with pytest.raises(ValueError, match="given twice"):
        build_model("cal-detr", {0: "a", 1: "b"}, preset="tiny", config_overrides={"logit_mixing_alpha": 0.7},
                    logit_mixing_alpha=0.8)
