"""Reliability diagrams: precision against confidence per bin, from ``detection_ece`` results.

Drawn on a bare matplotlib ``Figure`` with the Agg canvas, so it never touches pyplot's global state or the
user's interactive backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_REQUIRED_KEYS = ("d_ece", "bin_counts", "bin_precisions", "bin_confidences", "bin_edges")


def _check_result(result, index: int) -> None:
    if not isinstance(result, Mapping):
        raise ValueError(f"results[{index}] must be a detection_ece result dict, got {type(result).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in result]
    if missing:
        raise ValueError(f"results[{index}] is missing {missing} (pass what detection_ece returns)")
    if len(result["bin_edges"]) != len(result["bin_counts"]) + 1:
        raise ValueError(f"results[{index}] has {len(result['bin_counts'])} bins but "
                         f"{len(result['bin_edges'])} edges")


def _draw_panel(axes, result: Mapping, title: str | None) -> None:
    """One diagram: a bar per non-empty bin at its precision, the gap to its mean confidence shaded."""
    edges = np.asarray(result["bin_edges"], dtype=float)
    counts = np.asarray(result["bin_counts"])
    precisions = np.asarray(result["bin_precisions"], dtype=float)
    confidences = np.asarray(result["bin_confidences"], dtype=float)
    occupied = counts > 0
    lefts, widths = edges[:-1][occupied], np.diff(edges)[occupied]

    axes.bar(lefts, precisions[occupied], width=widths, align="edge", color="tab:blue", edgecolor="black",
             linewidth=0.6, label="precision")
    # The gap between what the detector claimed (mean confidence) and what it achieved (precision).
    gap_bottom = np.minimum(precisions[occupied], confidences[occupied])
    gap_height = np.abs(confidences[occupied] - precisions[occupied])
    axes.bar(lefts, gap_height, bottom=gap_bottom, width=widths, align="edge", color="tab:red", alpha=0.35,
             edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to mean confidence")
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    for left, width, top, count in zip(lefts, widths, np.maximum(precisions, confidences)[occupied],
                                       counts[occupied]):
        axes.text(left + width / 2, min(top, 1.0) + 0.015, f"n={count}", ha="center", va="bottom", fontsize=7,
                  rotation=90)

    d_ece = result["d_ece"]
    d_ece_text = "D-ECE = n/a (no detections)" if not np.isfinite(d_ece) else f"D-ECE = {100 * d_ece:.2f} %"
    axes.set_title(d_ece_text if title is None else f"{title}\n{d_ece_text}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.15)
    axes.set_xlabel("confidence")
    axes.set_ylabel("precision")
    axes.legend(loc="upper left", fontsize=8)


def plot_reliability_diagram(results, path, titles: Sequence[str] | None = None) -> Path:
    """Write a reliability diagram as a PNG.

    Args:
        results: one ``detection_ece`` (or ``calibration_error``) result dict, or a list of them to draw side
            by side (e.g. baseline and Cal-DETR, or in-domain and corrupted).
        path: the PNG file to write; its folder must exist.
        titles: one panel title per result (optional).

    Returns:
        ``path`` as a ``Path``.
    """
    results = [results] if isinstance(results, Mapping) else list(results)
    if not results:
        raise ValueError("results is empty: pass at least one detection_ece result")
    for index, result in enumerate(results):
        _check_result(result, index)
    if titles is not None and len(titles) != len(results):
        raise ValueError(f"{len(titles)} titles for {len(results)} results")

    figure = Figure(figsize=(5 * len(results), 5), dpi=120)
    FigureCanvasAgg(figure)
    for index, result in enumerate(results):
        axes = figure.add_subplot(1, len(results), index + 1)
        _draw_panel(axes, result, None if titles is None else titles[index])
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
