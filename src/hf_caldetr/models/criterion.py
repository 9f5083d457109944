"""Criterion pieces every Cal model shares: the two forms of the mixing loss, and the DETR-style criterion loop.

A model file picks the mixing loss that matches its head (sigmoid or softmax) and wires it into its own
transformers criterion; the matching, the positives and the cross-process pooling are the same for all.
"""

from __future__ import annotations

import torch
from transformers.loss.loss_for_object_detection import _set_aux_loss, sigmoid_focal_loss

from ..calibration import gather_positives, pooled_logit_mixing, soft_target_cross_entropy
from ..distributed import num_boxes_across_processes


def _mixed_positives(logits, targets, indices, alpha):
    """Positions, mixed logits and smoothed targets of the matched queries, pooled over processes."""
    positions, classes = gather_positives(logits, targets, indices)
    mixed, soft_targets, total_positives = pooled_logit_mixing(logits[positions], classes, logits.shape[-1], alpha)
    return positions, mixed, soft_targets, total_positives


def sigmoid_logit_mixing_loss(
    logits: torch.Tensor,
    targets: list[dict],
    indices: list[tuple[torch.Tensor, torch.Tensor]],
    num_boxes: float,
    alpha: float,
    focal_alpha: float,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """``L_R`` for sigmoid heads: sigmoid focal loss of the mixed logits against the smoothed targets.

    All ``B * Q * C`` entries count, as in a focal classification loss: the positives carry their mixed logits and
    smoothed targets, every other query its own logits and an all-zero target. Normalised by ``num_boxes`` over
    the summed entries (transformers' focal loss averages over queries, hence the ``* Q``).

    Args:
        logits: ``[B, Q, C]`` final-layer (modulated) logits of the matching queries.
        indices: per image, the final layer's ``(query_indices, target_indices)``.
        alpha: the mixing ``alpha`` (``logit_mixing_alpha``).
        focal_alpha, focal_gamma: the focal loss's weighting of positives and its focusing exponent.
    """
    positions, mixed, soft_targets, total_positives = _mixed_positives(logits, targets, indices, alpha)
    if total_positives == 0:
        # No box anywhere in the global batch: mixing is undefined; keep the graph connected.
        return logits.sum() * 0.0
    mixed_logits = logits.index_put(positions, mixed)
    full_targets = torch.zeros_like(logits).index_put(positions, soft_targets.to(logits.dtype))
    loss = sigmoid_focal_loss(mixed_logits, full_targets, num_boxes, alpha=focal_alpha, gamma=focal_gamma)
    return loss * logits.shape[1]


def softmax_logit_mixing_loss(
    logits: torch.Tensor,
    targets: list[dict],
    indices: list[tuple[torch.Tensor, torch.Tensor]],
    num_boxes: float,
    alpha: float,
) -> torch.Tensor:
    """``L_R`` for softmax heads with a no-object column (DETR): soft-target cross-entropy of the positives.

    ``-sum_i sum_c t_ic log softmax(ztilde_i)_c / num_boxes`` over the matched queries only. The targets span all
    ``labels + 1`` columns with 0 on no-object (ground-truth classes never are no-object), while no-object still
    takes part in the softmax. Unmatched queries are left out: their target would be the plain no-object one-hot,
    which the detector's own cross-entropy already supervises; mixing has nothing to say about them.

    Args:
        logits: ``[B, Q, labels + 1]`` final-layer (modulated) logits.
        indices: per image, the final layer's ``(query_indices, target_indices)``.
        alpha: the mixing ``alpha`` (``logit_mixing_alpha``).
    """
    _, mixed, soft_targets, total_positives = _mixed_positives(logits, targets, indices, alpha)
    if total_positives == 0:
        return logits.sum() * 0.0
    return soft_target_cross_entropy(mixed, soft_targets, num_boxes)


class CalImageLossMixin:
    """The Cal-DETR criterion loop for transformers' DETR-style `ImageLoss` subclasses. Put it first among the bases.

    Differs from `ImageLoss.forward` in two points:

    - losses named in `final_layer_only_losses` (the mixing loss: the spec applies it to the final layer) are not
      repeated on the auxiliary layers;
    - `num_boxes` is summed over processes then divided by the world size (transformers averages, then divides
      again), so two processes on one batch give the loss of one process.

    The subclass provides `loss_logit_mixing(outputs, targets, indices, num_boxes)`.
    """

    final_layer_only_losses = ("logit_mixing",)

    def get_loss(self, loss, outputs, targets, indices, num_boxes):
        if loss == "logit_mixing":
            return self.loss_logit_mixing(outputs, targets, indices, num_boxes)
        return super().get_loss(loss, outputs, targets, indices, num_boxes)

    def forward(self, outputs, targets):
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "auxiliary_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_boxes = num_boxes_across_processes(targets, outputs["logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, auxiliary_outputs in enumerate(outputs.get("auxiliary_outputs", [])):
            aux_indices = self.matcher(auxiliary_outputs, targets)
            for loss in self.losses:
                if loss in self.final_layer_only_losses or loss == "masks":
                    continue  # masks: too costly on every layer, as in transformers
                aux_losses = self.get_loss(loss, auxiliary_outputs, targets, aux_indices, num_boxes)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


def detr_style_loss(criterion, logits, labels, pred_boxes, config, outputs_class=None, outputs_coord=None):
    """Steps three and four of transformers' DETR-style loss functions, with the mixing loss added.

    Three: the criterion on the final layer (and on the auxiliary layers' raw logits with `auxiliary_loss`).
    Four: the weighted sum, ``loss_ce + bbox * loss_bbox + giou * loss_giou`` per layer plus
    ``logit_mixing_loss_coefficient * loss_logit_mixing``; the mixing loss stays unweighted in `loss_dict`.

    Returns:
        ``(loss, loss_dict, auxiliary_outputs)``, as transformers' loss functions do.
    """
    outputs_loss = {"logits": logits, "pred_boxes": pred_boxes}
    auxiliary_outputs = None
    if config.auxiliary_loss:
        auxiliary_outputs = _set_aux_loss(outputs_class, outputs_coord)
        outputs_loss["auxiliary_outputs"] = auxiliary_outputs
    loss_dict = criterion(outputs_loss, labels)
    layer_weights = {"loss_ce": 1, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    weight_dict = dict(layer_weights)
    if config.auxiliary_loss:
        for i in range(config.decoder_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in layer_weights.items()})
    weight_dict["loss_logit_mixing"] = config.logit_mixing_loss_coefficient
    loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
    return loss, loss_dict, auxiliary_outputs


def criterion_losses(config, base=("labels", "boxes", "cardinality")) -> list[str]:
    """The criterion's loss names: the detector's own, plus `"logit_mixing"` when `use_logit_mixing`."""
    return [*base, "logit_mixing"] if config.use_logit_mixing else list(base)


class CalibratedDetectorMixin:
    """What every Cal model adds to its transformers parent's construction. Put it first among the bases.

    - The Cal settings are checked again: `from_pretrained(..., field=value)` sets config attributes after the
      config's own checks.
    - The loss function is set explicitly (`cal_loss_function`): transformers picks a loss by matching the class
      name, and "Cal..." would silently get the wrong one, or none.
    """

    cal_loss_function = None

    def __init__(self, config):
        config.validate_calibration_settings()
        super().__init__(config)

    @property
    def loss_function(self):
        return getattr(self, "_loss_function", type(self).cal_loss_function)

    @loss_function.setter
    def loss_function(self, value):
        self._loss_function = value
