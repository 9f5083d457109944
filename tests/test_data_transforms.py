"""Schema rows to model inputs: processor size, box round trip, collate, augmentation, fast path."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hf_caldetr.data import (
    arrays_to_model_inputs,
    build_image_processor,
    coco_detection_target,
    generate_digit_scenes,
    load_digits_detection,
    make_collate_fn,
    normalized_cxcywh_to_xywh,
    prepare_batch,
    random_scale_translate,
    scale_translate,
    xywh_to_normalized_cxcywh,
)


def make_row(
    width=96, height=96, boxes=((10.0, 20.0, 30.0, 40.0), (50.0, 5.0, 12.0, 14.0)), categories=(3, 7)
):
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    boxes = [list(box) for box in boxes]
    objects = {
        "bbox": boxes,
        "category": list(categories),
        "area": [box[2] * box[3] for box in boxes],
        "id": list(range(len(boxes))),
    }
    return {"image": Image.fromarray(pixels), "image_id": 42, "objects": objects}


def test_coco_detection_target_layout():
    target = coco_detection_target(42, make_row()["objects"])
    assert target["image_id"] == 42
    assert target["annotations"][1] == {
        "bbox": [50.0, 5.0, 12.0, 14.0],
        "category_id": 7,
        "area": 168.0,
        "iscrowd": 0,
    }


def test_small_images_keep_their_size_and_pixels():
    row = make_row()
    processor = build_image_processor(96)
    batch = prepare_batch([row], processor)
    assert batch["pixel_values"].shape == (1, 3, 96, 96) and batch["pixel_mask"].all()
    expected = (
        torch.tensor(np.asarray(row["image"])).permute(2, 0, 1) / 255
        - torch.tensor(processor.image_mean)[:, None, None]
    ) / torch.tensor(processor.image_std)[:, None, None]
    torch.testing.assert_close(batch["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_boxes_round_trip_through_the_processor():
    row = make_row()
    labels = prepare_batch([row], build_image_processor(96))["labels"][0]
    assert labels["class_labels"].tolist() == [3, 7]
    expected = xywh_to_normalized_cxcywh(np.array(row["objects"]["bbox"]), 96, 96)
    np.testing.assert_allclose(labels["boxes"].numpy(), expected, atol=1e-6)
    back = normalized_cxcywh_to_xywh(labels["boxes"].numpy(), 96, 96)
    np.testing.assert_allclose(back, np.array(row["objects"]["bbox"]), atol=1e-4)


def test_cxcywh_conversion_by_hand():
    boxes = xywh_to_normalized_cxcywh(np.array([[10.0, 20.0, 30.0, 40.0]]), width=100, height=80)
    np.testing.assert_allclose(boxes, [[0.25, 0.5, 0.3, 0.5]])


def test_unresized_batches_are_padded_and_boxes_follow_the_padding():
    small, large = make_row(width=60, height=40, boxes=((6.0, 4.0, 30.0, 20.0),), categories=(1,)), make_row()
    batch = prepare_batch([small, large], build_image_processor(None))
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    assert batch["pixel_mask"][0].sum() == 60 * 40 and batch["pixel_mask"][0, :40, :60].all()
    # boxes are normalised to the padded canvas, as the model sees it
    back = normalized_cxcywh_to_xywh(batch["labels"][0]["boxes"].numpy(), 96, 96)
    np.testing.assert_allclose(back, [[6.0, 4.0, 30.0, 20.0]], atol=1e-4)
    assert batch["labels"][0]["orig_size"].tolist() == [40, 60]


def test_aspect_preserving_resize():
    processor = build_image_processor({"shortest_edge": 48, "longest_edge": 96})
    batch = prepare_batch(
        [make_row(width=80, height=40, boxes=((8.0, 4.0, 20.0, 10.0),), categories=(0,))], processor
    )
    assert batch["pixel_values"].shape == (1, 3, 48, 96)
    back = normalized_cxcywh_to_xywh(batch["labels"][0]["boxes"].numpy(), 96, 48)
    np.testing.assert_allclose(back, [[9.6, 4.8, 24.0, 12.0]], atol=1e-3)


def test_empty_image_gives_empty_labels():
    row = make_row(boxes=(), categories=())
    labels = prepare_batch([row], build_image_processor(96))["labels"][0]
    assert labels["boxes"].shape == (0, 4) and labels["class_labels"].shape == (0,)


def test_collate_fn_in_a_dataloader():
    digits = load_digits_detection(num_train=6, num_validation=0, seed=0)["train"]
    loader = DataLoader(digits, batch_size=3, collate_fn=make_collate_fn(build_image_processor(96)))
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["pixel_values"].shape == (3, 3, 96, 96) and batch["pixel_mask"].shape == (3, 96, 96)
    assert [len(labels["class_labels"]) for labels in batch["labels"]] == [
        len(o["id"]) for o in digits[:3]["objects"]
    ]


def test_scale_translate_moves_boxes_with_the_image():
    # a bright square on black: after the jitter, its box must still frame the bright pixels
    pixels = np.zeros((96, 96, 3), dtype=np.uint8)
    pixels[30:50, 40:60] = 255
    torch.manual_seed(3)
    moved, boxes, keep = random_scale_translate(Image.fromarray(pixels), np.array([[40.0, 30.0, 20.0, 20.0]]))
    assert keep.tolist() == [True]
    bright = np.argwhere(np.asarray(moved)[:, :, 0] > 128)
    (top, left), (bottom, right) = bright.min(0), bright.max(0) + 1
    np.testing.assert_allclose(boxes[0], [left, top, right - left, bottom - top], atol=1.5)
    assert not np.array_equal(np.asarray(moved), pixels)


def test_scale_translate_by_hand():
    image = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))
    boxes = np.array([[10.0, 20.0, 20.0, 10.0], [90.0, 40.0, 8.0, 8.0], [40.0, 40.0, 10.0, 10.0]])
    _, moved, keep = scale_translate(image, boxes, scale=2.0, shift_x=-10.0, shift_y=5.0)
    # x' = 2 (x - 50) + 40: the first box goes to x -40..0 (gone), the second to 120..136 (gone),
    # the third to 20..40; y' = 2 (y - 50) + 55 puts it at 35..55
    assert keep.tolist() == [False, False, True]
    np.testing.assert_allclose(moved, [[20.0, 35.0, 20.0, 20.0]])
    _, moved, keep = scale_translate(image, boxes[:1], scale=1.0, shift_x=-15.0, shift_y=0.0)
    # 15 of its 20 px stay inside: kept and clipped
    assert keep.tolist() == [True]
    np.testing.assert_allclose(moved, [[0.0, 20.0, 15.0, 10.0]])


def test_augmentation_follows_torch_seed():
    digits = load_digits_detection(num_train=4, num_validation=0, seed=0)["train"]
    rows = [digits[i] for i in range(4)]
    processor = build_image_processor(96)
    torch.manual_seed(1)
    first = prepare_batch(rows, processor, augment=True)
    torch.manual_seed(1)
    second = prepare_batch(rows, processor, augment=True)
    plain = prepare_batch(rows, processor)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert not torch.equal(first["pixel_values"], plain["pixel_values"])
    for augmented, original in zip(first["labels"], plain["labels"]):
        assert len(augmented["boxes"]) <= len(original["boxes"])
        assert ((augmented["boxes"] >= 0) & (augmented["boxes"] <= 1)).all()


def test_fast_path_equals_the_processor():
    scenes = generate_digit_scenes(4, seed=5)
    processor = build_image_processor(96)
    fast = arrays_to_model_inputs(scenes.images, scenes.boxes, scenes.categories, processor, [0, 1, 2, 3])
    rows = [
        {
            "image": Image.fromarray(image),
            "image_id": index,
            "objects": {
                "bbox": boxes.tolist(),
                "category": cats.tolist(),
                "area": (boxes[:, 2] * boxes[:, 3]).tolist(),
                "id": list(range(len(boxes))),
            },
        }
        for index, (image, boxes, cats) in enumerate(zip(scenes.images, scenes.boxes, scenes.categories))
    ]
    slow = prepare_batch(rows, processor)
    torch.testing.assert_close(fast["pixel_values"], slow["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(fast["pixel_mask"], slow["pixel_mask"])
    for fast_labels, slow_labels in zip(fast["labels"], slow["labels"]):
        assert set(fast_labels) == set(slow_labels)
        for key in fast_labels:
            torch.testing.assert_close(fast_labels[key], slow_labels[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("size, expected", [(None, False), (64, True)])
def test_build_image_processor_resize_switch(size, expected):
    assert build_image_processor(size).do_resize is expected


def test_seeded_augmentation_depends_only_on_seed_epoch_and_image():
    from hf_caldetr.data.transforms import DetectionCollator

    digits = load_digits_detection(num_train=4, num_validation=0, seed=0)["train"]
    rows = [digits[i] for i in range(4)]
    collate = DetectionCollator(build_image_processor(96), augment=True, seed=7)
    torch.manual_seed(0)
    first = collate(rows)
    torch.manual_seed(123)  # the global RNG plays no part
    again = collate(list(reversed(rows)))
    assert torch.equal(first["pixel_values"], again["pixel_values"].flip(0))
    collate.set_epoch(1)
    assert not torch.equal(first["pixel_values"], collate(rows)["pixel_values"])


@pytest.mark.parametrize(
    "image, expected",
    [
        # PIL's convert("RGB") clipped these at 255: all white
        (Image.fromarray(np.array([[0, 257, 32896], [65535, 514, 1000]], dtype=np.uint16)),
         [[0, 1, 128], [255, 2, 4]]),
        (Image.fromarray(np.array([[0, 257, 32896], [65535, 514, 1000]], dtype=">u2")),
         [[0, 1, 128], [255, 2, 4]]),
        (Image.fromarray(np.array([[0, 1, 128], [255, 2, 4]], dtype=np.uint8)), [[0, 1, 128], [255, 2, 4]]),
    ],
    ids=["I;16", "I;16B", "L"],
)
def test_grey_images_reach_the_model_as_8_bit_rgb(image, expected):
    processor = build_image_processor(None, do_normalize=False)
    row = {"image": image, "image_id": 0, "objects": {"bbox": [], "category": [], "area": [], "id": []}}
    pixels = prepare_batch([row], processor)["pixel_values"][0] * 255
    assert pixels.shape == (3, 2, 3)
    torch.testing.assert_close(pixels, torch.tensor(expected, dtype=torch.float32).expand(3, 2, 3), atol=1e-3,
                               rtol=0)


def test_images_without_an_8_bit_scaling_are_refused_by_the_collator():
    row = make_row()
    row["image"] = Image.fromarray(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"image mode 'F' .* has no known 8-bit scaling; convert"):
        prepare_batch([row], build_image_processor(None))


# ------------------------------------------------------------------------------------------------ crowd regions

CROWD_BOXES = ((20.0, 15.0, 20.0, 15.0), (40.0, 20.0, 15.0, 15.0), (30.0, 30.0, 20.0, 15.0), (25.0, 10.0, 10.0, 10.0))
CROWD_FLAGS = [0, 1, 0, 1]


def make_crowd_row(crowd=CROWD_FLAGS, width=80, height=60):
    """An 80x60 row whose 2nd and 4th objects are crowd regions (all boxes well inside: augmentation keeps them)."""
    row = make_row(width, height, boxes=CROWD_BOXES, categories=(3, 7, 1, 2))
    row["objects"]["iscrowd"] = list(crowd)
    return row


def test_coco_detection_target_marks_crowd_regions():
    annotations = coco_detection_target(42, make_crowd_row()["objects"])["annotations"]
    assert [annotation["iscrowd"] for annotation in annotations] == CROWD_FLAGS


@pytest.mark.parametrize(
    "size, processor_class",
    [
        (96, "DeformableDetrImageProcessor"),
        (None, "DeformableDetrImageProcessor"),  # padded to the batch's largest image
        ({"shortest_edge": 48, "longest_edge": 96}, "DetrImageProcessor"),
        (64, "RTDetrImageProcessor"),
        (64, "DeformableDetrImageProcessorPil"),
    ],
)
def test_crowd_regions_are_kept_apart_from_the_training_targets(size, processor_class):
    import transformers

    if not hasattr(transformers, processor_class):
        pytest.skip(f"transformers {transformers.__version__} has no {processor_class}")
    processor = build_image_processor(size, processor_class)
    crowded = prepare_batch([make_crowd_row(), make_row()], processor)["labels"][0]
    # the same boxes with no crowd region: what the processor makes of every box
    plain = prepare_batch([make_crowd_row(crowd=[0, 0, 0, 0]), make_row()], processor)["labels"][0]
    crowd = torch.tensor(CROWD_FLAGS, dtype=torch.bool)
    assert crowded["class_labels"].tolist() == [3, 1] and crowded["crowd_class_labels"].tolist() == [7, 2]
    torch.testing.assert_close(crowded["boxes"], plain["boxes"][~crowd], atol=0, rtol=0)
    torch.testing.assert_close(crowded["crowd_boxes"], plain["boxes"][crowd], atol=0, rtol=0)
    for key in ("area", "iscrowd"):
        torch.testing.assert_close(crowded[key], plain[key][~crowd], atol=0, rtol=0)
    assert crowded["crowd_boxes"].dtype == torch.float32 and crowded["crowd_class_labels"].dtype == torch.int64
    torch.testing.assert_close(crowded["orig_size"], plain["orig_size"])


def test_images_without_crowd_regions_get_empty_crowd_labels():
    labels = prepare_batch([make_row(), make_row(boxes=(), categories=())], build_image_processor(96))["labels"]
    for label in labels:
        assert label["crowd_boxes"].shape == (0, 4) and label["crowd_class_labels"].shape == (0,)
    assert labels[0]["class_labels"].tolist() == [3, 7]


def test_crowd_regions_move_with_the_augmentation():
    collate = make_collate_fn(build_image_processor(96), augment=True, seed=3)
    crowded = collate([make_crowd_row()])["labels"][0]
    plain = collate([make_crowd_row(crowd=[0, 0, 0, 0])])["labels"][0]
    unmoved = prepare_batch([make_crowd_row(crowd=[0, 0, 0, 0])], build_image_processor(96))["labels"][0]
    assert len(plain["boxes"]) == 4 and not torch.allclose(plain["boxes"], unmoved["boxes"])
    crowd = torch.tensor(CROWD_FLAGS, dtype=torch.bool)
    assert crowded["class_labels"].tolist() == [3, 1] and crowded["crowd_class_labels"].tolist() == [7, 2]
    torch.testing.assert_close(crowded["boxes"], plain["boxes"][~crowd], atol=0, rtol=0)
    torch.testing.assert_close(crowded["crowd_boxes"], plain["boxes"][crowd], atol=0, rtol=0)


def test_fast_path_labels_have_empty_crowd_regions():
    scenes = generate_digit_scenes(2, seed=5)
    labels = arrays_to_model_inputs(scenes.images, scenes.boxes, scenes.categories, build_image_processor(96))["labels"]
    for label in labels:
        assert label["crowd_boxes"].shape == (0, 4) and label["crowd_boxes"].dtype == torch.float32
        assert label["crowd_class_labels"].shape == (0,) and label["crowd_class_labels"].dtype == torch.int64


def _tiny_models():
    from tiny import tiny_deformable_kwargs, tiny_detr_kwargs, tiny_rt_detr_kwargs
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DetrConfig,
        DetrForObjectDetection,
        RTDetrConfig,
        RTDetrForObjectDetection,
    )

    from hf_caldetr.configuration import CalDeformableDetrConfig, CalDetrConfig, CalRTDetrConfig
    from hf_caldetr.models import (
        CalDeformableDetrForObjectDetection,
        CalDetrForObjectDetection,
        CalRTDetrForObjectDetection,
    )

    return {
        "detr": (DetrForObjectDetection, DetrConfig, tiny_detr_kwargs),
        "deformable_detr": (DeformableDetrForObjectDetection, DeformableDetrConfig, tiny_deformable_kwargs),
        "rt_detr": (RTDetrForObjectDetection, RTDetrConfig, tiny_rt_detr_kwargs),
        "cal_detr": (CalDetrForObjectDetection, CalDetrConfig, tiny_detr_kwargs),
        "cal_deformable_detr": (CalDeformableDetrForObjectDetection, CalDeformableDetrConfig, tiny_deformable_kwargs),
        "cal_rt_detr": (CalRTDetrForObjectDetection, CalRTDetrConfig, tiny_rt_detr_kwargs),
    }


@pytest.mark.parametrize(
    "family", ["detr", "deformable_detr", "rt_detr", "cal_detr", "cal_deformable_detr", "cal_rt_detr"]
)
def test_crowd_keys_do_not_change_the_models_loss(family):
    model_class, config_class, kwargs = _tiny_models()[family]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs(num_labels=10))).train()
    batch = prepare_batch([make_crowd_row(), make_row()], build_image_processor(64))
    assert len(batch["labels"][0]["crowd_boxes"]) == 2
    stripped = [{key: value for key, value in label.items() if not key.startswith("crowd_")}
                for label in batch["labels"]]
    losses = []
    for labels in (batch["labels"], stripped):
        torch.manual_seed(1)  # RT-DETR's denoising queries are random
        losses.append(model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=labels).loss)
    assert torch.isfinite(losses[0]) and losses[0].item() == losses[1].item()
