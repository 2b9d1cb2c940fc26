"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from typing import Any

from torch import nn

from .detr import DETR, PostProcess, SetCriterion, build


def build_model(args: Any) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    return build(args)


__all__ = ["DETR", "PostProcess", "SetCriterion", "build_model"]
