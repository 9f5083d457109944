"""examples/train.py end to end through `accelerate launch`, on a few steps of the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_caldetr.configuration import METHOD_FIELDS
from hf_caldetr.families import MODEL_FAMILIES
from safetensors.torch import load_file
from scripts import load_example

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--model_preset", "tiny", "--num_train_images", "32", "--num_validation_images", "16",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--report_to", "none",
            "--calibrator", "none"]  # the calibrated end of a run: test_the_run_ends_calibrated

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
                 "reliability_diagram.png", "uncertainty_diagram.png", "laece_diagram.png", "corruption_manifest.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("in_domain", "out_of_domain"):
        assert {"map", "map_50", "d_ece", "laece", "laece_iou_0.1", "lrp", "olrp", "laece_0", "laace_0", "oce",
                "d_uce"} <= set(metrics[split])
        assert metrics[split]["num_images"] == 16
    # --calibrator none holds no images out, so there is no split to find LRP-optimal thresholds on.
    assert "lrp_optimal_thresholds" not in metrics and "at_lrp_optimal_thresholds" not in metrics["in_domain"]
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
    # The baseline: the method off (the stock loss), every other choice shared with the Cal arms.
    assert (baseline["uncertainty_modulation"], baseline["use_logit_mixing"]) == ("none", False)
    assert baseline["num_boxes_normalization"] == released["num_boxes_normalization"] == "global"
    assert baseline["architectures"] == ["DeformableDetrForObjectDetection"]  # a stock checkpoint
    assert {k: v for k, v in baseline.items() if k not in ("id2label", "label2id", *METHOD_FIELDS)} == {
        k: v for k, v in released.items() if k not in ("id2label", "label2id", *METHOD_FIELDS)}
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
    assert "d_uce" in metrics["in_domain"] and (tmp_path / "uncertainty_diagram.png").is_file()


@pytest.fixture(scope="module")
def scoring_checkpoint(tmp_path_factory):
    """A tiny random Deformable DETR for the digits whose scores start near 0.6 (class bias 0.5), and a saved
    dataset (train, validation, calibration splits) labelled with its own top detections: a fine-tune of 2 steps
    at a tiny learning rate keeps detections above the protocol's 0.3 that are partly right, so a calibrator has
    both outcomes to fit on."""
    from datasets import DatasetDict
    from test_evaluate_script import self_labelled

    from hf_caldetr.data import build_image_processor
    from hf_caldetr.data.arguments import DataArguments, load_splits
    from hf_caldetr.training import build_model

    folder = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    model = build_model("baseline", {i: str(i) for i in range(10)}, preset="tiny")
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.fill_(0.5)
    model.save_pretrained(folder / "model")
    build_image_processor(96).save_pretrained(folder / "model")
    train, validation = load_splits(DataArguments(num_train_images=32, num_validation_images=48))
    DatasetDict({"train": self_labelled(folder / "model", train),
                 "validation": self_labelled(folder / "model", validation.select(range(16))),
                 "calibration": self_labelled(folder / "model", validation.select(range(16, 48)))}
                ).save_to_disk(str(folder / "data"))
    return folder


@pytest.mark.parametrize("calibrator", ["platt", "isotonic"])
def test_the_run_ends_calibrated(tmp_path, scoring_checkpoint, calibrator):
    launch(tmp_path, "--model_name_or_path", str(scoring_checkpoint / "model"), "--max_train_steps", "2",
           "--learning_rate", "1e-7", "--dataset_name", str(scoring_checkpoint / "data"),
           "--calibration_split", "calibration", "--num_calibration_images", "0", "--calibrator", calibrator,
           "--calibration_class_wise", "false")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["fitted_on"]["images"] == 32 and calibration["folded"] is (calibrator == "platt")
    for split in ("in_domain", "out_of_domain"):
        raw, calibrated = metrics["before_calibration"][split], metrics[split]
        assert raw["num_detections"] > 0 and raw["d_ece"] != calibrated["d_ece"]
        assert 0 <= raw["d_uce"] <= 1 and 0 <= calibrated["d_uce"] <= 1
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

    # The second protocol: per-class LRP-optimal thresholds found on the held-out split, for the raw and the
    # calibrated scores apart, then applied to the evaluated splits. The calibrated ones equal those found here, in
    # this process, for the saved checkpoint (its folded scores, or the saved calibrator on its scores).
    assert "LaECE_0, LRP-optimal thresholds" in card
    recorded = metrics["lrp_optimal_thresholds"]
    assert recorded["found_on"]["images"] == 32 and {"raw", "calibrated"} <= set(recorded)
    for split in ("in_domain", "out_of_domain"):
        for result in (metrics[split], metrics["before_calibration"][split]):
            assert {"laece_0", "laace_0", "lrp", "d_ece", "oce"} <= set(result["at_lrp_optimal_thresholds"])
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from hf_caldetr.calibrators import load_calibrator
    from hf_caldetr.data import make_collate_fn
    from hf_caldetr.data.arguments import DataArguments, load_calibration_split
    from hf_caldetr.evaluation import lrp_thresholds

    held_out = load_calibration_split(DataArguments(dataset_name=str(scoring_checkpoint / "data")), "calibration", 0, 1)
    model = AutoModelForObjectDetection.from_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    loader = torch.utils.data.DataLoader(held_out, batch_size=8, collate_fn=make_collate_fn(processor))
    score_map = None if calibrator == "platt" else load_calibrator(tmp_path / "calibrator.json")
    expected = lrp_thresholds(model, loader, processor, calibrator=score_map)
    assert recorded["calibrated"].keys() == {str(k) for k in expected}
    for key, value in expected.items():
        assert recorded["calibrated"][str(key)] == pytest.approx(value, rel=1e-6, nan_ok=True), key


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


KILLED_MID_CHECKPOINT = """
import os, runpy, sys
from pathlib import Path
import accelerate

save_state = accelerate.Accelerator.save_state

def killed_while_saving(self, output_dir=None, **kwargs):
    if output_dir and Path(output_dir).name == "step_4":
        save_state(self, output_dir, **kwargs)
        optimizer = Path(output_dir, "optimizer.bin")
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # cut short mid-write
        os._exit(137)  # SIGKILL's exit status: no cleanup, no progress.json
    return save_state(self, output_dir, **kwargs)

accelerate.Accelerator.save_state = killed_while_saving
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    """The process dies while step_4 is being written (its optimizer file half written, no progress.json): the
    same command with `--resume_from_checkpoint latest` resumes from step_2 and ends with the weights of a run
    that was never interrupted."""
    common = ["--max_train_steps", "6", "--skip_out_of_domain", "true", "--checkpointing_steps", "2"]
    launch(tmp_path / "full", *common)
    runner = tmp_path / "killed_mid_checkpoint.py"
    runner.write_text(KILLED_MID_CHECKPOINT)
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(runner), str(ROOT / "examples" / "train.py"), "--output_dir", str(interrupted),
               *TINY_RUN, *common]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert (interrupted / "step_4" / "model.safetensors").is_file()
    assert not (interrupted / "step_4" / "progress.json").exists() and not (interrupted / "model.safetensors").exists()
    result = launch(interrupted, *common, "--resume_from_checkpoint", "latest")
    assert f"resumed from {interrupted / 'step_2'} at step 2" in result.stderr
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    # The half-written step_4 was replaced by a complete one when the resumed run passed step 4.
    assert (interrupted / "step_4" / "progress.json").is_file()


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpointing_steps", "often"], "--checkpointing_steps must be an integer, 'epoch' or 'none'"),
    (["--logging_steps", "0"], "--logging_steps must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--max_train_steps", "-1"], "--max_train_steps must be >= 0"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--num_warmup_steps", "-10"], "--num_warmup_steps must be >= 0"),
    (["--resume_from_checkpoint", "/nonexistent/step_3"], "no such checkpoint folder"),
    (["--resume_from_checkpoint", "EMPTY_PROGRESS"], "not a complete checkpoint .no readable progress.json"),
])
def test_bad_flags_are_refused_before_training(tmp_path, monkeypatch, flags, message):
    train = load_example("train")
    if "EMPTY_PROGRESS" in flags:  # a checkpoint whose progress.json was cut short
        checkpoint = tmp_path.parent / f"{tmp_path.name}_checkpoint" / "step_3"
        checkpoint.mkdir(parents=True)
        (checkpoint / "progress.json").write_text("")
        flags = [str(checkpoint) if flag == "EMPTY_PROGRESS" else flag for flag in flags]
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(ValueError, match=message):
        train.main()
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(("flags", "message"), [
    (["--model_name_or_path", "/no/such/checkpoint"], "checkpoint folder /no/such/checkpoint does not exist"),
    (["--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    (["--push_to_hub", "true", "--hub_model_id", "not a repo id!"], "invalid Hub repo id"),
    (["--push_to_hub", "true", "--hub_model_id", "me/model"], "HF_HUB_OFFLINE=1"),
])
def test_checks_that_would_fail_after_training_fail_before_it(tmp_path, monkeypatch, flags, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    train = load_example("train")
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(ValueError, match=message):
        train.main()
    assert not any(tmp_path.iterdir())


def test_resuming_with_other_settings_is_refused(tmp_path):
    common = ["--max_train_steps", "2", "--skip_out_of_domain", "true", "--checkpointing_steps", "2",
              "--calibrator", "none"]
    launch(tmp_path / "run", *common)
    checkpoint = str(tmp_path / "run" / "step_2")
    for flags, named in ((["--method", "baseline"], "--method 'cal-detr' there, 'baseline' now"),
                         (["--model_preset", "small"], "--model_preset 'tiny' there, 'small' now")):
        failed = launch(tmp_path / "other", *common, *flags, "--resume_from_checkpoint", checkpoint, check=False)
        assert failed.returncode != 0 and named in failed.stderr


def _coco_folder(folder: Path, categories: list[dict], num_images: int = 8) -> tuple[str, str]:
    """A COCO folder of random 64x64 images, each with one box of the first category."""
    import numpy as np
    from PIL import Image

    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index in range(num_images):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images_dir / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "width": 64, "height": 64})
        annotations.append({"id": index, "image_id": index, "category_id": categories[0]["id"],
                            "bbox": [8, 8, 20, 24], "area": 480, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(images_dir)


def test_label_sets_travel_and_are_checked_by_name(tmp_path):
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    train_json, train_images = _coco_folder(tmp_path / "train", cats)
    reversed_json, reversed_images = _coco_folder(tmp_path / "reversed", [{"id": 3, "name": "dog"},
                                                                         {"id": 7, "name": "cat"}])
    coco = ["--train_annotations", train_json, "--train_images", train_images, "--image_size", "64",
            "--max_train_steps", "1", "--skip_out_of_domain", "true"]
    failed = launch(tmp_path / "bad", *coco, "--validation_annotations", reversed_json,
                    "--validation_images", reversed_images, check=False)
    assert failed.returncode != 0 and "differ from the training data's ['cat', 'dog']" in failed.stderr
    assert "training (" not in failed.stderr
    extra_json, extra_images = _coco_folder(tmp_path / "extra", [*cats, {"id": 9, "name": "bird"}])
    failed = launch(tmp_path / "bad_extra", *coco, "--validation_annotations", extra_json,
                    "--validation_images", extra_images, check=False)
    assert failed.returncode != 0 and "['cat', 'dog', 'bird'] differ from" in failed.stderr
    val_json, val_images = _coco_folder(tmp_path / "val", cats)
    launch(tmp_path / "good", *coco, "--validation_annotations", val_json, "--validation_images", val_images)
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"} and config["coco_category_ids"] == [3, 7]


def test_zero_steps_train_the_epochs_and_zero_checkpointing_saves_none(tmp_path):
    """Documented: --max_train_steps 0 trains --num_train_epochs epochs; --checkpointing_steps 0 (or none) saves
    no step checkpoints."""
    launch(tmp_path, "--max_train_steps", "0", "--num_train_epochs", "1", "--checkpointing_steps", "0",
           "--skip_out_of_domain", "true")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["train_steps"] == 8  # 32 images / batch 4, one epoch
    assert not list(tmp_path.glob("step_*")) and not list(tmp_path.glob("epoch_*"))


def test_coco_folders_hold_out_a_tenth_of_the_training_images_for_calibration(tmp_path):
    """Neither training nor evaluation images: 2 of 20 training images are held out before training, and the
    calibrator is fitted on them."""
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    train_json, train_images = _coco_folder(tmp_path / "train", cats, num_images=20)
    val_json, val_images = _coco_folder(tmp_path / "val", cats)
    result = launch(tmp_path / "run", "--train_annotations", train_json, "--train_images", train_images,
                    "--validation_annotations", val_json, "--validation_images", val_images, "--image_size", "64",
                    "--max_train_steps", "1", "--skip_out_of_domain", "true", "--calibrator", "platt")
    assert "data: 18 train / 8 validation images, 2 classes" in result.stderr
    calibration = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"]
    assert calibration["fitted_on"]["images"] == 2 and calibration["fitted_on"]["source"] == "held-out training images"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["folded_calibration"][0]["kind"] == "PlattScaling"


@pytest.mark.parametrize("model_type", sorted(set(MODEL_FAMILIES) - {"deformable_detr"}))
def test_every_registered_family_trains_and_evaluates(tmp_path, model_type):
    """The main job's script with ``--model_type`` of each family (Deformable DETR: the tests above): 2 steps of the
    tiny preset, evaluation and a checkpoint the stock class loads with the method's settings riding along."""
    launch(tmp_path, "--model_type", model_type, "--max_train_steps", "2", "--skip_out_of_domain", "true")
    config = json.loads((tmp_path / "config.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    family = MODEL_FAMILIES[model_type]
    assert config["model_type"] == model_type and config["architectures"] == [family.model_class.__name__]
    assert config["uncertainty_modulation"] == "multiplicative" and config["use_logit_mixing"] is True
    assert metrics["run"]["train_steps"] == 2
    in_domain = metrics["in_domain"]
    assert in_domain["num_images"] == 16 and 0 <= in_domain["map"] <= 1
    # D-FINE and DEIMv2 compute the final layer only at inference: no uncertainty to report.
    assert ("d_uce" in in_domain) == (family.layer_logits is not None)
    model = family.model_class.from_pretrained(tmp_path)
    assert type(model) is family.model_class
