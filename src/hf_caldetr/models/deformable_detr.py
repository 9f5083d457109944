"""Cal-DETR on transformers' Deformable DETR (sigmoid heads, focal loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DeformableDetrForObjectDetection
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrObjectDetectionOutput,
    inverse_sigmoid,
)
from transformers.utils.generic import can_return_tuple

from ..calibration import logit_uncertainty, modulate_logits
from ..configuration import CalDeformableDetrConfig
from .criterion import (
    CalibratedDetectorMixin,
    CalImageLossMixin,
    criterion_losses,
    detr_style_loss,
    sigmoid_logit_mixing_loss,
)


@dataclass
class CalDeformableDetrObjectDetectionOutput(DeformableDetrObjectDetectionOutput):
    r"""
    Differs from `DeformableDetrObjectDetectionOutput` in two fields, and in `logits`:

    logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels)`):
        The final layer's logits, modulated by their uncertainty in training (and at inference when
        `config.modulate_at_inference`), raw otherwise.
    intermediate_logits (`torch.Tensor` of shape `(batch_size, decoder_layers, num_queries, num_labels)`):
        Raw class logits of every decoder layer (the layout of RT-DETR's field of the same name).
    logit_uncertainty (`torch.Tensor` of shape `(batch_size, num_queries, num_labels)`):
        Variance of the logits over the decoder layers (unbiased). `None` with a single decoder layer.
    """

    intermediate_logits: torch.Tensor | None = None
    logit_uncertainty: torch.Tensor | None = None


class CalDeformableDetrImageLoss(CalImageLossMixin, DeformableDetrImageLoss):
    """Differs from `DeformableDetrImageLoss` in a `"logit_mixing"` loss (sigmoid focal loss on the mixed logits
    against the smoothed targets, final layer only, normalised like `loss_ce`) and in the normalisation across
    processes (see `CalImageLossMixin`)."""

    def __init__(self, matcher, num_classes, focal_alpha, losses, logit_mixing_alpha: float = 0.9):
        super().__init__(matcher, num_classes, focal_alpha, losses)
        self.logit_mixing_alpha = logit_mixing_alpha

    def loss_logit_mixing(self, outputs, targets, indices, num_boxes):
        loss = sigmoid_logit_mixing_loss(
            outputs["logits"], targets, indices, num_boxes, self.logit_mixing_alpha, self.focal_alpha
        )
        return {"loss_logit_mixing": loss}


def CalDeformableDetrForObjectDetectionLoss(
    logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs
):
    """transformers' `DeformableDetrForObjectDetectionLoss`, plus `logit_mixing_loss_coefficient * L_R`.

    `logits` are the (modulated) final-layer logits: the final layer's Hungarian matching and classification loss
    see them, the auxiliary layers (`outputs_class[:-1]`) their raw logits.
    """
    # First: the matcher, with the config's costs, on the logits it is given.
    matcher = DeformableDetrHungarianMatcher(
        class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
    )
    # Second: the criterion, with the mixing loss when enabled.
    criterion = CalDeformableDetrImageLoss(
        matcher=matcher,
        num_classes=config.num_labels,
        focal_alpha=config.focal_alpha,
        losses=criterion_losses(config),
        logit_mixing_alpha=config.logit_mixing_alpha,
    ).to(device)
    # Third and fourth: the losses and their weighted sum.
    return detr_style_loss(criterion, logits, labels, pred_boxes, config, outputs_class, outputs_coord)


class CalDeformableDetrForObjectDetection(CalibratedDetectorMixin, DeformableDetrForObjectDetection):
    """Differs from `DeformableDetrForObjectDetection` in modulating the final logits by their uncertainty over the
    decoder layers (in training), adding the logit-mixing loss, and returning every layer's logits.

    The parameters are exactly the parent's, so checkpoints load both ways.
    """

    config_class = CalDeformableDetrConfig

    cal_loss_function = staticmethod(CalDeformableDetrForObjectDetectionLoss)

    def _predict_every_layer(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and boxes of every decoder layer, ``[L, B, Q, C]`` and ``[L, B, Q, 4]``.

        The same head computation as the parent's forward, which does not expose its per-layer results.
        """
        hidden_states = outputs.intermediate_hidden_states
        classes, coords = [], []
        for level in range(hidden_states.shape[1]):
            reference = outputs.init_reference_points if level == 0 else outputs.intermediate_reference_points[:, level - 1]
            reference = inverse_sigmoid(reference)
            delta_bbox = self.bbox_embed[level](hidden_states[:, level])
            if reference.shape[-1] == 4:
                coord_logits = delta_bbox + reference
            elif reference.shape[-1] == 2:
                coord_logits = torch.cat([delta_bbox[..., :2] + reference, delta_bbox[..., 2:]], dim=-1)
            else:
                raise ValueError(f"reference.shape[-1] should be 4 or 2, but got {reference.shape[-1]}")
            classes.append(self.class_embed[level](hidden_states[:, level]))
            coords.append(coord_logits.sigmoid())
        return torch.stack(classes), torch.stack(coords)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        **kwargs,
    ) -> CalDeformableDetrObjectDetectionOutput:
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            **kwargs,
        )
        outputs_class, outputs_coord = self._predict_every_layer(outputs)
        raw_logits, pred_boxes = outputs_class[-1], outputs_coord[-1]

        uncertainty = None
        if outputs_class.shape[0] >= 2:
            uncertainty = logit_uncertainty(outputs_class.transpose(0, 1))
        mode = self.config.uncertainty_modulation
        logits = raw_logits
        if mode != "none" and (self.training or self.config.modulate_at_inference):
            logits = modulate_logits(raw_logits, uncertainty, mode)

        loss, loss_dict, auxiliary_outputs = None, None, None
        if labels is not None:
            loss, loss_dict, auxiliary_outputs = self.loss_function(
                logits, labels, self.device, pred_boxes, self.config, outputs_class, outputs_coord
            )

        return CalDeformableDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            intermediate_hidden_states=outputs.intermediate_hidden_states,
            intermediate_reference_points=outputs.intermediate_reference_points,
            init_reference_points=outputs.init_reference_points,
            enc_outputs_class=outputs.enc_outputs_class,
            enc_outputs_coord_logits=outputs.enc_outputs_coord_logits,
            intermediate_logits=outputs_class.transpose(0, 1),
            logit_uncertainty=uncertainty,
        )
