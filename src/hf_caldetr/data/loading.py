"""Every source to one schema: COCO JSON folders, Hub or saved datasets, in-memory datasets.

Each loader brings its data to the detection schema (``schema.py``) and runs the shared bad-data checks
(``validation.py``), so the training and evaluation code has one code path whatever the data came from.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from typing import Any

from .schema import OBJECT_KEYS, category_feature, detection_features, objects_as_columns
from .validation import (
    MALFORMED_BOX,
    MALFORMED_RECORD,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    DetectionData,
    Problem,
    raise_or_skip,
    record_name,
    validate_detection_dataset,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- COCO folders


def read_coco_json(path: str) -> dict:
    """The parsed COCO file, checked for the top-level layout.

    Raises:
        ValueError: malformed JSON (with line and column), or no ``images`` / ``categories`` lists.
    """
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(coco, dict):
        raise ValueError(
            f"{path}: expected a JSON object with 'images' and 'categories', got {type(coco).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: '{key}' must be a list (COCO detection format)")
    # Test-set files have no annotations: their images are valid, just unlabelled.
    if not isinstance(coco.setdefault("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list (COCO detection format)")
    return coco


def coco_categories(coco: dict, source: str) -> tuple[list[str], list[int]]:
    """Class names and their COCO ids, sorted by id: ClassLabel id ``k`` is COCO id ``ids[k]``.

    Raises:
        ValueError: a category without an integer ``id`` and a string ``name``, or a repeated id or name.
    """
    by_id: dict[int, str] = {}
    for position, category in enumerate(coco["categories"]):
        if not (
            isinstance(category, dict)
            and isinstance(category.get("id"), int)
            and isinstance(category.get("name"), str)
        ):
            raise ValueError(
                f"{source}: categories[{position}] needs an integer 'id' and a string 'name': {category!r}"
            )
        if category["id"] in by_id:
            raise ValueError(f"{source}: category id {category['id']} appears twice")
        by_id[category["id"]] = category["name"]
    ids = sorted(by_id)
    names = [by_id[category_id] for category_id in ids]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"{source}: category name(s) {repeated} used by more than one id")
    return names, ids


def _coco_images(coco: dict, images_dir: str, source: str) -> tuple[dict[int, dict], list[Problem]]:
    """``{image id: {"path", "file_name"}}`` in file order, and the malformed image records."""
    images, problems = {}, []
    for position, image in enumerate(coco["images"]):
        if not (
            isinstance(image, dict)
            and isinstance(image.get("id"), int)
            and isinstance(image.get("file_name"), str)
        ):
            detail = "needs an integer 'id' and a string 'file_name'"
            problems.append(Problem(MALFORMED_RECORD, f"{source}: images[{position}] {detail}: {image!r}"))
            continue
        if image["id"] in images:
            raise ValueError(f"{source}: image id {image['id']} appears twice ({image['file_name']})")
        path = os.path.abspath(os.path.join(images_dir, image["file_name"]))
        images[image["id"]] = {"path": path, "file_name": image["file_name"]}
    return images, problems


def _is_four_numbers(box: Any) -> bool:
    """Whether a JSON ``bbox`` is a list of 4 numbers (booleans are ints to Python, not numbers here)."""
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in box)
    )


def _coco_objects(
    coco: dict, images: dict[int, dict], label_of_coco_id: dict[int, int], source: str
) -> tuple[dict[int, dict], list[Problem]]:
    """Each image's ``objects`` (schema layout), and the annotations rejected before the image is seen.

    Crowd annotations (``iscrowd=1``) are left out, as DETR training does; they are not errors.
    """
    objects = {image_id: {key: [] for key in OBJECT_KEYS} for image_id in images}
    problems, crowd = [], 0
    for position, annotation in enumerate(coco["annotations"]):
        if not (
            isinstance(annotation, dict)
            and all(key in annotation for key in ("image_id", "category_id", "bbox"))
            and isinstance(annotation.get("id"), int)
        ):
            detail = "needs an integer 'id', an 'image_id', a 'category_id' and a 'bbox'"
            problems.append(
                Problem(MALFORMED_RECORD, f"{source}: annotations[{position}] {detail}: {annotation!r}")
            )
            continue
        image = images.get(annotation["image_id"])
        where = record_name(source, annotation["image_id"], image and image["file_name"], annotation["id"])
        box = annotation["bbox"]
        if image is None:
            problems.append(Problem(UNKNOWN_IMAGE, f"{where}: no image with this id in 'images'"))
        elif annotation["category_id"] not in label_of_coco_id:
            detail = f"unknown category id {annotation['category_id']!r} (known: {sorted(label_of_coco_id)})"
            problems.append(Problem(UNKNOWN_CATEGORY, f"{where}: {detail}"))
        elif not _is_four_numbers(box):
            problems.append(
                Problem(MALFORMED_BOX, f"{where}: bbox {box!r} is not 4 numbers [x, y, width, height]")
            )
        elif annotation.get("iscrowd", 0):
            crowd += 1
        else:
            target = objects[annotation["image_id"]]
            target["bbox"].append([float(value) for value in box])
            target["category"].append(label_of_coco_id[annotation["category_id"]])
            area = annotation.get("area")
            target["area"].append(float(area) if isinstance(area, (int, float)) else float(box[2] * box[3]))
            target["id"].append(annotation["id"])
    if crowd:
        logger.info("%s: left out %d crowd annotation(s)", source, crowd)
    return objects, problems


def load_coco_folder(annotations_json: str, images_dir: str, skip_invalid: bool = False) -> DetectionData:
    """A COCO detection folder (one JSON file, one image folder) as a dataset in the detection schema.

    COCO category ids may be sparse (1, 2, 5 ...): they are mapped, in increasing order, to contiguous
    ClassLabel ids; ``result.source_category_ids[k]`` is the COCO id of class ``k``. Images are referenced by
    path (read lazily); their sizes are read from the files, not from the JSON.

    Args:
        annotations_json: path of the COCO JSON file.
        images_dir: folder that the ``file_name`` of each image is relative to.
        skip_invalid: skip bad records (counted per reason in ``result.skipped``, logged) instead of raising.

    Raises:
        ValueError: malformed JSON or layout; unless ``skip_invalid``, any bad record (a missing or unreadable
            image, a malformed or impossible box, an unknown category or image id), each named by file and
            record.
    """
    from datasets import Dataset

    source = str(annotations_json)
    coco = read_coco_json(annotations_json)
    names, coco_ids = coco_categories(coco, source)
    images, image_problems = _coco_images(coco, images_dir, source)
    label_of_coco_id = {coco_id: label for label, coco_id in enumerate(coco_ids)}
    objects, annotation_problems = _coco_objects(coco, images, label_of_coco_id, source)
    skipped = raise_or_skip(image_problems + annotation_problems, skip_invalid, source)

    columns = {
        "image": [image["path"] for image in images.values()],
        "image_id": list(images),
        "objects": [objects[image_id] for image_id in images],
    }
    dataset = Dataset.from_dict(columns, features=detection_features(names))
    checked = validate_detection_dataset(dataset, skip_invalid=skip_invalid, source=source)
    problems = [problem.message for problem in image_problems + annotation_problems] + checked.problems
    return DetectionData(checked.dataset, skipped + checked.skipped, problems, coco_ids)


# ----------------------------------------------------------------------------------- Hub and saved datasets


def _resolve_class_names(splits: list, class_names: list[str] | None, source: str) -> list[str]:
    """The class names for ``objects.category`` across all splits: a ClassLabel's names, the given
    ``class_names`` (needed for plain integers), or, for string categories, the sorted names found.
    """
    from datasets import ClassLabel, Value

    feature = category_feature(splits[0].features)  # raises when objects has no category
    if isinstance(feature, ClassLabel):
        if class_names is not None and list(class_names) != list(feature.names):
            raise ValueError(f"{source}: class_names {class_names} differ from the dataset's {feature.names}")
        return list(feature.names)
    if class_names is not None and isinstance(feature, Value) and feature.dtype.startswith(("int", "string")):
        return list(class_names)
    if isinstance(feature, Value) and feature.dtype == "string":
        found = {
            name
            for split in splits
            for row in split["objects"]
            for name in objects_as_columns(row)["category"]
        }
        return sorted(found)
    raise ValueError(
        f"{source}: 'objects.category' is {feature!r}; it must be a ClassLabel, strings, or integers with "
        "class_names given"
    )


def _complete_objects(
    objects: Any, label_of_name: dict[str, int], first_id: int, where: str
) -> dict[str, list]:
    """One row's objects as a dict of lists with all schema keys: names encoded, missing area/id filled."""
    columns = objects_as_columns(objects)
    boxes = columns.get("bbox") or []
    categories = []
    for value in columns["category"]:
        if isinstance(value, str) and value not in label_of_name:
            raise ValueError(
                f"{where}: category {value!r} is not one of the class names {list(label_of_name)}"
            )
        categories.append(label_of_name[value] if isinstance(value, str) else value)
    areas = columns.get("area")
    if areas is None or any(area is None for area in areas):
        areas = [box[2] * box[3] if isinstance(box, list) and len(box) == 4 else 0.0 for box in boxes]
    ids = columns.get("id")
    if ids is None or any(value is None for value in ids):
        ids = list(range(first_id, first_id + len(boxes)))
    return {"bbox": boxes, "category": categories, "area": areas, "id": ids}


def _require_image_and_objects(dataset, source: str) -> list[str]:
    """The fields of ``objects``; raise a ``ValueError`` naming what is missing for the schema."""
    for column in ("image", "objects"):
        if column not in dataset.column_names:
            raise ValueError(f"{source}: missing column {column!r} (columns: {dataset.column_names})")
    objects_feature = dataset.features["objects"]
    item = objects_feature if isinstance(objects_feature, dict) else getattr(objects_feature, "feature", None)
    keys = sorted(item) if isinstance(item, dict) else []
    for key in ("bbox", "category"):
        if key not in keys:
            raise ValueError(f"{source}: 'objects' has no {key!r} field (fields: {keys})")
    return keys


def to_detection_schema(dataset, class_names: list[str], source: str = "dataset"):
    """Bring a ``datasets.Dataset`` to the schema's layout: ``objects`` as a dict of lists with every key
    (missing ``area`` = w*h, missing ``id`` numbered), category names encoded as ids of ``class_names``,
    ``image_id`` added when absent, images decoded as RGB. Boxes must already be COCO xywh in pixels.

    Categories that were not a ClassLabel come out as plain integers: ``validate_detection_dataset`` checks
    their range, reporting each bad record, before making them a ClassLabel.

    Raises:
        ValueError: no ``image`` or ``objects`` column, no ``bbox`` in objects, an unknown category name.
    """
    from datasets import ClassLabel, List, Value

    keys = _require_image_and_objects(dataset, source)
    objects_feature = dataset.features["objects"]
    if "image_id" not in dataset.column_names:
        dataset = dataset.add_column("image_id", list(range(len(dataset))))
    has_class_label = isinstance(category_feature(dataset.features), ClassLabel)
    features = dataset.features.copy()
    features.update(detection_features(class_names))
    if not has_class_label:
        features["objects"]["category"] = List(Value("int64"))
    if isinstance(objects_feature, dict) and set(keys) == set(OBJECT_KEYS) and has_class_label:
        return dataset.cast(features)
    label_of_name = {name: label for label, name in enumerate(class_names)}
    counts = [len(objects_as_columns(row).get("bbox") or []) for row in dataset["objects"]]
    first_ids = [0, *itertools.accumulate(counts)]
    image_ids = dataset["image_id"]
    return dataset.map(
        lambda objects, index: {
            "objects": _complete_objects(
                objects, label_of_name, first_ids[index], record_name(source, image_ids[index], None)
            )
        },
        input_columns=["objects"],
        with_indices=True,
        features=features,
        desc="bringing objects to the detection schema",
    )


def prepare_detection_dataset(
    dataset, class_names: list[str] | None = None, skip_invalid: bool = False, source: str = "dataset"
) -> DetectionData:
    """An in-memory ``Dataset`` or ``DatasetDict`` through the path of loaded data: schema, then checks.

    Args:
        class_names: needed when categories are plain integers; for string categories, fixes their order
            (default: sorted names found in all splits); must match an existing ClassLabel.
    """
    from datasets import DatasetDict

    splits = dict(dataset) if isinstance(dataset, DatasetDict) else {None: dataset}
    for split, part in splits.items():
        _require_image_and_objects(part, source if split is None else f"{source} [{split}]")
    names = _resolve_class_names(list(splits.values()), class_names, source)
    converted = {
        split: to_detection_schema(part, names, source if split is None else f"{source} [{split}]")
        for split, part in splits.items()
    }
    dataset = DatasetDict(converted) if isinstance(dataset, DatasetDict) else converted[None]
    return validate_detection_dataset(dataset, skip_invalid=skip_invalid, source=source, class_names=names)


def _is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (rather than raw data files)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")
    )


def load_hub_dataset(
    name_or_path: str,
    split: str | None = None,
    class_names: list[str] | None = None,
    skip_invalid: bool = False,
    **load_kwargs,
) -> DetectionData:
    """A Hub dataset (``datasets.load_dataset``) or a ``save_to_disk`` folder (``load_from_disk``) in the
    detection schema, checked like every other source.

    Works offline on local folders. ``load_kwargs`` go to ``load_dataset`` (``revision``, ``data_dir`` ...).

    Raises:
        ValueError: an unknown split, a schema that cannot be brought to the detection schema, or (unless
            ``skip_invalid``) invalid records, named by dataset, split and record.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if _is_saved_dataset(name_or_path):
        dataset = load_from_disk(name_or_path)
    else:
        dataset = load_dataset(name_or_path, **load_kwargs)
    if split is not None:
        if not isinstance(dataset, DatasetDict):
            raise ValueError(f"{name_or_path}: split {split!r} asked of a dataset saved without splits")
        if split not in dataset:
            raise ValueError(f"{name_or_path}: no split {split!r} (splits: {sorted(dataset)})")
        dataset = dataset[split]
    return prepare_detection_dataset(dataset, class_names, skip_invalid, source=str(name_or_path))


__all__ = [
    "DetectionData",
    "coco_categories",
    "load_coco_folder",
    "load_hub_dataset",
    "prepare_detection_dataset",
    "read_coco_json",
    "to_detection_schema",
    "validate_detection_dataset",
]
