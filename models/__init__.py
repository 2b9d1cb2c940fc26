"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import Any

import torch
from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build
from .segmentation import DETRsegm, build as build_segmentation


def build_model(args: Any) -> tuple[DETR | DETRsegm, SetCriterion, dict[str, nn.Module]]:
    """The detector, or with ``--masks`` the segmentation model wrapping it."""
    return build_segmentation(args) if args.masks else build(args)


def fast_path(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Put ``model`` (in place) on the fastest path that keeps its results, and return it.

    Every entry point that runs a model (main.py, predict.py, the hub models, the benchmark)
    calls this: the convolution weights go channels-last (oneDNN's and cuDNN's fast layout;
    the activations follow them; outputs change by float rounding only, state_dict keys and
    values do not). The other exact speed-up, FrozenBatchNorm as one kernel, is
    ``models.backbone.FrozenBatchNorm2d``'s own. ``channels_last=False`` keeps the layout.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


__all__ = ["DETR", "DETRsegm", "PostProcess", "SetCriterion", "build_model", "fast_path"]
