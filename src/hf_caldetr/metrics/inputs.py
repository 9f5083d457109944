"""Input checking and conversion for the detection metrics.

Every metric takes per-image detections the way transformers' ``post_process_object_detection`` returns them
(``boxes`` absolute xyxy, ``scores``, ``labels``) and per-image references (``boxes`` absolute xyxy,
``labels``), as torch tensors, numpy arrays or lists. This module turns them into flat float64 / int64 numpy
arrays over all images and raises ``ValueError`` naming the image and the problem for anything malformed.

Checks that need every value (NaN, ranges, box corners) run once on the concatenated arrays, so the per-image
Python work is only the conversion itself. When every image gives a key as a torch tensor of one dtype on one
device (what ``post_process_object_detection`` returns), or every image as a numpy array of one dtype, the
per-image work is only the shape checks: the values are concatenated once and converted once.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FlatBoxes:
    """Boxes of many images, concatenated.

    Attributes:
        boxes: ``[N, 4]`` float64, absolute xyxy.
        labels: ``[N]`` int64 class ids.
        scores: ``[N]`` float64 in [0, 1]; ``None`` for references.
        image_index: ``[N]`` int64, which image each box belongs to.
        position: ``[N]`` int64, the box's position in its own image's list.
        num_images: the number of images, including those without boxes.
        extras: further per-box float64 arrays requested by key (e.g. uncertainties), ``[N]`` each.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None
    image_index: np.ndarray
    position: np.ndarray
    num_images: int
    extras: dict

    @property
    def counts_per_image(self) -> np.ndarray:
        """``[num_images]`` int64, the number of boxes in each image."""
        return np.bincount(self.image_index, minlength=self.num_images)


def to_numpy(value, dtype=None) -> np.ndarray:
    """A torch tensor (any device, any float dtype including bfloat16), numpy array or list as a numpy array.

    Floating tensors are widened to float64 before leaving torch because numpy has no bfloat16.
    """
    if hasattr(value, "detach"):  # a torch tensor: duck-typed so metrics/ never imports torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()
        value = value.numpy()
    return np.asarray(value, dtype=dtype)


def _column(value, dtype=None) -> np.ndarray:
    """``to_numpy`` with a fast path for numpy arrays, the common case, since this runs per image and key."""
    if type(value) is not np.ndarray:
        return to_numpy(value, dtype)
    return value if dtype is None or value.dtype == dtype else value.astype(dtype)


def _stackable(entries, key: str):
    """How the values of ``key`` can be concatenated before any conversion: ``"torch"`` when every entry holds a
    torch tensor, all of one dtype on one device; ``"numpy"`` when every entry holds a numpy array, all of one
    dtype; else ``None`` (each value is converted on its own, as ``to_numpy`` does).

    Malformed entries (not dicts, the key missing) give ``None``: the per-image path then names them."""
    if not entries:
        return None
    first = entries[0].get(key) if type(entries[0]) is dict else None
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; metrics/ never imports it itself
    if torch is not None and isinstance(first, torch.Tensor):
        dtype, device = first.dtype, first.device
        for entry in entries:
            value = entry.get(key) if type(entry) is dict else None
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.device != device:
                return None
        return "torch"
    if type(first) is np.ndarray:
        dtype = first.dtype
        for entry in entries:
            value = entry.get(key) if type(entry) is dict else None
            if type(value) is not np.ndarray or value.dtype != dtype:
                return None
        return "numpy"
    return None


def _size(value) -> int:
    """Number of elements of a torch tensor or numpy array."""
    return value.numel() if hasattr(value, "numel") else value.size


def _raw_boxes(value, where: str):
    """A tensor or array's shape check of ``_as_boxes`` without the conversion; an empty value as ``[0, 4]``."""
    shape = value.shape
    if len(shape) != 2 or shape[1] != 4:
        if _size(value) == 0:
            return value.reshape(0, 4)
        raise ValueError(f"{where}['boxes'] must have shape [num_boxes, 4] (xyxy), got {tuple(shape)}")
    return value


def _raw_vector(value, where: str, key: str):
    """A tensor or array's shape check of ``_as_vector`` without the conversion; an empty value as ``[0]``."""
    shape = value.shape
    if len(shape) != 1:
        if _size(value) == 0:
            return value.reshape(0)
        raise ValueError(f"{where}['{key}'] must be one-dimensional, got shape {tuple(shape)}")
    return value


def _concatenate_raw(values: list, kind: str, dtype=None) -> np.ndarray:
    """Per-image tensors (``kind="torch"``, one dtype and device) or arrays (``"numpy"``, one dtype), already
    shape-checked, as one numpy array, with the values ``_column`` would give image by image: floating tensors
    widened to float64 before leaving torch (numpy has no bfloat16), then ``dtype`` when given."""
    if kind == "torch":
        torch = sys.modules["torch"]
        with torch.no_grad():
            array = to_numpy(torch.cat(values))
    else:
        array = np.concatenate(values)
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def _as_boxes(value, where: str) -> np.ndarray:
    boxes = _column(value, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        if boxes.size == 0:
            return boxes.reshape(0, 4)
        raise ValueError(f"{where}['boxes'] must have shape [num_boxes, 4] (xyxy), got {tuple(boxes.shape)}")
    return boxes


def _as_vector(value, where: str, key: str, dtype=None) -> np.ndarray:
    array = _column(value, dtype)
    if array.ndim != 1:
        if array.size == 0:
            return array.reshape(0)
        raise ValueError(f"{where}['{key}'] must be one-dimensional, got shape {tuple(array.shape)}")
    return array


def _check_entry(entry, keys: list[str], where: str) -> None:
    if type(entry) is not dict and not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict with 'boxes' and 'labels', got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            hint = ""
            if key == "labels" and "class_labels" in entry:
                hint = (" (found 'class_labels': training labels hold normalised cxcywh boxes; pass absolute xyxy "
                        "'boxes' and 'labels')")
            raise ValueError(f"{where} is missing '{key}'{hint}")


def check_exact_keys(entries, name: str, keys: Sequence[str], context: str) -> None:
    """Raise ``ValueError`` unless every per-image dict in ``entries`` has exactly ``keys``.

    For consumers with a fixed schema (the ``evaluate`` module), where an extra key is an error rather than
    ignored. A missing key gets ``flatten_boxes``' message; an unexpected one is named with the expected keys.
    ``context`` says who takes exactly these keys, for the message.
    """
    _check_per_image_list(entries, name)
    expected = ", ".join(f"'{key}'" for key in keys)
    for index, entry in enumerate(entries):
        where = f"{name}[{index}]"
        _check_entry(entry, list(keys), where)
        unexpected = [key for key in entry if key not in keys]
        if unexpected:
            found = ", ".join(repr(key) for key in unexpected)
            raise ValueError(f"{where} has unexpected key(s) {found}: {context} takes exactly the keys {expected}; "
                             f"remove the others before passing {name}")


def _first_bad_image(bad: np.ndarray, image_index: np.ndarray) -> int:
    return int(image_index[np.flatnonzero(bad)[0]])


def _check_per_image_list(value, name: str) -> None:
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of per-image dicts, got {type(value).__name__}")


def _integer_labels(labels: np.ndarray, image_index: np.ndarray, name: str) -> np.ndarray:
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64, copy=False)
    if labels.dtype.kind == "f":
        not_integral = ~np.isfinite(labels) | (labels != np.round(labels))
        if not_integral.any():
            image = _first_bad_image(not_integral, image_index)
            raise ValueError(f"{name}[{image}]['labels'] must be integer class ids")
        return labels.astype(np.int64)
    raise ValueError(f"{name}['labels'] must be integer class ids, got dtype {labels.dtype}")


def _check_boxes(boxes: np.ndarray, image_index: np.ndarray, name: str) -> None:
    if not np.isfinite(boxes).all():  # whole-array test first: the per-box one only runs to name the image
        image = _first_bad_image(~np.isfinite(boxes).all(axis=1), image_index)
        raise ValueError(f"{name}[{image}]['boxes'] contains NaN or infinite coordinates")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        image = _first_bad_image(inverted, image_index)
        raise ValueError(f"{name}[{image}]['boxes'] has a box with x2 < x1 or y2 < y1 (boxes must be xyxy)")


def _check_scores(scores: np.ndarray, image_index: np.ndarray, name: str) -> None:
    is_nan = np.isnan(scores)
    if is_nan.any():
        raise ValueError(f"{name}[{_first_bad_image(is_nan, image_index)}]['scores'] contains NaN")
    out_of_range = (scores < 0) | (scores > 1)
    if out_of_range.any():
        image = _first_bad_image(out_of_range, image_index)
        raise ValueError(f"{name}[{image}]['scores'] must lie in [0, 1] (probabilities, not logits), got "
                         f"{scores[np.flatnonzero(out_of_range)[0]]}")


def check_unit_interval(values: np.ndarray, what: str, upper_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``what`` unless every value is finite and in [0, 1] (or [0, 1))."""
    if np.isnan(values).any():
        raise ValueError(f"{what} contains NaN")
    too_high = values >= 1 if upper_open else values > 1
    if (values < 0).any() or too_high.any():
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{what} must lie in {interval}, got values in "
                         f"[{values.min()}, {values.max()}]")


def outcome_vector(values, name: str, length: int | None = None, length_name: str = "scores") -> np.ndarray:
    """``values`` as a one-dimensional bool array (bool or 0/1 accepted), with ``length`` entries when given, or
    ``ValueError`` naming ``name``."""
    array = to_numpy(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(array.shape)}")
    if length is not None and len(array) != length:
        raise ValueError(f"{length} {length_name} but {len(array)} {name} values: one entry per score")
    if len(array) and not (array.dtype == bool or (np.issubdtype(array.dtype, np.number)
                                                    and np.isin(array, (0, 1)).all())):
        raise ValueError(f"{name} must be boolean or 0/1 (true positive or not)")
    return array.astype(bool)


def unit_interval_vector(values, name: str, upper_open: bool = False) -> np.ndarray:
    """``values`` as a one-dimensional float64 array in [0, 1] (or [0, 1)), or ``ValueError`` naming ``name``."""
    array = to_numpy(values)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number) or array.dtype == object):
        raise ValueError(f"{name} must be numbers in [0, 1] (probabilities), got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(array.shape)}")
    check_unit_interval(array, name, upper_open)
    return array


def _well_formed_columns(entries, keys: list[str]) -> dict | None:
    """When every entry is a dict holding every key, ``boxes`` of shape ``[n_i, 4]`` and each other key of shape
    ``[n_i]`` (the usual case), the values per key, read with one pass per key instead of the per-image checks;
    ``None`` as soon as anything differs (the per-image path then handles it, or names the problem)."""
    if not entries or not all(type(entry) is dict for entry in entries):
        return None
    try:
        columns = {key: [entry[key] for entry in entries] for key in keys}
    except KeyError:
        return None
    box_shapes = [value.shape for value in columns["boxes"]]
    if not all(len(shape) == 2 and shape[1] == 4 for shape in box_shapes):
        return None
    expected = [(shape[0],) for shape in box_shapes]
    for key in keys[1:]:
        if [value.shape for value in columns[key]] != expected:
            return None
    return columns


def flatten_boxes(entries, name: str, with_scores: bool, extra_keys: Sequence[str] = ()) -> FlatBoxes:
    """Check and concatenate per-image dicts.

    Args:
        entries: list of per-image dicts with ``boxes`` ``[n_i, 4]`` (xyxy), ``labels`` ``[n_i]`` and, when
            ``with_scores``, ``scores`` ``[n_i]`` in [0, 1]; ``extra_keys`` name further ``[n_i]`` arrays.
        name: ``"predictions"`` or ``"references"``, used in error messages.

    Returns:
        ``FlatBoxes`` over all images, in image order and, within an image, in the given order.
    """
    _check_per_image_list(entries, name)
    keys = ["boxes", "labels"] + (["scores"] if with_scores else []) + list(extra_keys)
    dtypes = {key: None if key == "labels" else np.float64 for key in keys}
    # Keys whose values are all tensors (or all arrays) of one dtype: checked per image, converted once.
    stacked = {key: _stackable(entries, key) for key in keys}
    raw_boxes = stacked["boxes"] is not None
    vectors = [(key, dtypes[key], stacked[key] is not None) for key in keys[1:]]
    # The usual case (every value a tensor or array of the right shape) is read key by key; anything else goes
    # through the per-image checks, which name the problem.
    well_formed = _well_formed_columns(entries, keys) if all(stacked.values()) else None
    if well_formed is not None:
        columns, counts = well_formed, [len(value) for value in well_formed["boxes"]]
    else:
        columns, counts = {key: [] for key in keys}, []
    for index, entry in enumerate(entries if well_formed is None else ()):
        where = f"{name}[{index}]"
        _check_entry(entry, keys, where)
        boxes = _raw_boxes(entry["boxes"], where) if raw_boxes else _as_boxes(entry["boxes"], where)
        num_boxes = boxes.shape[0]
        columns["boxes"].append(boxes)
        counts.append(num_boxes)
        for key, dtype, raw in vectors:
            vector = _raw_vector(entry[key], where, key) if raw else _as_vector(entry[key], where, key, dtype)
            if vector.shape[0] != num_boxes:
                raise ValueError(f"{where} has {num_boxes} boxes but {vector.shape[0]} {key}")
            columns[key].append(vector)

    counts = np.array(counts, dtype=np.int64)
    image_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(image_index), dtype=np.int64) - np.repeat(starts, counts)

    def concatenate(key, dtype):
        if not columns[key]:
            return np.zeros((0,), dtype)
        if stacked[key] is not None:
            return _concatenate_raw(columns[key], stacked[key], dtypes[key])
        return np.concatenate(columns[key])

    boxes = concatenate("boxes", np.float64) if entries else np.zeros((0, 4))
    _check_boxes(boxes, image_index, name)
    labels = _integer_labels(concatenate("labels", np.int64), image_index, name)
    scores = None
    if with_scores:
        scores = concatenate("scores", np.float64)
        _check_scores(scores, image_index, name)
    extras = {key: concatenate(key, np.float64) for key in extra_keys}
    return FlatBoxes(boxes, labels, scores, image_index, position, len(counts), extras)


def flatten_pair(predictions, references, extra_keys: Sequence[str] = ()) -> tuple[FlatBoxes, FlatBoxes]:
    """Check and flatten predictions and references of the same images (see ``flatten_boxes``)."""
    _check_per_image_list(predictions, "predictions")
    _check_per_image_list(references, "references")
    if len(predictions) != len(references):
        raise ValueError(f"predictions cover {len(predictions)} images but references cover {len(references)}")
    return (flatten_boxes(predictions, "predictions", with_scores=True, extra_keys=extra_keys),
            flatten_boxes(references, "references", with_scores=False))


def optional_reference_column(references, key: str, count: int, default: np.ndarray) -> np.ndarray:
    """``references[i][key]`` (one value per box) concatenated as float64 when every image has it, else
    ``default`` (``[count]``); ``ValueError`` when the lengths disagree with the boxes."""
    if not all(key in reference for reference in references):
        if any(key in reference for reference in references):
            raise ValueError(f"references: some images have '{key}' and others do not; give it for every image "
                             "or for none")
        return default
    values = [to_numpy(reference[key], dtype=np.float64).reshape(-1) for reference in references]
    column = np.concatenate(values) if values else np.zeros(0)
    if len(column) != count:
        raise ValueError(f"references['{key}'] must have one value per box ({count} boxes, {len(column)} values)")
    return column


def reference_crowd_flags(references, flat_references: FlatBoxes) -> np.ndarray | None:
    """``[M]`` bool crowd flags from the references' optional ``iscrowd`` (0/1 per box, COCO's flag); an image
    without the key has no crowd region; ``None`` when no image has it."""
    if not any("iscrowd" in reference for reference in references):
        return None
    counts = flat_references.counts_per_image
    kind = _stackable(references, "iscrowd")
    if kind is not None:
        return _stacked_crowd_flags(references, counts, flat_references.image_index, kind)
    flags = []
    for index, reference in enumerate(references):
        if "iscrowd" not in reference:
            flags.append(np.zeros(counts[index], dtype=bool))
            continue
        crowd = to_numpy(reference["iscrowd"])
        if counts[index] == 0 and crowd.size == 0:
            crowd = crowd.reshape(0)
        if crowd.ndim != 1 or len(crowd) != counts[index]:
            raise ValueError(f"references[{index}] has {counts[index]} boxes but 'iscrowd' of shape "
                             f"{tuple(crowd.shape)}: give one 0/1 flag per box")
        if len(crowd) and not np.isin(crowd, (0, 1)).all():
            raise ValueError(f"references[{index}]['iscrowd'] must be 0 or 1 per box (1 marks a crowd region)")
        flags.append(crowd.astype(bool))
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def _stacked_crowd_flags(references, counts: np.ndarray, image_index: np.ndarray, kind: str) -> np.ndarray:
    """``reference_crowd_flags`` when every image's ``iscrowd`` is a tensor (or array) of one dtype: shapes checked
    per image, values converted and checked once; the same errors, for the same (first) image."""
    values = []

    def check_binary(upto: int) -> np.ndarray:
        """The flags of the first ``upto`` images; ``ValueError`` naming the first image with a value not 0/1."""
        crowd = _concatenate_raw(values[:upto], kind) if upto else np.zeros(0)
        bad = ~np.isin(crowd, (0, 1))
        if bad.any():
            image = _first_bad_image(bad, image_index)
            raise ValueError(f"references[{image}]['iscrowd'] must be 0 or 1 per box (1 marks a crowd region)")
        return crowd

    for index, reference in enumerate(references):
        crowd = reference["iscrowd"]
        if counts[index] == 0 and _size(crowd) == 0:
            crowd = crowd.reshape(0)
        if len(crowd.shape) != 1 or crowd.shape[0] != counts[index]:
            check_binary(index)  # an earlier image's bad value comes first, as image by image
            raise ValueError(f"references[{index}] has {counts[index]} boxes but 'iscrowd' of shape "
                             f"{tuple(crowd.shape)}: give one 0/1 flag per box")
        values.append(crowd)
    return check_binary(len(values)).astype(bool)


def image_sizes_array(image_sizes, num_images: int) -> np.ndarray:
    """``image_sizes`` (one ``(height, width)`` per image: list, array or tensor) as ``[num_images, 2]`` float64."""
    if isinstance(image_sizes, (list, tuple)):
        # A list of per-image tensors (transformers' ``orig_size``) does not convert in one np.asarray call.
        rows = [to_numpy(size, dtype=np.float64) for size in image_sizes]
        for index, row in enumerate(rows):
            if row.shape != (2,):
                raise ValueError(f"image_sizes[{index}] must be (height, width), got shape {row.shape}")
        sizes = np.stack(rows) if rows else np.zeros((0, 2))
    else:
        sizes = to_numpy(image_sizes, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must have shape [num_images, 2] as (height, width), got {sizes.shape}")
    if len(sizes) != num_images:
        raise ValueError(f"image_sizes covers {len(sizes)} images but predictions cover {num_images}")
    if not np.isfinite(sizes).all() or (sizes <= 0).any():
        raise ValueError("image_sizes must be positive and finite")
    return sizes
