"""Cal-DETR's calibration gain in miniature: every arm trained alike, measured alike, reported as measured.

    python benchmarks/calibration.py --smoke                  # (= --size smoke) a few minutes on a CPU: checks the pipeline
    python benchmarks/calibration.py --size cpu               # train.py's default budget, 5 arms x 3 seeds
    python benchmarks/calibration.py --size gpu               # one GPU, a larger model and images
    python benchmarks/calibration.py --arms baseline cal-detr --seeds 0 1 -- --learning_rate 3e-4

Each (arm, seed) is one ``examples/train.py`` run into ``<work_dir>/<arm>/seed_<s>/``, with the same arguments
but ``--method`` and ``--seed``. Arguments after ``--`` go to every run after the size's own, so they override
them. A run whose ``metrics.json`` exists is reused (an interrupted benchmark resumes), unless it was made with
other arguments, which stops the benchmark.

From those folders it reports, per arm, the mean, standard deviation and range over seeds of AP, AP50, D-ECE and
LaECE in-domain and out-of-domain (the corrupted copy); each arm's mean D-ECE relative to the baseline's; issue
7's goal, met or not met; post-hoc rows (temperature scaling, Platt scaling and isotonic regression fitted on fresh scenes of
the train split, never the evaluation split) on the baseline and Cal-DETR models; a reliability diagram of both
(first seed). The saved models are re-evaluated for the diagram and the post-hoc rows, since ``metrics.json``
holds no bins; each re-evaluation is kept in the run's ``posthoc.json``, so runs carried to another machine by
``benchmarks/run_records.py`` (their record files, not their models) are reported without training them again.
Output: ``benchmarks/results/<name>.md`` and ``<name>_reliability.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from hf_caldetr.configuration import METHOD_FIELDS

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"
ARMS = ("baseline", "cal-detr", "released", "modulation-only", "mixing-only")
SPLITS = ("in_domain", "out_of_domain")
SPLIT_NAMES = {"in_domain": "in-domain", "out_of_domain": "out-of-domain"}
METRICS = ("d_ece", "map", "map_50", "laece")
# The post-hoc rows stacked on a trained model, in this order (each a class-agnostic calibrator, fitted on held-out
# scenes), and the metrics reported for them: the fixed-cut ones (train.py's metrics.json holds them for the raw
# rows) and the LRP-optimal-threshold protocol's (Kuzucu et al.; the re-evaluation measures them).
STACKED = ("temperature scaling", "Platt scaling", "isotonic regression")
THRESHOLD_KEY = "at_lrp_optimal_thresholds"
FIXED_METRICS = ("d_ece", "map", "map_50", "laece", "olrp", "oce", "laece_0")
THRESHOLD_METRICS = (f"{THRESHOLD_KEY}.laece_0", f"{THRESHOLD_KEY}.lrp")
REPORT_METRICS = FIXED_METRICS + THRESHOLD_METRICS
# Issue 7's goal: Cal-DETR's mean D-ECE at most this fraction of the baseline's (the paper: 0.66x and 0.82x) ...
GOAL_D_ECE_RATIO = {"in_domain": 0.75, "out_of_domain": 0.85}
# ... with its AP at most one point (0.01) below the baseline's; and a baseline below this AP50 is no detector.
GOAL_AP_DROP = 0.01
MEANINGFUL_AP50 = 0.5
POST_HOC_ARMS = ("baseline", "cal-detr")
# A saved model's re-evaluation is kept in its run folder (benchmarks/run_records.py carries it to another machine).
POSTHOC_FILE = "posthoc.json"
POSTHOC_VERSION = 1  # bump when the re-evaluation changes, so every posthoc.json is redone
RELIABILITY_KEYS = ("d_ece", "bin_counts", "bin_precisions", "bin_confidences", "bin_edges")
# Arguments of train.py that may differ between runs of one benchmark; everything else must match.
PER_RUN_ARGUMENTS = ("method", "seed", "output_dir")
def settings_text(config: dict) -> str:
    """The Cal settings a run trained with, read from its ``config.json`` (the field names: the config mixin's)."""
    if not any(name in config for name in METHOD_FIELDS):
        return "stock model"
    if config.get("uncertainty_modulation", "none") == "none" and not config.get("use_logit_mixing", False):
        return "method off (the stock loss)"
    return ", ".join(f"{k}={config[k]}" for k in METHOD_FIELDS if k != "modulate_at_inference" and k in config)


# train.py's Cal settings, which ``--cal_settings`` may set on the Cal arms (never the stock baseline).
CAL_SETTINGS = ("logit_mixing_alpha", "logit_mixing_loss_coefficient")


@dataclass(frozen=True)
class Size:
    """A budget: train.py arguments, the default seeds, and the images the post-hoc calibrators are fitted on."""

    train_args: tuple[str, ...]
    seeds: tuple[int, ...]
    calibration_images: int


SIZES = {
    # Checks the pipeline only: 50 steps of the tiny model detect nothing yet.
    "smoke": Size(("--model_preset", "tiny", "--max_train_steps", "50", "--num_warmup_steps", "10",
                   "--num_train_images", "128", "--num_validation_images", "32",
                   "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16"), (0,), 64),
    # train.py's defaults: the small preset, 3000 steps of batch 8 at 96x96.
    "cpu": Size((), (0, 1, 2), 500),
    # One GPU: a wider model at 128x128, batch 32. Not yet timed on a GPU: aimed at about two minutes a run, so
    # check the first run's train_seconds in its metrics.json.
    "gpu": Size(("--model_preset", "small", "--image_size", "128", "--num_train_images", "8000",
                 "--config_overrides", "d_model=128,encoder_ffn_dim=512,decoder_ffn_dim=512,num_queries=30",
                 "--max_train_steps", "1500", "--per_device_train_batch_size", "32",
                 "--per_device_eval_batch_size", "64", "--dataloader_num_workers", "8"), (0, 1, 2), 500),
}


# ------------------------------------------------------------------------------------------------ training runs


def parse_cal_settings(items) -> dict[str, float]:
    """``["logit_mixing_loss_coefficient=1.0", ...]`` -> ``{name: value}``; only ``CAL_SETTINGS`` names."""
    settings = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or name not in CAL_SETTINGS:
            raise ValueError(f"--cal_settings takes NAME=VALUE with NAME one of {CAL_SETTINGS}, got {item!r}")
        try:
            settings[name] = float(value)
        except ValueError:
            raise ValueError(f"--cal_settings {item!r}: {value!r} is not a number") from None
    return settings


def arm_settings(arm: str, cal_settings: dict | None) -> dict:
    """The Cal settings a run of ``arm`` gets: none for the stock baseline."""
    return {} if arm == "baseline" or not cal_settings else dict(sorted(cal_settings.items()))


def run_folder(work_dir, arm: str, seed: int, cal_settings: dict | None = None) -> Path:
    """``<work_dir>/<arm>/seed_<s>``; a Cal arm with settings gets ``<arm>@name=value,...`` so runs with other
    settings never share a folder."""
    settings = arm_settings(arm, cal_settings)
    name = arm + ("@" + ",".join(f"{k}={v:g}" for k, v in settings.items()) if settings else "")
    return Path(work_dir) / name / f"seed_{seed}"


def train_arguments(arm: str, seed: int, output_dir, train_args, cal_settings: dict | None = None) -> list[str]:
    """train.py's arguments for one run; method, seed and folder last, so nothing passed through overrides them."""
    settings = [token for name, value in arm_settings(arm, cal_settings).items()
                for token in (f"--{name}", f"{value:g}")]
    # --calibrator none: each arm is measured as trained; the post-hoc rows fit their calibrators separately.
    return [*train_args, *settings, "--report_to", "none", "--calibrator", "none", "--method", arm, "--seed",
            str(seed), "--output_dir", str(output_dir)]


def comparable(arguments: list[str]) -> list[str]:
    """train.py arguments with the output folder resolved, so a relative and an absolute spelling of one work dir
    compare equal."""
    return [str(Path(value).resolve()) if previous == "--output_dir" else value
            for previous, value in zip([None, *arguments], arguments)]


def ensure_run(arm: str, seed: int, work_dir, train_args, cal_settings: dict | None = None, folder=None,
               resume: bool = False) -> bool:
    """Train (arm, seed) unless its ``metrics.json`` exists; True when it trained. Refuses to reuse a run made
    with other arguments, whose numbers would silently join this benchmark's. ``folder``: the run's folder
    (default ``run_folder(work_dir, arm, seed, cal_settings)``); ``resume``: pass train.py
    ``--resume_from_checkpoint latest``, so an interrupted run continues from its newest complete checkpoint
    (a fresh start when it has none)."""
    folder = Path(folder) if folder is not None else run_folder(work_dir, arm, seed, cal_settings)
    arguments = train_arguments(arm, seed, folder, train_args, cal_settings)
    recorded = folder / "benchmark_arguments.json"
    if (folder / "metrics.json").is_file():
        if recorded.is_file() and comparable(json.loads(recorded.read_text())) != comparable(arguments):
            raise SystemExit(f"{folder} holds a run made with other train.py arguments ({recorded}); pick another "
                             "--work_dir or delete the folder")
        return False
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(arguments))
    # Without a GPU, `--cpu` lets accelerate give the process every physical core (it sets one thread otherwise).
    device = [] if torch.cuda.is_available() else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *device, str(TRAIN_SCRIPT), *arguments,
               *(["--resume_from_checkpoint", "latest"] if resume else [])]
    log_path = folder / "train.log"
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if finished.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"train.py failed for {arm} seed {seed} (exit {finished.returncode}), log {log_path}:\n{tail}")
    return True


def load_runs(work_dir, arms, seeds, cal_settings: dict | None = None) -> dict[str, list[dict]]:
    """``{arm: [metrics.json of each seed]}``, after checking that the runs differ only in method, seed and the
    Cal arms' ``--cal_settings``."""
    runs = {arm: [json.loads((run_folder(work_dir, arm, seed, cal_settings) / "metrics.json").read_text())
                  for seed in seeds] for arm in arms}
    check_same_budget([metrics for arm_runs in runs.values() for metrics in arm_runs])
    return runs


def check_same_budget(all_metrics: list[dict]) -> None:
    """Every run must share train.py's arguments except ``PER_RUN_ARGUMENTS``: else the comparison is unfair."""
    shared = [{k: v for k, v in m["run"]["arguments"].items() if k not in (*PER_RUN_ARGUMENTS, *CAL_SETTINGS)}
              for m in all_metrics]
    differing = sorted({key for arguments in shared for key in arguments
                        if any(other.get(key) != arguments.get(key) for other in shared)})
    if differing:
        raise ValueError(f"the runs were trained with different arguments ({differing}): not a fair comparison")


# --------------------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Spread:
    """One metric over seeds: mean, sample standard deviation (NaN for one seed), range, count."""

    mean: float
    std: float
    low: float
    high: float
    count: int


def spread(values) -> Spread:
    values = np.asarray(values, dtype=float)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return Spread(float(np.mean(values)), std, float(np.min(values)), float(np.max(values)), len(values))


def aggregate(runs: dict[str, list[dict]], metrics=METRICS) -> dict[str, dict[str, dict[str, Spread]]]:
    """``{row: {split: {metric: Spread}}}`` over each row's runs (``metrics.json``-shaped dicts), for the splits
    every run of the row has; ``metrics``: the keys aggregated (default ``METRICS``)."""
    summary = {}
    for row, row_runs in runs.items():
        splits = [split for split in SPLITS if all(split in run for run in row_runs)]
        summary[row] = {split: {metric: spread([run[split][metric] for run in row_runs])
                                for metric in metrics} for split in splits}
    return summary


def d_ece_ratio(summary, row: str, split: str, reference: str = "baseline") -> float:
    """``row``'s mean D-ECE over ``reference``'s; NaN when either is missing or the reference's is 0."""
    if split not in summary.get(row, {}) or split not in summary.get(reference, {}):
        return float("nan")
    base = summary[reference][split]["d_ece"].mean
    return summary[row][split]["d_ece"].mean / base if base > 0 else float("nan")


@dataclass(frozen=True)
class Goal:
    verdict: str  # "met", "not met" or "not evaluated"
    checks: tuple[tuple[str, bool], ...]
    baseline_meaningful: bool | None


def judge_goal(summary) -> Goal:
    """Issue 7's goal on the means over seeds: Cal-DETR's D-ECE at most 0.75x the baseline's in-domain and 0.85x
    out-of-domain, and its AP (COCO AP@[.5:.95]) at most one point below the baseline's in both splits."""
    if "baseline" not in summary or "cal-detr" not in summary:
        return Goal("not evaluated", (("the baseline and cal-detr arms are both needed", False),), None)
    checks = []
    for split in SPLITS:
        if split not in summary["baseline"] or split not in summary["cal-detr"]:
            checks.append((f"{SPLIT_NAMES[split]}: not measured", False))
            continue
        base, cal = summary["baseline"][split], summary["cal-detr"][split]
        ratio = d_ece_ratio(summary, "cal-detr", split)
        checks.append((f"D-ECE {SPLIT_NAMES[split]}: Cal-DETR {pct(cal['d_ece'].mean)} vs baseline "
                       f"{pct(base['d_ece'].mean)} = {ratio:.2f}x (goal <= {GOAL_D_ECE_RATIO[split]}x)",
                       bool(ratio <= GOAL_D_ECE_RATIO[split])))
        change = cal["map"].mean - base["map"].mean
        checks.append((f"AP {SPLIT_NAMES[split]}: Cal-DETR {pct(cal['map'].mean)} vs baseline {pct(base['map'].mean)}"
                       f" ({100 * change:+.2f} points; goal: at most 1 point lower)",
                       bool(change >= -GOAL_AP_DROP - 1e-12)))
    measured = all(split in summary["baseline"] and split in summary["cal-detr"] for split in SPLITS)
    verdict = "not evaluated" if not measured else "met" if all(ok for _, ok in checks) else "not met"
    in_domain = summary["baseline"].get("in_domain")
    meaningful = None if in_domain is None else bool(in_domain["map_50"].mean >= MEANINGFUL_AP50)
    return Goal(verdict, tuple(checks), meaningful)


# ------------------------------------------------------------------------------------- re-evaluation, post hoc


def data_arguments(arguments: dict):
    """The ``DataArguments`` a run was trained with, from its recorded train.py arguments."""
    from hf_caldetr.data.arguments import DataArguments

    return DataArguments(**{f.name: arguments[f.name] for f in fields(DataArguments) if f.name in arguments})


def evaluation_data(arguments: dict, num_calibration_images: int, calibration_seed: int | None,
                    calibration_split: str | None = None):
    """The runs' evaluation splits (``{split: dataset}``, as train.py built them) and the calibration images
    (fresh train-split scenes, or a seeded subset of the train split, or of the Hub dataset split
    ``calibration_split``; ``None`` without ``calibration_seed``)."""
    from hf_caldetr.data import corrupt_dataset
    from hf_caldetr.data.arguments import load_calibration_split, load_splits

    data_args = data_arguments(arguments)
    (validation,) = load_splits(data_args, ("validation",))
    datasets = {"in_domain": validation}
    if not data_args.skip_out_of_domain:
        datasets["out_of_domain"], _ = corrupt_dataset(validation, base_seed=data_args.corruption_seed)
    calibration = None if calibration_seed is None else load_calibration_split(
        data_args, calibration_split, num_calibration_images, calibration_seed)
    return datasets, calibration


def default_calibrators() -> dict:
    """The post-hoc rows (``STACKED``): class-agnostic temperature scaling, Platt scaling and isotonic regression,
    unfitted."""
    from hf_caldetr.calibrators import IsotonicCalibrator, PlattScaling, TemperatureScaling

    return dict(zip(STACKED, (TemperatureScaling(), PlattScaling(), IsotonicCalibrator())))


def flat(summary: dict) -> dict:
    from hf_caldetr.evaluation import flatten_summary

    return flatten_summary(summary)


def row_values(metrics: dict | None, posthoc: dict, row: str) -> dict:
    """``{split: {metric: value}}`` (``REPORT_METRICS``) of one model's row: train.py's ``metrics.json`` for the raw
    row's fixed-cut metrics, ``posthoc.json`` for the rest (the raw row's LRP-threshold protocol, every stacked row);
    NaN where neither holds a metric."""
    values = {}
    for split in SPLITS:
        if split not in posthoc["rows"].get(row, {}):
            continue
        measured = flat(posthoc["rows"][row][split])
        if row == "raw" and metrics is not None:
            measured.update({key: value for key, value in flat(metrics[split]).items() if key in FIXED_METRICS})
        values[split] = {key: float(measured.get(key, float("nan"))) for key in REPORT_METRICS}
    return values


def recorded_rows(work_dir, arms, seeds, runs: dict, missing_hint: str | None = None):
    """The report's rows of the recorded runs, from each model's ``posthoc.json``.

    Returns ``(rows, notes, records)``: ``rows`` maps each row (``arm``: the model's own scores; ``arm + calibrator``
    for each of ``STACKED``) to ``[(seed, folder, row_values), ...]``, in the report's order (the arms, then their
    stacked rows arm by arm); ``notes`` are the records' notes and the calibrators that could not be fitted;
    ``records`` the post-hoc records by arm, in seed order. ``runs``: ``load_runs``'s metrics of the same arms and
    seeds. A missing record stops with its path and ``missing_hint``.
    """
    rows, notes, records = {}, [], {arm: [] for arm in arms}
    for arm in arms:
        for seed, metrics in zip(seeds, runs[arm]):
            folder = run_folder(work_dir, arm, seed)
            path = folder / POSTHOC_FILE
            if not path.is_file():
                raise SystemExit(f"{path} is missing" + (f": {missing_hint}" if missing_hint else ""))
            posthoc = json.loads(path.read_text())
            records[arm].append(posthoc)
            notes += posthoc["notes"] + [f"{arm} seed {seed}: {name} not fitted: {why}"
                                         for name, why in posthoc["failures"].items()]
            for row in ("raw", *STACKED):
                if row in posthoc["rows"]:
                    rows.setdefault(arm if row == "raw" else f"{arm} + {row}", []).append(
                        (seed, folder, row_values(metrics, posthoc, row)))
    order = [*arms, *[f"{arm} + {row}" for arm in arms for row in STACKED]]
    return {row: rows[row] for row in order if row in rows}, notes, records


def reevaluate(folder, datasets: dict, calibration_dataset, batch_size: int) -> tuple[dict, dict]:
    """Re-run a saved model over ``datasets``: ``({row: {split: evaluate_model-style result}}, {calibrator:
    why it could not be fitted})``, row ``"raw"`` the model's own scores, the others post-hoc calibrated."""
    results, failures, _ = reevaluate_rows(folder, datasets, calibration_dataset, batch_size)
    return results, failures


def reevaluate_rows(folder, datasets: dict, calibration_dataset, batch_size: int, calibrators: dict | None = None,
                    thresholds: bool = False) -> tuple[dict, dict, dict]:
    """``reevaluate`` with a choice of rows: ``calibrators`` ``{row name: unfitted calibrator}`` (default
    ``default_calibrators()``), each fitted on ``calibration_dataset``'s detections (score >= 0.3, D-ECE matching);
    with ``thresholds``, every row also gets the LRP-optimal-threshold protocol (``at_lrp_optimal_thresholds``):
    per-class thresholds found on ``calibration_dataset``'s detections with that row's scores, never on the
    evaluated splits. Returns ``(results, failures, {row: the class thresholds used})``."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from hf_caldetr.data import make_collate_fn
    from hf_caldetr.evaluation import collect_matches, iter_detections, measure_detections, model_categories

    model = AutoModelForObjectDetection.from_pretrained(folder)
    if getattr(model.config, "modulate_at_inference", False):
        raise ValueError(f"{folder} was measured with modulated logits, which the stock model does not compute")
    processor = AutoImageProcessor.from_pretrained(folder)
    accelerator = Accelerator()
    model = accelerator.prepare_model(model, evaluation_mode=True)

    def loader(dataset):
        return accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=make_collate_fn(processor)))

    fitted, failures, class_thresholds = {}, {}, {}
    categories = model_categories(model, accelerator)  # what LaECE and the other class means average over
    if calibration_dataset is not None:
        outcomes = collect_matches(model, loader(calibration_dataset), processor, accelerator)
        for name, calibrator in (default_calibrators() if calibrators is None else calibrators).items():
            try:
                fitted[name] = calibrator.fit(outcomes.scores, outcomes.matched, outcomes.labels)
            except ValueError as error:
                failures[name] = str(error)
        if thresholds:
            held_out = list(iter_detections(model, loader(calibration_dataset), processor, accelerator,
                                            uncertainties=False))
            class_thresholds = {row: measure_detections(held_out, fitted.get(row), categories=categories,
                                                        compute_ap=False)["lrp_optimal_thresholds"]
                                for row in ("raw", *fitted)}
    results = {row: {} for row in ("raw", *fitted)}
    for split, dataset in datasets.items():
        batches = list(iter_detections(model, loader(dataset), processor, accelerator))
        for row in results:
            results[row][split] = measure_detections(batches, fitted.get(row), categories=categories,
                                                     class_thresholds=class_thresholds.get(row))
    return results, failures, class_thresholds


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ensure_posthoc(folder, get_data, batch_size: int, metrics: dict | None, source: dict,
                   calibrators: dict | None = None, thresholds: bool = False,
                   calibration_name: str = "calibration") -> dict:
    """The re-evaluation of one saved model (``reevaluate_rows``), kept in ``<folder>/posthoc.json`` so that a
    benchmark resumed elsewhere (``benchmarks/run_records.py``) needs the numbers only, not the model. The record
    is reused while its ``source`` (what the re-evaluation depends on: the run's ``metrics.json``, the calibration
    scenes, the rows, ``POSTHOC_VERSION``) is unchanged, and redone otherwise.

    ``get_data()``: ``(datasets, calibration_dataset)``, called only when the model is re-evaluated.
    ``metrics``: train.py's numbers of the run, which the raw row must reproduce (``notes`` says where it does not);
    None where there are none. The record: ``rows`` (``{row: {split: summarize(result)}}``, ``raw`` first),
    ``thresholds``, ``failures``, ``reliability`` (each row's bins, enough for a reliability diagram), ``notes`` and
    ``{calibration_name: {"num_images": ...}}``."""
    folder = Path(folder)
    return cached_record(folder / POSTHOC_FILE, source, lambda: reevaluation_record(
        folder, get_data, batch_size, metrics, source, calibrators, thresholds, calibration_name))


def cached_record(path: Path, source: dict, compute) -> dict:
    """The JSON record at ``path`` while its ``"source"`` equals ``source``; else ``compute()`` (a dict holding
    ``source``), written there and returned. What a run's result depends on goes in ``source``, so a changed input
    redoes it and an unchanged one never does."""
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("source") == source:
            return record
    record = compute()
    path.write_text(json.dumps(record, indent=2))
    return record


def reevaluation_record(folder: Path, get_data, batch_size: int, metrics: dict | None, source: dict,
                        calibrators: dict | None, thresholds: bool, calibration_name: str) -> dict:
    """``ensure_posthoc``'s record, measured."""
    from hf_caldetr.evaluation import summarize

    datasets, calibration_dataset = get_data()
    results, failures, class_thresholds = reevaluate_rows(folder, datasets, calibration_dataset, batch_size,
                                                          calibrators=calibrators, thresholds=thresholds)
    seed = folder.name.split("_")[-1]
    record = {"source": source,
              calibration_name: {"num_images": 0 if calibration_dataset is None else len(calibration_dataset)},
              "rows": {row: {split: summarize(result) for split, result in by_split.items()}
                       for row, by_split in results.items()},
              "thresholds": {row: {str(k): float(v) for k, v in values.items()}
                             for row, values in class_thresholds.items()},
              "failures": failures,
              "reliability": {row: {split: {key: np.asarray(result[key]).tolist() for key in RELIABILITY_KEYS}
                                    for split, result in by_split.items()} for row, by_split in results.items()},
              "notes": reevaluation_notes(folder.parent.name, int(seed) if seed.isdigit() else seed, results["raw"],
                                          metrics) if metrics else []}
    return record


def reevaluation_notes(arm: str, seed: int, raw: dict, metrics: dict) -> list[str]:
    """Where re-evaluating the saved model does not reproduce train.py's numbers (it should, up to float noise)."""
    notes = []
    for split, result in raw.items():
        for key in ("d_ece", "map"):
            if abs(float(result[key]) - metrics[split][key]) > 1e-4:
                notes.append(f"{arm} seed {seed} {SPLIT_NAMES[split]}: re-evaluated {key} {float(result[key]):.4f}, "
                             f"train.py measured {metrics[split][key]:.4f}")
    return notes


# -------------------------------------------------------------------------------------------------------- report


def pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{100 * value:.2f}"


def cell(stat: Spread | None) -> str:
    if stat is None:
        return "-"
    return pct(stat.mean) if not np.isfinite(stat.std) else f"{pct(stat.mean)} ± {pct(stat.std)}"


def compare(stat: Spread, reference: Spread) -> str:
    """Whether two means differ by more than their seeds' standard deviations added: a rough guide, not a test."""
    if not (np.isfinite(stat.mean) and np.isfinite(reference.mean)):
        return "not comparable"
    if stat.count < 2 or reference.count < 2:
        return "one seed, no spread to judge by"
    within = abs(stat.mean - reference.mean) <= stat.std + reference.std
    return "within the seed spread" if within else "beyond the seed spread"


def results_table(summary) -> list[str]:
    columns = [("in_domain", "d_ece", "D-ECE in"), ("in_domain", "map", "AP in"), ("in_domain", "map_50", "AP50 in"),
               ("out_of_domain", "d_ece", "D-ECE out"), ("out_of_domain", "map", "AP out"),
               ("in_domain", "laece", "LaECE in"), ("out_of_domain", "laece", "LaECE out")]
    lines = ["| method | " + " | ".join(title for *_, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, splits in summary.items():
        lines.append(f"| {row} | " + " | ".join(cell(splits.get(split, {}).get(metric)) for split, metric, _ in columns)
                     + " |")
    return lines


def spread_table(summary) -> list[str]:
    lines = ["| method | seeds | D-ECE in / baseline | D-ECE out / baseline | D-ECE in range | D-ECE out range "
             "| AP in range | AP out range |", "|---" * 8 + "|"]
    for row, splits in summary.items():
        ratios = [d_ece_ratio(summary, row, split) for split in SPLITS]
        ranges = [f"{pct(splits[split][metric].low)} - {pct(splits[split][metric].high)}" if split in splits else "-"
                  for metric in ("d_ece", "map") for split in SPLITS]
        count = next(iter(next(iter(splits.values())).values())).count if splits else 0
        lines.append(f"| {row} | {count} | " + " | ".join(f"{r:.2f}x" if np.isfinite(r) else "-" for r in ratios)
                     + " | " + " | ".join(ranges) + " |")
    return lines


def analysis(summary, goal: Goal) -> list[str]:
    """Statements read off the numbers: the baseline's quality, each arm against the baseline, the ablations."""
    if "baseline" not in summary or "in_domain" not in summary["baseline"]:
        return ["- No baseline measured in-domain: nothing to compare against."]
    base = summary["baseline"]
    ap50 = base["in_domain"]["map_50"].mean
    lines = [f"- Baseline AP50 in-domain {pct(ap50)} %: " + (
        "a meaningful detector by the issue's bar (AP50 >= 50 %)." if goal.baseline_meaningful else
        "below the issue's bar of 50 % for a meaningful detector, so the calibration differences below say "
        "little about the method.")]
    for row, splits in summary.items():
        if row == "baseline":
            continue
        parts = []
        for split in (s for s in SPLITS if s in splits and s in base):
            ours, theirs = splits[split]["d_ece"], base[split]["d_ece"]
            ap_change = f"AP {100 * (splits[split]['map'].mean - base[split]['map'].mean):+.2f} points"
            if not np.isfinite(ours.mean):
                parts.append(f"D-ECE {SPLIT_NAMES[split]} n/a (no detection kept at score >= 0.3), {ap_change}")
                continue
            # Judged at the report's precision, so the words never contradict the printed numbers.
            change = round(100 * ours.mean, 2) - round(100 * theirs.mean, 2)
            verb = "keeps" if change == 0 else "lowers" if change < 0 else "raises"
            parts.append(f"{verb} D-ECE {SPLIT_NAMES[split]} {pct(theirs.mean)} -> {pct(ours.mean)} "
                         f"({d_ece_ratio(summary, row, split):.2f}x, {compare(ours, theirs)}), {ap_change}")
        lines.append(f"- {row}: " + "; ".join(parts) + ".")
    ablations = [("cal-detr", "modulation-only", "logit mixing, added to multiplicative modulation"),
                 ("cal-detr", "mixing-only", "multiplicative modulation, added to logit mixing"),
                 ("modulation-only", "released", "multiplicative instead of subtractive modulation, both without mixing")]
    for with_it, without_it, what in ablations:
        if with_it in summary and without_it in summary:
            changes = [f"{SPLIT_NAMES[split]} {pct(summary[without_it][split]['d_ece'].mean)} -> "
                       f"{pct(summary[with_it][split]['d_ece'].mean)} "
                       f"({compare(summary[with_it][split]['d_ece'], summary[without_it][split]['d_ece'])})"
                       for split in SPLITS if split in summary[with_it] and split in summary[without_it]]
            lines.append(f"- Ablation, {what} ({without_it} -> {with_it}): D-ECE " + ", ".join(changes) + ".")
    for split in (s for s in SPLITS if all(s in splits for splits in summary.values())):
        measured = [row for row in summary if np.isfinite(summary[row][split]["d_ece"].mean)]
        if not measured:
            continue
        best = min(measured, key=lambda row: summary[row][split]["d_ece"].mean)
        lines.append(f"- Lowest D-ECE {SPLIT_NAMES[split]}: {best} ({pct(summary[best][split]['d_ece'].mean)}).")
    return lines


def embedded(path: Path, title: str, report_dir: Path) -> list[str]:
    """A section quoting another benchmark report's verdict (bold lines) and tables, with a link to it; nothing
    when it does not exist."""
    if not path.is_file():
        return []
    kept = [line for line in path.read_text().splitlines() if line.startswith(("|", "**"))]
    link = os.path.relpath(path, report_dir)
    return ["", f"## {title}", "", f"From [{path.name}]({link}) (its setup and command are there):", "", *kept]


def metric_table(summary: dict) -> list[str]:
    """The further metrics of ``summary``'s rows (aggregated over ``REPORT_METRICS``): LaECE_0 and LRP at the
    LRP-optimal thresholds, oLRP and OCE, in-domain and out-of-domain."""
    columns = [(f"{THRESHOLD_KEY}.laece_0", "LaECE_0 @LRP-opt"), (f"{THRESHOLD_KEY}.lrp", "LRP @LRP-opt"),
               ("olrp", "oLRP"), ("oce", "OCE")]
    header = [f"{title} {'in' if split == 'in_domain' else 'out'}" for key, title in columns for split in SPLITS]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for row, splits in summary.items():
        lines.append(f"| {row} | " + " | ".join(cell(splits.get(split, {}).get(key))
                                                 for key, _ in columns for split in SPLITS) + " |")
    return lines


def metric_section(summary: dict, thresholds_from: str) -> list[str]:
    """``metric_table`` under its heading, with what each column measures; ``thresholds_from``: the scenes the
    LRP-optimal thresholds were found on."""
    return ["## LRP-optimal-threshold protocol, oLRP and OCE", "",
            f"LaECE_0 and LRP (IoU 0) with each class cut at its LRP-optimal threshold found on {thresholds_from} "
            "with that row's scores (Kuzucu et al.); oLRP (threshold-free, IoU 0.5); OCE (score >= 0.3). Percent, "
            "lower is better.", "", *metric_table(summary)]


def write_report(path: Path, summary, goal: Goal, setup: list[str], diagram: str | None, notes: list[str],
                 cal_settings: dict | None = None, sections: list[str] = (), further: dict | None = None) -> str:
    """The markdown report; returns its text. ``sections``: markdown lines put before the setup; ``further``: the
    re-evaluated rows aggregated over ``REPORT_METRICS`` (their table follows the main one)."""
    verdict = f"**Goal (issue 7): {goal.verdict}.**"
    if goal.baseline_meaningful is False:
        verdict += f" The baseline is not a meaningful detector (AP50 in-domain below {100 * MEANINGFUL_AP50:.0f} %)."
    lines = [f"# Cal-DETR calibration benchmark: {path.stem}", "", verdict, "",
             *[f"- {text}: {'yes' if ok else 'no'}" for text, ok in goal.checks], "",
             "Percent, mean ± standard deviation over seeds (D-ECE: 10 bins, detections with score >= 0.3; AP: COCO "
             "AP@[.5:.95]). Rows with `+` are post-hoc calibrators fitted on train-split images, never on the "
             "evaluation split.", "", *results_table(summary), "",
             *([*metric_section(further, "the post-hoc calibrators' scenes"), ""] if further else []),
             "## Spread over seeds and ratio to the baseline", "", *spread_table(summary), "",
             "## Analysis", "", *analysis(summary, goal), "",
             "Nothing was tuned on the evaluation split: " + (
                 "the Cal arms run the settings " + ", ".join(f"{k}={v:g}" for k, v in sorted(cal_settings.items()))
                 + ", chosen on a separate tuning split; the rest are the library's, listed under Setup."
                 if cal_settings else "every arm runs the library's settings listed under Setup.")]
    if diagram:
        lines += ["", "## Reliability diagram", "", f"![baseline vs Cal-DETR]({diagram})"]
    lines += [*sections, "", "## Setup", "", *setup]
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU {cpu} ({os.cpu_count()} cores), GPU {gpu}; torch {torch.__version__}"


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    # The reports themselves (written after each seed) are not changes to the code that made them.
    changed = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return commit + (" (with uncommitted changes)" if changed else "")


def describe_setup(runs, work_dir, seeds, size: str, command: str, post_hoc: str, shown_work_dir=None,
                   cal_settings: dict | None = None) -> list[str]:
    first = next(iter(runs.values()))[0]
    arguments, run = first["run"]["arguments"], first["run"]
    if arguments.get("dataset_name"):
        dataset = f"Hub dataset `{arguments['dataset_name']}` (`{arguments['validation_split']}` evaluated)"
    elif arguments.get("train_annotations"):
        dataset = f"COCO folders `{arguments['train_annotations']}` / `{arguments['validation_annotations']}`"
    else:
        dataset = (f"embedded digits default: {arguments['num_train_images']} train / "
                   f"{arguments['num_validation_images']} validation scenes at {arguments['image_size']} px "
                   f"(data seed {arguments['data_seed']})")
    if not arguments.get("skip_out_of_domain"):
        dataset += (f"; out-of-domain: the validation scenes, each with one of 15 corruptions at severity 1-5 "
                    f"(corruption seed {arguments['corruption_seed']})")
    lines = [f"- Machine: {machine()}",
             f"- Budget ({size}): {run['train_steps']} optimizer steps, batch {arguments['per_device_train_batch_size']}"
             f" x {run['num_processes']} process(es), learning rate {arguments['learning_rate']}, images "
             f"{arguments['image_size']} px, model `{arguments['model_type'] or 'deformable_detr'}` preset "
             f"`{arguments['model_preset']}`, config overrides `{arguments['config_overrides']}`",
             f"- Seeds: {', '.join(map(str, seeds))}", f"- Dataset: {dataset}", f"- Post hoc: {post_hoc}",
             f"- Commit: `{git_commit()}`", f"- Command: `{command}`", f"- Runs: `{shown_work_dir or work_dir}/<arm>/seed_<s>/`"
             + (f" (Cal arms: `<arm>@{','.join(f'{k}={v:g}' for k, v in sorted(cal_settings.items()))}`)"
                if cal_settings else ""), "",
             "| arm | Cal settings (config.json) | train s / run | total s / run |", "|---|---|---|---|"]
    for arm, arm_runs in runs.items():
        config = json.loads((run_folder(work_dir, arm, seeds[0], cal_settings) / "config.json").read_text())
        settings = settings_text(config)
        times = [np.mean([m["run"][key] for m in arm_runs]) for key in ("train_seconds", "total_seconds")]
        lines.append(f"| {arm} | {settings} | {times[0]:.0f} | {times[1]:.0f} |")
    return lines


# -------------------------------------------------------------------------------------------------------- main


def parse_arguments(argv: list[str]):
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu",
                        help="the budget, train.py arguments and seeds: smoke (a few minutes on a CPU; checks the "
                             "pipeline, detects nothing yet), cpu (train.py's defaults), gpu (one GPU: a wider model "
                             "at 128x128) (default: %(default)s)")
    parser.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                        help="shorthand for --size smoke (default: off)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="the train.py --method of each arm trained and reported: baseline (the stock model), "
                             "cal-detr (multiplicative modulation and logit mixing), released (the authors' code: "
                             "subtractive modulation, no mixing), modulation-only, mixing-only (default: all five)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="train.py --seed of the runs of every arm (default: the size's: smoke 0; cpu, gpu 0 1 2)")
    parser.add_argument("--name", help="report name: benchmarks/results/<name>.md and <name>_reliability.png "
                                       "(default: calibration_<size>)")
    parser.add_argument("--work_dir", help="the folder the runs are trained into, <arm>/seed_<s>/ each; a run "
                                           "already there with the same arguments is reused "
                                           "(default: outputs/benchmarks/<name>)")
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"),
                        help="the folder the report and its diagram are written to (default: the repository's "
                             "benchmarks/results)")
    parser.add_argument("--no_post_hoc", action="store_true",
                        help="skip the post-hoc calibrator rows (temperature scaling, Platt scaling, isotonic regression) "
                             "(default: off)")
    parser.add_argument("--num_calibration_images", type=int,
                        help="number of fresh train-split scenes the post-hoc calibrators are fitted on "
                             "(default: the size's: smoke 64, else 500)")
    parser.add_argument("--calibration_seed", type=int, default=1,
                        help="generation seed of the fresh train-split scenes the calibrators are fitted on; not "
                             "train.py's --data_seed (0), whose scenes are the training images (default: %(default)s)")
    parser.add_argument("--eval_batch_size", type=int, default=32,
                        help="batch size of the re-evaluation of the saved models for the diagram and the "
                             "post-hoc rows (default: %(default)s)")
    parser.add_argument("--sweep_report", type=Path,
                        help="benchmarks/calibration_sweep.py's report to quote under 'Hyper-parameters tried' "
                             "(default, for the default --name only: <results_dir>/calibration_sweep_<size>.md, "
                             "when it exists)")
    parser.add_argument("--diagnostics_report", type=Path,
                        help="benchmarks/calibration_diagnostics.py's report to quote under 'Diagnostics' "
                             "(default, for the default --name only: <results_dir>/calibration_<size>_diagnostics.md, "
                             "when it exists)")
    parser.add_argument("--cal_settings", nargs="+", metavar="NAME=VALUE",
                        help=f"Cal settings for every arm but the baseline, NAME one of {CAL_SETTINGS} (e.g. the one "
                             "benchmarks/calibration_sweep.py selected on its tuning split); such runs get their own "
                             "folders, the baseline's are shared (default: none, the library's settings)")
    args = parser.parse_args(own)
    size = SIZES[args.size]
    args.arms = [arm for arm in ARMS if arm in args.arms]
    args.seeds = args.seeds or list(size.seeds)
    args.name = args.name or f"calibration_{args.size}"
    args.work_dir = Path(args.work_dir or ROOT / "outputs" / "benchmarks" / args.name)
    args.num_calibration_images = size.calibration_images if args.num_calibration_images is None \
        else args.num_calibration_images
    args.train_args = [*size.train_args, *passthrough]
    try:
        args.cal_settings = parse_cal_settings(args.cal_settings)
    except ValueError as error:
        parser.error(str(error))
    for option in ("sweep_report", "diagnostics_report"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option} {path}: no such file")
    # Another budget's reports would describe other runs: they are quoted by default under the default name only.
    if args.name == f"calibration_{args.size}":
        results_dir = Path(args.results_dir)
        args.sweep_report = args.sweep_report or results_dir / f"calibration_sweep_{args.size}.md"
        args.diagnostics_report = args.diagnostics_report or results_dir / f"calibration_{args.size}_diagnostics.md"
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    command = shlex.join(["python", "benchmarks/calibration.py", *argv])

    # Phase 1: train every (arm, seed) not yet trained, seeds outermost so a short run covers every arm; re-evaluate
    # baseline and Cal-DETR right after each seed (the diagram: first seed; the post-hoc rows: every seed). Each
    # model's re-evaluation is kept in its posthoc.json, so an interrupted benchmark resumed elsewhere from the run
    # records (benchmarks/run_records.py) needs no saved model.
    post_hoc_arms = [arm for arm in POST_HOC_ARMS if arm in args.arms]
    reevaluated_seeds = args.seeds[:1] if args.no_post_hoc else args.seeds
    loaded = []

    def get_data():
        if not loaded:  # the scenes are generated only when a model is re-evaluated
            first = run_folder(args.work_dir, args.arms[0], args.seeds[0], args.cal_settings)
            arguments = json.loads((first / "metrics.json").read_text())["run"]["arguments"]
            loaded.append(evaluation_data(arguments, args.num_calibration_images,
                                          None if args.no_post_hoc else args.calibration_seed))
        return loaded[0]

    calibrators = {} if args.no_post_hoc else default_calibrators()
    source = {"version": POSTHOC_VERSION, "rows": list(calibrators),
              "calibration": None if args.no_post_hoc else {"seed": args.calibration_seed,
                                                            "num_images": args.num_calibration_images}}

    def reevaluation(arm: str, seed: int) -> dict:
        folder = run_folder(args.work_dir, arm, seed, args.cal_settings)
        return ensure_posthoc(folder, get_data, args.eval_batch_size, json.loads((folder / "metrics.json").read_text()),
                              {**source, "metrics_sha256": sha256(folder / "metrics.json")},
                              calibrators=calibrators, thresholds=not args.no_post_hoc)

    for seed in args.seeds:
        for arm in args.arms:
            started = time.time()
            if ensure_run(arm, seed, args.work_dir, args.train_args, args.cal_settings):
                print(f"trained {arm} seed {seed} in {time.time() - started:.0f} s", flush=True)
        if seed in reevaluated_seeds:
            for arm in post_hoc_arms:
                reevaluation(arm, seed)
    runs = load_runs(args.work_dir, args.arms, args.seeds, args.cal_settings)
    arguments = runs[args.arms[0]][0]["run"]["arguments"]

    # Phase 2: the re-evaluations' rows, every seed in order (read from the posthoc.json files).
    post_hoc_runs, all_metrics_runs, raw_first_seed, notes, calibration_images = {}, {}, {}, [], 0
    for arm in post_hoc_arms:
        for seed, metrics in zip(reevaluated_seeds, runs[arm]):
            record = reevaluation(arm, seed)
            notes += record["notes"]
            notes += [f"{arm} seed {seed}: {name} not fitted: {why}" for name, why in record["failures"].items()]
            calibration_images = record["calibration"]["num_images"]
            raw_first_seed.setdefault(arm, record["reliability"]["raw"])
            for name in record["rows"]:
                row = arm if name == "raw" else f"{arm} + {name}"
                values = row_values(metrics, record, name)
                all_metrics_runs.setdefault(row, []).append(values)
                if name != "raw":
                    post_hoc_runs.setdefault(row, []).append(values)

    # Phase 3: aggregate, judge, write.
    summary = aggregate(runs)
    goal = judge_goal(summary)
    summary.update(aggregate(post_hoc_runs))
    # The further metrics (LRP-optimal-threshold protocol, oLRP, OCE) of the re-evaluated rows, every seed.
    further = aggregate(all_metrics_runs, metrics=REPORT_METRICS) if not args.no_post_hoc else {}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    diagram = None
    if len(raw_first_seed) == 2:
        from hf_caldetr.metrics import plot_reliability_diagram

        diagram = f"{args.name}_reliability.png"
        panels = [(raw_first_seed[arm][split], f"{arm}, {SPLIT_NAMES[split]} (seed {args.seeds[0]})")
                  for split in SPLITS if split in raw_first_seed["baseline"] for arm in POST_HOC_ARMS]
        plot_reliability_diagram([result for result, _ in panels], results_dir / diagram,
                                 titles=[title for _, title in panels])
    digits = not (arguments.get("dataset_name") or arguments.get("train_annotations"))
    post_hoc = ("not run (--no_post_hoc)" if args.no_post_hoc else
                f"{', '.join(STACKED[:-1])} and {STACKED[-1]}, class-agnostic, fitted per model on the detections "
                f"with score >= 0.3 of {calibration_images} " + (
                    f"fresh train-split scenes (generation seed {args.calibration_seed}, none a training image)"
                    if digits else f"train-split images (a subset drawn with seed {args.calibration_seed})")
                + ", then applied to the evaluation detections")
    work_dir = args.work_dir.resolve()
    shown_work_dir = work_dir.relative_to(ROOT) if work_dir.is_relative_to(ROOT) else work_dir
    setup = describe_setup(runs, args.work_dir, args.seeds, args.size, command, post_hoc, shown_work_dir,
                           args.cal_settings)
    report = results_dir / f"{args.name}.md"
    sections = [*(embedded(args.sweep_report, "Hyper-parameters tried (tuning split, not the evaluation split)",
                           results_dir) if args.sweep_report else []),
                *(embedded(args.diagnostics_report, "Diagnostics", results_dir) if args.diagnostics_report else [])]
    write_report(report, summary, goal, setup, diagram, notes, args.cal_settings, sections, further)
    print("\n".join(results_table(summary)))
    print(f"goal: {goal.verdict}; wrote {report}" + (f" and {results_dir / diagram}" if diagram else ""))


if __name__ == "__main__":
    main()
