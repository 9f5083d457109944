"""Reliability diagrams: files written, sizes, panels, errors; the drawn artists read back against the legend."""

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.image import imread
from matplotlib.patches import Rectangle

from hf_caldetr.metrics import (
    detection_ece,
    plot_reliability_diagram,
    synthetic_detections,
)
from hf_caldetr.metrics.reliability import (
    SPARSE_BIN_DETECTIONS,
    SPARSE_BIN_SHARE,
    reliability_figure,
    sparse_bins,
)


@pytest.fixture(scope="module")
def two_runs():
    runs = [synthetic_detections(num_images=50, sharpness=sharpness, seed=0)[:2] for sharpness in (2.0, 1.0)]
    return [detection_ece(*run) for run in runs]


def test_single_diagram(tmp_path, two_runs):
    path = plot_reliability_diagram(two_runs[0], tmp_path / "one.png", titles=["baseline"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (720, 600)  # a 5 x 5 inch panel and 1 inch of legend below, at 120 dpi


def test_two_runs_side_by_side(tmp_path, two_runs):
    path = plot_reliability_diagram(two_runs, tmp_path / "two.png", titles=["over-confident", "calibrated"])
    pixels = imread(path)
    assert pixels.shape[:2] == (720, 1200)
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


# ------------------------------------------------------------------------------- what is drawn, read back


def _hand_made(counts, precisions, confidences, d_ece=0.05):
    """A result dict with 10 equal bins; ``None`` marks an empty bin."""
    nan = float("nan")
    return {"d_ece": d_ece, "bin_edges": np.linspace(0, 1, 11), "bin_counts": np.array(counts),
            "bin_precisions": np.array([nan if p is None else p for p in precisions]),
            "bin_confidences": np.array([nan if c is None else c for c in confidences])}


# Bins 3-4 under-confident, 5-6 and 8-9 over-confident, bin 7 holds 4 detections (sparse), bin 9 1,840.
MIXED = _hand_made(counts=[0, 0, 0, 412, 233, 150, 96, 4, 61, 1840],
                   precisions=[None] * 3 + [0.41, 0.52, 0.55, 0.62, 0.25, 0.79, 0.93],
                   confidences=[None] * 3 + [0.35, 0.45, 0.58, 0.65, 0.74, 0.86, 0.96])


def _rgba(color):
    return tuple(np.round(to_rgba(color), 3))


def _hatch_color(patch):
    return _rgba(patch.get_hatchcolor() if hasattr(patch, "get_hatchcolor") else patch._hatch_color)


def _filled(axes):
    """The patches of ``axes`` that paint a face (not the background, not the face-less outlines)."""
    return [patch for patch in axes.patches if patch.get_facecolor()[3] > 0]


def _legend_patches(axes):
    return [handle for handle in axes.get_legend().legend_handles if isinstance(handle, Rectangle)]


def _style(patch):
    return _rgba(patch.get_facecolor()), patch.get_hatch(), _hatch_color(patch) if patch.get_hatch() else None


def _patch_at(axes, left, bottom, height):
    """The filled patch with this lower-left corner and height."""
    found = [patch for patch in _filled(axes) if np.isclose(patch.get_x(), left)
             and np.isclose(patch.get_y(), bottom) and np.isclose(patch.get_height(), height)]
    assert len(found) == 1, (left, bottom, height, found)
    return found[0]


@pytest.mark.parametrize("name", ["mixed", "synthetic"])
def test_every_drawn_style_is_in_the_legend_and_opaque(two_runs, name):
    results = [MIXED] if name == "mixed" else two_runs
    figure = reliability_figure(results)
    for axes in figure.axes:
        drawn = {_style(patch) for patch in _filled(axes)}
        legend = {_style(handle) for handle in _legend_patches(axes)}
        # Every face colour and hatch (with its colour) painted is a legend entry, and the legend names nothing
        # that is not painted.
        assert drawn == legend
        # Opaque faces only: nothing is alpha-blended into a colour the legend does not show.
        for patch in _filled(axes):
            assert patch.get_facecolor()[3] == 1.0
            assert patch.get_alpha() is None
    # The hand-made panel has all four bar styles: precision, sparse, over- and under-confident gap.
    if name == "mixed":
        assert len(legend) == 4 and len({face for face, _, _ in legend}) == 4


def test_gap_colours_say_which_way():
    figure = reliability_figure(MIXED)
    (axes,) = figure.axes
    under = _patch_at(axes, 0.3, 0.35, 0.06)   # precision 0.41 > confidence 0.35: gap drawn over the bar
    over = _patch_at(axes, 0.6, 0.62, 0.03)    # precision 0.62 < confidence 0.65: gap drawn above the bar
    bar = _patch_at(axes, 0.3, 0.0, 0.41)      # the precision bar the under-confident gap covers
    assert _style(under) != _style(over)
    assert _rgba(under.get_facecolor()) != _rgba(bar.get_facecolor())
    assert under.get_zorder() > bar.get_zorder()  # on top, not hidden behind the bar
    assert under.get_hatch() and over.get_hatch() and under.get_hatch() != over.get_hatch()
    # Both gaps are legend entries of their own, with exactly the drawn style.
    legend = [_style(handle) for handle in _legend_patches(axes)]
    assert _style(under) in legend and _style(over) in legend
    # And on the rendered image, the under-confident gap's most common pixel colour is its own face colour: not
    # a blend of it with the blue bar beneath.
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    (x0, y0), (x1, y1) = axes.transData.transform([(0.3, 0.35), (0.4, 0.41)])
    height = pixels.shape[0]
    region = pixels[int(height - y1) + 2:int(height - y0) - 2, int(x0) + 2:int(x1) - 2].reshape(-1, 3)
    colours, counts = np.unique(region, axis=0, return_counts=True)
    most_common = colours[counts.argmax()] / 255
    assert np.allclose(most_common, to_rgba(under.get_facecolor())[:3], atol=2 / 255)


def test_sparse_bins_are_marked():
    figure = reliability_figure(MIXED)
    (axes,) = figure.axes
    sparse = _patch_at(axes, 0.7, 0.0, 0.25)   # 4 detections
    full = _patch_at(axes, 0.9, 0.0, 0.93)     # 1,840 detections
    small_but_enough = _patch_at(axes, 0.8, 0.0, 0.79)  # 61 detections: >= 10 and >= 1 % of 2,796
    assert _style(full) == _style(small_but_enough)
    assert _style(sparse) != _style(full)
    assert sparse.get_hatch() and not full.get_hatch()
    # Paler than a full bar (higher luminance), and its style is a legend entry of its own.
    assert np.mean(to_rgba(sparse.get_facecolor())[:3]) > np.mean(to_rgba(full.get_facecolor())[:3]) + 0.3
    assert _style(sparse) in [_style(handle) for handle in _legend_patches(axes)]
    # Every occupied bin is labelled with its count, above the bar.
    labelled = {int("".join(ch for ch in text.get_text() if ch.isdigit())) for text in axes.texts}
    assert labelled == {412, 233, 150, 96, 4, 61, 1840}


def test_no_sparse_entry_when_every_bin_is_full(two_runs):
    # The synthetic runs hold hundreds of detections in every occupied bin: one bar style for them all.
    for axes in reliability_figure(two_runs).axes:
        bars = [patch for patch in _filled(axes) if np.isclose(patch.get_y(), 0)]
        assert len({_style(bar) for bar in bars}) == 1


@pytest.mark.parametrize("counts, expected", [
    ([0, 9, 10, 900], [False, True, False, False]),           # the absolute floor: fewer than 10
    ([0, 29, 30, 2941], [False, True, False, False]),         # the share: under 1 % of 3,000 is under 30
    ([0, 0, 5, 0], [False, False, True, False]),              # a panel of 5 detections is all sparse
    ([0, 0, 0, 0], [False, False, False, False]),             # empty bins are not drawn at all
])
def test_sparse_rule(counts, expected):
    assert sparse_bins(counts).tolist() == expected
    assert SPARSE_BIN_DETECTIONS == 10 and SPARSE_BIN_SHARE == 0.01


# ------------------------------------------------------------------------------------------ D-UCE diagrams


def _hand_made_uncertainty(counts, error_rates, uncertainties, d_uce=0.05):
    nan = float("nan")
    return {"d_uce": d_uce, "bin_edges": np.linspace(0, 1, 11), "bin_counts": np.array(counts),
            "bin_error_rates": np.array([nan if e is None else e for e in error_rates]),
            "bin_uncertainties": np.array([nan if u is None else u for u in uncertainties])}


# Bin 1: error rate 0.30 > uncertainty 0.15 (over-confident); bin 5: 0.40 < 0.55 (under-confident); bin 8 sparse.
UNCERTAIN = _hand_made_uncertainty(counts=[300, 200, 0, 0, 0, 150, 0, 0, 3, 0],
                                   error_rates=[0.06, 0.30, None, None, None, 0.40, None, None, 0.9, None],
                                   uncertainties=[0.05, 0.15, None, None, None, 0.55, None, None, 0.85, None])


def test_uncertainty_diagram_is_written(tmp_path):
    from hf_caldetr.metrics import plot_uncertainty_diagram, uncertainty_calibration_error

    rng = np.random.default_rng(0)
    uncertainties = rng.uniform(0, 0.99, 500)
    result = uncertainty_calibration_error(uncertainties, rng.uniform(0, 1, 500) > uncertainties ** 0.5)
    path = plot_uncertainty_diagram([result, UNCERTAIN], tmp_path / "u.png", titles=["synthetic", "hand-made"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[:2] == (720, 1200)
    for half in (pixels[:, :600], pixels[:, 600:]):
        assert (half[..., :3] < 0.9).mean() > 0.02
    # An evaluation result holding the D-UCE result draws the same.
    assert plot_uncertainty_diagram({"d_ece": 0.1, "uncertainty_calibration": result}, tmp_path / "e.png").exists()
    assert plot_uncertainty_diagram(uncertainty_calibration_error([], []), tmp_path / "empty.png").exists()


def test_uncertainty_gaps_say_which_way():
    """Over-confident (error rate above the uncertainty): the gap lies inside the bar, red like the reliability
    diagram's over-confident gaps; under-confident above the bar, orange."""
    from hf_caldetr.metrics.reliability import uncertainty_figure

    (axes,) = uncertainty_figure(UNCERTAIN).axes
    over = _patch_at(axes, 0.1, 0.15, 0.15)    # error rate 0.30 > uncertainty 0.15
    under = _patch_at(axes, 0.5, 0.40, 0.15)   # error rate 0.40 < uncertainty 0.55
    (reliability_axes,) = reliability_figure(MIXED).axes
    assert _style(over) == _style(_patch_at(reliability_axes, 0.6, 0.62, 0.03))   # over-confident there
    assert _style(under) == _style(_patch_at(reliability_axes, 0.3, 0.35, 0.06))  # under-confident there
    drawn = {_style(patch) for patch in _filled(axes)}
    assert drawn == {_style(handle) for handle in _legend_patches(axes)} and len(drawn) == 4
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert any("error rate > uncertainty" in label for label in labels)
    assert "D-UCE = 5.00 %" in axes.get_title() and axes.get_xlabel().startswith("uncertainty")


@pytest.mark.parametrize("results, message", [
    ([], "results is empty"),
    ([{"d_ece": 0.1, "bin_counts": [1]}], "missing"),
    ("not a result", "must be a detection_uce result dict"),
])
def test_uncertainty_diagram_bad_input(tmp_path, results, message):
    from hf_caldetr.metrics import plot_uncertainty_diagram

    with pytest.raises(ValueError, match=message):
        plot_uncertainty_diagram(results, tmp_path / "bad.png")
