"""One thin file per architecture: each gathers its decoder-layer logits and wires its own classification loss."""

from .deformable_detr import (
    CalDeformableDetrForObjectDetection,
    CalDeformableDetrImageLoss,
    CalDeformableDetrObjectDetectionOutput,
)
from .detr import CalDetrForObjectDetection, CalDetrImageLoss, CalDetrObjectDetectionOutput
from .rt_detr import CalRTDetrForObjectDetection, CalRTDetrLoss, CalRTDetrObjectDetectionOutput

__all__ = [
    "CalDeformableDetrForObjectDetection",
    "CalDeformableDetrImageLoss",
    "CalDeformableDetrObjectDetectionOutput",
    "CalDetrForObjectDetection",
    "CalDetrImageLoss",
    "CalDetrObjectDetectionOutput",
    "CalRTDetrForObjectDetection",
    "CalRTDetrLoss",
    "CalRTDetrObjectDetectionOutput",
]
