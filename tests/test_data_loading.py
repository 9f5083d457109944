"""Loaders: COCO folders, saved and in-memory datasets, and the shared bad-data checks."""

import copy
import json
import logging

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from hf_caldetr.data import (
    category_names,
    id2label,
    label2id,
    load_coco_folder,
    load_digits_detection,
    load_hub_dataset,
    prepare_detection_dataset,
    validate_detection_dataset,
)

# Sparse COCO category ids, listed out of order: ClassLabel ids follow the COCO ids' order.
CATEGORIES = [{"id": 7, "name": "truck"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
IMAGES = [
    {"id": 10, "file_name": "a.png", "width": 64, "height": 48},
    {"id": 11, "file_name": "sub/b.png", "width": 40, "height": 40},
    {"id": 12, "file_name": "empty.png", "width": 32, "height": 32},
]
ANNOTATIONS = [
    {"id": 100, "image_id": 10, "category_id": 1, "bbox": [2, 3, 20, 10], "area": 150.0, "iscrowd": 0},
    {"id": 101, "image_id": 10, "category_id": 7, "bbox": [30.5, 10, 33.5, 38], "area": 1273.0, "iscrowd": 0},
    {"id": 102, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600.0, "iscrowd": 0},
    {"id": 103, "image_id": 11, "category_id": 1, "bbox": [5, 5, 5, 5], "area": 25.0, "iscrowd": 1},
]


def write_coco(folder, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES, skip_files=()):
    """Write PNGs for ``images`` (except ``skip_files``) and the JSON; return (json path, images dir)."""
    images_dir = folder / "images"
    for index, image in enumerate(images):
        if image["file_name"] in skip_files:
            continue
        path = images_dir / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((image["height"], image["width"], 3), 40 * index, dtype=np.uint8)
        PILImage.fromarray(pixels).save(path)
    annotations_json = folder / "annotations.json"
    content = {"images": images, "annotations": annotations, "categories": categories}
    annotations_json.write_text(json.dumps(content))
    return str(annotations_json), str(images_dir)


def with_annotation(**changes):
    """ANNOTATIONS with annotation 101 changed."""
    annotations = copy.deepcopy(ANNOTATIONS)
    annotations[1].update(changes)
    return annotations


def test_coco_folder_round_trip(tmp_path):
    data = load_coco_folder(*write_coco(tmp_path))
    dataset = data.dataset
    assert category_names(dataset) == ["person", "car", "truck"]
    assert data.source_category_ids == [1, 3, 7]
    assert id2label(dataset) == {0: "person", 1: "car", 2: "truck"} and label2id(dataset)["truck"] == 2
    assert dataset["image_id"] == [10, 11, 12]
    first = dataset[0]
    assert first["image"].size == (64, 48) and first["image"].mode == "RGB"
    assert first["objects"]["bbox"] == [[2.0, 3.0, 20.0, 10.0], [30.5, 10.0, 33.5, 38.0]]
    assert first["objects"]["category"] == [0, 2]
    assert first["objects"]["id"] == [100, 101]
    assert first["objects"]["area"] == [150.0, 1273.0]
    assert first["objects"]["iscrowd"] == [0, 0]
    # the crowd box of image 11 is kept as a crowd region and counted; the image without boxes is kept
    assert dataset[1]["objects"]["id"] == [102, 103] and dataset[1]["objects"]["iscrowd"] == [0, 1]
    assert dataset[1]["objects"]["bbox"][1] == [5.0, 5.0, 5.0, 5.0]
    assert dataset[2]["objects"]["bbox"] == [] and dataset[2]["objects"]["iscrowd"] == []
    assert data.skipped == {} and data.problems == [] and data.crowd_regions == 1


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON.*line 1"):
        load_coco_folder(str(path), str(tmp_path))


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"categories": CATEGORIES}, r"odd\.json: no 'images' list"),
        ({"images": {}, "categories": CATEGORIES}, r"odd\.json: 'images' must be a list"),
        ({"images": IMAGES, "annotations": []}, r"odd\.json: no 'categories' list"),
        ({"images": IMAGES, "categories": []}, r"odd\.json: 'categories' is empty; list every class"),
    ],
)
def test_coco_layout_without_images_or_categories_is_refused(tmp_path, content, expected):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=expected):
        load_coco_folder(str(path), str(tmp_path))


def test_missing_image_names_file_and_record(tmp_path):
    annotations_json, images_dir = write_coco(tmp_path, skip_files=("sub/b.png",))
    with pytest.raises(ValueError) as raised:
        load_coco_folder(annotations_json, images_dir)
    message = str(raised.value)
    assert "annotations.json" in message and "image id 11" in message and "sub/b.png" in message
    assert "missing" in message


def test_unreadable_image_names_file_and_record(tmp_path):
    annotations_json, images_dir = write_coco(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"image id 10 \(.*a\.png\): image cannot be read"):
        load_coco_folder(annotations_json, images_dir)


@pytest.mark.parametrize(
    "bbox, expected",
    [
        ([30, 10, 0, 38], "non-positive width or height"),
        ([30, 10, 20, -4], "non-positive width or height"),
        ([50, 10, 30, 20], "outside the 64x48 image"),
        ([-5, 10, 20, 20], "outside the 64x48 image"),
        ([1, 2, 3], "not 4 numbers"),
        (["1", 2, 3, 4], "not 4 numbers"),
    ],
)
def test_bad_box_names_file_and_record(tmp_path, bbox, expected):
    annotations_json, images_dir = write_coco(tmp_path, annotations=with_annotation(bbox=bbox))
    with pytest.raises(ValueError) as raised:
        load_coco_folder(annotations_json, images_dir)
    message = str(raised.value)
    assert "annotations.json" in message and "image id 10" in message and "annotation id 101" in message
    assert "a.png" in message and expected in message


def test_box_overshooting_by_a_fraction_of_a_pixel_is_clipped(tmp_path):
    annotations = with_annotation(bbox=[30.5, 10, 33.9, 38.4])
    data = load_coco_folder(*write_coco(tmp_path, annotations=annotations))
    assert data.dataset[0]["objects"]["bbox"][1] == [30.5, 10.0, 33.5, 38.0]


def test_unknown_category_names_file_and_record(tmp_path):
    annotations_json, images_dir = write_coco(tmp_path, annotations=with_annotation(category_id=2))
    with pytest.raises(ValueError, match=r"image id 10 \(a\.png\), annotation id 101: unknown category id 2"):
        load_coco_folder(annotations_json, images_dir)


def test_annotation_of_unknown_image_is_reported(tmp_path):
    annotations_json, images_dir = write_coco(tmp_path, annotations=with_annotation(image_id=99))
    with pytest.raises(ValueError, match=r"image id 99, annotation id 101: no image with this id"):
        load_coco_folder(annotations_json, images_dir)


def test_annotation_without_id_is_malformed(tmp_path):
    annotations = copy.deepcopy(ANNOTATIONS) + [{"image_id": 10, "category_id": 1, "bbox": [1, 1, 2, 2]}]
    annotations_json, images_dir = write_coco(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"annotations\.json: annotations\[4\] needs an integer 'id'"):
        load_coco_folder(annotations_json, images_dir)
    data = load_coco_folder(annotations_json, images_dir, skip_invalid=True)
    assert data.skipped == {"malformed_record": 1} and len(data.dataset) == 3


def test_skip_invalid_counts_each_reason(tmp_path, caplog):
    annotations = copy.deepcopy(ANNOTATIONS) + [
        {"id": 104, "image_id": 10, "category_id": 1, "bbox": [2, 3, 0, 10]},
        {"id": 105, "image_id": 10, "category_id": 1, "bbox": [60, 40, 30, 30]},
        {"id": 106, "image_id": 10, "category_id": 5, "bbox": [2, 3, 4, 4]},
        {"id": 107, "image_id": 12, "category_id": 3, "bbox": [1, 1, 2]},
        {"id": 108, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2]},
    ]
    annotations_json, images_dir = write_coco(tmp_path, annotations=annotations, skip_files=("sub/b.png",))
    with caplog.at_level(logging.WARNING, logger="hf_caldetr.data"):
        data = load_coco_folder(annotations_json, images_dir, skip_invalid=True)
    assert data.skipped == {
        "non_positive_box": 1,
        "box_outside_image": 1,
        "unknown_category": 1,
        "malformed_box": 1,
        "missing_image": 1,
    }
    assert len(data.problems) == 5 and any("annotation id 105" in problem for problem in data.problems)
    assert "skipped" in caplog.text and "missing_image" in caplog.text
    dataset = data.dataset
    # image 11 (missing file) is gone with its boxes; image 10 keeps its two good boxes; 12 stays empty
    assert dataset["image_id"] == [10, 12]
    assert dataset[0]["objects"]["id"] == [100, 101]
    assert dataset[1]["objects"]["id"] == []


def test_many_problems_are_listed_then_counted(tmp_path):
    annotations = [{"id": 200 + i, "image_id": 10, "category_id": 1, "bbox": [1, 1, 0, 1]} for i in range(8)]
    annotations_json, images_dir = write_coco(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"(?s)8 invalid record\(s\).*and 3 more") as raised:
        load_coco_folder(annotations_json, images_dir)
    assert "annotation id 204" in str(raised.value) and "annotation id 205" not in str(raised.value)


def in_memory_rows():
    """Two rows in the Hub layout: objects as a dict of lists, categories as a ClassLabel."""
    pixels = np.zeros((40, 50, 3), dtype=np.uint8)
    objects = [
        {"bbox": [[1.0, 2.0, 10.0, 12.0]], "category": [1], "area": [120.0], "id": [5]},
        {"bbox": [], "category": [], "area": [], "id": []},
    ]
    return {"image": [PILImage.fromarray(pixels)] * 2, "image_id": [1, 2], "objects": objects}


def hub_features(names=("cat", "dog")):
    return Features(
        {
            "image": Image(),
            "image_id": Value("int64"),
            "objects": {
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(names))),
                "area": List(Value("float32")),
                "id": List(Value("int64")),
            },
        }
    )


def test_in_memory_dataset_goes_through_the_same_path():
    dataset = Dataset.from_dict(in_memory_rows(), features=hub_features())
    data = prepare_detection_dataset(dataset)
    assert category_names(data.dataset) == ["cat", "dog"]
    row = data.dataset[0]
    assert row["image"].mode == "RGB" and row["objects"]["bbox"] == [[1.0, 2.0, 10.0, 12.0]]
    assert data.dataset[1]["objects"]["bbox"] == []


def test_in_memory_bad_box_is_reported_with_its_record():
    rows = in_memory_rows()
    rows["objects"][0]["bbox"] = [[45.0, 2.0, 10.0, 12.0]]
    dataset = Dataset.from_dict(rows, features=hub_features())
    with pytest.raises(ValueError, match=r"my-data: image id 1, annotation id 5: box .* outside the 50x40"):
        prepare_detection_dataset(dataset, source="my-data")
    data = prepare_detection_dataset(dataset, skip_invalid=True)
    assert data.skipped == {"box_outside_image": 1} and data.dataset[0]["objects"]["bbox"] == []


def test_list_of_structs_with_string_categories_is_brought_to_the_schema():
    rows = {
        "image": [PILImage.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))],
        "objects": [
            [{"bbox": [1.0, 2.0, 10.0, 12.0], "category": "dog"}, {"bbox": [3, 4, 5, 6], "category": "cat"}]
        ],
    }
    data = prepare_detection_dataset(Dataset.from_dict(rows))
    row = data.dataset[0]
    assert category_names(data.dataset) == ["cat", "dog"]
    assert row["image_id"] == 0
    assert row["objects"] == {
        "bbox": [[1.0, 2.0, 10.0, 12.0], [3.0, 4.0, 5.0, 6.0]],
        "category": [1, 0],
        "area": [120.0, 30.0],
        "id": [0, 1],
    }


def test_integer_categories_need_class_names():
    rows = in_memory_rows()
    features = hub_features()
    features["objects"]["category"] = List(Value("int64"))
    dataset = Dataset.from_dict(rows, features=features)
    with pytest.raises(ValueError, match="must be a ClassLabel"):
        prepare_detection_dataset(dataset)
    data = prepare_detection_dataset(dataset, class_names=["cat", "dog"])
    assert category_names(data.dataset) == ["cat", "dog"]
    rows["objects"][0]["category"] = [4]
    with pytest.raises(ValueError, match="category 4 is not one of the 2 class ids"):
        prepare_detection_dataset(Dataset.from_dict(rows, features=features), class_names=["cat", "dog"])
    skipped = prepare_detection_dataset(
        Dataset.from_dict(rows, features=features), class_names=["cat", "dog"], skip_invalid=True
    )
    assert skipped.skipped == {"unknown_category": 1}
    assert skipped.dataset[0]["objects"]["category"] == [] and category_names(skipped.dataset) == [
        "cat",
        "dog",
    ]


def test_missing_columns_are_named():
    dataset = Dataset.from_dict({"image_id": [1], "boxes": [[1, 2, 3, 4]]})
    with pytest.raises(ValueError, match="missing column 'image'"):
        prepare_detection_dataset(dataset)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image', 'objects'\]"):
        validate_detection_dataset(dataset)


def test_saved_dataset_loads_offline_with_splits(tmp_path):
    digits = load_digits_detection(num_train=6, num_validation=4, seed=1)
    digits.save_to_disk(str(tmp_path / "saved"))
    data = load_hub_dataset(str(tmp_path / "saved"))
    assert isinstance(data.dataset, DatasetDict) and len(data.dataset["validation"]) == 4
    assert category_names(data.dataset) == [str(d) for d in range(10)]
    validation = load_hub_dataset(str(tmp_path / "saved"), split="validation").dataset
    assert validation["objects"] == digits["validation"]["objects"]
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        load_hub_dataset(str(tmp_path / "saved"), split="test")


def test_image_folder_loads_through_load_dataset(tmp_path):
    """A local folder of images with a metadata.jsonl, read by ``datasets.load_dataset`` offline."""
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    lines = []
    for index in range(2):
        PILImage.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(folder / f"{index}.png")
        objects = {"bbox": [[1.0, 1.0, 5.0, 6.0]], "category": ["zero" if index == 0 else "one"]}
        lines.append(json.dumps({"file_name": f"{index}.png", "image_id": index, "objects": objects}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    data = load_hub_dataset(str(tmp_path / "imagefolder"), split="train")
    assert category_names(data.dataset) == ["one", "zero"]
    assert data.dataset[1]["objects"]["category"] == [0] and data.dataset[0]["objects"]["area"] == [30.0]


# ------------------------------------------------------------------- images decoded as stored, in 8-bit RGB


def write_image_source(folder, kind, file_name, save):
    """A one-image dataset of the file ``save(path)`` writes: a COCO folder, an in-memory Hub-style dataset of
    the file's bytes, or a ``save_to_disk`` folder of it; returns the loaded dataset."""
    path = folder / file_name
    save(path)
    if kind == "coco":
        images = [{"id": 1, "file_name": file_name}]
        annotations_json = folder / "annotations.json"
        annotations_json.write_text(json.dumps({"images": images, "annotations": [], "categories": CATEGORIES}))
        return load_coco_folder(str(annotations_json), str(folder)).dataset
    rows = {
        "image": [{"bytes": path.read_bytes(), "path": None}],
        "image_id": [1],
        "objects": [{"bbox": [], "category": [], "area": [], "id": []}],
    }
    dataset = Dataset.from_dict(rows, features=hub_features())
    if kind == "hub":
        return prepare_detection_dataset(dataset).dataset
    DatasetDict(train=dataset).save_to_disk(str(folder / "saved"))
    return load_hub_dataset(str(folder / "saved"), split="train").dataset


SOURCES = ["coco", "hub", "saved"]


@pytest.mark.parametrize("kind", SOURCES)
def test_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path, kind):
    """PIL's convert("RGB") clips 16-bit grey at 255: the image came out all white."""
    grey = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 340).astype(np.uint16)  # 0 .. 64940
    dataset = write_image_source(tmp_path, kind, "deep.png", lambda path: PILImage.fromarray(grey).save(path))
    assert PILImage.open(tmp_path / "deep.png").mode == "I;16"
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (16, 12)
    pixels = np.asarray(image)
    expected = np.rint(grey / 257).astype(np.uint8)
    assert np.array_equal(pixels, np.repeat(expected[..., None], 3, axis=2))
    assert pixels.min() == 0 and pixels.max() == 253


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_rotated_jpeg_keeps_its_stored_pixels_and_boxes_frame(tmp_path, kind, orientation):
    """Boxes refer to the image as stored (COCO's convention); ``datasets`` EXIF-transposed the pixels."""
    stored = np.zeros((30, 40, 3), dtype=np.uint8)
    stored[2:12, 3:15] = 250  # a bright patch at the top left of the stored image

    def save(path):
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        PILImage.fromarray(stored).save(path, exif=exif, quality=95)

    dataset = write_image_source(tmp_path, kind, "turned.jpg", save)
    with PILImage.open(tmp_path / "turned.jpg") as raw:
        assert raw.getexif()[0x0112] == orientation
        decoded_as_stored = np.asarray(raw.convert("RGB"))
    pixels = np.asarray(dataset[0]["image"])
    assert pixels.shape == (30, 40, 3) and np.array_equal(pixels, decoded_as_stored)
    assert pixels[2:12, 3:15].mean() > 240 and pixels[18:, 25:].mean() < 15


def test_box_of_exif_rotated_image_is_checked_against_the_stored_size(tmp_path):
    """A 40x30 image tagged "rotate 90": a box 35 px wide fits it as stored, not as displayed (30x40)."""
    exif = PILImage.Exif()
    exif[0x0112] = 6
    PILImage.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(tmp_path / "turned.jpg", exif=exif)
    images = [{"id": 1, "file_name": "turned.jpg"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 35, 20]}]
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (tmp_path / "annotations.json").write_text(json.dumps(content))
    data = load_coco_folder(str(tmp_path / "annotations.json"), str(tmp_path))
    assert data.dataset[0]["image"].size == (40, 30) and data.dataset[0]["objects"]["bbox"] == [[2, 2, 35, 20]]


@pytest.mark.parametrize("mode, pixels", [("I", np.int32), ("F", np.float32)])
def test_images_without_an_8_bit_scaling_are_refused_and_counted(tmp_path, mode, pixels):
    PILImage.fromarray(np.ones((8, 8), dtype=pixels) * 3).save(tmp_path / "deep.tif")
    assert PILImage.open(tmp_path / "deep.tif").mode == mode
    content = {"images": [{"id": 1, "file_name": "deep.tif"}], "annotations": [], "categories": CATEGORIES}
    (tmp_path / "annotations.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"image id 1 \(.*deep\.tif\): image mode '{mode}' .* convert it"):
        load_coco_folder(str(tmp_path / "annotations.json"), str(tmp_path))
    data = load_coco_folder(str(tmp_path / "annotations.json"), str(tmp_path), skip_invalid=True)
    assert data.skipped == {"unsupported_image": 1} and len(data.dataset) == 0


# -------------------------------------------------------------------------- class names across Hub splits


def one_row_per_category(categories, names):
    rows = in_memory_rows()
    rows["objects"] = [
        {"bbox": [[1.0, 2.0, 10.0, 12.0]], "category": [category], "area": [120.0], "id": [5]}
        for category in categories
    ]
    rows["image"], rows["image_id"] = rows["image"][:1] * len(categories), list(range(len(categories)))
    return Dataset.from_dict(rows, features=hub_features(names))


def test_splits_with_class_names_in_another_order_are_remapped_by_name():
    """Cast to the train split's names without remapping, the validation "cat" became "dog"."""
    dataset = DatasetDict(
        train=one_row_per_category([0, 1], ["cat", "dog"]),  # cat, dog
        validation=one_row_per_category([0, 1, 1], ["dog", "cat"]),  # dog, cat, cat
    )
    loaded = prepare_detection_dataset(dataset).dataset
    assert category_names(loaded) == ["cat", "dog"]
    for split, expected in (("train", ["cat", "dog"]), ("validation", ["dog", "cat", "cat"])):
        feature = loaded[split].features["objects"]["category"].feature
        assert feature.names == ["cat", "dog"]
        assert [feature.int2str(row["category"][0]) for row in loaded[split]["objects"]] == expected
    # the train split sets the order even when it is not the first
    reordered = prepare_detection_dataset(DatasetDict(validation=dataset["validation"], train=dataset["train"]))
    assert category_names(reordered.dataset["validation"]) == ["cat", "dog"]
    assert reordered.dataset["validation"]["objects"] == loaded["validation"]["objects"]


@pytest.mark.parametrize(
    "validation_names, expected",
    [
        (["dog", "bird"], r"split 'validation' has class\(es\) \['bird'\] that split 'train' lacks and lacks "
                          r"class\(es\) \['cat'\]"),
        (["dog"], r"split 'validation' lacks class\(es\) \['cat'\] of split 'train'"),
        (["cat", "dog", "bird"], r"split 'validation' has class\(es\) \['bird'\] that split 'train' lacks;"),
    ],
)
def test_splits_naming_different_classes_are_refused(validation_names, expected):
    dataset = DatasetDict(
        train=one_row_per_category([0, 1], ["cat", "dog"]),
        validation=one_row_per_category([0], validation_names),
    )
    with pytest.raises(ValueError, match=expected):
        prepare_detection_dataset(dataset, source="pets")


def test_no_class_at_all_is_refused():
    rows = in_memory_rows()
    rows["objects"] = [{"bbox": [], "category": [], "area": [], "id": []}] * 2
    with pytest.raises(ValueError, match="no class names.*at least one class"):
        prepare_detection_dataset(Dataset.from_dict(rows, features=hub_features(names=())))


# ------------------------------------------------------------------------------------------------ crowd regions


def every_fourth_crowd(annotations):
    """``annotations`` with every 4th one (positions 3, 7, ...) marked crowd, the others not."""
    return [{**annotation, "iscrowd": int(position % 4 == 3)} for position, annotation in enumerate(annotations)]


CROWDED_ANNOTATIONS = every_fourth_crowd(
    ANNOTATIONS[:3]
    + [
        {"id": 103, "image_id": 10, "category_id": 1, "bbox": [1, 1, 40, 30], "area": 1200.0},
        {"id": 104, "image_id": 11, "category_id": 1, "bbox": [5, 5, 5, 5], "area": 25.0},
        {"id": 105, "image_id": 12, "category_id": 3, "bbox": [2, 2, 10, 10], "area": 100.0},
        {"id": 106, "image_id": 10, "category_id": 7, "bbox": [3, 20, 12, 20], "area": 240.0},
        {"id": 107, "image_id": 12, "category_id": 7, "bbox": [0, 0, 32, 32], "area": 1024.0},
    ]
)


def test_crowd_annotations_are_kept_as_crowd_regions_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_caldetr.data"):
        data = load_coco_folder(*write_coco(tmp_path, annotations=CROWDED_ANNOTATIONS))
    assert data.crowd_regions == 2 and data.skipped == {} and data.problems == []
    assert "2 crowd region(s)" in caplog.text and "annotations.json" in caplog.text
    dataset = data.dataset
    assert dataset.features["objects"]["iscrowd"] == List(Value("int8"))
    by_id = {
        annotation_id: (box, crowd)
        for objects in dataset["objects"]
        for annotation_id, box, crowd in zip(objects["id"], objects["bbox"], objects["iscrowd"])
    }
    # every annotation is there, each with its own flag; crowd regions keep their box and class
    assert sorted(by_id) == [annotation["id"] for annotation in CROWDED_ANNOTATIONS]
    for annotation in CROWDED_ANNOTATIONS:
        assert by_id[annotation["id"]] == ([float(v) for v in annotation["bbox"]], annotation["iscrowd"])
    assert dataset[2]["objects"]["category"] == [1, 2] and dataset[2]["objects"]["iscrowd"] == [0, 1]


def test_a_bad_crowd_box_is_checked_like_any_box(tmp_path):
    annotations = every_fourth_crowd(ANNOTATIONS[:3] + [{"id": 103, "image_id": 10, "category_id": 1,
                                                         "bbox": [50, 10, 30, 20]}])
    annotations_json, images_dir = write_coco(tmp_path, annotations=annotations)
    with pytest.raises(ValueError, match=r"annotation id 103: box .* outside the 64x48 image"):
        load_coco_folder(annotations_json, images_dir)
    data = load_coco_folder(annotations_json, images_dir, skip_invalid=True)
    # skipped, and not counted as a crowd region
    assert data.skipped == {"box_outside_image": 1} and data.crowd_regions == 0
    assert data.dataset[0]["objects"]["iscrowd"] == [0, 0]


def test_crowd_regions_of_skipped_images_are_not_counted(tmp_path):
    data = load_coco_folder(*write_coco(tmp_path, skip_files=("sub/b.png",)), skip_invalid=True)
    assert data.skipped == {"missing_image": 1} and data.crowd_regions == 0


@pytest.mark.parametrize("dtype", ["bool", "int64"])
def test_hub_objects_with_iscrowd_keep_it(dtype):
    rows = in_memory_rows()
    rows["objects"][0].update(bbox=[[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 30.0, 20.0]], category=[1, 0],
                              area=[120.0, 600.0], id=[5, 6], iscrowd=[False, True])
    rows["objects"][1]["iscrowd"] = []
    features = hub_features()
    features["objects"]["iscrowd"] = List(Value(dtype))
    data = prepare_detection_dataset(Dataset.from_dict(rows, features=features))
    assert data.crowd_regions == 1
    assert data.dataset.features["objects"]["iscrowd"] == List(Value("int8"))
    assert data.dataset[0]["objects"]["iscrowd"] == [0, 1] and data.dataset[1]["objects"]["iscrowd"] == []


def test_list_of_structs_with_iscrowd_keep_it():
    rows = {
        "image": [PILImage.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))] * 2,
        "objects": [
            [{"bbox": [1.0, 2.0, 10.0, 12.0], "category": "dog", "iscrowd": 0},
             {"bbox": [3, 4, 5, 6], "category": "cat", "iscrowd": 1}],
            [],
        ],
    }
    data = prepare_detection_dataset(Dataset.from_dict(rows))
    assert data.crowd_regions == 1
    assert data.dataset[0]["objects"] == {
        "bbox": [[1.0, 2.0, 10.0, 12.0], [3.0, 4.0, 5.0, 6.0]],
        "category": [1, 0],
        "area": [120.0, 30.0],
        "id": [0, 1],
        "iscrowd": [0, 1],
    }
    assert data.dataset[1]["objects"]["iscrowd"] == []


def test_data_without_iscrowd_gets_no_crowd_field():
    data = prepare_detection_dataset(Dataset.from_dict(in_memory_rows(), features=hub_features()))
    assert "iscrowd" not in data.dataset.features["objects"] and data.crowd_regions == 0
    digits = load_digits_detection(num_train=2, num_validation=0, seed=0)["train"]
    assert "iscrowd" not in digits.features["objects"]
    assert validate_detection_dataset(digits).crowd_regions == 0
