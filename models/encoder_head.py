"""A dense detection head on the encoder's tokens (Co-DETR's auxiliary head, ``--encoder_head``):
training-only supervision of every token of the encoder, many positives per object.

Tensor contract. ``EncoderHead(memory, sampled, mask)`` reads the encoder output ``memory (B, T, C)``
at the tokens that sit on one cell of the ``(h, w)`` feature map: the sampler's ``N`` fine tokens
(``sampled.poll_index``), or every position without a sampler (the coarse tokens are pools of
many cells and get no target). It returns ``EncoderPredictions``:

* ``logits (B, S, K)``: one sigmoid logit per class (no background class), S = N or h * w.
* ``deltas (B, S, 4)``: the box as offsets, in logit space, from the reference box of the token's
  cell (``reference_boxes``: centred on the cell, ``REFERENCE_CELLS`` cells wide and high).
* ``cell (B, S)``: the flat cell index ``y * w + x`` of each token; ``valid (B, S)``: False on
  padding slots and padded cells.
* ``mask (B, h, w)``: True on the feature map's padded cells; ``stride``: its cell size in pixels.

``SetCriterion.loss_encoder`` assigns each token the smallest box that holds its cell's centre
(``cell_box_index``: the rule of ``pretrain_backbone.cell_labels``, on the device, where a centre
exactly on a box edge may round the other way): a sigmoid focal loss over the classes of every
valid token, L1 and GIoU losses on the boxes of the assigned ones.
Evaluation never runs the head; its weights are kept under ``encoder_head.*`` and dropped when
loaded into a model built without one.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .pnp import SampledTokens

REFERENCE_CELLS = 4  # the reference box's width and height, in cells
PRIOR_PROBABILITY = 0.01  # the initial class probability (RetinaNet's focal-loss prior)


@dataclass
class EncoderPredictions:
    logits: Tensor
    deltas: Tensor
    cell: Tensor
    valid: Tensor
    mask: Tensor
    stride: int


def cell_box_index(targets: Sequence[dict[str, Tensor]], mask: Tensor, stride: int) -> Tensor:
    """``(B, h, w)`` int64 on ``mask``'s device: the index in ``targets[b]["boxes"]`` of the
    smallest box that holds each cell's centre, -1 where none does or the cell is padding.

    ``targets[b]["boxes"]`` are normalised ``cx, cy, w, h`` of the unpadded image of
    ``targets[b]["size"]`` (``H, W``) pixels; ``mask`` ``(B, h, w)`` is True on padding. A cell
    covers ``stride`` pixels from the top-left corner. Nothing is read on the host.
    """
    batch, height, width = mask.shape
    device = mask.device
    centre_y = ((torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride)[None, :, None]
    centre_x = ((torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride)[None, None, :]
    index = torch.full((batch, height, width), -1, dtype=torch.int64, device=device)
    for b, target in enumerate(targets):
        if len(target["boxes"]) == 0:
            continue
        size_hw = target["size"].to(device, torch.float32)
        boxes = target["boxes"].to(device, torch.float32) * size_hw.flip(0).repeat(2)   # pixels, cxcywh
        cx, cy, w, h = (coordinate[:, None, None] for coordinate in boxes.unbind(-1))
        inside = ((centre_y - cy).abs() <= h / 2) & ((centre_x - cx).abs() <= w / 2)     # (T, h, w)
        area = torch.where(inside, w * h, torch.inf)
        smallest, which = area.min(dim=0)
        index[b] = torch.where(smallest.isfinite(), which, -1)
    return index.masked_fill(mask, -1)


def reference_boxes(cell: Tensor, width: int, stride: int, image_sizes: Tensor) -> Tensor:
    """``(B, S, 4)`` cxcywh in [0, 1] of the unpadded image: the box centred on each ``cell``
    (flat index into a map ``width`` cells wide), ``REFERENCE_CELLS`` cells wide and high.
    ``image_sizes (B, 2)``: each image's ``H, W`` pixels."""
    sizes = image_sizes.to(cell.device, torch.float32)[:, None, :]        # (B, 1, 2): H, W
    centre = torch.stack([cell % width, cell // width], dim=-1).float().add(0.5) * stride / sizes.flip(-1)
    extent = (REFERENCE_CELLS * stride / sizes.flip(-1)).clamp(max=0.99).expand_as(centre)
    return torch.cat([centre.clamp(0.01, 0.99), extent], dim=-1)


def decoded_boxes(deltas: Tensor, reference: Tensor) -> Tensor:
    """cxcywh in [0, 1]: ``sigmoid(deltas + logit(reference))``."""
    return (deltas.float() + torch.logit(reference, eps=1e-4)).sigmoid()


class EncoderHead(nn.Module):
    """Class logits and reference-relative boxes for the encoder's cell tokens (module docstring)."""

    def __init__(self, hidden_dim: int, num_classes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.box_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                       nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 4))
        nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
        nn.init.zeros_(self.box_embed[-1].weight)
        nn.init.zeros_(self.box_embed[-1].bias)

    def forward(self, memory: Tensor, sampled: Optional[SampledTokens], mask: Tensor) -> EncoderPredictions:
        """``mask (B, h, w)``: True on padded cells of the feature map the tokens came from."""
        if sampled is None:
            tokens = memory
            cell = torch.arange(memory.shape[1], device=memory.device).expand(memory.shape[0], -1)
            valid = ~mask.flatten(1)
        else:
            tokens = memory[:, :sampled.num_fine]
            cell = sampled.poll_index
            valid = ~sampled.key_padding_mask[:, :sampled.num_fine]
        return EncoderPredictions(logits=self.class_embed(tokens), deltas=self.box_embed(tokens), cell=cell,
                                  valid=valid, mask=mask, stride=self.stride)
