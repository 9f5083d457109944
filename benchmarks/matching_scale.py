"""Scale of the greedy D-ECE matching: one very crowded image, and many ordinary images through the full metric.

Seeded cases, each run in its own subprocess so its peak memory is its own:

* ``crowded_1k``: one image, 1,000,000 detections of one class, 1,000 ground-truth boxes of that class, through
  ``match_detections`` (goal: under 10 s);
* ``crowded_10k``: the same with 10,000 ground-truth boxes (goal: under 100 s);
* ``many_images``: 10,000 images x 100 detections (``synthetic_detections``, about 7 boxes each) through
  ``evaluate_detections``, COCO AP included; ``many_images_no_ap``: the same with ``compute_ap=False`` (input
  checks, matching, D-ECE and LaECE only), to show how much of it is pycocotools.

Boxes are realistic rather than uniform noise: an 800 x 1333 image, box sides log-uniform between 1 % and 30 % of
the image side; half the detections are jittered copies of ground-truth boxes (relative jitter 2-30 %), half
are background boxes of the same size distribution; float32 scores, uniform, so some are tied. ``--check``
also compares both crowded cases with a per-detection loop that applies the rule literally (about 1.5 minutes
more).

Reports wall time (one run: these are minutes-scale cases on a shared machine), the resident memory before the
call (inputs built), the process's peak before the call and its peak after it (``resource.getrusage``), prints
them and writes ``benchmarks/results/matching_scale.md``, with the times recorded for the implementation this
replaced (``PREVIOUS``).

    python benchmarks/matching_scale.py [--cases crowded_1k crowded_10k many_images many_images_no_ap] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HEIGHT, WIDTH = 800.0, 1333.0
GOALS = {"crowded_1k": 10.0, "crowded_10k": 100.0}
# Recorded once on the same machine and data with the matching this replaced (commit 33f3e94: all same-class
# pairs built in Python-level chunks of 4M, then rounds of proposals), not measured by this script.
PREVIOUS = {
    "crowded_1k": "49.0 s, peak RSS 1730 MiB",
    "crowded_10k": "not run (about 10x the pairs of crowded_1k; the issue reports > 25 min)",
}


def random_boxes(rng, count: int, min_side: float = 0.01, max_side: float = 0.3) -> np.ndarray:
    """``[count, 4]`` xyxy boxes inside the image, sides log-uniform in ``[min_side, max_side]`` of the image."""
    w = WIDTH * np.exp(rng.uniform(np.log(min_side), np.log(max_side), count))
    h = HEIGHT * np.exp(rng.uniform(np.log(min_side), np.log(max_side), count))
    x1, y1 = rng.uniform(0, 1, count) * (WIDTH - w), rng.uniform(0, 1, count) * (HEIGHT - h)
    return np.column_stack([x1, y1, x1 + w, y1 + h])


def crowded_image(num_detections: int, num_boxes: int, seed: int = 0):
    """One image's predictions and references (one class), detections sorted by descending score."""
    rng = np.random.default_rng(seed)
    gt_boxes = random_boxes(rng, num_boxes)
    num_copies = num_detections // 2
    source = gt_boxes[rng.integers(0, num_boxes, num_copies)]
    sigma = rng.uniform(0.02, 0.3, (num_copies, 1))
    size = source[:, 2:] - source[:, :2]
    centre = (source[:, :2] + source[:, 2:]) / 2 + rng.normal(0, 1, (num_copies, 2)) * sigma * size
    size = size * np.exp(rng.normal(0, 1, (num_copies, 2)) * sigma)
    limits = np.array([WIDTH, HEIGHT])
    copies = np.column_stack([np.clip(centre - size / 2, 0, limits), np.clip(centre + size / 2, 0, limits)])
    boxes = np.concatenate([copies, random_boxes(rng, num_detections - num_copies)])
    scores = rng.uniform(0, 1, num_detections).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    prediction = {"boxes": boxes[order], "scores": scores[order], "labels": np.zeros(num_detections, np.int64)}
    return [prediction], [{"boxes": gt_boxes, "labels": np.zeros(num_boxes, np.int64)}]


def literal_loop(prediction, reference, score_threshold=0.3, iou_threshold=0.5):
    """The rule applied literally, one detection at a time (one class): ``(matched, matched box)``."""
    scores = np.asarray(prediction["scores"], dtype=np.float64)
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes, gt = prediction["boxes"][keep], reference["boxes"]
    gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    taken = np.zeros(len(gt), dtype=bool)
    matched_box = np.full(len(keep), -1)
    for row, box in enumerate(boxes):
        inter = (np.clip(np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]), 0, None)
                 * np.clip(np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]), 0, None))
        union = (box[2] - box[0]) * (box[3] - box[1]) + gt_area - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        iou[taken] = -1.0
        best = int(np.argmax(iou))
        if iou[best] >= iou_threshold:
            taken[best] = True
            matched_box[row] = best
    return matched_box >= 0, matched_box


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_case(name: str, check: bool) -> dict:
    """Build the case's inputs, time the call once, and return the measurements."""
    from hf_caldetr.metrics import evaluate_detections, match_detections, synthetic_detections

    if name.startswith("many_images"):
        compute_ap = name == "many_images"
        predictions, references, _ = synthetic_detections(num_images=10_000, detections_per_image=100, seed=0)
        rss_before, peak_before = current_rss_mib(), peak_rss_mib()
        start = time.perf_counter()
        result = evaluate_detections(predictions, references, compute_ap=compute_ap)
        seconds = time.perf_counter() - start
        detail = f"{result['num_detections']} detections kept, D-ECE {100 * result['d_ece']:.2f}"
        detail += f", mAP {100 * result['map']:.2f}" if compute_ap else ""
        return {"case": name, "seconds": seconds, "rss_before_mib": rss_before, "peak_before_mib": peak_before,
                "peak_rss_mib": peak_rss_mib(), "detail": detail}

    num_boxes = {"crowded_1k": 1_000, "crowded_10k": 10_000}[name]
    predictions, references = crowded_image(1_000_000, num_boxes, seed=num_boxes)
    rss_before, peak_before = current_rss_mib(), peak_rss_mib()
    start = time.perf_counter()
    matches = match_detections(predictions, references)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    detail = f"{len(matches)} detections kept, {int(matches.matched.sum())} true positives"
    if check:
        check_start = time.perf_counter()
        matched, matched_box = literal_loop(predictions[0], references[0])
        agree = (np.array_equal(matched, matches.matched)
                 and np.array_equal(matched_box, matches.matched_reference))
        if not agree:
            raise SystemExit(f"{name}: the matching disagrees with the literal per-detection loop")
        detail += f"; identical to the literal loop ({time.perf_counter() - check_start:.0f} s)"
    return {"case": name, "seconds": seconds, "rss_before_mib": rss_before, "peak_before_mib": peak_before,
            "peak_rss_mib": peak, "detail": detail}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), {memory:.0f} GiB RAM, {platform.machine()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


DESCRIPTIONS = {
    "crowded_1k": "1 image, 1,000,000 detections x 1,000 boxes (one class), `match_detections`",
    "crowded_10k": "1 image, 1,000,000 detections x 10,000 boxes (one class), `match_detections`",
    "many_images": "10,000 images x 100 detections, ~7 boxes each, `evaluate_detections` (AP included)",
    "many_images_no_ap": "the same, `evaluate_detections(compute_ap=False)`",
}


def write_report(rows: list[dict], checked: bool) -> Path:
    lines = [
        "# Greedy matching at scale",
        "",
        f"Produced by `python benchmarks/matching_scale.py{' --check' if checked else ''}`. One timed run per "
        "case, each in its own process. Memory: the process's resident set before the call (inputs built), its "
        "peak before the call (building the inputs) and its peak after it (`resource.getrusage`); when the last "
        "two are equal the call never went above what building the inputs took. Detections are kept at "
        "score >= 0.3 and matched at IoU >= 0.5.",
        "",
        f"Machine: {machine()}.",
        "",
        "| case | seconds | goal | previous implementation | RSS before (MiB) | peak before (MiB) "
        "| peak after (MiB) | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        goal = f"< {GOALS[row['case']]:.0f} s" if row["case"] in GOALS else "-"
        lines.append(f"| {DESCRIPTIONS[row['case']]} | {row['seconds']:.2f} | {goal} | "
                     f"{PREVIOUS.get(row['case'], '-')} | {row['rss_before_mib']:.0f} | "
                     f"{row['peak_before_mib']:.0f} | {row['peak_rss_mib']:.0f} | {row['detail']} |")
    path = RESULTS / "matching_scale.md"
    RESULTS.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(DESCRIPTIONS), default=list(DESCRIPTIONS),
                        help="the cases to run (default: all of them)")
    parser.add_argument("--check", action="store_true",
                        help="also compare the crowded cases with a literal per-detection loop, about 1.5 minutes "
                             "(default: off)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.check)))
        return

    rows = []
    for name in args.cases:
        command = [sys.executable, __file__, "--case", name] + (["--check"] if args.check else [])
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{name} failed:\n{child.stderr}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name}: {row['seconds']:.2f} s, RSS {row['rss_before_mib']:.0f} MiB before, peak "
              f"{row['peak_before_mib']:.0f} MiB before and {row['peak_rss_mib']:.0f} MiB after; {row['detail']}",
              flush=True)
    if set(args.cases) == set(DESCRIPTIONS):
        print(f"wrote {write_report(rows, args.check)}")
    else:
        print("(a subset of the cases: the results file is left as it is)")


if __name__ == "__main__":
    main()
