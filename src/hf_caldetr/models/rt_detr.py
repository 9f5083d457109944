"""Cal-DETR on transformers' RT-DETR (sigmoid heads, varifocal loss, DINO-style contrastive denoising queries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import RTDetrForObjectDetection
from transformers.loss.loss_rt_detr import RTDetrLoss, _set_aux_loss
from transformers.models.rt_detr.modeling_rt_detr import RTDetrObjectDetectionOutput
from transformers.utils.generic import can_return_tuple

from ..calibration import logit_uncertainty, modulate_logits
from ..configuration import CalRTDetrConfig
from ..distributed import num_boxes_across_processes
from .criterion import CalibratedDetectorMixin, sigmoid_logit_mixing_loss


@dataclass
class CalRTDetrObjectDetectionOutput(RTDetrObjectDetectionOutput):
    r"""
    Differs from `RTDetrObjectDetectionOutput` in one field, and in `logits`:

    logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels)`):
        The final layer's logits. In training, the matching queries' logits are modulated by their uncertainty
        (also at inference when `config.modulate_at_inference`); raw otherwise. As in the parent, a training
        forward with labels puts the denoising queries first (`denoising_meta_values["dn_num_split"]`); their
        logits stay raw.
    logit_uncertainty (`torch.Tensor` of shape `(batch_size, config.num_queries, num_labels)`):
        Variance of the matching queries' logits over the decoder layers (unbiased); never the denoising queries.
        `None` with a single decoder layer.

    `intermediate_logits` is the parent's field: raw logits of every decoder layer, denoising queries included.
    """

    logit_uncertainty: torch.Tensor | None = None


class CalRTDetrLoss(RTDetrLoss):
    """Differs from `RTDetrLoss` in a `"logit_mixing"` loss on the final layer's matching queries and in normalising
    by the number of boxes summed over processes then divided by the world size (the parent does not reduce).

    The mixing loss is the sigmoid focal loss (transformers' `sigmoid_focal_loss`) of the mixed logits against the
    smoothed targets, normalised like the varifocal loss (summed over all entries, over `num_boxes`). Why focal and
    not RT-DETR's varifocal loss: the varifocal target of a positive is the IoU of *its* box with the ground truth,
    and a mixed logit blends several queries, so it has no box and no IoU; the focal loss is the IoU-free member of
    the same family, takes soft targets as they are, and is Deformable DETR's mixing loss too. Its alpha is
    `1 - config.focal_loss_alpha` (0.25 by default), so that a negative entry is weighted
    `focal_loss_alpha * p ** gamma` exactly as in the varifocal loss.

    Denoising queries never enter: the mixing loss sees the final layer's matching queries and their Hungarian
    matching only. The loss dict keeps the parent's convention (its entries already weighted) except
    `loss_logit_mixing`, reported unweighted.
    """

    def __init__(self, config):
        super().__init__(config)
        self.use_logit_mixing = config.use_logit_mixing
        self.logit_mixing_alpha = config.logit_mixing_alpha

    def loss_logit_mixing(self, outputs, targets, indices, num_boxes):
        loss = sigmoid_logit_mixing_loss(
            outputs["logits"], targets, indices, num_boxes, self.logit_mixing_alpha,
            focal_alpha=1 - self.alpha, focal_gamma=self.gamma,
        )
        return {"loss_logit_mixing": loss}

    def _weighted_losses(self, outputs, targets, indices, num_boxes, suffix=""):
        losses = {}
        for loss in self.losses:
            layer_losses = self.get_loss(loss, outputs, targets, indices, num_boxes)
            weighted = {k + suffix: v * self.weight_dict[k] for k, v in layer_losses.items() if k in self.weight_dict}
            losses.update(weighted)
        return losses

    def forward(self, outputs, targets):
        """Mirrors `RTDetrLoss.forward`, with the cross-process `num_boxes` and the final-layer mixing loss."""
        outputs_without_aux = {k: v for k, v in outputs.items() if "auxiliary_outputs" not in k}
        indices = self.matcher(outputs_without_aux, targets)
        num_boxes = num_boxes_across_processes(targets, outputs["logits"].device)

        losses = self._weighted_losses(outputs, targets, indices, num_boxes)
        if self.use_logit_mixing:
            losses.update(self.loss_logit_mixing(outputs, targets, indices, num_boxes))
        for i, auxiliary_outputs in enumerate(outputs.get("auxiliary_outputs", [])):
            aux_indices = self.matcher(auxiliary_outputs, targets)
            losses.update(self._weighted_losses(auxiliary_outputs, targets, aux_indices, num_boxes, f"_aux_{i}"))
        if "dn_auxiliary_outputs" in outputs:
            # Each denoising group reconstructs every ground-truth box once, hence `num_boxes` per group.
            meta = outputs["denoising_meta_values"]
            dn_indices = self.get_cdn_matched_indices(meta, targets)
            dn_num_boxes = num_boxes * meta["dn_num_group"]
            for i, auxiliary_outputs in enumerate(outputs["dn_auxiliary_outputs"]):
                losses.update(self._weighted_losses(auxiliary_outputs, targets, dn_indices, dn_num_boxes, f"_dn_{i}"))
        return losses


def CalRTDetrForObjectDetectionLoss(
    logits,
    labels,
    device,
    pred_boxes,
    config,
    outputs_class=None,
    outputs_coord=None,
    enc_topk_logits=None,
    enc_topk_bboxes=None,
    denoising_meta_values=None,
    **kwargs,
):
    """transformers' `RTDetrForObjectDetectionLoss`, plus `logit_mixing_loss_coefficient * L_R`.

    `logits` are the final layer's (denoising first, then matching queries, the latter modulated): the final
    layer's matching and varifocal loss see the modulated matching queries; the auxiliary layers, the encoder's
    top-k proposals and every denoising output their raw logits. Shapes as in transformers: `outputs_class`
    `[B, L, dn + Q, C]`.
    """
    # First: the criterion (its matcher takes the config's costs).
    criterion = CalRTDetrLoss(config).to(device)
    # Second: split the denoising queries off; only the matching queries are matched and mixed.
    if denoising_meta_values is not None:
        _, logits = torch.split(logits, denoising_meta_values["dn_num_split"], dim=1)
        _, pred_boxes = torch.split(pred_boxes, denoising_meta_values["dn_num_split"], dim=1)
    outputs_loss = {"logits": logits, "pred_boxes": pred_boxes}
    auxiliary_outputs = None
    if config.auxiliary_loss:
        if denoising_meta_values is not None:
            dn_out_coord, outputs_coord = torch.split(outputs_coord, denoising_meta_values["dn_num_split"], dim=2)
            dn_out_class, outputs_class = torch.split(outputs_class, denoising_meta_values["dn_num_split"], dim=2)
        auxiliary_outputs = _set_aux_loss(outputs_class[:, :-1].transpose(0, 1), outputs_coord[:, :-1].transpose(0, 1))
        outputs_loss["auxiliary_outputs"] = auxiliary_outputs
        outputs_loss["auxiliary_outputs"].extend(_set_aux_loss([enc_topk_logits], [enc_topk_bboxes]))
        if denoising_meta_values is not None:
            outputs_loss["dn_auxiliary_outputs"] = _set_aux_loss(
                dn_out_class.transpose(0, 1), dn_out_coord.transpose(0, 1)
            )
            outputs_loss["denoising_meta_values"] = denoising_meta_values
    # Third: the losses.
    loss_dict = criterion(outputs_loss, labels)
    # Fourth: the sum; RT-DETR's entries come weighted, the mixing loss takes its coefficient here.
    loss = sum(value for key, value in loss_dict.items() if key != "loss_logit_mixing")
    if "loss_logit_mixing" in loss_dict:
        loss = loss + config.logit_mixing_loss_coefficient * loss_dict["loss_logit_mixing"]
    return loss, loss_dict, auxiliary_outputs


class CalRTDetrForObjectDetection(CalibratedDetectorMixin, RTDetrForObjectDetection):
    """Differs from `RTDetrForObjectDetection` in modulating the matching queries' final logits by their uncertainty
    over the decoder layers (in training), adding the logit-mixing loss, and returning that uncertainty; the
    denoising queries are left out of both.

    The parameters are exactly the parent's, so checkpoints load both ways.
    """

    config_class = CalRTDetrConfig

    cal_loss_function = staticmethod(CalRTDetrForObjectDetectionLoss)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.LongTensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        **kwargs,
    ) -> CalRTDetrObjectDetectionOutput:
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )
        denoising_meta_values = outputs.denoising_meta_values if self.training else None
        outputs_class = outputs.intermediate_logits  # [B, L, dn + Q, C]
        outputs_coord = outputs.intermediate_reference_points

        # A training forward with labels runs the denoising queries first: they reconstruct noised ground truth
        # under their own attention mask, are dropped at inference, and are no detections to calibrate.
        num_denoising = 0 if denoising_meta_values is None else denoising_meta_values["dn_num_split"][0]
        matching_class = outputs_class[:, :, num_denoising:]
        uncertainty = None
        if matching_class.shape[1] >= 2:
            uncertainty = logit_uncertainty(matching_class)
        mode = self.config.uncertainty_modulation
        logits = outputs_class[:, -1]
        if mode != "none" and (self.training or self.config.modulate_at_inference):
            modulated = modulate_logits(matching_class[:, -1], uncertainty, mode)
            logits = torch.cat([logits[:, :num_denoising], modulated], dim=1)
        pred_boxes = outputs_coord[:, -1]

        loss, loss_dict, auxiliary_outputs = None, None, None
        if labels is not None:
            loss, loss_dict, auxiliary_outputs = self.loss_function(
                logits,
                labels,
                self.device,
                pred_boxes,
                self.config,
                outputs_class,
                outputs_coord,
                enc_topk_logits=outputs.enc_topk_logits,
                enc_topk_bboxes=outputs.enc_topk_bboxes,
                denoising_meta_values=denoising_meta_values,
                predicted_corners=outputs.intermediate_predicted_corners,
                initial_reference_points=outputs.initial_reference_points,
                **kwargs,
            )

        return CalRTDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            intermediate_hidden_states=outputs.intermediate_hidden_states,
            intermediate_logits=outputs.intermediate_logits,
            intermediate_reference_points=outputs.intermediate_reference_points,
            intermediate_predicted_corners=outputs.intermediate_predicted_corners,
            initial_reference_points=outputs.initial_reference_points,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            init_reference_points=outputs.init_reference_points,
            enc_topk_logits=outputs.enc_topk_logits,
            enc_topk_bboxes=outputs.enc_topk_bboxes,
            enc_outputs_class=outputs.enc_outputs_class,
            enc_outputs_coord_logits=outputs.enc_outputs_coord_logits,
            denoising_meta_values=outputs.denoising_meta_values,
            logit_uncertainty=uncertainty,
        )
