"""Tiny random models and batches shared by the tests (seconds on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch


def tiny_batch(batch_size: int = 2, size: int = 64, num_labels: int = 5, boxes_per_image=(3, 2), seed: int = 0):
    """Pixel values and labels (normalised cxcywh boxes) for a batch; an entry 0 in boxes_per_image gives an
    image without boxes."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = []
    for i in range(batch_size):
        n = boxes_per_image[i % len(boxes_per_image)]
        centers = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        sizes = 0.1 + 0.2 * torch.rand(n, 2, generator=generator)
        labels.append(
            {
                "class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                "boxes": torch.cat([centers, sizes], dim=1),
            }
        )
    return pixel_values, labels


# ---------------------------------------------------------------------------------- every registered family


@dataclass(frozen=True)
class Case:
    """A row of the family table: overrides of the family's tiny preset, and what the 2-process test needs."""

    overrides: dict = field(default_factory=dict)
    distributed_overrides: dict = field(default_factory=dict)
    distributed_boxes: tuple = (3, 1, 0, 1)  # boxes per image of the 4-image batch, shards of 2 images


NUM_LABELS = 5
# model_type -> its row. Adding a family: one row here (and its registration entry in hf_caldetr.families).
CASES = {
    "deformable_detr": Case({"decoder_layers": 3, "auxiliary_loss": True}),
    # DETR's own loss_ce is a class-weighted mean over the shard's queries, which averages to the whole batch's
    # only when the shards weigh the same: 3 boxes each.
    "detr": Case({"decoder_layers": 3}, {"auxiliary_loss": True}, (3, 0, 1, 2)),
    # Denoising groups come from each shard's largest box count, so differ between shards by design.
    "rt_detr": Case({"decoder_layers": 3}, {"num_denoising": 0}),
    "rt_detr_v2": Case({"decoder_layers": 3}, {"num_denoising": 0}),
    "d_fine": Case({"decoder_layers": 3}, {"num_denoising": 0}),
    # Dense one-to-one matching divides the box losses by each process's matched pairs (see the registry).
    "deimv2": Case({"decoder_layers": 3}, {"num_denoising": 0, "use_dense_one_to_one": False}),
    "conditional_detr": Case({"decoder_layers": 3}),
    "dab-detr": Case({"decoder_layers": 3}),
    "lw_detr": Case({"decoder_layers": 3}),
    "rf_detr": Case({"decoder_layers": 3}),
}


def tiny_kwargs(model_type: str, **overrides) -> dict:
    """Config arguments of a tiny random model: the registry's ``tiny`` preset (``hf_caldetr.families``, the one the
    benchmarks use too) with the family's row of the table and ``overrides``; ``NUM_LABELS`` classes."""
    from hf_caldetr.families import MODEL_FAMILIES, preset_config_kwargs

    return preset_config_kwargs(MODEL_FAMILIES[model_type], "tiny",
                                **{"num_labels": NUM_LABELS, **CASES[model_type].overrides, **overrides})


tiny_deformable_kwargs = partial(tiny_kwargs, "deformable_detr")
tiny_detr_kwargs = partial(tiny_kwargs, "detr")
tiny_rt_detr_kwargs = partial(tiny_kwargs, "rt_detr")


def make_family_model(model_type, cal=True, seed=0, **overrides):
    """A tiny random model of a registered family: the Cal class, or with ``cal=False`` the stock one."""
    import torch

    from hf_caldetr.configuration import CAL_FIELDS
    from hf_caldetr.families import MODEL_FAMILIES

    family = MODEL_FAMILIES[model_type]
    kwargs = tiny_kwargs(model_type, **overrides)
    torch.manual_seed(seed)
    if cal:
        return family.cal_model_class(family.cal_config_class(**kwargs))
    return family.model_class(family.config_class(**{k: v for k, v in kwargs.items() if k not in CAL_FIELDS}))
