"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import Any

from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build
from .segmentation import DETRsegm, build as build_segmentation


def build_model(args: Any) -> tuple[DETR | DETRsegm, SetCriterion, dict[str, nn.Module]]:
    """The detector, or with ``--masks`` the segmentation model wrapping it."""
    return build_segmentation(args) if args.masks else build(args)


__all__ = ["DETR", "DETRsegm", "PostProcess", "SetCriterion", "build_model"]
