"""examples/evaluate.py end to end on a tiny trained folder, against evaluate_model run in-process (the oracle)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_caldetr.calibrators import TemperatureScaling, load_calibrator
from hf_caldetr.data import DIGIT_NAMES, build_image_processor, corrupt_dataset, make_collate_fn
from hf_caldetr.data.splits import DataArguments, load_splits
from hf_caldetr.evaluation import evaluate_model, fit_calibrator, iter_detections, summarize
from hf_caldetr.training import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "evaluate.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
NUM_IMAGES = 16
GROUND_TRUTH_PER_IMAGE = 20

pytestmark = pytest.mark.slow


def run(*args, launcher=False):
    """The script in a subprocess, through ``accelerate launch`` or plain ``python``."""
    command = [sys.executable]
    if launcher:
        command += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*command, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV,
                            cwd=ROOT, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({result.returncode}):\n{result.stderr[-4000:]}")


def oracle(model_dir, dataset, image_processor=None, calibrator=None) -> dict:
    """``summarize(evaluate_model(...))`` in this process: the checkpoint as the stock Auto class loads it."""
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    image_processor = image_processor or AutoImageProcessor.from_pretrained(model_dir)
    loader = DataLoader(dataset, batch_size=32, collate_fn=make_collate_fn(image_processor))
    return summarize(evaluate_model(model, loader, image_processor, calibrator=calibrator))


def assert_same_metrics(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if np.isnan(value):
            assert np.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def self_labelled(model_dir, dataset):
    """``dataset`` with each image's top detections of the model as its ground truth, so that the model has true
    positives and false positives among its kept detections (a 5-step model detects nothing real)."""
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    loader = DataLoader(dataset, batch_size=32, collate_fn=make_collate_fn(image_processor))
    objects = []
    for predictions, _, sizes in iter_detections(model, loader, image_processor):
        for prediction, (height, width) in zip(predictions, sizes):
            top = np.argsort(-prediction["scores"], kind="stable")[:GROUND_TRUTH_PER_IMAGE]
            xyxy = np.clip(prediction["boxes"][top], 0, [width, height, width, height])
            xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            keep = (xywh[:, 2] >= 1) & (xywh[:, 3] >= 1)
            objects.append({"bbox": xywh[keep].tolist(), "category": prediction["labels"][top][keep].tolist(),
                            "area": (xywh[keep, 2] * xywh[keep, 3]).tolist(),
                            "id": list(range(int(keep.sum())))})
    return dataset.map(lambda row, index: {"objects": objects[index]}, with_indices=True,
                       features=dataset.features)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 5-step Cal-DETR folder (train.py), a random stock baseline without an image processor config, and a
    saved dataset labelled by the trained model."""
    root = tmp_path_factory.mktemp("evaluate")
    trained = root / "trained"
    train = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "train.py"),
             "--output_dir", str(trained), "--max_train_steps", "5", "--model_preset", "tiny",
             "--num_train_images", "32", "--num_validation_images", str(NUM_IMAGES),
             "--per_device_train_batch_size", "4", "--report_to", "none", "--skip_out_of_domain", "true"]
    result = subprocess.run(train, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    torch.manual_seed(0)
    build_model("baseline", dict(enumerate(DIGIT_NAMES)), preset="tiny").save_pretrained(root / "baseline")

    data_args = DataArguments(num_train_images=NUM_IMAGES, num_validation_images=NUM_IMAGES)
    train_split, validation_split = load_splits(data_args)
    from datasets import DatasetDict

    DatasetDict({"train": self_labelled(trained, train_split),
                 "validation": self_labelled(trained, validation_split)}).save_to_disk(str(root / "self_labelled"))
    return {"root": root, "trained": trained, "baseline": root / "baseline", "self_labelled": root / "self_labelled",
            "validation": validation_split}


def test_metrics_equal_train_py_and_the_in_process_oracle_side_by_side(folders):
    output = folders["root"] / "compared"
    run("--model_name_or_path", folders["trained"], "--compare_with", folders["baseline"],
        "--num_validation_images", NUM_IMAGES, "--output_dir", output, launcher=True)
    metrics = json.loads((output / "metrics.json").read_text())

    validation = folders["validation"]
    corrupted, _ = corrupt_dataset(validation, base_seed=0)
    # train.py's own evaluation of the folder (its Phase 6) and evaluate_model here give the same numbers.
    trained_metrics = json.loads((folders["trained"] / "metrics.json").read_text())
    assert_same_metrics(metrics["in_domain"], trained_metrics["in_domain"])
    assert_same_metrics(metrics["in_domain"], oracle(folders["trained"], validation))
    assert_same_metrics(metrics["out_of_domain"], oracle(folders["trained"], corrupted))
    assert metrics["in_domain"]["num_images"] == NUM_IMAGES and metrics["in_domain"]["num_detections"] > 0
    # The baseline saved no image processor: the script falls back to build_image_processor(--image_size).
    compared = metrics["compare_with"]
    assert compared["model"] == str(folders["baseline"])
    for split, dataset in (("in_domain", validation), ("out_of_domain", corrupted)):
        assert_same_metrics(compared[split], oracle(folders["baseline"], dataset, build_image_processor(96)))
    assert compared["in_domain"]["d_ece"] != metrics["in_domain"]["d_ece"]
    assert metrics["evaluation"]["calibrator"] is None and "before_calibration" not in metrics

    for name in ("reliability_diagram.png", "reliability_comparison.png", "corruption_manifest.json"):
        assert (output / name).is_file(), name
    assert (output / "reliability_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output / "reliability_before_after.png").exists()


def test_fitted_temperature_is_saved_and_applied(folders):
    common = ["--model_name_or_path", folders["trained"], "--dataset_name", folders["self_labelled"],
              "--skip_out_of_domain", "true"]
    fit_dir, apply_dir = folders["root"] / "fit", folders["root"] / "apply"
    run(*common, "--fit_calibrator", "temperature", "--output_dir", fit_dir)
    fitted = json.loads((fit_dir / "metrics.json").read_text())
    saved = load_calibrator(fit_dir / "calibrator.json")
    assert type(saved) is TemperatureScaling
    assert fitted["evaluation"]["calibrator"]["fitted_on"]["num_images"] == NUM_IMAGES

    # The oracle: fit_calibrator on the held-out (train) split, evaluate_model with it on the validation split.
    train_split, validation_split = load_splits(DataArguments(dataset_name=str(folders["self_labelled"])))
    model = AutoModelForObjectDetection.from_pretrained(folders["trained"])
    image_processor = AutoImageProcessor.from_pretrained(folders["trained"])
    loader = DataLoader(train_split, batch_size=32, collate_fn=make_collate_fn(image_processor))
    expected = fit_calibrator(model, loader, image_processor, TemperatureScaling())
    assert saved.temperature == pytest.approx(expected.temperature, rel=1e-6)
    assert_same_metrics(fitted["in_domain"], oracle(folders["trained"], validation_split, calibrator=saved))
    assert_same_metrics(fitted["before_calibration"]["in_domain"], oracle(folders["trained"], validation_split))
    # Temperature scaling keeps the ranking, so the AP; the confidences, and so the D-ECE, change.
    before, after = fitted["before_calibration"]["in_domain"], fitted["in_domain"]
    assert after["map"] == before["map"] > 0
    assert abs(after["d_ece"] - before["d_ece"]) > 1e-3
    assert (fit_dir / "reliability_before_after.png").is_file()

    run(*common, "--calibrator", fit_dir / "calibrator.json", "--output_dir", apply_dir)
    applied = json.loads((apply_dir / "metrics.json").read_text())
    assert_same_metrics(applied["in_domain"], fitted["in_domain"])
    assert applied["evaluation"]["calibrator"]["type"] == "TemperatureScaling"
    assert applied["evaluation"]["calibrator"]["fitted_on"] is None


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_input_is_named(folders, script, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="checkpoint folder .*missing does not exist"):
        script.main(["--model_name_or_path", str(tmp_path / "missing"), *out])
    with pytest.raises(ValueError, match="folder without config.json"):
        script.main(["--model_name_or_path", str(tmp_path), *out])
    trained = str(folders["trained"])
    with pytest.raises(ValueError, match=r"metrics.json is not a saved calibrator: .*lacks the field\(s\)"):
        script.main(["--model_name_or_path", trained, "--calibrator", f"{trained}/metrics.json", *out])
    with pytest.raises(ValueError, match="no such file"):
        script.main(["--model_name_or_path", trained, "--calibrator", str(tmp_path / "none.json"), *out])
    with pytest.raises(ValueError, match="exclude each other"):
        script.main(["--model_name_or_path", trained, "--calibrator", f"{trained}/metrics.json",
                     "--fit_calibrator", "platt", *out])
    with pytest.raises(ValueError, match="must be one of"):
        script.main(["--model_name_or_path", trained, "--fit_calibrator", "beta", *out])
    with pytest.raises(ValueError, match="metrics.json .* would be overwritten"):
        script.main(["--model_name_or_path", trained, "--output_dir", trained])
    assert not (tmp_path / "out").exists()
