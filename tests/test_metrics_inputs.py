"""``inputs.flatten_boxes`` and ``reference_crowd_flags``: the path that concatenates per-image torch tensors (or
numpy arrays) of one dtype before converting them gives exactly what converting image by image gives, and the
same errors for the same image."""

import numpy as np
import pytest
import torch

from hf_caldetr.metrics.inputs import _stackable, flatten_boxes, flatten_pair, reference_crowd_flags, to_numpy


def detections(seed=0, sizes=(3, 0, 5, 1), dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for size in sizes:
        corner = torch.rand(size, 2, generator=generator) * 100
        boxes = torch.cat([corner, corner + 1 + torch.rand(size, 2, generator=generator) * 50], dim=1)
        entries.append({"boxes": boxes.to(dtype), "scores": torch.rand(size, generator=generator).to(dtype),
                        "labels": torch.randint(0, 80, (size,), generator=generator)})
    return entries


def image_by_image(entries):
    """The reference result: each value converted on its own (``to_numpy``), then concatenated."""
    def column(key, dtype, shape):
        parts = [to_numpy(entry[key], dtype).reshape(shape) for entry in entries]
        return np.concatenate(parts) if parts else np.zeros((0,) + shape[1:], dtype)
    counts = [len(to_numpy(entry["labels"]).reshape(-1)) for entry in entries]
    return {"boxes": column("boxes", np.float64, (-1, 4)), "scores": column("scores", np.float64, (-1,)),
            "labels": column("labels", np.int64, (-1,)),
            "image_index": np.repeat(np.arange(len(entries)), counts),
            "position": np.concatenate([np.arange(count) for count in counts]) if counts else np.zeros(0)}


def as_lists(entries):
    """The same entries as Python lists: never concatenated before conversion."""
    return [{key: to_numpy(value).tolist() for key, value in entry.items()} for entry in entries]


def assert_flat_equal(flat, expected):
    for key, value in expected.items():
        got = getattr(flat, key)
        assert got.dtype == (np.float64 if key in ("boxes", "scores") else np.int64), key
        np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_tensors_of_one_dtype_give_the_image_by_image_values(dtype):
    entries = detections(dtype=dtype)
    assert all(_stackable(entries, key) == "torch" for key in ("boxes", "scores", "labels"))
    flat = flatten_boxes(entries, "predictions", with_scores=True)
    assert_flat_equal(flat, image_by_image(entries))
    assert flat.num_images == 4 and flat.counts_per_image.tolist() == [3, 0, 5, 1]
    # bfloat16 / float16 values are widened exactly: 16-bit floats are float64 numbers
    np.testing.assert_array_equal(flat.scores, torch.cat([e["scores"] for e in entries]).double().numpy())


def test_mixed_torch_numpy_and_mixed_dtypes_give_the_same_values():
    entries = detections(sizes=(2, 3, 4, 0, 2))
    mixed = [dict(entry) for entry in entries]
    mixed[1] = {key: value.numpy() for key, value in mixed[1].items()}  # one image as numpy
    mixed[2]["boxes"] = mixed[2]["boxes"].to(torch.bfloat16)  # one image's boxes in another dtype
    mixed[4]["scores"] = mixed[4]["scores"].double()
    mixed[3]["labels"] = mixed[3]["labels"].to(torch.int32)
    flat = flatten_boxes(mixed, "predictions", with_scores=True)
    assert_flat_equal(flat, image_by_image(mixed))
    assert_flat_equal(flatten_boxes(as_lists(mixed), "predictions", with_scores=True), image_by_image(mixed))


def test_numpy_arrays_of_one_dtype_and_int32_labels():
    entries = [{key: value.numpy() for key, value in entry.items()} for entry in detections()]
    for entry in entries:
        entry["labels"] = entry["labels"].astype(np.int32)
    flat = flatten_boxes(entries, "predictions", with_scores=True)
    assert_flat_equal(flat, image_by_image(entries))


def test_empty_images_in_any_empty_shape_and_no_detections_at_all():
    entries = detections(sizes=(2, 0, 3))
    entries[1] = {"boxes": torch.zeros(0), "scores": torch.zeros((0, 1)), "labels": torch.zeros(0, dtype=torch.int64)}
    flat = flatten_boxes(entries, "predictions", with_scores=True)
    assert flat.counts_per_image.tolist() == [2, 0, 3] and flat.boxes.shape == (5, 4)
    assert_flat_equal(flat, image_by_image(entries))

    nothing = [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64)}] * 3
    flat = flatten_boxes(nothing, "predictions", with_scores=True)
    assert flat.boxes.shape == (0, 4) and flat.scores.shape == (0,) and flat.labels.dtype == np.int64
    assert flat.num_images == 3 and flat.counts_per_image.tolist() == [0, 0, 0]
    assert flatten_boxes([], "predictions", with_scores=True).boxes.shape == (0, 4)


def test_tensors_that_require_grad_and_float_labels():
    entries = detections(sizes=(2, 3))
    for entry in entries:
        entry["boxes"].requires_grad_(True)
        entry["labels"] = entry["labels"].float()
    flat = flatten_boxes(entries, "predictions", with_scores=True)
    assert flat.labels.dtype == np.int64
    assert_flat_equal(flat, image_by_image(entries))


def test_extra_keys_and_references():
    entries = detections(sizes=(2, 0, 3))
    for entry in entries:
        entry["uncertainties"] = torch.rand(len(entry["labels"])).half()
    flat = flatten_boxes(entries, "predictions", with_scores=True, extra_keys=("uncertainties",))
    np.testing.assert_array_equal(flat.extras["uncertainties"],
                                  np.concatenate([e["uncertainties"].double().numpy() for e in entries]))
    references = [{"boxes": e["boxes"], "labels": e["labels"]} for e in entries]
    _, flat_references = flatten_pair(entries, references)
    assert flat_references.scores is None
    np.testing.assert_array_equal(flat_references.boxes, flat.boxes)


def corrupt(entries, index, key, value):
    entries = [dict(entry) for entry in entries]
    entries[index][key] = value
    return entries


MALFORMED = [
    (lambda e: corrupt(e, 2, "boxes", torch.zeros(5, 5)),
     r"predictions[2]['boxes'] must have shape [num_boxes, 4] (xyxy), got (5, 5)"),
    (lambda e: corrupt(e, 3, "boxes", torch.zeros(4)), r"predictions[3]['boxes'] must have shape"),
    (lambda e: corrupt(e, 1, "scores", torch.zeros(1, 2)), r"predictions[1]['scores'] must be one-dimensional"),
    (lambda e: corrupt(e, 0, "labels", torch.tensor(3)), r"predictions[0]['labels'] must be one-dimensional"),
    (lambda e: corrupt(e, 2, "scores", torch.zeros(4)), r"predictions[2] has 5 boxes but 4 scores"),
    (lambda e: corrupt(e, 3, "labels", torch.zeros(2, dtype=torch.int64)), r"predictions[3] has 1 boxes but 2 labels"),
    (lambda e: corrupt(e, 2, "boxes", torch.full((5, 4), float("nan"))), r"predictions[2]['boxes'] contains NaN"),
    (lambda e: corrupt(e, 2, "boxes", torch.tensor([[0.0, 0, 1, 1]] * 4 + [[5.0, 5, 1, 1]])),
     r"predictions[2]['boxes'] has a box with x2 < x1"),
    (lambda e: corrupt(e, 3, "scores", torch.tensor([1.5])), r"predictions[3]['scores'] must lie in [0, 1]"),
    (lambda e: corrupt(e, 2, "scores", torch.tensor([0.1, 0.2, float("nan"), 0.3, 0.4])),
     r"predictions[2]['scores'] contains NaN"),
    (lambda e: corrupt(e, 0, "labels", torch.tensor([1, 2, 3.5])), r"predictions[0]['labels'] must be integer"),
    (lambda e: e[:3] + [{"boxes": e[3]["boxes"], "scores": e[3]["scores"]}], r"predictions[3] is missing 'labels'"),
    # the first image at fault is named, whichever check finds it
    (lambda e: corrupt(corrupt(e, 3, "boxes", torch.zeros(2, 3)), 1, "scores", torch.zeros(1, 1)),
     r"predictions[1]['scores'] must be one-dimensional"),
]


@pytest.mark.parametrize("make, message", MALFORMED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_errors_name_the_image_as_image_by_image(make, message, dtype):
    entries = make(detections(dtype=dtype))
    # one dtype per key, so the concatenating path is the one tested
    float_labels = any(entry["labels"].is_floating_point() for entry in entries if "labels" in entry)
    for entry in entries:
        for key in ("boxes", "scores"):
            entry[key] = entry[key].to(dtype)
        if "labels" in entry and float_labels:
            entry["labels"] = entry["labels"].float()
    assert all(_stackable(entries, key) == "torch" for key in ("boxes", "scores"))
    with pytest.raises(ValueError) as fast:
        flatten_boxes(entries, "predictions", with_scores=True)
    assert str(fast.value).startswith(message)
    # the same message as the image-by-image path (lists are converted one by one)
    with pytest.raises(ValueError) as slow:
        flatten_boxes(as_lists(entries), "predictions", with_scores=True)
    assert str(slow.value) == str(fast.value)


def unit_boxes(count):
    return {"boxes": torch.zeros(count, 4) + torch.tensor([0.0, 0, 1, 1]),
            "labels": torch.zeros(count, dtype=torch.int64)}


def crowd_case(flags):
    references = [{**unit_boxes(len(f)), "iscrowd": f} for f in flags]
    return references, flatten_boxes(references, "references", with_scores=False)


@pytest.mark.parametrize("convert", [lambda f: torch.tensor(f, dtype=torch.int64), lambda f: np.array(f, np.int64),
                                     lambda f: torch.tensor(f, dtype=torch.bool), lambda f: list(f)])
def test_crowd_flags_tensors_and_arrays(convert):
    references, flat = crowd_case([convert([0, 1]), convert([]), convert([1, 0, 0])])
    assert reference_crowd_flags(references, flat).tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("flags, message", [
    ([[0, 1], [0, 2, 0], [0]], r"references[1]['iscrowd'] must be 0 or 1 per box"),
    ([[0, 1], [0, 0, 0], [0, 1]], r"references[2] has 1 boxes but 'iscrowd' of shape (2,)"),
    ([[0, 5], [0, 0, 0], [0, 1]], r"references[0]['iscrowd'] must be 0 or 1"),  # an earlier bad value comes first
    ([[0, 0], [0, 0, 7], [[0]]], r"references[1]['iscrowd'] must be 0 or 1"),
])
def test_crowd_flag_errors_name_the_first_image(flags, message):
    lengths = [2, 3, 1]
    references = [{**unit_boxes(n), "iscrowd": torch.tensor(f)} for n, f in zip(lengths, flags)]
    flat = flatten_boxes(references, "references", with_scores=False)
    assert _stackable(references, "iscrowd") == "torch"
    with pytest.raises(ValueError) as fast:
        reference_crowd_flags(references, flat)
    assert str(fast.value).startswith(message)
    one_by_one = [{**reference, "iscrowd": list(f)} for reference, f in zip(references, flags)]
    with pytest.raises(ValueError) as slow:
        reference_crowd_flags(one_by_one, flat)
    assert str(slow.value) == str(fast.value)
