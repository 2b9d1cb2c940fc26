"""Denoising queries (DN-DETR, ``--dn_groups``): training-only decoder queries made from noised
ground-truth boxes, each asked to reconstruct its box and class.

Tensor contract. ``DenoisingQueries(targets)`` with T_b ground-truth boxes in image b builds
K = ``groups`` groups of P = max(1, max_b T_b) queries, ``D = K * P`` in all, as ``Denoising``:

* ``content (B, D, C)``: the embedding of each query's class, flipped to a random class with
  probability ``label_noise``; the decoder's input in place of the matching queries' zeros.
* ``pos (B, D, C)``: an MLP of the sine embedding of the noised box, the query's positional
  embedding in place of a learned one. The noise moves the centre by up to ``box_noise`` / 2
  of the box's width and height and scales width and height by a factor in
  ``[1 - box_noise, 1 + box_noise]`` (DN-DETR's lambda_1 = lambda_2).
* ``labels (B, D)``, ``boxes (B, D, 4)`` (cxcywh in [0, 1]): what each query reconstructs, slot
  p of every group being image b's box p; ``valid (B, D)``: False on the padding slots
  p >= T_b, whose losses are weighted 0 (images without boxes pad every slot).

The decoder runs them after the matching queries with ``denoising_attention_mask``: the matching
queries never see them, each group sees itself and the matching queries. Nothing of this runs
in eval mode; the module's weights are kept under ``denoising.*`` and dropped when loaded into a
model built without them.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from util.misc import padded_targets


@dataclass
class Denoising:
    content: Tensor
    pos: Tensor
    labels: Tensor
    boxes: Tensor
    valid: Tensor
    group_size: int
    groups: int


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """``(..., 4)`` boxes in [0, 1] -> ``(..., 4 * dim)``: for each coordinate the sines, then the
    cosines, of ``2 pi x / temperature^(2i / dim)`` for i < dim / 2 (DAB-DETR's anchor embedding)."""
    exponents = torch.arange(dim // 2, device=boxes.device, dtype=torch.float32) * 2 / dim
    angles = boxes.float()[..., None] * 2 * math.pi / temperature ** exponents   # (..., 4, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def noised_boxes(boxes: Tensor, scale: float) -> Tensor:
    """cxcywh ``boxes``, centres moved by up to ``scale / 2`` of their size and sizes scaled by
    ``1 + u``, ``u ~ U(-scale, scale)``, clamped to [0, 1]."""
    size = boxes[..., 2:]
    centre = boxes[..., :2] + (torch.rand_like(size) * 2 - 1) * size * scale / 2
    size = size * (1 + (torch.rand_like(size) * 2 - 1) * scale)
    return torch.cat([centre, size], dim=-1).clamp(0, 1)


class DenoisingQueries(nn.Module):
    """Builds the ``Denoising`` queries of a batch's targets (module docstring)."""

    def __init__(self, num_classes: int, hidden_dim: int, groups: int, label_noise: float = 0.2,
                 box_noise: float = 0.4):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(f"denoising queries need a hidden_dim divisible by 8, got {hidden_dim}")
        self.num_classes = num_classes
        self.groups = groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.label_embed = nn.Embedding(num_classes, hidden_dim)
        self.box_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, targets: list[dict[str, Tensor]]) -> Denoising:
        device = self.label_embed.weight.device
        labels, boxes, valid = padded_targets(targets, device)
        size = labels.shape[1]
        labels, boxes, valid = labels.repeat(1, self.groups), boxes.repeat(1, self.groups, 1), valid.repeat(1, self.groups)
        flipped = torch.rand(labels.shape, device=device) < self.label_noise
        noisy_labels = torch.where(flipped, torch.randint_like(labels, self.num_classes), labels)
        pos = self.box_embed(box_sine_embedding(noised_boxes(boxes, self.box_noise), self.label_embed.embedding_dim // 4))
        return Denoising(content=self.label_embed(noisy_labels), pos=pos, labels=labels, boxes=boxes, valid=valid,
                         group_size=size, groups=self.groups)
