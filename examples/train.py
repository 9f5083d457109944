"""Train a Cal-DETR detector (or the stock baseline) with Accelerate, calibrate it post hoc on held-out images and
fold the calibration into its weights, then evaluate it raw and calibrated, in-domain and on a corrupted copy.

    accelerate launch examples/train.py                       # the embedded digits default (see the README's timing)
    accelerate launch examples/train.py --method baseline     # the stock transformers loss, all else identical
    accelerate launch examples/train.py --resume_from_checkpoint latest     # continue an interrupted run
    accelerate launch examples/train.py --train_annotations train.json --train_images imgs/ \
        --validation_annotations val.json --validation_images imgs/ --model_name_or_path SenseTime/deformable-detr

Data: the embedded digits default, a Hub dataset (``--dataset_name``: an ``image`` column and an ``objects`` column
with ``bbox`` (COCO ``[x, y, width, height]`` in pixels) and ``category`` (ClassLabel ids)), or COCO folders; the
README's "Your own data" section has the details. Calibration (``--calibrator``, default class-wise Platt scaling; DETR: a temperature) is fitted on
images that are neither training nor evaluation images: fresh scenes for the digits default, a held-out part of the
training images (``--num_calibration_images``, taken out before training) for COCO folders and Hub datasets without
``--calibration_split``. Temperature and Platt scaling are folded into the classification head, so the saved
checkpoint's stock transformers model, pipeline and Hub widget return calibrated scores.

The output folder is a Hub repository: config + safetensors weights (a stock transformers checkpoint), the image
processor config, ``metrics.json`` (calibrated, and raw under ``before_calibration``; with D-UCE, ``d_uce``, the
calibration of the per-detection uncertainty ``tanh(Var_l(z))``), ``reliability_diagram.png`` and
``uncertainty_diagram.png`` (the D-UCE diagram: error rate against uncertainty per bin; raw and calibrated each),
``calibrator.json``, ``example.png``, the corruption manifest, the model card ``README.md`` and ``step_N``
checkpoints (every ``--checkpointing_steps``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from hf_caldetr.data import build_image_processor, corrupt_dataset, id2label, make_collate_fn, save_manifest
from hf_caldetr.data.arguments import DataArguments, load_splits
from hf_caldetr.data.arguments import load_calibration_split, random_subset
from hf_caldetr.evaluation import (
    CALIBRATOR_KINDS,
    UNCERTAINTY_DIAGRAM,
    evaluate_model,
    fit_and_fold,
    flatten_summary,
    lrp_thresholds,
    make_calibrator,
    plot_uncertainty_panels,
    summarize,
    write_metrics,
)
from hf_caldetr.folding import is_foldable, unfold_calibration
from hf_caldetr.metrics import plot_reliability_diagram
from hf_caldetr.training import (
    CAL_FIELDS,
    METHODS,
    MODEL_FAMILIES,
    checkpoint_model_type,
    model_family,
    build_model,
    check_checkpoint,
    freeze_batch_norm,
    parse_config_overrides,
    unfreeze_batch_norm,
)

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------------- helpers


def checkpoint_step(path: str) -> int:
    """Optimizer steps completed at a ``step_N`` / ``epoch_N`` checkpoint (read from its ``progress.json``)."""
    progress = Path(path) / "progress.json"
    if not Path(path).is_dir():
        raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    try:
        return json.loads(progress.read_text())["completed_steps"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"{path} is not a complete checkpoint (no readable progress.json, which is written last): "
                         "it was interrupted while being written, or is not this script's; resume from an earlier "
                         "one, or pass --resume_from_checkpoint latest for the newest complete one") from None


# Arguments that define the model and its training: a run resumes only with the same ones.
RESUME_DEFINING = ("method", "model_name_or_path", "model_type", "model_preset", "config_overrides",
                   *CAL_FIELDS, "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "augment",
                   # the training images: their source, and those held out for calibration
                   "dataset_name", "train_split", "train_annotations", "train_images", "num_train_images",
                   "image_size", "data_seed", "calibrator", "calibration_split", "num_calibration_images",
                   "calibration_seed")


def save_checkpoint(accelerator, output_dir: str, name: str, completed_steps: int, arguments: dict) -> None:
    """``accelerator.save_state`` into ``output_dir/name``; ``progress.json`` is written last, so a checkpoint
    without it was interrupted mid-write and is never resumed from (nor uploaded)."""
    path = os.path.join(output_dir, name)
    if accelerator.is_main_process:  # an older checkpoint of this name must not look complete while rewritten
        Path(path, "progress.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(path, "progress.json").write_text(json.dumps({
            "completed_steps": completed_steps, "arguments": {key: arguments[key] for key in RESUME_DEFINING}}))


def check_resume_arguments(path: str, arguments: dict) -> None:
    """Refuse to resume a checkpoint made with another method, model or batch: its state would load into (or
    silently continue as) a different run."""
    saved = json.loads(Path(path, "progress.json").read_text()).get("arguments")
    if saved is None:  # checkpoints written before the arguments were recorded
        return
    differing = {key: (saved.get(key), arguments[key]) for key in RESUME_DEFINING if saved.get(key) != arguments[key]}
    if differing:
        listed = ", ".join(f"--{key} {old!r} there, {new!r} now" for key, (old, new) in differing.items())
        raise ValueError(f"{path} was saved by a run with other settings ({listed}): resume with the same "
                         "arguments, or start a new run in another --output_dir")


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint (with its ``progress.json``) of ``output_dir`` with the most steps, or None."""
    complete = []
    for path in Path(output_dir).glob("*_*"):
        progress = path / "progress.json"
        if path.is_dir() and path.name.split("_")[0] in ("step", "epoch") and progress.is_file():
            try:
                complete.append((json.loads(progress.read_text())["completed_steps"], str(path)))
            except (ValueError, KeyError):
                continue
    return max(complete)[1] if complete else None


def check_output_dir(train_args) -> None:
    """Never overwrite a finished run: its weights, metrics and checkpoints would mix with the new run's. With
    ``--overwrite_output_dir`` the old run's checkpoints are removed, so none can be resumed into the new run."""
    output_dir = Path(train_args.output_dir)
    finished = [name for name in ("model.safetensors", "metrics.json") if (output_dir / name).exists()]
    resuming = train_args.resume_from_checkpoint not in (None, "latest") or (
        train_args.resume_from_checkpoint == "latest" and latest_checkpoint(train_args.output_dir) is not None)
    if finished and not (train_args.overwrite_output_dir or resuming):
        raise ValueError(f"{train_args.output_dir} holds a finished run ({', '.join(finished)}): pick another "
                         "--output_dir, pass --overwrite_output_dir to replace it, or --resume_from_checkpoint")
    if train_args.overwrite_output_dir and not resuming:
        for old in [*output_dir.glob("step_*"), *output_dir.glob("epoch_*")]:
            shutil.rmtree(old, ignore_errors=True)


def check_push_target(hub_model_id: str | None) -> None:
    """Everything an upload at the end needs, checked before training rather than after it."""
    from huggingface_hub import constants, get_token

    from hf_caldetr.hub import check_repo_id

    if not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. me/cal-detr-digits)")
    check_repo_id(hub_model_id)
    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub with HF_HUB_OFFLINE=1: the upload at the end would fail; unset HF_HUB_OFFLINE "
                         "or drop --push_to_hub and upload later with examples/push_to_hub.py")
    if get_token() is None:
        raise ValueError("--push_to_hub: no Hugging Face token found (run `hf auth login` or set HF_TOKEN)")


def use_every_core(accelerator) -> int:
    """On a CPU, give each process its share of the cores: ``accelerate launch`` sets OMP_NUM_THREADS=1 when it
    starts a single CPU process, which leaves all but one core idle. Returns the thread count."""
    if accelerator.device.type == "cpu":
        share = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
        if torch.get_num_threads() < share:
            torch.set_num_threads(share)
    return torch.get_num_threads()


DEFAULT_CALIBRATION_IMAGES = 500


def calibration_images(data_args, calibration_args, train_dataset):
    """``(train_dataset, calibration_dataset)``: the images a calibrator is fitted on are neither training nor
    evaluation images. Digits default: fresh scenes (generation seed ``--calibration_seed``). A named Hub split
    (``--calibration_split``): a subset of it. Otherwise (COCO folders, Hub datasets): ``--num_calibration_images``
    training images (by default a tenth of them, at most 500), held out before training."""
    count = calibration_args.num_calibration_images
    if calibration_args.calibration_split or not (data_args.dataset_name or data_args.train_annotations):
        split = calibration_args.calibration_split
        if split and split == data_args.train_split:
            raise ValueError(f"--calibration_split {split!r} is the training split: name a split used neither for "
                             "training nor for evaluation, or leave it unset to hold out training images")
        count = DEFAULT_CALIBRATION_IMAGES if count is None else count
        return train_dataset, load_calibration_split(data_args, split, count, calibration_args.calibration_seed)
    if count is None:
        count = min(DEFAULT_CALIBRATION_IMAGES, len(train_dataset) // 10)
    if not 0 < count <= len(train_dataset) // 2:
        raise ValueError(f"--num_calibration_images {count}: holding out that many of the {len(train_dataset)} "
                         "training images leaves too few to train on (at most half), or none to calibrate on")
    held_out = random_subset(train_dataset, count, calibration_args.calibration_seed)
    held_out_ids = set(held_out["image_id"])
    remaining = train_dataset.filter(lambda image_id: image_id not in held_out_ids, input_columns="image_id")
    return remaining, held_out


# --------------------------------------------------------------------------------------------------- arguments


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelArguments:
    method: str = field(default="cal-detr", metadata=_help(
        f"one of {sorted(METHODS)}; baseline trains with the stock transformers loss (the method off)"))
    model_name_or_path: str | None = field(default=None, metadata=_help(
        "plain or Cal checkpoint to fine-tune (Hub id or folder); default: a fresh model of --model_preset"))
    model_type: str | None = field(default=None, metadata=_help(
        f"{sorted(MODEL_FAMILIES)}; default: the checkpoint's, else deformable_detr"))
    model_preset: str = field(default="small", metadata=_help(
        "fresh model when no checkpoint: tiny, small or r50"))
    config_overrides: str | None = field(default=None, metadata=_help(
        "config fields as key=value pairs, e.g. 'd_model=128,num_queries=30'"))
    uncertainty_modulation: str | None = field(default=None, metadata=_help(
        "override the method's modulation: multiplicative|subtractive|none (default: the method's)"))
    modulate_at_inference: bool | None = field(default=None, metadata=_help(
        "pass true/false: modulate the logits at inference too"))
    use_logit_mixing: bool | None = field(default=None, metadata=_help(
        "pass true/false: override the method's logit-mixing regulariser (default: the method's)"))
    logit_mixing_alpha: float | None = field(default=None, metadata=_help("alpha of the logit mixing"))
    logit_mixing_loss_coefficient: float | None = field(default=None, metadata=_help(
        "lambda, the weight of the mixing loss"))
    num_boxes_normalization: str | None = field(default=None, metadata=_help(
        "global|transformers: what the box losses are divided by with several processes, for every method "
        "(baseline included); global (default): the whole batch's boxes, so N processes train as 1"))


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/cal-detr-digits", metadata=_help(
        "where the checkpoint, metrics, diagrams and step_N checkpoints go"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "replace a finished run in --output_dir"))
    num_train_epochs: int = field(default=50, metadata=_help("epochs, when --max_train_steps is 0"))
    max_train_steps: int = field(default=3000, metadata=_help(
        "optimizer steps; 0 trains --num_train_epochs epochs instead"))
    per_device_train_batch_size: int = field(default=8, metadata=_help("training images per process"))
    per_device_eval_batch_size: int = field(default=32, metadata=_help("evaluation images per process"))
    learning_rate: float | None = field(default=None, metadata=_help(
        "default 1e-3 for a fresh model (the from-scratch presets), 1e-4 when fine-tuning a checkpoint"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay"))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("transformers scheduler name"))
    num_warmup_steps: int = field(default=100, metadata=_help("linear warm-up steps"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("batches per optimizer step"))
    max_grad_norm: float = field(default=0.1, metadata=_help("gradient clipping norm, 0 for none"))
    augment: bool = field(default=False, metadata=_help("small scale/translation jitter of training images"))
    seed: int = field(default=42, metadata=_help("seed of the model init, data order and augmentation"))
    checkpointing_steps: str | None = field(default="500", metadata=_help(
        "save a resumable step_N checkpoint every N steps, 'epoch' for one per epoch, 'none' for none"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "a step_N / epoch_N folder, or 'latest' for the newest complete one in --output_dir (default: start fresh)"))
    eval_every_epoch: bool = field(default=False, metadata=_help("evaluate in-domain after each epoch"))
    logging_steps: int = field(default=50, metadata=_help(
        "log the mean loss and the learning rate every N steps"))
    report_to: str = field(default="auto", metadata=_help("tensorboard|none|auto (tensorboard when installed)"))
    push_to_hub: bool = field(default=False, metadata=_help("upload the output folder at the end"))
    hub_model_id: str | None = field(default=None, metadata=_help("the Hub repo id for --push_to_hub, e.g. me/my-model"))
    hub_private: bool = field(default=False, metadata=_help("create the Hub repo private"))
    dataloader_num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))


@dataclass
class CalibrationArguments:
    calibrator: str = field(default="auto", metadata=_help(
        f"post-hoc calibrator fitted after training, one of {CALIBRATOR_KINDS}; temperature and platt are folded "
        "into the weights, isotonic and histogram saved as calibrator.json, none keeps the raw model; auto: "
        "class-wise Platt scaling (sigmoid heads), one temperature over all columns (DETR's softmax head)"))
    calibration_class_wise: bool | None = field(default=None, metadata=_help(
        "true: one calibration map per class with at least 50 held-out detections, the shared map for the others; "
        "false: one map for all classes; unset: class-wise where the head allows it (not DETR's softmax)"))
    calibration_split: str | None = field(default=None, metadata=_help(
        "a Hub dataset split to calibrate on, neither the train nor the validation split (default: fresh scenes for "
        "the digits default, else --num_calibration_images training images held out before training)"))
    num_calibration_images: int | None = field(default=None, metadata=_help(
        "images the calibrator is fitted on; 0 takes a whole --calibration_split (default: 500 fresh scenes for the "
        "digits default, 500 of a named split, or min(500, a tenth of the training images) held out)"))
    calibration_seed: int = field(default=1, metadata=_help(
        "seed of the calibration images: the digits default's generation seed (must differ from --data_seed), "
        "else the held-out draw"))


# -------------------------------------------------------------------------------------------------------- main


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments, CalibrationArguments),
                              description="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2)))
    model_args, data_args, train_args, calibration_args = parser.parse_args_into_dataclasses()
    args = {**asdict(model_args), **asdict(data_args), **asdict(train_args), **asdict(calibration_args)}
    check_output_dir(train_args)
    for name in ("logging_steps", "gradient_accumulation_steps"):
        if getattr(train_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(train_args, name)}")
    if train_args.learning_rate is not None and not train_args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be positive, got {train_args.learning_rate}")
    if train_args.num_warmup_steps < 0:
        raise ValueError(f"--num_warmup_steps must be >= 0, got {train_args.num_warmup_steps}")
    if train_args.max_train_steps < 0:
        raise ValueError(f"--max_train_steps must be >= 0 (0 trains --num_train_epochs epochs), got "
                         f"{train_args.max_train_steps}")
    if train_args.resume_from_checkpoint not in (None, "latest"):
        checkpoint_step(train_args.resume_from_checkpoint)  # a missing or partial checkpoint is refused now
        check_resume_arguments(train_args.resume_from_checkpoint, args)
    if model_args.model_name_or_path:
        check_checkpoint(model_args.model_name_or_path)
    if train_args.push_to_hub:
        check_push_target(train_args.hub_model_id)
    checkpoint_every = train_args.checkpointing_steps
    if checkpoint_every in (None, "none", "0"):
        checkpoint_every = None
    elif checkpoint_every != "epoch" and not checkpoint_every.isdigit():
        raise ValueError(f"--checkpointing_steps must be an integer, 'epoch' or 'none', got {checkpoint_every!r}")

    # Phase 1: accelerator, logging, seed.
    report_to = train_args.report_to
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        report_to = "tensorboard" if is_tensorboard_available() else "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_dir=train_args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file at each checkpoint
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(train_args.seed)
    threads = use_every_core(accelerator)
    logger.info("running %d process(es) on %s, %d thread(s) each", accelerator.num_processes, accelerator.device,
                threads)
    started = time.time()

    # Phase 2: data.
    model_type = model_args.model_type or (
        checkpoint_model_type(model_args.model_name_or_path) if model_args.model_name_or_path else "deformable_detr")
    # Before any data or training: a calibrator that cannot serve this head is refused now, not after training.
    calibrator = make_calibrator(calibration_args.calibrator, calibration_args.calibration_class_wise,
                                 model_family(model_type).softmax_head)
    with accelerator.main_process_first():
        train_dataset, eval_dataset = load_splits(data_args)
        calibration_dataset = None
        if calibrator is not None:
            train_dataset, calibration_dataset = calibration_images(data_args, calibration_args, train_dataset)
    labels = id2label(train_dataset)
    if id2label(eval_dataset) != labels:
        # Matched by index, a reversed or extended label map scores a perfect detector 0 without a word.
        raise ValueError(f"the validation data's classes {list(id2label(eval_dataset).values())} differ from the "
                         f"training data's {list(labels.values())} (names in id order): evaluate on data with the "
                         "same classes, in the same order")
    image_processor = build_image_processor(data_args.image_size or None, model_family(model_type).image_processor_class)
    loader_options = dict(num_workers=train_args.dataloader_num_workers)
    train_collator = make_collate_fn(image_processor, augment=train_args.augment, seed=train_args.seed)
    # A generator of its own: a DataLoader iterator draws its base seed from the global RNG otherwise, and a run
    # resumed mid-epoch creates its iterator after restoring the RNG state, so dropout would diverge.
    train_dataloader = DataLoader(train_dataset, shuffle=True, batch_size=train_args.per_device_train_batch_size,
                                  collate_fn=train_collator,
                                  generator=torch.Generator().manual_seed(train_args.seed), **loader_options)
    eval_collate = make_collate_fn(image_processor)
    eval_dataloader = DataLoader(eval_dataset, batch_size=train_args.per_device_eval_batch_size,
                                 collate_fn=eval_collate, **loader_options)
    logger.info("data: %d train / %d validation images, %d classes", len(train_dataset), len(eval_dataset), len(labels))

    # Phase 3: model, optimizer, schedule.
    cal_overrides = {name: args[name] for name in CAL_FIELDS}
    model = build_model(model_args.method, labels, model_args.model_name_or_path, model_args.model_preset,
                        parse_config_overrides(model_args.config_overrides), model_type, **cal_overrides)
    if getattr(model.config, "folded_calibration", None):
        # A shipped calibrated checkpoint: training starts from its raw head, and the record of a calibration that
        # no longer holds after training is dropped (a new one is fitted at the end).
        logger.info("%s holds a folded calibration: undone before training", model_args.model_name_or_path)
        unfold_calibration(model)
    if calibrator is not None and getattr(model.config, "modulate_at_inference", False) and is_foldable(
            calibrator, model_family(model_type).softmax_head):
        raise ValueError("modulate_at_inference=True: the stock model cannot reproduce the modulation, so a "
                         f"{type(calibrator).__name__} cannot be folded into this checkpoint; use --calibrator isotonic "
                         "or histogram (kept as calibrator.json), --calibrator none, or modulate_at_inference=false")
    if model_args.model_name_or_path is None:
        # A backbone trained from scratch needs its batch norms (frozen for pretrained backbones); the saved
        # checkpoint gets them back frozen, with the learned statistics.
        unfreeze_batch_norm(model)
    learning_rate = train_args.learning_rate
    if learning_rate is None:
        learning_rate = 1e-4 if model_args.model_name_or_path else 1e-3
    args["learning_rate"] = learning_rate  # the run record (metrics.json, the card) holds the value used
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=train_args.weight_decay)
    updates_per_epoch = math.ceil(len(train_dataloader) / (train_args.gradient_accumulation_steps * accelerator.num_processes))
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * updates_per_epoch
    args["max_train_steps"] = max_train_steps
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # accelerate steps a prepared scheduler once per process at each optimizer step, hence the factors.
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer,
                              num_warmup_steps=train_args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler)
    if accelerator.log_with:
        accelerator.init_trackers("hf_caldetr", config={k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})

    # Phase 4: resume.
    completed_steps = 0
    resume_from = train_args.resume_from_checkpoint
    if resume_from == "latest":
        resume_from = latest_checkpoint(train_args.output_dir)
        if resume_from is None:
            logger.info("--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh",
                        train_args.output_dir)
    if resume_from:
        completed_steps = checkpoint_step(resume_from)
        check_resume_arguments(resume_from, args)
        accelerator.load_state(resume_from)
        logger.info("resumed from %s at step %d", resume_from, completed_steps)
    start_epoch, resume_batches = divmod(completed_steps * train_args.gradient_accumulation_steps, len(train_dataloader))

    # Phase 5: train.
    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc=f"training ({model_args.method})")
    window: dict[str, list[float]] = {}
    model.train()
    # A run resumed from its last checkpoint (killed during the final evaluation, say) has no step left to take.
    for epoch in range(start_epoch, num_epochs if completed_steps < max_train_steps else start_epoch):
        train_dataloader.set_epoch(epoch)
        train_collator.set_epoch(epoch)
        batches = train_dataloader
        if epoch == start_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and train_args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for name, value in {"loss": outputs.loss, **outputs.loss_dict}.items():
                window.setdefault(name, []).append(value.item())
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % train_args.logging_steps == 0 or completed_steps == max_train_steps:
                scalars = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
                scalars["train/learning_rate"] = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{scalars['train/learning_rate']:.2e}")
                logger.info("step %d/%d: loss %.4f, learning rate %.3e", completed_steps, max_train_steps,
                            scalars["train/loss"], scalars["train/learning_rate"])
                if accelerator.log_with:
                    accelerator.log(scalars, step=completed_steps)
                window.clear()
            if checkpoint_every and checkpoint_every != "epoch" and completed_steps % int(checkpoint_every) == 0:
                save_checkpoint(accelerator, train_args.output_dir, f"step_{completed_steps}", completed_steps, args)
            if completed_steps >= max_train_steps:
                break
        if checkpoint_every == "epoch":
            save_checkpoint(accelerator, train_args.output_dir, f"epoch_{epoch}", completed_steps, args)
        if train_args.eval_every_epoch and completed_steps < max_train_steps:
            epoch_result = flatten_summary(summarize(evaluate_model(model, eval_dataloader, image_processor,
                                                                    accelerator)))
            logger.info("epoch %d in-domain: %s", epoch, {k: round(v, 4) for k, v in epoch_result.items()})
            if accelerator.log_with:
                accelerator.log({f"eval/in_domain/{k}": v for k, v in epoch_result.items()}, step=completed_steps)
        if completed_steps >= max_train_steps:
            break
    progress.close()
    train_seconds = time.time() - started

    # Phase 6: evaluate in-domain and on the corrupted copy (CorCOCO recipe), raw.
    splits = {"in_domain": eval_dataloader}
    if not data_args.skip_out_of_domain:
        with accelerator.main_process_first():
            corrupted, manifest = corrupt_dataset(eval_dataset, base_seed=data_args.corruption_seed)
        splits["out_of_domain"] = accelerator.prepare(DataLoader(
            corrupted, batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collate, **loader_options))
    # The second protocol (Kuzucu et al.): per-class LRP-optimal thresholds found on the held-out images (never
    # the evaluated ones), applied to every evaluated split; raw and calibrated scores each get their own.
    calibration_loader, thresholds = None, {}
    if calibration_dataset is not None:
        calibration_loader = accelerator.prepare(DataLoader(
            calibration_dataset, batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collate,
            **loader_options))
        thresholds["raw"] = lrp_thresholds(model, calibration_loader, image_processor, accelerator)
    raw = {split: evaluate_model(model, loader, image_processor, accelerator, progress=True,
                                 class_thresholds=thresholds.get("raw"))
           for split, loader in splits.items()}

    # Phase 7: fit the post-hoc calibrator on the held-out images, fold it into the weights when it is affine,
    # and measure the calibrated detector the same way.
    unwrapped = accelerator.unwrap_model(model)
    results, calibration = raw, None
    if calibrator is not None:
        fitted_on = {"images": len(calibration_dataset), "source": calibration_args.calibration_split or (
            "held-out training images" if (data_args.dataset_name or data_args.train_annotations)
            else f"fresh digit scenes, generation seed {calibration_args.calibration_seed}"),
            "score_threshold": 0.3}
        try:
            folded = fit_and_fold(model, unwrapped, calibration_loader, image_processor, calibrator, accelerator,
                                  fitted_on=fitted_on, progress=True)
        except ValueError as error:
            # Too few kept detections to fit on (an undertrained model) or a degenerate fit: the trained model is
            # saved raw rather than lost, and metrics.json says why it is not calibrated.
            logger.warning("calibration skipped, the model is saved uncalibrated: %s", error)
            calibrator, calibration = None, {"skipped": str(error)}
    if calibrator is not None:
        # A folded model's own scores are calibrated; otherwise the calibrator maps the post-processed scores.
        score_map = None if folded else calibrator
        thresholds["calibrated"] = lrp_thresholds(model, calibration_loader, image_processor, accelerator,
                                                  calibrator=score_map)
        results = {split: evaluate_model(model, loader, image_processor, accelerator, progress=True,
                                         calibrator=score_map, class_thresholds=thresholds["calibrated"])
                   for split, loader in splits.items()}
        calibration = {"type": type(calibrator).__name__, "class_wise": calibrator.class_wise, "folded": folded,
                       "params": calibrator.params_,
                       "class_params": {str(k): v for k, v in calibrator.class_params_.items()},
                       "fitted_on": fitted_on}
        logger.info("calibrator %s fitted on %d held-out images%s", type(calibrator).__name__,
                    len(calibration_dataset), ", folded into the weights" if folded else " (saved as calibrator.json)")
    for split in results:
        summary = flatten_summary(summarize(results[split]))
        if accelerator.log_with:
            accelerator.log({f"eval/{split}/{k}": v for k, v in summary.items()}, step=completed_steps)
        if calibrator is None:
            logger.info("%s: %s", split, {k: round(v, 4) for k, v in summary.items()})
            continue
        before = flatten_summary(summarize(raw[split]))
        logger.info("%s: D-ECE raw %.2f %% -> calibrated %.2f %%; LaECE %.2f -> %.2f %%; AP %.2f -> %.2f %%", split,
                    100 * before["d_ece"], 100 * summary["d_ece"], 100 * before["laece"], 100 * summary["laece"],
                    100 * before["map"], 100 * summary["map"])
        key = "at_lrp_optimal_thresholds.laece_0"
        if key in before and key in summary:
            logger.info("%s, at LRP-optimal thresholds: LaECE_0 raw %.2f %% -> calibrated %.2f %%; LRP (IoU 0) "
                        "%.2f -> %.2f %%", split, 100 * before[key], 100 * summary[key],
                        100 * before["at_lrp_optimal_thresholds.lrp"], 100 * summary["at_lrp_optimal_thresholds.lrp"])

    # Phase 8: save the Hub folder (and push).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from hf_caldetr.hub import push_folder, save_widget_example, write_model_card

        output_dir = Path(train_args.output_dir)
        freeze_batch_norm(unwrapped)
        if data_args.train_annotations:
            # The label set travels with the model: class k is COCO category id coco_category_ids[k].
            from hf_caldetr.data.loading import coco_categories, read_coco_json

            unwrapped.config.coco_category_ids = coco_categories(read_coco_json(data_args.train_annotations),
                                                                 data_args.train_annotations)[1]
        unwrapped.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        if not data_args.skip_out_of_domain:
            save_manifest(manifest, str(output_dir / "corruption_manifest.json"), base_seed=data_args.corruption_seed)
        run_info = {"method": model_args.method, "train_steps": completed_steps,
                    "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1),
                    "num_processes": accelerator.num_processes, "threads_per_process": threads, "arguments": args}
        extra = {"run": run_info, "calibration": calibration}
        if thresholds:
            extra["lrp_optimal_thresholds"] = {
                "found_on": calibration["fitted_on"] if calibration and "fitted_on" in calibration else
                f"{len(calibration_dataset)} held-out images",
                **{kind: {str(k): v for k, v in values.items()} for kind, values in thresholds.items()}}
        if calibrator is not None:
            extra["before_calibration"] = {split: summarize(result) for split, result in raw.items()}
            calibrator.save(output_dir / "calibrator.json")
        metrics = write_metrics(results, output_dir, extra=extra)
        if calibrator is not None:
            panels = [(raw[split], f"raw, {split.replace('_', '-')}") for split in raw] + [
                (results[split], f"calibrated ({type(calibrator).__name__}), {split.replace('_', '-')}")
                for split in results]
            plot_reliability_diagram([panel[0] for panel in panels], output_dir / "reliability_diagram.png",
                                     titles=[panel[1] for panel in panels])
            # The uncertainties are the raw model's either way (a calibrator maps the scores): the panels differ
            # in the detections the calibrated scores keep.
            plot_uncertainty_panels([panel[0] for panel in panels], output_dir / UNCERTAINTY_DIAGRAM,
                                    titles=[panel[1] for panel in panels])
        save_widget_example(eval_dataset, output_dir)
        write_model_card(output_dir, repo_id=train_args.hub_model_id if train_args.push_to_hub else None)
        logger.info("wrote %s: in-domain %s", output_dir, metrics["in_domain"])
        if train_args.push_to_hub:
            push_folder(output_dir, train_args.hub_model_id, private=train_args.hub_private)
    accelerator.end_training()


if __name__ == "__main__":
    main()
