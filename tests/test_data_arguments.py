"""hf_caldetr.data.arguments: the scripts' data flags to datasets, and the held-out calibration split."""

import dataclasses

import pytest
from datasets import Image
from test_data_loading import IMAGES, write_coco

from hf_caldetr.data import load_digits_detection
from hf_caldetr.data.arguments import (
    DataArguments,
    load_calibration_split,
    load_splits,
    random_subset,
)

SMALL = {"num_train_images": 6, "num_validation_images": 4, "image_size": 64}


def rows(dataset):
    """Comparable content: image bytes and objects, row by row."""
    return [(row["image_id"], row["image"].tobytes(), row["objects"]) for row in dataset]


def test_digits_default_gives_load_digits_detection_splits_and_only_those_asked():
    args = DataArguments(**SMALL)
    train, validation = load_splits(args)
    reference = load_digits_detection(num_train=6, num_validation=4, image_size=64, seed=0)
    assert rows(train) == rows(reference["train"]) and rows(validation) == rows(reference["validation"])
    (only_validation,) = load_splits(args, ("validation",))
    assert rows(only_validation) == rows(reference["validation"])
    with pytest.raises(ValueError, match=r"unknown split role\(s\) \['test'\]"):
        load_splits(args, ("test",))


def test_saved_dataset_splits_by_name(tmp_path):
    load_digits_detection(num_train=5, num_validation=3, image_size=64).save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(dataset_name=str(tmp_path / "saved"))
    train, validation = load_splits(args)
    assert (len(train), len(validation)) == (5, 3)
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        load_splits(dataclasses.replace(args, validation_split="test"))

    subset = load_calibration_split(args, num_images=3, seed=4)
    assert len(subset) == 3 and rows(subset) == rows(load_calibration_split(args, num_images=3, seed=4))
    assert set(subset["image_id"]) <= set(train["image_id"])
    assert len(load_calibration_split(args, num_images=0)) == 5
    with pytest.raises(ValueError, match="'validation' is the evaluation split"):
        load_calibration_split(args, "validation")


def test_coco_folders_need_the_pair_of_each_split_asked(tmp_path):
    annotations, images = write_coco(tmp_path)
    args = DataArguments(validation_annotations=str(annotations), validation_images=str(images))
    (validation,) = load_splits(args, ("validation",))
    assert len(validation) == 3
    with pytest.raises(ValueError, match=r"missing \['train_annotations', 'train_images'\]"):
        load_splits(args)
    with pytest.raises(ValueError, match=r"missing \['train_annotations', 'train_images'\]"):
        load_calibration_split(args)
    with pytest.raises(ValueError, match="names a Hub dataset split"):
        load_calibration_split(args, "test")
    full = dataclasses.replace(args, train_annotations=str(annotations), train_images=str(images))
    assert len(load_calibration_split(full, num_images=2, seed=0)) == 2


def test_digit_calibration_scenes_are_fresh_train_scenes():
    args = DataArguments(**SMALL)
    (train,) = load_splits(args, ("train",))
    calibration = load_calibration_split(args, num_images=6, seed=1)
    assert len(calibration) == 6
    # Same generator and split, another seed: none of them is a training image.
    training_images = {row["image"].tobytes() for row in train}
    assert not training_images & {row["image"].tobytes() for row in calibration}
    assert rows(calibration) == rows(load_digits_detection(num_train=6, num_validation=0, image_size=64,
                                                           seed=1)["train"])
    with pytest.raises(ValueError, match="equals --data_seed"):
        load_calibration_split(args, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        load_calibration_split(args, num_images=-1)


def test_random_subset_is_seeded_and_keeps_row_order():
    (train,) = load_splits(DataArguments(**SMALL), ("train",))
    subset = random_subset(train, 3, seed=7)
    assert subset["image_id"] == sorted(subset["image_id"]) and len(set(subset["image_id"])) == 3
    assert subset["image_id"] == random_subset(train, 3, seed=7)["image_id"]
    assert random_subset(train, 10, seed=7) is train


def empty_source(tmp_path, kind):
    """``DataArguments`` whose train split has no images, in the way ``kind`` names."""
    if kind.startswith("coco"):
        if kind == "coco_no_images":
            annotations, images = write_coco(tmp_path, images=[], annotations=[])
        else:  # every image file missing, skipped by --skip_invalid
            annotations, images = write_coco(tmp_path, skip_files=[image["file_name"] for image in IMAGES])
        return DataArguments(train_annotations=annotations, train_images=images, skip_invalid=True)
    if kind == "digits_zero":
        return DataArguments(**{**SMALL, "num_train_images": 0})
    digits = load_digits_detection(num_train=3, num_validation=2, image_size=64)
    if kind == "hub_saved_empty":
        digits["train"] = digits["train"].select([])
    else:  # every train image unreadable, skipped by --skip_invalid
        features = digits["train"].features.copy()
        features["image"] = Image(decode=False)
        digits["train"] = digits["train"].cast(features).map(
            lambda image: {"image": {"bytes": b"not an image", "path": None}}, input_columns="image",
            features=features)
    digits.save_to_disk(str(tmp_path / "saved"))
    return DataArguments(dataset_name=str(tmp_path / "saved"), skip_invalid=True)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("coco_no_images", r"the train split \(.*annotations\.json\) has no images: its 'images' list is empty"),
        ("coco_all_skipped", r"the train split \(.*annotations\.json\) has no images: none left after skipping "
                             r"3 invalid record\(s\) \(\{'missing_image': 3\}\): rerun without --skip_invalid"),
        ("hub_all_skipped", r"the train split \(.*saved \[train\]\) has no images: none left after skipping 3 "
                            r"invalid record\(s\) \(\{'unreadable_image': 3\}\): rerun without --skip_invalid"),
        ("hub_saved_empty", r"saved: split\(s\) \['train'\] saved with no images, which datasets cannot load"),
        ("digits_zero", r"the train split \(digits default\) has no images: --num_train_images is 0"),
    ],
)
def test_a_split_without_images_is_refused_with_split_and_source(tmp_path, kind, expected):
    """Torch's sampler said only "num_samples should be a positive integer value" for an empty train split
    (and ``load_from_disk`` a bare ``IndexError`` for a split saved empty)."""
    args = empty_source(tmp_path, kind)
    with pytest.raises(ValueError, match=expected):
        load_splits(args, ("train",))
    if kind == "hub_all_skipped":
        with pytest.raises(ValueError, match=r"the calibration split \(.*saved \[train\]\) has no images"):
            load_calibration_split(args)
        assert len(load_splits(args, ("validation",))[0]) == 2
