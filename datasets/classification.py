"""Image classification data in the ImageNet convention: an ``ImageFolder`` root.

``--data_path`` holds ``train/<class>/<images>`` and ``val/<class>/<images>``; the class index is
the position of the folder name in sorted order (torchvision's ``ImageFolder``), the same in both
splits. The transforms are timm's ``create_transform``, as in DeiT: for training a random resized
crop, horizontal flip, RandAugment (``--aa``), colour jitter and random erasing (``--reprob``); for
evaluation a resize to ``input_size / crop_pct`` and a centre crop. Both normalise with the mean
and std the weights were trained with (``input_config``). Bad folders and images raise a one-line
``UserError`` naming them.
"""
import os
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import to_pil_image

from datasets.coco import read_image
from util.errors import UserError

SPLITS = ("train", "val")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")


def class_folders(split_root: str) -> list[str]:
    """Sorted names of the sub-folders of ``split_root``; ``UserError`` if it is missing or has none."""
    if not os.path.isdir(split_root):
        raise UserError(f"split folder not found: {split_root} (--data_path must hold train/<class>/<images> "
                        "and val/<class>/<images>)")
    names = sorted(entry.name for entry in os.scandir(split_root) if entry.is_dir())
    if not names:
        raise UserError(f"{split_root}: no class folders, expected {split_root}/<class>/<images>")
    return names


class ClassificationFolder(ImageFolder):
    """torchvision's ``ImageFolder`` of one split, samples ``(image, label)``, with one-line errors:
    an empty class folder names it, an unreadable image names the file (when it is read)."""

    def __init__(self, split_root: str, transform: Callable):
        class_folders(split_root)
        super().__init__(split_root, transform=transform, loader=read_image, allow_empty=True)
        counts = np.bincount(self.targets, minlength=len(self.classes))
        if (counts == 0).any():
            empty = os.path.join(split_root, self.classes[int(np.argmin(counts))])
            raise UserError(f"{empty}: empty class folder, expected at least one image "
                            f"({' '.join(IMG_EXTENSIONS)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def input_config(args: Any) -> dict[str, Any]:
    """``mean``, ``std`` and ``crop_pct`` of the model's input: ``--input_mean``, ``--input_std`` and
    ``--crop_pct`` where given, else those of timm's config of the weights ``--vit_weights timm``
    loads (ViT-B's augreg weights: mean and std 0.5, crop 0.9), else DeiT's (the ImageNet mean and
    std, timm's default crop 0.875). No download: timm's configs ship with it."""
    config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": DEFAULT_CROP_PCT}
    if getattr(args, "vit_weights", "none") == "timm":
        from timm.models import get_pretrained_cfg

        from models.vit_archs import VIT_ARCHS

        name = VIT_ARCHS[args.vit_arch].timm_weights
        pretrained = get_pretrained_cfg(name) if name else None
        if pretrained is not None:
            config = {"mean": pretrained.mean, "std": pretrained.std, "crop_pct": pretrained.crop_pct}
    given = {"mean": getattr(args, "input_mean", None), "std": getattr(args, "input_std", None),
             "crop_pct": getattr(args, "crop_pct", None)}
    config.update({key: value for key, value in given.items() if value is not None})
    return {"mean": tuple(config["mean"]), "std": tuple(config["std"]), "crop_pct": float(config["crop_pct"])}


def build_transform(is_training: bool, args: Any) -> Callable:
    """timm's transform of a split: ``args.input_size``, ``aa`` (a RandAugment policy such as
    ``rand-m9-mstd0.5-inc1``; None or "none": off), ``reprob``, ``color_jitter`` (0: off),
    ``train_interpolation`` and, where the flags define it, ``scale`` (the random crop's area
    range, timm's name; default timm's 0.08 to 1); random erasing in DeiT's pixel mode.
    Evaluation resizes bicubic to ``input_size / crop_pct`` and crops the centre. Both normalise
    with ``input_config``'s mean and std."""
    config = input_config(args)
    normalisation = {"mean": config["mean"], "std": config["std"]}
    if not is_training:
        return create_transform(args.input_size, is_training=False, interpolation="bicubic",
                                crop_pct=config["crop_pct"], **normalisation)
    if args.train_interpolation not in INTERPOLATIONS:
        raise UserError(f"--train_interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                        f"got {args.train_interpolation!r}")
    if not 0 <= args.reprob <= 1:
        raise UserError(f"--reprob: expected a probability in [0, 1], got {args.reprob}")
    policy = None if args.aa in (None, "", "none") else args.aa
    scale = getattr(args, "scale", None)
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UserError(f"--scale: expected two area fractions 0 < min <= max <= 1, got {scale}")
    try:
        return create_transform(args.input_size, is_training=True, color_jitter=args.color_jitter or None,
                                auto_augment=policy, interpolation=args.train_interpolation,
                                re_prob=args.reprob, re_mode="pixel", re_count=1,
                                scale=None if scale is None else tuple(scale), **normalisation)
    except AssertionError as err:  # timm asserts on an unknown policy or policy section
        raise UserError(f"--aa: timm cannot parse the policy {args.aa!r} ({err}); expected e.g. "
                        "rand-m9-mstd0.5-inc1, or none") from None


def input_image(tensor: Tensor, args: Any) -> Image.Image:
    """A transformed ``(3, H, W)`` image back as an RGB image (``args``' normalisation undone):
    what the model sees."""
    config = input_config(args)
    mean = torch.tensor(config["mean"])[:, None, None]
    std = torch.tensor(config["std"])[:, None, None]
    return to_pil_image((tensor.float().cpu() * std + mean).clamp(0, 1))


def build_classification_dataset(split: str, args: Any) -> ClassificationFolder:
    """The ``split`` ("train" or "val") of the ImageFolder root ``args.data_path`` with its
    transforms; ``UserError`` if the split folder is missing, a class folder is empty, or the
    other split exists and holds other classes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_root = os.path.join(args.data_path, split)
    classes = class_folders(split_root)
    other_root = os.path.join(args.data_path, SPLITS[1 - SPLITS.index(split)])
    if os.path.isdir(other_root):
        train, val = (classes, class_folders(other_root)) if split == "train" else (class_folders(other_root), classes)
        if train != val:
            only_train = sorted(set(train) - set(val)) or ["-"]
            only_val = sorted(set(val) - set(train)) or ["-"]
            raise UserError(f"{args.data_path}: train and val hold different class folders (only in train: "
                            f"{', '.join(only_train)}; only in val: {', '.join(only_val)})")
    return ClassificationFolder(split_root, build_transform(split == "train", args))
