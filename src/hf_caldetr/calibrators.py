"""Post-hoc calibrators for detection confidences.

A post-hoc calibrator is a monotone map fitted on held-out detections: each detection has a confidence
``score`` in [0, 1] and a boolean ``matched`` (true positive under the D-ECE matching protocol). The map is
fitted so that, among detections with calibrated score ``q``, a fraction ``q`` are true positives. Kuzucu et
al. (ECCV 2024) found such calibrators, isotonic regression above all, strong baselines against train-time
methods such as Cal-DETR; the two also combine (calibrate a Cal-DETR model post hoc).

Four calibrators share one interface::

    calibrator = IsotonicCalibrator().fit(scores, matched)
    calibrated = calibrator.transform(new_scores)
    calibrator.save("calibrator.json")
    calibrator = load_calibrator("calibrator.json")

- ``TemperatureScaling``: ``q = sigmoid(logit(s) / T)``, one parameter, keeps the ranking (and so the AP).
- ``PlattScaling``: ``q = sigmoid(a * logit(s) + b)`` with ``a >= 0``.
- ``IsotonicCalibrator``: the best non-decreasing step-then-linear map (scikit-learn's isotonic regression).
- ``HistogramBinning``: equal-width bins over [0, 1], each mapped to its fraction of true positives.

The scores are detection confidences (sigmoid probabilities), so the two parametric calibrators work on
``logit(s)``, with ``s`` clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` so that scores of exactly 0 or 1 stay
finite. Both are fitted by minimising the mean binary negative log-likelihood with scipy.optimize.

Class-wise calibration: with ``class_wise=True`` the calibrator fits one map per class label (``fit(scores,
matched, labels)``), and ``transform(scores, labels)`` applies each detection's own class map. A class with
fewer than ``min_class_detections`` detections, or whose detections are all true positives or all false
positives, gets no map of its own and falls back to the class-agnostic map fitted on all detections; so does
a label never seen at fit time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import optimize, special
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from hf_caldetr.metrics.binning import bin_index, clip_to_open_unit
from hf_caldetr.metrics.d_ece import calibration_error
from hf_caldetr.metrics.inputs import outcome_vector, to_numpy, unit_interval_vector

__all__ = [
    "LOGIT_EPS",
    "MIN_CLASS_DETECTIONS",
    "MIN_DETECTIONS",
    "HistogramBinning",
    "IsotonicCalibrator",
    "PlattScaling",
    "PostHocCalibrator",
    "SoftmaxTemperatureScaling",
    "TemperatureScaling",
    "calibrate_pipeline_outputs",
    "load_calibrator",
    "reliability_before_after",
]

MIN_DETECTIONS = 10
"""Fewest detections a calibrator may be fitted on: below this any fit is noise, so ``fit`` refuses."""

MIN_CLASS_DETECTIONS = 50
"""Default fewest detections a class needs for its own map under ``class_wise=True``; else it falls back."""

FORMAT_VERSION = 1
"""Version of the saved calibrator format (``calibrator.json``); a file of another version is refused on load."""

LOGIT_EPS = 1e-12
"""Scores are clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` before ``logit``: ``logit(1 - 1e-12)`` is about 27.6."""

# Search ranges of the parametric fits. They only bind on degenerate data (e.g. every detection a true
# positive, where the likelihood keeps improving as the map steepens); they keep the parameters finite.
TEMPERATURE_BOUNDS = (1e-2, 1e2)
PLATT_SLOPE_BOUNDS = (0.0, 1e2)
PLATT_BIAS_BOUNDS = (-1e2, 1e2)


# ----------------------------------------------------------------------------------------------------------
# Input checks


def _check_scores(scores) -> np.ndarray:
    """``scores`` (numpy, list, or torch tensor of any dtype/device) as a 1-D float64 array in [0, 1]: the metrics'
    validator (:func:`hf_caldetr.metrics.inputs.unit_interval_vector`), so calibrators and D-ECE accept the same
    input."""
    return unit_interval_vector(scores, "scores")


def _check_matched(matched, num_scores: int) -> np.ndarray:
    """``matched`` as a boolean array of ``num_scores`` entries (bool or 0/1): the metrics' validator."""
    return outcome_vector(matched, "matched", num_scores)


def _check_labels(labels, num_scores: int) -> np.ndarray:
    """Return ``labels`` as an int64 array of length ``num_scores``; integer-valued floats are accepted."""
    labels = to_numpy(labels)
    if labels.shape != (num_scores,):
        raise ValueError(f"labels must have one class id per score ({num_scores}), got shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    is_numeric = np.issubdtype(labels.dtype, np.number) and labels.dtype != bool
    if not is_numeric or not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype} with non-integer values")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# The maps and their fits: small pure functions on float64 arrays


def score_logits(scores: np.ndarray) -> np.ndarray:
    """``logit(s) = log(s / (1 - s))``, with ``s`` clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` first."""
    return special.logit(np.clip(scores, LOGIT_EPS, 1.0 - LOGIT_EPS))


def binary_nll(logits: np.ndarray, matched: np.ndarray) -> float:
    """Mean binary negative log-likelihood of ``matched`` (y) under ``p = sigmoid(z)``.

    ``NLL = mean(-y log p - (1 - y) log(1 - p)) = mean(log(1 + exp(z)) - y z)``; the second form is the one
    evaluated (``logaddexp``), as it never overflows.
    """
    return float(np.mean(np.logaddexp(0.0, logits) - matched * logits))


def fit_temperature(logits: np.ndarray, matched: np.ndarray) -> float:
    """The temperature ``T`` minimising ``binary_nll(logits / T, matched)``.

    The NLL is convex in ``1 / T`` (a logistic regression with one weight and no bias), hence unimodal in
    ``log T``; a bounded Brent search over ``log T`` within ``TEMPERATURE_BOUNDS`` finds its minimum.
    """
    result = optimize.minimize_scalar(
        lambda log_t: binary_nll(logits * math.exp(-log_t), matched),
        bounds=tuple(math.log(bound) for bound in TEMPERATURE_BOUNDS),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return math.exp(result.x)


def fit_platt(logits: np.ndarray, matched: np.ndarray) -> tuple[float, float]:
    """The slope ``a`` and bias ``b`` minimising ``binary_nll(a * logits + b, matched)``.

    Convex in ``(a, b)``; solved by L-BFGS-B with the exact gradient
    ``d NLL / d(a, b) = mean((sigmoid(z) - y) * (x, 1))``. The slope is bounded below by 0 so the map can
    never reverse the ranking of the scores (which would wreck the AP).
    """

    def nll_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        slope, bias = params
        z = slope * logits + bias
        residual = special.expit(z) - matched
        return binary_nll(z, matched), np.array([np.mean(residual * logits), np.mean(residual)])

    result = optimize.minimize(
        nll_and_gradient,
        x0=np.array([1.0, 0.0]),
        jac=True,
        method="L-BFGS-B",
        bounds=[PLATT_SLOPE_BOUNDS, PLATT_BIAS_BOUNDS],
    )
    return float(result.x[0]), float(result.x[1])


def fit_isotonic(scores: np.ndarray, matched: np.ndarray) -> tuple[list[float], list[float]]:
    """Knots ``(x, q)`` of the non-decreasing map minimising ``sum (q(s_i) - y_i)^2`` (pool adjacent violators).

    Fitted by scikit-learn's ``IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")``; between knots
    the map is linear and beyond them constant, which ``apply_isotonic`` reproduces from the knots alone.
    """
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    regression.fit(scores, matched.astype(np.float64))
    return regression.X_thresholds_.tolist(), regression.y_thresholds_.tolist()


def apply_isotonic(scores: np.ndarray, knots_x: list[float], knots_q: list[float]) -> np.ndarray:
    """Piecewise-linear interpolation through the knots, constant beyond the first and last (``np.interp``)."""
    return np.interp(scores, knots_x, knots_q)


def histogram_bin_indices(scores: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin of each score: the D-ECE protocol's bins (:mod:`hf_caldetr.metrics.binning`: equal-width half-open bins
    ``[e_k, e_k+1)`` with ``e = linspace(0, 1, num_bins + 1)`` in float64, 0 in the first and 1.0 in the last), so a
    histogram-binning calibrator maps exactly the detections that share a D-ECE bin together."""
    return bin_index(clip_to_open_unit(scores), num_bins)


def fit_histogram(scores: np.ndarray, matched: np.ndarray, num_bins: int) -> list[float]:
    """Each bin's calibrated score: its precision ``n_tp_k / n_k``; an empty bin gets its midpoint, so scores
    falling there later are left roughly where they were."""
    bins = histogram_bin_indices(scores, num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    true_positives = np.bincount(bins, weights=matched.astype(np.float64), minlength=num_bins)
    midpoints = (np.arange(num_bins) + 0.5) / num_bins
    precision = np.divide(true_positives, counts, out=midpoints.copy(), where=counts > 0)
    return precision.tolist()


# ----------------------------------------------------------------------------------------------------------
# The calibrators


class PostHocCalibrator:
    """Shared fit/transform/save logic; a subclass supplies ``_fit_map`` and ``_apply_map``.

    A fitted map is a small JSON-able dict of parameters: ``params_`` is the class-agnostic map, and
    ``class_params_`` (class id -> map) holds the class-wise maps when ``class_wise=True``.

    Args:
        class_wise: fit one map per class label (``fit``/``transform`` then need ``labels``).
        min_class_detections: fewest detections of a class for its own map; classes below it, classes whose
            detections are all of one outcome, and labels unseen at fit time use the class-agnostic map.
    """

    def __init__(self, class_wise: bool = False, min_class_detections: int = MIN_CLASS_DETECTIONS):
        if not isinstance(class_wise, bool):
            raise ValueError(f"class_wise must be True or False, got {class_wise!r}")
        if isinstance(min_class_detections, bool) or not isinstance(min_class_detections, int):
            raise ValueError(f"min_class_detections must be an int, got {min_class_detections!r}")
        if min_class_detections < MIN_DETECTIONS:
            raise ValueError(
                f"min_class_detections must be at least MIN_DETECTIONS={MIN_DETECTIONS}, got {min_class_detections}"
            )
        self.class_wise = class_wise
        self.min_class_detections = min_class_detections
        self.params_: dict | None = None
        self.class_params_: dict[int, dict] = {}

    # subclass hooks ---------------------------------------------------------------------------------------

    def _fit_map(self, scores: np.ndarray, matched: np.ndarray) -> dict:
        raise NotImplementedError

    def _apply_map(self, params: dict, scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _config(self) -> dict:
        """Constructor arguments, saved with the parameters so ``load_calibrator`` can rebuild the object."""
        return {"class_wise": self.class_wise, "min_class_detections": self.min_class_detections}

    # public interface -------------------------------------------------------------------------------------

    def fit(self, scores, matched, labels=None):
        """Fit on held-out detections: ``scores`` [N] in [0, 1], ``matched`` [N] bool, ``labels`` [N] int.

        ``labels`` is required when ``class_wise=True`` and ignored (but still checked) otherwise.
        Returns ``self``.
        """
        scores = _check_scores(scores)
        matched = _check_matched(matched, scores.size)
        labels = self._labels_for(labels, scores.size)
        if scores.size < MIN_DETECTIONS:
            raise ValueError(
                f"cannot fit a calibrator on {scores.size} detections: need at least MIN_DETECTIONS={MIN_DETECTIONS}"
            )
        self.params_ = self._fit_map(scores, matched)
        self.class_params_ = {}
        if self.class_wise:
            for label in np.unique(labels):
                in_class = labels == label
                enough = in_class.sum() >= self.min_class_detections
                # All true positives (or none) would drive a parametric fit to its bounds: fall back instead.
                both_outcomes = 0 < matched[in_class].sum() < in_class.sum()
                if enough and both_outcomes:
                    self.class_params_[int(label)] = self._fit_map(scores[in_class], matched[in_class])
        return self

    def transform(self, scores, labels=None) -> np.ndarray:
        """Calibrated scores [N] (float64, in [0, 1]); each detection uses its class map when class-wise."""
        if self.params_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(scores, matched) first")
        scores = _check_scores(scores)
        labels = self._labels_for(labels, scores.size)
        calibrated = self._apply_map(self.params_, scores)
        for label, params in self.class_params_.items():
            in_class = labels == label
            if in_class.any():
                calibrated[in_class] = self._apply_map(params, scores[in_class])
        # The maps stay in [0, 1] mathematically; the clip only guards against rounding.
        return np.clip(calibrated, 0.0, 1.0)

    def to_dict(self) -> dict:
        """A JSON-able description: ``type``, constructor ``config``, ``params`` and ``class_params``."""
        if self.params_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: nothing to save")
        return {
            "format_version": FORMAT_VERSION,
            "type": type(self).__name__,
            "config": self._config(),
            "params": self.params_,
            # JSON object keys are strings; load_calibrator turns them back into ints.
            "class_params": {str(label): params for label, params in self.class_params_.items()},
        }

    def save(self, path) -> None:
        """Write ``to_dict()`` to ``path`` as JSON (floats round-trip exactly)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def _labels_for(self, labels, num_scores: int) -> np.ndarray | None:
        if labels is None:
            if self.class_wise:
                raise ValueError(f"class-wise {type(self).__name__} needs labels (one class id per score)")
            return None
        return _check_labels(labels, num_scores)

    def __repr__(self) -> str:
        config = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({config})"


class TemperatureScaling(PostHocCalibrator):
    """``q = sigmoid(logit(s) / T)``, ``T`` fitted by minimising the binary NLL (``fit_temperature``).

    ``T > 1`` softens an over-confident detector, ``T < 1`` sharpens an under-confident one. The map is
    strictly increasing, so the ranking of the scores, and with it the AP, is unchanged (class-agnostic
    only: class-wise temperatures may reorder detections of different classes).
    """

    def _fit_map(self, scores, matched):
        return {"temperature": fit_temperature(score_logits(scores), matched)}

    def _apply_map(self, params, scores):
        return special.expit(score_logits(scores) / params["temperature"])

    @property
    def temperature(self) -> float:
        """The class-agnostic temperature ``T``."""
        if self.params_ is None:
            raise NotFittedError("this TemperatureScaling is not fitted yet: call fit(scores, matched) first")
        return self.params_["temperature"]


class PlattScaling(PostHocCalibrator):
    """``q = sigmoid(a * logit(s) + b)``, ``(a, b)`` fitted by minimising the binary NLL (``fit_platt``).

    Temperature scaling is the special case ``a = 1 / T, b = 0``; the bias also corrects a detector whose
    scores are shifted rather than just too sharp.
    """

    def _fit_map(self, scores, matched):
        slope, bias = fit_platt(score_logits(scores), matched)
        return {"slope": slope, "bias": bias}

    def _apply_map(self, params, scores):
        return special.expit(params["slope"] * score_logits(scores) + params["bias"])


class IsotonicCalibrator(PostHocCalibrator):
    """Isotonic regression of ``matched`` on ``s`` (``fit_isotonic``): the best non-decreasing map in squared
    error, the strongest post-hoc baseline of Kuzucu et al. (ECCV 2024). It may merge distinct scores into
    ties, so the AP can change slightly."""

    def _fit_map(self, scores, matched):
        knots_x, knots_q = fit_isotonic(scores, matched)
        return {"knots_x": knots_x, "knots_q": knots_q}

    def _apply_map(self, params, scores):
        return apply_isotonic(scores, params["knots_x"], params["knots_q"])


class HistogramBinning(PostHocCalibrator):
    """Each of ``num_bins`` equal-width bins over [0, 1] maps to its fraction of true positives
    (``fit_histogram``; Zadrozny & Elkan 2001). Scores within a bin become ties.

    Args:
        num_bins: number of equal-width bins (default 10, the D-ECE binning).
    """

    def __init__(
        self, num_bins: int = 10, class_wise: bool = False, min_class_detections: int = MIN_CLASS_DETECTIONS
    ):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        super().__init__(class_wise=class_wise, min_class_detections=min_class_detections)
        self.num_bins = num_bins

    def _config(self):
        return {"num_bins": self.num_bins, **super()._config()}

    def _fit_map(self, scores, matched):
        return {"bin_values": fit_histogram(scores, matched, self.num_bins)}

    def _apply_map(self, params, scores):
        return np.asarray(params["bin_values"])[histogram_bin_indices(scores, self.num_bins)]


def softmax_score_logits(query_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``logit(q)`` of a softmax head's detection score ``q = max_{c < C} softmax(z / T)_c``.

    ``query_logits`` is ``[N, C + 1]``, the last column the no-object class (DETR's layout). With ``l`` the
    best real class (the same for every ``T > 0``), ``logit(q) = z_l / T - logsumexp_{j != l}(z_j / T)``,
    computed without forming ``q``, so it stays finite where ``q`` rounds to 1.
    """
    scaled = query_logits / temperature
    best = np.argmax(query_logits[:, :-1], axis=1)
    rows = np.arange(len(query_logits))
    others = scaled.copy()
    others[rows, best] = -np.inf
    return scaled[rows, best] - special.logsumexp(others, axis=1)


class SoftmaxTemperatureScaling(PostHocCalibrator):
    """Temperature scaling of a softmax head with a no-object column (DETR): ``q = max_{c < C} softmax(z / T)_c``.

    Differs from ``TemperatureScaling`` in its input: a softmax score depends on every column of the query's
    logits, so it is fitted on and applied to the detections' full logit rows ``[N, C + 1]`` rather than their
    scores (``fit(query_logits, matched)``, ``transform(query_logits)``). Dividing every column by ``T`` is
    what ``fold_calibrator`` writes into DETR's classifier; it keeps each query's predicted class, so the
    detections are the same and only their scores move. Class-agnostic only: a per-class temperature would
    change the normaliser shared by all classes (see ``hf_caldetr.folding``).
    """

    def __init__(self, class_wise: bool = False, min_class_detections: int = MIN_CLASS_DETECTIONS):
        if class_wise:
            raise ValueError("SoftmaxTemperatureScaling is class-agnostic: one temperature divides every column of a "
                             "softmax head (a per-class one would change the normaliser shared by all classes)")
        super().__init__(class_wise=False, min_class_detections=min_class_detections)

    @staticmethod
    def _check_query_logits(query_logits) -> np.ndarray:
        query_logits = to_numpy(query_logits).astype(np.float64)
        if query_logits.ndim != 2 or query_logits.shape[1] < 2:
            raise ValueError("query_logits must be [N, C + 1] logit rows of a softmax head (no-object column last), "
                             f"got shape {query_logits.shape}")
        if not np.all(np.isfinite(query_logits)):
            raise ValueError("query_logits contain NaN or infinite values")
        return query_logits

    def fit(self, query_logits, matched, labels=None):
        """Fit ``T`` by minimising the binary NLL of ``matched`` under the rescaled scores. Returns ``self``."""
        query_logits = self._check_query_logits(query_logits)
        matched = _check_matched(matched, len(query_logits))
        if len(query_logits) < MIN_DETECTIONS:
            raise ValueError(f"cannot fit a calibrator on {len(query_logits)} detections: need at least "
                             f"MIN_DETECTIONS={MIN_DETECTIONS}")
        result = optimize.minimize_scalar(
            lambda log_t: binary_nll(softmax_score_logits(query_logits, math.exp(log_t)), matched),
            bounds=tuple(math.log(bound) for bound in TEMPERATURE_BOUNDS), method="bounded",
            options={"xatol": 1e-10},
        )
        self.params_ = {"temperature": math.exp(result.x)}
        self.class_params_ = {}
        return self

    def transform(self, query_logits, labels=None) -> np.ndarray:
        """The calibrated scores ``[N]`` of the detections whose logit rows are given."""
        if self.params_ is None:
            raise NotFittedError("this SoftmaxTemperatureScaling is not fitted yet: call fit(query_logits, matched)")
        query_logits = self._check_query_logits(query_logits)
        return special.expit(softmax_score_logits(query_logits, self.params_["temperature"]))

    @property
    def temperature(self) -> float:
        if self.params_ is None:
            raise NotFittedError("this SoftmaxTemperatureScaling is not fitted yet")
        return self.params_["temperature"]


CALIBRATOR_TYPES = {
    cls.__name__: cls
    for cls in (TemperatureScaling, PlattScaling, IsotonicCalibrator, HistogramBinning, SoftmaxTemperatureScaling)
}


def calibrator_from_dict(description: dict) -> PostHocCalibrator:
    """Rebuild a fitted calibrator from ``PostHocCalibrator.to_dict()`` output, dispatching on ``"type"``."""
    if not isinstance(description, dict):
        raise ValueError(f"a calibrator description must be a JSON object, got {type(description).__name__}")
    missing = {"type", "config", "params"} - description.keys()
    if missing:
        raise ValueError(f"calibrator description lacks the field(s) {sorted(missing)}")
    version = description.get("format_version", FORMAT_VERSION)  # files written before versioning: the same format
    if version != FORMAT_VERSION:
        raise ValueError(f"calibrator format_version {version!r}; this hf_caldetr reads version {FORMAT_VERSION}")
    calibrator_type = description["type"]
    if calibrator_type not in CALIBRATOR_TYPES:
        raise ValueError(f"unknown calibrator type {calibrator_type!r}; known: {sorted(CALIBRATOR_TYPES)}")
    calibrator = CALIBRATOR_TYPES[calibrator_type](**description["config"])
    class_params = description.get("class_params") or {}
    if class_params and not calibrator.class_wise:
        raise ValueError(f"the calibrator is class-agnostic (class_wise false) but holds class_params for classes "
                         f"{sorted(class_params)}: the file is inconsistent")
    calibrator.params_ = _validated_params(calibrator, description["params"], "params")
    calibrator.class_params_ = {}
    for label, params in class_params.items():
        if not str(label).lstrip("-").isdigit() or int(label) < 0:
            raise ValueError(f"class_params key {label!r} is not a class id (a non-negative integer)")
        calibrator.class_params_[int(label)] = _validated_params(calibrator, params, f"class_params[{label}]")
    return calibrator


def _finite_numbers(values, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=object)
    if array.ndim > 1 or not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                                 for value in np.atleast_1d(array)):
        raise ValueError(f"{where} must be a number or a list of numbers, got {values!r}")
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{where} must be finite, got {values!r}")
    return array


def _validated_params(calibrator, params, where: str) -> dict:
    """A saved map's parameters, checked: the right keys, finite numbers, and a map that keeps the ranking
    (positive temperature, non-negative Platt slope, non-decreasing isotonic knots), sizes that match."""
    expected = {TemperatureScaling: {"temperature"}, SoftmaxTemperatureScaling: {"temperature"},
                PlattScaling: {"slope", "bias"}, IsotonicCalibrator: {"knots_x", "knots_q"},
                HistogramBinning: {"bin_values"}}[type(calibrator)]
    if not isinstance(params, dict) or set(params) != expected:
        raise ValueError(f"{where} of a {type(calibrator).__name__} must have exactly the keys {sorted(expected)}, "
                         f"got {params!r}")
    values = {key: _finite_numbers(params[key], f"{where}.{key}") for key in expected}
    for key in expected & {"temperature", "slope", "bias"}:
        if values[key].ndim != 0:
            raise ValueError(f"{where}.{key} must be a single number, got {params[key]!r}")
    if "temperature" in values and not values["temperature"] > 0:
        raise ValueError(f"{where}.temperature must be positive (a negative one reverses the ranking), "
                         f"got {params['temperature']}")
    if "slope" in values and values["slope"] < 0:
        raise ValueError(f"{where}.slope must be >= 0 (a negative slope reverses the ranking), got {params['slope']}")
    if "knots_x" in values:
        knots_x, knots_q = values["knots_x"], values["knots_q"]
        if knots_x.ndim != 1 or knots_x.shape != knots_q.shape or knots_x.size == 0:
            raise ValueError(f"{where}: knots_x and knots_q must be non-empty lists of one length, got "
                             f"{knots_x.size} and {knots_q.size}")
        if np.any(np.diff(knots_x) < 0) or np.any(np.diff(knots_q) < 0):
            raise ValueError(f"{where}: isotonic knots must be sorted and the map non-decreasing")
        if knots_q.min() < 0 or knots_q.max() > 1:
            raise ValueError(f"{where}: knots_q must lie in [0, 1]")
    if "bin_values" in values:
        bins = values["bin_values"]
        if bins.ndim != 1 or bins.size != calibrator.num_bins:
            raise ValueError(f"{where}.bin_values has {bins.size} values for num_bins={calibrator.num_bins}")
        if bins.min() < 0 or bins.max() > 1:
            raise ValueError(f"{where}.bin_values must lie in [0, 1]")
    return params


def load_calibrator(path) -> PostHocCalibrator:
    """Load a calibrator written by ``save(path)``; the JSON's ``"type"`` field picks the class."""
    try:
        description = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid calibrator JSON file: {error}") from error
    return calibrator_from_dict(description)


def reliability_before_after(calibrator: PostHocCalibrator, scores, matched, path, labels=None,
                             num_bins: int = 10) -> dict:
    """Reliability diagrams of held-out detections before and after a fitted calibrator, side by side.

    Scores and outcomes should be a split the calibrator was not fitted on, or the "after" panel flatters it.

    Args:
        calibrator: a fitted calibrator.
        scores: ``[N]`` confidences in [0, 1]; matched: ``[N]`` bool; labels: ``[N]`` class ids, needed only
            by a class-wise calibrator.
        path: the PNG file to write; its folder must exist.
        num_bins: D-ECE bins of both panels.

    Returns:
        ``{"before": ..., "after": ...}``, the two ``calibration_error`` result dicts drawn.
    """
    # Imported here so that importing the calibrators does not pull in matplotlib.
    from hf_caldetr.metrics.reliability import plot_reliability_diagram

    scores = _check_scores(scores)
    matched = _check_matched(matched, scores.size)
    before = calibration_error(scores, matched, num_bins)
    after = calibration_error(calibrator.transform(scores, labels), matched, num_bins)
    titles = ["before: raw scores", f"after: {type(calibrator).__name__}"]
    plot_reliability_diagram([before, after], path, titles=titles)
    return {"before": before, "after": after}


def calibrate_pipeline_outputs(outputs, calibrator: PostHocCalibrator, label2id: dict, threshold: float = 0.0):
    """Apply a score-space calibrator (isotonic regression, histogram binning, ...) to the output of
    ``pipeline("object-detection")``: the one documented call for calibrators that cannot be folded into the
    weights (``hf_caldetr.fold_calibrator`` handles the affine ones).

    Run the pipeline with ``threshold=0.0`` (its default 0.5 would drop detections before they are calibrated),
    then threshold here, on the calibrated scores::

        detections = detector(image, threshold=0.0)
        detections = calibrate_pipeline_outputs(detections, calibrator, detector.model.config.label2id, 0.5)

    Args:
        outputs: the pipeline's list of ``{"score", "label", "box"}`` dicts for one image, or a list of such
            lists for several images.
        calibrator: a fitted score-space calibrator (``load_calibrator("calibrator.json")``).
        label2id: class name -> id, the model's ``config.label2id`` (class-wise maps are keyed by id).
        threshold: keep detections whose calibrated score is at least this.

    Returns:
        The same structure with calibrated ``score`` values, filtered by ``threshold``, highest score first.
    """
    if isinstance(calibrator, SoftmaxTemperatureScaling):
        raise ValueError("SoftmaxTemperatureScaling needs the logits, which the pipeline does not return: fold it "
                         "into the model instead (hf_caldetr.fold_calibrator)")
    if outputs and isinstance(outputs[0], list):
        return [calibrate_pipeline_outputs(image, calibrator, label2id, threshold) for image in outputs]
    if not outputs:
        return []
    unknown = sorted({item["label"] for item in outputs} - set(label2id))
    if unknown:
        raise ValueError(f"labels {unknown} are not in label2id ({sorted(label2id)}): pass the model's "
                         "config.label2id")
    scores = np.array([item["score"] for item in outputs], dtype=np.float64)
    labels = np.array([int(label2id[item["label"]]) for item in outputs], dtype=np.int64)
    calibrated = calibrator.transform(scores, labels)
    kept = [{**item, "score": float(score)} for item, score in zip(outputs, calibrated) if score >= threshold]
    return sorted(kept, key=lambda item: -item["score"])
