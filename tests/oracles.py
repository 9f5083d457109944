"""The reference detection problems of ``shared/calibration_oracles`` (official-code numbers), as metric inputs.

The project's copy (``tests/data/calibration_oracles``, data and numbers only) makes the tests run on any clean
clone; a ``shared/calibration_oracles`` folder next to the repository, when present, is used instead (it may hold
more problems).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "calibration_oracles"
ORACLES = _SHARED if _SHARED.is_dir() else Path(__file__).resolve().parent / "data" / "calibration_oracles"
PROBLEMS = sorted(int(path.name[1:3]) for path in ORACLES.glob("p*_inputs.json")) if ORACLES.is_dir() else []
needs_oracles = pytest.mark.skipif(not PROBLEMS, reason=f"the official-code reference problems are not at {ORACLES}")


def load_problem(number: int):
    """``(predictions, references, categories, official, inputs)``: per-image dicts in the images' listed order
    (ascending id), detections and boxes in the order the official code saw them."""
    inputs = json.loads((ORACLES / f"p{number:02d}_inputs.json").read_text())
    official = json.loads((ORACLES / f"p{number:02d}_official.json").read_text())
    position = {image["id"]: index for index, image in enumerate(inputs["images"])}
    predictions = [{"boxes": [], "scores": [], "labels": []} for _ in position]
    references = [{"boxes": [], "labels": []} for _ in position]
    for detection in inputs["detections"]:
        entry = predictions[position[detection["image_id"]]]
        entry["boxes"].append(detection["bbox"])
        entry["scores"].append(detection["score"])
        entry["labels"].append(detection["category_id"])
    for box in inputs["ground_truths"]:
        entry = references[position[box["image_id"]]]
        entry["boxes"].append(box["bbox"])
        entry["labels"].append(box["category_id"])
    for entry in predictions + references:
        entry["boxes"] = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4)
    categories = [category["id"] for category in inputs["categories"]]
    return predictions, references, categories, official, inputs


def official_value(value) -> float:
    """The official JSON writes NaN as null."""
    return float("nan") if value is None else float(value)


def assert_close(actual, expected, what: str, tolerance: float = 1e-9) -> None:
    expected = official_value(expected)
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: expected NaN (null), got {actual}"
    else:
        assert abs(actual - expected) <= tolerance, f"{what}: {actual} vs official {expected}"
