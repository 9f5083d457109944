"""Reliability diagrams: precision against confidence per bin, from ``detection_ece`` results; and D-UCE
diagrams, error rate against uncertainty per bin, from ``detection_uce`` results (``plot_uncertainty_diagram``).

Drawn on a bare matplotlib ``Figure`` with the Agg canvas, so it never touches pyplot's global state or the
user's interactive backend.

How to read one panel:

- each non-empty bin is a bar whose black outline reaches the bin's precision;
- the gap between that precision and the bin's mean confidence is hatched: red above the bar where the detector
  claimed more than it achieved (over-confident, precision < confidence), orange inside the bar where it
  achieved more than it claimed (under-confident, precision > confidence);
- a bin holding few detections (fewer than ``SPARSE_BIN_DETECTIONS``, or under ``SPARSE_BIN_SHARE`` of the
  panel's detections, hence under that share of its D-ECE weight) is drawn pale and dotted: its precision is
  too noisy to read a gap from. Every bar is labelled with its number of detections.

Every colour and hatch is drawn opaque (no alpha blending into colours of its own) and has its legend entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

_REQUIRED_KEYS = ("d_ece", "bin_counts", "bin_precisions", "bin_confidences", "bin_edges")

# A bin is "sparse" (drawn pale and dotted) when it holds fewer than this many detections: the precision of n
# detections has a standard error up to 0.5 / sqrt(n), 0.16 at n = 10, as large as most calibration gaps ...
SPARSE_BIN_DETECTIONS = 10
# ... or less than this share of the panel's detections: D-ECE weights bins by count, so such a bin moves the
# D-ECE in the title by less than this share of its gap.
SPARSE_BIN_SHARE = 0.01

# Styles: (face colour, hatch, hatch/edge colour). All opaque, so what is drawn is what the legend shows.
_PRECISION = {"facecolor": "#1f77b4", "edgecolor": "black", "hatch": None}  # tab:blue
_SPARSE = {"facecolor": "#d4e4f4", "edgecolor": "#1f77b4", "hatch": ".."}  # pale blue, blue dots
_OVER_CONFIDENT = {"facecolor": "#f6b8b8", "edgecolor": "#c42021", "hatch": "//"}  # pale red, red hatch
_UNDER_CONFIDENT = {"facecolor": "#fde3a7", "edgecolor": "#d46a00", "hatch": "\\\\"}  # pale orange, orange hatch
_LABELS = {
    "precision": "precision (black outline)",
    "sparse": f"sparse bin: < {SPARSE_BIN_DETECTIONS} detections or < {100 * SPARSE_BIN_SHARE:g} % of all",
    "over": "gap: over-confident (precision < confidence)",
    "under": "gap: under-confident (precision > confidence)",
}


def _diagram_result(result, index: int, required: tuple, kind: str, hint: str, nested: str | None = None) -> Mapping:
    """``results[index]`` checked for a diagram: a dict (or, with ``nested``, an evaluation result holding one under
    that key) with the ``required`` keys and one more bin edge than bins; ``ValueError`` naming what is wrong."""
    if not isinstance(result, Mapping):
        raise ValueError(f"results[{index}] must be a {kind} dict, got {type(result).__name__}")
    if nested is not None:
        result = result.get(nested, result)
    missing = [key for key in required if key not in result]
    if missing:
        raise ValueError(f"results[{index}] is missing {missing} ({hint})")
    if len(result["bin_edges"]) != len(result["bin_counts"]) + 1:
        raise ValueError(f"results[{index}] has {len(result['bin_counts'])} bins but "
                         f"{len(result['bin_edges'])} edges")
    return result


def _checked_result(result, index: int) -> Mapping:
    return _diagram_result(result, index, _REQUIRED_KEYS, "detection_ece result", "pass what detection_ece returns")


def sparse_bins(counts) -> np.ndarray:
    """Which bins of ``counts`` are sparse: non-empty, with fewer than ``SPARSE_BIN_DETECTIONS`` detections or
    under ``SPARSE_BIN_SHARE`` of all of them."""
    counts = np.asarray(counts)
    return (counts > 0) & ((counts < SPARSE_BIN_DETECTIONS) | (counts < SPARSE_BIN_SHARE * counts.sum()))


def _bars(axes, lefts, bottoms, heights, widths, style, zorder, linewidth=0.6):
    if len(lefts):
        axes.bar(lefts, heights, bottom=bottoms, width=widths, align="edge", linewidth=linewidth, zorder=zorder,
                 **style)


def _draw_bins(axes, edges, counts, observed, claimed, over_confident_above: bool, labels: Mapping) -> None:
    """The bars of one panel: a bar per non-empty bin up to its ``observed`` value (precision, error rate), the
    gap to its ``claimed`` value (mean confidence, mean uncertainty) hatched, the diagonal, and the legend below.

    ``over_confident_above``: the gap is over-confident where the claim lies above the bar (a confidence above
    the precision); otherwise where it lies below (an uncertainty below the error rate).
    """
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts)
    observed = np.asarray(observed, dtype=float)
    claimed = np.asarray(claimed, dtype=float)
    occupied = counts > 0
    sparse = sparse_bins(counts)
    lefts, widths = edges[:-1], np.diff(edges)
    zeros = np.zeros_like(lefts)
    legend = {}

    # The observed bars: full colour where the bin holds enough detections, pale and dotted where it does not.
    for kind, chosen, style in (("precision", occupied & ~sparse, _PRECISION), ("sparse", sparse, _SPARSE)):
        _bars(axes, lefts[chosen], zeros[chosen], observed[chosen], widths[chosen], style, zorder=2)
        if chosen.any():
            legend[kind] = style
    # The gap between what the detector claimed and what it achieved, opaque on top of the bar (claim below it)
    # or above it (claim above it).
    gap = np.where(occupied, claimed - observed, 0.0)
    bottoms = np.minimum(observed, claimed)
    above, below = gap > 0, gap < 0
    over, under = (above, below) if over_confident_above else (below, above)
    for kind, chosen, style in (("over", over, _OVER_CONFIDENT), ("under", under, _UNDER_CONFIDENT)):
        _bars(axes, lefts[chosen], bottoms[chosen], np.abs(gap)[chosen], widths[chosen], style, zorder=3)
        if chosen.any():
            legend[kind] = style
    # The bars' outlines last, so that the observed value reads off the black outline whatever covers the bar.
    _bars(axes, lefts[occupied], zeros[occupied], observed[occupied], widths[occupied],
          {"facecolor": "none", "edgecolor": "black"}, zorder=4, linewidth=0.8)
    for left, width, top, count, is_sparse in zip(lefts[occupied], widths[occupied],
                                                  np.maximum(observed, claimed)[occupied], counts[occupied],
                                                  sparse[occupied]):
        axes.text(left + width / 2, min(top, 1.0) + 0.015, f"n={count}", ha="center", va="bottom", fontsize=7,
                  rotation=90, color=_SPARSE["edgecolor"] if is_sparse else "black")
    (diagonal,) = axes.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, zorder=5,
                            label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.15)
    # One entry per style drawn in this panel, each a patch styled exactly as the bars it names.
    handles = [diagonal] + [Patch(linewidth=0.6, label=labels[kind], **style) for kind, style in legend.items()]
    # Below the panel: inside it, it would hide the bars of a detector confident and right at low scores.
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, handlelength=2.5,
                frameon=False)


def _titled(name: str, value: float, title: str | None) -> str:
    text = f"{name} = n/a (no detections)" if not np.isfinite(value) else f"{name} = {100 * value:.2f} %"
    return text if title is None else f"{title}\n{text}"


def _draw_panel(axes, result: Mapping, title: str | None) -> None:
    """One reliability diagram: a bar per non-empty bin at its precision, the gap to its mean confidence hatched."""
    _draw_bins(axes, result["bin_edges"], result["bin_counts"], result["bin_precisions"], result["bin_confidences"],
               over_confident_above=True, labels=_LABELS)
    axes.set_title(_titled("D-ECE", result["d_ece"], title))
    axes.set_xlabel("confidence")
    axes.set_ylabel("precision")


def _panels_figure(results, titles, checked, draw_panel, what: str) -> Figure:
    """One panel per result side by side on a bare ``Figure`` (Agg canvas, no pyplot): ``checked(result, index)``
    validates (and may unwrap) each result, ``draw_panel(axes, result, title)`` draws it."""
    results = [results] if isinstance(results, Mapping) else list(results)
    if not results:
        raise ValueError(f"results is empty: pass at least one {what}")
    results = [checked(result, index) for index, result in enumerate(results)]
    if titles is not None and len(titles) != len(results):
        raise ValueError(f"{len(titles)} titles for {len(results)} results")
    figure = Figure(figsize=(5 * len(results), 6), dpi=120)  # a 5 x 5 inch panel and its legend below
    FigureCanvasAgg(figure)
    for index, result in enumerate(results):
        axes = figure.add_subplot(1, len(results), index + 1)
        draw_panel(axes, result, None if titles is None else titles[index])
    figure.tight_layout()
    return figure


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def reliability_figure(results, titles: Sequence[str] | None = None) -> Figure:
    """The reliability diagram of ``results`` as a matplotlib ``Figure`` (Agg canvas, no pyplot), one panel per
    result; ``plot_reliability_diagram`` writes it as a PNG. Arguments as there."""
    return _panels_figure(results, titles, _checked_result, _draw_panel, "detection_ece result")


def plot_reliability_diagram(results, path, titles: Sequence[str] | None = None) -> Path:
    """Write a reliability diagram as a PNG.

    Each non-empty bin is a bar up to its precision (black outline); the gap to the bin's mean confidence is
    hatched red above the bar (over-confident) or orange inside it (under-confident); sparse bins (fewer than
    ``SPARSE_BIN_DETECTIONS`` detections or under ``SPARSE_BIN_SHARE`` of the panel's) are pale and dotted, and
    every bar is labelled with its number of detections. ``reliability_figure`` gives the same ``Figure``
    undrawn.

    Args:
        results: one ``detection_ece`` (or ``calibration_error``) result dict, or a list of them to draw side
            by side (e.g. baseline and Cal-DETR, or in-domain and corrupted).
        path: the PNG file to write; its folder must exist.
        titles: one panel title per result (optional).

    Returns:
        ``path`` as a ``Path``.
    """
    return _save(reliability_figure(results, titles), path)


# ------------------------------------------------------------------------------------------ D-UCE diagrams

_UNCERTAINTY_REQUIRED_KEYS = ("d_uce", "bin_counts", "bin_error_rates", "bin_uncertainties", "bin_edges")
_UNCERTAINTY_LABELS = {
    "precision": "error rate (black outline)",
    "sparse": _LABELS["sparse"],
    "over": "gap: over-confident (error rate > uncertainty)",
    "under": "gap: under-confident (error rate < uncertainty)",
}


def _uncertainty_result(result, index: int) -> Mapping:
    """The D-UCE result of ``results[index]``: an ``uncertainty_calibration_error`` / ``detection_uce`` result,
    or an evaluation result holding one as ``uncertainty_calibration`` (``DetectionCalibrationMetric``)."""
    return _diagram_result(result, index, _UNCERTAINTY_REQUIRED_KEYS, "detection_uce result",
                           "pass what detection_uce returns, or an evaluation result computed with an uncertainty_key",
                           nested="uncertainty_calibration")


def _draw_uncertainty_panel(axes, result: Mapping, title: str | None) -> None:
    """One D-UCE diagram: a bar per non-empty bin at its error rate, the gap to its mean uncertainty hatched."""
    _draw_bins(axes, result["bin_edges"], result["bin_counts"], result["bin_error_rates"],
               result["bin_uncertainties"], over_confident_above=False, labels=_UNCERTAINTY_LABELS)
    axes.set_title(_titled("D-UCE", result["d_uce"], title))
    axes.set_xlabel("uncertainty  tanh(Var_l(z))")
    axes.set_ylabel("error rate (1 - precision)")


def uncertainty_figure(results, titles: Sequence[str] | None = None) -> Figure:
    """The D-UCE diagram of ``results`` as a matplotlib ``Figure`` (Agg canvas, no pyplot), one panel per
    result; ``plot_uncertainty_diagram`` writes it as a PNG. Arguments as there."""
    return _panels_figure(results, titles, _uncertainty_result, _draw_uncertainty_panel, "detection_uce result")


def plot_uncertainty_diagram(results, path, titles: Sequence[str] | None = None) -> Path:
    """Write a D-UCE diagram (the Cal-DETR paper's Fig. 4) as a PNG: per uncertainty bin, the error rate
    (``1 - precision``) of the kept detections against their mean uncertainty.

    Drawn as the reliability diagram is: each non-empty bin is a bar up to its error rate (black outline); the
    gap to the bin's mean uncertainty is hatched red inside the bar where the detections are wrong more often
    than their uncertainty says (over-confident) and orange above it where less often (under-confident); sparse
    bins are pale and dotted, and every bar is labelled with its number of detections. Points on the diagonal
    are calibrated uncertainties. ``uncertainty_figure`` gives the same ``Figure`` undrawn.

    Args:
        results: one ``uncertainty_calibration_error`` / ``detection_uce`` result dict (or an evaluation result
            holding one as ``uncertainty_calibration``, see ``DetectionCalibrationMetric``), or a list of them to
            draw side by side.
        path: the PNG file to write; its folder must exist.
        titles: one panel title per result (optional).

    Returns:
        ``path`` as a ``Path``.
    """
    return _save(uncertainty_figure(results, titles), path)


# ------------------------------------------------------------------------------------------ LaECE diagrams

_LAECE_LABELS = {
    "precision": "IoU-weighted precision (black outline)",
    "sparse": _LABELS["sparse"],
    "over": "gap: over-confident (IoU-weighted precision < confidence)",
    "under": "gap: under-confident (IoU-weighted precision > confidence)",
}


def _laece_result(result, index: int) -> Mapping:
    """The pooled LaECE bins of ``results[index]``: an evaluation result holding them as ``laece_calibration``
    (``protocol.calibration_protocol``), or that dict itself."""
    return _diagram_result(result, index, _REQUIRED_KEYS, "evaluation result",
                           "pass an evaluation result computed with the dataset's categories: it holds "
                           "laece_calibration", nested="laece_calibration")


def _draw_laece_panel(axes, result: Mapping, title: str | None) -> None:
    """One LaECE diagram: a bar per non-empty bin at its IoU-weighted precision, the gap to its confidence hatched."""
    _draw_bins(axes, result["bin_edges"], result["bin_counts"], result["bin_precisions"], result["bin_confidences"],
               over_confident_above=True, labels=_LAECE_LABELS)
    axes.set_title(_titled("LaECE (class mean)", result["d_ece"], title))
    axes.set_xlabel("confidence")
    axes.set_ylabel("IoU-weighted precision (summed TP IoU / detections)")


def laece_figure(results, titles: Sequence[str] | None = None) -> Figure:
    """The LaECE reliability diagram of ``results`` as a ``Figure``; ``plot_laece_diagram`` writes it."""
    return _panels_figure(results, titles, _laece_result, _draw_laece_panel, "evaluation result")


def plot_laece_diagram(results, path, titles: Sequence[str] | None = None) -> Path:
    """Write the LaECE reliability diagram as a PNG: per confidence bin (25 by default), pooled over classes, the
    IoU-weighted precision (the summed IoU of the bin's true positives over its detections, LaECE's accuracy)
    against the mean confidence, drawn as the reliability diagram is. The title gives LaECE itself, the mean of
    the per-class errors (the pooled bars show where, not how much per class).

    Args:
        results: evaluation results holding ``laece_calibration`` (``evaluate_detections(..., categories=...)``),
            one or a list drawn side by side.
        path: the PNG file to write; its folder must exist.
        titles: one panel title per result (optional).
    """
    return _save(laece_figure(results, titles), path)
