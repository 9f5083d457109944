"""Bad-data checks shared by every source: images that cannot be read, boxes that cannot be right.

``validate_detection_dataset`` walks a dataset in the detection schema (see ``schema.py``) without decoding
pixels (image headers only), and either raises one ``ValueError`` listing the problems, each with the source
file and the record (image id, file name, annotation id), or, with ``skip_invalid=True``, drops the bad images
and boxes, counts them by reason and logs a summary. Images with no boxes are valid.

Pixels stay in the frame the boxes were drawn in. COCO and Hub annotations refer to the image as stored, not as
its EXIF orientation would display it, so images are never EXIF-transposed. ``datasets``' ``Image`` feature
transposes on decode (``ImageOps.exif_transpose``); an image with an EXIF orientation other than 1 is therefore
held re-encoded as a PNG of its stored pixels (no EXIF), which ``datasets`` decodes as stored. 16-bit grey
images are held the same way, scaled to 8-bit (``schema.as_rgb8``): ``datasets``' conversion to RGB clips them
all white. Other images pass through untouched, read lazily from their files.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schema import (
    CROWD_KEY,
    OBJECT_KEYS,
    SIXTEEN_BIT_MODES,
    UNSCALABLE_MODES,
    as_rgb8,
    category_feature,
    columns_as_rows,
    crowd_flags,
    has_crowd_field,
    objects_as_columns,
    png_bytes,
)

logger = logging.getLogger(__name__)

# Reasons a record is rejected; the keys of ``DetectionData.skipped``.
MALFORMED_RECORD = "malformed_record"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MALFORMED_BOX = "malformed_box"
NON_POSITIVE_BOX = "non_positive_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
UNKNOWN_CATEGORY = "unknown_category"
UNKNOWN_IMAGE = "unknown_image"
UNSUPPORTED_IMAGE = "unsupported_image"

# COCO's own boxes overshoot the image edge by fractions of a pixel (polygon rounding): such boxes are
# clipped, only boxes further out are rejected.
BOX_EDGE_TOLERANCE_PX = 1.0
# A failed check lists this many problems in its error message, then a count of the rest.
MAX_LISTED_PROBLEMS = 5


@dataclass
class Problem:
    """One rejected record: why, and a message naming the file and the record."""

    reason: str
    message: str


@dataclass
class DetectionData:
    """A loaded detection dataset and what was skipped on the way.

    Attributes:
        dataset: ``datasets.Dataset`` or ``DatasetDict`` in the detection schema.
        skipped: records skipped per reason (empty unless ``skip_invalid=True`` found problems).
        problems: one message per skipped record, naming the file and the record.
        source_category_ids: for COCO folders, the COCO category id of each ClassLabel id (COCO ids may be
            sparse: 1, 2, 5 ...); None for other sources.
        crowd_regions: crowd regions kept (objects with ``iscrowd`` 1, all splits together): ignore regions for
            evaluation, never training targets (see ``schema.py``).
    """

    dataset: Any
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    source_category_ids: list[int] | None = None
    crowd_regions: int = 0


def record_name(source: str, image_id: Any, file_name: str | None, annotation_id: Any = None) -> str:
    """``"<source>: image id 3 (b.png), annotation id 7"``: where a problem is, for error messages."""
    where = f"{source}: image id {image_id}"
    if file_name:
        where += f" ({file_name})"
    if annotation_id is not None:
        where += f", annotation id {annotation_id}"
    return where


def raise_or_skip(problems: list[Problem], skip_invalid: bool, source: str) -> Counter:
    """Raise one ``ValueError`` listing ``problems``; when skipping, log them and return counts by reason."""
    if not problems:
        return Counter()
    if not skip_invalid:
        listed = "\n  ".join(problem.message for problem in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(
            f"{len(problems)} invalid record(s) (pass skip_invalid=True to skip them):\n  {listed}{tail}"
        )
    counts = Counter(problem.reason for problem in problems)
    logger.warning(
        "%s: skipped %d invalid record(s): %s", source, len(problems), dict(sorted(counts.items()))
    )
    for problem in problems:
        logger.debug("skipped: %s", problem.message)
    return counts


def _open_image(image: dict):
    """A PIL image (header read, pixels not decoded) of an undecoded ``datasets.Image`` value."""
    from PIL import Image

    if image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if image.get("path") is not None and os.path.isfile(image["path"]):
        return Image.open(image["path"])
    raise FileNotFoundError(image.get("path"))


def image_header(image: dict) -> tuple[int, int, str, int | None]:
    """``(width, height, mode, EXIF orientation or None)`` of an undecoded ``datasets.Image`` value
    ``{"bytes", "path"}``, as stored (not EXIF-transposed).

    Reads the header and runs PIL's ``verify`` (structure checks, no pixel decoding). The orientation is the
    one ``ImageOps.exif_transpose`` would act on (EXIF, or XMP ``tiff:Orientation``), read from the header.

    Raises:
        FileNotFoundError: the path does not exist (and there are no bytes).
        OSError / SyntaxError / ValueError: PIL cannot read the image.
    """
    from PIL import Image

    with _open_image(image) as opened:
        width, height, mode = opened.width, opened.height, opened.mode
        # The base class's getexif reads the header only (PNG's own would decode the pixels to look for an
        # eXIf chunk after them); it moves the file position, so verify() gets a file of its own.
        orientation = Image.Image.getexif(opened).get(Image.ExifTags.Base.Orientation)
    with _open_image(image) as opened:
        opened.verify()
    return width, height, mode, orientation


def needs_reencoding(mode: str, orientation: int | None) -> bool:
    """Whether ``datasets`` would decode an image wrongly: EXIF-transposed, or 16-bit clipped white."""
    return orientation not in (None, 1) or mode in SIXTEEN_BIT_MODES


def stored_rgb8(image: dict) -> dict:
    """An undecoded ``datasets.Image`` value re-encoded as a PNG of its stored pixels in 8-bit RGB, without
    EXIF (so ``datasets`` decodes it as stored); the path is kept to name the image in messages."""
    with _open_image(image) as opened:
        opened.load()
        pixels = np.asarray(as_rgb8(opened))
    return {"bytes": png_bytes(pixels), "path": image.get("path")}


def check_box(box: Any, width: int, height: int) -> tuple[str, str] | None:
    """``(reason, detail)`` when an xywh ``box`` is invalid in a ``width`` x ``height`` image, else None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return MALFORMED_BOX, f"box {box!r} is not 4 numbers [x, y, width, height]"
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in box):
        return MALFORMED_BOX, f"box {list(box)} has a non-finite or non-numeric value"
    x, y, box_width, box_height = box
    if box_width <= 0 or box_height <= 0:
        return NON_POSITIVE_BOX, f"box {list(box)} has non-positive width or height"
    tolerance = BOX_EDGE_TOLERANCE_PX
    if (
        x < -tolerance
        or y < -tolerance
        or x + box_width > width + tolerance
        or y + box_height > height + tolerance
    ):
        return BOX_OUTSIDE_IMAGE, f"box {list(box)} lies outside the {width}x{height} image"
    return None


def clip_box(box: list[float], width: int, height: int) -> list[float]:
    """An xywh box clipped to the image (used only within ``BOX_EDGE_TOLERANCE_PX`` of the edges)."""
    left, top = max(box[0], 0.0), max(box[1], 0.0)
    right, bottom = min(box[0] + box[2], width), min(box[1] + box[3], height)
    return [left, top, right - left, bottom - top]


def _check_row(
    row: dict, num_classes: int, source: str, crowd: bool = False
) -> tuple[Problem | None, list[Problem], dict | None, bool, int]:
    """Check one row: (an image-level problem, box-level problems, the cleaned ``objects`` or None, whether
    the image must be re-encoded, see ``needs_reencoding``, the number of crowd regions kept).

    The cleaned objects keep the valid boxes (clipped to the image); None means nothing changed. ``crowd``: the
    objects have the ``iscrowd`` field (crowd boxes are checked like the others; it stays in the cleaned objects).
    """
    image, image_id = row["image"], row["image_id"]
    file_name = image.get("path") if isinstance(image, dict) else None
    where = record_name(source, image_id, file_name)
    try:
        width, height, mode, orientation = image_header(image)
    except FileNotFoundError:
        return Problem(MISSING_IMAGE, f"{where}: image file is missing"), [], None, False, 0
    except Exception as error:  # PIL raises several types (OSError, SyntaxError, ValueError...) for bad files
        return Problem(UNREADABLE_IMAGE, f"{where}: image cannot be read ({error})"), [], None, False, 0
    if mode in UNSCALABLE_MODES:
        detail = (
            f"image mode {mode!r} (32-bit integer or float pixels) has no known 8-bit scaling; convert it to "
            "8-bit (or 16-bit) RGB or greyscale"
        )
        return Problem(UNSUPPORTED_IMAGE, f"{where}: {detail}"), [], None, False, 0
    reencode = needs_reencoding(mode, orientation)

    objects = objects_as_columns(row["objects"])
    boxes, categories = objects.get("bbox") or [], objects.get("category") or []
    ids = objects.get("id") or [None] * len(boxes)
    areas = objects.get("area") or [None] * len(boxes)
    keys = OBJECT_KEYS + ((CROWD_KEY,) if crowd else ())
    flags = crowd_flags(objects) if crowd and objects.get(CROWD_KEY) is not None else [False] * len(boxes)
    if not (len(boxes) == len(categories) == len(ids) == len(areas) == len(flags)):
        detail = f"objects lists differ in length ({ {key: len(objects.get(key) or []) for key in keys} })"
        return Problem(MALFORMED_RECORD, f"{where}: {detail}"), [], None, False, 0

    problems, kept = [], {key: [] for key in keys}
    # A missing or null iscrowd is written as 0, any true value as 1.
    changed = crowd and [int(flag) for flag in flags] != list(objects.get(CROWD_KEY) or [])
    for box, category, annotation_id, area, flag in zip(boxes, categories, ids, areas, flags):
        box_where = record_name(source, image_id, file_name, annotation_id)
        issue = check_box(box, width, height)
        if issue is None and not (isinstance(category, int) and 0 <= category < num_classes):
            issue = UNKNOWN_CATEGORY, f"category {category!r} is not one of the {num_classes} class ids"
        if issue is not None:
            problems.append(Problem(issue[0], f"{box_where}: {issue[1]}"))
            changed = True
            continue
        overshoots = box[0] < 0 or box[1] < 0 or box[0] + box[2] > width or box[1] + box[3] > height
        kept["bbox"].append(clip_box(list(box), width, height) if overshoots else list(box))
        kept["category"].append(category)
        kept["id"].append(annotation_id)
        kept["area"].append(kept["bbox"][-1][2] * kept["bbox"][-1][3] if overshoots or area is None else area)
        if crowd:
            kept[CROWD_KEY].append(int(flag))
        changed |= overshoots or area is None
    crowd_kept = sum(kept[CROWD_KEY]) if crowd else 0
    return None, problems, (kept if changed else None), reencode, crowd_kept


def _validate_split(
    dataset, skip_invalid: bool, source: str, num_classes: int
) -> tuple[Any, list[Problem], int]:
    """Validate one ``datasets.Dataset``; return it (cleaned when skipping), the problems found and the number of
    crowd regions it keeps."""
    from datasets import Image

    crowd = has_crowd_field(dataset.features)
    raw = dataset.select_columns(["image", "image_id", "objects"]).cast_column("image", Image(decode=False))
    bad_rows, new_objects, reencoded, problems, crowd_regions = set(), {}, set(), [], 0
    for index, row in enumerate(raw):
        image_problem, box_problems, cleaned, reencode, row_crowd = _check_row(row, num_classes, source, crowd)
        if image_problem is not None:
            bad_rows.add(index)
            problems.append(image_problem)
        crowd_regions += row_crowd
        problems.extend(box_problems)
        if cleaned is not None:
            new_objects[index] = cleaned
        if reencode:
            reencoded.add(index)
    if problems and not skip_invalid:
        return dataset, problems, crowd_regions
    if crowd_regions:
        logger.info(
            "%s: %d crowd region(s) (iscrowd=1) kept: ignore regions for evaluation, never training targets",
            source, crowd_regions,
        )
    if reencoded:
        image_feature = dataset.features["image"]
        logger.info(
            "%s: %d image(s) with an EXIF orientation or 16 bits per pixel held as 8-bit PNGs of their stored "
            "pixels", source, len(reencoded),
        )
        undecoded = dataset.cast_column("image", Image(decode=False))
        dataset = undecoded.map(
            lambda images, indices: {
                "image": [
                    stored_rgb8(image) if index in reencoded else image for image, index in zip(images, indices)
                ]
            },
            input_columns=["image"],
            with_indices=True,
            batched=True,
            features=undecoded.features,
            desc="re-encoding EXIF-rotated and 16-bit images",
        ).cast_column("image", image_feature)
    if new_objects:
        if not isinstance(dataset.features["objects"], dict):  # stored as a list of structs: keep that layout
            new_objects = {index: columns_as_rows(columns) for index, columns in new_objects.items()}
        # Only the objects column is rewritten; images are passed through undecoded.
        dataset = dataset.map(
            lambda objects, index: {"objects": new_objects.get(index, objects)},
            input_columns=["objects"],
            with_indices=True,
            features=dataset.features,
            desc="dropping invalid boxes",
        )
    if bad_rows:
        dataset = dataset.select([index for index in range(len(dataset)) if index not in bad_rows])
    return dataset, problems, crowd_regions


def _require_schema(dataset, source: str, class_names: list[str] | None) -> int:
    """The number of classes; raise a ``ValueError`` naming what is missing from the detection schema."""
    from datasets import ClassLabel

    missing = [column for column in ("image", "image_id", "objects") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing} of the detection schema "
            f"(image, image_id, objects{{bbox, category, area, id}}); columns present: {dataset.column_names}"
        )
    feature = category_feature(dataset.features)
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    if class_names is None:
        raise ValueError(
            f"{source}: 'objects.category' must be a ClassLabel (or pass class_names), got {feature!r}"
        )
    return len(class_names)


def _with_class_label(dataset, class_names: list[str] | None):
    """The dataset with ``objects.category`` made a ClassLabel of ``class_names`` (no-op when it is one)."""
    from datasets import ClassLabel, List

    if isinstance(category_feature(dataset.features), ClassLabel):
        return dataset
    features = dataset.features.copy()
    features["objects"]["category"] = List(ClassLabel(names=list(class_names)))
    return dataset.cast(features)


def validate_detection_dataset(
    dataset, skip_invalid: bool = False, source: str = "dataset", class_names: list[str] | None = None
) -> DetectionData:
    """Check every image and box of a ``Dataset`` or ``DatasetDict`` in the detection schema.

    Checks: the image exists and can be read, with pixels that scale to 8 bits; each box is 4 finite numbers
    with positive width and height inside the image as stored (within ``BOX_EDGE_TOLERANCE_PX``, clipped);
    each category is a ClassLabel id. EXIF-rotated and 16-bit images come out re-encoded (module docstring).

    Args:
        dataset: a ``datasets.Dataset`` or ``DatasetDict``.
        skip_invalid: drop bad images and boxes (counted in ``skipped``, logged) instead of raising.
        source: what to call the data in messages (a file, a dataset name).
        class_names: the names when ``objects.category`` holds plain integers (they become a ClassLabel
            once checked); ignored when it is a ClassLabel already.

    Raises:
        ValueError: on a missing column, or, unless ``skip_invalid``, on any invalid record; the message
            names the source and each record.
    """
    from datasets import DatasetDict

    splits = dataset if isinstance(dataset, DatasetDict) else {None: dataset}
    cleaned, problems, crowd_regions = {}, [], 0
    for split, split_dataset in splits.items():
        split_source = source if split is None else f"{source} [{split}]"
        num_classes = _require_schema(split_dataset, split_source, class_names)
        cleaned[split], split_problems, split_crowd = _validate_split(
            split_dataset, skip_invalid, split_source, num_classes
        )
        problems.extend(split_problems)
        crowd_regions += split_crowd
    skipped = raise_or_skip(problems, skip_invalid, source)
    cleaned = {split: _with_class_label(part, class_names) for split, part in cleaned.items()}
    result = DatasetDict(cleaned) if isinstance(dataset, DatasetDict) else cleaned[None]
    messages = [problem.message for problem in problems] if skip_invalid else []
    return DetectionData(result, skipped, messages, crowd_regions=crowd_regions)
