import pytest

from hf_caldetr import CalDeformableDetrConfig
from hf_caldetr.configuration import stock_architecture_name
from tiny import tiny_deformable_kwargs


def test_defaults_are_the_papers():
    config = CalDeformableDetrConfig(**tiny_deformable_kwargs())
    assert config.model_type == "deformable_detr"
    assert config.uncertainty_modulation == "multiplicative"
    assert config.modulate_at_inference is False
    assert config.use_logit_mixing is True
    assert config.logit_mixing_alpha == 0.9
    assert config.logit_mixing_loss_coefficient == 0.5


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"uncertainty_modulation": "divide"}, "uncertainty_modulation"),
        ({"logit_mixing_alpha": 0.0}, "logit_mixing_alpha"),
        ({"logit_mixing_alpha": 1.5}, "logit_mixing_alpha"),
        ({"logit_mixing_loss_coefficient": -0.1}, "logit_mixing_loss_coefficient"),
        ({"decoder_layers": 1}, "decoder_layers"),
        ({"use_logit_mixing": "false"}, "use_logit_mixing must be True or False"),
        ({"modulate_at_inference": "no"}, "modulate_at_inference must be True or False"),
        ({"logit_mixing_alpha": float("nan")}, "logit_mixing_alpha must be a finite number"),
        ({"logit_mixing_loss_coefficient": float("inf")}, "logit_mixing_loss_coefficient must be a finite number"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        CalDeformableDetrConfig(**tiny_deformable_kwargs(**overrides))


def test_edge_values_that_work():
    CalDeformableDetrConfig(**tiny_deformable_kwargs(logit_mixing_alpha=1, logit_mixing_loss_coefficient=0))
    # One decoder layer is fine when nothing needs the variance.
    config = CalDeformableDetrConfig(**tiny_deformable_kwargs(decoder_layers=1, uncertainty_modulation="none"))
    assert config.decoder_layers == 1


def test_stock_architecture_names():
    assert stock_architecture_name("CalDeformableDetrForObjectDetection") == "DeformableDetrForObjectDetection"
    assert stock_architecture_name("DeformableDetrForObjectDetection") == "DeformableDetrForObjectDetection"
    assert stock_architecture_name("CalSomethingUnknown") == "CalSomethingUnknown"


def test_from_pretrained_refuses_a_string_boolean(tmp_path):
    from hf_caldetr import CalDeformableDetrForObjectDetection

    CalDeformableDetrForObjectDetection(CalDeformableDetrConfig(**tiny_deformable_kwargs())).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_logit_mixing must be True or False"):
        CalDeformableDetrForObjectDetection.from_pretrained(tmp_path, use_logit_mixing="false")
