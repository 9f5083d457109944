"""Data for training and evaluation: every source in one detection schema.

- ``digits``: the embedded default (scikit-learn digits on cluttered canvases), no download.
- ``loading``: COCO JSON folders, Hub / saved datasets and in-memory datasets, through one path.
- ``validation``: the bad-data checks every source goes through.
- ``corruptions``: the CorCOCO recipe for an out-of-domain copy of an evaluation set.
- ``transforms``: schema rows to model inputs (image processor, augmentation, collate).
"""

from .corruptions import (
    common_corruptions,
    corrupt_dataset,
    corrupt_image,
    corrupt_images,
    corruption_for_image,
    load_manifest,
    save_manifest,
)
from .digits import DIGIT_NAMES, DigitScenes, generate_digit_scenes, load_digits_detection, scenes_to_dataset
from .loading import (
    load_coco_folder,
    load_hub_dataset,
    prepare_detection_dataset,
    to_detection_schema,
)
from .schema import category_names, detection_features, id2label, label2id
from .transforms import (
    arrays_to_model_inputs,
    build_image_processor,
    coco_detection_target,
    make_collate_fn,
    normalized_cxcywh_to_xywh,
    prepare_batch,
    random_scale_translate,
    scale_translate,
    xywh_to_normalized_cxcywh,
)
from .validation import DetectionData, validate_detection_dataset

__all__ = [
    "DIGIT_NAMES",
    "DetectionData",
    "DigitScenes",
    "arrays_to_model_inputs",
    "build_image_processor",
    "category_names",
    "coco_detection_target",
    "common_corruptions",
    "corrupt_dataset",
    "corrupt_image",
    "corrupt_images",
    "corruption_for_image",
    "detection_features",
    "generate_digit_scenes",
    "id2label",
    "label2id",
    "load_coco_folder",
    "load_digits_detection",
    "load_hub_dataset",
    "load_manifest",
    "make_collate_fn",
    "normalized_cxcywh_to_xywh",
    "prepare_batch",
    "prepare_detection_dataset",
    "random_scale_translate",
    "save_manifest",
    "scale_translate",
    "scenes_to_dataset",
    "to_detection_schema",
    "validate_detection_dataset",
    "xywh_to_normalized_cxcywh",
]
