"""Two processes (torch.distributed, gloo) on one batch give the loss and the gradient of one process."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_caldetr import CalDeformableDetrConfig, CalDeformableDetrForObjectDetection
from tiny import tiny_batch, tiny_deformable_kwargs

WORLD_SIZE = 2


def _model(state_dict, **overrides):
    model = CalDeformableDetrForObjectDetection(CalDeformableDetrConfig(**tiny_deformable_kwargs(**overrides)))
    model.load_state_dict(state_dict)
    return model.train()


def _loss_and_grads(model, pixel_values, labels):
    out = model(pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    losses = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.loss_dict.items()}}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _worker(rank, init_file, state_dict, overrides, boxes_per_image, result_path):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=boxes_per_image)
        shard = slice(2 * rank, 2 * rank + 2)  # each process gets half the batch
        losses, grads = _loss_and_grads(_model(state_dict, **overrides), pixel_values[shard], labels[shard])
        # What DDP does: average the per-process gradients; the logged loss is the per-process mean.
        for tensor in [*losses.values(), *grads.values()]:
            dist.all_reduce(tensor)
            tensor /= WORLD_SIZE
        if rank == 0:
            torch.save({"losses": losses, "grads": grads}, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "overrides, boxes_per_image",
    [({}, (3, 1, 2, 4)), ({"auxiliary_loss": True}, (2, 0, 1, 3))],
    ids=["cal", "cal-auxiliary-loss-and-empty-image"],
)
def test_two_processes_equal_one(tmp_path, overrides, boxes_per_image):
    torch.manual_seed(0)
    reference = CalDeformableDetrForObjectDetection(CalDeformableDetrConfig(**tiny_deformable_kwargs(**overrides)))
    state_dict = reference.state_dict()
    pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=boxes_per_image)
    single_losses, single_grads = _loss_and_grads(_model(state_dict, **overrides), pixel_values, labels)

    result_path = tmp_path / "result.pt"
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), state_dict, overrides, boxes_per_image, str(result_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    result = torch.load(result_path)
    for name, value in single_losses.items():
        if name.startswith("cardinality_error"):
            continue  # a logging metric, averaged per image: equal here too, but not a loss
        assert torch.allclose(result["losses"][name], value, rtol=1e-5, atol=1e-6), name
    assert result["losses"]["loss_logit_mixing"] > 0
    assert single_grads.keys() == result["grads"].keys()
    # Absolute tolerance relative to the largest gradient: some gradients are zero in exact arithmetic (a bias
    # followed by GroupNorm) and float noise of 1e-6 around them says nothing.
    scale = max(grad.abs().max().item() for grad in single_grads.values())
    for name, grad in single_grads.items():
        assert torch.allclose(result["grads"][name], grad, rtol=1e-4, atol=1e-6 * scale), name
