"""Dataset construction by name (``--dataset_file``) and access to the COCO ground truth."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, Subset

from datasets.coco import CocoDetection, build as build_coco
from datasets.coco_eval import COCO
from datasets.coco_panoptic import CocoPanoptic, build as build_coco_panoptic
from datasets.mosaic import Mosaic
from util.errors import UserError

DATASET_FILES = ("coco", "coco_panoptic")
SPLIT_FLAGS = ("train_images", "train_annotations", "val_images", "val_annotations")  # --dataset_file coco only


def build_dataset(image_set: str, args: Any) -> Dataset:
    """The ``train`` or ``val`` split of the dataset named by ``args.dataset_file``; with
    ``--mosaic P`` the training split is wrapped in ``Mosaic``."""
    dataset = _build_split(image_set, args)
    if image_set == "train" and getattr(args, "mosaic", 0) > 0:
        return Mosaic(dataset, args.mosaic)
    return dataset


def _build_split(image_set: str, args: Any) -> Dataset:
    if getattr(args, "masks", False) and args.dataset_file != "coco_panoptic":
        raise UserError(f"--masks needs mask annotations: use --dataset_file coco_panoptic "
                        f"(got --dataset_file {args.dataset_file})")
    if args.dataset_file == "coco":
        return build_coco(image_set, args)
    if args.dataset_file == "coco_panoptic":
        given = [flag for flag in SPLIT_FLAGS if getattr(args, flag, None)]
        if given:
            raise UserError(f"--{given[0]} is for --dataset_file coco; coco_panoptic reads --coco_path and "
                            "--coco_panoptic_path")
        return build_coco_panoptic(image_set, args)
    raise UserError(f"--dataset_file {args.dataset_file!r} is not supported, expected one of: "
                    f"{', '.join(DATASET_FILES)}")


def get_coco_api_from_dataset(dataset: Dataset) -> COCO:
    """The COCO box ground truth (the ``CocoEvaluator`` index) of a ``CocoDetection`` or ``CocoPanoptic`` (``Subset``
    wrappers are unwrapped)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, (CocoDetection, CocoPanoptic)):
        raise TypeError("get_coco_api_from_dataset: expected a CocoDetection or CocoPanoptic, "
                        f"got {type(dataset).__name__}")
    return dataset.coco
