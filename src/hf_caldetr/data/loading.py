"""Every source to one schema: COCO JSON folders, Hub or saved datasets, in-memory datasets.

Each loader brings its data to the detection schema (``schema.py``) and runs the shared bad-data checks
(``validation.py``), so the training and evaluation code has one code path whatever the data came from.

Boxes are taken in the frame of the image as stored, COCO's convention: an EXIF orientation tag is not applied
to the pixels (``datasets`` would apply it on decode; ``validation.py`` keeps such images as stored), so pixels
and boxes agree whatever the tag says. Splits of a Hub dataset share the training split's class ids: a split
whose ``ClassLabel`` lists the same names in another order has its ids remapped by name.

Crowd annotations (``iscrowd=1``) are kept as crowd regions (``objects.iscrowd``, see ``schema.py``): COCO folders
always carry the field, Hub datasets when their objects have it. They are counted in
``DetectionData.crowd_regions``; training leaves them out, evaluation treats them as ignore regions.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from typing import Any

from .schema import (
    CROWD_KEY,
    OBJECT_KEYS,
    category_feature,
    crowd_flags,
    detection_features,
    object_fields,
    objects_as_columns,
)
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
        ValueError: malformed JSON (with line and column), no ``images`` list, or no (or an empty)
            ``categories`` list.
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
        if key not in coco:
            raise ValueError(f"{path}: no '{key}' list; a COCO detection file needs one (found: {sorted(coco)})")
        if not isinstance(coco[key], list):
            raise ValueError(f"{path}: '{key}' must be a list (COCO detection format)")
    # A detector needs at least one class; test-set files (no annotations) list them too.
    if not coco["categories"]:
        raise ValueError(
            f"{path}: 'categories' is empty; list every class as {{\"id\": <int>, \"name\": <str>}} "
            "(the ids the annotations' category_id refer to)"
        )
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
    """Each image's ``objects`` (schema layout, with ``iscrowd``), and the annotations rejected before the image
    is seen.

    Crowd annotations (a true ``iscrowd``) are kept with ``iscrowd`` 1: crowd regions, checked like other boxes.
    """
    objects = {image_id: {key: [] for key in (*OBJECT_KEYS, CROWD_KEY)} for image_id in images}
    problems = []
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
        else:
            target = objects[annotation["image_id"]]
            target["bbox"].append([float(value) for value in box])
            target["category"].append(label_of_coco_id[annotation["category_id"]])
            area = annotation.get("area")
            target["area"].append(float(area) if isinstance(area, (int, float)) else float(box[2] * box[3]))
            target["id"].append(annotation["id"])
            target[CROWD_KEY].append(1 if annotation.get("iscrowd", 0) else 0)
    return objects, problems


def load_coco_folder(annotations_json: str, images_dir: str, skip_invalid: bool = False) -> DetectionData:
    """A COCO detection folder (one JSON file, one image folder) as a dataset in the detection schema.

    COCO category ids may be sparse (1, 2, 5 ...): they are mapped, in increasing order, to contiguous
    ClassLabel ids; ``result.source_category_ids[k]`` is the COCO id of class ``k``. Images are referenced by
    path (read lazily); their sizes are read from the files, not from the JSON. Crowd annotations are kept as
    objects with ``iscrowd`` 1 (every object has the field), counted in ``result.crowd_regions``.

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
    dataset = Dataset.from_dict(columns, features=detection_features(names, crowd=True))
    checked = validate_detection_dataset(dataset, skip_invalid=skip_invalid, source=source)
    problems = [problem.message for problem in image_problems + annotation_problems] + checked.problems
    return DetectionData(
        checked.dataset, skipped + checked.skipped, problems, coco_ids, crowd_regions=checked.crowd_regions
    )


# ----------------------------------------------------------------------------------- Hub and saved datasets


def _reference_split(splits: dict) -> Any:
    """The split whose class order the others follow: ``train`` when there is one, else the first."""
    return "train" if "train" in splits else next(iter(splits))


def _common_class_label_names(splits: dict, source: str) -> list[str]:
    """The reference split's ClassLabel names, after checking that every split names the same classes.

    Splits built separately may list the same names in another order; their ids are remapped by name
    (``to_detection_schema``). A class that some split lacks cannot be matched, so it is refused.
    """
    from datasets import ClassLabel

    reference = _reference_split(splits)
    names = list(category_feature(splits[reference].features).names)
    for split, part in splits.items():
        feature = category_feature(part.features)
        if not isinstance(feature, ClassLabel):
            continue  # strings or integers: encoded (or range-checked) against ``names``
        extra, lacking = sorted(set(feature.names) - set(names)), sorted(set(names) - set(feature.names))
        if extra or lacking:
            found = (f" has class(es) {extra} that split {reference!r} lacks" if extra else "") + (
                f"{' and' if extra else ''} lacks class(es) {lacking} of split {reference!r}" if lacking else ""
            )
            raise ValueError(
                f"{source}: split {split!r}{found}; every split's 'objects.category' ClassLabel must name the "
                "same classes (in any order): relabel or drop the odd objects, or cast the splits to one "
                "ClassLabel"
            )
    return names


def _resolve_class_names(splits: dict, class_names: list[str] | None, source: str) -> list[str]:
    """The class names for ``objects.category`` across all splits: the reference split's ClassLabel names
    (``_reference_split``), the given ``class_names`` (needed for plain integers), or, for string categories,
    the sorted names found.

    Raises:
        ValueError: ClassLabels naming different classes in different splits, ``class_names`` that differ
            from a ClassLabel's, categories of another type, or no class at all.
    """
    from datasets import ClassLabel, Value

    feature = category_feature(splits[_reference_split(splits)].features)  # raises when there is no category
    if isinstance(feature, ClassLabel):
        names = _common_class_label_names(splits, source)
        if class_names is not None and list(class_names) != names:
            raise ValueError(f"{source}: class_names {class_names} differ from the dataset's {names}")
    elif class_names is not None and isinstance(feature, Value) and feature.dtype.startswith(("int", "string")):
        names = list(class_names)
    elif isinstance(feature, Value) and feature.dtype == "string":
        names = sorted(
            {
                name
                for split in splits.values()
                for row in split["objects"]
                for name in objects_as_columns(row)["category"]
            }
        )
    else:
        raise ValueError(
            f"{source}: 'objects.category' is {feature!r}; it must be a ClassLabel, strings, or integers with "
            "class_names given"
        )
    if not names:
        raise ValueError(
            f"{source}: no class names (an empty ClassLabel, or string categories without a single object); "
            "a detector needs at least one class: pass class_names, or give 'objects.category' a ClassLabel"
        )
    return names


def _complete_objects(
    objects: Any,
    label_of_name: dict[str, int],
    first_id: int,
    where: str,
    own_names: list[str] | None = None,
    crowd: bool = False,
) -> dict[str, list]:
    """One row's objects as a dict of lists with all schema keys: names encoded, missing area/id filled.

    ``own_names``: the split's own ClassLabel names when their order differs from ``label_of_name``'s; its
    ids are remapped by name. ``crowd``: keep ``iscrowd`` (as 0/1; a missing value is 0).
    """
    columns = objects_as_columns(objects)
    boxes = columns.get("bbox") or []
    categories = []
    for value in columns["category"]:
        if own_names is not None and isinstance(value, int) and 0 <= value < len(own_names):
            value = own_names[value]
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
    completed = {"bbox": boxes, "category": categories, "area": areas, "id": ids}
    if crowd:
        completed[CROWD_KEY] = [int(flag) for flag in crowd_flags(columns)]
    return completed


def _require_image_and_objects(dataset, source: str) -> list[str]:
    """The fields of ``objects``; raise a ``ValueError`` naming what is missing for the schema."""
    for column in ("image", "objects"):
        if column not in dataset.column_names:
            raise ValueError(f"{source}: missing column {column!r} (columns: {dataset.column_names})")
    keys = object_fields(dataset.features)
    for key in ("bbox", "category"):
        if key not in keys:
            raise ValueError(f"{source}: 'objects' has no {key!r} field (fields: {keys})")
    return keys


def to_detection_schema(dataset, class_names: list[str], source: str = "dataset"):
    """Bring a ``datasets.Dataset`` to the schema's layout: ``objects`` as a dict of lists with every key
    (missing ``area`` = w*h, missing ``id`` numbered), category names encoded as ids of ``class_names``,
    ``image_id`` added when absent, images decoded as RGB. Boxes must already be COCO xywh in pixels. A
    ClassLabel with the names of ``class_names`` in another order has its ids remapped by name. Objects with an
    ``iscrowd`` field keep it (0/1: crowd regions); other fields of ``objects`` are dropped.

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
    feature = category_feature(dataset.features)
    has_class_label = isinstance(feature, ClassLabel)
    # A ClassLabel naming the classes in another order: casting would keep the ids and rename the classes.
    own_names = list(feature.names) if has_class_label and list(feature.names) != list(class_names) else None
    crowd = CROWD_KEY in keys
    features = dataset.features.copy()
    features.update(detection_features(class_names, crowd=crowd))
    if not has_class_label:
        features["objects"]["category"] = List(Value("int64"))
    schema_keys = set(OBJECT_KEYS) | ({CROWD_KEY} if crowd else set())
    # The objects already in the schema's layout (an integer or boolean iscrowd casts to int8): no rewrite.
    if isinstance(objects_feature, dict) and set(keys) == schema_keys and has_class_label and not own_names:
        return dataset.cast(features)
    label_of_name = {name: label for label, name in enumerate(class_names)}
    counts = [len(objects_as_columns(row).get("bbox") or []) for row in dataset["objects"]]
    first_ids = [0, *itertools.accumulate(counts)]
    image_ids = dataset["image_id"]
    return dataset.map(
        lambda objects, index: {
            "objects": _complete_objects(
                objects,
                label_of_name,
                first_ids[index],
                record_name(source, image_ids[index], None),
                own_names,
                crowd,
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

    Splits whose ClassLabels name the same classes in another order are remapped by name to the order of the
    ``train`` split (else the first); ClassLabels naming different classes are refused.
    """
    from datasets import DatasetDict

    splits = dict(dataset) if isinstance(dataset, DatasetDict) else {None: dataset}
    for split, part in splits.items():
        _require_image_and_objects(part, source if split is None else f"{source} [{split}]")
    names = _resolve_class_names(splits, class_names, source)
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


def _empty_saved_splits(path: str) -> list[str]:
    """The splits of a ``save_to_disk`` folder saved with no rows: ``load_from_disk`` fails on them with a
    bare ``IndexError`` (no data file to read back)."""
    folders = {"": path}
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as file:
            folders = {split: os.path.join(path, split) for split in json.load(file).get("splits", [])}
    empty = []
    for split, folder in folders.items():
        try:
            with open(os.path.join(folder, "state.json"), encoding="utf-8") as file:
                if json.load(file).get("_data_files") == []:
                    empty.append(split)
        except (OSError, ValueError):
            continue  # not ours to judge: load_from_disk reports it
    return empty


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
        ValueError: an unknown split, a saved split with no rows, a schema that cannot be brought to the
            detection schema, or (unless ``skip_invalid``) invalid records, named by dataset, split and record.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if _is_saved_dataset(name_or_path):
        empty = _empty_saved_splits(name_or_path)
        if empty:
            named = f"split(s) {empty}" if empty != [""] else "dataset"
            raise ValueError(
                f"{name_or_path}: {named} saved with no images, which datasets cannot load back; save the "
                "dataset again without the empty split(s), or with its images"
            )
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
