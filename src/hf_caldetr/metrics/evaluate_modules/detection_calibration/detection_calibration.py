"""Every calibration metric of ``hf_caldetr`` as one 🤗 ``evaluate`` module, beside the D-ECE module.

A thin wrapper: the metrics live in ``hf_caldetr.metrics.evaluate_detections`` (``metrics/streaming.py`` and
``metrics/protocol.py``), which this module calls unchanged. Load it offline with
``evaluate.load(hf_caldetr.metrics.DETECTION_CALIBRATION_MODULE)``.

What the wrapper adds, and why:

- Inputs are checked with the core functions' own checks before ``evaluate`` encodes them (its int64 ``labels``
  would otherwise truncate 2.7 to class 2, and a missing or extra key would surface as a bare ``KeyError``), as
  the D-ECE module does. References may also hold ``iscrowd`` (one 0/1 flag per box, COCO's crowd regions).
- ``iscrowd`` is optional per image, which ``evaluate``'s fixed schema cannot express: with a list of alternative
  ``Features`` it picks one per ``compute`` from the first image of the first batch, and a dict whose keys differ
  from a candidate's raises a bare ``KeyError`` instead of moving to the next one. So the schema always holds
  ``iscrowd`` and the module fills in zeros (no crowd region) where an image gives none. All-zero flags and absent
  flags give the same numbers in ``evaluate_detections``.
- ``categories`` is required (the class-averaged metrics average over the dataset's categories, never over the
  classes that happen to occur), and every option is checked before ``evaluate`` consumes the stored batches, by
  running ``evaluate_detections`` on no images: a refused option leaves the batches in place for the next call.
"""

from collections.abc import Mapping, Sequence

import evaluate
import numpy as np

from hf_caldetr.metrics.evaluate_features import D_ECE_CITATION, detection_features
from hf_caldetr.metrics.inputs import check_exact_keys, flatten_boxes, flatten_pair, reference_crowd_flags
from hf_caldetr.metrics.streaming import evaluate_detections

_CITATION = D_ECE_CITATION + """\
@inproceedings{oksuz2023saod,
  title     = {Towards Building Self-Aware Object Detectors via Reliable Uncertainty Quantification and
               Calibration},
  author    = {Oksuz, Kemal and Joy, Tom and Dokania, Puneet K.},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}
@inproceedings{oksuz2018lrp,
  title     = {Localization Recall Precision (LRP): A New Performance Metric for Object Detection},
  author    = {Oksuz, Kemal and Cam, Baris Can and Akbas, Emre and Kalkan, Sinan},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2018}
}
@article{oksuz2021lrp,
  title     = {One Metric to Measure them All: Localisation Recall Precision (LRP) for Evaluating Visual
               Detection Tasks},
  author    = {Oksuz, Kemal and Cam, Baris Can and Kalkan, Sinan and Akbas, Emre},
  journal   = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume    = {44},
  number    = {12},
  pages     = {9446--9463},
  year      = {2022},
  doi       = {10.1109/TPAMI.2021.3130188},
  note      = {Published online 2021}
}
@inproceedings{kuzucu2024calibration,
  title     = {On Calibration of Object Detectors: Pitfalls, Evaluation and Baselines},
  author    = {Kuzucu, Selim and Oksuz, Kemal and Sadeghi, Jonathan and Dokania, Puneet K.},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}
@article{park2024oce,
  title     = {Quantifying the Reliability of Predictions in Detection Transformers: Object-Level Calibration
               and Image-Level Uncertainty},
  author    = {Park, Young-Jin and Sobolewski, Carson and Azizan, Navid},
  journal   = {arXiv preprint arXiv:2412.01782},
  year      = {2024}
}
"""

_DESCRIPTION = """\
Every calibration metric of a detector's outputs in one call, as hf_caldetr.metrics.evaluate_detections computes
them (each follows its official code; see the module card). At the fixed cut score >= 0.3: D-ECE (Cal-DETR
protocol: IoU 0.5, 10 bins, pooled over classes), LaECE at IoU 0.5 and 0.1 (SAOD code, 25 bins per class),
the LRP Error with its components, LaECE_0 / LaACE_0 (IoU 0, Kuzucu et al.) and OCE (per ground-truth object,
Park et al.). Threshold-free: oLRP with its components and the per-class LRP-optimal thresholds of the evaluated
split. With class_thresholds found on a validation split: LaECE_0, LaACE_0, LRP, D-ECE and OCE of the detections
they keep (at_lrp_optimal_thresholds). All values are fractions (papers print them times 100). The class-averaged
metrics average over the dataset's categories, so `categories` is required.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image with `boxes` (absolute xyxy, [n, 4]), `scores` ([n], in [0, 1]) and
        `labels` ([n]), as `post_process_object_detection` returns them.
    references: one dict per image with `boxes` (absolute xyxy, [m, 4]), `labels` ([m]) and optionally
        `iscrowd` ([m], 0/1; 1 marks a COCO crowd region, ignored by every metric as pycocotools ignores it).
        No other keys; labels are integer class ids (integral floats such as 2.0 are accepted). Anything else
        raises ValueError naming the image and the problem, with the core functions' messages.
    categories (required): the dataset's classes: their number K (ids 0..K-1, `config.num_labels`), a list of
        ids, or `config.id2label`. Every label must be one of them.
    class_thresholds (optional): per-class score thresholds from a validation split, `{class id: threshold}`
        covering every category (the `lrp_optimal_thresholds` of that split's result; string keys from JSON
        are fine) or a list in ascending category order. Adds `at_lrp_optimal_thresholds`.
    num_bins (int, default 10): D-ECE bins.
    laece_bins (int, default 25): LaECE / LaECE_0 bins per class.
    score_threshold (float, default 0.3): the fixed cut of D-ECE, LaECE, LRP, LaECE_0, LaACE_0 and OCE.
    iou_threshold (float, default 0.5, in [0, 1)): matching IoU of D-ECE, LaECE, LRP and oLRP.
    include_images_without_gt (bool, default False): keep D-ECE's detections of images without ground truth
        (the class-averaged metrics always count them as false positives, as their official code does).
    compute_ap (bool, default False): also COCO AP / AR (pycocotools): `map`, `map_50`, ..., `mar_large`.
Returns:
    `evaluate_detections`' dict, unchanged: d_ece, num_detections, precision, mean_confidence, bin_counts,
    bin_precisions, bin_confidences, bin_edges, num_images, num_images_evaluated, num_ignored, oce, laece,
    laece_calibration, lrp, lrp_loc, lrp_fp, lrp_fn, laece_iou_0.1, laece_0, laace_0, olrp, olrp_loc, olrp_fp,
    olrp_fn, lrp_optimal_thresholds; with class_thresholds at_lrp_optimal_thresholds; with compute_ap the COCO
    keys. NaN where a value is undefined (e.g. no detection kept).
Example:
    >>> import evaluate, hf_caldetr.metrics
    >>> calibration = evaluate.load(hf_caldetr.metrics.DETECTION_CALIBRATION_MODULE)
    >>> result = calibration.compute(
    ...     predictions=[{"boxes": [[0, 0, 10, 10]], "scores": [0.8], "labels": [1]}],
    ...     references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}], categories=2)
    >>> round(result["d_ece"], 6), round(result["lrp"], 6), result["lrp_optimal_thresholds"]
    (0.2, 0.0, {0: -1.0, 1: 0.8})
"""

_PREDICTION_KEYS = ("boxes", "scores", "labels")
_REFERENCE_KEYS = ("boxes", "labels")
_CONTEXT = "the detection calibration evaluate module"
_REFERENCE_CONTEXT = f"{_CONTEXT}, besides an optional 'iscrowd',"
OPTIONS = ("categories", "class_thresholds", "num_bins", "laece_bins", "score_threshold", "iou_threshold",
           "include_images_without_gt", "compute_ap")
MISSING_CATEGORIES = (
    "categories is required: pass the dataset's classes to compute(), e.g. compute(..., categories=80) for class "
    "ids 0..79 (a transformers model's config.num_labels), a list of class ids or config.id2label. The "
    "class-averaged metrics (LaECE, LRP, oLRP, LaECE_0, LaACE_0) average over every category of the dataset, also "
    "those without detections or ground truth, so they are never guessed from the data")


def _without_crowd(references):
    """The per-image dicts without their ``iscrowd`` (for ``check_exact_keys``); anything else unchanged."""
    if isinstance(references, Mapping) or not isinstance(references, Sequence):
        return references  # not a list of per-image dicts: check_exact_keys names the problem
    return [{key: value for key, value in entry.items() if key != "iscrowd"} if isinstance(entry, Mapping)
            else entry for entry in references]


def check_inputs(predictions, references):
    """``ValueError`` with the core functions' messages for anything ``evaluate_detections`` would refuse, and for
    dict keys other than the features' (``iscrowd`` allowed in references).

    Returns:
        the references as the schema stores them (``boxes``, ``labels``, and ``iscrowd`` as 0/1 ints, zeros
        where an image gave none), or ``None`` without references.
    """
    if predictions is not None:
        check_exact_keys(predictions, "predictions", _PREDICTION_KEYS, _CONTEXT)
    if references is not None:
        check_exact_keys(_without_crowd(references), "references", _REFERENCE_KEYS, _REFERENCE_CONTEXT)
    if predictions is not None and references is not None:
        _, flat_references = flatten_pair(predictions, references)
    elif predictions is not None:
        flatten_boxes(predictions, "predictions", with_scores=True)
    if references is None:
        return None
    if predictions is None:
        flat_references = flatten_boxes(references, "references", with_scores=False)
    crowd = reference_crowd_flags(references, flat_references)
    counts = flat_references.counts_per_image
    flags = np.zeros(int(counts.sum()), dtype=np.int64) if crowd is None else crowd.astype(np.int64)
    per_image = np.split(flags, np.cumsum(counts)[:-1]) if len(counts) else []
    return [{"boxes": entry["boxes"], "labels": entry["labels"], "iscrowd": crowd_flags.tolist()}
            for entry, crowd_flags in zip(references, per_image)]


def check_options(options: dict) -> None:
    """``ValueError`` for an unknown option, a missing ``categories``, or any option ``evaluate_detections``
    refuses (with its message: it is run on no images)."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(repr(name) for name in unknown)} for {_CONTEXT}; it takes "
                         f"{', '.join(OPTIONS)}")
    if options.get("categories") is None:
        raise ValueError(MISSING_CATEGORIES)
    evaluate_detections([], [], **options)




@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DetectionCalibration(evaluate.Metric):
    """D-ECE, LaECE, LRP, oLRP, LaECE_0, LaACE_0, OCE (and COCO AP) over per-image detections and ground truth."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # iscrowd is optional for the caller: add / add_batch fill in zeros (module docstring).
            features=detection_features(with_crowd=True),
            reference_urls=["https://arxiv.org/abs/2311.03570",
                            "https://github.com/EFS-OpenSource/calibration-framework",
                            "https://arxiv.org/abs/2307.00934",
                            "https://github.com/fiveai/saod",
                            "https://arxiv.org/abs/2011.10772",
                            "https://github.com/kemaloksuz/LRP-Error",
                            "https://arxiv.org/abs/2405.20459",
                            "https://github.com/fiveai/detection_calibration",
                            "https://arxiv.org/abs/2412.01782",
                            "https://github.com/young-j-park/uq-detr"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Check the batch as ``evaluate_detections`` would, then add it (``compute(predictions=...)`` comes
        here); references without ``iscrowd`` get zeros."""
        references = check_inputs(predictions, references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Check one image's prediction and reference as ``evaluate_detections`` would, then add them."""
        references = check_inputs(None if prediction is None else [prediction],
                                  None if reference is None else [reference])
        return super().add(prediction=prediction, reference=None if references is None else references[0],
                           **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """``evaluate.Metric.compute`` after checking the options (``categories`` required) before anything stored
        is consumed; see the module's inputs description for the options and the returned keys."""
        check_options(kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, categories=None, class_thresholds=None, num_bins=10,
                 laece_bins=25, score_threshold=0.3, iou_threshold=0.5, include_images_without_gt=False,
                 compute_ap=False):
        if categories is None:
            raise ValueError(MISSING_CATEGORIES)
        return evaluate_detections(predictions, references, categories=categories,
                                   class_thresholds=class_thresholds, num_bins=num_bins, laece_bins=laece_bins,
                                   score_threshold=score_threshold, iou_threshold=iou_threshold,
                                   include_images_without_gt=include_images_without_gt, compute_ap=compute_ap)
