"""Export a detector checkpoint (Deformable DETR, DETR, RT-DETR; calibration folded or not) to ONNX, optionally int8.

    python examples/export.py outputs/cal-detr-digits --output outputs/onnx/model.onnx
    python examples/export.py outputs/cal-detr-digits --output outputs/onnx/model.onnx --quantize dynamic
    python examples/export.py outputs/cal-detr-digits --output outputs/onnx/model.onnx --quantize static

The graph takes ``pixel_values`` (and ``pixel_mask`` for DETR / Deformable DETR) as the checkpoint's image
processor makes them, and returns ``logits`` and ``pred_boxes`` as the PyTorch model does; the batch axis is
dynamic, the image size is the processor's. ``config.json`` and ``preprocessor_config.json`` are copied beside it,
so ``examples/evaluate.py --model_name_or_path outputs/onnx/model.onnx`` measures it like a PyTorch checkpoint.
A calibrator folded into the checkpoint (``examples/train.py`` does so) is in the exported weights too.
``--quantize`` also writes ``model.int8.onnx`` (``onnxruntime.quantization``: ``dynamic`` int8 weights, or
``static`` int8 weights and activations with ranges measured on ``--num_calibration_batches`` batches of training
images of the data flags, the embedded digits default unless told otherwise). Quantization shifts the scores:
refit and fold a calibrator for the int8 model with ``examples/evaluate.py --fit_calibrator platt``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection, HfArgumentParser

from hf_caldetr.data import make_collate_fn
from hf_caldetr.data.arguments import DataArguments, load_splits
from hf_caldetr.export import copy_checkpoint_files, export_onnx, onnx_input_size, quantize_onnx

logger = logging.getLogger("export")


@dataclass
class ExportArguments:
    model_dir: str = field(metadata={"help": "a checkpoint folder (examples/train.py's output, plain or folded)"})
    output: str = field(default="model.onnx", metadata={
        "help": "the ONNX file to write; its folder also receives config.json and preprocessor_config.json "
                ""})
    quantize: str = field(default="none", metadata={
        "help": "also write an int8 copy, <output stem>.int8.onnx: none, dynamic or static"})
    num_calibration_batches: int = field(default=8, metadata={
        "help": "batches of training images for --quantize static"})
    calibration_batch_size: int = field(default=8, metadata={"help": "images per such batch"})
    opset_version: int = field(default=17, metadata={"help": "ONNX opset"})
    check: bool = field(default=True, metadata={
        "help": "run the exported model in onnxruntime on one batch and compare with PyTorch"})


def static_calibration_batches(data_args: DataArguments, processor, count: int, batch_size: int) -> list[dict]:
    """``count`` batches of training images, as the ONNX graph's numpy inputs."""
    (train_dataset,) = load_splits(data_args, ("train",))
    collate = make_collate_fn(processor)
    batches = []
    for start in range(0, min(len(train_dataset), count * batch_size), batch_size):
        batch = collate([train_dataset[i] for i in range(start, min(start + batch_size, len(train_dataset)))])
        batches.append({"pixel_values": batch["pixel_values"].numpy(),
                        "pixel_mask": batch["pixel_mask"].long().numpy()})
    return batches


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ExportArguments, DataArguments), description=__doc__.split("\n\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `export.py MODEL_DIR ...`: the folder as the first argument
        argv = ["--model_dir", *argv]
    export_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if export_args.quantize not in ("none", "dynamic", "static"):
        raise ValueError(f"--quantize must be none, dynamic or static, got {export_args.quantize!r}")
    model_dir = Path(export_args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a checkpoint folder (no config.json)")
    output = Path(export_args.output)
    if output.suffix != ".onnx":
        raise ValueError(f"--output must end in .onnx, got {output}")

    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    height, width = onnx_input_size(processor)
    export_onnx(model, output, height, width, opset_version=export_args.opset_version)
    copy_checkpoint_files(model_dir, output.parent)
    written = {"onnx": str(output)}
    logger.info("wrote %s (%s, input %dx%d)", output, type(model).__name__, height, width)

    if export_args.check:
        from hf_caldetr.export import OnnxDetector

        pixel_values = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
        actual = OnnxDetector(output)(pixel_values=pixel_values)
        differences = {name: float((actual[name] - getattr(expected, name)).abs().max())
                       for name in ("logits", "pred_boxes")}
        logger.info("onnxruntime vs PyTorch, max |difference|: %s", differences)
        if max(differences.values()) > 1e-3:
            raise RuntimeError(f"the exported model differs from PyTorch by {differences}: the export is wrong")
        written["max_difference"] = differences

    if export_args.quantize != "none":
        int8 = output.with_name(output.stem + ".int8.onnx")
        batches = None
        if export_args.quantize == "static":
            batches = static_calibration_batches(data_args, processor, export_args.num_calibration_batches,
                                                 export_args.calibration_batch_size)
            input_names = {"pixel_values"} | ({"pixel_mask"} if model.config.model_type != "rt_detr" else set())
            batches = [{k: v for k, v in batch.items() if k in input_names} for batch in batches]
        quantize_onnx(output, int8, export_args.quantize, batches)
        written["int8"] = str(int8)
        logger.info("wrote %s (%s int8, %.1f MB -> %.1f MB)", int8, export_args.quantize,
                    output.stat().st_size / 1e6, int8.stat().st_size / 1e6)
    return written


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
