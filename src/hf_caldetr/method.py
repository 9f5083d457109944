"""The Cal-DETR method, model-agnostic: pure tensor functions.

Notation (see the spec): ``Z`` holds the class logits of every decoder layer, ``[B, L, Q, C]``; ``Z_L`` the final
layer's. ``C`` is the number of labels for sigmoid heads (Deformable DETR, RT-DETR) and labels + 1 (the no-object
column) for softmax heads (DETR).

Nothing here imports a model: each model subclass gathers its decoder-layer logits and its matched queries, and
calls these functions.
"""

from __future__ import annotations

import torch

from .distributed import sum_across_processes, world_size

MODULATION_MODES = ("multiplicative", "subtractive", "none")


def logit_uncertainty(layer_logits: torch.Tensor) -> torch.Tensor:
    """Per-logit uncertainty ``U = Var_l(Z)``: the unbiased variance over the decoder-layer axis.

    Args:
        layer_logits: ``[B, L, Q, C]`` logits of every decoder layer.

    Returns:
        ``[B, Q, C]``. Gradients flow through it (the paper and the released code do not detach it).
    """
    if layer_logits.dim() != 4:
        raise ValueError(f"layer_logits must be [batch, layers, queries, classes], got shape {tuple(layer_logits.shape)}")
    if layer_logits.shape[1] < 2:
        raise ValueError(
            "logit_uncertainty needs at least 2 decoder layers: the variance over one layer is undefined "
            f"(got {layer_logits.shape[1]})"
        )
    # Two passes by hand, the same numbers as torch.var(dim=1): on CPU (torch 2.14) torch.var over this middle axis
    # measured 7-33x slower in the forward pass with one thread ([2, 6, 300, 91]: 20x); forward and backward on two
    # threads, 1.3-3.5x (issue 13's measurement).
    centred = layer_logits - layer_logits.mean(dim=1, keepdim=True)
    return centred.square().sum(dim=1) / (layer_logits.shape[1] - 1)


def modulate_logits(final_logits: torch.Tensor, uncertainty: torch.Tensor, mode: str = "multiplicative") -> torch.Tensor:
    """Uncertainty-guided logit modulation of the final layer.

    - ``"multiplicative"`` (the paper's equation): ``Z_L * (1 - tanh(U))``, which pulls uncertain logits towards 0.
    - ``"subtractive"`` (the authors' released code, an operator-precedence slip ``z * 1 - tanh(u)``):
      ``Z_L - tanh(U)``, which lowers every score.
    - ``"none"``: ``Z_L`` unchanged.

    Args:
        final_logits: ``[B, Q, C]``.
        uncertainty: ``[B, Q, C]``, from :func:`logit_uncertainty`.
    """
    if mode not in MODULATION_MODES:
        raise ValueError(f"uncertainty_modulation must be one of {MODULATION_MODES}, got {mode!r}")
    if mode == "none":
        return final_logits
    if final_logits.shape != uncertainty.shape:
        raise ValueError(
            f"final_logits {tuple(final_logits.shape)} and uncertainty {tuple(uncertainty.shape)} must have one shape"
        )
    squashed = torch.tanh(uncertainty)
    if mode == "multiplicative":
        return torch.addcmul(final_logits, final_logits, squashed, value=-1)  # Z_L * (1 - tanh(U)), one operation
    return final_logits - squashed


def positive_rows(
    targets: list[dict], indices: list[tuple[torch.Tensor, torch.Tensor]], num_queries: int
) -> tuple[list[int], list[int]]:
    """The matched ("positive") queries of a batch, pooled over its images, as host-side lists.

    Args:
        targets: per image, a dict with ``class_labels`` ``[T_b]``.
        indices: per image, the matcher's ``(query_indices, target_indices)``.
        num_queries: ``Q``, the queries per image.

    Returns:
        ``(rows, classes)``: the positions of the ``P`` positives as rows of the ``[B * Q, C]`` flattened logits
        (``b * Q + q``), and their ground-truth classes.
    """
    # The matches are a few host-side integers: one index tensor made from them costs less than an indexing
    # operation per image (on CPU each small operation costs more than its data).
    rows, classes = [], []
    for image, ((src, tgt), target) in enumerate(zip(indices, targets)):
        labels = target["class_labels"].tolist()
        offset = image * num_queries
        rows += [offset + query for query in src.tolist()]
        classes += [labels[t] for t in tgt.tolist()]
    return rows, classes


def mix_logits(positive_logits: torch.Tensor, prototype: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mixed logits ``ztilde_i = alpha * z_i + (1 - alpha) * zbar``.

    Args:
        positive_logits: ``[P, C]``, the final-layer (modulated) logits of the positives.
        prototype: ``[C]``, ``zbar``: the mean of the positives (paper form), see :func:`logit_prototype`.
    """
    # One operation: prototype + alpha * (z_i - prototype).
    return torch.lerp(prototype.expand_as(positive_logits), positive_logits, alpha)


def logit_prototype(positive_logits: torch.Tensor) -> torch.Tensor:
    """The paper's prototype ``zbar = (1/P) sum_i z_i``, ``[P, C] -> [C]``.

    The released code weights each ``z_i`` by ``1 / (P * n_{c_i})`` instead, which is the mean only when all
    positives have distinct classes; we follow the paper.
    """
    if positive_logits.shape[0] == 0:
        raise ValueError("logit_prototype needs at least one positive")
    return positive_logits.mean(dim=0)


def mixed_targets_from_counts(
    positive_classes: torch.Tensor | list[int], class_counts: torch.Tensor | list[int], alpha: float,
    dtype: torch.dtype = torch.float32, total: int | None = None, scale: float = 1.0, device=None,
) -> torch.Tensor:
    """Smoothed targets of the mixed logits, given the class counts of all ``P`` positives in the pool.

    Positive ``i`` gets ``alpha`` on its own class; each of the other ``P - 1`` positives adds
    ``(1 - alpha) / (P - 1)`` to its own class, so a class shared with ``i`` adds to ``i``'s entry and every row
    sums to 1. With ``P = 1`` the target is the one-hot. Class id 0 is a class like any other.

    Args:
        positive_classes: ``[P_local]`` class ids of the positives whose targets are wanted (a tensor or a list).
        class_counts: ``[C]`` number of positives of each class in the whole pool (``P = class_counts.sum()``),
            which may be larger than the local positives when the pool spans processes (a tensor or a list).
        total: ``P`` when the caller knows it (saves reading it off the counts).
        scale: every entry multiplied by it (a loss's normaliser folded into its targets).
        device: where the targets go (default: that of ``class_counts``, else of ``positive_classes``, else CPU).
    """
    # A few hundred numbers at most: computed on the host and made into one tensor.
    if device is None:
        device = next((x.device for x in (class_counts, positive_classes) if isinstance(x, torch.Tensor)), None)
    counts = class_counts.tolist() if isinstance(class_counts, torch.Tensor) else list(class_counts)
    classes = positive_classes.tolist() if isinstance(positive_classes, torch.Tensor) else list(positive_classes)
    total = sum(counts) if total is None else total
    share = (1 - alpha) / (total - 1) if total > 1 else 0.0
    own = (alpha - share if total > 1 else 1.0) * scale
    base = [count * share * scale for count in counts]
    rows = [base[:label] + [base[label] + own] + base[label + 1:] for label in classes]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(len(classes), len(counts))


def mixed_targets(positive_classes: torch.Tensor, num_columns: int, alpha: float, dtype=torch.float32) -> torch.Tensor:
    """:func:`mixed_targets_from_counts` when the pool is exactly ``positive_classes``: ``[P] -> [P, num_columns]``."""
    counts = torch.bincount(positive_classes.long(), minlength=num_columns)
    return mixed_targets_from_counts(positive_classes, counts, alpha, dtype)


def pooled_logit_mixing(
    positive_logits: torch.Tensor, positive_classes: torch.Tensor | list[int], num_columns: int, alpha: float,
    target_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mixed logits and smoothed targets of this process's positives, pooled over the global batch.

    The prototype and the class counts are summed over all processes (a no-op in a single process), so a batch
    sharded over processes mixes exactly like the whole batch in one process.

    Args:
        positive_logits: ``[P_local, C]``.
        positive_classes: ``[P_local]`` (a tensor or a list).
        target_scale: the targets multiplied by it (see :func:`mixed_targets_from_counts`).

    Returns:
        ``(mixed_logits [P_local, C], targets [P_local, C], P)`` with ``P`` the number of positives of the global
        batch; with ``P = 0`` the logits come back unchanged and the targets empty.
    """
    if isinstance(positive_classes, torch.Tensor):
        positive_classes = positive_classes.tolist()
    if world_size() == 1:
        total = len(positive_classes)
        if total == 0:
            return positive_logits, positive_logits.new_zeros(positive_logits.shape), 0
        counts = [0] * num_columns
        for label in positive_classes:
            counts[label] += 1
        prototype = positive_logits.mean(dim=0)
    else:
        local = torch.tensor(positive_classes, dtype=torch.long, device=positive_logits.device)
        counts = sum_across_processes(torch.bincount(local, minlength=num_columns))
        total = int(counts.sum())
        if total == 0:
            return positive_logits, positive_logits.new_zeros(positive_logits.shape), 0
        prototype = sum_across_processes(positive_logits.sum(dim=0), differentiable=True) / total
    targets = mixed_targets_from_counts(positive_classes, counts, alpha, positive_logits.dtype, total, target_scale,
                                        positive_logits.device)
    return mix_logits(positive_logits, prototype, alpha), targets, total
