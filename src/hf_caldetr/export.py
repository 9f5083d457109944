"""ONNX export and int8 quantization of a detector checkpoint, and an onnxruntime model that evaluates like the
PyTorch one.

optimum-onnx (0.1) requires transformers < 4.58, so it cannot serve transformers 5; the export uses
``torch.onnx.export`` directly. The graph takes ``pixel_values`` ``[batch, 3, H, W]`` (and ``pixel_mask``
``[batch, H, W]`` where the architecture reads one) and returns ``logits`` and ``pred_boxes`` exactly as the
PyTorch model's output fields of those names. The batch axis is dynamic; the image size is the one the
checkpoint's image processor resizes to (the traced graph holds size-dependent constants such as the
deformable attention's spatial shapes), so feed it what the processor produces.

Folding a calibrator into the weights (``hf_caldetr.fold_calibrator``) before export carries the calibrated
scores into the ONNX and int8 models; ``OnnxDetector`` lets ``examples/evaluate.py`` measure them, and refit and
fold a calibrator for a quantized model (see ``fold_into_onnx``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["OnnxDetector", "export_onnx", "fold_into_onnx", "onnx_input_size", "quantize_onnx"]

COPIED_FILES = ("config.json", "preprocessor_config.json")
"""Written beside the ONNX file, so the folder holds what evaluation and the post-processing need."""


class _LogitsAndBoxes(torch.nn.Module):
    """The detector's forward with plain tensor inputs and the two outputs post-processing reads."""

    def __init__(self, model, uses_pixel_mask: bool):
        super().__init__()
        self.model = model
        self.uses_pixel_mask = uses_pixel_mask

    def forward(self, pixel_values, pixel_mask=None):
        if self.uses_pixel_mask:
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        else:
            outputs = self.model(pixel_values=pixel_values)
        return outputs.logits, outputs.pred_boxes


def onnx_input_size(image_processor) -> tuple[int, int]:
    """``(height, width)`` every image is resized to, from an image processor with an exact ``size``."""
    size = dict(getattr(image_processor, "size", None) or {})
    if "height" in size and "width" in size and getattr(image_processor, "do_resize", True):
        return int(size["height"]), int(size["width"])
    raise ValueError(
        f"the image processor resizes to {size or 'nothing'} (do_resize={getattr(image_processor, 'do_resize', None)}): "
        "an ONNX export needs one fixed input size; save the checkpoint with a processor of "
        "size={'height': H, 'width': W} (examples/train.py --image_size does)")


def _uses_pixel_mask(model) -> bool:
    # RT-DETR's forward accepts a pixel_mask and ignores it; exporting it would leave an unused graph input.
    return model.config.model_type not in ("rt_detr", "rt_detr_v2", "d_fine")


@torch.no_grad()
def export_onnx(model, path, height: int, width: int, opset_version: int = 17, batch_size: int = 2) -> Path:
    """Export ``model`` (eval mode) to ``path``; returns the path.

    Inputs ``pixel_values`` (and ``pixel_mask``), outputs ``logits`` and ``pred_boxes``, dynamic batch axis.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    uses_mask = _uses_pixel_mask(model)
    # eval() on the wrapper too: a new module starts in training mode, and the exporter restores that mode
    # (through the wrapper, onto the model) when it finishes.
    wrapper = _LogitsAndBoxes(model, uses_mask).eval()
    pixel_values = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    inputs, names, axes = (pixel_values,), ["pixel_values"], {"pixel_values": {0: "batch"}}
    if uses_mask:
        inputs += (torch.ones(batch_size, height, width, dtype=torch.long),)
        names.append("pixel_mask")
        axes["pixel_mask"] = {0: "batch"}
    axes.update({"logits": {0: "batch"}, "pred_boxes": {0: "batch"}})
    try:
        # The TorchScript exporter: torch.export (dynamo=True) stops at the data-dependent checks in
        # transformers' DETR encoders (e.g. `if not torch.isfinite(hidden_states).all()`).
        torch.onnx.export(wrapper, inputs, str(path), input_names=names, output_names=["logits", "pred_boxes"],
                          dynamic_axes=axes, opset_version=opset_version, dynamo=False)
    finally:
        model.train(was_training)
    return path


def copy_checkpoint_files(model_dir, destination) -> None:
    """``config.json`` and ``preprocessor_config.json`` of ``model_dir`` into ``destination`` (when different)."""
    model_dir, destination = Path(model_dir), Path(destination)
    for name in COPIED_FILES:
        source = model_dir / name
        if source.is_file() and source.resolve() != (destination / name).resolve():
            shutil.copyfile(source, destination / name)


DYNAMIC_QUANTIZED_OPS = ["MatMul", "Gemm"]


class _ImageReader:
    """onnxruntime's calibration-data reader protocol (``get_next``) over processed image batches."""

    def __init__(self, batches: list[dict]):
        self._all = batches
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):
        self._batches = iter(self._all)


def quantize_onnx(fp32_path, int8_path, mode: str = "dynamic", calibration_batches: list[dict] | None = None) -> Path:
    """An int8 copy of an exported model, by ``onnxruntime.quantization``.

    ``mode="dynamic"``: int8 weights of the matrix multiplications (the transformer's linear layers), activations
    quantized on the fly (no data needed); convolutions stay fp32, because onnxruntime's integer convolution
    (``ConvInteger``) ran slower than the fp32 one on CPU (benchmarks/results/deployment.md). ``mode="static"``:
    int8 weights and activations (QDQ format), activation ranges measured on ``calibration_batches`` (dicts of
    numpy inputs named as the graph's inputs, e.g. a few training batches); per-channel weights.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if mode == "dynamic":
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=DYNAMIC_QUANTIZED_OPS)
        return int8_path
    if mode != "static":
        raise ValueError(f"quantization mode must be 'dynamic' or 'static', got {mode!r}")
    if not calibration_batches:
        raise ValueError("static quantization needs calibration_batches (images to measure activation ranges on)")
    prepared = int8_path.with_suffix(".preprocessed.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    reader = type("Reader", (_ImageReader, CalibrationDataReader), {})(calibration_batches)
    try:
        quantize_static(str(prepared), str(int8_path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        prepared.unlink(missing_ok=True)
    return int8_path


class _Outputs(dict):
    """What post-processing reads from a model output: attribute and key access to ``logits`` / ``pred_boxes``."""

    __getattr__ = dict.__getitem__


class OnnxDetector:
    """An exported detector in onnxruntime, called like the PyTorch model by the evaluation code.

    ``OnnxDetector("folder/model.onnx")`` reads ``config.json`` beside the file (``model.config``: labels, model
    type, any folded calibration); ``model(pixel_values=..., pixel_mask=...)`` returns torch ``logits`` and
    ``pred_boxes``. ``eval()`` / ``train()`` exist for the evaluation loop; it never trains.
    """

    def __init__(self, path, threads: int | None = None):
        import onnxruntime
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{path}: no such ONNX file")
        if not (self.path.parent / "config.json").is_file():
            raise ValueError(f"{path}: no config.json beside it; export with examples/export.py, which copies the "
                             "checkpoint's config.json and preprocessor_config.json next to the model")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(self.path.parent)
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("an ONNX model cannot be trained")
        return self

    def __call__(self, pixel_values, pixel_mask=None, **unused):
        feeds = {"pixel_values": pixel_values.detach().cpu().float().numpy()}
        if "pixel_mask" in self.input_names:
            mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:]) if pixel_mask is None else pixel_mask
            feeds["pixel_mask"] = mask.detach().cpu().long().numpy()
        logits, boxes = self.session.run(["logits", "pred_boxes"], feeds)
        return _Outputs(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))


def fold_into_onnx(path, calibrator, output_path, fitted_on: dict | None = None) -> Path:
    """Fold an affine calibrator into an exported (possibly quantized) ONNX model's output logits.

    After int8 quantization the head's weights are quantized tensors, so the fold is written as one
    ``logits' = logits * slope + offset`` (``Mul`` + ``Add``) at the graph's ``logits`` output: the same map as
    ``fold_calibrator`` writes into the weights of a PyTorch model, at the cost of two element-wise ops. The
    config beside ``output_path`` records it like ``fold_calibrator`` does.
    """
    import onnx
    from onnx import helper, numpy_helper

    from .folding import FOLD_RECORD_KEY, affine_logit_map
    from .calibrators import SoftmaxTemperatureScaling

    path, output_path = Path(path), Path(output_path)
    if output_path.parent.resolve() == path.parent.resolve():
        raise ValueError(f"write the calibrated model to another folder than {path.parent}: the config.json beside "
                         "it records the fold, and would then describe the uncalibrated model too")
    config = json.loads((path.parent / "config.json").read_text())
    from .families import MODEL_FAMILIES

    family = MODEL_FAMILIES.get(config.get("model_type"))
    if family is not None and family.softmax_head:
        if not isinstance(calibrator, SoftmaxTemperatureScaling):
            raise ValueError("a DETR (softmax) model takes SoftmaxTemperatureScaling only, see hf_caldetr.folding")
        columns = len(config["id2label"]) + 1
        slope, offset = np.full(columns, 1.0 / calibrator.temperature), np.zeros(columns)
    else:
        slope, offset = affine_logit_map(calibrator, len(config["id2label"]))
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    (logits_output,) = [output for output in graph.output if output.name == "logits"]
    raw_name = "logits_before_calibration"
    for node in graph.node:
        node.output[:] = [raw_name if name == "logits" else name for name in node.output]
        node.input[:] = [raw_name if name == "logits" else name for name in node.input]
    graph.initializer.extend([numpy_helper.from_array(slope.astype(np.float32), "calibration_slope"),
                              numpy_helper.from_array(offset.astype(np.float32), "calibration_offset")])
    graph.node.extend([helper.make_node("Mul", [raw_name, "calibration_slope"], ["logits_scaled"]),
                       helper.make_node("Add", ["logits_scaled", "calibration_offset"], [logits_output.name])])
    output_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph_model, str(output_path))
    record = {"kind": type(calibrator).__name__, "class_wise": bool(calibrator.class_wise),
              "calibrator": calibrator.to_dict(), "logit_slope": slope.tolist(), "logit_offset": offset.tolist(),
              "fitted_on": fitted_on, "written_as": "onnx Mul+Add at the logits output"}
    config[FOLD_RECORD_KEY] = list(config.get(FOLD_RECORD_KEY) or []) + [record]
    (output_path.parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if output_path.parent != path.parent:
        preprocessor = path.parent / "preprocessor_config.json"
        if preprocessor.is_file():
            shutil.copyfile(preprocessor, output_path.parent / "preprocessor_config.json")
    return output_path
