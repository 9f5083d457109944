"""Reliability diagrams: files written, sizes, panels, errors."""

import numpy as np
import pytest
from matplotlib.image import imread

from hf_caldetr.metrics import (
    detection_ece,
    plot_reliability_diagram,
    synthetic_detections,
)


@pytest.fixture(scope="module")
def two_runs():
    runs = [synthetic_detections(num_images=50, sharpness=sharpness, seed=0)[:2] for sharpness in (2.0, 1.0)]
    return [detection_ece(*run) for run in runs]


def test_single_diagram(tmp_path, two_runs):
    path = plot_reliability_diagram(two_runs[0], tmp_path / "one.png", titles=["baseline"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (600, 600)  # 5 x 5 inches at 120 dpi


def test_two_runs_side_by_side(tmp_path, two_runs):
    path = plot_reliability_diagram(two_runs, tmp_path / "two.png", titles=["over-confident", "calibrated"])
    pixels = imread(path)
    assert pixels.shape[:2] == (600, 1200)
    # Both panels are drawn on: neither half is blank white.
    for half in (pixels[:, :600], pixels[:, 600:]):
        assert (half[..., :3] < 0.9).mean() > 0.05


def test_no_detections_still_draws(tmp_path):
    empty = detection_ece([], [])
    assert np.isnan(empty["d_ece"])
    assert plot_reliability_diagram(empty, tmp_path / "empty.png").exists()


@pytest.mark.parametrize("results, titles, message", [
    ([], None, "results is empty"),
    ([{"d_ece": 0.1}], None, "missing"),
    ("not a result", None, "must be a detection_ece result dict"),
])
def test_bad_input(tmp_path, results, titles, message):
    with pytest.raises(ValueError, match=message):
        plot_reliability_diagram(results, tmp_path / "bad.png", titles)


def test_title_count_must_match(tmp_path, two_runs):
    with pytest.raises(ValueError, match="1 titles for 2 results"):
        plot_reliability_diagram(two_runs, tmp_path / "bad.png", titles=["one"])
