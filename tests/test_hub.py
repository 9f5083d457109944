"""The Hub path, offline, on a folder from a real (short) run of examples/train.py: stock loading, the card, the
file list, the dry run, and every refusal before an upload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection, DeformableDetrForObjectDetection, pipeline

from hf_caldetr import CalDeformableDetrForObjectDetection
from hf_caldetr.hub import (
    CAL_FIELDS,
    TEMPLATE_PATH,
    HubExportError,
    classify_entries,
    hub_files,
    push_folder,
    render_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/cal-detr-tiny"
TOP_LEVEL_FILES = ["README.md", "config.json", "corruption_manifest.json", "example.png", "laece_diagram.png",
                   "metrics.json",
                   "model.safetensors", "preprocessor_config.json", "reliability_diagram.png",
                   "uncertainty_diagram.png"]


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("run") / "cal-detr-tiny"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "train.py"),
               "--output_dir", str(output_dir), "--max_train_steps", "5", "--model_preset", "tiny",
               "--num_train_images", "32", "--num_validation_images", "16", "--per_device_train_batch_size", "4",
               "--checkpointing_steps", "5", "--report_to", "tensorboard", "--calibrator", "none"]
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_dir


@pytest.fixture
def folder(trained_folder, tmp_path) -> Path:
    """A private copy to change."""
    return Path(shutil.copytree(trained_folder, tmp_path / trained_folder.name))


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """Record (instead of run) every call that could create a repo or upload, at module and HfApi level."""
    calls = []
    for name in ("create_repo", "upload_folder", "upload_file", "create_commit", "upload_large_folder"):
        def record(*args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            if _name != "upload_folder":
                return None
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{REPO_ID}/commit/0",
                                              commit_message="", commit_description="", oid="0" * 40)

        monkeypatch.setattr(huggingface_hub, name, record, raising=False)
        monkeypatch.setattr(huggingface_hub.HfApi, name, record, raising=False)
    return calls


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "tokens"))


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------- the widget path


def test_stock_auto_class_and_pipeline_run_the_checkpoint(trained_folder):
    image = Image.open(trained_folder / "example.png")
    model = AutoModelForObjectDetection.from_pretrained(trained_folder).eval()
    assert type(model) is DeformableDetrForObjectDetection
    processor = AutoImageProcessor.from_pretrained(trained_folder)
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits

    detector = pipeline("object-detection", model=str(trained_folder), device="cpu")
    detections = detector(image, threshold=0.0)
    assert len(detections) == 100                              # the top 100 of the 12 x 10 sigmoid scores
    names = set(model.config.id2label.values())
    assert {detection["label"] for detection in detections} <= names
    assert all(set(d["box"]) == {"xmin", "ymin", "xmax", "ymax"} for d in detections)
    scores = sorted((d["score"] for d in detections), reverse=True)
    expected = torch.sigmoid(logits[0]).flatten().sort(descending=True).values[:100]
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


def test_cal_class_restores_cal_settings_and_infers_like_the_stock_model(trained_folder):
    config = json.loads((trained_folder / "config.json").read_text())
    cal = CalDeformableDetrForObjectDetection.from_pretrained(trained_folder).eval()
    for field in CAL_FIELDS:
        assert getattr(cal.config, field) == config[field]
    assert (cal.config.uncertainty_modulation, cal.config.use_logit_mixing) == ("multiplicative", True)
    stock = AutoModelForObjectDetection.from_pretrained(trained_folder).eval()
    pixel_values = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cal(pixel_values=pixel_values).logits, stock(pixel_values=pixel_values).logits)


# ------------------------------------------------------------------------------------------------- the card


def test_card_written_by_training_holds_the_metrics(trained_folder):
    card = ModelCard.load(trained_folder / "README.md")
    metrics = _metrics(trained_folder)
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "object-detection", "apache-2.0")
    assert {"cal-detr", "calibration", "object-detection", "deformable-detr"} <= set(data.tags)
    assert data.widget == [{"src": "example.png", "example_title": "hf_caldetr digit scenes (validation image)"}]
    found = {(result.dataset_config, result.metric_type): result.metric_value for result in data.eval_results}
    expected = {(config, key): round(100 * metrics[split][key], 2)
                for split, config in (("in_domain", "clean"), ("out_of_domain", "corrupted"))
                for key in ("map", "map_50", "d_ece", "laece")}
    assert found == expected
    assert all(result.task_type == "object-detection" and result.dataset_split == "validation"
               for result in data.eval_results)
    # The body: results table row, diagram, training record, all from the files.
    d_ece = [f"{100 * metrics[split]['d_ece']:.2f}" for split in ("in_domain", "out_of_domain")]
    assert f"| D-ECE | {d_ece[0]} | {d_ece[1]} |" in card.text
    assert "![Reliability diagram" in card.text and "(reliability_diagram.png)" in card.text
    assert f"| optimizer steps | {metrics['run']['train_steps']} |" in card.text
    assert "| `uncertainty_modulation` | `multiplicative` |" in card.text
    assert "CalDeformableDetrForObjectDetection.from_pretrained(" in card.text
    assert 'pipeline("object-detection"' in card.text and "@inproceedings{munir2023caldetr" in card.text
    assert data.base_model is None and data.datasets is None       # random init, embedded data: nothing to link


def test_card_links_base_model_and_dataset_of_a_fine_tuning_run(folder):
    metrics = _metrics(folder)
    metrics["run"]["arguments"].update(model_name_or_path="SenseTime/deformable-detr", dataset_name="cppe-5",
                                       validation_split="test")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    card = render_model_card(folder, repo_id=REPO_ID)
    assert card.data.base_model == "SenseTime/deformable-detr"
    assert card.data.datasets == ["cppe-5"]
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("cppe-5", "test")}
    assert card.data.widget[0]["src"] == f"https://huggingface.co/{REPO_ID}/resolve/main/example.png"
    assert f'from_pretrained("{REPO_ID}")' in card.text
    assert "| initialisation | `SenseTime/deformable-detr` |" in card.text


def test_hub_cards_template_is_the_packaged_one():
    assert TEMPLATE_PATH.read_text() == (ROOT / "hub_cards" / "model_card.md").read_text()


# ---------------------------------------------------------------------------------------------- the upload


def test_hub_files_leave_checkpoints_and_logs_out_unless_asked(trained_folder):
    assert [path for _, path in hub_files(trained_folder)] == TOP_LEVEL_FILES
    with_extras = [path for _, path in hub_files(trained_folder, include_checkpoints=True, include_logs=True)]
    assert "step_5/progress.json" in with_extras and "step_5/model.safetensors" in with_extras
    assert any(path.startswith("hf_caldetr/") and "tfevents" in path for path in with_extras)


def test_a_checkpoint_cut_short_is_never_uploaded(folder):
    shutil.copytree(folder / "step_5", folder / "step_10")
    (folder / "step_10" / "progress.json").unlink()  # written last: a kill mid-write leaves none
    kinds = dict((path.name, kind) for path, kind in classify_entries(folder))
    assert kinds["step_5"] == "checkpoint" and kinds["step_10"] == "partial checkpoint"
    uploaded = [path for _, path in hub_files(folder, include_checkpoints=True)]
    assert "step_5/model.safetensors" in uploaded and not any(path.startswith("step_10/") for path in uploaded)


def test_dry_run_script_lists_every_file_and_uploads_nothing(trained_folder, tmp_path):
    folder = Path(shutil.copytree(trained_folder, tmp_path / "model"))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "push_to_hub.py"), str(folder), "--hub_model_id", REPO_ID,
         "--private", "--dry_run"], env=_env(HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=""),
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0].startswith(f"dry run: nothing uploaded. Would create (if missing, private) the model repo "
                               f"{REPO_ID} and upload {len(TOP_LEVEL_FILES)} files")
    listed = [line.strip() for line in lines if "  ->  " in line]
    assert listed == [f"{folder / name}  ->  hf://{REPO_ID}/{name}" for name in TOP_LEVEL_FILES]
    assert any("step_5/" in line and "checkpoint" in line for line in lines)
    # The card was refreshed for the repo id (the widget needs an absolute URL).
    assert ModelCard.load(folder / "README.md").data.widget[0]["src"].startswith(f"https://huggingface.co/{REPO_ID}/")


def test_push_uploads_exactly_the_listed_files(folder, hub_calls):
    result = push_folder(folder, REPO_ID, private=True, token="hf_fake")
    names = [call[0] for call in hub_calls]
    assert names == ["create_repo", "upload_folder"]
    (_, create_args, create_kwargs), (_, _, upload_kwargs) = hub_calls
    assert create_args == (REPO_ID,) and create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert upload_kwargs["repo_id"] == REPO_ID and upload_kwargs["folder_path"] == str(folder)
    assert upload_kwargs["allow_patterns"] == TOP_LEVEL_FILES and upload_kwargs["token"] == "hf_fake"
    assert result.commit_url == f"https://huggingface.co/{REPO_ID}/commit/0"


def test_push_without_a_token_is_a_clear_error(folder, hub_calls, no_token):
    with pytest.raises(huggingface_hub.errors.LocalTokenNotFoundError, match="no Hugging Face token.*hf auth login"):
        push_folder(folder, REPO_ID)
    assert hub_calls == []
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import push_to_hub
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert push_to_hub.main([str(folder), "--hub_model_id", REPO_ID]) == 1
    assert hub_calls == []


def _drop_weights(folder):
    (folder / "model.safetensors").unlink()


def _drop_config(folder):
    (folder / "config.json").unlink()


def _drop_metric(folder):
    metrics = _metrics(folder)
    del metrics["in_domain"]["d_ece"], metrics["out_of_domain"]["map"]
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _drop_run(folder):
    metrics = _metrics(folder)
    del metrics["run"]
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _custom_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["CalDeformableDetrForObjectDetection"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("break_folder, message", [
    (_drop_weights, "no weights in .*model.safetensors"),
    (_drop_config, r"lacks \['config.json'\]"),
    (_drop_metric, r"'in_domain' lacks \['d_ece'\]; 'out_of_domain' lacks \['map'\]"),
    (_drop_run, "no 'run' record"),
    (_custom_architecture, "stock transformers cannot load it"),
])
def test_bad_folder_is_refused_before_any_upload(folder, hub_calls, break_folder, message):
    break_folder(folder)
    with pytest.raises(HubExportError, match=message):
        push_folder(folder, REPO_ID, token="hf_fake")
    assert hub_calls == []


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("{{ results_table }}", ""), r"lacks the required field\(s\) \['results_table'\]"),
    (lambda text: text + "\n{{ training_curves }}\n", r"uses field\(s\) \['training_curves'\] that the card does not"),
    (lambda text: text + "\n{% if %}\n", r"card template .*template.md, line \d+: "),
])
def test_bad_card_template_is_refused_before_any_upload(folder, hub_calls, tmp_path, edit, message):
    template = tmp_path / "template.md"
    template.write_text(edit(TEMPLATE_PATH.read_text()))
    card_before = (folder / "README.md").read_text()
    with pytest.raises(HubExportError, match=message):
        push_folder(folder, REPO_ID, token="hf_fake", template_path=template)
    assert hub_calls == [] and (folder / "README.md").read_text() == card_before


def test_bad_repo_id_is_refused_before_any_upload(folder, hub_calls):
    with pytest.raises(HubExportError, match="invalid Hub repo id"):
        push_folder(folder, "not a repo id!", token="hf_fake")
    assert hub_calls == []


def test_card_of_a_run_without_confident_detections_says_so(folder):
    """A real case (an undertrained default run): no score reaches the threshold, D-ECE is NaN in metrics.json."""
    metrics = _metrics(folder)
    metrics["in_domain"].update(d_ece=float("nan"), laece=float("nan"), position_d_ece=float("nan"), num_detections=0)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    card = render_model_card(folder)
    types = {(result.dataset_config, result.metric_type) for result in card.data.eval_results}
    assert ("clean", "d_ece") not in types and ("clean", "map") in types and ("corrupted", "d_ece") in types
    out_of_domain = f"{100 * metrics['out_of_domain']['d_ece']:.2f}"
    assert f"| D-ECE | n/a | {out_of_domain} |" in card.text
    assert "In-domain: 0 detections scored at least 0.3, so the calibration errors are undefined" in card.text


def test_card_of_a_baseline_run_without_out_of_domain_claims_no_cal_detr(folder):
    config = json.loads((folder / "config.json").read_text())
    for field in CAL_FIELDS:
        del config[field]
    (folder / "config.json").write_text(json.dumps(config))
    metrics = _metrics(folder)
    del metrics["out_of_domain"]
    metrics["run"]["method"] = "baseline"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    card = render_model_card(folder)
    assert "cal-detr" not in card.data.tags and "cal-detr-baseline" in card.data.tags
    assert {result.dataset_config for result in card.data.eval_results} == {"clean"}
    assert "without Cal-DETR" in card.text and "None: this is the stock model" in card.text
    assert "| metric | in-domain |\n" in card.text and "Not evaluated out of domain" in card.text


def test_card_says_when_a_calibrator_travels_with_the_checkpoint(folder):
    import numpy as np

    from hf_caldetr.calibrators import TemperatureScaling
    from hf_caldetr.hub import hub_files, render_model_card

    assert "Post-hoc calibrator" not in str(render_model_card(folder))
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.3, 1.0, 200)
    TemperatureScaling().fit(scores, rng.uniform(size=200) < scores * 0.7).save(folder / "calibrator.json")
    card = str(render_model_card(folder))
    assert "Post-hoc calibrator" in card and "TemperatureScaling, class-agnostic" in card
    assert "calibrator.json" in [str(repo_path) for _, repo_path in hub_files(folder)]
