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
from hf_caldetr.data import (
    DIGIT_NAMES,
    build_image_processor,
    corrupt_dataset,
    make_collate_fn,
)
from hf_caldetr.data.arguments import DataArguments, load_calibration_split, load_splits
from hf_caldetr.evaluation import (
    evaluate_model,
    fit_calibrator,
    iter_detections,
    lrp_thresholds,
    summarize,
)
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
    result = subprocess.run([*command, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True,
                            env=ENV, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({result.returncode}):\n{result.stderr[-4000:]}")


def oracle(model_dir, dataset, image_processor=None, calibrator=None, thresholds_on=None) -> dict:
    """``summarize(evaluate_model(...))`` in this process: the checkpoint as the stock Auto class loads it; with
    ``thresholds_on`` (a held-out dataset) also the second protocol, at the LRP-optimal thresholds found there."""
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    image_processor = image_processor or AutoImageProcessor.from_pretrained(model_dir)

    def loader(data):
        return DataLoader(data, batch_size=32, collate_fn=make_collate_fn(image_processor))

    thresholds = None
    if thresholds_on is not None:
        thresholds = lrp_thresholds(model, loader(thresholds_on), image_processor, calibrator=calibrator)
    return summarize(evaluate_model(model, loader(dataset), image_processor, calibrator=calibrator,
                                    class_thresholds=thresholds))


def assert_same_metrics(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_metrics(actual[key], value)
        elif np.isnan(value):
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
             "--per_device_train_batch_size", "4", "--report_to", "none", "--skip_out_of_domain", "true",
             "--calibrator", "none"]
    result = subprocess.run(train, check=False, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
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


@pytest.fixture(scope="module")
def compared(folders):
    """One ``accelerate launch`` run: the trained model, a temperature fitted for it on the saved dataset's train
    split, the random baseline beside it; in-domain and corrupted."""
    output = folders["root"] / "compared"
    run("--model_name_or_path", folders["trained"], "--compare_with", folders["baseline"],
        "--dataset_name", folders["self_labelled"], "--fit_calibrator", "temperature", "--output_dir", output,
        "--save_calibrator_with_checkpoint", "true", launcher=True)
    return output, json.loads((output / "metrics.json").read_text())


def test_fit_calibrator_and_compare_with_agree_with_the_in_process_oracle(folders, compared):
    output, metrics = compared
    train_split, validation_split = load_splits(DataArguments(dataset_name=str(folders["self_labelled"])))
    corrupted, _ = corrupt_dataset(validation_split, base_seed=0)

    # The calibrator: fit_calibrator on the held-out (train) split, here and in the script.
    saved = load_calibrator(output / "calibrator.json")
    assert type(saved) is TemperatureScaling
    model = AutoModelForObjectDetection.from_pretrained(folders["trained"])
    image_processor = AutoImageProcessor.from_pretrained(folders["trained"])
    loader = DataLoader(train_split, batch_size=32, collate_fn=make_collate_fn(image_processor))
    expected = fit_calibrator(model, loader, image_processor, TemperatureScaling())
    assert saved.temperature == pytest.approx(expected.temperature, rel=1e-6)
    # ... and a copy travels with the checkpoint folder.
    assert (folders["trained"] / "calibrator.json").read_text() == (output / "calibrator.json").read_text()
    assert metrics["evaluation"]["calibrator"]["fitted_on"]["num_images"] == NUM_IMAGES

    # The model before and after calibration, in-domain and corrupted: evaluate_model here gives the same numbers,
    # the second protocol's included (its thresholds found on the held-out train split, raw and folded apart).
    held_out = load_calibration_split(DataArguments(dataset_name=str(folders["self_labelled"])), None, 500, 1)
    for split, dataset in (("in_domain", validation_split), ("out_of_domain", corrupted)):
        assert_same_metrics(metrics["before_calibration"][split],
                            oracle(folders["trained"], dataset, thresholds_on=held_out))
        assert_same_metrics(metrics[split], oracle(folders["trained"], dataset, calibrator=saved,
                                                   thresholds_on=held_out))
        assert metrics[split]["num_images"] == NUM_IMAGES
        assert np.isfinite(metrics[split]["at_lrp_optimal_thresholds"]["laece_0"])
    assert set(metrics["lrp_optimal_thresholds"]) >= {"found_on", "main", "raw", "compare_with"}
    # Temperature scaling keeps the ranking, so the AP; the confidences, and so the D-ECE, change.
    before, after = metrics["before_calibration"]["in_domain"], metrics["in_domain"]
    assert after["map"] == before["map"] > 0
    assert abs(after["d_ece"] - before["d_ece"]) > 1e-3

    # The baseline saved no image processor: the script falls back to build_image_processor(--image_size).
    assert metrics["compare_with"]["model"] == str(folders["baseline"])
    assert_same_metrics(metrics["compare_with"]["in_domain"],
                        oracle(folders["baseline"], validation_split, build_image_processor(96), thresholds_on=held_out))
    assert metrics["compare_with"]["in_domain"]["d_ece"] != before["d_ece"]

    for name in ("reliability_diagram.png", "reliability_comparison.png", "reliability_before_after.png",
                 "uncertainty_diagram.png", "uncertainty_comparison.png", "corruption_manifest.json"):
        assert (output / name).is_file(), name
    # D-UCE for every model, raw and calibrated (the temperature is folded: the uncertainties stay the raw ones).
    for split in ("in_domain", "out_of_domain"):
        for result in (metrics[split], metrics["before_calibration"][split], metrics["compare_with"][split]):
            assert 0 <= result["d_uce"] <= 1
    assert "| in-domain | D-UCE |" in (output / "comparison.md").read_text()
    assert (output / "reliability_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_calibrator_applies_on_the_train_py_evaluation(folders, compared):
    """Plain python, the digits default: uncalibrated, the numbers of train.py's own evaluation (its Phase 6)."""
    output = folders["root"] / "applied"
    calibrator_path = compared[0] / "calibrator.json"
    run("--model_name_or_path", folders["trained"], "--calibrator", calibrator_path,
        "--num_validation_images", NUM_IMAGES, "--skip_out_of_domain", "true", "--output_dir", output,
        "--lrp_optimal_thresholds", "false")  # train.py ran with --calibrator none: no held-out images
    metrics = json.loads((output / "metrics.json").read_text())
    trained_metrics = json.loads((folders["trained"] / "metrics.json").read_text())
    assert_same_metrics(metrics["before_calibration"]["in_domain"], trained_metrics["in_domain"])
    assert_same_metrics(metrics["in_domain"], oracle(folders["trained"], folders["validation"],
                                                     calibrator=load_calibrator(calibrator_path)))
    assert metrics["in_domain"]["d_ece"] != trained_metrics["in_domain"]["d_ece"]
    assert metrics["evaluation"]["calibrator"] == {"type": "TemperatureScaling", "path": str(calibrator_path),
                                                   "folded": False, "fitted_on": None}
    assert "out_of_domain" not in metrics and "compare_with" not in metrics
    assert not (output / "reliability_comparison.png").exists()
    assert (output / "reliability_before_after.png").is_file()


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
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
    with pytest.raises(ValueError, match="names the evaluated model itself"):
        script.main(["--model_name_or_path", trained, "--compare_with", trained, *out])
    with pytest.raises(ValueError, match="metrics.json .* would be overwritten"):
        script.main(["--model_name_or_path", trained, "--output_dir", trained])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_modulated_at_inference_loads_its_cal_class(folders, script, tmp_path):
    """train.py measured such a model with modulated logits, which only the Cal class computes."""
    from transformers import DeformableDetrForObjectDetection

    from hf_caldetr import CalDeformableDetrForObjectDetection

    labels = dict(enumerate(DIGIT_NAMES))
    build_model("cal-detr", labels, preset="tiny", modulate_at_inference=True).save_pretrained(tmp_path / "modulated")
    assert type(script.load_detector(str(tmp_path / "modulated"))) is CalDeformableDetrForObjectDetection
    assert type(script.load_detector(str(folders["trained"]))) is DeformableDetrForObjectDetection
