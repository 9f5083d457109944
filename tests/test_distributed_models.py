"""Every registered family (the table of tests/tiny.py): two processes (torch.distributed, gloo) on one batch give
the loss and gradient of one process; with ``num_boxes_normalization="transformers"`` and calibration off, each
process's loss is the stock model's in the same two processes (the installed transformers' normaliser).

One spawn runs every family (process start-up dominates the cost); a second spawn, set up as ``accelerate launch``
sets up its processes, runs the families whose stock normaliser changes when accelerate's state exists (DETR,
Conditional DETR, DAB-DETR, Deformable DETR). Deformable DETR's variants: tests/test_distributed.py.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny import CASES, make_family_model, tiny_batch

WORLD_SIZE = 2
CAL_OFF = {"uncertainty_modulation": "none", "use_logit_mixing": False, "num_boxes_normalization": "transformers"}


def _model(name, state_dict=None, cal=True, **overrides):
    model = make_family_model(name, cal=cal, **{**CASES[name].distributed_overrides, **overrides})
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()  # per-shard batch statistics are SyncBatchNorm's business, not the loss's
    return model


def _loss_and_grads(model, pixel_values, labels):
    torch.manual_seed(1)
    out = model(pixel_values=pixel_values, labels=labels)
    out.loss.backward()
    losses = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.loss_dict.items()}}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _worker(rank, init_file, state_dicts, result_path, accelerate_port=None):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    if accelerate_port is None:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    else:
        # As `accelerate launch` on CPUs: accelerate's state set up, which changes transformers' ImageLoss
        # normaliser (boxes averaged over processes, then divided by the process count again).
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(accelerate_port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
        from accelerate import PartialState

        state = PartialState(cpu=True)
        from hf_caldetr.families import _accelerate_is_set_up

        assert state.num_processes == WORLD_SIZE and dist.is_initialized() and _accelerate_is_set_up()
    try:
        shard = slice(2 * rank, 2 * rank + 2)  # each process gets half the batch
        results = {}
        for name, state_dict in state_dicts.items():
            pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=CASES[name].distributed_boxes)
            pixel_values, labels = pixel_values[shard], labels[shard]
            losses, grads = _loss_and_grads(_model(name, state_dict), pixel_values, labels)
            # What DDP does: average the per-process gradients; the logged loss is the per-process mean.
            for tensor in [*losses.values(), *grads.values()]:
                dist.all_reduce(tensor)
                tensor /= WORLD_SIZE
            stock, _ = _loss_and_grads(_model(name, state_dict, cal=False), pixel_values, labels)
            off, _ = _loss_and_grads(_model(name, state_dict, **CAL_OFF), pixel_values, labels)
            gathered = [None] * WORLD_SIZE
            dist.all_gather_object(gathered, (stock["loss"], off["loss"]))
            results[name] = {"losses": losses, "grads": grads, "stock_and_off": gathered}
        if rank == 0:
            torch.save(results, result_path)
        # Both processes leave together: tearing the group down while the other still uses it aborted a process
        # now and then ("terminate called without an active exception": 5 runs of this file in 14 here, 0 in 16 since).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("launcher", ["torch.distributed", "accelerate"])
def test_two_processes_equal_one(tmp_path, launcher):
    from hf_caldetr.families import MODEL_FAMILIES, image_loss_num_boxes

    if launcher == "accelerate":  # the families whose stock normaliser depends on accelerate's state
        names = [name for name in CASES if MODEL_FAMILIES[name].stock_num_boxes is image_loss_num_boxes]
        assert len(names) == 4
        port = _free_port()
    else:
        names, port = list(CASES), None
    state_dicts = {name: _model(name).state_dict() for name in names}
    result_path = tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), state_dicts, str(result_path), port), nprocs=WORLD_SIZE,
             join=True)
    results = torch.load(result_path)

    for name in names:
        pixel_values, labels = tiny_batch(batch_size=4, boxes_per_image=CASES[name].distributed_boxes)
        single_losses, single_grads = _loss_and_grads(_model(name, state_dicts[name]), pixel_values, labels)
        result = results[name]
        for key, value in single_losses.items():
            if key.startswith("cardinality_error"):
                continue  # a logging metric, not a loss
            torch.testing.assert_close(result["losses"][key], value, rtol=1e-5, atol=1e-6, msg=lambda message, name=name, key=key: f"{name} {key}: {message}")
        assert result["losses"]["loss_logit_mixing"] > 0
        assert single_grads.keys() == result["grads"].keys()
        # rtol 1e-3: float32 sums in another order (measured: up to 1.8e-4 on one D-FINE encoder norm bias).
        for key, grad in single_grads.items():
            torch.testing.assert_close(result["grads"][key], grad, rtol=1e-3, atol=1e-6, msg=lambda message, name=name, key=key: f"{name} {key}: {message}")
        for stock, off in result["stock_and_off"]:
            torch.testing.assert_close(off, stock, rtol=0, atol=0, msg=f"{name}: transformers' normaliser")
