"""Greedy matching: hand-computed cases, an independent loop oracle on random sets, input handling."""

import numpy as np
import pytest
import torch

from hf_caldetr.metrics import match_detections, matching, synthetic_detections


def image(boxes, scores, labels):
    return {"boxes": boxes, "scores": scores, "labels": labels}


def truth(boxes, labels):
    return {"boxes": boxes, "labels": labels}


SQUARE = [0.0, 0.0, 10.0, 10.0]


def loop_match(predictions, references, score_threshold=0.3, iou_threshold=0.5, include_images_without_gt=False):
    """The protocol's rule written the plain way: per image, per detection, per box. Oracle for the tests."""
    rows = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        gt_boxes = [list(map(float, box)) for box in reference["boxes"]]
        gt_labels = [int(label) for label in reference["labels"]]
        if not gt_boxes and not include_images_without_gt:
            continue
        scores = [float(score) for score in prediction["scores"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
        taken = [False] * len(gt_boxes)
        for i in order:
            if scores[i] < score_threshold:
                continue
            box, label = list(map(float, prediction["boxes"][i])), int(prediction["labels"][i])
            best, best_iou = -1, -1.0
            for j, gt_box in enumerate(gt_boxes):
                if taken[j] or gt_labels[j] != label:
                    continue
                overlap = box_iou(box, gt_box)
                if overlap >= best_iou:  # pycocotools: an equal IoU replaces the best box (the last one wins)
                    best, best_iou = j, overlap
            is_tp = best >= 0 and best_iou >= iou_threshold
            if is_tp:
                taken[best] = True
            rows.append((index, i, scores[i], is_tp, best_iou if is_tp else 0.0, best if is_tp else -1))
    return rows


def box_iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def as_rows(matches):
    return list(zip(matches.image_index.tolist(), matches.detection_index.tolist(), matches.scores.tolist(),
                    matches.matched.tolist(), matches.ious.tolist(), matches.matched_reference.tolist()))


def assert_same_rows(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got[:4] == want[:4] and got[5] == want[5]
        assert got[4] == pytest.approx(want[4], abs=1e-12)


def test_duplicate_detection_is_a_false_positive():
    predictions = [image([SQUARE, SQUARE], [0.9, 0.8], [1, 1])]
    matches = match_detections(predictions, [truth([SQUARE], [1])])
    assert matches.matched.tolist() == [True, False]
    assert matches.ious.tolist() == [1.0, 0.0]
    assert matches.matched_reference.tolist() == [0, -1]


def test_better_overlap_with_another_class_is_ignored():
    # The detection covers the class-2 box exactly, but only the class-1 box (IoU 64/100) is of its class.
    predictions = [image([SQUARE], [0.9], [1])]
    references = [truth([SQUARE, [0.0, 0.0, 8.0, 8.0]], [2, 1])]
    matches = match_detections(predictions, references)
    assert matches.matched.tolist() == [True]
    assert matches.ious[0] == pytest.approx(0.64)
    assert matches.matched_reference.tolist() == [1]


def test_equal_scores_keep_list_order():
    # Two identical detections with equal scores: the one listed first is visited first and wins.
    predictions = [image([SQUARE, SQUARE], [0.7, 0.7], [3, 3])]
    matches = match_detections(predictions, [truth([SQUARE], [3])])
    assert matches.detection_index.tolist() == [0, 1]
    assert matches.matched.tolist() == [True, False]


def test_equal_ious_go_to_the_box_listed_last_as_in_pycocotools():
    # Both detections cover both boxes with IoU 60/100 = 0.6. pycocotools' loop replaces its best box on an equal
    # IoU, so the first detection takes the box listed last; iou_ties="first" gives it the box listed first.
    predictions = [image([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]], [0.9, 0.8], [0, 0])]
    references = [truth([[0.0, 0.0, 10.0, 6.0], [0.0, 4.0, 10.0, 10.0]], [0, 0])]
    matches = match_detections(predictions, references)
    assert matches.ious.tolist() == pytest.approx([0.6, 0.6])
    assert matches.matched_reference.tolist() == [1, 0]
    assert match_detections(predictions, references, iou_ties="first").matched_reference.tolist() == [0, 1]
    with pytest.raises(ValueError, match="iou_ties must be one of"):
        match_detections(predictions, references, iou_ties="best")


def test_iou_exactly_at_the_threshold_matches():
    # [0, 0, 5, 10] against [0, 0, 10, 10]: IoU 50/100 = 0.5 exactly.
    predictions = [image([[0.0, 0.0, 5.0, 10.0]], [0.9], [1])]
    matches = match_detections(predictions, [truth([SQUARE], [1])])
    assert matches.ious.tolist() == [0.5] and matches.matched.tolist() == [True]


def test_threshold_zero_matches_boxes_without_overlap():
    # At IoU threshold 0 (the official LaECE_0 / LRP code at tau 0) a detection takes an unclaimed same-class box
    # even without overlap; with all IoUs 0 the box listed last. The third detection finds nothing left.
    far = [[50.0, 50.0, 60.0, 60.0], [70.0, 70.0, 80.0, 80.0]]
    predictions = [image([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 3.0]], [0.9, 0.8, 0.7],
                         [2, 2, 2])]
    matches = match_detections(predictions, [truth(far, [2, 2])], iou_threshold=0.0)
    assert matches.matched.tolist() == [True, True, False]
    assert matches.matched_reference.tolist() == [1, 0, -1]
    assert matches.ious.tolist() == [0.0, 0.0, 0.0]


def test_detections_on_crowd_regions_are_ignored():
    # One ordinary box and one crowd region of class 1. The first detection takes the ordinary box; the second
    # lies inside the crowd region (intersection / its own area = 1) and is ignored, not a false positive; the
    # third overlaps the crowd region by 16 / 100 < 0.5 and stays a false positive. A crowd region can absorb
    # several detections (the fourth too), and is never claimed as a true positive.
    crowd_region = [100.0, 100.0, 200.0, 200.0]
    predictions = [image([SQUARE, [110.0, 110.0, 120.0, 120.0], [196.0, 196.0, 206.0, 206.0],
                          [150.0, 150.0, 160.0, 160.0]], [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1])]
    references = [{"boxes": [SQUARE, crowd_region], "labels": [1, 1], "iscrowd": [0, 1]}]
    matches = match_detections(predictions, references)
    assert matches.detection_index.tolist() == [0, 2]
    assert matches.matched.tolist() == [True, False]
    assert matches.num_ignored == 2
    # Without the flag the region is an ordinary box: the second detection is a false positive (IoU 0.01).
    plain = match_detections(predictions, [{"boxes": [SQUARE, crowd_region], "labels": [1, 1]}])
    assert plain.detection_index.tolist() == [0, 1, 2, 3] and plain.num_ignored == 0


def test_a_detection_prefers_an_ordinary_box_to_a_crowd_region():
    # The detection overlaps an ordinary box with IoU 0.64 and lies inside a crowd region: it is a true positive.
    predictions = [image([SQUARE], [0.9], [1])]
    references = [{"boxes": [[0.0, 0.0, 8.0, 8.0], [-10.0, -10.0, 20.0, 20.0]], "labels": [1, 1], "iscrowd": [0, 1]}]
    matches = match_detections(predictions, references)
    assert matches.matched.tolist() == [True] and matches.num_ignored == 0


def test_iscrowd_is_0_or_1_per_box_and_optional_per_image():
    predictions = [image([SQUARE], [0.9], [1])] * 2
    mixed = match_detections(predictions, [truth([SQUARE], [1]), {"boxes": [SQUARE], "labels": [1], "iscrowd": [1]}])
    assert mixed.matched.tolist() == [True] and mixed.num_ignored == 1
    with pytest.raises(ValueError, match="must be 0 or 1"):
        match_detections(predictions[:1], [{"boxes": [SQUARE], "labels": [1], "iscrowd": [2]}])
    with pytest.raises(ValueError, match="one 0/1 flag per box"):
        match_detections(predictions[:1], [{"boxes": [SQUARE], "labels": [1], "iscrowd": [0, 1]}])


def test_max_detections_per_class_keeps_the_top_of_each_image_and_class():
    # Class 0 has three detections, class 1 two: with a limit of 2 the lowest class-0 one goes.
    predictions = [image([SQUARE] * 5, [0.5, 0.9, 0.7, 0.6, 0.8], [0, 0, 0, 1, 1])]
    matches = match_detections(predictions, [truth([SQUARE], [0])], max_detections_per_class=2)
    assert sorted(matches.detection_index.tolist()) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="max_detections_per_class"):
        match_detections(predictions, [truth([SQUARE], [0])], max_detections_per_class=0)


def test_greedy_not_optimal_assignment():
    # A (0.9) prefers box 0 (IoU 1) over box 1 (IoU 0.8); B (0.8) reaches the threshold only with box 0
    # (IoU 70/130 = 0.54; with box 1 50/130 = 0.38). Greedy gives A box 0 and leaves B a false positive,
    # though A->1, B->0 would match both.
    a, b = [0.0, 0.0, 10.0, 10.0], [0.0, 2.0, 10.0, 10.0]
    predictions = [image([a, [0.0, -3.0, 10.0, 7.0]], [0.9, 0.8], [5, 5])]
    references = [truth([a, b], [5, 5])]
    matches = match_detections(predictions, references)
    assert matches.matched.tolist() == [True, False]


def test_low_overlap_claims_nothing():
    # The top detection's best box has IoU 0.4: a false positive that leaves the box for the next one.
    predictions = [image([[0.0, 0.0, 4.0, 10.0], [0.0, 0.0, 9.0, 10.0]], [0.9, 0.8], [1, 1])]
    matches = match_detections(predictions, [truth([SQUARE], [1])])
    assert matches.matched.tolist() == [False, True]
    assert matches.ious.tolist() == pytest.approx([0.0, 0.9])


def test_score_threshold_is_inclusive_and_output_sorted():
    predictions = [image([SQUARE] * 3, [0.2999, 0.3, 0.95], [1, 1, 1])]
    matches = match_detections(predictions, [truth([SQUARE], [1])])
    assert matches.scores.tolist() == [0.95, 0.3]
    assert matches.detection_index.tolist() == [2, 1]


def test_images_without_ground_truth():
    predictions = [image([SQUARE], [0.9], [1]), image([SQUARE], [0.8], [1])]
    references = [truth([SQUARE], [1]), truth(np.zeros((0, 4)), [])]
    excluded = match_detections(predictions, references)
    assert excluded.image_index.tolist() == [0] and excluded.num_images_evaluated == 1
    included = match_detections(predictions, references, include_images_without_gt=True)
    assert included.image_index.tolist() == [0, 1] and included.matched.tolist() == [True, False]
    assert included.num_images_evaluated == 2


def test_no_ground_truth_anywhere():
    predictions = [image([SQUARE], [0.9], [1])]
    references = [truth(np.zeros((0, 4)), [])]
    assert len(match_detections(predictions, references)) == 0
    included = match_detections(predictions, references, include_images_without_gt=True)
    assert included.matched.tolist() == [False] and included.matched_reference.tolist() == [-1]


def test_iou_threshold_is_inclusive():
    predictions = [image([[0.0, 0.0, 5.0, 10.0]], [0.9], [1])]  # IoU exactly 0.5
    assert match_detections(predictions, [truth([SQUARE], [1])]).matched.tolist() == [True]
    assert match_detections(predictions, [truth([SQUARE], [1])], iou_threshold=0.51).matched.tolist() == [False]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("include", [False, True])
def test_random_sets_match_the_loop_oracle(seed, include):
    predictions, references, _ = synthetic_detections(num_images=40, num_classes=3, seed=seed)
    expected = loop_match(predictions, references, include_images_without_gt=include)
    assert_same_rows(as_rows(match_detections(predictions, references, include_images_without_gt=include)),
                     expected)


def test_crowded_single_class_needs_many_rounds_and_chunks(monkeypatch):
    # One class, dense overlapping boxes: long conflict chains; tiny chunks exercise the chunked pair building.
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 20, (60, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 10, (60, 2))], axis=1)
    gt_corners = rng.uniform(0, 20, (25, 2))
    gt_boxes = np.concatenate([gt_corners, gt_corners + rng.uniform(5, 10, (25, 2))], axis=1)
    predictions = [image(boxes, rng.uniform(0, 1, 60), np.zeros(60, int))]
    references = [truth(gt_boxes, np.zeros(25, int))]
    monkeypatch.setattr(matching, "_MAX_PAIRS_PER_CHUNK", 7)
    for threshold in (0.1, 0.3, 0.5):
        actual = as_rows(match_detections(predictions, references, score_threshold=0.0, iou_threshold=threshold))
        assert_same_rows(actual, loop_match(predictions, references, 0.0, threshold))


def test_tensor_numpy_and_list_inputs_agree():
    predictions, references, _ = synthetic_detections(num_images=10, seed=3)
    as_tensors = [{key: torch.as_tensor(value) for key, value in p.items()} for p in predictions]
    as_lists = [{key: np.asarray(value).tolist() for key, value in p.items()} for p in predictions]
    reference_tensors = [{key: torch.as_tensor(value) for key, value in r.items()} for r in references]
    baseline = as_rows(match_detections(predictions, references))
    assert as_rows(match_detections(as_tensors, reference_tensors)) == baseline
    # Lists hold the float32 scores widened to float64 exactly, so they agree too.
    assert as_rows(match_detections(as_lists, references)) == baseline


def test_bfloat16_scores_are_accepted():
    predictions = [image(torch.tensor([SQUARE]), torch.tensor([0.75], dtype=torch.bfloat16), torch.tensor([1]))]
    matches = match_detections(predictions, [truth(torch.tensor([SQUARE]), torch.tensor([1]))])
    assert matches.scores.dtype == np.float64 and matches.scores.tolist() == [0.75]


def test_no_images_and_no_detections():
    assert len(match_detections([], [])) == 0
    empty = match_detections([image(np.zeros((0, 4)), [], [])], [truth([SQUARE], [1])])
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.num_images_evaluated == 1


@pytest.mark.parametrize("predictions, references, message", [
    ([image([SQUARE], [float("nan")], [1])], [truth([SQUARE], [1])], r"predictions\[0\]\['scores'\] contains NaN"),
    ([image([SQUARE], [1.5], [1])], [truth([SQUARE], [1])], r"scores'\] must lie in \[0, 1\]"),
    ([image([SQUARE], [-0.1], [1])], [truth([SQUARE], [1])], r"scores'\] must lie in \[0, 1\]"),
    ([image([[5.0, 0.0, 1.0, 10.0]], [0.5], [1])], [truth([SQUARE], [1])], r"x2 < x1 or y2 < y1"),
    ([image([SQUARE], [0.5], [1])], [truth([[0.0, 5.0, 10.0, 1.0]], [1])], r"references\[0\]\['boxes'\].*y2 < y1"),
    ([image([SQUARE], [0.5, 0.6], [1])], [truth([SQUARE], [1])], r"1 boxes but 2 scores"),
    ([image([SQUARE], [0.5], [1])], [truth([SQUARE], [1, 2])], r"references\[0\] has 1 boxes but 2 labels"),
    ([image([[0.0, 0.0, 1.0]], [0.5], [1])], [truth([SQUARE], [1])], r"shape \[num_boxes, 4\]"),
    ([image([SQUARE], [[0.5]], [1])], [truth([SQUARE], [1])], r"'scores'\] must be one-dimensional"),
    ([image([SQUARE], [0.5], [1])], [], r"predictions cover 1 images but references cover 0"),
    ([{"boxes": [SQUARE], "scores": [0.5]}], [truth([SQUARE], [1])], r"predictions\[0\] is missing 'labels'"),
    ([image([SQUARE], [0.5], [1])], [{"boxes": [SQUARE], "class_labels": [1]}], r"absolute xyxy"),
    ([image([SQUARE], [0.5], [1.5])], [truth([SQUARE], [1])], r"integer class ids"),
    ([image([[0.0, 0.0, float("inf"), 1.0]], [0.5], [1])], [truth([SQUARE], [1])], r"NaN or infinite"),
    (image([SQUARE], [0.5], [1]), [truth([SQUARE], [1])], r"list of per-image dicts"),
    ([[SQUARE]], [truth([SQUARE], [1])], r"predictions\[0\] must be a dict"),
])
def test_bad_input_names_the_problem(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        match_detections(predictions, references)


def test_error_names_the_offending_image():
    predictions = [image([SQUARE], [0.5], [1]), image([SQUARE], [2.0], [1])]
    with pytest.raises(ValueError, match=r"predictions\[1\]\['scores'\]"):
        match_detections(predictions, [truth([SQUARE], [1])] * 2)


@pytest.mark.parametrize("keyword", ["score_threshold", "iou_threshold"])
def test_thresholds_outside_unit_interval(keyword):
    with pytest.raises(ValueError, match=keyword):
        match_detections([image([SQUARE], [0.5], [1])], [truth([SQUARE], [1])], **{keyword: 1.5})


# ---------------------------------------------------------------- crowded images, every code path, against the loop

def crowded_images(rng, num_images=3, max_detections=150, max_boxes=12):
    """Images where many detections pile on few boxes, with many ties: half the images on an integer grid
    (equal IoUs, duplicate and zero-size boxes), scores often drawn from four values (equal scores)."""
    predictions, references = [], []
    for _ in range(num_images):
        num_dets, num_boxes = int(rng.integers(0, max_detections)), int(rng.integers(0, max_boxes))
        num_classes, on_grid = int(rng.integers(1, 3)), bool(rng.random() < 0.5)

        def boxes(count):
            if on_grid:
                corner = rng.integers(0, 6, (count, 2))
                return np.concatenate([corner, corner + rng.integers(0, 4, (count, 2))], axis=1).astype(float)
            corner = rng.uniform(0, 20, (count, 2))
            return np.concatenate([corner, corner + rng.uniform(0, 8, (count, 2))], axis=1)

        gt_boxes, det_boxes = boxes(num_boxes), boxes(num_dets)
        if num_boxes:  # most detections copy a box, exactly on the grid, jittered elsewhere
            copies = rng.random(num_dets) < 0.7
            source = gt_boxes[rng.integers(0, num_boxes, int(copies.sum()))]
            det_boxes[copies] = source if on_grid else source + rng.normal(0, 0.5, source.shape)
            det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
        tied = rng.random() < 0.5
        scores = rng.choice([0.3, 0.5, 0.7, 0.9], num_dets) if tied else rng.uniform(0, 1, num_dets)
        predictions.append(image(det_boxes, scores, rng.integers(0, num_classes, num_dets)))
        references.append(truth(gt_boxes, rng.integers(0, num_classes, num_boxes)))
    return predictions, references


# Each setting forces a code path on these small cases: the centre sweep for every group, with tiny blocks,
# candidate overflow (chunks against unclaimed boxes) and one-pair settle windows; every round handing over to
# the sequential scan; rounds only.
PATHS = {
    "defaults": {},
    "sweep": {"_LARGE_GROUP_PAIRS": 1},
    "sweep_tiny_chunks": {"_LARGE_GROUP_PAIRS": 1, "_MAX_PAIRS_PER_CHUNK": 5, "_BLOCK_DETECTIONS": 3,
                          "_BLOCK_BOXES": 2, "_SETTLE_WINDOW": 4},
    "sequential_scan": {"_MAX_PAIRS_PER_CHUNK": 7, "_SETTLE_WINDOW": 1, "_MIN_ROUND_PROGRESS": 1.0},
    "rounds_only": {"_LARGE_GROUP_PAIRS": 1, "_MIN_ROUND_PROGRESS": 0.0, "_SETTLE_WINDOW": 10 ** 9},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("seed", range(6))
def test_crowded_random_images_match_the_loop_oracle_on_every_path(monkeypatch, path, seed):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(matching, name, value)
    rng = np.random.default_rng(100 + seed)
    for _ in range(8):
        predictions, references = crowded_images(rng)
        iou_threshold = float(rng.choice([0.0, 1e-3, 0.1, 0.5, 0.75, 1.0]))
        include = bool(rng.random() < 0.3)
        expected = loop_match(predictions, references, 0.3, iou_threshold, include)
        actual = match_detections(predictions, references, 0.3, iou_threshold, include)
        assert_same_rows(as_rows(actual), expected)


def test_large_group_uses_the_sweep_and_matches_the_loop(monkeypatch):
    # 3,000 detections x 100 boxes of one class is over _LARGE_GROUP_PAIRS: the default path is the sweep.
    rng = np.random.default_rng(11)
    corner = rng.uniform(0, 500, (100, 2))
    gt_boxes = np.concatenate([corner, corner + rng.uniform(10, 120, (100, 2))], axis=1)
    source = gt_boxes[rng.integers(0, 100, 3000)]
    det_boxes = source + rng.normal(0, 6, source.shape)
    det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
    scores = np.round(rng.uniform(0, 1, 3000), 2)  # many ties
    predictions, references = [image(det_boxes, scores, np.zeros(3000, int))], [truth(gt_boxes, np.zeros(100, int))]
    calls = []
    sweep = matching._spatial_candidates
    monkeypatch.setattr(matching, "_spatial_candidates", lambda *args: calls.append(1) or sweep(*args))
    for threshold in (0.3, 0.5, 0.9):
        actual = match_detections(predictions, references, score_threshold=0.0, iou_threshold=threshold)
        assert_same_rows(as_rows(actual), loop_match(predictions, references, 0.0, threshold))
    assert calls


def test_pile_up_on_few_boxes_stays_within_the_pair_budget(monkeypatch):
    # 400 detections on 30 mutually overlapping boxes: 12,000 candidate pairs, with room for 500 at a time.
    # The group is settled in priority-order chunks against the unclaimed boxes, exactly.
    rng = np.random.default_rng(5)
    gt_boxes = np.array([10.0, 10.0, 50.0, 50.0]) + rng.normal(0, 1.5, (30, 4))
    det_boxes = np.array([10.0, 10.0, 50.0, 50.0]) + rng.normal(0, 2.0, (400, 4))
    predictions = [image(det_boxes, rng.uniform(0, 1, 400), np.zeros(400, int))]
    references = [truth(gt_boxes, np.zeros(30, int))]
    monkeypatch.setattr(matching, "_LARGE_GROUP_PAIRS", 1)
    monkeypatch.setattr(matching, "_MAX_PAIRS_PER_CHUNK", 500)
    held = []
    sweep = matching._spatial_candidates

    def recording_sweep(*args):
        pairs = sweep(*args)
        held.append(0 if pairs is None else len(pairs[0]))
        return pairs

    monkeypatch.setattr(matching, "_spatial_candidates", recording_sweep)
    actual = match_detections(predictions, references, score_threshold=0.0)
    assert_same_rows(as_rows(actual), loop_match(predictions, references, 0.0))
    assert actual.matched.sum() == 30 and 0 < max(held) <= 500


def test_chain_of_contested_boxes_hands_over_to_the_sequential_scan(monkeypatch):
    # Identical detections over boxes of strictly decreasing IoU: detection k gets box k, one per round.
    gt_boxes = [[0.0, 0.0, 10.0, 10.0 + 0.1 * k] for k in range(40)]
    predictions = [image([SQUARE] * 60, np.linspace(0.9, 0.5, 60), [0] * 60)]
    references = [truth(gt_boxes, [0] * 40)]
    calls = []
    scan = matching._settle_sequentially
    monkeypatch.setattr(matching, "_settle_sequentially", lambda *args: calls.append(1) or scan(*args))
    actual = match_detections(predictions, references)
    assert_same_rows(as_rows(actual), loop_match(predictions, references))
    assert actual.matched_reference.tolist() == list(range(40)) + [-1] * 20
    assert calls


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_sweep_keeps_pairs_exactly_at_the_threshold(monkeypatch, offset):
    # IoU exactly 0.5 (half of the box), exactly 1 (the same box): kept, on the sweep path, far from the origin
    # as well (the sweep's slack scales with the coordinates).
    monkeypatch.setattr(matching, "_LARGE_GROUP_PAIRS", 1)
    half, box = [offset, 0.0, offset + 5.0, 10.0], [offset, 0.0, offset + 10.0, 10.0]
    predictions = [image([half, box], [0.9, 0.8], [1, 1])]
    references = [truth([box, box], [1, 1])]
    assert match_detections(predictions, references).matched.tolist() == [True, True]
    assert match_detections(predictions, references, iou_threshold=1.0).matched.tolist() == [False, True]


def test_centre_bound_holds_for_every_pair_over_the_threshold():
    # The sweep's pruning: IoU >= t implies |cx_a - cx_b| <= f(t) min(w_a, w_b), and the same in y.
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 10, (200_000, 2))
    boxes_a = np.concatenate([a, a + rng.uniform(0, 10, (200_000, 2))], axis=1)
    boxes_b = boxes_a + rng.normal(0, 1, boxes_a.shape) * rng.uniform(0, 3, (200_000, 1))
    boxes_b[:, 2:] = np.maximum(boxes_b[:, 2:], boxes_b[:, :2])
    ious = matching.pairwise_box_iou(boxes_a, boxes_b)
    for threshold in (0.05, 0.3, 0.5, 0.7, 0.95):
        over = ious >= threshold
        assert over.sum() > 1000
        factor = matching._radius_factor(threshold)
        for axis in (0, 1):
            centre_gap = np.abs((boxes_a[over, axis] + boxes_a[over, axis + 2]) / 2
                                - (boxes_b[over, axis] + boxes_b[over, axis + 2]) / 2)
            sides = np.minimum(boxes_a[over, axis + 2] - boxes_a[over, axis],
                               boxes_b[over, axis + 2] - boxes_b[over, axis])
            assert (centre_gap <= factor * sides + 1e-12).all()
