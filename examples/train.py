"""Train a Cal-DETR Deformable DETR (or the stock baseline) with Accelerate, then evaluate it in- and out-of-domain.

    accelerate launch examples/train.py                       # the embedded digits default, ~10 min on a laptop CPU
    accelerate launch examples/train.py --method baseline     # the stock transformers model, all else identical
    accelerate launch examples/train.py --train_annotations train.json --train_images imgs/ \
        --validation_annotations val.json --validation_images imgs/ --model_name_or_path SenseTime/deformable-detr

The output folder is a Hub repository: config + safetensors weights (a stock `DeformableDetrForObjectDetection`
checkpoint), the image processor config, `metrics.json`, `reliability_diagram.png`, the corruption manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
from hf_caldetr.data.splits import DataArguments, load_splits
from hf_caldetr.evaluation import evaluate_model, summarize, write_metrics
from hf_caldetr.training import (
    CAL_FIELDS,
    METHODS,
    MODEL_FAMILIES,
    checkpoint_model_type,
    model_family,
    build_model,
    freeze_batch_norm,
    parse_config_overrides,
    unfreeze_batch_norm,
)

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------------- helpers


def checkpoint_step(path: str) -> int:
    """Optimizer steps completed at a ``step_N`` / ``epoch_N`` checkpoint (read from its ``progress.json``)."""
    progress = Path(path) / "progress.json"
    if not progress.is_file():
        raise ValueError(f"{path} is not a checkpoint of this script (no progress.json)")
    return json.loads(progress.read_text())["completed_steps"]


def save_checkpoint(accelerator, output_dir: str, name: str, completed_steps: int) -> None:
    path = os.path.join(output_dir, name)
    accelerator.save_state(path)
    if accelerator.is_main_process:
        Path(path, "progress.json").write_text(json.dumps({"completed_steps": completed_steps}))


# --------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    method: str = field(default="cal-detr", metadata={"help": f"one of {sorted(METHODS)}"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "plain or Cal checkpoint (Hub id or folder)"})
    model_type: str | None = field(default=None, metadata={"help": f"{sorted(MODEL_FAMILIES)}; default: the checkpoint's, else deformable_detr"})
    model_preset: str = field(default="small", metadata={"help": "fresh model when no checkpoint: tiny, small, r50"})
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. 'd_model=128,num_queries=30'"})
    uncertainty_modulation: str | None = field(default=None, metadata={"help": "override: multiplicative|subtractive|none"})
    modulate_at_inference: bool | None = field(default=None)
    use_logit_mixing: bool | None = field(default=None)
    logit_mixing_alpha: float | None = field(default=None)
    logit_mixing_loss_coefficient: float | None = field(default=None)


@dataclass
class TrainArguments:
    output_dir: str = "outputs/cal-detr-digits"
    num_train_epochs: int = 50
    max_train_steps: int | None = field(default=3000, metadata={"help": "overrides num_train_epochs when set"})
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    learning_rate: float | None = field(default=None, metadata={
        "help": "default 1e-3 for a fresh model (the from-scratch presets), 1e-4 when fine-tuning a checkpoint"})
    weight_decay: float = 1e-4
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 100
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.1
    augment: bool = field(default=False, metadata={"help": "small scale/translation jitter of training images"})
    seed: int = 42
    checkpointing_steps: str | None = field(default=None, metadata={"help": "an integer N (step_N) or 'epoch'"})
    resume_from_checkpoint: str | None = None
    eval_every_epoch: bool = False
    logging_steps: int = 50
    report_to: str = field(default="auto", metadata={"help": "tensorboard|none|auto (tensorboard when installed)"})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    dataloader_num_workers: int = 0


# -------------------------------------------------------------------------------------------------------- main


def main():
    model_args, data_args, train_args = HfArgumentParser((ModelArguments, DataArguments, TrainArguments)).parse_args_into_dataclasses()
    args = {**asdict(model_args), **asdict(data_args), **asdict(train_args)}

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
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(train_args.seed)
    if train_args.push_to_hub:
        from huggingface_hub import get_token

        # Fail before training, not after it.
        if not train_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if get_token() is None:
            raise ValueError("--push_to_hub: no Hugging Face token found (run `huggingface-cli login` or set HF_TOKEN)")
    started = time.time()

    # Phase 2: data.
    with accelerator.main_process_first():
        train_dataset, eval_dataset = load_splits(data_args)
    labels = id2label(train_dataset)
    model_type = model_args.model_type or (
        checkpoint_model_type(model_args.model_name_or_path) if model_args.model_name_or_path else "deformable_detr")
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
    if model_args.model_name_or_path is None:
        # A backbone trained from scratch needs its batch norms (frozen for pretrained backbones); the saved
        # checkpoint gets them back frozen, with the learned statistics.
        unfreeze_batch_norm(model)
    learning_rate = train_args.learning_rate or (1e-4 if model_args.model_name_or_path else 1e-3)
    args["learning_rate"] = learning_rate  # the run record (metrics.json, the card) holds the value used
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=train_args.weight_decay)
    updates_per_epoch = math.ceil(len(train_dataloader) / (train_args.gradient_accumulation_steps * accelerator.num_processes))
    max_train_steps = train_args.max_train_steps or train_args.num_train_epochs * updates_per_epoch
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
    if train_args.resume_from_checkpoint:
        accelerator.load_state(train_args.resume_from_checkpoint)
        completed_steps = checkpoint_step(train_args.resume_from_checkpoint)
        logger.info("resumed from %s at step %d", train_args.resume_from_checkpoint, completed_steps)
    start_epoch, resume_batches = divmod(completed_steps * train_args.gradient_accumulation_steps, len(train_dataloader))

    # Phase 5: train.
    checkpoint_every = train_args.checkpointing_steps
    if checkpoint_every and checkpoint_every != "epoch" and not checkpoint_every.isdigit():
        raise ValueError(f"--checkpointing_steps must be an integer or 'epoch', got {checkpoint_every!r}")
    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc=f"training ({model_args.method})")
    window: dict[str, list[float]] = {}
    model.train()
    for epoch in range(start_epoch, num_epochs):
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
                progress.set_postfix(loss=f"{scalars['train/loss']:.3f}")
                if accelerator.log_with:
                    accelerator.log(scalars, step=completed_steps)
                window.clear()
            if checkpoint_every and checkpoint_every != "epoch" and completed_steps % int(checkpoint_every) == 0:
                save_checkpoint(accelerator, train_args.output_dir, f"step_{completed_steps}", completed_steps)
            if completed_steps >= max_train_steps:
                break
        if checkpoint_every == "epoch":
            save_checkpoint(accelerator, train_args.output_dir, f"epoch_{epoch}", completed_steps)
        if train_args.eval_every_epoch and completed_steps < max_train_steps:
            epoch_result = summarize(evaluate_model(model, eval_dataloader, image_processor, accelerator))
            logger.info("epoch %d in-domain: %s", epoch, {k: round(v, 4) for k, v in epoch_result.items()})
            if accelerator.log_with:
                accelerator.log({f"eval/in_domain/{k}": v for k, v in epoch_result.items()}, step=completed_steps)
        if completed_steps >= max_train_steps:
            break
    progress.close()
    train_seconds = time.time() - started

    # Phase 6: evaluate in-domain and on the corrupted copy (CorCOCO recipe).
    results = {"in_domain": evaluate_model(model, eval_dataloader, image_processor, accelerator, progress=True)}
    if not data_args.skip_out_of_domain:
        with accelerator.main_process_first():
            corrupted, manifest = corrupt_dataset(eval_dataset, base_seed=data_args.corruption_seed)
        corrupted_dataloader = accelerator.prepare(DataLoader(
            corrupted, batch_size=train_args.per_device_eval_batch_size, collate_fn=eval_collate, **loader_options))
        results["out_of_domain"] = evaluate_model(model, corrupted_dataloader, image_processor, accelerator, progress=True)
    for split, result in results.items():
        summary = summarize(result)
        logger.info("%s: %s", split, {k: round(v, 4) for k, v in summary.items()})
        if accelerator.log_with:
            accelerator.log({f"eval/{split}/{k}": v for k, v in summary.items()}, step=completed_steps)

    # Phase 7: save the Hub folder (and push).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from hf_caldetr.hub import push_folder, save_widget_example, write_model_card

        output_dir = Path(train_args.output_dir)
        unwrapped = accelerator.unwrap_model(model)
        freeze_batch_norm(unwrapped)
        unwrapped.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        if not data_args.skip_out_of_domain:
            save_manifest(manifest, str(output_dir / "corruption_manifest.json"), base_seed=data_args.corruption_seed)
        run_info = {"method": model_args.method, "train_steps": completed_steps,
                    "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1),
                    "num_processes": accelerator.num_processes, "arguments": args}
        metrics = write_metrics(results, output_dir, extra={"run": run_info})
        save_widget_example(eval_dataset, output_dir)
        write_model_card(output_dir, repo_id=train_args.hub_model_id if train_args.push_to_hub else None)
        logger.info("wrote %s: in-domain %s", output_dir, metrics["in_domain"])
        if train_args.push_to_hub:
            push_folder(output_dir, train_args.hub_model_id, private=train_args.hub_private)
    accelerator.end_training()


if __name__ == "__main__":
    main()
