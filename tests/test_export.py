"""ONNX export, int8 quantization and the exported model's evaluation (examples/export.py, examples/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_example
from test_folding import build, fitted

from hf_caldetr import fold_calibrator
from hf_caldetr.data import build_image_processor
from hf_caldetr.evaluation import flatten_summary
from hf_caldetr.export import OnnxDetector, export_onnx, fold_into_onnx, quantize_onnx
from hf_caldetr.training import MODEL_FAMILIES

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# RT-DETR's tiny default init (initializer_range 0.01) makes every encoder score equal, so its top-k query selection
# is a tie that PyTorch and onnxruntime break differently; a wider init gives a real ranking.
FAMILY_OVERRIDES = {"deformable_detr": {}, "detr": {}, "rt_detr": {"initializer_range": 0.3}}


def checkpoint(family: str, folder: Path, score_bias: float | None = None, names=None):
    model = build(family, names=names, **FAMILY_OVERRIDES[family])
    if score_bias is not None:  # random heads score ~0.01; lift them so the protocol's 0.3 cut keeps detections
        with torch.no_grad():
            MODEL_FAMILIES[family].final_class_head(model).bias.fill_(score_bias)
    model.save_pretrained(folder)
    build_image_processor(SIZE, MODEL_FAMILIES[family].image_processor_class).save_pretrained(folder)
    return model


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_onnxruntime_matches_pytorch(tmp_path, family):
    model = checkpoint(family, tmp_path / "model")
    path = export_onnx(model, tmp_path / "onnx" / "model.onnx", SIZE, SIZE)
    assert not model.training
    (tmp_path / "onnx" / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    exported = OnnxDetector(path)
    for batch in (2, 3):  # traced at batch 2; the batch axis is dynamic
        pixel_values = pixels(batch, seed=batch)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
        actual = exported(pixel_values=pixel_values)
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr"])
def test_fold_into_onnx_equals_the_folded_pytorch_model(tmp_path, family):
    model = checkpoint(family, tmp_path / "model")
    export_dir = tmp_path / "onnx"
    export_onnx(model, export_dir / "model.onnx", SIZE, SIZE)
    for name in ("config.json", "preprocessor_config.json"):
        (export_dir / name).write_bytes((tmp_path / "model" / name).read_bytes())
    calibrator = fitted("platt", class_wise=True)
    with pytest.raises(ValueError, match="another folder"):
        fold_into_onnx(export_dir / "model.onnx", calibrator, export_dir / "calibrated.onnx")
    path = fold_into_onnx(export_dir / "model.onnx", calibrator, tmp_path / "calibrated" / "model.onnx")
    fold_calibrator(model, calibrator)
    pixel_values = pixels(2)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    folded = OnnxDetector(path)
    torch.testing.assert_close(folded(pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-4)
    assert folded.config.folded_calibration[0]["kind"] == "PlattScaling"


@pytest.mark.slow
def test_export_script_int8_and_evaluate_script(tmp_path):
    """examples/export.py writes fp32 + int8 (dynamic and static); examples/evaluate.py measures the int8 model,
    refits and folds Platt scaling for it, and saves the calibrated ONNX model."""
    checkpoint("deformable_detr", tmp_path / "model", score_bias=0.5, names=[str(digit) for digit in range(10)])
    export = load_example("export")
    data = ["--image_size", str(SIZE), "--num_train_images", "16", "--num_validation_images", "12"]
    written = export.main([str(tmp_path / "model"), "--output", str(tmp_path / "onnx" / "model.onnx"),
                           "--quantize", "static", "--num_calibration_batches", "2", "--calibration_batch_size", "4",
                           *data])
    assert written["max_difference"]["logits"] < 1e-4
    static_int8 = Path(written["int8"])
    dynamic = quantize_onnx(tmp_path / "onnx" / "model.onnx", tmp_path / "onnx" / "model.dynamic.onnx", "dynamic")
    import onnx

    def op_types(path):
        return {node.op_type for node in onnx.load(str(path)).graph.node}

    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types(dynamic)  # int8 matrix multiplications
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(static_int8)  # int8 activations (QDQ)
    assert not {"QuantizeLinear", "MatMulInteger"} & op_types(tmp_path / "onnx" / "model.onnx")

    evaluate = load_example("evaluate")
    metrics = evaluate.main(["--model_name_or_path", str(static_int8), "--output_dir", str(tmp_path / "eval"),
                             "--fit_calibrator", "platt", "--num_calibration_images", "40",
                             "--save_calibrated_model", str(tmp_path / "int8-calibrated"), "--skip_out_of_domain",
                             *data])
    for split in ("in_domain",):
        assert metrics[split]["num_images"] == 12 and np.isfinite(metrics[split]["map"])
        raw = metrics["before_calibration"][split]
        assert raw["num_images"] == 12 and raw["num_detections"] > 0 and 0 <= raw["d_ece"] <= 1
    assert metrics["evaluation"]["calibrator"]["folded"] is True
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["in_domain"].keys() == metrics["in_domain"].keys()
    np.testing.assert_array_equal(list(flatten_summary(saved["in_domain"]).values()),
                                  list(flatten_summary(metrics["in_domain"]).values()))
    calibrated = OnnxDetector(tmp_path / "int8-calibrated" / "model.onnx")
    assert calibrated.config.folded_calibration[0]["kind"] == "PlattScaling"
    # The saved calibrated int8 model, evaluated again, gives the calibrated numbers.
    again = evaluate.main(["--model_name_or_path", str(tmp_path / "int8-calibrated" / "model.onnx"),
                           "--output_dir", str(tmp_path / "eval2"), "--skip_out_of_domain",
                           "--num_calibration_images", "40", *data])  # the same held-out images for the thresholds
    np.testing.assert_allclose(list(flatten_summary(again["in_domain"]).values()),
                               list(flatten_summary(metrics["in_domain"]).values()), atol=1e-9)


@pytest.mark.slow
def test_evaluate_refits_a_calibrated_checkpoint_on_its_raw_scores(tmp_path):
    """A checkpoint that already holds a folded calibration (what train.py ships) is unfolded before a new
    calibrator is fitted: the new fold replaces the old one rather than stacking on it, and `before_calibration`
    is the raw model's."""
    names = [str(digit) for digit in range(10)]
    model = checkpoint("deformable_detr", tmp_path / "raw", score_bias=0.5, names=names)
    fold_calibrator(model, fitted("temperature"), fitted_on={"source": "test"})
    model.save_pretrained(tmp_path / "shipped")
    (tmp_path / "shipped" / "preprocessor_config.json").write_bytes(
        (tmp_path / "raw" / "preprocessor_config.json").read_bytes())
    evaluate = load_example("evaluate")
    data = ["--image_size", str(SIZE), "--num_validation_images", "12", "--skip_out_of_domain", "true"]
    with pytest.raises(ValueError, match="checkpoint's own folder"):
        evaluate.main(["--model_name_or_path", str(tmp_path / "shipped"), "--fit_calibrator", "platt",
                       "--save_calibrated_model", str(tmp_path / "shipped"), "--output_dir", str(tmp_path / "x"), *data])
    # The same 40 held-out images for both, so that the LRP-optimal thresholds (the second protocol) agree too.
    raw = evaluate.main(["--model_name_or_path", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "e0"),
                         "--num_calibration_images", "40", *data])
    refit = evaluate.main(["--model_name_or_path", str(tmp_path / "shipped"), "--fit_calibrator", "platt",
                           "--num_calibration_images", "40", "--save_calibrated_model", str(tmp_path / "refit"),
                           "--output_dir", str(tmp_path / "e1"), *data])
    np.testing.assert_allclose(list(flatten_summary(refit["before_calibration"]["in_domain"]).values()),
                               list(flatten_summary(raw["in_domain"]).values()), atol=1e-6)
    records = json.loads((tmp_path / "refit" / "config.json").read_text())["folded_calibration"]
    assert [record["kind"] for record in records] == ["PlattScaling"]
