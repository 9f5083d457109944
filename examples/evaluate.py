"""Evaluate any detector checkpoint as train.py does: AP, D-ECE and LaECE in-domain and on a corrupted copy.

    accelerate launch examples/evaluate.py --model_name_or_path outputs/cal-detr-digits
    python examples/evaluate.py --model_name_or_path outputs/baseline-digits --compare_with outputs/cal-detr-digits
    python examples/evaluate.py --model_name_or_path outputs/baseline-digits --fit_calibrator isotonic
    python examples/evaluate.py --model_name_or_path outputs/baseline-digits \
        --calibrator outputs/evaluation/calibrator.json
    python examples/evaluate.py --model_name_or_path outputs/onnx/model.int8.onnx --fit_calibrator platt \
        --save_calibrated_model outputs/onnx-calibrated

The checkpoint may also be an ONNX file written by ``examples/export.py`` (fp32 or int8, with the
``config.json`` and ``preprocessor_config.json`` it copies beside the file): it is run in onnxruntime and measured
with the same metrics. ``--fit_calibrator temperature|platt`` folds the fitted map into the model (its weights for
a PyTorch checkpoint, a Mul + Add at the ``logits`` output of an ONNX graph) and measures the folded model;
``--save_calibrated_model DIR`` writes it (an ordinary checkpoint, or ``DIR/model.onnx``).

The checkpoint is a folder or a Hub id, plain or Cal (a stock transformers checkpoint either way); the data flags
are train.py's (the embedded digits default, ``--dataset_name``, or COCO folders), of which the validation split
is evaluated. A post-hoc calibrator (``--calibrator`` or ``--fit_calibrator``) applies to ``--model_name_or_path``
only, so ``--model_name_or_path BASELINE --fit_calibrator isotonic --compare_with CAL_DETR`` sets the post-hoc
baseline against the train-time method. ``--output_dir`` receives:

- ``metrics.json``: ``{"in_domain": {...}, "out_of_domain": {...}}`` as train.py writes it (calibrated scores
  when a calibrator applies), plus ``"before_calibration"`` (the raw model), ``"compare_with"`` (the other model)
  and ``"evaluation"`` (what was evaluated, how);
- ``reliability_diagram.png`` (the model's splits), ``reliability_comparison.png`` (with ``--compare_with``),
  ``reliability_before_after.png`` (with a calibrator), ``calibrator.json`` (with ``--fit_calibrator``) and
  ``corruption_manifest.json``;
- ``uncertainty_diagram.png`` (the model's splits) and ``uncertainty_comparison.png`` (with ``--compare_with``):
  D-UCE diagrams, the error rate of the kept detections against their uncertainty ``tanh(Var_l(z))`` (the
  variance of the detection's class logit over the decoder layers) per bin. ``d_uce`` is in ``metrics.json`` for
  every PyTorch model (a calibrator maps the scores, not the uncertainties); an ONNX model returns the final
  logits only, so it has neither.

The calibrator maps every post-processed score, and the metrics then keep the detections scoring at least 0.3,
as for any detector (see ``hf_caldetr.evaluation.evaluate_model``). ``--fit_calibrator`` fits it on the held-out
detections the protocol keeps (``--calibration_score_threshold 0.3``); below that it extrapolates.
``--calibration_score_threshold 0`` fits it on all top-100 detections instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from hf_caldetr.calibrators import SoftmaxTemperatureScaling, load_calibrator
from hf_caldetr.data import (
    build_image_processor,
    corrupt_dataset,
    id2label,
    make_collate_fn,
    save_manifest,
)
from hf_caldetr.data.arguments import DataArguments, load_calibration_split, load_splits
from hf_caldetr.evaluation import (
    CALIBRATOR_KINDS,
    fit_calibrator,
    iter_detections,
    make_calibrator,
    flatten_summary,
    lrp_thresholds,
    measure_detections,
    model_categories,
    plot_uncertainty_panels,
    summarize,
    write_metrics,
)
from hf_caldetr.folding import fold_calibrator, is_foldable, unfold_calibration
from hf_caldetr.metrics import plot_reliability_diagram
from hf_caldetr.training import MODEL_FAMILIES, check_checkpoint

logger = logging.getLogger("evaluate")

FITTABLE = tuple(kind for kind in CALIBRATOR_KINDS if kind not in ("none", "auto"))
COMPARED_METRICS = (("map", "AP"), ("map_50", "AP50"), ("d_ece", "D-ECE"), ("laece", "LaECE"), ("lrp", "LRP"),
                    ("olrp", "oLRP"), ("laece_0", "LaECE_0"), ("laace_0", "LaACE_0"), ("oce", "OCE"),
                    ("d_uce", "D-UCE"), ("at_lrp_optimal_thresholds.laece_0", "LaECE_0, LRP-optimal thresholds"),
                    ("at_lrp_optimal_thresholds.laace_0", "LaACE_0, LRP-optimal thresholds"),
                    ("at_lrp_optimal_thresholds.d_ece", "D-ECE, LRP-optimal thresholds"))
SPLIT_TITLES = {"in_domain": "in-domain", "out_of_domain": "out-of-domain"}


# ----------------------------------------------------------------------------------------------------- helpers


def load_detector(name_or_path: str, raw: bool = False):
    """The checkpoint's stock transformers model; its Cal class when it was saved with ``modulate_at_inference``.

    Cal checkpoints are stock ones, and the stock model returns the raw logits. A model saved with
    ``modulate_at_inference=True`` was measured by train.py with modulated logits, which only its Cal class
    computes, so that one is loaded instead. ``raw=True``: a calibration folded into the checkpoint
    (``config.folded_calibration``) is undone, so the model returns its raw scores.
    """
    from transformers import AutoConfig, AutoModelForObjectDetection

    if is_onnx(name_or_path):
        from hf_caldetr.export import OnnxDetector

        detector = OnnxDetector(name_or_path)
        if raw and getattr(detector.config, "folded_calibration", None):
            raise ValueError(f"{name_or_path} holds a folded calibration (config.folded_calibration), which cannot be "
                             "undone in an ONNX graph: export the raw checkpoint (hf_caldetr.folding."
                             "unfold_calibration, then examples/export.py) to fit a new calibrator")
        return detector
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(f"{name_or_path}: not a local checkpoint folder, and loading it from the Hub failed: "
                         f"{error}") from error
    if getattr(config, "modulate_at_inference", False) and config.model_type in MODEL_FAMILIES:
        model = MODEL_FAMILIES[config.model_type].cal_model_class.from_pretrained(name_or_path)
    else:
        model = AutoModelForObjectDetection.from_pretrained(name_or_path)
    if raw and getattr(model.config, "folded_calibration", None):
        logger.info("%s holds a folded calibration: undone, to fit the new calibrator on the raw scores", name_or_path)
        unfold_calibration(model)
    return model


def is_onnx(name_or_path: str) -> bool:
    return Path(name_or_path).suffix == ".onnx" and Path(name_or_path).is_file()


def comparison_table(first: str, second: str, results: dict, compared: dict) -> str:
    """A side-by-side table (percent) of two models' ``COMPARED_METRICS`` per split (both protocols), with the
    difference; a metric neither model has (D-UCE of ONNX models) is left out, one only one has is n/a."""
    a, b = display_name(first), display_name(second)
    lines = [f"| split | metric | {a} | {b} | {b} - {a} |", "|---|---|---|---|---|"]
    for split in results:
        left, right = (flatten_summary(summarize(side[split])) for side in (results, compared))
        for key, label in COMPARED_METRICS:
            if key not in left and key not in right:
                continue
            cells = [f"{100 * side[key]:.2f}" if key in side else "n/a" for side in (left, right)]
            difference = f"{100 * (right[key] - left[key]):+.2f}" if key in left and key in right else "n/a"
            lines.append(f"| {SPLIT_TITLES[split]} | {label} | {cells[0]} | {cells[1]} | {difference} |")
    return "\n".join(lines)


def load_image_processor(name_or_path: str, model_type: str, image_size: int):
    """The checkpoint's image processor; when it saved none, ``build_image_processor(image_size)`` of the class
    train.py uses for ``model_type``."""
    from transformers import AutoImageProcessor

    if is_onnx(name_or_path):
        name_or_path = str(Path(name_or_path).parent)
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:
        family = MODEL_FAMILIES.get(model_type)
        processor_class = family.image_processor_class if family else "DeformableDetrImageProcessor"
        logger.info("%s has no image processor config: using %s at size %s", name_or_path, processor_class,
                    image_size)
        return build_image_processor(image_size or None, processor_class)


def check_labels(model, dataset, name_or_path: str) -> None:
    """The model must predict the dataset's classes: the same names in the same id order."""
    names = id2label(dataset)
    model_names = {int(index): name for index, name in model.config.id2label.items()}
    if len(model_names) != len(names):
        raise ValueError(f"{name_or_path} predicts {len(model_names)} classes but the evaluation data has "
                         f"{len(names)} ({list(names.values())})")
    if model_names != names:
        # Matched by index, a reordered label map would score a perfect detector 0 without a word.
        raise ValueError(f"{name_or_path} names its classes {list(model_names.values())} (in id order), the "
                         f"evaluation data {list(names.values())}: evaluate on data with the model's classes in the "
                         "same order")


def read_calibrator(path: str):
    """``load_calibrator(path)``, with errors that name the flag and the file."""
    if not Path(path).is_file():
        raise ValueError(f"--calibrator {path}: no such file (a calibrator.json written by --fit_calibrator)")
    try:
        calibrator = load_calibrator(path)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--calibrator {path} is not a saved calibrator: {error}") from error
    if isinstance(calibrator, SoftmaxTemperatureScaling):
        raise ValueError(f"--calibrator {path} is a SoftmaxTemperatureScaling, which maps logits, not scores: fold it "
                         "into the model (hf_caldetr.fold_calibrator), or refit with --fit_calibrator temperature")
    return calibrator


def display_name(name_or_path: str) -> str:
    return Path(name_or_path).name or name_or_path


def plot_panels(panels: list[tuple[dict, str]], path) -> None:
    """One reliability diagram of ``(result, title)`` panels side by side."""
    results, titles = zip(*panels)
    plot_reliability_diagram(list(results), path, titles=list(titles))


# --------------------------------------------------------------------------------------------------- arguments


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "the checkpoint to evaluate (Hub id or folder, plain or Cal)"})
    compare_with: str | None = field(default=None, metadata={
        "help": "a second checkpoint, evaluated side by side (a table of both and their difference is printed)"})
    output_dir: str = field(default="outputs/evaluation", metadata={
        "help": "where metrics.json and the diagrams go"})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "images per batch and process"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    include_images_without_gt: bool = field(
        default=False, metadata={"help": "keep detections of images without ground truth (all false positives; "
                                         "default: off, the protocol's choice)"})
    lrp_optimal_thresholds: bool = field(
        default=True, metadata={"help": "also report the second protocol (Kuzucu et al.): per-class LRP-optimal "
                                        "thresholds found on the held-out calibration images (--calibration_split, "
                                        "--num_calibration_images), applied to the evaluated splits (default: on)"})


@dataclass
class CalibrationArguments:
    calibrator: str | None = field(
        default=None, metadata={"help": "a saved calibrator.json, applied to the scores before the metrics "
                                        ""})
    fit_calibrator: str | None = field(
        default=None, metadata={"help": f"fit one of {sorted(FITTABLE)} on held-out data; temperature and platt "
                                        "are folded into the model"})
    class_wise: bool = field(default=False, metadata={"help": "one map per class (fit_calibrator; default: off)"})
    calibration_split: str | None = field(
        default=None, metadata={"help": "Hub split to fit on (default: the train split); never the evaluation split"})
    num_calibration_images: int = field(default=500, metadata={"help": "seeded subset of the split; 0 takes it all"})
    calibration_seed: int = field(
        default=1, metadata={"help": "subset seed; for the digits default the seed of fresh scenes (not --data_seed)"})
    calibration_score_threshold: float = field(
        default=0.3, metadata={"help": "fit on detections scoring at least this (the D-ECE protocol's 0.3)"})
    save_calibrator_with_checkpoint: bool = field(
        default=False, metadata={"help": "also write calibrator.json into the checkpoint folder"})
    save_calibrated_model: str | None = field(
        default=None, metadata={"help": "write the model with the fitted temperature/Platt map folded in to this "
                                        "folder: a checkpoint, or model.onnx for an ONNX model (default: not written)"})


def check_arguments(eval_args: EvaluationArguments, calibration_args: CalibrationArguments) -> None:
    """Every flag problem that needs no data, before anything is loaded."""
    check_checkpoint(eval_args.model_name_or_path, allow_onnx=True)
    if eval_args.compare_with:
        check_checkpoint(eval_args.compare_with, allow_onnx=True)
        if eval_args.compare_with == eval_args.model_name_or_path:
            raise ValueError("--compare_with names the evaluated model itself; give another checkpoint")
    checkpoint = Path(eval_args.model_name_or_path).expanduser()
    if checkpoint.is_dir() and checkpoint.resolve() == Path(eval_args.output_dir).expanduser().resolve():
        raise ValueError("--output_dir is the checkpoint folder: its metrics.json (train.py's, read by the model "
                         "card) would be overwritten; pick another folder")
    if calibration_args.calibrator and calibration_args.fit_calibrator:
        raise ValueError("--calibrator and --fit_calibrator exclude each other: apply a saved one or fit a new one")
    if calibration_args.fit_calibrator and calibration_args.fit_calibrator not in FITTABLE:
        raise ValueError(f"--fit_calibrator must be one of {sorted(FITTABLE)}, got "
                         f"{calibration_args.fit_calibrator!r}")
    saved_to = calibration_args.save_calibrated_model
    checkpoint_folder = checkpoint if checkpoint.is_dir() else checkpoint.parent  # an .onnx file's folder
    if saved_to and Path(saved_to).expanduser().resolve() == checkpoint_folder.resolve():
        raise ValueError("--save_calibrated_model is the checkpoint's own folder: its raw weights would be replaced; "
                         "pick another folder")
    if calibration_args.save_calibrated_model and calibration_args.fit_calibrator not in ("temperature", "platt"):
        raise ValueError("--save_calibrated_model needs --fit_calibrator temperature or platt (the affine maps that "
                         "fold into a model); isotonic and histogram stay a calibrator.json")
    saves_with_checkpoint = calibration_args.save_calibrator_with_checkpoint
    if saves_with_checkpoint and not (calibration_args.fit_calibrator and checkpoint.is_dir()):
        raise ValueError("--save_calibrator_with_checkpoint needs --fit_calibrator and a checkpoint folder")


def fold_model(name: str, model, calibrator, fitted_on: dict, accelerator, save_to: str | None, output_dir: str):
    """``model`` with ``calibrator`` folded in: into the weights of a PyTorch model (saved as a checkpoint when
    ``save_to``), or as a Mul + Add at an ONNX graph's logits output (written by the main process to ``save_to``,
    else to ``output_dir/calibrated_onnx``, and loaded from there)."""
    if is_onnx(name):
        from hf_caldetr.export import OnnxDetector, fold_into_onnx

        path = (Path(save_to) if save_to else Path(output_dir) / "calibrated_onnx") / "model.onnx"
        if accelerator.is_main_process:
            fold_into_onnx(name, calibrator, path, fitted_on=fitted_on)
        accelerator.wait_for_everyone()
        return OnnxDetector(path)
    unwrapped = accelerator.unwrap_model(model)
    fold_calibrator(unwrapped, calibrator, fitted_on=fitted_on)
    if save_to and accelerator.is_main_process:
        unwrapped.save_pretrained(save_to)
        load_image_processor(name, unwrapped.config.model_type, 0).save_pretrained(save_to)
    return model


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((EvaluationArguments, DataArguments, CalibrationArguments),
                              description=__doc__.split("\n\n")[0])
    eval_args, data_args, calibration_args = parser.parse_args_into_dataclasses(args=argv)

    # Phase 1: accelerator, logging, the checks that need no data.
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    check_arguments(eval_args, calibration_args)
    calibrator = read_calibrator(calibration_args.calibrator) if calibration_args.calibrator else None
    metric_options = {"include_images_without_gt": eval_args.include_images_without_gt}

    # Phase 2: data (the validation split, and its corrupted copy: the CorCOCO recipe).
    with accelerator.main_process_first():
        (eval_dataset,) = load_splits(data_args, ("validation",))
        splits = {"in_domain": eval_dataset}
        if not data_args.skip_out_of_domain:
            splits["out_of_domain"], manifest = corrupt_dataset(eval_dataset, base_seed=data_args.corruption_seed)
    logger.info("data: %d evaluation images, %d classes", len(eval_dataset), len(id2label(eval_dataset)))

    # Phase 3: models, each with its own image processor.
    names = [eval_args.model_name_or_path] + ([eval_args.compare_with] if eval_args.compare_with else [])
    models, processors, raw_models = {}, {}, {}
    for name in names:
        # A calibrator is fitted on the raw scores: a checkpoint that holds a folded one is unfolded first.
        model = load_detector(name, raw=bool(calibration_args.fit_calibrator) and name == names[0])
        check_labels(model, eval_dataset, name)
        models[name] = model if is_onnx(name) else accelerator.prepare_model(model, evaluation_mode=True)
        processors[name] = load_image_processor(name, model.config.model_type, data_args.image_size)

    def dataloader(dataset, name):
        return accelerator.prepare(DataLoader(dataset, batch_size=eval_args.per_device_eval_batch_size,
                                              collate_fn=make_collate_fn(processors[name]),
                                              num_workers=eval_args.dataloader_num_workers))

    # The class-averaged metrics (LaECE, LRP, ...) average over the dataset's categories: the model's classes,
    # which check_labels has matched to the evaluation data.
    metric_options["categories"] = model_categories(models[names[0]])

    # Phase 4: the post-hoc calibrator of the first model: fitted on held-out images, or loaded.
    main_name = names[0]
    calibration_record, folded, calibration_dataset = None, False, None
    if calibration_args.fit_calibrator or eval_args.lrp_optimal_thresholds:
        with accelerator.main_process_first():
            calibration_dataset = load_calibration_split(data_args, calibration_args.calibration_split,
                                                         calibration_args.num_calibration_images,
                                                         calibration_args.calibration_seed)
    if calibration_args.fit_calibrator:
        softmax_head = MODEL_FAMILIES[models[main_name].config.model_type].softmax_head
        calibrator = make_calibrator(calibration_args.fit_calibrator, calibration_args.class_wise, softmax_head,
                                     fold_required=False)
        fit_calibrator(models[main_name], dataloader(calibration_dataset, main_name), processors[main_name],
                       calibrator, accelerator, score_threshold=calibration_args.calibration_score_threshold,
                       progress=True, include_images_without_gt=eval_args.include_images_without_gt)
        calibration_record = {"split": calibration_args.calibration_split or "train",
                              "num_images": len(calibration_dataset), "seed": calibration_args.calibration_seed,
                              "score_threshold": calibration_args.calibration_score_threshold}
        logger.info("fitted %r on %d images: %s", calibrator, len(calibration_dataset), calibrator.params_)
        if is_foldable(calibrator, softmax_head):
            raw = load_detector(main_name, raw=True)
            raw_models[main_name] = raw if is_onnx(main_name) else accelerator.prepare_model(raw, evaluation_mode=True)
            models[main_name] = fold_model(main_name, models[main_name], calibrator, calibration_record, accelerator,
                                           calibration_args.save_calibrated_model, eval_args.output_dir)
            folded = True

    # The second protocol's per-class LRP-optimal thresholds, found on the held-out images for each set of scores
    # measured: the model's own, the raw ones of a folded model, the score-calibrated ones, the compared model's.
    thresholds = {}
    if eval_args.lrp_optimal_thresholds:
        for key, name, model, score_map in (
                ("main", main_name, models[main_name], None),
                ("raw", main_name, raw_models.get(main_name), None),
                ("calibrated", main_name, models[main_name] if calibrator is not None and not folded else None,
                 calibrator),
                ("compare_with", names[-1], models[names[-1]] if len(names) > 1 else None, None)):
            if model is not None:
                thresholds[key] = lrp_thresholds(model, dataloader(calibration_dataset, name), processors[name],
                                                 accelerator, calibrator=score_map, **metric_options)

    # Phase 5: evaluate. A model runs once per split; raw and calibrated scores are measured on its detections
    # (a folded model runs once more, unfolded, for its raw scores).
    results, before, compared = {}, {}, {}
    for split, dataset in splits.items():
        for name in names:
            batches = list(iter_detections(models[name], dataloader(dataset, name), processors[name], accelerator,
                                           progress=True))
            own = thresholds.get("main" if name == main_name else "compare_with")
            raw = measure_detections(batches, class_thresholds=own, **metric_options)
            if name == main_name:
                if folded:  # the folded model's own scores are calibrated; its raw ones come from the raw model
                    raw_batches = list(iter_detections(raw_models[main_name], dataloader(dataset, name),
                                                       processors[name], accelerator, progress=True))
                    before[split] = measure_detections(raw_batches, class_thresholds=thresholds.get("raw"),
                                                       **metric_options)
                    results[split] = raw
                    continue
                before[split] = raw
                results[split] = raw if calibrator is None else measure_detections(
                    batches, calibrator, class_thresholds=thresholds.get("calibrated"), **metric_options)
            else:
                compared[split] = raw
            shown = summarize(results[split] if name == main_name else raw)
            logger.info("%s %s: %s", display_name(name), split,
                        {k: round(v, 4) for k, v in flatten_summary(shown).items()})

    # Phase 6: write metrics, diagrams, calibrator and manifest.
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    output_dir = Path(eval_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = {"evaluation": {"model": main_name, "compare_with": eval_args.compare_with,
                            "calibrator": None if calibrator is None else {
                                "type": type(calibrator).__name__, "folded": folded,
                                "path": calibration_args.calibrator or str(output_dir / "calibrator.json"),
                                "fitted_on": calibration_record},
                            "num_processes": accelerator.num_processes,
                            "arguments": {**asdict(eval_args), **asdict(data_args), **asdict(calibration_args)}}}
    if thresholds:
        extra["lrp_optimal_thresholds"] = {
            "found_on": {"split": calibration_args.calibration_split or "train", "num_images": len(calibration_dataset),
                         "seed": calibration_args.calibration_seed},
            **{key: {str(k): v for k, v in values.items()} for key, values in thresholds.items()}}
    if calibrator is not None:
        extra["before_calibration"] = {split: summarize(result) for split, result in before.items()}
    if compared:
        extra["compare_with"] = {"model": eval_args.compare_with,
                                 **{split: summarize(result) for split, result in compared.items()}}
    suffix = "" if calibrator is None else f" + {type(calibrator).__name__}"
    titles = {split: f"{display_name(main_name)}{suffix}, {SPLIT_TITLES[split]}" for split in results}
    metrics = write_metrics(results, output_dir, extra=extra, titles=titles)
    if compared:
        table = comparison_table(main_name, eval_args.compare_with, results, compared)
        (output_dir / "comparison.md").write_text(table + "\n")
        print(table)
        other = display_name(eval_args.compare_with)
        comparison = [panel for split in results for panel in (
            (results[split], titles[split]), (compared[split], f"{other}, {SPLIT_TITLES[split]}"))]
        plot_panels(comparison, output_dir / "reliability_comparison.png")
        plot_uncertainty_panels([panel[0] for panel in comparison], output_dir / "uncertainty_comparison.png",
                                [panel[1] for panel in comparison])
    if calibrator is not None:
        plot_panels([panel for split in results for panel in (
            (before[split], f"raw scores, {SPLIT_TITLES[split]}"),
            (results[split], f"after {type(calibrator).__name__}, {SPLIT_TITLES[split]}"))],
            output_dir / "reliability_before_after.png")
    if calibration_args.fit_calibrator:
        calibrator.save(output_dir / "calibrator.json")
        if calibration_args.save_calibrator_with_checkpoint:
            calibrator.save(Path(main_name).expanduser() / "calibrator.json")
    if "out_of_domain" in splits:
        save_manifest(manifest, str(output_dir / "corruption_manifest.json"), base_seed=data_args.corruption_seed)
    logger.info("wrote %s: %s", output_dir, json.dumps(metrics["in_domain"]))
    return metrics


if __name__ == "__main__":
    main()
