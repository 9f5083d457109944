"""CalDetrForObjectDetection (softmax heads with a no-object column): outputs, the soft-target mixing loss by hand
and against an independent computation, the plain model as oracle, checkpoints."""

import math

import pytest
import torch
from transformers import DetrConfig, DetrForObjectDetection
from transformers.loss.loss_for_object_detection import HungarianMatcher, ImageLoss

from hf_caldetr.configuration import CalDetrConfig
from hf_caldetr.models import CalDetrForObjectDetection, CalDetrImageLoss
from tiny import tiny_batch, tiny_detr_kwargs

VARIANTS = {"plain": {}, "auxiliary_loss": {"auxiliary_loss": True}}


def make_model(cal=True, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = tiny_detr_kwargs(**overrides)
    if cal:
        return CalDetrForObjectDetection(CalDetrConfig(**kwargs))
    return DetrForObjectDetection(DetrConfig(**kwargs))


def test_config_defaults_and_validation():
    config = CalDetrConfig(**tiny_detr_kwargs())
    assert config.model_type == "detr"
    assert (config.uncertainty_modulation, config.modulate_at_inference, config.use_logit_mixing) == (
        "multiplicative", False, True)
    assert (config.logit_mixing_alpha, config.logit_mixing_loss_coefficient) == (0.9, 0.5)
    for overrides, field in [({"uncertainty_modulation": "divide"}, "uncertainty_modulation"),
                             ({"logit_mixing_alpha": 0.0}, "logit_mixing_alpha"),
                             ({"logit_mixing_loss_coefficient": -1.0}, "logit_mixing_loss_coefficient"),
                             ({"decoder_layers": 1}, "decoder_layers")]:
        with pytest.raises(ValueError, match=field):
            CalDetrConfig(**tiny_detr_kwargs(**overrides))
    assert CalDetrConfig(**tiny_detr_kwargs(decoder_layers=1, uncertainty_modulation="none")).decoder_layers == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_shapes_and_modulation(variant):
    model = make_model(**VARIANTS[variant]).train()
    pixel_values, labels = tiny_batch()
    out = model(pixel_values=pixel_values, labels=labels)
    # Every layer's logits whatever auxiliary_loss says, no-object column included.
    assert out.intermediate_logits.shape == (2, 3, 12, 6)
    assert out.logit_uncertainty.shape == (2, 12, 6)
    assert torch.allclose(out.logit_uncertainty, out.intermediate_logits.var(dim=1))
    raw = out.intermediate_logits[:, -1]
    assert torch.allclose(out.logits, raw * (1 - torch.tanh(out.logit_uncertainty)))
    assert set(out.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_logit_mixing"}
    if VARIANTS[variant]:
        assert "loss_ce_1" in out.loss_dict and "loss_logit_mixing_0" not in out.loss_dict
    model.eval()
    with torch.no_grad():
        out_eval = model(pixel_values=pixel_values)
    assert torch.allclose(out_eval.logits, out_eval.intermediate_logits[:, -1])
    # The per-layer hidden states are requested internally, not handed to a caller who did not ask.
    assert out_eval.decoder_hidden_states is None and out_eval.encoder_hidden_states is None


def test_intermediate_logits_are_the_stock_auxiliary_logits():
    """With auxiliary_loss the plain model computes the intermediate logits itself: the oracle for layers < L."""
    cal = make_model(auxiliary_loss=True).train()
    plain = make_model(cal=False, auxiliary_loss=True).train()
    plain.load_state_dict(cal.state_dict())
    pixel_values, labels = tiny_batch()
    out_cal = cal(pixel_values=pixel_values, labels=labels)
    out_plain = plain(pixel_values=pixel_values, labels=labels)
    for layer, auxiliary in enumerate(out_plain.auxiliary_outputs):
        assert torch.allclose(out_cal.intermediate_logits[:, layer], auxiliary["logits"], atol=1e-6)
        assert torch.allclose(out_cal.auxiliary_outputs[layer]["pred_boxes"], auxiliary["pred_boxes"], atol=1e-6)


def test_hidden_states_when_asked_are_the_stock_ones():
    cal, plain = make_model().eval(), make_model(cal=False).eval()
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        a = cal(pixel_values=pixel_values, output_hidden_states=True)
        b = plain(pixel_values=pixel_values, output_hidden_states=True)
    assert len(a.decoder_hidden_states) == len(b.decoder_hidden_states) == 4
    for x, y in zip(a.decoder_hidden_states, b.decoder_hidden_states):
        assert torch.equal(x, y)


def test_modulate_at_inference_and_subtractive_mode():
    model = make_model(uncertainty_modulation="subtractive", modulate_at_inference=True).eval()
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    assert torch.allclose(out.logits, out.intermediate_logits[:, -1] - torch.tanh(out.logit_uncertainty))


def _criterion():
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    return CalDetrImageLoss(matcher, num_classes=2, eos_coef=0.1, losses=["logit_mixing"], logit_mixing_alpha=0.9)


def _two_positives(first, second):
    """Two images, two queries each, 2 labels + no-object; query 1 of image 0 is class 0, query 0 of image 1
    class 1; the other two queries are unmatched and carry extreme logits that must not matter."""
    logits = torch.tensor([[[5.0, -3.0, 7.0], first], [second, [9.0, 9.0, 9.0]]])
    targets = [{"class_labels": torch.tensor([0])}, {"class_labels": torch.tensor([1])}]
    indices = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0]), torch.tensor([0]))]
    return logits, targets, indices


def test_softmax_mixing_loss_by_hand_identical_positives():
    # Both positives [ln 2, 0, 0]: the prototype is the same vector, mixing changes nothing, softmax [1/2, 1/4, 1/4].
    # Targets (alpha 0.9, P = 2): [0.9, 0.1, 0] and [0.1, 0.9, 0]; no-object target 0 but in the softmax.
    # CE = -(0.9 ln 1/2 + 0.1 ln 1/4) = 1.1 ln 2 and -(0.1 ln 1/2 + 0.9 ln 1/4) = 1.9 ln 2; over 2 boxes: 1.5 ln 2.
    logits, targets, indices = _two_positives([math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0])
    loss = _criterion().loss_logit_mixing({"logits": logits}, targets, indices, num_boxes=2)["loss_logit_mixing"]
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_softmax_mixing_loss_by_hand_distinct_positives():
    # z1 = [2, 0, 1] (class 0), z2 = [0, 1, 0] (class 1); prototype [1, 0.5, 0.5];
    # mixed: 0.9 z + 0.1 prototype = [1.9, 0.05, 0.95] and [0.1, 0.95, 0.05].
    # With targets summing to 1, CE_i = logsumexp(mixed_i) - t_i . mixed_i:
    ce1 = math.log(math.exp(1.9) + math.exp(0.05) + math.exp(0.95)) - (0.9 * 1.9 + 0.1 * 0.05)
    ce2 = math.log(math.exp(0.1) + math.exp(0.95) + math.exp(0.05)) - (0.1 * 0.1 + 0.9 * 0.95)
    expected = (ce1 + ce2) / 2  # = 0.65542...
    logits, targets, indices = _two_positives([2.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    loss = _criterion().loss_logit_mixing({"logits": logits}, targets, indices, num_boxes=2)["loss_logit_mixing"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.65542, abs=1e-5)
    # One positive: mixing is the identity and the target the one-hot: plain cross-entropy, over num_boxes.
    one = _criterion().loss_logit_mixing(
        {"logits": logits}, targets[:1] + [{"class_labels": torch.tensor([], dtype=torch.long)}],
        [indices[0], (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))], num_boxes=1,
    )["loss_logit_mixing"]
    assert one.item() == pytest.approx(math.log(math.exp(2) + 1 + math.exp(1)) - 2, rel=1e-6)


def test_mixing_loss_equals_an_independent_computation():
    model = make_model(num_labels=4).train()
    pixel_values, labels = tiny_batch(num_labels=4, boxes_per_image=(3, 2))
    labels[1]["class_labels"] = labels[0]["class_labels"][:2].clone()  # repeated classes across images
    out = model(pixel_values=pixel_values, labels=labels)
    logits = out.logits.detach()
    assert logits.shape[-1] == 5  # 4 labels + no-object
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)  # DetrConfig's defaults
    indices = matcher({"logits": logits, "pred_boxes": out.pred_boxes.detach()}, labels)
    positives = [(b, int(q), int(labels[b]["class_labels"][t]))
                 for b, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts)]
    count = len(positives)
    prototype = sum(logits[b, q] for b, q, _ in positives) / count
    expected = 0.0
    for i, (b, q, c) in enumerate(positives):
        target = torch.zeros(5)
        target[c] += 0.9
        for j, (_, _, c_other) in enumerate(positives):
            if j != i:
                target[c_other] += 0.1 / (count - 1)
        mixed = 0.9 * logits[b, q] + 0.1 * prototype
        expected -= (target * torch.log_softmax(mixed, dim=-1)).sum()
    expected /= 5  # boxes
    assert torch.allclose(out.loss_dict["loss_logit_mixing"], expected, rtol=1e-5)
    weighted = out.loss_dict["loss_ce"] + 5 * out.loss_dict["loss_bbox"] + 2 * out.loss_dict["loss_giou"]
    assert torch.allclose(out.loss, weighted + 0.5 * expected, rtol=1e-5)


@pytest.mark.parametrize("boxes_per_image", [(0, 0), (3, 0)])
def test_images_without_boxes(boxes_per_image):
    model = make_model().train()
    pixel_values, labels = tiny_batch(boxes_per_image=boxes_per_image)
    out = model(pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.loss_dict["loss_logit_mixing"].item() > 0) == (sum(boxes_per_image) > 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_calibration_the_loss_is_the_stock_loss(variant):
    cal = make_model(uncertainty_modulation="none", use_logit_mixing=False, **VARIANTS[variant]).train()
    plain = make_model(cal=False, **VARIANTS[variant]).train()
    plain.load_state_dict(cal.state_dict())
    pixel_values, labels = tiny_batch()
    out_cal = cal(pixel_values=pixel_values, labels=labels)
    out_plain = plain(pixel_values=pixel_values, labels=labels)
    assert torch.allclose(out_cal.logits, out_plain.logits, atol=1e-6)
    assert torch.allclose(out_cal.pred_boxes, out_plain.pred_boxes, atol=1e-6)
    assert torch.allclose(out_cal.loss, out_plain.loss, atol=1e-5)
    assert out_cal.loss_dict.keys() == out_plain.loss_dict.keys()
    for key, value in out_plain.loss_dict.items():
        assert torch.allclose(out_cal.loss_dict[key], value, atol=1e-5), key


def test_variance_term_back_propagates_into_earlier_layers():
    """No auxiliary loss, no mixing: the earlier layers' logits reach the loss only through the variance."""
    grads = {}
    for mode in ("multiplicative", "none"):
        model = make_model(uncertainty_modulation=mode, use_logit_mixing=False).train()
        pixel_values, labels = tiny_batch()
        out = model(pixel_values=pixel_values, labels=labels)
        out.intermediate_logits.retain_grad()
        out.loss.backward()
        grads[mode] = out.intermediate_logits.grad
    assert grads["multiplicative"][:, :-1].abs().sum() > 0
    assert torch.count_nonzero(grads["none"][:, :-1]) == 0
    assert grads["none"][:, -1].abs().sum() > 0


def test_criterion_is_the_stock_one_apart_from_mixing():
    """`CalDetrImageLoss` without the mixing loss gives transformers' `ImageLoss` numbers (one process)."""
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 12, 6), torch.rand(2, 12, 4) * 0.5 + 0.25
    _, labels = tiny_batch()
    outputs = {"logits": logits, "pred_boxes": boxes}
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    losses = ["labels", "boxes", "cardinality"]
    ours = CalDetrImageLoss(matcher, 5, 0.1, losses)(outputs, labels)
    stock = ImageLoss(matcher, 5, 0.1, losses)(outputs, labels)
    assert ours.keys() == stock.keys()
    for key in stock:
        assert torch.allclose(ours[key], stock[key]), key
