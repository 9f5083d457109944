"""The ``datasets`` features of the library's ``evaluate`` modules: one definition of the per-image dicts they take."""

from __future__ import annotations

import datasets

# The papers behind D-ECE, cited by both evaluate modules.
D_ECE_CITATION = """\
@inproceedings{munir2023caldetr,
  title     = {Cal-DETR: Calibrated Detection Transformer},
  author    = {Munir, Muhammad Akhtar and Khan, Salman and Khan, Muhammad Haris and Ali, Mohsen and
               Khan, Fahad Shahbaz},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}
@inproceedings{kuppers2020multivariate,
  title     = {Multivariate Confidence Calibration for Object Detection},
  author    = {K{\\"u}ppers, Fabian and Kronenberger, Jan and Shantia, Amirhossein and Haselhoff, Anselm},
  booktitle = {CVPR Workshops},
  year      = {2020}
}
"""

BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4))
LABELS = datasets.Sequence(datasets.Value("int64"))
SCORES = datasets.Sequence(datasets.Value("float64"))


def detection_features(with_crowd: bool = False) -> datasets.Features:
    """``predictions`` ``{boxes, scores, labels}`` and ``references`` ``{boxes, labels}`` (plus ``iscrowd`` when
    ``with_crowd``), one dict per image, boxes absolute xyxy."""
    references = {"boxes": BOXES, "labels": LABELS, **({"iscrowd": LABELS} if with_crowd else {})}
    return datasets.Features({"predictions": {"boxes": BOXES, "scores": SCORES, "labels": LABELS},
                              "references": references})
