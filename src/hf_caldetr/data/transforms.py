"""From schema rows to model inputs: image processor, light augmentation, collate.

Rows of the detection schema (``schema.py``) go through a transformers ``DeformableDetrImageProcessor`` in
the collate function, batch by batch: the processor pads a batch to its largest image and normalises the boxes
to that padded canvas, so processing has to see the whole batch. Labels come out as transformers' detection
losses expect them: ``class_labels`` and ``boxes`` (normalised ``cx, cy, w, h``) per image.

Crowd regions (objects with ``iscrowd`` 1, see ``schema.py``) are never training targets: ``class_labels`` and
``boxes`` hold the other objects only. Each label dict carries them apart, for evaluation, as ``crowd_boxes``
(float ``[m, 4]``, normalised ``cx, cy, w, h`` exactly as ``boxes``: they go through the same augmentation, resize
and padding) and ``crowd_class_labels`` (int64 ``[m]``); both are empty for an image without crowd regions. The
models' losses read ``class_labels`` and ``boxes`` only.

Augmentation is a small random scale and translation only. Horizontal flips are wrong here: a mirrored digit
is another glyph (or none), and the embedded default is digits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .schema import CROWD_KEY, as_rgb8, crowd_flags, objects_as_columns

# Jitter ranges of the training augmentation, and the smallest box it keeps (pixels, after clipping).
SCALE_JITTER = 0.15
SHIFT_JITTER = 0.1
MIN_VISIBLE_FRACTION = 0.5
MIN_BOX_PX = 2.0


def build_image_processor(size: int | dict | None = 96, processor_class: str = "DeformableDetrImageProcessor", **kwargs):
    """A detection image processor for small images (``DeformableDetrImageProcessor`` unless another is named).

    Args:
        size: an int resizes every image to ``size x size`` (a 96x96 image stays untouched: the resize is the
            identity); a dict is passed as transformers' ``size`` (``{"shortest_edge", "longest_edge"}`` keeps
            the aspect ratio, ``{"height", "width"}`` is exact); None keeps every image at its own size and
            pads each batch to its largest image (transformers' default of shortest edge 800 would blow a
            96 px image up eightfold).
        processor_class: the transformers class name (``DetrImageProcessor``, ``RTDetrImageProcessor`` ...).
        kwargs: any other processor argument (``image_mean``, ``do_pad`` ...).
    """
    import transformers

    processor = getattr(transformers, processor_class)
    if size is None:
        return processor(do_resize=False, **kwargs)
    if isinstance(size, int):
        size = {"height": size, "width": size}
    return processor(size=dict(size), **kwargs)


def coco_detection_target(image_id: int, objects: Any) -> dict:
    """One row's ground truth in the processor's COCO detection format.

    ``{"image_id", "annotations": [{"bbox" (xywh), "category_id", "area", "iscrowd"}]}``; ``iscrowd`` is 1 for
    crowd regions, which the processor leaves out of its labels (``prepare_batch`` keeps them apart).
    """
    columns = objects_as_columns(objects)
    annotations = [
        {"bbox": list(box), "category_id": int(category), "area": float(area), "iscrowd": int(crowd)}
        for box, category, area, crowd in zip(
            columns["bbox"], columns["category"], columns["area"], crowd_flags(columns)
        )
    ]
    return {"image_id": int(image_id), "annotations": annotations}


def _crowd_marked_target(image_id: int, objects: Any) -> dict:
    """``coco_detection_target`` with each crowd region passed as an ordinary box (``iscrowd`` 0, which the
    processor would drop) whose ``category_id`` is ``-1 - category``.

    The processor resizes, clips, normalises and pads every box alike, so crowd regions come out in exactly the
    convention of the other boxes; the sign then tells them apart (``_split_crowd``) whatever boxes the processor
    drops on the way.
    """
    target = coco_detection_target(image_id, objects)
    for annotation in target["annotations"]:
        if annotation["iscrowd"]:
            annotation.update(category_id=-1 - annotation["category_id"], iscrowd=0)
    return target


# The per-box entries of a processor's label dict (DETR, Deformable DETR, RT-DETR processors).
PER_BOX_LABEL_KEYS = ("class_labels", "boxes", "area", "iscrowd")


def _split_crowd(label):
    """A processor's label dict (``BatchFeature``) of a ``_crowd_marked_target``, changed in place: its crowd
    regions moved to ``crowd_boxes`` and ``crowd_class_labels``, the training keys keeping the other boxes."""
    crowd = label["class_labels"] < 0
    label["crowd_boxes"] = label["boxes"][crowd]
    label["crowd_class_labels"] = -1 - label["class_labels"][crowd]
    for key in PER_BOX_LABEL_KEYS:
        if key in label:
            label[key] = label[key][~crowd]
    return label


def scale_translate(
    image, boxes: np.ndarray, scale: float, shift_x: float, shift_y: float
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Zoom by ``scale`` about the centre ``c``, then shift by ``t = (shift_x, shift_y)`` pixels.

    A point moves as ``x' = s (x - c) + c + t``.

    The canvas keeps its size; uncovered areas take the image's mean colour (black borders would be an easy,
    wrong cue).

    Args:
        image: a PIL image.
        boxes: float ``[n, 4]`` xywh in pixels.

    Returns:
        The new image, the boxes moved with it and clipped, and a bool ``[n]`` mask of the boxes kept
        (at least ``MIN_VISIBLE_FRACTION`` of the box still inside and ``MIN_BOX_PX`` on each side).
    """
    from PIL import Image

    width, height = image.size
    centre_x, centre_y = width / 2, height / 2
    # PIL's affine maps output pixels to input pixels, so it takes the inverse map.
    inverse = (
        1 / scale,
        0,
        centre_x - (centre_x + shift_x) / scale,
        0,
        1 / scale,
        centre_y - (centre_y + shift_y) / scale,
    )
    fill = tuple(int(value) for value in np.asarray(image).reshape(-1, len(image.getbands())).mean(axis=0))
    moved_image = image.transform(
        image.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR, fillcolor=fill
    )

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    left = scale * (boxes[:, 0] - centre_x) + centre_x + shift_x
    top = scale * (boxes[:, 1] - centre_y) + centre_y + shift_y
    right, bottom = left + scale * boxes[:, 2], top + scale * boxes[:, 3]
    clipped_left, clipped_top = np.clip(left, 0, width), np.clip(top, 0, height)
    clipped_w = np.clip(right, 0, width) - clipped_left
    clipped_h = np.clip(bottom, 0, height) - clipped_top
    visible = (clipped_w * clipped_h) / np.maximum((right - left) * (bottom - top), 1e-9)
    keep = (visible >= MIN_VISIBLE_FRACTION) & (clipped_w >= MIN_BOX_PX) & (clipped_h >= MIN_BOX_PX)
    moved = np.stack([clipped_left, clipped_top, clipped_w, clipped_h], 1)
    return moved_image, moved[keep].astype(np.float32), keep


def random_scale_translate(
    image, boxes: np.ndarray, scale_jitter: float = SCALE_JITTER, shift_jitter: float = SHIFT_JITTER,
    generator: torch.Generator | None = None,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """``scale_translate`` by a scale in ``1 +- scale_jitter`` and shifts up to ``shift_jitter`` of the size.

    Draws from ``generator`` (torch's global generator when None).
    """
    draws = torch.rand(3, generator=generator).tolist()
    width, height = image.size
    scale = 1.0 + scale_jitter * (2 * draws[0] - 1)
    shift_x = shift_jitter * (2 * draws[1] - 1) * width
    shift_y = shift_jitter * (2 * draws[2] - 1) * height
    return scale_translate(image, boxes, scale, shift_x, shift_y)


def augmentation_generator(seed: int, epoch: int, image_id: int) -> torch.Generator:
    """The generator of one image's augmentation in one epoch.

    Seeded by ``(seed, epoch, image_id)`` alone, so the draw does not depend on batch order, on dataloader
    workers, or on what consumed the global RNG before: a run resumed mid-epoch repeats it exactly (the
    dataloader prefetches a batch ahead, so a saved global RNG state is already past the next batch's draws).
    """
    mixed = np.random.SeedSequence([seed, epoch, int(image_id)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def _augmented(image, objects: Any, generator: torch.Generator | None = None) -> tuple[Any, dict]:
    """A row's image and objects after ``random_scale_translate``; areas become the new box areas. Crowd regions
    move (and leave the image) like the other boxes."""
    columns = {**objects_as_columns(objects)}
    columns[CROWD_KEY] = crowd_flags(columns)
    moved_image, boxes, keep = random_scale_translate(
        image, np.asarray(columns["bbox"], dtype=np.float32), generator=generator
    )
    kept = {
        key: [value for value, flag in zip(columns[key], keep) if flag] for key in ("category", "id", CROWD_KEY)
    }
    return moved_image, {"bbox": boxes.tolist(), "area": (boxes[:, 2] * boxes[:, 3]).tolist(), **kept}


def prepare_batch(
    examples: list[dict], image_processor, augment: bool = False, seed: int | None = None, epoch: int = 0
) -> dict:
    """Schema rows to ``{"pixel_values", "pixel_mask", "labels"}`` through the image processor.

    ``labels`` is one dict per image with ``class_labels`` (int64 ``[n]``) and ``boxes`` (float ``[n, 4]``,
    normalised ``cx, cy, w, h`` relative to the padded image), plus ``image_id``, ``size`` and ``orig_size``,
    and the image's crowd regions apart: ``crowd_boxes`` (float ``[m, 4]``, normalised as ``boxes``) and
    ``crowd_class_labels`` (int64 ``[m]``), never among ``class_labels`` / ``boxes`` (module docstring).
    With ``augment``, each image's jitter comes from ``augmentation_generator(seed, epoch, image_id)``, or from
    torch's global generator when ``seed`` is None.
    """
    images, targets = [], []
    for example in examples:
        # Not image.convert("RGB"): that clips a 16-bit image white (rows that did not come through the loaders).
        image, objects = as_rgb8(example["image"]), example["objects"]
        if augment:
            generator = None if seed is None else augmentation_generator(seed, epoch, example["image_id"])
            image, objects = _augmented(image, objects, generator)
        images.append(image)
        targets.append(_crowd_marked_target(example["image_id"], objects))
    encoded = image_processor(images=images, annotations=targets, return_tensors="pt")
    labels = [_split_crowd(label) for label in encoded["labels"]]
    batch = {"pixel_values": encoded["pixel_values"], "labels": labels}
    if "pixel_mask" in encoded:
        batch["pixel_mask"] = encoded["pixel_mask"]
    else:  # do_pad=False: every pixel is real
        batch["pixel_mask"] = torch.ones(
            encoded["pixel_values"].shape[:1] + encoded["pixel_values"].shape[2:], dtype=torch.int64
        )
    return batch


class DetectionCollator:
    """A ``DataLoader`` collate function over schema rows: ``prepare_batch`` with this processor.

    Call ``set_epoch`` at the start of each epoch (before iterating) so seeded augmentation changes per epoch.
    """

    def __init__(self, image_processor, augment: bool = False, seed: int | None = None):
        self.image_processor = image_processor
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, examples: list[dict]) -> dict:
        return prepare_batch(examples, self.image_processor, self.augment, self.seed, self.epoch)


def make_collate_fn(image_processor, augment: bool = False, seed: int | None = None) -> DetectionCollator:
    """A ``DetectionCollator``: the collate function of a ``DataLoader`` over schema rows."""
    return DetectionCollator(image_processor, augment, seed)


def xywh_to_normalized_cxcywh(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel xywh boxes ``[n, 4]`` to ``cx, cy, w, h`` divided by the image size (the model's box format)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.concatenate([centres, boxes[:, 2:]], axis=1) / scale


def normalized_cxcywh_to_xywh(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """The inverse of ``xywh_to_normalized_cxcywh``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array(
        [width, height, width, height], dtype=np.float32
    )
    return np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], axis=1)


def arrays_to_model_inputs(
    images: np.ndarray | torch.Tensor,
    boxes: list[np.ndarray],
    categories: list[np.ndarray],
    image_processor,
    image_ids: list[int] | None = None,
) -> dict:
    """The fast path: a batch of same-size uint8 ``[B, H, W, 3]`` images (e.g. ``DigitScenes``) to model
    inputs, with the processor's rescale and normalisation but no resize or per-image Python work.

    Equals ``prepare_batch`` when the processor keeps the images at their size. Keep the uint8 arrays and
    call this per batch: normalised float32 copies of 5000 96x96 images would take 550 MB. The arrays hold no
    crowd region: ``crowd_boxes`` and ``crowd_class_labels`` are empty.
    """
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    if image_processor.do_rescale:
        pixels = pixels * image_processor.rescale_factor
    if image_processor.do_normalize:
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        pixels = (pixels - mean) / std
    batch_size, _, height, width = pixels.shape
    ids = image_ids if image_ids is not None else range(batch_size)
    size = torch.tensor([height, width])
    labels = []
    for image_boxes, image_categories, image_id in zip(boxes, categories, ids):
        image_boxes = np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4)
        labels.append(
            {
                "size": size.clone(),
                "image_id": torch.tensor([int(image_id)]),
                "class_labels": torch.as_tensor(np.asarray(image_categories, dtype=np.int64)),
                "boxes": torch.from_numpy(xywh_to_normalized_cxcywh(image_boxes, width, height)),
                "area": torch.from_numpy(image_boxes[:, 2] * image_boxes[:, 3]),
                "iscrowd": torch.zeros(len(image_boxes), dtype=torch.int64),
                "orig_size": size.clone(),
                "crowd_boxes": torch.zeros((0, 4), dtype=torch.float32),
                "crowd_class_labels": torch.zeros(0, dtype=torch.int64),
            }
        )
    pixel_mask = torch.ones((batch_size, height, width), dtype=torch.int64)
    return {"pixel_values": pixels, "pixel_mask": pixel_mask, "labels": labels}
