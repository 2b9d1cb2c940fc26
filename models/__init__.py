"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build
from .pnp import PollAndPoolSampler
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

    The sampler's score net keeps default strides: it runs its 1x1 convolutions as matrix
    products (``models.pnp``), whose weight gradients come with default strides, and DDP warns
    when a gradient's strides differ from its parameter's ("Grad strides do not match bucket
    view strides"). A 1x1 kernel has one memory layout in both formats, so nothing else changes.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
        for sampler in (m for m in model.modules() if isinstance(m, PollAndPoolSampler)):
            for param in sampler.score_pred_net.parameters():
                param.data = param.data.clone(memory_format=torch.contiguous_format)
    return model


__all__ = ["DETR", "DETRsegm", "PostProcess", "SetCriterion", "build_model", "fast_path"]
