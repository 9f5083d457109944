"""D-ECE (detection expected calibration error) as a 🤗 ``evaluate`` module.

A thin wrapper: the metric lives in ``hf_caldetr.metrics.detection_ece``, which this module calls unchanged
(``evaluate`` is in maintenance mode upstream, so nothing lives only here). Load it offline with
``evaluate.load(hf_caldetr.metrics.D_ECE_MODULE)``.

Inputs are checked with the core functions' own checks before ``evaluate`` encodes them: its int64 ``labels``
feature would otherwise truncate 2.7 to class 2, and a missing or extra dict key would surface as a bare
``KeyError``. Here non-integer labels get ``detection_ece``'s message, and the dicts must hold exactly the
feature keys (an extra key is named, with the expected ones).
"""

import evaluate

from hf_caldetr.metrics.d_ece import detection_ece
from hf_caldetr.metrics.evaluate_features import D_ECE_CITATION, detection_features
from hf_caldetr.metrics.inputs import check_exact_keys, flatten_boxes, flatten_pair

_CITATION = D_ECE_CITATION

_DESCRIPTION = """\
Detection expected calibration error (D-ECE): how far a detector's confidence is from its precision. Detections
with score >= 0.3 are matched greedily by descending score to same-class ground truth (IoU >= 0.5, one-to-one),
binned into 10 equal-width confidence bins, and D-ECE = sum_k (n_k / N) |precision_k - confidence_k|. Equal to
netcal's ECE(bins=10, detection=True) on the matched detections. A fraction (papers print it times 100).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image with `boxes` (absolute xyxy, [n, 4]), `scores` ([n], in [0, 1]) and
        `labels` ([n]), as `post_process_object_detection` returns them.
    references: one dict per image with `boxes` (absolute xyxy, [m, 4]) and `labels` ([m]).
        The dicts hold exactly these keys, and labels are integer class ids (integral floats such as 2.0 are
        accepted); anything else raises ValueError naming the image and the problem, as detection_ece does.
    num_bins (int, default 10): equal-width confidence bins.
    score_threshold (float, default 0.3): detections with a lower score are ignored.
    iou_threshold (float, default 0.5): a detection is a true positive when IoU >= this.
    include_images_without_gt (bool, default False): keep detections of images without ground truth.
Returns:
    d_ece (fraction; NaN when no detection is kept), num_detections, precision, mean_confidence, bin_counts,
    bin_precisions, bin_confidences, bin_edges, num_images, num_images_evaluated.
Example:
    >>> import evaluate, hf_caldetr.metrics
    >>> d_ece = evaluate.load(hf_caldetr.metrics.D_ECE_MODULE)
    >>> result = d_ece.compute(
    ...     predictions=[{"boxes": [[0, 0, 10, 10]], "scores": [0.8], "labels": [1]}],
    ...     references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}])
    >>> round(result["d_ece"], 6)
    0.2
"""

_PREDICTION_KEYS = ("boxes", "scores", "labels")
_REFERENCE_KEYS = ("boxes", "labels")
_CONTEXT = "the D-ECE evaluate module"


def check_inputs(predictions, references) -> None:
    """``ValueError`` with the core functions' messages for anything ``detection_ece`` would refuse, and for
    dict keys other than the features' (``evaluate`` would raise a bare ``KeyError`` or drop them)."""
    if predictions is not None:
        check_exact_keys(predictions, "predictions", _PREDICTION_KEYS, _CONTEXT)
    if references is not None:
        check_exact_keys(references, "references", _REFERENCE_KEYS, _CONTEXT)
    if predictions is not None and references is not None:
        flatten_pair(predictions, references)
    elif predictions is not None:
        flatten_boxes(predictions, "predictions", with_scores=True)
    elif references is not None:
        flatten_boxes(references, "references", with_scores=False)




@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DetectionECE(evaluate.Metric):
    """D-ECE over per-image detections and ground truth (Cal-DETR protocol)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=detection_features(),
            reference_urls=["https://arxiv.org/abs/2311.03570",
                            "https://github.com/EFS-OpenSource/calibration-framework"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Check the batch as ``detection_ece`` would, then add it (``compute(predictions=...)`` comes here)."""
        check_inputs(predictions, references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Check one image's prediction and reference as ``detection_ece`` would, then add them."""
        check_inputs(None if prediction is None else [prediction], None if reference is None else [reference])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, num_bins=10, score_threshold=0.3, iou_threshold=0.5,
                 include_images_without_gt=False):
        return detection_ece(predictions, references, num_bins=num_bins, score_threshold=score_threshold,
                             iou_threshold=iou_threshold, include_images_without_gt=include_images_without_gt)
