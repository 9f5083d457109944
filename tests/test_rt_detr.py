"""CalRTDetrForObjectDetection (sigmoid heads, varifocal loss, contrastive denoising): the denoising queries are
left out of uncertainty, modulation and mixing; the plain model as oracle; checkpoints."""


import pytest
import torch
from transformers import RTDetrConfig, RTDetrForObjectDetection
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

from hf_caldetr.configuration import CalRTDetrConfig
from hf_caldetr.models import CalRTDetrForObjectDetection
from tiny import tiny_batch, tiny_rt_detr_kwargs

VARIANTS = {"auxiliary_loss": {}, "no_auxiliary_loss": {"auxiliary_loss": False}}


def make_model(cal=True, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = tiny_rt_detr_kwargs(**overrides)
    if cal:
        return CalRTDetrForObjectDetection(CalRTDetrConfig(**kwargs))
    return RTDetrForObjectDetection(RTDetrConfig(**kwargs))


def run(model, pixel_values, labels=None, seed=1):
    """A forward with a fixed seed: the denoising group's label flips and box noise are random."""
    torch.manual_seed(seed)
    return model(pixel_values=pixel_values, labels=labels)


def num_denoising_queries(out):
    return out.denoising_meta_values["dn_num_split"][0]


def test_config_defaults_and_validation():
    config = CalRTDetrConfig(**tiny_rt_detr_kwargs())
    assert config.model_type == "rt_detr"
    assert (config.uncertainty_modulation, config.modulate_at_inference, config.use_logit_mixing) == (
        "multiplicative", False, True)
    assert (config.logit_mixing_alpha, config.logit_mixing_loss_coefficient) == (0.9, 0.5)
    for overrides, field in [({"uncertainty_modulation": "divide"}, "uncertainty_modulation"),
                             ({"logit_mixing_alpha": 1.5}, "logit_mixing_alpha"),
                             ({"logit_mixing_loss_coefficient": -1.0}, "logit_mixing_loss_coefficient"),
                             ({"decoder_layers": 1}, "decoder_layers")]:
        with pytest.raises(ValueError, match=field):
            CalRTDetrConfig(**tiny_rt_detr_kwargs(**overrides))


def test_outputs_shapes_and_modulation_of_the_matching_queries_only():
    model = make_model().train()
    pixel_values, labels = tiny_batch()  # 3 and 2 boxes: 10 // 3 = 3 groups of 2 * 3 queries
    out = run(model, pixel_values, labels)
    dn = num_denoising_queries(out)
    assert dn == 18
    assert out.intermediate_logits.shape == (2, 3, dn + 12, 5)
    assert out.logit_uncertainty.shape == (2, 12, 5)  # the matching queries' count
    matching = out.intermediate_logits[:, :, dn:]
    assert torch.allclose(out.logit_uncertainty, matching.var(dim=1))
    assert out.logits.shape == (2, dn + 12, 5)
    assert torch.equal(out.logits[:, :dn], out.intermediate_logits[:, -1, :dn])  # denoising: raw
    assert torch.allclose(out.logits[:, dn:], matching[:, -1] * (1 - torch.tanh(out.logit_uncertainty)))
    assert {"loss_vfl", "loss_logit_mixing", "loss_vfl_dn_0", "loss_vfl_aux_0"} <= set(out.loss_dict)
    assert not any(k.startswith("loss_logit_mixing_") for k in out.loss_dict)
    model.eval()
    with torch.no_grad():
        out_eval = model(pixel_values=pixel_values, labels=labels)
    assert out_eval.denoising_meta_values is None
    assert out_eval.logit_uncertainty.shape == (2, 12, 5)
    assert torch.allclose(out_eval.logits, out_eval.intermediate_logits[:, -1])


def test_denoising_queries_are_excluded():
    """The matching queries cannot attend to the denoising group, so a run without denoising queries gives the same
    matching logits: uncertainty, modulated logits and mixing loss must be the same with and without them."""
    with_dn = make_model().train()
    without_dn = make_model(num_denoising=0).train()
    missing, unexpected = without_dn.load_state_dict(with_dn.state_dict(), strict=False)
    assert not missing and unexpected == ["model.denoising_class_embed.weight"]
    pixel_values, labels = tiny_batch()
    a, b = run(with_dn, pixel_values, labels), run(without_dn, pixel_values, labels)
    dn = num_denoising_queries(a)
    assert b.denoising_meta_values is None and b.intermediate_logits.shape[2] == 12
    assert torch.allclose(a.logit_uncertainty, b.logit_uncertainty, atol=1e-6)
    assert torch.allclose(a.logits[:, dn:], b.logits, atol=1e-6)
    assert torch.allclose(a.loss_dict["loss_logit_mixing"], b.loss_dict["loss_logit_mixing"], atol=1e-6)
    assert torch.allclose(a.loss_dict["loss_vfl"], b.loss_dict["loss_vfl"], atol=1e-6)
    # No gradient of the mixing loss reaches any denoising logit; the matching ones get one.
    a.intermediate_logits.retain_grad()
    a.loss_dict["loss_logit_mixing"].backward()
    grad = a.intermediate_logits.grad
    assert torch.count_nonzero(grad[:, :, :dn]) == 0
    assert grad[:, -1, dn:].abs().sum() > 0 and grad[:, :-1, dn:].abs().sum() > 0  # the latter via the variance


def test_mixing_loss_equals_an_independent_computation():
    model = make_model(num_labels=4).train()
    pixel_values, labels = tiny_batch(num_labels=4, boxes_per_image=(3, 2))
    labels[1]["class_labels"] = labels[0]["class_labels"][:2].clone()  # repeated classes across images
    out = run(model, pixel_values, labels)
    dn = num_denoising_queries(out)
    logits, boxes = out.logits[:, dn:].detach(), out.pred_boxes[:, dn:].detach()
    indices = RTDetrHungarianMatcher(model.config)({"logits": logits, "pred_boxes": boxes}, labels)
    positives = [(b, int(q), int(labels[b]["class_labels"][t]))
                 for b, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts)]
    count = len(positives)
    prototype = sum(logits[b, q] for b, q, _ in positives) / count
    mixed = logits.clone()
    targets = torch.zeros_like(logits)
    for i, (b, q, c) in enumerate(positives):
        mixed[b, q] = 0.9 * logits[b, q] + 0.1 * prototype
        targets[b, q, c] += 0.9
        for j, (_, _, c_other) in enumerate(positives):
            if j != i:
                targets[b, q, c_other] += 0.1 / (count - 1)
    # Focal alpha 1 - focal_loss_alpha = 0.25, gamma 2; summed over entries, over the 5 boxes.
    expected = sigmoid_focal_loss(mixed, targets, 5, alpha=0.25, gamma=2) * 12
    assert torch.allclose(out.loss_dict["loss_logit_mixing"], expected, rtol=1e-5)
    others = sum(v for k, v in out.loss_dict.items() if k != "loss_logit_mixing")
    assert torch.allclose(out.loss, others + 0.5 * expected, rtol=1e-5)


def test_negatives_are_weighted_as_in_the_varifocal_loss():
    """Far from any positive the mixing loss is the varifocal loss's negative term: 0.75 * p**2 * BCE(z, 0)."""
    from hf_caldetr.models.criterion import sigmoid_logit_mixing_loss

    logits = torch.tensor([[[1.5, -0.5], [0.0, 2.0]]])  # query 0 matched to class 1, query 1 a negative
    targets = [{"class_labels": torch.tensor([1])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    full = sigmoid_logit_mixing_loss(logits, targets, indices, 1, alpha=0.9, focal_alpha=0.25, focal_gamma=2.0)
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # One positive: mixing is the identity and its target the one-hot [0, 1].
    positive = 0.75 * p[0, 0, 0] ** 2 * bce(logits[0, 0, 0], torch.tensor(0.0)) + 0.25 * (1 - p[0, 0, 1]) ** 2 * bce(
        logits[0, 0, 1], torch.tensor(1.0))
    negative = sum(0.75 * p[0, 1, c] ** 2 * bce(logits[0, 1, c], torch.tensor(0.0)) for c in range(2))
    assert torch.allclose(full, positive + negative, rtol=1e-6)


@pytest.mark.parametrize("boxes_per_image", [(0, 0), (3, 0)])
def test_images_without_boxes(boxes_per_image):
    model = make_model().train()
    pixel_values, labels = tiny_batch(boxes_per_image=boxes_per_image)
    out = run(model, pixel_values, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.loss_dict["loss_logit_mixing"].item() > 0) == (sum(boxes_per_image) > 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_calibration_the_loss_is_the_stock_loss(variant):
    cal = make_model(uncertainty_modulation="none", use_logit_mixing=False, **VARIANTS[variant]).train()
    plain = make_model(cal=False, **VARIANTS[variant]).train()
    plain.load_state_dict(cal.state_dict())
    pixel_values, labels = tiny_batch()
    out_cal, out_plain = run(cal, pixel_values, labels), run(plain, pixel_values, labels)
    assert torch.allclose(out_cal.logits, out_plain.logits, atol=1e-6)
    assert torch.allclose(out_cal.pred_boxes, out_plain.pred_boxes, atol=1e-6)
    assert out_cal.loss_dict.keys() == out_plain.loss_dict.keys()
    for key, value in out_plain.loss_dict.items():
        assert torch.allclose(out_cal.loss_dict[key], value, atol=1e-5), key
    assert torch.allclose(out_cal.loss, out_plain.loss, atol=1e-5)


def test_variance_term_back_propagates_into_earlier_layers():
    """No auxiliary loss, no mixing: the earlier layers' logits reach the loss only through the variance."""
    grads = {}
    for mode in ("multiplicative", "none"):
        model = make_model(uncertainty_modulation=mode, use_logit_mixing=False, auxiliary_loss=False).train()
        pixel_values, labels = tiny_batch()
        out = run(model, pixel_values, labels)
        dn = num_denoising_queries(out)
        out.intermediate_logits.retain_grad()
        out.loss.backward()
        grads[mode] = out.intermediate_logits.grad[:, :, dn:]
    assert grads["multiplicative"][:, :-1].abs().sum() > 0
    assert torch.count_nonzero(grads["none"][:, :-1]) == 0
