"""Cal-DETR on transformers' DETR (softmax heads with a no-object class, cross-entropy); UP-DETR checkpoints use
this architecture too."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DetrForObjectDetection
from transformers.loss.loss_for_object_detection import HungarianMatcher, ImageLoss
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput
from transformers.utils.generic import can_return_tuple

from ..calibration import logit_uncertainty, modulate_logits
from ..configuration import CalDetrConfig
from .criterion import (
    CalibratedDetectorMixin,
    CalImageLossMixin,
    criterion_losses,
    detr_style_loss,
    softmax_logit_mixing_loss,
)


@dataclass
class CalDetrObjectDetectionOutput(DetrObjectDetectionOutput):
    r"""
    Differs from `DetrObjectDetectionOutput` in two fields, and in `logits`:

    logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`):
        The final layer's logits, no-object column included, modulated by their uncertainty in training (and at
        inference when `config.modulate_at_inference`), raw otherwise.
    intermediate_logits (`torch.Tensor` of shape `(batch_size, decoder_layers, num_queries, num_labels + 1)`):
        Raw class logits of every decoder layer, whatever `config.auxiliary_loss` says.
    logit_uncertainty (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`):
        Variance of the logits over the decoder layers (unbiased). `None` with a single decoder layer.
    """

    intermediate_logits: torch.Tensor | None = None
    logit_uncertainty: torch.Tensor | None = None


def decoder_layer_states(model, outputs) -> torch.Tensor:
    """Every decoder layer's output as its class head sees it, ``[B, L, Q, d_model]``, of a DETR model (stock or
    Cal) run with ``output_hidden_states=True``.

    DETR keeps per-layer states only with `auxiliary_loss`, and switching that on changes the decoder itself
    (each layer then receives the previous one's layer-normed output), so it cannot be forced. The recorded
    decoder hidden states exist either way: the decoder's input queries first, then each layer's output (the
    last one replaced by the final state). The decoder's final layer norm turns a layer's output into what
    DETR's auxiliary heads see; the last layer is the final state itself, which the model's heads use. (With
    `auxiliary_loss` the recorded outputs are the layers' own, before the layer norm, so the same holds.)
    """
    if outputs.decoder_hidden_states is None:
        raise ValueError("DETR's per-layer states need the decoder's hidden states: run the model with "
                         "output_hidden_states=True")
    layer_outputs = outputs.decoder_hidden_states[1:-1]
    intermediate = [model.model.decoder.layernorm(hidden_state) for hidden_state in layer_outputs]
    return torch.stack([*intermediate, outputs.last_hidden_state], dim=1)


class CalDetrImageLoss(CalImageLossMixin, ImageLoss):
    """Differs from `ImageLoss` in a `"logit_mixing"` loss (soft-target cross-entropy of the matched queries' mixed
    logits, final layer only, over `num_boxes`) and in the normalisation across processes (see `CalImageLossMixin`).

    DETR's own `loss_ce` is a class-weighted mean over all queries (`eos_coefficient` on no-object), not a sum over
    `num_boxes`; the mixing loss follows the spec's per-box normalisation instead, like the box losses.
    """

    def __init__(self, matcher, num_classes, eos_coef, losses, logit_mixing_alpha: float = 0.9):
        super().__init__(matcher, num_classes, eos_coef, losses)
        self.logit_mixing_alpha = logit_mixing_alpha

    def loss_logit_mixing(self, outputs, targets, indices, num_boxes):
        loss = softmax_logit_mixing_loss(outputs["logits"], targets, indices, num_boxes, self.logit_mixing_alpha)
        return {"loss_logit_mixing": loss}


def CalDetrForObjectDetectionLoss(
    logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs
):
    """transformers' `ForObjectDetectionLoss` (DETR's), plus `logit_mixing_loss_coefficient * L_R`.

    `logits` are the (modulated) final-layer logits: the final layer's Hungarian matching (softmax class cost, the
    config's `class_cost` / `bbox_cost` / `giou_cost`) and cross-entropy see them; the auxiliary layers
    (`outputs_class[:-1]`, `[L, B, Q, C + 1]`) their raw logits.
    """
    # First: the matcher, with the config's costs, on the logits it is given.
    matcher = HungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)
    # Second: the criterion, with the mixing loss when enabled.
    criterion = CalDetrImageLoss(
        matcher=matcher,
        num_classes=config.num_labels,
        eos_coef=config.eos_coefficient,
        losses=criterion_losses(config),
        logit_mixing_alpha=config.logit_mixing_alpha,
    ).to(device)
    # Third and fourth: the losses and their weighted sum.
    return detr_style_loss(criterion, logits, labels, pred_boxes, config, outputs_class, outputs_coord)


class CalDetrForObjectDetection(CalibratedDetectorMixin, DetrForObjectDetection):
    """Differs from `DetrForObjectDetection` in modulating the final logits (all `labels + 1` columns) by their
    uncertainty over the decoder layers (in training), adding the logit-mixing loss, and returning every layer's
    logits.

    The parameters are exactly the parent's, so checkpoints load both ways.
    """

    config_class = CalDetrConfig

    cal_loss_function = staticmethod(CalDetrForObjectDetectionLoss)

    def _decoder_layer_states(self, outputs) -> torch.Tensor:
        """Every decoder layer's output as its class head sees it, ``[B, L, Q, d_model]``
        (see :func:`decoder_layer_states`)."""
        return decoder_layer_states(self, outputs)

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
    ) -> CalDetrObjectDetectionOutput:
        wants_hidden_states = kwargs.pop("output_hidden_states", self.config.output_hidden_states)
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            output_hidden_states=True,  # the per-layer decoder states, see `_decoder_layer_states`
            **kwargs,
        )
        layer_states = self._decoder_layer_states(outputs)
        intermediate_logits = self.class_labels_classifier(layer_states)  # [B, L, Q, C + 1]
        raw_logits = intermediate_logits[:, -1]
        pred_boxes = self.bbox_predictor(outputs.last_hidden_state).sigmoid()

        uncertainty = None
        if intermediate_logits.shape[1] >= 2:
            uncertainty = logit_uncertainty(intermediate_logits)
        mode = self.config.uncertainty_modulation
        logits = raw_logits
        if mode != "none" and (self.training or self.config.modulate_at_inference):
            logits = modulate_logits(raw_logits, uncertainty, mode)

        loss, loss_dict, auxiliary_outputs = None, None, None
        if labels is not None:
            outputs_class, outputs_coord = None, None
            if self.config.auxiliary_loss:
                # transformers' layout, [L, B, Q, ...]; its `_set_aux_loss` drops the final layer.
                outputs_class = intermediate_logits.transpose(0, 1)
                intermediate_coord = self.bbox_predictor(layer_states[:, :-1]).sigmoid()
                outputs_coord = torch.cat([intermediate_coord, pred_boxes.unsqueeze(1)], dim=1).transpose(0, 1)
            loss, loss_dict, auxiliary_outputs = self.loss_function(
                logits, labels, self.device, pred_boxes, self.config, outputs_class, outputs_coord
            )

        return CalDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            decoder_hidden_states=outputs.decoder_hidden_states if wants_hidden_states else None,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states if wants_hidden_states else None,
            encoder_attentions=outputs.encoder_attentions,
            intermediate_logits=intermediate_logits,
            logit_uncertainty=uncertainty,
        )
