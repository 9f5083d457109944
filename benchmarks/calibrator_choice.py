"""Which post-hoc calibrator the main job should fold: every calibrator, class-agnostic and class-wise, fitted on the
same held-out scenes (fresh digits, generation seed 1, as train.py) for the main job's raw model, and measured on
the validation scenes and their corrupted copy.

    python benchmarks/calibrator_choice.py                   # the main job's folder, outputs/cal-detr-digits

The raw model is the main job's checkpoint with its fold undone (``hf_caldetr.folding.unfold_calibration``). Each
row is one ``examples/evaluate.py --fit_calibrator KIND [--class_wise]`` run. Writes
``benchmarks/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_caldetr.folding import unfold_calibration

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("temperature", "platt", "isotonic", "histogram")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default="outputs/cal-detr-digits",
                        help="a calibrated checkpoint written by examples/train.py (default: outputs/cal-detr-digits)")
    parser.add_argument("--work_dir", default="outputs/benchmarks/calibrator_choice",
                        help="where the raw model and each run's output go (default: outputs/benchmarks/calibrator_choice)")
    parser.add_argument("--name", default="calibrator_choice", help="report name (default: calibrator_choice)")
    return parser.parse_args(argv)


def load_evaluate():
    spec = importlib.util.spec_from_file_location("example_evaluate", ROOT / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir)
    raw_dir = work / "raw"
    model = unfold_calibration(AutoModelForObjectDetection.from_pretrained(args.model_dir))
    model.save_pretrained(raw_dir)
    AutoImageProcessor.from_pretrained(args.model_dir).save_pretrained(raw_dir)
    evaluate = load_evaluate()
    rows = {}
    for kind in KINDS:
        for class_wise in (False, True):
            name = f"{kind}{' class-wise' if class_wise else ''}"
            out = work / name.replace(" ", "_")
            metrics = evaluate.main(["--model_name_or_path", str(raw_dir), "--fit_calibrator", kind,
                                     "--class_wise", str(class_wise).lower(), "--output_dir", str(out)])
            rows.setdefault("raw", metrics["before_calibration"])
            rows[name] = {split: metrics[split] for split in ("in_domain", "out_of_domain")}
            rows[name]["folded"] = metrics["evaluation"]["calibrator"]["folded"]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {"rows": rows, "model_dir": args.model_dir, "commit": commit, "command": "python " + " ".join(sys.argv)}
    results = ROOT / "benchmarks" / "results"
    (results / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Post-hoc calibrators on the main job's model (`{args.model_dir}`, its fold undone)", "",
             "Fitted on 500 fresh digit scenes (generation seed 1), measured on the 500 validation scenes and their "
             f"corrupted copy. Percent. Commit `{commit}`, command `{record['command']}`.", "",
             "| calibrator | folded into the weights | D-ECE in | AP in | LaECE in | D-ECE out | AP out | LaECE out |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [name, "-" if name == "raw" else ("yes" if row["folded"] else "no (calibrator.json)")]
        cells += [f"{100 * row[split][key]:.2f}" for split in ("in_domain", "out_of_domain")
                  for key in ("d_ece", "map", "laece")]
        lines.append("| " + " | ".join(cells) + " |")
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
