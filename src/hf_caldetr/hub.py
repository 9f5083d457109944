"""A trained folder as a Hub repository: checks, the model card, the list of files to upload, the upload.

The folder ``examples/train.py`` writes is the repository: ``config.json`` + ``model.safetensors`` (a stock
transformers checkpoint, so Hub widgets and ``pipeline("object-detection")`` run it without custom code), the
image processor config, ``metrics.json``, the reliability diagram, the corruption manifest, ``README.md`` (the
card rendered here) and ``example.png`` (the widget's example image). Checkpoint folders (``step_N/``,
``epoch_N/``) and tracker logs are left out unless asked for.

The card template: the canonical copy is the repository's top-level ``hub_cards/model_card.md``; the package ships
an identical copy as package data (``hf_caldetr/hub_cards/model_card.md``) so that an installed package renders
cards without the source tree. ``tests/test_hub.py`` fails when the two differ.

Every check runs before anything is uploaded: a folder without weights, config or image processor config, a
``metrics.json`` without the expected keys, a template with a missing or unknown field, a bad repo id, no token.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .configuration import CAL_FIELDS, calibration_is_on
from .families import MODEL_FAMILIES

TEMPLATE_PATH = Path(__file__).resolve().parent / "hub_cards" / "model_card.md"

CARD_FILE = "README.md"
EXAMPLE_IMAGE = "example.png"
RELIABILITY_DIAGRAM = "reliability_diagram.png"
CORRUPTION_MANIFEST = "corruption_manifest.json"
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "metrics.json")

# Keys every split of metrics.json must hold (evaluation.summarize writes them), and what the card shows.
REQUIRED_METRIC_KEYS = ("map", "map_50", "map_75", "d_ece", "laece")
SPLITS = {"in_domain": "in-domain", "out_of_domain": "out-of-domain, corrupted"}
MODEL_INDEX_METRICS = {"map": "AP", "map_50": "AP50", "d_ece": "D-ECE", "laece": "LaECE"}
TABLE_METRICS = {"map": "AP", "map_50": "AP50", "map_75": "AP75", "d_ece": "D-ECE", "laece": "LaECE",
                 "laece_iou_0.1": "LaECE (IoU 0.1)", "lrp": "LRP", "olrp": "oLRP", "laece_0": "LaECE_0",
                 "laace_0": "LaACE_0", "oce": "OCE", "position_d_ece": "position D-ECE", "d_uce": "D-UCE",
                 "at_lrp_optimal_thresholds.laece_0": "LaECE_0, LRP-optimal thresholds",
                 "at_lrp_optimal_thresholds.laace_0": "LaACE_0, LRP-optimal thresholds",
                 "at_lrp_optimal_thresholds.lrp": "LRP (IoU 0), LRP-optimal thresholds",
                 "at_lrp_optimal_thresholds.d_ece": "D-ECE, LRP-optimal thresholds"}

# The template must use these: without them a card has no metadata, no usage, no results or no training record.
REQUIRED_TEMPLATE_FIELDS = ("card_data", "model_id", "results_table", "training_table")



def _bibtex(key: str, title: str, authors: str, venue: str, year: int, entry: str = "inproceedings",
            venue_field: str = "booktitle") -> str:
    fields = {"title": title, "author": authors, venue_field: venue, "year": year}
    width = max(map(len, fields))
    body = ",\n".join(f"  {name:<{width}} = {{{value}}}" for name, value in fields.items())
    return f"@{entry}{{{key},\n{body}\n}}"


def _arxiv(key: str, title: str, authors: str, number: str, year: int) -> str:
    return _bibtex(key, title, authors, f"arXiv preprint arXiv:{number}", year, entry="article", venue_field="journal")


# model_type -> (display name, citation of the architecture; empty where none is given). The Cal class of each
# is ``Cal`` + the registered parent's name (hf_caldetr.families).
ARCHITECTURES = {
    "deformable_detr": ("Deformable DETR", _bibtex(
        "zhu2021deformable", "Deformable DETR: Deformable Transformers for End-to-End Object Detection",
        "Zhu, Xizhou and Su, Weijie and Lu, Lewei and Li, Bin and Wang, Xiaogang and Dai, Jifeng",
        "International Conference on Learning Representations (ICLR)", 2021)),
    "detr": ("DETR", _bibtex(
        "carion2020detr", "End-to-End Object Detection with Transformers",
        "Carion, Nicolas and Massa, Francisco and Synnaeve, Gabriel and Usunier, Nicolas and Kirillov, Alexander "
        "and Zagoruyko, Sergey", "European Conference on Computer Vision (ECCV)", 2020)),
    "rt_detr": ("RT-DETR", _bibtex(
        "zhao2024rtdetr", "DETRs Beat YOLOs on Real-time Object Detection",
        "Zhao, Yian and Lv, Wenyu and Xu, Shangliang and Wei, Jinman and Wang, Guanzhong and Dang, Qingqing and "
        "Liu, Yi and Chen, Jie", "IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)", 2024)),
    "rt_detr_v2": ("RT-DETRv2", _arxiv(
        "lv2024rtdetrv2", "RT-DETRv2: Improved Baseline with Bag-of-Freebies for Real-Time Detection Transformer",
        "Lv, Wenyu and Zhao, Yian and Chang, Qinyao and Huang, Kui and Wang, Guanzhong and Liu, Yi", "2407.17140",
        2024)),
    "d_fine": ("D-FINE", _bibtex(
        "peng2025dfine", "D-FINE: Redefine Regression Task of DETRs as Fine-grained Distribution Refinement",
        "Peng, Yansong and Li, Hebei and Wu, Peixi and Zhang, Yueyi and Sun, Xiaoyan and Wu, Feng",
        "International Conference on Learning Representations (ICLR)", 2025)),
    "deimv2": ("DEIMv2", ""),
    "conditional_detr": ("Conditional DETR", _bibtex(
        "meng2021conditional", "Conditional DETR for Fast Training Convergence",
        "Meng, Depu and Chen, Xiaokang and Fan, Zejia and Zeng, Gang and Li, Houqiang and Yuan, Yuhui and Sun, Lei "
        "and Wang, Jingdong", "IEEE/CVF International Conference on Computer Vision (ICCV)", 2021)),
    "dab-detr": ("DAB-DETR", _bibtex(
        "liu2022dabdetr", "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR",
        "Liu, Shilong and Li, Feng and Zhang, Hao and Yang, Xiao and Qi, Xianbiao and Su, Hang and Zhu, Jun and "
        "Zhang, Lei", "International Conference on Learning Representations (ICLR)", 2022)),
    "lw_detr": ("LW-DETR", ""),
    "rf_detr": ("RF-DETR", ""),
}

MODULATION_FORMULAS = {"multiplicative": "`Z_L * (1 - tanh(U))` (the paper)",
                       "subtractive": "`Z_L - tanh(U)` (the authors' released code)", "none": "off"}


class HubExportError(ValueError):
    """A folder, metrics file, card template or repo id that cannot become a Hub repository."""


# ------------------------------------------------------------------------------------------------ folder checks


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise HubExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise HubExportError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(model_dir) -> list[Path]:
    """The safetensors weights of ``model_dir`` (one file, or the shards of an index); raise when incomplete."""
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [name for name in shards if not (model_dir / name).is_file()]
        if not shards or missing:
            raise HubExportError(f"{index} lists missing weight shards {missing or '(none listed)'}")
        return [model_dir / name for name in shards]
    raise HubExportError(f"no weights in {model_dir}: expected model.safetensors (or a sharded "
                         "model.safetensors.index.json) as save_pretrained writes them")


def check_metrics(metrics: dict, source: str = "metrics.json") -> None:
    """Raise unless ``metrics`` holds ``in_domain`` (and, if present, ``out_of_domain``) with the card's keys and
    ``run`` with ``method`` and ``arguments``, as ``examples/train.py`` writes them."""
    problems = []
    for split in SPLITS:
        if split not in metrics:
            if split == "in_domain":
                problems.append("no 'in_domain' results")
            continue
        values = metrics[split]
        if not isinstance(values, dict):
            problems.append(f"'{split}' is not an object")
            continue
        missing = [key for key in REQUIRED_METRIC_KEYS if key not in values]
        if missing:
            problems.append(f"'{split}' lacks {missing}")
        wrong = [key for key in REQUIRED_METRIC_KEYS if key in values and not isinstance(values[key], (int, float))]
        if wrong:
            problems.append(f"'{split}' has non-numeric {wrong}")
    run = metrics.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("arguments"), dict) or "method" not in run:
        problems.append("no 'run' record with 'method' and 'arguments'")
    if problems:
        raise HubExportError(f"{source}: " + "; ".join(problems) + f" (expected keys per split: "
                             f"{list(REQUIRED_METRIC_KEYS)}, as examples/train.py writes them)")


def check_folder(model_dir) -> tuple[dict, dict]:
    """``(config, metrics)`` of a folder ready to become a Hub repository; raise ``HubExportError`` otherwise.

    Checks: the folder exists; config, image processor config, metrics and safetensors weights are there; the
    config names a stock transformers architecture (what the widget and the stock pipeline load) and no custom
    code; ``metrics.json`` holds the expected keys.
    """
    import transformers

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HubExportError(f"{model_dir} is not a folder")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise HubExportError(f"{model_dir} lacks {missing}: not a folder written by save_pretrained + "
                             "examples/train.py")
    weight_files(model_dir)
    config = _read_json(model_dir / "config.json")
    architectures = config.get("architectures") or []
    if "model_type" not in config or not architectures:
        raise HubExportError(f"{model_dir / 'config.json'} lacks 'model_type' or 'architectures'")
    if "auto_map" in config or not all(hasattr(transformers, name) for name in architectures):
        raise HubExportError(f"{model_dir / 'config.json'} names {architectures}"
                             f"{' with auto_map' if 'auto_map' in config else ''}: stock transformers cannot load "
                             "it without custom code, so the Hub widget and pipeline('object-detection') would fail "
                             "(save with save_pretrained of a Cal model: it writes the stock architecture)")
    metrics = _read_json(model_dir / "metrics.json")
    check_metrics(metrics, str(model_dir / "metrics.json"))
    return config, metrics


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubExportError(f"invalid Hub repo id {repo_id!r}: {error}") from None


# --------------------------------------------------------------------------------------------- the card's parts


def _percent(value) -> float | None:
    """A fraction as a percentage with 2 decimals; ``None`` for NaN (a metric undefined on this data)."""
    value = float(value)
    return None if math.isnan(value) else round(100 * value, 2)


def _is_local(path: str | None) -> bool:
    return bool(path) and (os.path.exists(path) or path.startswith((".", "/", "~")))


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_info(arguments: dict) -> dict:
    """Where the run's data came from: ``hub_id`` (or ``None``), model-index ``type``/``name``/``split``, and a
    ``short`` name and a ``description`` for the card."""
    name = arguments.get("dataset_name")
    split = arguments.get("validation_split", "validation")
    if name and not _is_local(name):
        return {"hub_id": name, "type": name, "name": name, "split": split, "short": f"`{name}`",
                "description": f"the Hub dataset [`{name}`](https://huggingface.co/datasets/{name}) (train split "
                               f"`{arguments.get('train_split', 'train')}`, evaluation split `{split}`)"}
    if name:
        return {"hub_id": None, "type": "local-dataset", "name": Path(name).name, "split": split,
                "short": f"`{Path(name).name}`", "description": f"a local dataset folder `{Path(name).name}`"}
    if arguments.get("validation_annotations"):
        annotations = Path(arguments["validation_annotations"]).name
        return {"hub_id": None, "type": "coco-json", "name": annotations, "split": "validation",
                "short": "COCO-format data",
                "description": f"COCO-format folders (evaluation annotations `{annotations}`)"}
    return {"hub_id": None, "type": "digit-scenes", "name": "hf_caldetr digit scenes", "split": "validation",
            "short": "synthetic scenes of handwritten digits (the embedded default of `hf_caldetr`)",
            "description": f"the embedded digit scenes of `hf_caldetr` ({arguments.get('num_train_images')} train / "
                           f"{arguments.get('num_validation_images')} validation images of "
                           f"{arguments.get('image_size')}x{arguments.get('image_size')} pixels, seed "
                           f"{arguments.get('data_seed')}): scikit-learn's 8x8 handwritten digits (UCI optdigits) "
                           "pasted at random scales onto cluttered canvases, train and validation drawn from "
                           "disjoint source digits"}


def eval_results(metrics: dict, dataset: dict) -> list:
    """The model-index entries: AP, AP50, D-ECE, LaECE in percent, in-domain and out-of-domain."""
    from huggingface_hub import EvalResult

    results = []
    for split, title in SPLITS.items():
        if split not in metrics:
            continue
        corrupted = split == "out_of_domain"
        for key, name in MODEL_INDEX_METRICS.items():
            value = _percent(metrics[split][key])
            if value is None:
                continue
            results.append(EvalResult(
                task_type="object-detection", task_name="Object Detection", dataset_type=dataset["type"],
                dataset_name=f"{dataset['name']} ({title})", dataset_config="corrupted" if corrupted else "clean",
                dataset_split=dataset["split"], metric_type=key, metric_name=f"{name} (%)", metric_value=value))
    return results


def _lookup(values: dict, key: str):
    """``values[key]``, a dotted key reading a nested dict; ``None`` when absent."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def results_table(metrics: dict, score_threshold: float) -> str:
    splits = [split for split in SPLITS if split in metrics]
    rows = []
    for key, name in TABLE_METRICS.items():
        if any(_lookup(metrics[split], key) is not None for split in splits):
            cells = [None if _lookup(metrics[split], key) is None else _percent(_lookup(metrics[split], key))
                     for split in splits]
            rows.append((name, *("n/a" if cell is None else f"{cell:.2f}" for cell in cells)))
    for key, name in (("num_detections", f"detections kept (score >= {score_threshold})"),
                      ("num_images_evaluated", "images evaluated"), ("num_images", "images")):
        if all(key in metrics[split] for split in splits):
            rows.append((name, *(metrics[split][key] for split in splits)))
    return _table(("metric", *(SPLITS[split] for split in splits)), rows)


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="np") as weights:
            names = weights.keys()  # a safe_open handle, not a dict
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    return total


def _backbone(config: dict) -> str:
    backbone = config.get("backbone_config") or {}
    if backbone:
        parts = [backbone.get("model_type", "custom")]
        for key in ("layer_type", "hidden_sizes", "depths"):
            if key in backbone:
                parts.append(f"{key.replace('_', ' ')} {backbone[key]}")
        return ", ".join(str(part) for part in parts)
    name = config.get("backbone") or "unspecified"
    return f"timm `{name}`" if config.get("use_timm_backbone") else f"`{name}`"


def model_table(config: dict, model_dir: Path, image_size: str) -> str:
    labels = config.get("id2label", {})
    names = ", ".join(str(labels[key]) for key in sorted(labels, key=lambda k: int(k)))
    rows = [("architecture", f"`{config['architectures'][0]}` (model_type `{config['model_type']}`)"),
            ("backbone", _backbone(config))]
    layers = [f"{config[key]} {key.split('_')[0]}" for key in ("encoder_layers", "decoder_layers") if key in config]
    if "d_model" in config:
        rows.append(("transformer", f"d_model {config['d_model']}, " + " / ".join(layers) + " layers"))
    for key, name in (("num_queries", "queries"), ("num_feature_levels", "feature levels"),
                      ("with_box_refine", "box refinement"), ("two_stage", "two-stage")):
        if key in config:
            value = config[key]
            rows.append((name, ("yes" if value else "no") if isinstance(value, bool) else value))
    rows += [("classes", f"{len(labels)}: {names}"), ("input size", image_size),
             ("parameters", f"{_parameter_count(model_dir) / 1e6:.2f} M")]
    return _table(("setting", "value"), rows)


def cal_table(config: dict) -> str | None:
    if not calibration_is_on(config):
        return None
    notes = {"uncertainty_modulation": MODULATION_FORMULAS.get(config["uncertainty_modulation"], ""),
             "modulate_at_inference": ("the returned logits are modulated at inference too"
                                       if config["modulate_at_inference"] else "raw logits at inference"),
             "use_logit_mixing": "the logit-mixing regulariser `L_R`",
             "logit_mixing_alpha": "alpha of the mixed logits and the smoothed targets",
             "logit_mixing_loss_coefficient": "lambda in `L = L_det + lambda * L_R`",
             "num_boxes_normalization": "what the box losses were divided by across processes"}
    return _table(("field", "value", "meaning"), [(f"`{field}`", f"`{config[field]}`", notes[field])
                                                 for field in CAL_FIELDS if field in config])


def training_table(run: dict, dataset: dict) -> str:
    arguments = run["arguments"]
    start = arguments.get("model_name_or_path")
    start = f"`{start}`" if start else f"random (preset `{arguments.get('model_preset')}`, no pretrained weights)"
    processes, accumulation = run.get("num_processes", 1), arguments.get("gradient_accumulation_steps", 1)
    per_device = arguments.get("per_device_train_batch_size")
    batch = f"{per_device} per device x {processes} process(es) x {accumulation} accumulation"
    if isinstance(per_device, int):
        batch += f" = {per_device * processes * accumulation}"
    rows = [("method", f"`{run['method']}`"), ("initialisation", start), ("data", dataset["description"]),
            ("optimizer steps", run.get("train_steps", "not recorded")), ("batch", batch),
            ("optimizer", (f"AdamW, learning rate {arguments.get('learning_rate')}, weight decay "
                           f"{arguments.get('weight_decay')}, gradient clipping {arguments.get('max_grad_norm')}")),
            ("schedule", f"{arguments.get('lr_scheduler_type')}, {arguments.get('num_warmup_steps')} warm-up steps"),
            ("augmentation", "scale/translation jitter" if arguments.get("augment") else "none"),
            ("seed", arguments.get("seed"))]
    if arguments.get("config_overrides"):
        rows.insert(2, ("config overrides", f"`{arguments['config_overrides']}`"))
    if "train_seconds" in run:
        rows.append(("training time", f"{run['train_seconds']} s"))
    return _table(("setting", "value"), rows)


def summary(config: dict, architecture: str, dataset: dict) -> str:
    """What the model is, from the config (the truth), not from the method's name."""
    head = f"A {architecture} object detector trained on {dataset['short']}"
    if not calibration_is_on(config):
        return (f"{head}, without Cal-DETR: the stock transformers model, trained with the same recipe as its "
                "Cal-DETR counterparts, as the baseline to compare calibration against.")
    parts = []
    if config["uncertainty_modulation"] == "multiplicative":
        parts.append("the paper's uncertainty-guided logit modulation (in training, the final decoder layer's "
                     "logits are scaled by the certainty `1 - tanh(U)`, `U` being each logit's variance across "
                     "the decoder layers)")
    elif config["uncertainty_modulation"] == "subtractive":
        parts.append("the released code's subtractive uncertainty modulation (in training, `tanh(U)` is "
                     "subtracted from the final decoder layer's logits, `U` being each logit's variance across "
                     "the decoder layers)")
    if config["use_logit_mixing"]:
        parts.append(f"the logit-mixing regulariser (alpha {config['logit_mixing_alpha']}, weight "
                     f"{config['logit_mixing_loss_coefficient']})")
    what = " and ".join(parts) if parts else "the Cal-DETR machinery switched off (no modulation, no mixing)"
    return (f"{head}, with Cal-DETR (Munir et al., NeurIPS 2023), train-time calibration of detection "
            f"transformers: {what}.")


def _fit_description(fitted_on: dict | None) -> str:
    if not fitted_on:
        return "held-out detections"
    count = fitted_on.get("images", fitted_on.get("num_images"))
    parts = [f"{count} images" if count is not None else None, fitted_on.get("source") or fitted_on.get("split")]
    return ", ".join(part for part in parts if part) or "held-out detections"


def inference_note(config: dict, architecture: str, metrics: dict | None = None) -> str:
    """Which scores the stock model (pipeline, Hub widget) returns, and whether the results table shows them."""
    folded = config.get("folded_calibration")
    if folded:
        kinds = " then ".join(f"{'class-wise ' if record.get('class_wise') else ''}{record['kind']}"
                              for record in folded)
        fitted_on = folded[-1].get("fitted_on") or {}
        # train.py records a "source": its calibration images are neither training nor evaluation images.
        held_out = ": neither training nor evaluation images" if "source" in fitted_on else ""
        return (f"**Calibrated scores, with no custom code.** A post-hoc calibrator ({kinds}, fitted on "
                f"{_fit_description(fitted_on)}{held_out}) is folded "
                f"into the final classification head, so the stock {architecture} (the Auto class, "
                "`pipeline(\"object-detection\")`, the Hub widget and an ONNX export) returns the calibrated scores "
                "the results below measure; `config.json` records the fold under `folded_calibration`. The raw "
                "scores, before calibration, are in the second table.")
    calibration = (metrics or {}).get("calibration") or {}
    if "type" in calibration and not calibration.get("folded"):
        return (f"**The Hub widget and the pipeline show the raw scores.** The calibrated results below use the "
                f"post-hoc calibrator in `{CALIBRATOR_FILE}` ({calibration['type']}), which is not an affine map of "
                "the logits and so cannot be folded into the weights: apply it to the pipeline's output with "
                "`hf_caldetr.calibrate_pipeline_outputs` (see below). The raw scores are in the second table.")
    if config.get("modulate_at_inference"):
        return ("**Note:** this model was saved with `modulate_at_inference=True`: the Cal class modulates its "
                "logits at inference and the metrics below were measured that way, but the stock transformers "
                "model (the widget, the pipeline, the Auto class) returns the raw logits, so its scores differ.")
    return (f"At inference it is an ordinary {architecture}: the checkpoint is a stock transformers one, and the "
            "stock model returns exactly the scores the metrics below were measured on.")


def limitations(metrics: dict, dataset: dict, score_threshold: float) -> list[str]:
    items = []
    for split, title in SPLITS.items():
        if split in metrics and any(_percent(metrics[split][key]) is None for key in REQUIRED_METRIC_KEYS):
            items.append(f"{title.capitalize()}: {metrics[split].get('num_detections', 'too few')} detections scored "
                         f"at least {score_threshold}, so the calibration errors are undefined there (n/a): the "
                         "model's scores stay below the protocol's threshold.")
    if dataset["type"] == "digit-scenes":
        items.append("Trained on small synthetic scenes of handwritten digits: a demonstration of the method and the "
                     "tooling, not a detector for real images.")
    evaluated = metrics["in_domain"].get("num_images_evaluated", metrics["in_domain"].get("num_images"))
    if isinstance(evaluated, int) and evaluated < 1000:
        items.append(f"The metrics come from {evaluated} evaluation images and one training run (one seed): "
                     "differences of a point or two are within noise.")
    if "out_of_domain" not in metrics:
        items.append("Not evaluated out of domain (the run skipped the corrupted copy).")
    return items


def protocol() -> dict:
    """The evaluation protocol's settings, read from the metric the training script used (its defaults)."""
    from .evaluation import TOP_K
    from .metrics import DetectionCalibrationMetric

    metric = DetectionCalibrationMetric()
    return {"top_k": TOP_K, "score_threshold": metric.score_threshold, "iou_threshold": metric.iou_threshold,
            "num_bins": metric.num_bins, "laece_bins": metric.laece_bins, "position_bins": metric.position_bins,
            "include_images_without_gt": metric.include_images_without_gt}


# --------------------------------------------------------------------------------------------- card rendering


def check_template(template: str, available: set[str], source: str) -> None:
    """Raise when ``template`` does not parse, uses a field the card does not provide, or lacks a required one."""
    import jinja2
    from jinja2 import meta

    try:
        used = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError as error:
        raise HubExportError(f"card template {source}, line {error.lineno}: {error.message}") from None
    unknown = sorted(used - available)
    if unknown:
        raise HubExportError(f"card template {source} uses field(s) {unknown} that the card does not provide; "
                             f"available: {sorted(available)}")
    missing = [field for field in REQUIRED_TEMPLATE_FIELDS if field not in used]
    if missing:
        raise HubExportError(f"card template {source} lacks the required field(s) {missing} "
                             f"(write them as {{{{ {missing[0]} }}}}): the card would miss them")


def render_model_card(model_dir, repo_id: str | None = None, template_path=None, license: str = "apache-2.0",
                      model_name: str | None = None, datasets: list[str] | None = None,
                      base_model: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) of a trained folder.

    Args:
        model_dir: a folder written by ``examples/train.py`` (checked with ``check_folder``).
        repo_id: the Hub id the card is for: the usage snippets and the widget's image URL use it. Without it the
            snippets show a local path and the widget points at the file name.
        template_path: a Jinja template; the packaged ``hub_cards/model_card.md`` by default.
        license, model_name: card metadata (``model_name`` defaults to the repo's or the folder's name).
        datasets, base_model: override what the run's arguments say (``dataset_name``, ``model_name_or_path``
            when they are Hub ids).
    """
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    model_dir = Path(model_dir)
    config, metrics = check_folder(model_dir)
    template_path = Path(template_path) if template_path else TEMPLATE_PATH
    if not template_path.is_file():
        raise HubExportError(f"card template {template_path} does not exist")
    if repo_id is not None:
        check_repo_id(repo_id)
    run, dataset = metrics["run"], dataset_info(metrics["run"]["arguments"])
    start = run["arguments"].get("model_name_or_path")
    base_model = base_model or (start if start and not _is_local(start) else None)
    datasets = datasets if datasets is not None else ([dataset["hub_id"]] if dataset["hub_id"] else None)
    architecture, citation = ARCHITECTURES.get(config["model_type"], (config["model_type"], ""))
    family = MODEL_FAMILIES.get(config["model_type"])
    cal_class = family.cal_model_class.__name__ if family is not None else None
    is_cal = calibration_is_on(config)
    tags = (["cal-detr"] if is_cal else ["cal-detr-baseline"]) + ["calibration", "object-detection",
                                                                   config["model_type"].replace("_", "-")]
    name = model_name or (repo_id.split("/")[-1] if repo_id else model_dir.resolve().name)
    extra = {}
    if (model_dir / EXAMPLE_IMAGE).is_file():
        source = (f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE}" if repo_id else EXAMPLE_IMAGE)
        extra["widget"] = [{"src": source, "example_title": f"{dataset['name']} ({dataset['split']} image)"}]
    card_data = ModelCardData(model_name=name, license=license, library_name="transformers",
                              pipeline_tag="object-detection", tags=tags, datasets=datasets, base_model=base_model,
                              eval_results=eval_results(metrics, dataset) or None, **extra)
    processor = _read_json(model_dir / "preprocessor_config.json")
    size = processor.get("size") or {}
    image_size = (f"{size['height']}x{size['width']} (resized by the image processor)" if "height" in size
                  else f"resized by the image processor: {size}")
    settings = protocol()
    fields = {
        "model_name": name, "model_id": repo_id or f"path/to/{name}",
        "summary": summary(config, architecture, dataset),
        "inference_note": inference_note(config, architecture, metrics),
        "architecture": architecture, "architecture_class": config["architectures"][0],
        "architecture_citation": citation, "cal_class": cal_class, "is_cal": is_cal,
        "model_table": model_table(config, model_dir, image_size), "cal_table": cal_table(config),
        "training_table": training_table(run, dataset),
        "results_table": results_table(metrics, settings["score_threshold"]),
        "raw_results_table": (results_table(metrics["before_calibration"], settings["score_threshold"])
                              if metrics.get("before_calibration") else None),
        "reliability_diagram": RELIABILITY_DIAGRAM if (model_dir / RELIABILITY_DIAGRAM).is_file() else None,
        "corruption_manifest": CORRUPTION_MANIFEST if (model_dir / CORRUPTION_MANIFEST).is_file() else None,
        "out_of_domain": "out_of_domain" in metrics, "protocol": settings,
        "calibrator": calibrator_note(model_dir, config),
        "limitations": limitations(metrics, dataset, settings["score_threshold"]), "library_version": __version__,
        "transformers_version": config.get("transformers_version", transformers.__version__),
    }
    template = template_path.read_text(encoding="utf-8")
    # ModelCard.from_template also passes the card data's own keys (license, tags, ...) to the template.
    check_template(template, {"card_data", *fields, *card_data.to_dict()}, str(template_path))
    return ModelCard.from_template(card_data, template_str=template, **fields)


CALIBRATOR_FILE = "calibrator.json"


def calibrator_note(model_dir: Path, config: dict | None = None) -> str | None:
    """A card paragraph for a post-hoc calibrator travelling with the checkpoint (``calibrator.json``), or None."""
    path = Path(model_dir) / CALIBRATOR_FILE
    if not path.is_file():
        return None
    from .calibrators import load_calibrator

    calibrator = load_calibrator(path)
    kind = type(calibrator).__name__
    scope = "class-wise" if calibrator.class_wise else "class-agnostic"
    metrics = _read_json(Path(model_dir) / "metrics.json") if (Path(model_dir) / "metrics.json").is_file() else {}
    calibration = metrics.get("calibration") or {}
    if (config or {}).get("folded_calibration") and calibration.get("folded"):
        return (f"`{CALIBRATOR_FILE}` ({kind}, {scope}) is the map folded into the weights, kept as a record of "
                "what was fitted: the model's scores are already calibrated, do not apply it again.")
    if "type" in calibration and not calibration.get("folded"):
        return (f"`{CALIBRATOR_FILE}` ({kind}, {scope}) gives the calibrated scores of the results above. Run the "
                "pipeline with `threshold=0.0`, then `hf_caldetr.calibrate_pipeline_outputs(detections, "
                f"hf_caldetr.calibrators.load_calibrator(\"{CALIBRATOR_FILE}\"), detector.model.config.label2id, "
                "threshold=0.3)`.")
    return (f"This repository also holds a post-hoc calibrator, `{CALIBRATOR_FILE}` ({kind}, {scope}), fitted on "
            "held-out detections. The model's own scores are not changed by it: apply it to the post-processed "
            "scores with `hf_caldetr.calibrators.load_calibrator(path).transform(scores, labels)`, or evaluate with "
            f"`examples/evaluate.py --calibrator {CALIBRATOR_FILE}`. The results above are without it.")


def write_model_card(model_dir, repo_id: str | None = None, path=None, **options) -> Path:
    """Render the card (see ``render_model_card`` for the options) and save it: ``model_dir/README.md``, or
    ``path``."""
    card = render_model_card(model_dir, repo_id=repo_id, **options)
    path = Path(path) if path else Path(model_dir) / CARD_FILE
    card.save(path)
    return path


def save_widget_example(dataset, model_dir, filename: str = EXAMPLE_IMAGE, scan: int = 50) -> Path:
    """Save an example image for the Hub widget: among the first ``scan`` rows of a detection-schema dataset, the
    one with the most objects (the first such)."""
    import numpy as np
    from PIL import Image

    from .data.schema import objects_as_columns

    if len(dataset) == 0:
        raise ValueError("save_widget_example needs a non-empty dataset")
    counts = [len(objects_as_columns(dataset[index]["objects"])["bbox"]) for index in range(min(scan, len(dataset)))]
    image = dataset[int(np.argmax(counts))]["image"]
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    path = Path(model_dir) / filename
    image.convert("RGB").save(path)
    return path


# --------------------------------------------------------------------------------------------------- upload


def _is_checkpoint(path: Path) -> bool:
    prefix, _, number = path.name.partition("_")
    return (path / "progress.json").is_file() or (prefix in ("step", "epoch") and number.isdigit())


def _is_tracker_log(path: Path) -> bool:
    return any(path.rglob("events.out.tfevents*"))


def classify_entries(model_dir) -> list[tuple[Path, str]]:
    """Every top-level entry of ``model_dir`` with its kind: ``file``, ``checkpoint``, ``partial checkpoint`` (no
    ``progress.json``: interrupted while being written, never uploaded), ``logs``, ``hidden`` or ``other folder``."""
    entries = []
    for path in sorted(Path(model_dir).iterdir()):
        if path.name.startswith("."):
            kind = "hidden"
        elif path.is_file():
            kind = "file"
        elif _is_checkpoint(path):
            # progress.json is written last: without it the checkpoint was cut short and is never uploaded.
            kind = "checkpoint" if (path / "progress.json").is_file() else "partial checkpoint"
        elif _is_tracker_log(path):
            kind = "logs"
        else:
            kind = "other folder"
        entries.append((path, kind))
    return entries


def hub_files(model_dir, include_checkpoints: bool = False, include_logs: bool = False) -> list[tuple[Path, str]]:
    """``(local path, path in the repo)`` of every file a push uploads, sorted by repo path.

    The folder's top-level files, plus the checkpoint folders (``include_checkpoints``) and the tracker logs
    (``include_logs``; the Hub shows tensorboard event files in a "Training metrics" tab) when asked. Hidden
    entries and other folders are never uploaded.
    """
    model_dir = Path(model_dir)
    wanted = {"file"} | ({"checkpoint"} if include_checkpoints else set()) | ({"logs"} if include_logs else set())
    files = []
    for path, kind in classify_entries(model_dir):
        if kind not in wanted:
            continue
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files.append((file, file.relative_to(model_dir).as_posix()))
    return sorted(files, key=lambda pair: pair[1])


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[Path, str]]
    private: bool
    dry_run: bool
    commit_url: str | None = None


def push_folder(model_dir, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None,
                include_checkpoints: bool = False, include_logs: bool = False, commit_message: str | None = None,
                revision: str | None = None, **card_options) -> PushResult:
    """Refresh the card of ``model_dir`` for ``repo_id``, then create the repo (if needed) and upload the folder.

    A thin call to ``huggingface_hub.create_repo`` + ``upload_folder``, restricted by ``allow_patterns`` to
    exactly ``hub_files(...)``. Every check (folder, metrics, template, repo id, token) runs first: on any error
    nothing is uploaded. ``dry_run`` checks and renders the card but uploads nothing; it needs no token.
    ``private`` applies when the repo is created; an existing repo keeps its visibility. ``card_options`` go to
    ``render_model_card``.
    """
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    model_dir = Path(model_dir)
    check_repo_id(repo_id)
    write_model_card(model_dir, repo_id=repo_id, **card_options)
    files = hub_files(model_dir, include_checkpoints=include_checkpoints, include_logs=include_logs)
    if dry_run:
        return PushResult(repo_id, files, private, dry_run=True)
    token = token or huggingface_hub.get_token()
    if not token:
        raise LocalTokenNotFoundError(
            f"no Hugging Face token to push {model_dir} to {repo_id}: log in with `hf auth login`, set the HF_TOKEN "
            "environment variable, or pass token=...; nothing was uploaded")
    huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=str(model_dir), token=token, revision=revision,
        commit_message=commit_message or "Upload Cal-DETR model folder (hf_caldetr)",
        # glob.escape: a file name with [ ] * ? must match itself only.
        allow_patterns=[glob.escape(path_in_repo) for _, path_in_repo in files])
    return PushResult(repo_id, files, private, dry_run=False, commit_url=getattr(commit, "commit_url", None))
