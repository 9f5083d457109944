"""CalDeformableDetrForObjectDetection: outputs, loss against independent computations, checkpoints."""


import pytest
import torch
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss

from hf_caldetr import CalDeformableDetrConfig, CalDeformableDetrForObjectDetection
from tiny import tiny_batch, tiny_deformable_kwargs

VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "auxiliary_loss": {"auxiliary_loss": True},
}


def make_model(cal=True, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = tiny_deformable_kwargs(**overrides)
    if cal:
        return CalDeformableDetrForObjectDetection(CalDeformableDetrConfig(**kwargs))
    cal_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in CalDeformableDetrConfig.__dataclass_fields__
                  and k not in DeformableDetrConfig.__dataclass_fields__}
    assert not cal_fields
    return DeformableDetrForObjectDetection(DeformableDetrConfig(**kwargs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_shapes_and_modulation(variant):
    model = make_model(**VARIANTS[variant])
    pixel_values, labels = tiny_batch()
    model.train()
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.intermediate_logits.shape == (2, 3, 12, 5)
    assert out.logit_uncertainty.shape == (2, 12, 5)
    assert torch.allclose(out.logit_uncertainty, out.intermediate_logits.var(dim=1))
    raw = out.intermediate_logits[:, -1]
    assert torch.allclose(out.logits, raw * (1 - torch.tanh(out.logit_uncertainty)))
    assert set(out.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_logit_mixing"}
    if VARIANTS[variant].get("auxiliary_loss"):
        assert "loss_ce_0" in out.loss_dict and "loss_logit_mixing_0" not in out.loss_dict
    # At inference the model is an ordinary detector: raw final logits.
    model.eval()
    with torch.no_grad():
        out_eval = model(pixel_values=pixel_values)
    assert torch.allclose(out_eval.logits, out_eval.intermediate_logits[:, -1])


def test_modulate_at_inference_and_subtractive_mode():
    model = make_model(uncertainty_modulation="subtractive", modulate_at_inference=True).eval()
    pixel_values, _ = tiny_batch()
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    assert torch.allclose(out.logits, out.intermediate_logits[:, -1] - torch.tanh(out.logit_uncertainty))


def test_mixing_loss_equals_an_independent_computation():
    model = make_model(num_labels=4).train()
    pixel_values, labels = tiny_batch(num_labels=4, boxes_per_image=(3, 2))
    labels[1]["class_labels"] = labels[0]["class_labels"][:2].clone()  # repeated classes across images
    out = model(pixel_values=pixel_values, labels=labels)
    logits = out.logits.detach()
    cfg = model.config
    matcher = DeformableDetrHungarianMatcher(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)
    indices = matcher({"logits": logits, "pred_boxes": out.pred_boxes.detach()}, labels)
    positives = [(b, int(q), int(labels[b]["class_labels"][t])) for b, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts)]
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
    num_boxes = sum(len(t["class_labels"]) for t in labels)
    expected = sigmoid_focal_loss(mixed, targets, num_boxes, alpha=0.25, gamma=2) * logits.shape[1]
    assert torch.allclose(out.loss_dict["loss_logit_mixing"], expected, rtol=1e-5)
    # The total adds it with its coefficient 0.5.
    weighted = out.loss_dict["loss_ce"] + 5 * out.loss_dict["loss_bbox"] + 2 * out.loss_dict["loss_giou"]
    assert torch.allclose(out.loss, weighted + 0.5 * expected, rtol=1e-5)


@pytest.mark.parametrize("boxes_per_image", [(0, 0), (3, 0)])
def test_images_without_boxes(boxes_per_image):
    model = make_model().train()
    pixel_values, labels = tiny_batch(boxes_per_image=boxes_per_image)
    out = model(pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if sum(boxes_per_image) == 0:
        assert out.loss_dict["loss_logit_mixing"].item() == 0.0
    else:
        assert out.loss_dict["loss_logit_mixing"].item() > 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_calibration_the_loss_is_the_stock_loss(variant):
    """With modulation and mixing off, the Cal model is transformers' model: the plain model is the oracle."""
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


def test_variance_term_back_propagates_into_earlier_layers():
    """Untied heads and no auxiliary loss: layer 0's class head reaches the loss only through the variance."""
    grads = {}
    for mode in ("multiplicative", "none"):
        model = make_model(tie_word_embeddings=False, uncertainty_modulation=mode, use_logit_mixing=False).train()
        assert model.class_embed[0].weight.data_ptr() != model.class_embed[2].weight.data_ptr()
        pixel_values, labels = tiny_batch()
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        grad = model.class_embed[0].weight.grad
        grads[mode] = 0.0 if grad is None else grad.abs().sum().item()
    assert grads["multiplicative"] > 0
    assert grads["none"] == 0.0
