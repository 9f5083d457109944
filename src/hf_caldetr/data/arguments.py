"""The data flags of the example scripts, and the splits they name: a Hub dataset, COCO folders or the default.

``examples/train.py`` and ``examples/evaluate.py`` share ``DataArguments``, so a model is evaluated on data named
exactly as it was trained on. Three sources, first match wins:

- ``--dataset_name``: a Hub dataset or ``save_to_disk`` folder in the detection schema, its splits named by
  ``--train_split`` / ``--validation_split``;
- ``--train_annotations/--train_images`` and ``--validation_annotations/--validation_images``: COCO folders;
- otherwise the embedded digits default (``--num_train_images``, ``--num_validation_images``, ``--image_size``,
  ``--data_seed``).

A post-hoc calibrator is fitted on a split the evaluation never sees (``load_calibration_split``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .digits import generate_digit_scenes, scenes_to_dataset
from .loading import load_coco_folder, load_hub_dataset

ROLES = ("train", "validation")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": (
        "the data source: a Hub dataset id or a datasets save_to_disk folder with an 'image' column and an "
        "'objects' column {'bbox': COCO [x, y, w, h] boxes in pixels, 'category': class ids (ClassLabel) or "
        "names} per image, split by --train_split / --validation_split. Takes precedence over the COCO folder "
        "flags; with neither, the embedded digits scenes are used. See the README section 'Your own data'")})
    train_split: str = field(default="train", metadata={"help": (
        "the split of --dataset_name trained on (evaluate.py: the one a calibrator is fitted on unless "
        "--calibration_split names another); ignored for COCO folders and the digits default")})
    validation_split: str = field(default="validation", metadata={"help": (
        "the split of --dataset_name evaluated, as is (in-domain) and corrupted (out-of-domain); ignored for COCO "
        "folders and the digits default")})
    train_annotations: str | None = field(default=None, metadata={"help": (
        "COCO detection JSON of the training images (images with file_name, annotations with bbox [x, y, w, h] "
        "in pixels and category_id, categories); with --train_images, used when --dataset_name is not given "
        "(evaluate.py: only to fit a calibrator on). See the README section 'Your own data'")})
    train_images: str | None = field(default=None, metadata={"help": (
        "the folder the file_name of every image in --train_annotations is relative to")})
    validation_annotations: str | None = field(default=None, metadata={"help": (
        "COCO detection JSON of the evaluated images (images with file_name, annotations with bbox [x, y, w, h] "
        "in pixels and category_id, categories); with --validation_images, used when --dataset_name is not "
        "given. See the README section 'Your own data'")})
    validation_images: str | None = field(default=None, metadata={"help": (
        "the folder the file_name of every image in --validation_annotations is relative to")})
    skip_invalid: bool = field(default=False, metadata={"help": (
        "skip (count and log) invalid records of a Hub dataset or COCO folder (an unreadable image, a malformed "
        "or impossible box, an unknown category) instead of stopping with the list of them")})
    image_size: int = field(default=96, metadata={"help": (
        "the square side (pixels) the image processor resizes every image to; 0 keeps each image at its own size "
        "and pads the batch. Also the side of the generated digits scenes (at least 32 there). evaluate.py uses it "
        "only for a checkpoint saved without its image processor")})
    num_train_images: int = field(default=4000, metadata={"help": (
        "number of training scenes generated; digits default only")})
    num_validation_images: int = field(default=500, metadata={"help": (
        "number of validation scenes generated; digits default only")})
    data_seed: int = field(default=0, metadata={"help": (
        "generation seed of the digits scenes (train and validation); digits default only")})
    corruption_seed: int = field(default=0, metadata={"help": (
        "seed of the corruption (type, severity, noise) drawn for each image of the out-of-domain copy of the "
        "validation split")})
    skip_out_of_domain: bool = field(default=False, metadata={"help": (
        "skip the out-of-domain evaluation on the corrupted copy of the validation split")})


def _hub_split(data, name: str, source: str):
    if not hasattr(data, "keys"):
        raise ValueError(f"{source} has no splits, so split {name!r} cannot be taken from it")
    if name not in data:
        raise ValueError(f"{source}: no split {name!r} (splits: {sorted(data)})")
    return data[name]


def _require_images(dataset, role: str, source: str, skipped=None, fix: str = ""):
    """``dataset``, or a ``ValueError`` naming the split and the source when it has no images (torch's
    sampler would only say "num_samples should be a positive integer" for a train split, and an evaluation on
    no images has nothing to measure)."""
    if len(dataset) > 0:
        return dataset
    if skipped:
        why = (f"none left after skipping {sum(skipped.values())} invalid record(s) "
               f"({dict(sorted(skipped.items()))}): rerun without --skip_invalid to see each problem, then fix "
               "the records or the images")
    else:
        why = fix or "the source lists no images"
    raise ValueError(f"the {role} split ({source}) has no images: {why}")


def _uses_coco_folders(args) -> bool:
    return any(getattr(args, f"{role}_{kind}") for role in ROLES for kind in ("annotations", "images"))


def load_splits(args, roles: tuple[str, ...] = ROLES) -> tuple:
    """The datasets of ``roles`` (default ``("train", "validation")``) in the detection schema, in that order.

    ``args`` holds ``DataArguments``' fields. A Hub dataset is loaded whole (string categories get their ids from
    the names of every split) and indexed by ``--train_split`` / ``--validation_split``. COCO folders need the
    annotations and images of each role asked for (a run given only some of them stops rather than falling
    back to the default). The digits default generates only the roles asked for, the same scenes as
    ``load_digits_detection``.

    Raises:
        ValueError: a split with no images (an empty source, or every image skipped by ``--skip_invalid``),
            naming the split and the source.
    """
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise ValueError(f"unknown split role(s) {unknown}; expected some of {ROLES}")
    if args.dataset_name:
        data = load_hub_dataset(args.dataset_name, skip_invalid=args.skip_invalid)
        return tuple(
            _require_images(_hub_split(data.dataset, getattr(args, f"{role}_split"), args.dataset_name), role,
                            f"{args.dataset_name} [{getattr(args, f'{role}_split')}]", data.skipped,
                            f"the split is empty; name another with --{role}_split")
            for role in roles)
    if _uses_coco_folders(args):
        missing = [f"{role}_{kind}" for role in roles for kind in ("annotations", "images")
                   if not getattr(args, f"{role}_{kind}")]
        if missing:
            raise ValueError(f"COCO folders need the annotations and images of {list(roles)}; missing {missing}")
        loaded = [load_coco_folder(getattr(args, f"{role}_annotations"), getattr(args, f"{role}_images"),
                                   skip_invalid=args.skip_invalid) for role in roles]
        return tuple(_require_images(data.dataset, role, getattr(args, f"{role}_annotations"), data.skipped,
                                     f"its 'images' list is empty; list the images of --{role}_images in it")
                     for role, data in zip(roles, loaded))
    counts = {"train": args.num_train_images, "validation": args.num_validation_images}
    return tuple(_require_images(scenes_to_dataset(generate_digit_scenes(counts[role], role, args.image_size,
                                                                         args.data_seed)),
                                 role, "digits default", fix=f"--num_{role}_images is 0; give at least 1")
                 for role in roles)


def random_subset(dataset, num_images: int, seed: int):
    """``num_images`` rows of ``dataset`` drawn without replacement by ``seed``, in their original order; the
    whole dataset when ``num_images`` is 0 or at least its length."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0 (0 takes every image), got {num_images}")
    if num_images == 0 or num_images >= len(dataset):
        return dataset
    chosen = np.random.default_rng(seed).choice(len(dataset), size=num_images, replace=False)
    return dataset.select(np.sort(chosen).tolist())


def load_calibration_split(args, split: str | None = None, num_images: int = 500, seed: int = 1):
    """Held-out images to fit a post-hoc calibrator on, never the evaluation split.

    - Digits default: ``num_images`` fresh scenes of the train split drawn with generation seed ``seed``: the
      same distribution as the training scenes (``--data_seed``), none of them a training image. ``seed`` must
      differ from ``args.data_seed``, whose first scenes are the training images.
    - COCO folders: a ``seed``-ed random subset of ``num_images`` images of the train folder.
    - Hub dataset: a ``seed``-ed random subset of split ``split`` (default ``args.train_split``), which must not
      be ``args.validation_split``.

    ``num_images`` 0 takes the whole split (digits: ``args.num_train_images`` scenes). A subset of the train
    split holds images the detector was trained on, where it is more confident than on new images; where a
    dataset has a split unused in training, name it.
    """
    if num_images < 0:
        raise ValueError(f"the number of calibration images must be >= 0 (0 takes the whole split), got {num_images}")
    if args.dataset_name:
        name = split or args.train_split
        if name == args.validation_split:
            raise ValueError(f"the calibration split {name!r} is the evaluation split: a calibrator fitted on the "
                             "images it is evaluated on flatters itself; name another split")
        data = load_hub_dataset(args.dataset_name, skip_invalid=args.skip_invalid)
        calibration = _require_images(_hub_split(data.dataset, name, args.dataset_name), "calibration",
                                      f"{args.dataset_name} [{name}]", data.skipped,
                                      "the split is empty; name another with --calibration_split")
        return random_subset(calibration, num_images, seed)
    if split not in (None, "train"):
        raise ValueError(f"--calibration_split {split!r} names a Hub dataset split; COCO folders and the digits "
                         "default calibrate on their train split only")
    if _uses_coco_folders(args):
        (train,) = load_splits(args, ("train",))
        return random_subset(train, num_images, seed)
    if seed == args.data_seed:
        raise ValueError(f"calibration seed {seed} equals --data_seed: its digit scenes would be the training "
                         "images; pick another seed")
    count = num_images or args.num_train_images
    return scenes_to_dataset(generate_digit_scenes(count, "train", args.image_size, seed))
