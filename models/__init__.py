"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import Any

from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build
from .segmentation import DETRsegm, build as build_segmentation
from .vit import ClassificationCriterion, PnPViT, build as build_classification


def build_model(args: Any) -> tuple[DETR | DETRsegm | PnPViT, SetCriterion | ClassificationCriterion,
                                    dict[str, nn.Module]]:
    """The detector, with ``--masks`` the segmentation model wrapping it, or with
    ``--task classification`` the (PnP-)ViT."""
    if getattr(args, "task", "detection") == "classification":
        return build_classification(args)
    return build_segmentation(args) if args.masks else build(args)


__all__ = ["ClassificationCriterion", "DETR", "DETRsegm", "PnPViT", "PostProcess", "SetCriterion", "build_model"]
