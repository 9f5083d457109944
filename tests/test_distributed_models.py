"""DETR and RT-DETR: two processes (torch.distributed, gloo) on one batch give the loss and gradient of one process.

One spawn runs both models (process start-up dominates the cost). Deformable DETR's case is tests/test_distributed.py.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_caldetr.configuration import CalDetrConfig, CalRTDetrConfig
from hf_caldetr.models import CalDetrForObjectDetection, CalRTDetrForObjectDetection
from tiny import tiny_batch, tiny_detr_kwargs, tiny_rt_detr_kwargs

WORLD_SIZE = 2
# name -> (config class, model class, tiny kwargs, overrides, boxes per image of the 4-image batch)
CASES = {
    # 3 boxes a shard: DETR's own loss_ce is a class-weighted mean over the shard's queries (transformers' and the
    # original's), which averages to the whole batch's only when the shards weigh the same.
    "detr": (CalDetrConfig, CalDetrForObjectDetection, tiny_detr_kwargs, {"auxiliary_loss": True}, (3, 0, 1, 2)),
    # 4 boxes against 1: every RT-DETR loss is over num_boxes, so this checks the cross-process normaliser too.
    # No denoising: its group count comes from each shard's largest box count, so differs between shards by design.
    "rt_detr": (CalRTDetrConfig, CalRTDetrForObjectDetection, tiny_rt_detr_kwargs, {"num_denoising": 0}, (3, 1, 0, 1)),
}


def _model(name, state_dict=None):
    config_class, model_class, kwargs, overrides, _ = CASES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs(**overrides)))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()  # RT-DETR's encoder: per-shard batch statistics are SyncBatchNorm's business, not the loss's
    return model


def _loss_and_grads(model, pixel_values, labels):
    out = model(pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    losses = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.loss_dict.items()}}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _worker(rank, init_file, state_dicts, result_path):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        shard = slice(2 * rank, 2 * rank + 2)  # each process gets half the batch
        results = {}
        for name, state_dict in state_dicts.items():
            pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=CASES[name][-1])
            losses, grads = _loss_and_grads(_model(name, state_dict), pixel_values[shard], labels[shard])
            # What DDP does: average the per-process gradients; the logged loss is the per-process mean.
            for tensor in [*losses.values(), *grads.values()]:
                dist.all_reduce(tensor)
                tensor /= WORLD_SIZE
            results[name] = {"losses": losses, "grads": grads}
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    state_dicts = {name: _model(name).state_dict() for name in CASES}
    result_path = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), state_dicts, str(result_path)), nprocs=WORLD_SIZE, join=True)
    results = torch.load(result_path)

    for name in CASES:
        pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=CASES[name][-1])
        single_losses, single_grads = _loss_and_grads(_model(name, state_dicts[name]), pixel_values, labels)
        result = results[name]
        for key, value in single_losses.items():
            if key.startswith("cardinality_error"):
                continue  # a logging metric, not a loss
            assert torch.allclose(result["losses"][key], value, rtol=1e-5, atol=1e-6), (name, key)
        assert result["losses"]["loss_logit_mixing"] > 0
        assert single_grads.keys() == result["grads"].keys()
        for key, grad in single_grads.items():
            assert torch.allclose(result["grads"][key], grad, rtol=1e-4, atol=1e-6), (name, key)
