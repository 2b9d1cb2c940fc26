"""Dataset construction by name (``--dataset_file``) and access to the COCO ground truth."""
from __future__ import annotations

from typing import Any

from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from datasets.coco import CocoDetection, build as build_coco
from util.errors import UserError

DATASET_FILES = ("coco",)


def build_dataset(image_set: str, args: Any) -> Dataset:
    """The ``train`` or ``val`` split of the dataset named by ``args.dataset_file``."""
    if args.dataset_file == "coco":
        return build_coco(image_set, args)
    raise UserError(f"--dataset_file {args.dataset_file!r} is not supported, expected one of: "
                    f"{', '.join(DATASET_FILES)}")


def get_coco_api_from_dataset(dataset: Dataset) -> COCO:
    """The pycocotools ground truth of a ``CocoDetection`` (``Subset`` wrappers are unwrapped)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, CocoDetection):
        raise TypeError(f"get_coco_api_from_dataset: expected a CocoDetection, got {type(dataset).__name__}")
    return dataset.coco
