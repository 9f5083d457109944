"""One table, every registered family: the Cal model against the installed stock transformers model.

A row of ``CASES`` per family (``hf_caldetr.families.MODEL_FAMILIES``): the tiny preset's overrides for these tests.
Each test runs for every row:

- with calibration off, loss, loss terms and gradients are the stock model's (the stock model is the oracle);
- the modulation and the mixing loss equal an independent computation (``torch.var``, the family's own matcher,
  prototype and smoothed targets by loops, transformers' focal loss or a hand-written cross-entropy), and the
  total is the stock loss of the modulated logits plus ``0.5 * L_R``;
- outputs outside training are the stock ones (modulation is training-only), unless ``modulate_at_inference``;
- checkpoints: a Cal folder loads in the stock class with identical outputs, and a stock folder in the Cal class;
- every layer's logits through ``hf_caldetr.decoder_layer_logits``, their last layer the returned logits;
- images without boxes train; the variance term back-propagates into the earlier layers' heads.

Two processes against one: tests/test_distributed_models.py, over the same table.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss

from hf_caldetr.families import MODEL_FAMILIES, decoder_layer_logits, layer_logits_options
from tiny import CASES, NUM_LABELS, make_family_model as make, tiny_batch

CAL_OFF = {"uncertainty_modulation": "none", "use_logit_mixing": False}


def test_every_registered_family_has_a_row():
    assert set(CASES) == set(MODEL_FAMILIES)


def run(model, pixel_values, labels=None, seed=1, **kwargs):
    """A forward with a fixed seed (dropout, denoising noise)."""
    torch.manual_seed(seed)
    return model(pixel_values=pixel_values, labels=labels, **kwargs)


def num_denoising(outputs) -> int:
    meta = getattr(outputs, "denoising_meta_values", None)
    return int(meta["dn_num_split"][0]) if meta is not None else 0


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", CASES)
@pytest.mark.parametrize("boxes_per_image", [(3, 2), (3, 0)])
def test_without_calibration_the_loss_is_the_stock_loss(model_type, boxes_per_image):
    cal, stock = make(model_type, **CAL_OFF).train(), make(model_type, cal=False).train()
    stock.load_state_dict(cal.state_dict())
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS, boxes_per_image=boxes_per_image)
    out_cal, out_stock = run(cal, pixel_values, labels), run(stock, pixel_values, labels)
    assert out_cal.loss_dict.keys() == out_stock.loss_dict.keys()
    for key in out_stock.loss_dict:
        torch.testing.assert_close(out_cal.loss_dict[key], out_stock.loss_dict[key], rtol=0, atol=0)
    torch.testing.assert_close(out_cal.loss, out_stock.loss, rtol=0, atol=0)
    out_cal.loss.backward()
    out_stock.loss.backward()
    stock_grads = grads(stock)
    for name, grad in grads(cal).items():
        torch.testing.assert_close(grad, stock_grads[name], rtol=0, atol=0)


def _independent_mixing_loss(model_type, config, logits, boxes, labels):
    """``L_R`` by loops: the family's matcher on the (modulated) final logits, the prototype and smoothed targets
    of the matched queries, then transformers' sigmoid focal loss (sigmoid heads) or cross-entropy (softmax)."""
    family = MODEL_FAMILIES[model_type]
    groups = 1
    if family.query_groups is None:
        indices = family.matcher(config)({"logits": logits, "pred_boxes": boxes}, labels)
    else:  # group DETR: num_queries x group_detr queries in training, each group matched on its own
        groups = config.group_detr
        assert logits.shape[1] == config.num_queries * groups
        indices = family.matcher(config)({"logits": logits, "pred_boxes": boxes}, labels, groups)
    positives = [(b, int(q), int(labels[b]["class_labels"][t])) for b, (qs, ts) in enumerate(indices)
                 for q, t in zip(qs, ts)]
    count = len(positives)
    prototype = sum(logits[b, q] for b, q, _ in positives) / count
    alpha = config.logit_mixing_alpha
    mixed = logits.clone()
    targets = torch.zeros_like(logits)
    for i, (b, q, c) in enumerate(positives):
        mixed[b, q] = alpha * logits[b, q] + (1 - alpha) * prototype
        targets[b, q, c] += alpha
        for j, (_, _, other) in enumerate(positives):
            if j != i:
                targets[b, q, other] += (1 - alpha) / (count - 1)
    num_boxes = sum(len(t["class_labels"]) for t in labels) * groups
    if family.softmax_head:
        return -sum((targets[b, q] * torch.log_softmax(mixed[b, q], -1)).sum() for b, q, _ in positives) / num_boxes
    focal_alpha, focal_gamma = family.mixing_focal(config)
    return sigmoid_focal_loss(mixed, targets, num_boxes, alpha=focal_alpha, gamma=focal_gamma) * logits.shape[1]


@pytest.mark.parametrize("model_type", CASES)
@pytest.mark.parametrize("mode", ["multiplicative", "subtractive"])
def test_modulation_and_mixing_loss_equal_an_independent_computation(model_type, mode):
    cal = make(model_type, uncertainty_modulation=mode).train()
    stock = make(model_type, cal=False).train()
    stock.load_state_dict(cal.state_dict())
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS, boxes_per_image=(3, 2))
    labels[1]["class_labels"] = labels[0]["class_labels"][:2].clone()  # a class repeated across images
    out_cal = run(cal, pixel_values, labels)

    # The stock model's own forward, its loss function handed the modulated final logits by a spy.
    with torch.no_grad():
        reference = run(stock, pixel_values, labels=labels, **layer_logits_options(stock))
    dn = num_denoising(reference)
    family = MODEL_FAMILIES[model_type]
    if family.layer_logits is None:  # D-FINE, DEIMv2: every layer's logits exist in training only, after "pre"
        layers = reference.intermediate_logits[:, family.pre_layers:, dn:]
    else:
        layers = decoder_layer_logits(stock, reference)[:, :, dn:]  # from the stock outputs, [B, L, Q, C]
    assert layers.shape[1] == cal.config.decoder_layers
    final = layers[:, -1]
    uncertainty = layers.var(dim=1)
    modulated = final * (1 - torch.tanh(uncertainty)) if mode == "multiplicative" else final - torch.tanh(uncertainty)
    stock_loss_function = stock.loss_function

    def spy(logits, *args, **kwargs):
        return stock_loss_function(torch.cat([logits[:, :dn], modulated], dim=1), *args, **kwargs)

    stock.loss_function = spy
    with torch.no_grad():
        expected_stock = run(stock, pixel_values, labels)
    boxes = reference.pred_boxes[:, dn:].clamp(0, 1)
    mixing = _independent_mixing_loss(model_type, cal.config, modulated, boxes, labels)

    torch.testing.assert_close(out_cal.loss_dict["loss_logit_mixing"], mixing, rtol=1e-5, atol=1e-6)
    for key, value in expected_stock.loss_dict.items():
        torch.testing.assert_close(out_cal.loss_dict[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_cal.loss, expected_stock.loss + 0.5 * mixing, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", CASES)
def test_modulation_is_training_only_unless_asked(model_type):
    cal, stock = make(model_type).eval(), make(model_type, cal=False).eval()
    stock.load_state_dict(cal.state_dict())
    pixel_values, _ = tiny_batch(num_labels=NUM_LABELS)
    with torch.no_grad():
        out_cal, out_stock = run(cal, pixel_values), run(stock, pixel_values, **layer_logits_options(stock))
        torch.testing.assert_close(out_cal.logits, out_stock.logits, rtol=0, atol=0)
        torch.testing.assert_close(out_cal.pred_boxes, out_stock.pred_boxes, rtol=0, atol=0)
        cal.config.modulate_at_inference = True
        if MODEL_FAMILIES[model_type].layer_logits is None:  # the final layer only at inference
            with pytest.raises(ValueError, match="modulate_at_inference"):
                run(cal, pixel_values)
            with pytest.raises(ValueError, match="final decoder layer"):
                decoder_layer_logits(stock, out_stock)
            return
        layers = decoder_layer_logits(stock, out_stock)
        torch.testing.assert_close(layers[:, -1], out_stock.logits, rtol=1e-6, atol=1e-6)
        modulated = run(cal, pixel_values)
        expected = out_stock.logits * (1 - torch.tanh(layers.var(dim=1)))
        torch.testing.assert_close(modulated.logits, expected, rtol=1e-5, atol=1e-6)
        as_tuple = run(cal, pixel_values, return_dict=False)
        torch.testing.assert_close(as_tuple[0], modulated.logits if as_tuple[0].shape == expected.shape
                                   else as_tuple[0], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", CASES)
def test_checkpoints_load_both_ways_with_identical_outputs(tmp_path, model_type):
    family = MODEL_FAMILIES[model_type]
    cal = make(model_type, logit_mixing_alpha=0.8).eval()
    cal.save_pretrained(tmp_path / "cal")
    stock = family.model_class.from_pretrained(tmp_path / "cal").eval()
    assert type(stock) is family.model_class
    pixel_values, _ = tiny_batch(num_labels=NUM_LABELS)
    with torch.no_grad():
        torch.testing.assert_close(run(stock, pixel_values).logits, run(cal, pixel_values).logits, rtol=0, atol=0)
    stock.save_pretrained(tmp_path / "stock")
    # The same keys on disk: the Cal class uses the parent's checkpoint key conversions.
    keys = [sorted(safe_open(tmp_path / name / "model.safetensors", "pt").keys()) for name in ("cal", "stock")]
    assert keys[0] == keys[1]
    again = family.cal_model_class.from_pretrained(tmp_path / "stock").eval()
    assert again.config.logit_mixing_alpha == 0.8  # the Cal fields ride along in config.json
    reloaded = family.cal_model_class.from_pretrained(tmp_path / "cal", uncertainty_modulation="subtractive")
    assert reloaded.config.uncertainty_modulation == "subtractive"
    with torch.no_grad():
        torch.testing.assert_close(run(again, pixel_values).logits, run(stock, pixel_values).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logit_mixing_alpha"):
        family.cal_model_class.from_pretrained(tmp_path / "cal", logit_mixing_alpha=2.0)


@pytest.mark.parametrize("model_type", CASES)
@pytest.mark.parametrize("boxes_per_image", [(0, 0), (3, 0)])
def test_images_without_boxes(model_type, boxes_per_image):
    model = make(model_type).train()
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS, boxes_per_image=boxes_per_image)
    out = run(model, pixel_values, labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    if boxes_per_image == (0, 0):
        assert out.loss_dict["loss_logit_mixing"] == 0


@pytest.mark.parametrize("model_type", CASES)
def test_variance_term_back_propagates_into_earlier_layers(model_type):
    """Modulation only (no mixing): the final-layer loss reaches an earlier layer's class head only through
    ``Var_l(Z)``; without modulation that head gets no gradient from the final layer at all."""
    family = MODEL_FAMILIES[model_type]
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS)
    gradients = {}
    for mode in ("multiplicative", "none"):
        model = make(model_type, uncertainty_modulation=mode, use_logit_mixing=False, auxiliary_loss=False).train()
        out = run(model, pixel_values, labels)
        out.loss.backward()
        heads = family.layer_class_heads(model)
        if heads[0] is heads[-1]:  # one classifier for every layer (DETR): compare the whole head's gradient
            gradients[mode] = heads[0].weight.grad.clone()
        else:
            gradients[mode] = heads[0].weight.grad
    if gradients["none"] is None:
        assert gradients["multiplicative"] is not None and gradients["multiplicative"].abs().sum() > 0
    else:
        assert not torch.allclose(gradients["multiplicative"], gradients["none"])


@pytest.mark.parametrize("model_type", CASES)
def test_mixing_loss_takes_the_parents_own_final_matches(model_type, monkeypatch):
    """The mixing loss reuses the matches the parent's loss computed for the final layer (no second Hungarian
    matching), and they are exactly what running the family's matcher again gives."""
    from hf_caldetr.models import calibrated

    seen = []
    original = calibrated.logit_mixing_loss

    def spy(family_, config, logits, pred_boxes, targets, num_boxes, indices=None):
        seen.append(indices)
        extra = calibrated._matcher_extra(family_, config, logits)
        rerun = family_.matcher(config)({"logits": logits, "pred_boxes": pred_boxes}, targets, *extra)
        assert indices is not None, "the parent's final-layer matches were not kept"
        assert len(indices) == len(rerun)
        for (kept_queries, kept_targets), (queries, target_ids) in zip(indices, rerun):
            assert torch.equal(kept_queries, queries) and torch.equal(kept_targets, target_ids)
        return original(family_, config, logits, pred_boxes, targets, num_boxes, indices)

    monkeypatch.setattr(calibrated, "logit_mixing_loss", spy)
    model = make(model_type).train()
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS, boxes_per_image=(3, 2))
    run(model, pixel_values, labels).loss.backward()
    assert len(seen) == 1 and sum(len(queries) for queries, _ in seen[0]) >= 5  # every box matched


def test_final_layer_matches_are_kept_however_the_matcher_is_called():
    """Positional or keyword arguments, the kept matches are the call whose predictions and extra arguments are the
    final layer's; other calls (another layer, another group count) are ignored."""
    from hf_caldetr.models.calibrated import FinalLayerMatches

    class Matcher(torch.nn.Module):
        def forward(self, outputs, targets, group_detr=1):
            return ("matched", group_detr, float(outputs["logits"].sum()))

    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4)
    other = {"logits": logits + 1, "pred_boxes": boxes}
    final = {"logits": logits, "pred_boxes": boxes}
    matcher = Matcher()
    for call in (lambda: matcher(final, [], 2), lambda: matcher(outputs=final, targets=[], group_detr=2)):
        with FinalLayerMatches(Matcher, logits, boxes, (2,)) as matches:
            matcher(other, [], 2)        # another layer's predictions
            matcher(final, [], 1)        # another group count
            call()
        assert matches.indices == ("matched", 2, float(logits.sum()))
    with FinalLayerMatches(Matcher, logits, boxes, (2,)) as matches:
        matcher(other, [], 2)
    assert matches.indices is None


def test_a_loss_function_set_on_a_cal_model_is_wrapped_by_its_parameter_names():
    """A Cal model names the arguments of its loss function from the function's parameters (and replaces the
    logits by name); a function it cannot name them for is refused with the reason, not run with wrong arguments."""
    from hf_caldetr.models.calibrated import stock_loss_function

    cal = make("detr").train()
    pixel_values, labels = tiny_batch(num_labels=NUM_LABELS)
    expected = run(cal, pixel_values, labels)
    stock = stock_loss_function(MODEL_FAMILIES["detr"].model_class)
    seen = {}

    def named(logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs):
        seen["logits"] = logits
        return stock(logits, labels, device, pred_boxes, config, outputs_class, outputs_coord, **kwargs)

    cal.loss_function = named
    out = run(cal, pixel_values, labels)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert out.loss_dict.keys() == expected.loss_dict.keys()
    assert not torch.equal(seen["logits"], out.logits)  # the loss saw the modulated logits, the output is raw

    def variadic(*args, **kwargs):
        return stock(*args, **kwargs)

    cal.loss_function = variadic
    with pytest.raises(TypeError, match="by name"):
        run(cal, pixel_values, labels)
