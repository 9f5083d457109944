"""One thin file per architecture: each gathers its decoder-layer logits and wires its own classification loss."""

from .deformable_detr import (
    CalDeformableDetrForObjectDetection,
    CalDeformableDetrImageLoss,
    CalDeformableDetrObjectDetectionOutput,
)

__all__ = [
    "CalDeformableDetrForObjectDetection",
    "CalDeformableDetrImageLoss",
    "CalDeformableDetrObjectDetectionOutput",
]
