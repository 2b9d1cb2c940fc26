"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build
from .segmentation import DETRsegm, build as build_segmentation

if TYPE_CHECKING:
    from .vit import ClassificationCriterion, PnPViT


def build_model(args: Any) -> tuple["DETR | DETRsegm | PnPViT", "SetCriterion | ClassificationCriterion",
                                    dict[str, nn.Module]]:
    """The detector, with ``--masks`` the segmentation model wrapping it, or with
    ``--task classification`` the (PnP-)ViT (imported here: the detectors and the hub models
    need no timm)."""
    if getattr(args, "task", "detection") == "classification":
        from .vit import build as build_classification

        return build_classification(args)
    return build_segmentation(args) if args.masks else build(args)


def fast_path(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Put ``model`` (in place) on the fastest path that keeps its results, and return it.

    Every entry point that runs a model (main.py, predict.py, the hub models, the benchmark)
    calls this: the convolution weights go channels-last (oneDNN's and cuDNN's fast layout;
    the activations follow them; outputs change by float rounding only, state_dict keys and
    values do not). The other exact speed-up, FrozenBatchNorm folded into the convolution before
    it, is the backbone's own (``models.backbone.conv_frozen_bn``). ``channels_last=False`` keeps
    the layout.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


__all__ = ["DETR", "DETRsegm", "PostProcess", "SetCriterion", "build_model", "fast_path"]
