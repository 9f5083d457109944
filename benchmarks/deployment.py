"""One trained model in every deployed form: PyTorch fp32, ONNX Runtime fp32, int8 dynamic, int8 static; each raw,
calibrated (the calibrator folded before export) and, for int8, recalibrated after quantization.

    python benchmarks/deployment.py                                   # the main job's folder, outputs/cal-detr-digits
    python benchmarks/deployment.py --model_dir DIR --name deployment_other

The model is the main job's calibrated checkpoint (``examples/train.py``, which folds a Platt map into the head);
its raw form is the same checkpoint with the fold undone (``hf_caldetr.folding.unfold_calibration``). Calibration
images: the ones train.py fitted on (fresh digit scenes, generation seed 1); evaluation: the 500 validation scenes
and their corrupted copy, exactly as train.py measures. "recalibrated" refits the same calibrator kind on the
quantized raw model's own scores and folds it at the ONNX graph's logits output (``fold_into_onnx``).

Latency: one image at a time (the processor's 96x96), the median over ``--latency_images`` calls after
``--warmup`` calls, every form with the same thread count (``--threads``, default every core), measured in this
run; the ratio is to PyTorch fp32 of the same run. Writes ``benchmarks/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_caldetr.data import corrupt_dataset, make_collate_fn
from hf_caldetr.data.arguments import DataArguments, load_calibration_split, load_splits
from hf_caldetr.evaluation import evaluate_model, fit_calibrator, make_calibrator, summarize
from hf_caldetr.export import OnnxDetector, copy_checkpoint_files, export_onnx, fold_into_onnx, quantize_onnx
from hf_caldetr.folding import unfold_calibration

ROOT = Path(__file__).resolve().parents[1]
METRICS = (("map", "AP"), ("d_ece", "D-ECE"), ("laece", "LaECE"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default="outputs/cal-detr-digits",
                        help="a calibrated checkpoint written by examples/train.py (default: outputs/cal-detr-digits)")
    parser.add_argument("--work_dir", default="outputs/benchmarks/deployment",
                        help="where the exported models go (default: outputs/benchmarks/deployment)")
    parser.add_argument("--name", default="deployment", help="report name under benchmarks/results (default: deployment)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every form (default: every core)")
    parser.add_argument("--latency_images", type=int, default=200, help="timed single-image calls (default: 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before timing (default: 20)")
    parser.add_argument("--num_validation_images", type=int, default=500, help="evaluation scenes (default: 500)")
    parser.add_argument("--num_calibration_images", type=int, default=500,
                        help="calibration scenes, generation seed 1 as in train.py (default: 500)")
    parser.add_argument("--static_batches", type=int, default=16,
                        help="batches of 8 training images for int8 static ranges (default: 16)")
    return parser.parse_args(argv)


def latency(model, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, warmup: int, count: int) -> float:
    """Median seconds of one single-image call."""
    times = []
    with torch.no_grad():
        for index in range(warmup + count):
            image = index % len(pixel_values)
            start = time.perf_counter()
            model(pixel_values=pixel_values[image:image + 1], pixel_mask=pixel_mask[image:image + 1])
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir, work = Path(args.model_dir), Path(args.work_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a checkpoint: run the README's main job first "
                         "(accelerate launch examples/train.py --output_dir outputs/cal-detr-digits)")
    shipped = json.loads((model_dir / "metrics.json").read_text())
    kind = {"PlattScaling": "platt", "TemperatureScaling": "temperature"}[shipped["calibration"]["type"]]
    class_wise = shipped["calibration"]["class_wise"]  # recalibrate with the main job's own recipe
    processor = AutoImageProcessor.from_pretrained(model_dir)
    size = processor.size["height"]

    # The data, as train.py builds it.
    data_args = DataArguments(num_validation_images=args.num_validation_images, image_size=size)
    (validation,) = load_splits(data_args, ("validation",))
    corrupted, _ = corrupt_dataset(validation, base_seed=data_args.corruption_seed)
    calibration = load_calibration_split(data_args, None, args.num_calibration_images, seed=1)
    collate = make_collate_fn(processor)

    def loader(dataset):
        return DataLoader(dataset, batch_size=32, collate_fn=collate)

    splits = {"in_domain": validation, "out_of_domain": corrupted}
    timing_batch = collate([validation[i] for i in range(16)])

    # Every form on disk.
    calibrated_model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    raw_model = unfold_calibration(AutoModelForObjectDetection.from_pretrained(model_dir).eval())
    forms: dict[str, object] = {"PyTorch fp32 / raw": raw_model, "PyTorch fp32 / calibrated": calibrated_model}
    static_images = load_splits(DataArguments(num_train_images=8 * args.static_batches, image_size=size), ("train",))[0]
    static_batches = [{"pixel_values": batch["pixel_values"].numpy(), "pixel_mask": batch["pixel_mask"].long().numpy()}
                      for batch in DataLoader(static_images, batch_size=8, collate_fn=collate)]
    for variant, model in (("raw", raw_model), ("calibrated", calibrated_model)):
        folder = work / variant
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(model, folder / "model.onnx", size, size)
        copy_checkpoint_files(model_dir, folder)
        if variant == "raw":  # its config must not claim the fold
            config = json.loads((folder / "config.json").read_text())
            config.pop("folded_calibration", None)
            (folder / "config.json").write_text(json.dumps(config, indent=2))
        forms[f"ONNX fp32 / {variant}"] = folder / "model.onnx"
        for mode, batches in (("dynamic", None), ("static", static_batches)):
            forms[f"int8 {mode} / {variant}"] = quantize_onnx(folder / "model.onnx", folder / f"model.int8-{mode}.onnx",
                                                             mode, batches)

    # Recalibrated after quantization: the calibrator refitted on the int8 raw model's own scores, then folded.
    fitted_on = {"images": len(calibration), "source": "fresh digit scenes, generation seed 1", "score_threshold": 0.3}
    for mode in ("dynamic", "static"):
        quantized = OnnxDetector(forms[f"int8 {mode} / raw"], threads=args.threads)
        calibrator = make_calibrator(kind, class_wise)
        fit_calibrator(quantized, loader(calibration), processor, calibrator)
        forms[f"int8 {mode} / recalibrated"] = fold_into_onnx(
            forms[f"int8 {mode} / raw"], calibrator, work / f"recalibrated-{mode}" / "model.onnx", fitted_on)

    # Measure: latency on the same images for every form, then the metrics.
    rows = {}
    for name, form in forms.items():
        model = form if isinstance(form, torch.nn.Module) else OnnxDetector(form, threads=args.threads)
        seconds = latency(model, timing_batch["pixel_values"], timing_batch["pixel_mask"], args.warmup,
                          args.latency_images)
        results = {split: summarize(evaluate_model(model, loader(dataset), processor)) for split, dataset in splits.items()}
        rows[name] = {"latency_ms": 1000 * seconds, **results}
        print(name, f"{1000 * seconds:.2f} ms", {s: {k: round(100 * r[k], 2) for k, _ in METRICS} for s, r in results.items()},
              flush=True)
    reference = rows["PyTorch fp32 / raw"]["latency_ms"]
    for row in rows.values():
        row["latency_ratio"] = row["latency_ms"] / reference

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {"rows": rows, "model_dir": str(model_dir),
              "calibrator": f"{'class-wise ' if class_wise else ''}{kind}", "threads": args.threads,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
              "torch": torch.__version__, "commit": commit, "command": "python " + " ".join(sys.argv)}
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (results_dir / f"{args.name}.md").write_text(report(record))
    print(report(record))
    return record


def report(record: dict) -> str:
    header = ["form", "latency ms/image", "x PyTorch fp32"] + [f"{label} {split}" for split in ("in", "out")
                                                               for _, label in METRICS]
    lines = [f"# Deployment: one model in every form ({record['machine']}, {record['threads']} threads)", "",
             f"Model: `{record['model_dir']}` (the README's main job), calibrator: {record['calibrator']} scaling "
             "(calibrated: folded before export and quantization; recalibrated: refitted on the int8 model's raw "
             "scores, folded at its logits output). "
             "Percent; latency: median of single-image calls at the processor's size. "
             f"torch {record['torch']}, commit `{record['commit']}`, command `{record['command']}`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in record["rows"].items():
        cells = [name, f"{row['latency_ms']:.2f}", f"{row['latency_ratio']:.2f}"]
        cells += [f"{100 * row[split][key]:.2f}" for split in ("in_domain", "out_of_domain") for key, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
