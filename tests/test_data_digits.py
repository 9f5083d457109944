"""The embedded digits dataset: determinism, schema, box validity, split hygiene."""

import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict

from hf_caldetr.data import (
    DIGIT_NAMES,
    category_names,
    generate_digit_scenes,
    id2label,
    label2id,
    load_digits_detection,
)
from hf_caldetr.data.digits import (
    INK_THRESHOLD,
    MAX_DIGIT_PX,
    _ink_box,
    render_scene,
    source_digit_indices,
)


@pytest.fixture(scope="module")
def scenes():
    return generate_digit_scenes(200, split="train", seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_digits_detection(num_train=40, num_validation=20, seed=3)


def test_same_seed_gives_identical_scenes(scenes):
    again = generate_digit_scenes(200, split="train", seed=0)
    assert np.array_equal(scenes.images, again.images)
    for first, second in zip(scenes.boxes + scenes.categories, again.boxes + again.categories):
        assert np.array_equal(first, second)


def test_scene_depends_only_on_its_index(scenes):
    shorter = generate_digit_scenes(50, split="train", seed=0)
    assert np.array_equal(shorter.images, scenes.images[:50])
    assert all(np.array_equal(a, b) for a, b in zip(shorter.boxes, scenes.boxes[:50]))


def test_other_seed_or_split_gives_other_scenes(scenes):
    assert not np.array_equal(generate_digit_scenes(20, seed=1).images, scenes.images[:20])
    validation = generate_digit_scenes(20, split="validation", seed=0)
    assert not np.array_equal(validation.images, scenes.images[:20])


def test_arrays_have_the_documented_shapes(scenes):
    assert scenes.images.shape == (200, 96, 96, 3) and scenes.images.dtype == np.uint8
    assert list(scenes.image_ids) == list(range(200))
    for boxes, categories in zip(scenes.boxes, scenes.categories):
        assert boxes.dtype == np.float32 and boxes.shape == (len(categories), 4)
        assert categories.dtype == np.int64


def test_boxes_are_inside_and_positive(scenes):
    boxes = np.concatenate(scenes.boxes)
    assert (boxes[:, 2:] > 0).all()
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 96).all() and (boxes[:, 1] + boxes[:, 3] <= 96).all()
    assert boxes[:, 2:].max() <= MAX_DIGIT_PX


def test_object_counts_cover_empty_to_max(scenes):
    counts = np.array([len(boxes) for boxes in scenes.boxes])
    assert counts.max() <= 5
    assert 0.05 < (counts == 0).mean() < 0.35, "some images, not most, are empty"
    assert set(range(6)) <= set(counts.tolist())
    assert set(np.concatenate(scenes.categories).tolist()) == set(range(10))


def test_some_digits_overlap_but_not_much(scenes):
    from hf_caldetr.data.digits import MAX_PLACEMENT_IOU, _box_iou

    ious = [_box_iou(boxes[i], boxes[i + 1 :]).max() for boxes in scenes.boxes for i in range(len(boxes) - 1)]
    assert max(ious) <= MAX_PLACEMENT_IOU + 1e-6
    assert sum(iou > 0 for iou in ious) >= 10


def test_digits_are_brighter_than_background(scenes):
    inside, outside = [], []
    for image, boxes in zip(scenes.images[:50], scenes.boxes[:50]):
        grey = image.mean(axis=2)
        mask = np.zeros(grey.shape, dtype=bool)
        for x, y, w, h in boxes.astype(int):
            mask[y : y + h, x : x + w] = True
        if mask.any():
            inside.append(grey[mask].max())
            outside.append(np.median(grey[~mask]))
    assert np.mean(inside) > np.mean(outside) + 80


def test_ink_box_is_tight_around_opaque_pixels():
    opacity = np.zeros((20, 16), dtype=np.float32)
    opacity[3:9, 5:12] = 0.9
    opacity[15, 1] = INK_THRESHOLD - 0.01  # faint smudge: not ink
    assert _ink_box(opacity) == (5, 3, 7, 6)
    assert _ink_box(np.zeros((8, 8), dtype=np.float32)) is None


def test_each_box_holds_its_digit():
    rng = np.random.default_rng(7)
    image, boxes, _ = render_scene(rng, source_digit_indices("train"), image_size=96, max_objects=5)
    grey = image.mean(axis=2)
    assert len(boxes) > 0
    for x, y, w, h in boxes.astype(int):
        # a digit is drawn bright over the background: its box holds pixels far above the image median
        assert grey[y : y + h, x : x + w].max() > np.median(grey) + 60


def test_train_and_validation_use_disjoint_source_digits():
    train, validation = source_digit_indices("train"), source_digit_indices("validation")
    assert not set(train.tolist()) & set(validation.tolist())
    assert len(train) + len(validation) == 1797
    assert 340 <= len(validation) <= 370
    with pytest.raises(ValueError, match="unknown split 'test'"):
        source_digit_indices("test")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="image_size"):
        generate_digit_scenes(3, image_size=16)
    with pytest.raises(ValueError, match="num_images"):
        generate_digit_scenes(-1)


def test_dataset_dict_has_the_detection_schema(digits):
    assert isinstance(digits, DatasetDict) and set(digits) == {"train", "validation"}
    assert (len(digits["train"]), len(digits["validation"])) == (40, 20)
    features = digits["train"].features
    assert features["objects"]["category"].feature == ClassLabel(names=DIGIT_NAMES)
    assert category_names(digits) == DIGIT_NAMES == [str(d) for d in range(10)]
    assert id2label(digits["train"])[3] == "3" and label2id(digits["train"])["9"] == 9
    example = digits["train"][0]
    assert example["image"].mode == "RGB" and example["image"].size == (96, 96)
    objects = example["objects"]
    assert len(objects["bbox"]) == len(objects["category"]) == len(objects["area"]) == len(objects["id"])


def test_dataset_matches_the_arrays(digits):
    scenes = generate_digit_scenes(20, split="validation", seed=3)
    for index in (0, 7, 19):
        row = digits["validation"][index]
        assert np.array_equal(np.asarray(row["image"]), scenes.images[index])
        np.testing.assert_allclose(np.array(row["objects"]["bbox"]).reshape(-1, 4), scenes.boxes[index])
        assert row["objects"]["category"] == scenes.categories[index].tolist()
        boxes = scenes.boxes[index]
        np.testing.assert_allclose(row["objects"]["area"], boxes[:, 2] * boxes[:, 3])


def test_annotation_ids_are_unique_within_a_split(digits):
    ids = [i for objects in digits["train"]["objects"] for i in objects["id"]]
    assert len(ids) == len(set(ids)) and len(ids) > 0
