"""The embedded default dataset: handwritten digits composited on cluttered canvases.

Source digits come from scikit-learn's bundled ``load_digits`` (1797 greyscale 8x8 images, 10 classes), so
nothing is downloaded. Each scene is a canvas with a random background (intensity, tint, gradient, noise) and
clutter (lines, arcs, blobs dimmer than digits on average), on which 0 to ``max_objects`` digits are pasted at
a random scale. Digits are bright on a darker background, overlaps are limited, and about one image in
``max_objects + 1`` is empty. The 8x8 sources are coarse, so some digits are genuinely ambiguous (1/7, 3/9,
5/9, 8/9): the class confusion that makes calibration measurable.

Train and validation scenes draw from disjoint source digits (a fixed 80/20 split, stratified by class), and
every scene is generated from its own random stream derived from ``(seed, split, index)``, so a scene does not
depend on how many others are generated.

``style`` restyles the canvas (``STYLES``): ``"default"`` is the above; ``"ink"`` is the same scene printed as
coloured ink on paper: each pixel's brightness over black becomes ink darkness over a light, tinted paper, with one
ink colour per scene, so digits (and clutter) are darker than the background. The ink style draws its colours after
every draw of the default scene, so a scene's layout, digits and boxes are those of the default style's scene of
the same ``(seed, split, index)``; a fine-tuning target task (``benchmarks/finetune.py``) uses it with another seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

DIGIT_NAMES = [str(digit) for digit in range(10)]
SPLITS = ("train", "validation")
STYLES = ("default", "ink")
# The ink style: per-channel absorption of the scene's ink (one colour per scene) and the paper's brightness.
INK_ABSORPTION = (0.35, 1.0)
PAPER_BRIGHTNESS = (215.0, 255.0)

# Fixed, independent of the generation seed: a source digit never appears in both splits for any seed.
SOURCE_SPLIT_SEED = 20231106
VALIDATION_SOURCE_FRACTION = 0.2

MIN_DIGIT_PX, MAX_DIGIT_PX = 14, 32
# Pasted digits may overlap, but no more than this IoU with an earlier one (else it is re-placed or dropped).
MAX_PLACEMENT_IOU = 0.25
PLACEMENT_ATTEMPTS = 12
# A pixel belongs to the digit's box when the upscaled ink reaches this opacity.
INK_THRESHOLD = 0.25
# Brightness added over the background: digits in [110, 200], clutter in [30, 110], so digits are clearly
# brighter on average while faint digits and bright clutter can still be confused.
DIGIT_CONTRAST = (110.0, 200.0)
CLUTTER_CONTRAST = (30.0, 110.0)


@dataclass
class DigitScenes:
    """Scenes as arrays, for trainers that pre-generate tensors once.

    Attributes:
        images: uint8 ``[N, H, W, 3]``.
        boxes: one float32 ``[n_i, 4]`` array per image, COCO ``(x, y, width, height)`` in pixels.
        categories: one int64 ``[n_i]`` array per image, digit classes 0 to 9.
        image_ids: int64 ``[N]``.
    """

    images: np.ndarray
    boxes: list[np.ndarray]
    categories: list[np.ndarray]
    image_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@lru_cache(maxsize=1)
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 opacity in [0, 1] ``[1797, 8, 8]`` and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def source_digit_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits`` used by ``split``; the two splits are disjoint and stratified by class."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    _, labels = _source_digits()
    rng = np.random.default_rng(SOURCE_SPLIT_SEED)
    validation = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        validation.append(members[: round(len(members) * VALIDATION_SOURCE_FRACTION)])
    is_validation = np.zeros(len(labels), dtype=bool)
    is_validation[np.concatenate(validation)] = True
    return np.flatnonzero(is_validation if split == "validation" else ~is_validation)


def _box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xywh box against ``[n, 4]`` xywh boxes."""
    if len(others) == 0:
        return np.zeros(0)
    left = np.maximum(box[0], others[:, 0])
    top = np.maximum(box[1], others[:, 1])
    right = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    bottom = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    intersection = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = box[2] * box[3] + others[:, 2] * others[:, 3] - intersection
    return intersection / union


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A dark tinted canvas with a gradient, float32 channels-first ``[3, H, W]``, and its grey level."""
    # Python floats, not numpy float64 scalars, keep the canvas arithmetic in float32 (numpy 2 promotion).
    level = float(rng.uniform(0.0, 90.0))
    tint = rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
    angle = float(rng.uniform(0.0, 2 * np.pi))
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    strength = float(rng.uniform(0.0, 40.0))
    gradient = strength * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    return gradient[None, :, :] + (tint + level)[:, None, None], level


def _clutter_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brightness added by random strokes, arcs and blobs, float32 ``[H, W]``."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(0, 7)):
        brightness = int(rng.uniform(*CLUTTER_CONTRAST))
        kind = rng.integers(3)
        x0, y0 = rng.uniform(0, size, 2)
        if kind == 0:  # a straight stroke, as wide as a digit's
            x1, y1 = rng.uniform(0, size, 2)
            draw.line((x0, y0, x1, y1), fill=brightness, width=int(rng.integers(1, 4)))
        elif kind == 1:  # an arc: parts of 0, 6, 9 and 3 look like this
            radius = rng.uniform(4, 14)
            start = rng.uniform(0, 360)
            bounds = (x0 - radius, y0 - radius, x0 + radius, y0 + radius)
            draw.arc(
                bounds, start, start + rng.uniform(90, 300), fill=brightness, width=int(rng.integers(1, 4))
            )
        else:  # a filled blob
            rx, ry = rng.uniform(2, 7, 2)
            draw.ellipse((x0 - rx, y0 - ry, x0 + rx, y0 + ry), fill=brightness)
    return np.asarray(layer, dtype=np.float32)


def _upscaled_digit(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8x8 opacity map resized to ``[height, width]``, values clipped to [0, 1]."""
    resized = Image.fromarray(digit, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _ink_box(opacity: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``(x, y, w, h)`` of the pixels at or above ``INK_THRESHOLD`` inside a patch, or None."""
    rows = np.flatnonzero((opacity >= INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((opacity >= INK_THRESHOLD).any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _ink_on_paper(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """The ``"ink"`` style of a finished channels-first canvas (values in [0, 255]): brightness over black becomes
    the darkness of one per-scene ink colour over a light, tinted paper."""
    absorption = rng.uniform(*INK_ABSORPTION, size=3).astype(np.float32)
    paper = rng.uniform(*PAPER_BRIGHTNESS, size=3).astype(np.float32)
    darkness = canvas * np.float32(1.0 / 255.0)
    return paper[:, None, None] * (np.float32(1.0) - darkness * absorption[:, None, None])


def render_scene(
    rng: np.random.Generator,
    pool: np.ndarray,
    image_size: int = 96,
    max_objects: int = 5,
    style: str = "default",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene from the source digits ``pool`` (indices into ``load_digits``), in canvas ``style``.

    Returns:
        The uint8 image ``[image_size, image_size, 3]``, float32 xywh boxes ``[n, 4]`` (tight around the ink)
        and int64 categories ``[n]``.
    """
    digits, labels = _source_digits()
    canvas, level = _background(rng, image_size)
    # Channels-first while drawing: numpy broadcasts over a leading axis of 3 far faster than a trailing one.
    canvas += _clutter_layer(rng, image_size)[None, :, :]
    boxes: list[list[float]] = []
    categories: list[int] = []
    for _ in range(rng.integers(0, max_objects + 1)):
        source = pool[rng.integers(len(pool))]
        height = int(rng.integers(MIN_DIGIT_PX, MAX_DIGIT_PX + 1))
        width = int(np.clip(round(height * rng.uniform(0.8, 1.2)), MIN_DIGIT_PX, MAX_DIGIT_PX))
        opacity = _upscaled_digit(digits[source], height, width)
        ink = _ink_box(opacity)
        if ink is None:
            continue
        for _ in range(PLACEMENT_ATTEMPTS):
            left = int(rng.integers(0, image_size - width + 1))
            top = int(rng.integers(0, image_size - height + 1))
            box = np.array([left + ink[0], top + ink[1], ink[2], ink[3]], dtype=np.float32)
            if np.all(_box_iou(box, np.array(boxes, dtype=np.float32).reshape(-1, 4)) <= MAX_PLACEMENT_IOU):
                break
        else:
            continue  # no free spot: fewer digits in this scene
        colour = (level + rng.uniform(*DIGIT_CONTRAST) * rng.uniform(0.85, 1.0, size=3)).astype(np.float32)
        patch = canvas[:, top : top + height, left : left + width]
        patch += opacity[None, :, :] * (colour[:, None, None] - patch)
        boxes.append(box.tolist())
        categories.append(int(labels[source]))
    noise_scale = float(rng.uniform(3.0, 12.0))
    canvas += noise_scale * rng.standard_normal((1, image_size, image_size), dtype=np.float32)
    np.clip(canvas, 0, 255, out=canvas)
    if style == "ink":  # after every draw of the default scene, which it leaves as it is
        canvas = np.clip(_ink_on_paper(rng, canvas), 0, 255)
    elif style != "default":
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    image = np.ascontiguousarray(canvas.astype(np.uint8).transpose(1, 2, 0))
    return image, np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(categories, dtype=np.int64)


def generate_digit_scenes(
    num_images: int,
    split: str = "train",
    image_size: int = 96,
    seed: int = 0,
    max_objects: int = 5,
    style: str = "default",
) -> DigitScenes:
    """Generate ``num_images`` scenes of ``split`` as arrays: the fast path, under 1 ms per 96x96 scene.

    Scene ``i`` depends only on ``(seed, split, i, image_size, max_objects, style)``; image ids are ``0..N-1``.
    ``style``: the canvas style (``STYLES``, see the module docstring).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if image_size < MAX_DIGIT_PX:
        raise ValueError(f"image_size must be at least {MAX_DIGIT_PX} (the largest digit), got {image_size}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    pool = source_digit_indices(split)
    split_code = SPLITS.index(split)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    boxes, categories = [], []
    for index in range(num_images):
        rng = np.random.default_rng((seed, split_code, index))
        images[index], scene_boxes, scene_categories = render_scene(rng, pool, image_size, max_objects, style)
        boxes.append(scene_boxes)
        categories.append(scene_categories)
    return DigitScenes(images, boxes, categories, np.arange(num_images, dtype=np.int64))


def scenes_to_dataset(scenes: DigitScenes):
    """A ``datasets.Dataset`` in the detection schema (see ``hf_caldetr.data.schema``) from arrays."""
    from datasets import Dataset

    from .schema import detection_features, png_bytes

    next_object_id = 0
    objects = []
    for boxes, categories in zip(scenes.boxes, scenes.categories):
        count = len(boxes)
        objects.append(
            {
                "bbox": boxes.tolist(),
                "category": categories.tolist(),
                "area": (boxes[:, 2] * boxes[:, 3]).tolist(),
                "id": list(range(next_object_id, next_object_id + count)),
            }
        )
        next_object_id += count
    columns = {
        "image": [png_bytes(image) for image in scenes.images],
        "image_id": scenes.image_ids.tolist(),
        "objects": objects,
    }
    return Dataset.from_dict(columns, features=detection_features(DIGIT_NAMES))


def load_digits_detection(
    num_train: int = 4000,
    num_validation: int = 500,
    image_size: int = 96,
    seed: int = 0,
    max_objects: int = 5,
):
    """The embedded default as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    Same schema as a Hub detection dataset: ``image`` (RGB), ``image_id``, ``objects`` with ``bbox`` (COCO
    xywh), ``category`` (``ClassLabel`` "0".."9"), ``area`` and ``id``.
    """
    from datasets import DatasetDict

    return DatasetDict(
        {
            split: scenes_to_dataset(generate_digit_scenes(count, split, image_size, seed, max_objects))
            for split, count in (("train", num_train), ("validation", num_validation))
        }
    )
