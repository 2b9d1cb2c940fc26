"""Mosaic augmentation (``--mosaic P``): a training image replaced by a 2x2 mosaic of four.

Four images' objects in one image give one-to-one matching more positives per image (the
dense one-to-one idea of DEIM). The mosaic is made of transformed items (after ``Normalize``),
so every tile has had its own augmentation and its boxes are ``(cx, cy, w, h)`` in ``[0, 1]``.
Randomness comes from Python's ``random`` module, as the transforms' (seeded per epoch by
main.py, and per DataLoader worker by torch).
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torchvision.transforms.functional as F
from torch import Tensor
from torch.utils.data import Dataset

Item = tuple[Tensor, dict[str, Tensor]]
TILED_FIELDS = ("boxes", "labels", "area", "iscrowd")  # the per-box fields a mosaic concatenates


def mosaic(items: list[Item]) -> Item:
    """The 2x2 mosaic of four items: item ``i`` resized to half the first item's height and width
    (rounded down) and pasted at row ``i // 2``, column ``i % 2``.

    Its boxes are the tiles' boxes halved and moved to their quadrant (``cx' = (cx + column) / 2``,
    ``cy' = (cy + row) / 2``, ``w' = w / 2``, ``h' = h / 2``), so they stay in ``[0, 1]``; ``area``
    is scaled by the tile's resize; ``image_id`` and ``orig_size`` are the first item's, ``size``
    the mosaic's. Items without boxes (negatives) add none.
    """
    if len(items) != 4:
        raise ValueError(f"a mosaic takes 4 items, got {len(items)}")
    first_image, first_target = items[0]
    if "masks" in first_target:
        raise ValueError("mosaic tiles boxes only; the targets hold masks")
    _, height, width = first_image.shape
    tile_h, tile_w = max(1, height // 2), max(1, width // 2)
    canvas = first_image.new_empty(first_image.shape[0], 2 * tile_h, 2 * tile_w)
    fields: dict[str, list[Tensor]] = {name: [] for name in TILED_FIELDS}
    for index, (image, target) in enumerate(items):
        row, column = divmod(index, 2)
        canvas[:, row * tile_h:(row + 1) * tile_h, column * tile_w:(column + 1) * tile_w] = F.resize(
            image, [tile_h, tile_w], antialias=True)
        boxes = target["boxes"]
        offset = torch.tensor([column / 2, row / 2, 0.0, 0.0], dtype=boxes.dtype)
        fields["boxes"].append(boxes / 2 + offset)
        fields["labels"].append(target["labels"])
        fields["iscrowd"].append(target["iscrowd"])
        tile_scale = tile_h * tile_w / (image.shape[-2] * image.shape[-1])
        fields["area"].append(target["area"] * tile_scale)
    tiled = {name: torch.cat(values) for name, values in fields.items()}
    return canvas, {**tiled, "image_id": first_target["image_id"], "orig_size": first_target["orig_size"],
                    "size": torch.tensor([2 * tile_h, 2 * tile_w], dtype=torch.int64)}


class Mosaic(Dataset):
    """``dataset`` whose item ``i`` is, with probability ``probability``, the ``mosaic`` of item
    ``i`` and three items drawn uniformly from the dataset; else item ``i`` as it is.

    ``dataset`` yields transformed items (a ``(3, H, W)`` tensor and a target with normalised
    boxes); its ``num_classes`` is passed through.
    """

    def __init__(self, dataset: Any, probability: float):
        if not 0 < probability <= 1:
            raise ValueError(f"mosaic probability must lie in (0, 1], got {probability}")
        self.dataset = dataset
        self.probability = probability
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        if random.random() >= self.probability:
            return self.dataset[index]
        others = [random.randrange(len(self.dataset)) for _ in range(3)]
        return mosaic([self.dataset[i] for i in (index, *others)])
