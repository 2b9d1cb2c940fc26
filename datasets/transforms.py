"""Joint image + target transforms for detection, in the DETR convention.

Every transform is called as ``image, target = t(image, target)`` and returns a new target
dict (the input dict is not modified). Until ``Normalize`` the target holds:

- ``boxes``: float ``(K, 4)``, xyxy in absolute pixels of the current image;
- ``labels``: int64 ``(K,)``; ``area``: float ``(K,)``; ``iscrowd``: int64 ``(K,)``;
- ``masks`` (panoptic targets only): bool ``(K, H, W)`` at the current image size;
- ``image_id``: int64 ``(1,)``; ``orig_size`` and ``size``: int64 ``(2,)`` = ``[h, w]``.

``Normalize`` turns ``boxes`` into ``(cx, cy, w, h)`` divided by the image width/height.
Boxes that a crop leaves with zero width or height are dropped with their per-box fields.
Randomness comes from Python's ``random`` module (seeded per DataLoader worker by torch).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision.transforms.functional as F
from torch import Tensor

from util.box_ops import box_xyxy_to_cxcywh
from util.errors import UserError
from util.flags import AUGMENTATIONS  # the --augment choices

Target = dict[str, Tensor]
Image = Any  # a PIL image before ToTensor, a (3, H, W) tensor after

PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd", "masks")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_hw(image: Image) -> tuple[int, int]:
    """Height and width of a PIL image or a ``(C, H, W)`` tensor."""
    _, height, width = F.get_dimensions(image)
    return height, width


def select_boxes(target: Target, keep: Tensor) -> Target:
    """Keep the boxes where the bool ``(K,)`` ``keep`` is True, in every per-box field."""
    target = dict(target)
    for field in PER_BOX_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return target


def clip_boxes(target: Target, height: int, width: int) -> Target:
    """Clip xyxy boxes to the ``height x width`` image and drop those with no width or height."""
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return select_boxes({**target, "boxes": boxes}, keep)


def crop(image: Image, target: Target, top: int, left: int, height: int, width: int
         ) -> tuple[Image, Target]:
    """Crop a ``height x width`` region; boxes are shifted, clipped and emptied ones dropped.

    ``area`` becomes the area of the clipped box; ``masks`` are cropped alike.
    """
    image = F.crop(image, top, left, height, width)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    target = {**target, "boxes": boxes}
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    target = clip_boxes(target, height, width)
    clipped = target["boxes"]
    target["area"] = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image, target


def hflip(image: Image, target: Target) -> tuple[Image, Target]:
    """Mirror left-right; box ``x0, x1`` become ``w - x1, w - x0``."""
    _, width = image_hw(image)
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    boxes = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    target = {**target, "boxes": boxes}
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return F.hflip(image), target


def resized_hw(height: int, width: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """Output ``(h, w)`` with the shorter side ``size``, longer side at most ``max_size``.

    The aspect ratio is kept; the longer side is truncated to an int (published recipe).
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: Image, target: Target, size: int, max_size: Optional[int] = None
           ) -> tuple[Image, Target]:
    """Resize the shorter side to ``size`` (see ``resized_hw``), scaling boxes and areas.

    ``masks`` are resized with nearest-neighbour sampling.
    """
    height, width = image_hw(image)
    new_height, new_width = resized_hw(height, width, size, max_size)
    image = F.resize(image, [new_height, new_width])
    scale_w, scale_h = new_width / width, new_height / height
    scale = torch.tensor([scale_w, scale_h, scale_w, scale_h], dtype=target["boxes"].dtype)
    target = {**target, "boxes": target["boxes"] * scale,
              "size": torch.tensor([new_height, new_width], dtype=torch.int64)}
    if "area" in target:
        target["area"] = target["area"] * (scale_w * scale_h)
    if "masks" in target:
        masks = target["masks"][:, None].to(torch.uint8)  # (K, 1, H, W): K may be 0
        target["masks"] = torch.nn.functional.interpolate(masks, size=(new_height, new_width))[:, 0].bool()
    return image, target


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image, target: Target) -> tuple[Image, Target]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the shorter side to a size drawn from ``sizes``, longer side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Image, target: Target) -> tuple[Image, Target]:
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose sides are drawn in ``[min_size, max_size]``.

    Each side is also capped by the image side, so images smaller than ``min_size`` keep
    their full extent along that side.
    """

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image, target: Target) -> tuple[Image, Target]:
        height, width = image_hw(image)
        crop_w = random.randint(min(self.min_size, width), min(self.max_size, width))
        crop_h = random.randint(min(self.min_size, height), min(self.max_size, height))
        top = random.randint(0, height - crop_h)
        left = random.randint(0, width - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image: Image, target: Target) -> tuple[Image, Target]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class ToTensor:
    """PIL image -> float ``(3, H, W)`` tensor in ``[0, 1]``; the target is unchanged."""

    def __call__(self, image: Image, target: Target) -> tuple[Tensor, Target]:
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Standardise a ``(3, H, W)`` tensor per channel; boxes -> cxcywh divided by ``w, h``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        height, width = image_hw(image)
        scale = torch.tensor([width, height, width, height], dtype=target["boxes"].dtype)
        return image, {**target, "boxes": box_xyxy_to_cxcywh(target["boxes"]) / scale}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Image, target: Target) -> tuple[Image, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


def make_coco_transforms(image_set: str, eval_size: int = 800, augment: str = "detr") -> Compose:
    """The published DETR augmentation, every size scaled by ``k = eval_size / 800``.

    train: flip, then with p=0.5 either a resize of the shorter side to one of
    ``480, 512, ..., 800`` (longer side <= 1333), or a resize to 400/500/600, a random crop
    of sides in ``[384, 600]`` and the same multi-scale resize; then ToTensor + Normalize.
    val: shorter side 800, longer side <= 1333. Scaled sizes are rounded to ints (>= 1).
    ``augment="flip"`` trains on the val resize plus the flip only (no multi-scale resize or
    crop), which learns faster from scratch on small datasets (the CPU demo).
    """
    if isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size <= 0:
        raise UserError(f"--eval_size must be a positive integer (800 = published), got {eval_size!r}")
    k = eval_size / 800

    def scaled(size: int) -> int:
        return max(1, int(round(size * k)))

    if augment not in AUGMENTATIONS:
        raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    normalize = Compose([ToTensor(), Normalize()])
    val_resize = RandomResize([scaled(800)], max_size=scaled(1333))
    if image_set == "train" and augment == "flip":
        return Compose([RandomHorizontalFlip(), val_resize, normalize])
    if image_set == "train":
        scales = [scaled(480 + 32 * i) for i in range(11)]
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=scaled(1333)),
                Compose([
                    RandomResize([scaled(400), scaled(500), scaled(600)]),
                    RandomSizeCrop(scaled(384), scaled(600)),
                    RandomResize(scales, max_size=scaled(1333)),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return Compose([val_resize, normalize])
    raise ValueError(f"make_coco_transforms: image_set must be 'train' or 'val', got {image_set!r}")
