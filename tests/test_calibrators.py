"""Post-hoc calibrators: fitted on an over-confident synthetic detector, judged by netcal's D-ECE."""

import json

import numpy as np
import pytest
from netcal.metrics import ECE
from scipy.special import expit, logit
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from hf_caldetr.calibrators import (
    MIN_DETECTIONS,
    HistogramBinning,
    IsotonicCalibrator,
    PlattScaling,
    TemperatureScaling,
    load_calibrator,
    reliability_before_after,
)

CALIBRATOR_CLASSES = [TemperatureScaling, PlattScaling, IsotonicCalibrator, HistogramBinning]


def synthetic_detections(num: int, seed: int, sharpness: float = 3.0, label: int = 0):
    """A detector whose detections are correct with probability ``p`` but report ``sigmoid(k * logit(p))``.

    ``k > 1`` is over-confident, ``k < 1`` under-confident; the perfect calibrator is then temperature
    scaling with ``T = k``.
    """
    rng = np.random.default_rng(seed)
    correct_probability = rng.uniform(0.05, 0.95, num)
    matched = rng.random(num) < correct_probability
    scores = expit(sharpness * logit(correct_probability))
    return scores, matched, np.full(num, label)


def detection_ece(scores, matched) -> float:
    """The D-ECE oracle of the protocol: netcal, 10 bins, float64 input."""
    return ECE(bins=10, detection=True).measure(np.asarray(scores, dtype=np.float64), matched)


@pytest.fixture(scope="module")
def fit_and_fresh_draws():
    return synthetic_detections(4000, seed=0), synthetic_detections(4000, seed=1)


@pytest.mark.parametrize("calibrator_class", CALIBRATOR_CLASSES)
def test_calibrator_cuts_ece_on_a_fresh_draw(calibrator_class, fit_and_fresh_draws):
    (fit_scores, fit_matched, _), (test_scores, test_matched, _) = fit_and_fresh_draws
    calibrated = calibrator_class().fit(fit_scores, fit_matched).transform(test_scores)

    ece_before = detection_ece(test_scores, test_matched)
    ece_after = detection_ece(calibrated, test_matched)
    assert ece_before > 0.14  # sharpness 3 puts the raw detector about 0.16 off
    assert ece_after < 0.035
    assert ece_after < 0.25 * ece_before
    assert calibrated.dtype == np.float64 and calibrated.shape == test_scores.shape
    assert calibrated.min() >= 0.0 and calibrated.max() <= 1.0


def test_temperature_recovers_the_true_temperature_and_keeps_the_ranking(fit_and_fresh_draws):
    (fit_scores, fit_matched, _), (test_scores, _, _) = fit_and_fresh_draws
    calibrator = TemperatureScaling().fit(fit_scores, fit_matched)
    assert calibrator.temperature == pytest.approx(3.0, rel=0.1)

    calibrated = calibrator.transform(test_scores)
    np.testing.assert_array_equal(np.argsort(calibrated, kind="stable"), np.argsort(test_scores, kind="stable"))
    # Strictly increasing: distinct scores stay distinct, in the same order (so AP cannot change).
    order = np.argsort(test_scores)
    assert np.all(np.diff(test_scores[order]) > 0)
    assert np.all(np.diff(calibrated[order]) > 0)
    # Over-confidence is softened: every score moves towards 0.5.
    assert np.all(np.abs(calibrated - 0.5) <= np.abs(test_scores - 0.5))


def test_temperature_of_scores_zero_and_one_stays_finite():
    scores, matched, _ = synthetic_detections(200, seed=2)
    calibrator = TemperatureScaling().fit(scores, matched)
    extremes = calibrator.transform(np.array([0.0, 1e-30, 0.5, 1.0]))
    assert np.all(np.isfinite(extremes))
    assert 0.0 < extremes[0] == extremes[1] < extremes[2] == 0.5 < extremes[3] < 1.0


def test_platt_recovers_slope_and_bias_of_a_shifted_detector():
    rng = np.random.default_rng(3)
    correct_probability = rng.uniform(0.05, 0.95, 6000)
    matched = rng.random(6000) < correct_probability
    # Reported logit = 2 * true logit + 1, so the inverse map is slope 0.5, bias -0.5.
    scores = expit(2.0 * logit(correct_probability) + 1.0)
    calibrator = PlattScaling().fit(scores, matched)
    assert calibrator.params_["slope"] == pytest.approx(0.5, abs=0.05)
    assert calibrator.params_["bias"] == pytest.approx(-0.5, abs=0.1)


def test_isotonic_transform_matches_scikit_learn(fit_and_fresh_draws):
    (fit_scores, fit_matched, _), (test_scores, _, _) = fit_and_fresh_draws
    outside = np.array([0.0, 1e-6, 0.999999, 1.0])  # beyond the fitted knots: clipped, not NaN
    queries = np.concatenate([test_scores, outside])
    reference = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(fit_scores, fit_matched)
    ours = IsotonicCalibrator().fit(fit_scores, fit_matched).transform(queries)
    np.testing.assert_allclose(ours, reference.predict(queries), rtol=0, atol=1e-12)
    assert np.all(np.diff(ours[np.argsort(queries)]) >= 0)


def test_histogram_binning_on_hand_computed_bins():
    # Bin [0.1, 0.2): 3 detections, 1 true positive; bin [0.9, 1.0]: 4 detections (1.0 included), 3 tp.
    # A score of exactly 0.3 lands in [0.2, 0.3), as in the D-ECE protocol (the edge is 0.30000000000000004),
    # so that bin holds 1 tp of 1 and [0.3, 0.4) 1 tp of 2. Empty bins keep their midpoints.
    scores = np.array([0.1, 0.15, 0.19, 0.9, 0.95, 0.99, 1.0, 0.3, 0.35, 0.39])
    matched = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 0])
    calibrator = HistogramBinning(num_bins=10).fit(scores, matched)
    expected_bins = [0.05, 1 / 3, 1.0, 0.5, 0.45, 0.55, 0.65, 0.75, 0.85, 0.75]
    np.testing.assert_allclose(calibrator.params_["bin_values"], expected_bins, rtol=0, atol=1e-15)
    np.testing.assert_allclose(calibrator.transform([0.12, 0.3, 0.31, 0.5, 1.0]), [1 / 3, 1.0, 0.5, 0.55, 0.75])



def test_histogram_binning_uses_the_d_ece_bins():
    """One binning rule: a histogram-binning calibrator groups exactly the detections D-ECE puts in one bin (the
    bins of netcal's ECE, our D-ECE oracle), edges, 0, 1 and float32 scores included."""
    edges = np.linspace(0.0, 1.0, 11)
    scores = np.concatenate([edges, np.nextafter(edges, -1.0)[1:], np.nextafter(edges, 2.0)[:-1],
                             np.linspace(0, 1, 997), np.float32([0.3, 0.7, 0.9, 0.1])]).clip(0.0, 1.0)
    matched = (np.arange(len(scores)) % 3 == 0).astype(int)
    from hf_caldetr.calibrators import histogram_bin_indices
    from hf_caldetr.metrics.d_ece import calibration_error

    ours = histogram_bin_indices(scores, 10)
    counts = calibration_error(scores, matched, num_bins=10)["bin_counts"]
    np.testing.assert_array_equal(np.bincount(ours, minlength=10), counts)
    # netcal's ECE of scores against outcomes equals the D-ECE of these bins, so the bins are netcal's too.
    ece = ECE(bins=10).measure(scores.astype(np.float64), matched)
    assert calibration_error(scores, matched, num_bins=10)["d_ece"] == pytest.approx(ece, abs=1e-12)
    # A calibrator fitted on one bin's detections maps all of them, and only them, to that bin's precision.
    calibrator = HistogramBinning(num_bins=10).fit(scores, matched)
    mapped = calibrator.transform(scores)
    for k in range(10):
        assert np.all(mapped[ours == k] == calibrator.params_["bin_values"][k])

def test_class_wise_fits_one_map_per_differently_miscalibrated_class():
    over_scores, over_matched, over_labels = synthetic_detections(3000, seed=4, sharpness=3.0, label=0)
    under_scores, under_matched, under_labels = synthetic_detections(3000, seed=5, sharpness=0.5, label=7)
    few_scores, few_matched, few_labels = synthetic_detections(20, seed=6, sharpness=1.0, label=3)
    scores = np.concatenate([over_scores, under_scores, few_scores])
    matched = np.concatenate([over_matched, under_matched, few_matched])
    labels = np.concatenate([over_labels, under_labels, few_labels])

    class_wise = TemperatureScaling(class_wise=True).fit(scores, matched, labels)
    agnostic = TemperatureScaling().fit(scores, matched)
    assert class_wise.class_params_[0]["temperature"] == pytest.approx(3.0, rel=0.1)
    assert class_wise.class_params_[7]["temperature"] == pytest.approx(0.5, rel=0.1)
    # Class 3 has 20 < min_class_detections detections: it falls back to the class-agnostic map.
    assert set(class_wise.class_params_) == {0, 7}
    assert class_wise.params_ == agnostic.params_

    # On fresh draws of both classes the single temperature (about 2.5, dominated by the over-confident
    # class) over-softens the under-confident class; one temperature per class fixes both.
    over_test = synthetic_detections(3000, seed=8, sharpness=3.0, label=0)
    under_test = synthetic_detections(3000, seed=9, sharpness=0.5, label=7)
    test_scores, test_matched, test_labels = (np.concatenate(pair) for pair in zip(over_test, under_test))
    ece_class_wise = detection_ece(class_wise.transform(test_scores, test_labels), test_matched)
    ece_agnostic = detection_ece(agnostic.transform(test_scores), test_matched)
    assert ece_class_wise < 0.03 and ece_class_wise < 0.3 * ece_agnostic
    under_scores, under_matched, under_labels = under_test
    ece_under_raw = detection_ece(under_scores, under_matched)
    assert detection_ece(agnostic.transform(under_scores), under_matched) > ece_under_raw
    assert detection_ece(class_wise.transform(under_scores, under_labels), under_matched) < 0.3 * ece_under_raw
    # Fallback and unseen labels both get the class-agnostic map.
    probe = np.array([0.2, 0.6, 0.9])
    np.testing.assert_array_equal(class_wise.transform(probe, [3, 3, 3]), agnostic.transform(probe))
    np.testing.assert_array_equal(class_wise.transform(probe, [42, 42, 42]), agnostic.transform(probe))


def test_class_wise_falls_back_for_a_class_with_one_outcome():
    scores, matched, labels = synthetic_detections(400, seed=10)
    labels = labels.copy()
    labels[:100] = 5
    matched = matched.copy()
    matched[:100] = True  # class 5: all true positives
    calibrator = PlattScaling(class_wise=True).fit(scores, matched, labels)
    assert set(calibrator.class_params_) == {0}


@pytest.mark.parametrize("calibrator_class", CALIBRATOR_CLASSES)
@pytest.mark.parametrize("class_wise", [False, True])
def test_save_load_round_trip_gives_identical_transforms(calibrator_class, class_wise, tmp_path):
    over_scores, over_matched, over_labels = synthetic_detections(600, seed=11, sharpness=3.0, label=1)
    under_scores, under_matched, under_labels = synthetic_detections(600, seed=12, sharpness=0.5, label=2)
    scores = np.concatenate([over_scores, under_scores])
    matched = np.concatenate([over_matched, under_matched])
    labels = np.concatenate([over_labels, under_labels])
    calibrator = calibrator_class(class_wise=class_wise).fit(scores, matched, labels)

    path = tmp_path / "calibrator.json"
    calibrator.save(path)
    loaded = load_calibrator(path)
    assert type(loaded) is calibrator_class
    assert json.loads(path.read_text())["type"] == calibrator_class.__name__
    assert loaded.class_wise == class_wise and loaded.class_params_.keys() == calibrator.class_params_.keys()

    probe_scores, _, _ = synthetic_detections(500, seed=13)
    probe_labels = np.tile([1, 2, 9], 500)[:500]
    np.testing.assert_array_equal(
        loaded.transform(probe_scores, probe_labels), calibrator.transform(probe_scores, probe_labels)
    )


def test_histogram_bin_count_survives_save_and_load(tmp_path):
    scores, matched, _ = synthetic_detections(300, seed=14)
    HistogramBinning(num_bins=4).fit(scores, matched).save(tmp_path / "histogram.json")
    loaded = load_calibrator(tmp_path / "histogram.json")
    assert loaded.num_bins == 4 and len(loaded.params_["bin_values"]) == 4


GOOD_SCORES, GOOD_MATCHED, GOOD_LABELS = synthetic_detections(50, seed=15)


@pytest.mark.parametrize(
    "scores, matched, labels, message",
    [
        (np.where(np.arange(50) == 3, np.nan, GOOD_SCORES), GOOD_MATCHED, None, "NaN"),
        (np.where(np.arange(50) == 3, 1.5, GOOD_SCORES), GOOD_MATCHED, None, r"\[0, 1\]"),
        (np.where(np.arange(50) == 3, -0.1, GOOD_SCORES), GOOD_MATCHED, None, r"\[0, 1\]"),
        (GOOD_SCORES.reshape(5, 10), GOOD_MATCHED, None, "one-dimensional"),
        (GOOD_SCORES > 0.5, GOOD_MATCHED, None, r"numbers in \[0, 1\]"),
        (GOOD_SCORES, GOOD_MATCHED[:49], None, "one entry per score"),
        (GOOD_SCORES, np.where(np.arange(50) == 3, 2, GOOD_MATCHED.astype(int)), None, "boolean or 0/1"),
        (GOOD_SCORES, np.full(50, 0.5), None, "boolean or 0/1"),
        (GOOD_SCORES, GOOD_MATCHED, GOOD_LABELS[:40], "one class id per score"),
        (GOOD_SCORES, GOOD_MATCHED, np.full(50, 1.5), "integer class ids"),
        (GOOD_SCORES[: MIN_DETECTIONS - 1], GOOD_MATCHED[: MIN_DETECTIONS - 1], None, "MIN_DETECTIONS"),
    ],
)
@pytest.mark.parametrize("calibrator_class", CALIBRATOR_CLASSES)
def test_fit_refuses_bad_input(calibrator_class, scores, matched, labels, message):
    with pytest.raises(ValueError, match=message):
        calibrator_class().fit(scores, matched, labels)



@pytest.mark.parametrize("scores, matched", [
    (np.array([0.2, np.nan] * 25), GOOD_MATCHED),
    (np.array([0.2, 1.5] * 25), GOOD_MATCHED),
    (GOOD_SCORES > 0.5, GOOD_MATCHED),
    (GOOD_SCORES.reshape(5, 10), GOOD_MATCHED),
    (GOOD_SCORES, GOOD_MATCHED[:49]),
    (GOOD_SCORES, np.full(50, 0.5)),
])
def test_calibrators_and_d_ece_share_one_input_validator(scores, matched):
    """The same bad scores or outcomes get the same error from a calibrator's fit and from D-ECE."""
    from hf_caldetr.metrics.d_ece import calibration_error

    with pytest.raises(ValueError) as from_metric:
        calibration_error(scores, matched)
    with pytest.raises(ValueError) as from_calibrator:
        HistogramBinning().fit(scores, matched)
    assert str(from_calibrator.value) == str(from_metric.value)

@pytest.mark.parametrize("calibrator_class", CALIBRATOR_CLASSES)
def test_transform_refuses_bad_input(calibrator_class, tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):  # NotFittedError is a ValueError
        calibrator_class().transform(GOOD_SCORES)
    with pytest.raises(ValueError, match="not fitted"):
        calibrator_class().save(tmp_path / "unfitted.json")

    fitted = calibrator_class().fit(GOOD_SCORES, GOOD_MATCHED)
    with pytest.raises(ValueError, match="NaN"):
        fitted.transform(np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.transform(np.array([0.2, 1.01]))
    with pytest.raises(ValueError, match="one class id per score"):
        fitted.transform(GOOD_SCORES, GOOD_LABELS[:3])

    class_wise = calibrator_class(class_wise=True)
    with pytest.raises(ValueError, match="needs labels"):
        class_wise.fit(GOOD_SCORES, GOOD_MATCHED)
    with pytest.raises(ValueError, match="needs labels"):
        class_wise.fit(GOOD_SCORES, GOOD_MATCHED, GOOD_LABELS).transform(GOOD_SCORES)


def test_bad_constructor_arguments_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="class_wise"):
        TemperatureScaling(class_wise="yes")
    with pytest.raises(ValueError, match="min_class_detections"):
        PlattScaling(class_wise=True, min_class_detections=MIN_DETECTIONS - 1)
    with pytest.raises(ValueError, match="num_bins"):
        HistogramBinning(num_bins=0)

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"type": "BetaCalibration", "config": {}, "params": {}}))
    with pytest.raises(ValueError, match="unknown calibrator type 'BetaCalibration'"):
        load_calibrator(unknown)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"type": "TemperatureScaling"}))
    with pytest.raises(ValueError, match="lacks the field"):
        load_calibrator(incomplete)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid calibrator JSON"):
        load_calibrator(garbage)


def test_float32_scores_and_integer_matched_give_the_same_fit():
    scores, matched, _ = synthetic_detections(500, seed=16)
    from_bool = IsotonicCalibrator().fit(scores, matched)
    from_float32_and_int = IsotonicCalibrator().fit(scores.astype(np.float32), matched.astype(np.int64))
    probe = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(from_float32_and_int.transform(probe), from_bool.transform(probe), atol=1e-6)
    assert from_bool.transform(probe.astype(np.float32)).dtype == np.float64


def test_torch_tensors_are_accepted_like_numpy_arrays():
    torch = pytest.importorskip("torch")
    scores, matched, labels = synthetic_detections(500, seed=17)
    from_numpy = PlattScaling().fit(scores, matched)
    from_torch = PlattScaling().fit(torch.from_numpy(scores), torch.from_numpy(matched), torch.from_numpy(labels))
    assert from_torch.params_ == from_numpy.params_
    bfloat16_scores = torch.tensor([0.25, 0.5, 0.75], dtype=torch.bfloat16)  # exact in bfloat16
    np.testing.assert_array_equal(from_torch.transform(bfloat16_scores), from_numpy.transform([0.25, 0.5, 0.75]))


def test_reliability_before_after_writes_a_png_and_shows_the_cut(fit_and_fresh_draws, tmp_path):
    (fit_scores, fit_matched, _), (test_scores, test_matched, _) = fit_and_fresh_draws
    calibrator = IsotonicCalibrator().fit(fit_scores, fit_matched)
    path = tmp_path / "reliability.png"
    results = reliability_before_after(calibrator, test_scores, test_matched, path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert results["before"]["d_ece"] == pytest.approx(detection_ece(test_scores, test_matched), abs=1e-9)
    calibrated = calibrator.transform(test_scores)
    assert results["after"]["d_ece"] == pytest.approx(detection_ece(calibrated, test_matched), abs=1e-9)
    assert results["after"]["d_ece"] < 0.25 * results["before"]["d_ece"]
    # Same detections, same outcomes: only the confidences (and so the bin contents) move.
    assert results["before"]["num_detections"] == results["after"]["num_detections"] == test_scores.size
    assert results["before"]["precision"] == results["after"]["precision"]
    assert results["before"]["bin_counts"] != results["after"]["bin_counts"]


def test_reliability_before_after_needs_labels_for_a_class_wise_calibrator(tmp_path):
    scores, matched, labels = synthetic_detections(200, seed=18)
    calibrator = TemperatureScaling(class_wise=True).fit(scores, matched, labels)
    with pytest.raises(ValueError, match="needs labels"):
        reliability_before_after(calibrator, scores, matched, tmp_path / "reliability.png")
    results = reliability_before_after(calibrator, scores, matched, tmp_path / "reliability.png", labels=labels)
    assert results["after"]["d_ece"] < results["before"]["d_ece"]


def _saved(calibrator_class, class_wise=False, **options):
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 0.99, 400)
    labels = rng.integers(0, 2, 400)
    matched = rng.uniform(size=400) < scores ** 2
    return calibrator_class(class_wise=class_wise, min_class_detections=50, **options).fit(scores, matched, labels).to_dict()


def _set(description, path, value):
    target = description
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return description


@pytest.mark.parametrize(("calibrator_class", "class_wise", "path", "value", "message"), [
    ("TemperatureScaling", False, ("params", "temperature"), -1.0, "temperature must be positive"),
    ("TemperatureScaling", False, ("params", "temperature"), float("nan"), "must be finite"),
    ("TemperatureScaling", False, ("params", "temperature"), "2", "must be a number"),
    ("PlattScaling", False, ("params", "slope"), -0.5, "slope must be >= 0"),
    ("PlattScaling", False, ("params",), {"slope": 1.0}, "exactly the keys"),
    ("IsotonicCalibrator", False, ("params",), {"knots_x": [0.5, 0.2, 0.9], "knots_q": [0.1, 0.2, 0.3]},
     "sorted and the map non-decreasing"),
    ("IsotonicCalibrator", False, ("params",), {"knots_x": [0.2, 0.5, 0.9], "knots_q": [0.3, 0.2, 0.4]},
     "sorted and the map non-decreasing"),
    ("IsotonicCalibrator", False, ("params",), {"knots_x": [0.1, 0.2], "knots_q": [0.3]}, "one length"),
    ("IsotonicCalibrator", False, ("params",), {"knots_x": [0.1, 0.2], "knots_q": [0.3, 1.5]}, r"in \[0, 1\]"),
    ("HistogramBinning", False, ("params", "bin_values"), [0.5] * 12, "12 values for num_bins=10"),
    ("TemperatureScaling", False, ("class_params",), {"0": {"temperature": 2.0}}, "class-agnostic"),
    ("PlattScaling", True, ("class_params",), {"zero": {"slope": 1.0, "bias": 0.0}}, "not a class id"),
    ("PlattScaling", True, ("class_params",), {"0": {"slope": -1.0, "bias": 0.0}}, r"class_params\[0\].slope"),
    ("TemperatureScaling", False, ("format_version",), 7, "format_version 7"),
    ("TemperatureScaling", False, ("params", "temperature"), [2.0], "must be a single number"),
    ("PlattScaling", False, ("params", "bias"), [0.1, 0.2], "must be a single number"),
])
def test_calibrator_files_are_validated_on_load(tmp_path, calibrator_class, class_wise, path, value, message):
    from hf_caldetr import calibrators

    description = _set(_saved(getattr(calibrators, calibrator_class), class_wise), path, value)
    file = tmp_path / "calibrator.json"
    file.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=message):
        calibrators.load_calibrator(file)


def test_saved_calibrators_carry_the_format_version_and_load_back(tmp_path):
    from hf_caldetr import calibrators

    for name in ("TemperatureScaling", "PlattScaling", "IsotonicCalibrator", "HistogramBinning"):
        calibrator = getattr(calibrators, name)
        description = _saved(calibrator, class_wise=True)
        assert description["format_version"] == calibrators.FORMAT_VERSION
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(description))
        loaded = calibrators.load_calibrator(path)
        assert loaded.to_dict() == description
