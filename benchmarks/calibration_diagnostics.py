"""Why Cal-DETR does (or does not) move D-ECE at a scale: the confidence regime and the uncertainty it measures.

    python benchmarks/calibration_diagnostics.py --work_dir outputs/benchmarks/calibration_cpu

For every trained run of ``benchmarks/calibration.py`` (each ``<arm>/seed_<s>`` folder with a ``metrics.json``),
on fresh scenes of the train distribution (generation seed ``--seed``; diagnostics only, nothing is chosen from
them), over the detections the D-ECE protocol keeps (sigmoid score >= 0.3):

- detections per image, mean score, the share with score >= 0.5 and the top score: the confidence regime;
- the mean final-layer logit of those detections: multiplicative modulation ``K * z`` with ``K = 1 - tanh(U)``
  pulls ``z`` towards 0, so for a negative logit (score < 0.5) it RAISES the probability the loss sees;
- the median of ``U`` (the variance of the logit over the decoder layers) and the mean ``K`` there: how much the
  training-time modulation changes those logits (K = 1: not at all).

Means over each arm's seeds. Each run's statistics are kept in its ``diagnostics.json`` (reused while the run and
the scenes are unchanged, so runs restored by ``benchmarks/run_records.py`` need no model). Output:
``benchmarks/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as bench  # noqa: E402  (benchmarks/calibration.py: a run's data arguments)

from hf_caldetr.families import MODEL_FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.3  # the D-ECE protocol's score threshold
# The statistics read sigmoid scores off every layer's logits at inference.
SIGMOID_MODEL_TYPES = tuple(name for name, family in MODEL_FAMILIES.items()
                            if not family.softmax_head and family.layer_logits is not None)


def run_folders(work_dir: Path) -> dict[str, list[Path]]:
    """``{arm folder name: [seed folders with a metrics.json]}``, sorted."""
    arms = {}
    for metrics in sorted(work_dir.glob("*/seed_*/metrics.json")):
        arms.setdefault(metrics.parent.parent.name, []).append(metrics.parent)
    return arms


def detection_statistics(logits: torch.Tensor, uncertainty: torch.Tensor, num_images: int) -> dict[str, float]:
    """Statistics over the entries of ``logits`` ([B, Q, C], final layer, raw) whose sigmoid is >= THRESHOLD."""
    scores = logits.sigmoid().flatten()
    kept = scores >= THRESHOLD
    if not kept.any():
        return {"per_image": 0.0, "mean_score": float("nan"), "share_over_half": float("nan"),
                "top_score": float(scores.max()), "mean_logit": float("nan"), "median_u": float("nan"),
                "mean_k": float("nan")}
    u = uncertainty.flatten()[kept]
    return {"per_image": float(kept.sum()) / num_images, "mean_score": float(scores[kept].mean()),
            "share_over_half": float((scores[kept] >= 0.5).float().mean()), "top_score": float(scores.max()),
            "mean_logit": float(logits.flatten()[kept].mean()), "median_u": float(u.quantile(0.5)),
            "mean_k": float((1 - torch.tanh(u)).mean())}


def span(means: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * m[key] for m in means.values() if np.isfinite(m[key])]
    return f"{min(values):.{digits}f} to {max(values):.{digits}f}"


def reading(means: dict) -> str:
    """One bold line read off the table: the confidence regime and what the modulation does in it."""
    measured = [m for m in means.values() if np.isfinite(m["mean_logit"])]
    if not measured:
        return "**Reading: no run kept a detection at score >= 0.3.**"
    if all(m["mean_logit"] < 0 for m in measured):
        sign = ("negative in every run, so there the training-time shrink K * z raises the probability the loss "
                "sees, while the paper's intent, lowering uncertain confidences, holds only above 0.5")
    elif all(m["mean_logit"] > 0 for m in measured):
        sign = "positive in every run, so there the training-time shrink K * z lowers the probability, as the paper intends"
    else:
        sign = "of either sign across runs"
    return (f"**Reading: the detections D-ECE counts score >= 0.5 in {span(means, 'share_over_half', 100, 1)} % of "
            f"cases; their mean final logit is {span(means, 'mean_logit')} ({sign}); K there is "
            f"{span(means, 'mean_k', digits=3)}: multiplicative modulation moves (in arms without it, would move) "
            f"those logits by {span({a: {'x': 100 * (1 - m['mean_k'])} for a, m in means.items()}, 'x', digits=0)} %.**")


@torch.no_grad()
def measure(folder: Path, dataset, batch_size: int) -> dict[str, float]:
    from transformers import AutoImageProcessor

    from transformers import AutoConfig

    from hf_caldetr.method import logit_uncertainty
    from hf_caldetr.families import decoder_layer_logits, layer_logits_options, model_family
    from hf_caldetr.data import make_collate_fn

    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in SIGMOID_MODEL_TYPES:
        raise SystemExit(f"{folder}: model_type {model_type!r} has a softmax head; these diagnostics read sigmoid "
                         f"scores and support {SIGMOID_MODEL_TYPES} only")
    # The stock class reads every checkpoint (Cal or not); every layer's logits come from its outputs.
    family = model_family(model_type)
    model = family.model_class.from_pretrained(folder).eval()
    collate = make_collate_fn(AutoImageProcessor.from_pretrained(folder))
    logits, uncertainty = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        output = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"),
                       **layer_logits_options(model))
        layers = decoder_layer_logits(model, output)
        logits.append(layers[:, -1])  # raw final-layer logits, whatever the settings
        uncertainty.append(logit_uncertainty(layers))
    return detection_statistics(torch.cat(logits), torch.cat(uncertainty), len(dataset))


DIAGNOSTICS_FILE = "diagnostics.json"
DIAGNOSTICS_VERSION = 1  # bump when the statistics change, so every diagnostics.json is redone


def ensure_statistics(folder: Path, get_dataset, batch_size: int, num_images: int, seed: int) -> dict[str, float]:
    """``measure`` of one run, kept in ``<folder>/diagnostics.json`` (``benchmarks/run_records.py`` carries it to
    another machine) and reused while the run's ``metrics.json`` and the scenes (count, seed) are unchanged.
    ``get_dataset()``: the scenes, called only when the model is measured."""
    source = {"version": DIAGNOSTICS_VERSION, "metrics_sha256": bench.sha256(folder / "metrics.json"),
              "num_images": num_images, "seed": seed}
    return bench.cached_record(folder / DIAGNOSTICS_FILE, source, lambda: {
        "source": source, "statistics": measure(folder, get_dataset(), batch_size)})["statistics"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "calibration_cpu",
                        help="a benchmarks/calibration.py work dir: every <arm>/seed_<s>/ folder in it with a "
                             "metrics.json is measured (default: outputs/benchmarks/calibration_cpu, the cpu size's)")
    parser.add_argument("--name", default="calibration_cpu_diagnostics",
                        help="report name: <results_dir>/<name>.md (default: %(default)s)")
    parser.add_argument("--results_dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="the folder the report is written to (default: the repository's benchmarks/results)")
    parser.add_argument("--num_images", type=int, default=200,
                        help="number of fresh train-distribution digits scenes the detections are taken on "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=3, help="generation seed of the scenes (not 0, the training "
                                                           "scenes' seed) (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="images per forward pass of each model (default: %(default)s)")
    args = parser.parse_args(argv)
    from hf_caldetr.data.arguments import load_calibration_split

    arms = run_folders(args.work_dir)
    if not arms:
        raise SystemExit(f"no trained runs (<arm>/seed_<s>/metrics.json) under {args.work_dir}")
    arguments = json.loads((next(iter(arms.values()))[0] / "metrics.json").read_text())["run"]["arguments"]
    data_args = bench.data_arguments(arguments)
    loaded = []

    def get_dataset():
        if not loaded:  # the scenes are generated only when a model is measured
            loaded.append(load_calibration_split(data_args, None, args.num_images, args.seed))
        return loaded[0]

    keys = ("per_image", "mean_score", "share_over_half", "top_score", "mean_logit", "median_u", "mean_k")
    lines = ["# Cal-DETR diagnostics: confidence regime and measured uncertainty", "",
             f"{args.num_images} fresh train-distribution digit scenes (generation seed {args.seed}); detections = final-"
             f"layer sigmoid scores >= {THRESHOLD} (the D-ECE protocol's); raw logits; mean over seeds. K = 1 - tanh(U) is "
             "the factor multiplicative modulation applies to a logit in training (1: no change); the final-layer "
             "logit is negative for a score below 0.5, where shrinking it towards 0 raises the probability the loss "
             "sees.", "",
             "| arm | seeds | detections / image | mean score | share >= 0.5 | top score | mean logit | median U | mean K |",
             "|---|---|---|---|---|---|---|---|---|"]
    means = {}
    for arm, folders in arms.items():
        stats = [ensure_statistics(folder, get_dataset, args.batch_size, args.num_images, args.seed)
                 for folder in folders]
        mean = means[arm] = {key: float(np.mean([s[key] for s in stats])) for key in keys}
        lines.append(f"| {arm} | {len(folders)} | {mean['per_image']:.2f} | {mean['mean_score']:.3f} | "
                     f"{100 * mean['share_over_half']:.1f} % | {mean['top_score']:.3f} | {mean['mean_logit']:+.2f} | "
                     f"{mean['median_u']:.4f} | {mean['mean_k']:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", reading(means)]
    shown = args.work_dir.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    lines += ["", f"Command: `python benchmarks/calibration_diagnostics.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
              f" (runs under `{shown}`)", ""]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.md").write_text("\n".join(lines))
    print(f"wrote {args.results_dir / f'{args.name}.md'}")


if __name__ == "__main__":
    main()
