"""Detection uncertainty calibration error, D-UCE (the Cal-DETR paper's Fig. 4).

A well-calibrated uncertainty ``u`` in [0, 1) predicts how often a detection is wrong. Over equal-width bins
of ``u``:

    D-UCE = sum_k (n_k / N) * |error_rate_k - uncertainty_k|,   error_rate_k = 1 - precision_k,

with ``uncertainty_k`` the mean ``u`` in bin ``k``. Binning and matching follow the D-ECE protocol. For Cal-DETR
``u`` is ``tanh`` of the decoder-layer logit variance of the detection's class, in [0, 1). No detections give
``d_uce`` NaN.
"""

from __future__ import annotations

import numpy as np

from .binning import (
    bin_edges,
    bin_index,
    binned_means,
    check_num_bins,
    clip_to_open_unit,
    weighted_gap,
)
from .d_ece import check_scores_and_outcomes
from .inputs import flatten_pair, reference_crowd_flags
from .matching import match_flat


def uncertainty_calibration_error(uncertainties, matched, num_bins: int = 10) -> dict:
    """D-UCE of detections with a per-detection uncertainty.

    Args:
        uncertainties: ``[N]`` in [0, 1).
        matched: ``[N]`` bool, true positive or not.
        num_bins: equal-width bins over [0, 1).

    Returns:
        dict with ``d_uce``, ``num_detections``, ``error_rate``, ``mean_uncertainty``, and per bin
        ``bin_counts``, ``bin_error_rates``, ``bin_uncertainties`` (NaN for empty bins) and ``bin_edges``.
    """
    num_bins = check_num_bins(num_bins)
    uncertainties, matched = check_scores_and_outcomes(uncertainties, matched, score_name="uncertainties",
                                                       upper_open=True)
    clipped = clip_to_open_unit(uncertainties)
    errors = ~matched
    counts, error_rates, mean_uncertainties = binned_means(bin_index(clipped, num_bins), num_bins, errors, clipped)
    empty = len(clipped) == 0
    return {
        "d_uce": weighted_gap(counts, error_rates, mean_uncertainties),
        "num_detections": len(clipped),
        "error_rate": float("nan") if empty else float(errors.mean()),
        "mean_uncertainty": float("nan") if empty else float(clipped.mean()),
        "bin_counts": counts.tolist(),
        "bin_error_rates": error_rates.tolist(),
        "bin_uncertainties": mean_uncertainties.tolist(),
        "bin_edges": bin_edges(num_bins).tolist(),
    }


def detection_uce(predictions, references, uncertainty_key: str = "uncertainties", num_bins: int = 10,
                  score_threshold: float = 0.3, iou_threshold: float = 0.5,
                  include_images_without_gt: bool = False) -> dict:
    """D-UCE of a detector's outputs.

    Args:
        predictions: as in ``detection_ece``, each dict also holding ``predictions[i][uncertainty_key]``,
            ``[n_i]`` in [0, 1), one per detection.
        Others as in ``detection_ece``.
    """
    flat_predictions, flat_references = flatten_pair(predictions, references, extra_keys=(uncertainty_key,))
    matches = match_flat(flat_predictions, flat_references, score_threshold, iou_threshold,
                         include_images_without_gt, crowd=reference_crowd_flags(references, flat_references))
    starts = np.cumsum(flat_predictions.counts_per_image) - flat_predictions.counts_per_image
    flat_index = starts[matches.image_index] + matches.detection_index
    return uncertainty_calibration_error(flat_predictions.extras[uncertainty_key][flat_index], matches.matched,
                                         num_bins)
