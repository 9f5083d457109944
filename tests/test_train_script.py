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
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--report_to", "none"]

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
