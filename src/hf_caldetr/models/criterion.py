"""The two forms of the logit-mixing loss: sigmoid heads (focal loss) and softmax heads with a no-object column.

The matching, the positives and the cross-process pooling are the same for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss

from ..method import pooled_logit_mixing, positive_rows


def _mixed_positives(flat_logits, num_queries, targets, indices, alpha, target_scale=1.0):
    """Rows of the ``[B * Q, C]`` flattened logits, mixed logits and smoothed targets of the matched queries,
    pooled over processes."""
    rows, classes = positive_rows(targets, indices, num_queries)
    rows = torch.tensor(rows, dtype=torch.long, device=flat_logits.device)
    mixed, soft_targets, total_positives = pooled_logit_mixing(flat_logits[rows], classes, flat_logits.shape[-1],
                                                               alpha, target_scale)
    return rows, mixed, soft_targets, total_positives


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
    flat = logits.flatten(0, 1)
    rows, mixed, soft_targets, total_positives = _mixed_positives(flat, logits.shape[1], targets, indices, alpha)
    if total_positives == 0:
        # No box anywhere in the global batch: mixing is undefined; keep the graph connected.
        return logits.sum() * 0.0
    mixed_logits = flat.index_put((rows,), mixed).view_as(logits)
    full_targets = torch.zeros_like(flat).index_put_((rows,), soft_targets.to(logits.dtype)).view_as(logits)
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
    # The normaliser goes into the targets (the loss is linear in them): one operation fewer.
    _, mixed, soft_targets, total_positives = _mixed_positives(logits.flatten(0, 1), logits.shape[1], targets, indices,
                                                               alpha, 1.0 / num_boxes)
    if total_positives == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(mixed, soft_targets, reduction="sum")
