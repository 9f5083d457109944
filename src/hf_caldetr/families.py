"""Every DETR family hf_caldetr supports: one registration entry each (``MODEL_FAMILIES``).

An entry names the installed transformers classes (the parent model, its config, its image processor), the fresh-
model presets, where the class heads are, and where the method finds what it needs in the arguments the parent's
``forward`` hands to its own loss function (``hf_caldetr.models.calibrated``). The Cal config and model classes
(``Cal`` + the parent's name) are made from the entry (``hf_caldetr.configuration``, ``hf_caldetr.models``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import transformers
from transformers import ResNetConfig

from .distributed import world_size


def small_backbone_config(hidden_sizes=(32, 64, 128, 256), config_class=ResNetConfig, levels=3, first_stage=2):
    """A small basic-block ResNet (random init: nothing is downloaded), ``levels`` stages from ``first_stage`` on
    as features (stage k has stride 2^(k+1))."""
    stages = [f"stage{k}" for k in range(first_stage, first_stage + levels)]
    return config_class(layer_type="basic", hidden_sizes=list(hidden_sizes), embedding_size=hidden_sizes[0],
                        depths=[1, 1, 1, 1], out_features=stages)


def _rt_detr_backbone(hidden_sizes):
    return small_backbone_config(hidden_sizes, transformers.RTDetrResNetConfig)


_SMALL = dict(encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0)
_TINY = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
             encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, dropout=0.0)


# ------------------------------------------------------------------------------------ the installed losses' facts


def _accelerate_is_set_up() -> bool:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        return False
    from accelerate import PartialState

    return PartialState._shared_state != {}


def image_loss_num_boxes(targets: list[dict]) -> float:
    """The normaliser of transformers' ``ImageLoss`` (DETR, Conditional DETR, DAB-DETR, Deformable DETR): with
    accelerate set up, the boxes are *averaged* over processes and then divided by the process count again."""
    boxes = float(sum(len(t["class_labels"]) for t in targets))
    if _accelerate_is_set_up() and world_size() > 1:
        boxes = _mean_across_processes(boxes) / world_size()
    return max(boxes, 1.0)


def local_num_boxes(targets: list[dict]) -> float:
    """The normaliser of transformers' ``RTDetrLoss`` and its descendants: this process's boxes, at least 1."""
    return max(float(sum(len(t["class_labels"]) for t in targets)), 1.0)


def _mean_across_processes(value: float) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / world_size()


def _deformable_matcher(config):
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    return DeformableDetrHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                          giou_cost=config.giou_cost)


def _detr_matcher(config):
    from transformers.loss.loss_for_object_detection import HungarianMatcher

    return HungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)


def _rt_detr_matcher(config):
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    return RTDetrHungarianMatcher(config)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its stock classes, its image processor, fresh-model presets, and where the method finds
    what it needs. Presets build models with random weights (no pretrained weights exist offline); values that
    are callables are called at build time."""

    config_class: type
    model_class: type
    image_processor_class: str
    presets: dict
    # The final decoder layer's class head (what post-processing reads), for folding a calibrator into it; None
    # where the final logits are not an affine map of one head's input (D-FINE's LQE adds a term after the head).
    final_class_head: Callable | None
    # ``model -> [L modules]``: the class head of each decoder layer (to undo a folded calibration on its logits).
    layer_class_heads: Callable
    # ``(model, outputs) -> [B, L, Q, C]``: every decoder layer's class logits, from the outputs of one inference
    # forward run with ``layer_logits_options`` (stock or Cal model, unwrapped); see ``decoder_layer_logits``.
    # None where the parent's inference forward computes the final layer's logits only (D-FINE, DEIMv2).
    layer_logits: Callable | None
    # The matcher the parent's loss builds, ``config -> module``: the mixing loss takes the final layer's matches.
    matcher: Callable
    # The normaliser the parent's loss divides by, ``targets -> float`` (for ``config.num_boxes_normalization``);
    # None where it is already the whole batch's (LW-DETR's sums the boxes over processes).
    stock_num_boxes: Callable | None
    # What the forward must be asked for so that ``layer_logits`` finds every layer's logits in its outputs.
    layer_logits_options: Mapping = field(default_factory=dict)
    # How the image processor's ``post_process_object_detection`` picks its detections from the final logits:
    # ``"top_k"`` (the top ``min(top_k, Q * C)`` sigmoid scores), ``"top_queries"`` (the top ``Q`` sigmoid scores
    # over ``Q * C``) or ``"per_query"`` (one per query: the softmax argmax over the real classes).
    detection_selection: str = "top_k"
    # A softmax head with a no-object column (DETR) rather than per-class sigmoids.
    softmax_head: bool = False
    # ``config -> (alpha, gamma)`` of the mixing loss's sigmoid focal loss (sigmoid heads).
    mixing_focal: Callable | None = None
    # The parent hands its loss every layer's logits as ``[L, B, Q, C]`` (DETR-style) rather than ``[B, L, Q, C]``.
    layers_first: bool = True
    # Entries of ``outputs_class`` before the first decoder layer's (D-FINE's "pre" output, before its LQE).
    pre_layers: int = 0
    # Loss-dict entries (by prefix) the parent does not divide by the number of boxes (DETR's class-weighted mean),
    # or ``config -> such a tuple``.
    unnormalised_losses: tuple | Callable = ()
    # Where the parent keeps no per-layer logits (DETR without ``auxiliary_loss``): the modules whose outputs the
    # Cal model records with a forward hook, and ``(model, recorded outputs) -> [B, L - 1, Q, C]``.
    recorded_layers: Callable | None = None
    recorded_layer_logits: Callable | None = None
    # Group DETR (LW-DETR, RF-DETR): ``(config, queries in the logits) -> groups``; the matcher matches each group
    # of queries on its own (every box once per group) and the parent's normaliser counts each box once per group.
    query_groups: Callable | None = None

    @property
    def cal_config_class(self) -> type:
        from . import configuration

        return getattr(configuration, "Cal" + self.config_class.__name__)

    @property
    def cal_model_class(self) -> type:
        from . import models

        return getattr(models, "Cal" + self.model_class.__name__)


# Every decoder layer's class logits, per family: what D-UCE's per-detection uncertainty ``tanh(Var_l(Z))`` is
# computed from. All come from the outputs of the evaluation's one forward pass; none runs the model again.


def _per_layer_heads_logits(heads, hidden_states) -> torch.Tensor:
    """``[B, L, Q, C]`` from ``[B, L, Q, d]`` decoder states, each layer through its own class head."""
    return torch.stack([heads[level](hidden_states[:, level]) for level in range(hidden_states.shape[1])], dim=1)


def _deformable_detr_layer_logits(model, outputs) -> torch.Tensor:
    """Deformable DETR returns every decoder layer's hidden state (``intermediate_hidden_states`` ``[B, L, Q, d]``)
    and only the last layer's logits: each layer's own head ``class_embed[l]`` gives them (``L`` linear maps)."""
    return _per_layer_heads_logits(model.class_embed, outputs.intermediate_hidden_states)


def decoder_layer_states(model, outputs) -> torch.Tensor:
    """Every decoder layer's output as its class head sees it, ``[B, L, Q, d]``, of a DETR, Conditional DETR or
    DAB-DETR model (stock or Cal) run with ``output_hidden_states=True``.

    These keep per-layer states only with `auxiliary_loss`, and switching that on changes the decoder itself
    (each layer then receives the previous one's layer-normed output), so it cannot be forced. The recorded
    decoder hidden states exist either way: the decoder's input queries first, then each layer's output, the last
    one replaced by the final (layer-normed) state. The decoder's final layer norm turns a layer's output into
    what the auxiliary heads see; the last layer is the final state itself, which the model's heads use.
    """
    if outputs.decoder_hidden_states is None:
        raise ValueError(f"{type(model).__name__}'s per-layer states need the decoder's hidden states: run the model "
                         "with output_hidden_states=True")
    norm = model.model.decoder.layernorm
    states = outputs.decoder_hidden_states
    return torch.stack([*(norm(state) for state in states[1:-1]), states[-1]], dim=1)


def _hidden_state_logits(head: Callable) -> Callable:
    """``(model, outputs) -> [B, L, Q, C]`` for DETR-style decoders: ``head(model)`` on :func:`decoder_layer_states`
    (``L`` small linear maps; the last layer is exactly ``outputs.logits``)."""
    return lambda model, outputs: head(model)(decoder_layer_states(model, outputs))


def _recorded_layer_norm_logits(head: Callable) -> Callable:
    """The first ``L - 1`` layers' logits from their recorded outputs, as the auxiliary heads see them: the
    decoder's final layer norm, then the class head (the same numbers as :func:`_hidden_state_logits`)."""
    def layer_logits(model, recorded):
        norm = model.model.decoder.layernorm
        return head(model)(norm(torch.stack(recorded, dim=1)))
    return layer_logits


def _group_detr_layer_logits(model, outputs) -> torch.Tensor:
    """LW-DETR and RF-DETR return every decoder layer's state (``intermediate_hidden_states`` ``[L, B, Q, d]``);
    their one class head gives every layer's logits."""
    return model.class_embed(outputs.intermediate_hidden_states).transpose(0, 1)


def _group_detr_recorded_logits(model, recorded) -> torch.Tensor:
    """The first ``L - 1`` layers' logits from the recorded decoder output (its ``intermediate_hidden_states``)."""
    return model.class_embed(recorded[0].intermediate_hidden_states[:-1]).transpose(0, 1)


def _lw_detr_matcher(config):
    from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher

    return LwDetrHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)


def _intermediate_logits(model, outputs) -> torch.Tensor:
    """RT-DETR and its descendants return them (``intermediate_logits``); at inference there are no denoising
    queries."""
    return outputs.intermediate_logits


def _rt_detr_focal(config) -> tuple[float, float]:
    """The mixing loss of the varifocal family: focal with alpha ``1 - focal_loss_alpha``, so that a negative entry
    is weighted ``focal_loss_alpha * p ** gamma`` exactly as in the varifocal loss."""
    return 1 - config.focal_loss_alpha, config.focal_loss_gamma


def _deimv2_focal(config) -> tuple[float, float]:
    """DEIMv2's MAL weights a negative ``mal_alpha * p ** gamma``, or ``p ** gamma`` without ``mal_alpha`` (its
    default): the focal alpha that gives the same (a negative alpha: no weighting in transformers' focal loss)."""
    alpha = getattr(config, "mal_alpha", None)
    return (-1.0 if alpha is None else 1 - alpha), config.focal_loss_gamma


def _deimv2_unnormalised(config) -> tuple:
    """With dense one-to-one matching (DEIMv2's default) the box and FGL losses are divided by each process's
    count of matched pairs, which the parent keeps to itself: they keep transformers' per-process normaliser."""
    dense = ("loss_bbox", "loss_giou", "loss_fgl") if getattr(config, "use_dense_one_to_one", False) else ()
    return ("loss_ddf", *dense)


def _hgnet_backbone(width: int):
    """A small HGNetV2 (D-FINE's and DEIMv2's backbone family), random init; features from stages 2-4."""
    inputs = [8 * width, 16 * width, 32 * width, 64 * width]
    outputs = [2 * c for c in inputs]  # stage k feeds stage k + 1; stages 2-4 give 4, 8 and 16 x width channels
    return transformers.HGNetV2Config(
        stem_channels=[3, 8 * width, 8 * width], stage_in_channels=inputs, stage_mid_channels=inputs,
        stage_out_channels=outputs, stage_num_blocks=[1, 1, 1, 1], stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
        stage_numb_of_layers=[2, 2, 2, 2], hidden_sizes=outputs, depths=[1, 1, 1, 1],
        out_indices=[2, 3, 4])


_D_FINE_TINY = dict(encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64,
                    encoder_attention_heads=2, encoder_layers=1, hidden_expansion=0.5, depth_mult=0.34, d_model=32,
                    decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_attention_heads=2, decoder_layers=2,
                    decoder_n_points=2, num_queries=12, num_denoising=10)
_D_FINE_SMALL = dict(encoder_in_channels=[64, 128, 256], encoder_hidden_dim=64, encoder_ffn_dim=256,
                     encoder_attention_heads=4, encoder_layers=1, hidden_expansion=0.5, depth_mult=0.34, d_model=64,
                     decoder_in_channels=[64, 64, 64], decoder_ffn_dim=256, decoder_attention_heads=4,
                     decoder_layers=3, decoder_n_points=2, num_queries=20, num_denoising=20)


# One entry per family. Siblings are the first one with what differs replaced (dataclasses.replace).

_DEFORMABLE_DETR = ModelFamily(
    transformers.DeformableDetrConfig, transformers.DeformableDetrForObjectDetection,
    "DeformableDetrImageProcessor",
    {
        "tiny": dict(_TINY, backbone_config=lambda: small_backbone_config((16, 32, 64, 128)), num_feature_levels=3,
                     encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=12),
        # Measured on the digits default (2-core CPU, AP50 at 1500 steps): features from strides 4-16 rather
        # than 8-32 (digits are 14-32 px) and deep supervision of every decoder layer (the original recipe's
        # auxiliary loss, off by default in transformers) took AP50 from 0.09 to 0.12; then a learning rate of
        # 1e-3 rather than 5e-4 to 0.25, and focal_alpha 0.5 rather than 0.25 to 0.43 (with 0.25, a detector
        # trained for minutes scores almost nothing above the protocol's 0.3 threshold).
        "small": dict(_SMALL, backbone_config=lambda: small_backbone_config(first_stage=1), d_model=64,
                      encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=20,
                      num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=20,
                      auxiliary_loss=True, focal_alpha=0.5),
        # The paper's recipe on a random timm ResNet-50.
        "r50": dict(num_queries=300),
    },
    # class_embed[decoder_layers] exists in two-stage models: the encoder's proposal head.
    final_class_head=lambda model: model.class_embed[model.config.decoder_layers - 1],
    layer_class_heads=lambda model: [model.class_embed[level] for level in range(model.config.decoder_layers)],
    layer_logits=_deformable_detr_layer_logits,
    matcher=_deformable_matcher,
    stock_num_boxes=image_loss_num_boxes,
    detection_selection="top_k",
    mixing_focal=lambda config: (config.focal_alpha, 2.0),
)

_DETR = ModelFamily(
    transformers.DetrConfig, transformers.DetrForObjectDetection,
    "DetrImageProcessor",
    {
        "tiny": dict(_TINY, backbone_config=lambda: small_backbone_config((16, 32, 64, 128), levels=1, first_stage=4),
                     use_timm_backbone=False),
        "small": dict(_SMALL, backbone_config=lambda: small_backbone_config(levels=1, first_stage=4), use_timm_backbone=False,
                      d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256,
                      num_queries=20),
        "r50": dict(num_queries=100),
    },
    # One classifier serves every decoder layer (the auxiliary outputs too).
    final_class_head=lambda model: model.class_labels_classifier,
    layer_class_heads=lambda model: [model.class_labels_classifier] * model.config.decoder_layers,
    layer_logits=_hidden_state_logits(lambda model: model.class_labels_classifier),
    matcher=_detr_matcher,
    stock_num_boxes=image_loss_num_boxes,
    layer_logits_options={"output_hidden_states": True},
    detection_selection="per_query",
    softmax_head=True,
    # DETR's loss_ce is a class-weighted mean over all queries (eos_coefficient on no-object), not over boxes.
    unnormalised_losses=("loss_ce",),
    # Without auxiliary_loss DETR keeps no per-layer state, and switching it on changes the decoder (see
    # decoder_layer_states); the last layer's output only feeds the final layer norm (last_hidden_state).
    recorded_layers=lambda model: list(model.model.decoder.layers)[:-1],
    recorded_layer_logits=_recorded_layer_norm_logits(lambda model: model.class_labels_classifier),
)

# The RT-DETR family and its descendants share RT-DETR's image processor, matcher and normaliser.
_RT_DETR = ModelFamily(
    transformers.RTDetrConfig, transformers.RTDetrForObjectDetection,
    "RTDetrImageProcessor",
    {
        "tiny": dict(backbone_config=lambda: _rt_detr_backbone((16, 32, 64, 128)), encoder_hidden_dim=32,
                     encoder_in_channels=[32, 64, 128], encoder_layers=1, encoder_ffn_dim=64,
                     encoder_attention_heads=2, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                     decoder_layers=2, decoder_attention_heads=2, decoder_n_points=2, num_queries=12,
                     num_denoising=10),
        "small": dict(backbone_config=lambda: _rt_detr_backbone((32, 64, 128, 256)), encoder_hidden_dim=64,
                      encoder_in_channels=[64, 128, 256], encoder_layers=1, encoder_ffn_dim=256,
                      encoder_attention_heads=4, d_model=64, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=256,
                      decoder_layers=3, decoder_attention_heads=4, decoder_n_points=2, num_queries=20,
                      num_denoising=20),
        "r50": dict(),
    },
    # Query selection uses model.enc_score_head, a separate head.
    final_class_head=lambda model: model.model.decoder.class_embed[-1],
    layer_class_heads=lambda model: list(model.model.decoder.class_embed),
    layer_logits=_intermediate_logits,
    matcher=_rt_detr_matcher,
    stock_num_boxes=local_num_boxes,
    detection_selection="top_queries",
    mixing_focal=_rt_detr_focal,
    layers_first=False,
)

# D-FINE and DEIMv2: in training the parent hands its loss a "pre" output before the decoder layers' (class head 0
# before the localisation-quality term), and at inference it computes the final layer only, so the uncertainty exists
# in training (where the method needs it) but not at inference: no D-UCE, no modulate_at_inference. Their final
# logits add LQE's quality term after the class head: no folding.
_D_FINE = replace(
    _RT_DETR, config_class=transformers.DFineConfig, model_class=transformers.DFineForObjectDetection,
    presets={"tiny": dict(_D_FINE_TINY, backbone_config=lambda: _hgnet_backbone(1)),
             "small": dict(_D_FINE_SMALL, backbone_config=lambda: _hgnet_backbone(2)), "r50": dict()},
    final_class_head=None, layer_logits=None, pre_layers=1,
    # The decoupled distillation loss is a mean over its entries, not over boxes.
    unnormalised_losses=("loss_ddf",),
)

# Conditional DETR and DAB-DETR: sigmoid heads, Deformable DETR's loss (transformers' mapping); per-layer states as
# DETR's (auxiliary_loss is off by default and changes the decoder).
_CONDITIONAL_DETR = replace(
    _DETR, config_class=transformers.ConditionalDetrConfig, model_class=transformers.ConditionalDetrForObjectDetection,
    image_processor_class="ConditionalDetrImageProcessor",
    presets={
        "tiny": dict(_TINY, backbone_config=lambda: small_backbone_config((16, 32, 64, 128), levels=1, first_stage=4)),
        "small": dict(_SMALL, backbone_config=lambda: small_backbone_config(levels=1, first_stage=4), d_model=64,
                      encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=20),
        "r50": dict(),
    },
    matcher=_deformable_matcher, detection_selection="top_k", softmax_head=False, unnormalised_losses=(),
    mixing_focal=lambda config: (config.focal_alpha, 2.0),
)

# LW-DETR and RF-DETR: sigmoid heads, LW-DETR's loss, group DETR in training (num_queries x group_detr queries, each
# group matched on its own); the per-layer states are in the outputs.
_LW_DETR = ModelFamily(
    transformers.LwDetrConfig, transformers.LwDetrForObjectDetection,
    "DeformableDetrImageProcessor",
    {
        "tiny": dict(backbone_config=lambda: transformers.LwDetrViTConfig(
                         hidden_size=16, num_hidden_layers=2, num_attention_heads=2, window_block_indices=[0],
                         out_indices=[1], num_windows=4, image_size=64, patch_size=16),
                     d_model=32, projector_scale_factors=[1.0], decoder_ffn_dim=32, decoder_layers=2,
                     decoder_self_attention_heads=2, decoder_cross_attention_heads=2, num_queries=6, group_detr=3),
        "small": dict(backbone_config=lambda: transformers.LwDetrViTConfig(
                          hidden_size=64, num_hidden_layers=4, num_attention_heads=4, window_block_indices=[0, 2],
                          out_indices=[3], num_windows=4, image_size=96, patch_size=8),
                      d_model=64, projector_scale_factors=[1.0], decoder_ffn_dim=256, decoder_layers=3,
                      decoder_self_attention_heads=4, decoder_cross_attention_heads=4, num_queries=20,
                      group_detr=4),
        "r50": dict(),
    },
    final_class_head=lambda model: model.class_embed,
    layer_class_heads=lambda model: [model.class_embed] * model.config.decoder_layers,
    layer_logits=_group_detr_layer_logits,
    matcher=_lw_detr_matcher,
    stock_num_boxes=None,
    detection_selection="top_k",
    mixing_focal=lambda config: (config.focal_alpha, 2.0),
    recorded_layers=lambda model: [model.model.decoder],
    recorded_layer_logits=_group_detr_recorded_logits,
    query_groups=lambda config, queries: max(queries // config.num_queries, 1),
)


def _class_embed(model):
    return model.class_embed


MODEL_FAMILIES = {
    "deformable_detr": _DEFORMABLE_DETR,
    "detr": _DETR,
    "rt_detr": _RT_DETR,
    "rt_detr_v2": replace(_RT_DETR, config_class=transformers.RTDetrV2Config,
                          model_class=transformers.RTDetrV2ForObjectDetection),
    "d_fine": _D_FINE,
    "deimv2": replace(_D_FINE, config_class=transformers.Deimv2Config, model_class=transformers.Deimv2ForObjectDetection,
                      mixing_focal=_deimv2_focal, unnormalised_losses=_deimv2_unnormalised),
    "conditional_detr": _CONDITIONAL_DETR,
    # No DAB-DETR image processor exists; its checkpoints use Conditional DETR's. Its one class head: class_embed.
    "dab-detr": replace(
        _CONDITIONAL_DETR, config_class=transformers.DabDetrConfig, model_class=transformers.DabDetrForObjectDetection,
        presets={"tiny": dict({k: v for k, v in _CONDITIONAL_DETR.presets["tiny"].items() if k != "d_model"},
                              hidden_size=32),
                 "small": dict({k: v for k, v in _CONDITIONAL_DETR.presets["small"].items() if k != "d_model"},
                               hidden_size=64),
                 "r50": dict()},
        final_class_head=_class_embed,
        layer_class_heads=lambda model: [model.class_embed] * model.config.decoder_layers,
        layer_logits=_hidden_state_logits(_class_embed),
        recorded_layer_logits=_recorded_layer_norm_logits(_class_embed),
    ),
    "lw_detr": _LW_DETR,
    "rf_detr": replace(
        _LW_DETR, config_class=transformers.RfDetrConfig, model_class=transformers.RfDetrForObjectDetection,
        image_processor_class="RfDetrImageProcessor",
        presets={
            "tiny": dict(backbone_config=lambda: transformers.RfDetrDinov2Config(
                             hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             out_features=["stage1", "stage2"], patch_size=16, num_windows=2, image_size=64),
                         d_model=32, decoder_ffn_dim=32, decoder_layers=2, decoder_self_attention_heads=2,
                         decoder_cross_attention_heads=2, num_queries=6, group_detr=3, dropout=0.0),
            "small": dict(backbone_config=lambda: transformers.RfDetrDinov2Config(
                              hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                              out_features=["stage2", "stage4"], patch_size=8, num_windows=2, image_size=96),
                          d_model=64, decoder_ffn_dim=256, decoder_layers=3, decoder_self_attention_heads=4,
                          decoder_cross_attention_heads=4, num_queries=20, group_detr=4, dropout=0.0),
            "r50": dict(),
        },
    ),
}

# Keyed by the config's own model_type (what a checkpoint's config.json says; DAB-DETR's has a dash).
for _model_type, _family in MODEL_FAMILIES.items():
    assert _family.config_class.model_type == _model_type, (_model_type, _family.config_class.model_type)

# Backwards-compatible view: the Deformable DETR presets.
MODEL_PRESETS = MODEL_FAMILIES["deformable_detr"].presets


def has_layer_logits(model) -> bool:
    """Whether ``decoder_layer_logits`` can give ``model``'s per-layer logits: a PyTorch model (unwrapped) of a
    registered family with at least 2 decoder layers (the variance over one layer is undefined). An ONNX model
    (``hf_caldetr.export.OnnxDetector``) returns the final logits only."""
    config = getattr(model, "config", None)
    family = MODEL_FAMILIES.get(getattr(config, "model_type", None))
    return (isinstance(model, torch.nn.Module) and family is not None and family.layer_logits is not None
            and getattr(config, "decoder_layers", 0) >= 2)


def layer_logits_options(model) -> dict:
    """The forward options under which ``model``'s outputs hold what ``decoder_layer_logits`` reads."""
    return dict(model_family(model.config.model_type).layer_logits_options)


def decoder_layer_logits(model, outputs, raw: bool = True) -> torch.Tensor:
    """Every decoder layer's class logits ``[B, L, Q, C]`` from the outputs of one forward of ``model`` (the
    unwrapped stock or Cal model, run with ``layer_logits_options(model)``): ``C`` labels for sigmoid heads,
    labels + 1 for DETR. No forward runs here.

    ``raw``: a calibration folded into the weights (``config.folded_calibration``, ``hf_caldetr.folding``) is
    undone on the logits of the layers whose head it was written into (the final layer; DETR: all of them, one
    classifier), so the logits, and the uncertainty computed from them, are the raw model's: a post-hoc
    calibrator changes the scores, not the uncertainty.
    """
    family = model_family(model.config.model_type)
    if family.layer_logits is None:
        raise ValueError(f"{type(model).__name__}'s inference forward computes the final decoder layer's logits "
                         "only: no per-layer logits, no uncertainty outside training")
    logits = family.layer_logits(model, outputs)
    if logits is None or logits.dim() != 4:
        raise ValueError(f"{type(model).__name__}'s outputs hold no per-layer logits [batch, layers, queries, "
                         f"classes] (run it with {dict(family.layer_logits_options) or 'its defaults'})")
    records = list(getattr(model.config, "folded_calibration", None) or []) if raw else []
    if records:
        heads = family.layer_class_heads(model)
        logits = logits.clone()
        for record in reversed(records):  # the newest fold first, as unfold_calibration does
            folded = set()
            for path in record.get("head_paths") or []:
                try:
                    folded.add(id(model.get_submodule(path)))
                except AttributeError:
                    continue
            folded = folded or {id(family.final_class_head(model))}
            layers = [level for level, head in enumerate(heads) if id(head) in folded]
            slope = torch.as_tensor(record["logit_slope"], dtype=logits.dtype, device=logits.device)
            offset = torch.as_tensor(record["logit_offset"], dtype=logits.dtype, device=logits.device)
            logits[:, layers] = (logits[:, layers] - offset) / slope
    return logits


def model_family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_FAMILIES)}, got {model_type!r}")
    return MODEL_FAMILIES[model_type]




def preset_config_kwargs(family: ModelFamily, preset: str, **overrides) -> dict:
    """The config keyword arguments of ``family``'s fresh-model ``preset`` (callables called), with ``overrides``.
    One source for every fresh model: the scripts', the tests' and the benchmarks'."""
    if preset not in family.presets:
        raise ValueError(f"model preset must be one of {sorted(family.presets)}, got {preset!r}")
    return {**{k: (v() if callable(v) else v) for k, v in family.presets[preset].items()}, **overrides}
