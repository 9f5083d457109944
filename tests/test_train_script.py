"""examples/train.py end to end through `accelerate launch`, on a few steps of the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--model_preset", "tiny", "--num_train_images", "32", "--num_validation_images", "16",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--report_to", "none",
            "--num_calibration_images", "16"]

pytestmark = pytest.mark.slow


def launch(output_dir, *args, processes=1, check=True):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--multi_gpu"] if processes > 1 else ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(ROOT / "examples" / "train.py"), "--output_dir", str(output_dir), *TINY_RUN, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes > 1:
        # Without it, `--multi_gpu` on a machine without GPUs starts independent single processes.
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def test_default_outputs_are_a_stock_checkpoint_with_metrics(tmp_path):
    launch(tmp_path, "--max_train_steps", "4")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "metrics.json",
                 "reliability_diagram.png", "corruption_manifest.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("in_domain", "out_of_domain"):
        assert {"map", "map_50", "d_ece", "laece"} <= set(metrics[split])
        assert metrics[split]["num_images"] == 16
    assert metrics["run"]["method"] == "cal-detr" and metrics["run"]["train_steps"] == 4
    manifest = json.loads((tmp_path / "corruption_manifest.json").read_text())
    assert len(manifest["images"]) == 16 and {"corruption", "severity"} <= set(manifest["images"][0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DeformableDetrForObjectDetection"]
    assert config["uncertainty_modulation"] == "multiplicative" and len(config["id2label"]) == 10

    from transformers import AutoModelForObjectDetection, DeformableDetrForObjectDetection

    assert type(AutoModelForObjectDetection.from_pretrained(tmp_path)) is DeformableDetrForObjectDetection


def test_methods_differ_only_in_their_settings(tmp_path):
    launch(tmp_path / "released", "--max_train_steps", "2", "--method", "released", "--skip_out_of_domain", "true")
    released = json.loads((tmp_path / "released" / "config.json").read_text())
    assert released["uncertainty_modulation"] == "subtractive" and released["use_logit_mixing"] is False
    launch(tmp_path / "baseline", "--max_train_steps", "2", "--method", "baseline", "--skip_out_of_domain", "true")
    baseline = json.loads((tmp_path / "baseline" / "config.json").read_text())
    assert "uncertainty_modulation" not in baseline
    assert {k: v for k, v in baseline.items() if k not in ("id2label", "label2id")} == {
        k: v for k, v in released.items()
        if k not in ("id2label", "label2id", "uncertainty_modulation", "modulate_at_inference", "use_logit_mixing",
                     "logit_mixing_alpha", "logit_mixing_loss_coefficient")}
    failed = launch(tmp_path / "bad", "--method", "baseline", "--use_logit_mixing", "true", check=False)
    assert failed.returncode != 0 and "takes no Cal settings" in failed.stderr


def test_resume_gives_the_weights_of_the_uninterrupted_run(tmp_path):
    common = ["--max_train_steps", "6", "--skip_out_of_domain", "true", "--augment", "true"]
    launch(tmp_path / "full", *common, "--checkpointing_steps", "3")
    assert (tmp_path / "full" / "step_3").is_dir() and (tmp_path / "full" / "step_6").is_dir()
    launch(tmp_path / "resumed", *common, "--resume_from_checkpoint", str(tmp_path / "full" / "step_3"))
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    # And the resumed run did not simply start over: the checkpoint is 3 steps in, so its weights differ.
    at_step_3 = load_file(tmp_path / "full" / "step_3" / "model.safetensors")
    assert any(not torch.equal(at_step_3[name], full[name]) for name in at_step_3 if name in full)


def test_two_processes(tmp_path):
    launch(tmp_path, "--max_train_steps", "3", "--skip_out_of_domain", "true", processes=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 2
    assert metrics["in_domain"]["num_images"] == 16  # gather_for_metrics: every image once


@pytest.mark.parametrize("model_type", ["detr", "rt_detr"])
def test_other_architectures_train_and_evaluate(tmp_path, model_type):
    launch(tmp_path, "--max_train_steps", "2", "--model_type", model_type, "--skip_out_of_domain", "true")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type and config["uncertainty_modulation"] == "multiplicative"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["in_domain"]["num_images"] == 16 and "map" in metrics["in_domain"]


@pytest.fixture(scope="module")
def scoring_checkpoint(tmp_path_factory):
    """A tiny random Deformable DETR for the digits whose scores start near 0.6 (class bias 0.5), so that a
    2-step fine-tune keeps detections above the protocol's 0.3 and a calibrator can be fitted."""
    from hf_caldetr.data import build_image_processor
    from hf_caldetr.training import build_model

    folder = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    model = build_model("baseline", {i: str(i) for i in range(10)}, preset="tiny")
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.fill_(0.5)
    model.save_pretrained(folder)
    build_image_processor(96).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("calibrator", ["platt", "isotonic"])
def test_the_run_ends_calibrated(tmp_path, scoring_checkpoint, calibrator):
    launch(tmp_path, "--model_name_or_path", str(scoring_checkpoint), "--max_train_steps", "2",
           "--num_calibration_images", "24", "--calibrator", calibrator, "--calibration_class_wise", "false")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["fitted_on"]["images"] == 24 and calibration["folded"] is (calibrator == "platt")
    for split in ("in_domain", "out_of_domain"):
        raw, calibrated = metrics["before_calibration"][split], metrics[split]
        assert raw["num_detections"] > 0 and raw["d_ece"] != calibrated["d_ece"]
        if calibrator == "platt":  # a class-agnostic, increasing map: the ranking and so the AP are unchanged
            assert calibrated["map"] == raw["map"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "calibrator.json").is_file()
    if calibrator == "platt":
        (record,) = config["folded_calibration"]
        assert record["kind"] == "PlattScaling" and record["calibrator"]["params"] == calibration["params"]
    else:
        assert "folded_calibration" not in config
    card = (tmp_path / "README.md").read_text()
    assert "Raw scores, before the post-hoc calibration" in card


def test_calibrators_a_softmax_head_cannot_take_are_refused_before_training(tmp_path):
    failed = launch(tmp_path, "--model_type", "detr", "--calibrator", "platt", "--max_train_steps", "2", check=False)
    assert failed.returncode != 0 and "cannot be folded into a softmax head" in failed.stderr
    assert "training (" not in failed.stderr  # refused before the training loop


def test_a_finished_run_is_never_overwritten(tmp_path):
    launch(tmp_path, "--max_train_steps", "1", "--skip_out_of_domain", "true", "--calibrator", "none")
    before = (tmp_path / "model.safetensors").read_bytes()
    failed = launch(tmp_path, "--max_train_steps", "2", "--skip_out_of_domain", "true", check=False)
    assert failed.returncode != 0 and "holds a finished run" in failed.stderr and "--overwrite_output_dir" in failed.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == before
    launch(tmp_path, "--max_train_steps", "2", "--skip_out_of_domain", "true", "--calibrator", "none",
           "--overwrite_output_dir", "true")
    assert json.loads((tmp_path / "metrics.json").read_text())["run"]["train_steps"] == 2


def test_resume_latest_skips_a_checkpoint_interrupted_mid_write(tmp_path):
    """A run killed while writing step_4 (its progress.json, written last, missing) resumes from step_2 with
    `--resume_from_checkpoint latest` and ends with the uninterrupted run's weights."""
    common = ["--max_train_steps", "6", "--skip_out_of_domain", "true", "--checkpointing_steps", "2",
              "--calibrator", "none"]
    launch(tmp_path / "full", *common)
    # What a kill while step_4 is written leaves: step_2 complete, step_4 without its progress.json (written last)
    # and with a truncated weight file, no final model.
    import shutil

    interrupted = tmp_path / "interrupted"
    for step in ("step_2", "step_4"):
        shutil.copytree(tmp_path / "full" / step, interrupted / step)
    (interrupted / "step_4" / "progress.json").unlink()
    (interrupted / "step_4" / "model.safetensors").write_bytes(b"")
    result = launch(interrupted, *common, "--resume_from_checkpoint", "latest")
    assert f"resumed from {interrupted / 'step_2'} at step 2" in result.stderr
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpointing_steps", "often"], "--checkpointing_steps must be an integer, 'epoch' or 'none'"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--max_train_steps", "-1"], "--max_train_steps must be >= 0"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--num_warmup_steps", "-10"], "--num_warmup_steps must be >= 0"),
    (["--resume_from_checkpoint", "/nonexistent/step_3"], "no such checkpoint folder"),
])
def test_bad_flags_are_refused_before_training(tmp_path, monkeypatch, flags, message):
    train = _train_module()
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(ValueError, match=message):
        train.main()
    assert not any(tmp_path.iterdir())  # nothing written
