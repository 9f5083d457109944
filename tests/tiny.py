"""Tiny random models and batches shared by the tests (seconds on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import ResNetConfig


def tiny_backbone_config() -> ResNetConfig:
    return ResNetConfig(
        layer_type="basic",
        hidden_sizes=[16, 32, 64, 128],
        embedding_size=16,
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )


def tiny_deformable_kwargs(**overrides) -> dict:
    kwargs = dict(
        backbone_config=tiny_backbone_config(),
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        num_labels=5,
        dropout=0.0,
        two_stage_num_proposals=12,
    )
    kwargs.update(overrides)
    return kwargs


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


def tiny_detr_kwargs(**overrides) -> dict:
    """DETR with the tiny HF ResNet (``use_timm_backbone=False``: no timm, no Hub)."""
    kwargs = dict(
        backbone_config=tiny_backbone_config(),
        use_timm_backbone=False,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        num_labels=5,
        dropout=0.0,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_rt_detr_kwargs(**overrides) -> dict:
    """RT-DETR with a tiny `RTDetrResNetConfig`; 10 denoising queries (so 3 groups for 3 boxes an image)."""
    from transformers import RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        layer_type="basic",
        hidden_sizes=[16, 32, 64, 128],
        embedding_size=16,
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    kwargs = dict(
        backbone_config=backbone,
        encoder_hidden_dim=32,
        encoder_in_channels=[32, 64, 128],
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64,
        decoder_layers=3,
        decoder_attention_heads=2,
        decoder_n_points=2,
        num_queries=12,
        num_denoising=10,
        num_labels=5,
    )
    kwargs.update(overrides)
    return kwargs


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


def make_family_model(model_type, cal=True, seed=0, **overrides):
    """A tiny random model of a registered family: the Cal class, or with ``cal=False`` the stock one."""
    import torch

    from hf_caldetr.configuration import CAL_FIELDS
    from hf_caldetr.families import MODEL_FAMILIES, preset_config_kwargs

    family = MODEL_FAMILIES[model_type]
    kwargs = preset_config_kwargs(family, "tiny", num_labels=NUM_LABELS, **{**CASES[model_type].overrides, **overrides})
    torch.manual_seed(seed)
    if cal:
        return family.cal_model_class(family.cal_config_class(**kwargs))
    return family.model_class(family.config_class(**{k: v for k, v in kwargs.items() if k not in CAL_FIELDS}))
