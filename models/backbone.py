"""ResNet backbone with a padding mask carried to every returned stage.

Building a backbone never downloads anything: weights are loaded separately, by
``load_backbone_weights``, when a training command asks for them.
"""
from collections import OrderedDict
from typing import Any
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision import ops
from torchvision.models.resnet import Bottleneck

from util.errors import UserError
from util.misc import NestedTensor

from .position_encoding import build_position_encoding

__all__ = ["FrozenBatchNorm2d", "conv_frozen_bn", "residual_block", "BackboneBase", "Backbone", "Joiner", "build_backbone", "load_backbone_weights", "unpadded_positions"]

_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, state_dict keys and loading) run as one
    inference-mode ``batch_norm`` kernel instead of five elementwise ops; in ``ResNetBody`` it is
    folded into the convolution before it instead (``conv_frozen_bn``).

    The statistics and affine parameters are buffers, never updated, so the inference-mode
    kernel computes the same function in training too (the gradient flows to the input only);
    results differ from torchvision's by float rounding (~1e-6) at most.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """``bn(conv(x))``, as one convolution when ``bn`` is this module's ``FrozenBatchNorm2d``.

    Frozen BatchNorm is a fixed per-channel affine map, so it folds into the convolution:
    weight ``w * s`` and bias ``b - mean * s`` with ``s = gamma / sqrt(var + eps)``, computed from
    the module's own tensors at every call (weights and statistics stay where they are, so
    state_dicts, loading and training are untouched; gradients reach the convolution weight
    through the fold). The result differs from the two-step one by float rounding only. This
    skips one pass over the activations per convolution, 10% of DC5-R50's inference time on a
    CPU (docs/BENCHMARKS.md); any other norm runs as a separate module.
    """
    if type(bn) is not FrozenBatchNorm2d:
        return bn(conv(x))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision ``BasicBlock`` or ``Bottleneck`` on ``x``, its FrozenBatchNorms folded
    (``conv_frozen_bn``); the same operations as the block's own forward otherwise."""
    if type(block.bn1) is not FrozenBatchNorm2d:
        return block(x)
    out = block.relu(conv_frozen_bn(x, block.conv1, block.bn1))
    out = conv_frozen_bn(out, block.conv2, block.bn2)
    if isinstance(block, Bottleneck):
        out = conv_frozen_bn(block.relu(out), block.conv3, block.bn3)
    identity = x if block.downsample is None else conv_frozen_bn(x, block.downsample[0], block.downsample[1])
    out += identity
    return block.relu(out)


class ResNetBody(nn.ModuleDict):
    """The stem and stages ``layer1..layer{last_stage}`` of a torchvision ResNet.

    ``forward`` returns the outputs of ``return_stages`` (1-based) keyed ``"0".."3"``; the
    convolutions followed by this module's ``FrozenBatchNorm2d`` run with the norm folded in
    (``conv_frozen_bn``).
    """

    def __init__(self, resnet: nn.Module, last_stage: int, return_stages: tuple[int, ...]):
        names = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}" for i in range(1, last_stage + 1)]
        super().__init__(OrderedDict((name, getattr(resnet, name)) for name in names))
        self.last_stage = last_stage
        self.return_stages = return_stages

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self["maxpool"](self["relu"](conv_frozen_bn(x, self["conv1"], self["bn1"])))
        out = {}
        for stage in range(1, self.last_stage + 1):
            for block in self[f"layer{stage}"]:
                x = residual_block(block, x)
            if stage in self.return_stages:
                out[str(stage - 1)] = x
        return out


class BackboneBase(nn.Module):
    """A torchvision ResNet's stages (``ResNetBody``) with the padding mask resized to each
    returned stage; DETR's base class, with its signature.

    Args:
        backbone: a torchvision ResNet.
        train_backbone: whether any parameter is trained: stages 2-4, or every one with ``train_stem``.
        num_channels: channels of the last returned stage.
        return_interm_layers: also return stages 1..last_stage-1 (mask head).
        last_stage: the last stage kept (4: C5).
        train_stem: also train the stem and stage 1 (a from-scratch backbone).
    """

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
                 last_stage: int = 4, train_stem: bool = False):
        super().__init__()
        for param_name, param in backbone.named_parameters():
            trainable = train_backbone and (train_stem or param_name.startswith(("layer2", "layer3", "layer4")))
            param.requires_grad_(trainable)
        return_stages = tuple(range(1, last_stage + 1)) if return_interm_layers else (last_stage,)
        self.body = ResNetBody(backbone, last_stage, return_stages)
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        features = self.body(tensor_list.tensors)
        out = {}
        for key, x in features.items():
            mask = tensor_list.mask
            if mask is None:
                mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
            else:
                mask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[key] = NestedTensor(x, mask)
        return out


class Backbone(BackboneBase):
    """A torchvision ResNet by name returning the last stage (and the earlier ones for masks).

    Args:
        name: resnet18, resnet34, resnet50 or resnet101.
        train_backbone: whether any backbone parameter is trained.
        return_interm_layers: also return stages 1..last_stage-1 (mask head).
        dilation: DC5, dilate the last stage instead of striding (resnet50/101 only).
        frozen_bn: FrozenBatchNorm2d (for pretrained weights) instead of trainable BatchNorm2d.
        last_stage: 4 returns C5 (stride 32, or 16 with dilation); 3 returns C4 (stride 16);
            2 returns C3 (stride 8).

    With ``frozen_bn`` the published recipe trains stages 2-4 only; a from-scratch backbone
    (trainable BatchNorm) trains every stage.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 frozen_bn: bool = True, last_stage: int = 4):
        if name not in _STAGE_CHANNELS:
            raise UserError(f"--backbone: expected one of {sorted(_STAGE_CHANNELS)}, got {name!r}")
        if last_stage not in (2, 3, 4):
            raise UserError(f"--backbone_last_stage: expected 2, 3 or 4, got {last_stage}")
        if dilation and name in ("resnet18", "resnet34"):
            raise UserError(f"--dilation needs a bottleneck ResNet (resnet50/resnet101); "
                            f"torchvision cannot dilate {name}")
        if dilation and last_stage != 4:
            raise UserError(f"--dilation dilates stage 4 and cannot be combined with --backbone_last_stage {last_stage}")
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer,
                                                    replace_stride_with_dilation=[False, False, dilation])
        super().__init__(resnet, train_backbone, _STAGE_CHANNELS[name][last_stage - 1], return_interm_layers,
                         last_stage, train_stem=not frozen_bn)
        self.name = name
        self.stage_channels = _STAGE_CHANNELS[name][:last_stage]
        self.strides = [4, 8, 16, 16 if dilation else 32][:last_stage]


def unpadded_positions(image_sizes: list[tuple[int, int]], canvas: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``(B,)`` int64 on the CPU: how many positions of a ``grid`` feature map are unpadded
    for images of ``image_sizes`` padded to ``canvas`` pixels, as ``Backbone`` resizes the mask.

    The same nearest-neighbour map that resizes the mask is applied to the row and column
    indices on the host, so the count equals ``(~mask).sum()`` without reading the mask
    (which, on a GPU, would wait for the device).
    """
    sizes = torch.tensor(image_sizes, dtype=torch.float32)                    # (B, 2): heights, widths
    kept = []
    for axis, (length, resized) in enumerate(zip(canvas, grid)):
        # The pixel index each resized position reads, by the map that resizes every axis of the mask.
        source = F.interpolate(torch.arange(length, dtype=torch.float32)[None, None, None], size=(1, resized)).flatten()
        kept.append((source[None] < sizes[:, axis, None]).sum(1))             # (B,) unpadded along this axis
    return kept[0] * kept[1]


class Joiner(nn.Sequential):
    """Backbone followed by position encoding; returns per-stage features and encodings.

    ``strides``: the backbone's, when it names them (``Backbone`` does; a ``BackboneBase``
    around any ResNet does not).
    """

    def __init__(self, backbone: BackboneBase, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = getattr(backbone, "strides", None)

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        features = list(self[0](tensor_list).values())
        pos = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, pos


def load_backbone_weights(backbone: Backbone, spec: str) -> None:
    """Load ResNet weights into ``backbone``: ``none``, ``imagenet`` (torchvision, may download) or a path.

    A path holds a torchvision ResNet state_dict (``conv1.weight``, ``layer1...``; ``fc.*`` ignored).
    """
    if spec == "none":
        return
    if spec == "imagenet":
        weights_enum = getattr(torchvision.models, _IMAGENET_WEIGHTS[backbone.name]).IMAGENET1K_V1
        try:
            state_dict = weights_enum.get_state_dict(progress=True)
        except (URLError, OSError, RuntimeError) as err:  # offline, or a corrupt cached download
            raise UserError(f"--backbone_weights imagenet: could not download the {backbone.name} ImageNet "
                            f"weights ({err}); pass --backbone_weights none to train from scratch, "
                            "or --backbone_weights PATH to a local copy") from None
        source = f"torchvision {weights_enum}"
    else:
        try:
            state_dict = torch.load(spec, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"--backbone_weights: {spec} does not exist "
                            "(expected 'imagenet', 'none' or a ResNet state_dict file, "
                            "e.g. written by pretrain_backbone.py)") from None
        except Exception as err:  # unpickling errors come in many types
            raise UserError(f"--backbone_weights: {spec} is not a readable torch state_dict "
                            f"({type(err).__name__})") from None
        if not isinstance(state_dict, dict):
            raise UserError(f"--backbone_weights: {spec} does not hold a state_dict")
        source = spec
    wanted = backbone.body.state_dict()
    selected = {k: v for k, v in state_dict.items() if k in wanted}
    missing = sorted(k for k in wanted if k not in selected and not k.endswith("num_batches_tracked"))
    if missing:
        raise UserError(f"--backbone_weights: {source} lacks {len(missing)} {backbone.name} keys "
                        f"(first: {missing[0]})")
    mismatched = sorted(k for k, v in selected.items() if v.shape != wanted[k].shape)
    if mismatched:
        first = mismatched[0]
        raise UserError(f"--backbone_weights: {source} does not fit {backbone.name} ({len(mismatched)} shape "
                        f"mismatches, first: {first} {tuple(selected[first].shape)} vs "
                        f"{tuple(wanted[first].shape)}); is it another ResNet depth?")
    backbone.body.load_state_dict(selected, strict=False)


def build_backbone(args: Any) -> Joiner:
    """Backbone + position encoding from ``args``; the weights are not loaded here.

    ``args.backbone_weights == 'none'`` (from scratch) selects trainable BatchNorm.
    """
    frozen_bn = getattr(args, "backbone_weights", "imagenet") != "none"
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        return_interm_layers=args.masks, dilation=args.dilation, frozen_bn=frozen_bn,
                        last_stage=getattr(args, "backbone_last_stage", 4))
    return Joiner(backbone, build_position_encoding(args))
