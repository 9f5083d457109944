"""Cross-process reductions the detection losses need, so a sharded batch gives the loss of the whole batch.

transformers' detection losses reduce ``num_boxes`` with a *mean* across processes and then divide by the world
size again, so a 2-process run sees a different loss than a 1-process run on the same data. Here: sum across
processes, then divide by the world size (DDP averages the gradients of the processes, which restores the
whole-batch normalisation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes of the initialised default process group (1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_across_processes(tensor: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (the tensor itself in a single process).

    With ``differentiable=True`` the backward pass sends each process's gradient to every contributor, so a
    quantity pooled over the global batch (the logit-mixing prototype) gets its full gradient.
    """
    if world_size() == 1:
        return tensor
    if differentiable:
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def num_boxes_across_processes(targets: list[dict], device: torch.device) -> float:
    """The loss normaliser: ground-truth boxes summed over all processes, divided by the world size, at least 1."""
    boxes = float(sum(len(t["class_labels"]) for t in targets))
    if world_size() == 1:
        return max(boxes, 1.0)
    local = torch.tensor([boxes], device=device)
    total = sum_across_processes(local)
    return max(total.item() / world_size(), 1.0)
