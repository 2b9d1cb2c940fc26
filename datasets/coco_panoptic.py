"""COCO panoptic dataset: images, boxes of every segment (things and stuff) and, with masks, its PNG.

Layout read by ``build``::

    coco_path/{train,val}2017/<images' file_name>
    coco_panoptic_path/annotations/panoptic_{train,val}2017.json
    coco_panoptic_path/annotations/panoptic_{train,val}2017/<annotations' file_name>.png
        (DETR's layout, coco_panoptic_path/panoptic_{train,val}2017/, is accepted too)

A panoptic PNG encodes the segment id of each pixel as ``R + 256 G + 256^2 B`` (0: void);
each annotation's ``segments_info`` gives every segment's ``id``, ``category_id``, ``bbox``
(xywh), ``area`` and ``iscrowd``. Categories carry ``isthing``. Labels are category ids, so
``num_classes = max category id + 1`` unless ``--num_classes`` is given.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datasets.coco import CocoImages, box_target, read_json_object, short_repr
from datasets.transforms import clip_boxes, make_coco_transforms
from util.errors import UserError
from util.panoptic_png import rgb_to_ids

REQUIRED_FIELDS: dict[str, dict[str, type]] = {
    "images": {"id": int, "file_name": str},
    "annotations": {"image_id": int, "file_name": str, "segments_info": list},
    "categories": {"id": int, "isthing": int},
}
SEGMENT_FIELDS: dict[str, type] = {"id": int, "category_id": int, "bbox": list, "area": (int, float)}


def _check_fields(ann_file: str, where: str, entry: Any, fields: dict[str, Any]) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{ann_file}: {where} is not a JSON object")
    for field, kind in fields.items():
        if field not in entry:
            raise UserError(f"{ann_file}: {where} has no field '{field}'")
        value = entry[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise UserError(f"{ann_file}: {where} field '{field}' must be {expected}, got {short_repr(value)}")


def load_panoptic_json(ann_file: str) -> dict:
    """Read a COCO panoptic json, checking the fields this project relies on.

    Every annotation must name a listed image, every segment a listed category; missing
    ``iscrowd`` defaults to 0. Raises ``UserError`` naming the file (and entry) otherwise.
    """
    data = read_json_object(ann_file)
    for section, fields in REQUIRED_FIELDS.items():
        if not isinstance(data.get(section), list):
            raise UserError(f"{ann_file}: missing list field '{section}'")
        for index, entry in enumerate(data[section]):
            _check_fields(ann_file, f"{section}[{index}]", entry, fields)
    if not data["categories"]:
        raise UserError(f"{ann_file}: 'categories' is empty, expected at least one category")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for index, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids:
            raise UserError(f"{ann_file}: annotations[{index}] field 'image_id' = {ann['image_id']} "
                            "is not the id of any entry of 'images'")
        for number, segment in enumerate(ann["segments_info"]):
            where = f"annotations[{index}] segments_info[{number}]"
            _check_fields(ann_file, where, segment, SEGMENT_FIELDS)
            if segment["category_id"] not in category_ids:
                raise UserError(f"{ann_file}: {where} has unknown category_id {segment['category_id']} "
                                "(not in 'categories')")
            if len(segment["bbox"]) != 4 or not all(isinstance(v, (int, float)) for v in segment["bbox"]):
                raise UserError(f"{ann_file}: {where} field 'bbox' must be 4 numbers [x, y, w, h], "
                                f"got {short_repr(segment['bbox'])}")
            segment.setdefault("iscrowd", 0)
    if not data["annotations"]:
        raise UserError(f"{ann_file}: 'annotations' is empty, expected at least one image")
    return data


def detection_dict(data: dict) -> dict:
    """The segments of a panoptic json as a COCO detection dataset (for box AP)."""
    segments = [(ann["image_id"], s) for ann in data["annotations"] for s in ann["segments_info"]]
    annotations = [{"id": number + 1, "image_id": image_id, "category_id": s["category_id"], "bbox": s["bbox"],
                    "area": s["area"], "iscrowd": s["iscrowd"]} for number, (image_id, s) in enumerate(segments)]
    return {"images": data["images"], "annotations": annotations, "categories": data["categories"]}


class CocoPanoptic(CocoImages):
    """Images and targets of a COCO panoptic json, one sample per annotation.

    ``dataset[i]`` is ``(image, target)`` after ``transforms``; the raw target holds
    ``boxes`` float ``(K, 4)`` xyxy pixels, ``labels`` int64 ``(K,)`` (category ids),
    ``area``, ``iscrowd``, ``image_id``, ``orig_size`` and ``size`` as ``CocoDetection`` does,
    over the non-crowd segments (things and stuff), and with ``return_masks`` also ``masks``
    bool ``(K, H, W)`` decoded from the PNG.

    Attributes: ``coco`` (COCO index of the segments' boxes, for box AP), ``images``, ``panoptic``
    (the json), ``ann_folder`` (the PNG folder), ``ids``, ``num_classes``, ``is_thing_map``
    (category id -> isthing).
    """

    def __init__(self, img_folder: str, ann_folder: str, ann_file: str,
                 transforms: Optional[Callable[[Any, dict], tuple[Any, dict]]],
                 return_masks: bool = True, num_classes: Optional[int] = None):
        data = load_panoptic_json(ann_file)
        category_ids = [category["id"] for category in data["categories"]]
        if num_classes is None:
            num_classes = max(category_ids) + 1
        if min(category_ids) < 0 or max(category_ids) >= num_classes:
            raise UserError(f"{ann_file}: category ids must be in [0, {num_classes - 1}] to fit "
                            f"--num_classes {num_classes} (DETR convention: num_classes = max category id + 1)")
        images = {image["id"]: image for image in data["images"]}
        for ann in data["annotations"]:
            for path in (os.path.join(img_folder, images[ann["image_id"]]["file_name"]),
                         os.path.join(ann_folder, ann["file_name"])):
                if not os.path.isfile(path):
                    raise UserError(f"file not found: {path} (listed in {ann_file})")
        self.img_folder = img_folder
        self.ann_folder = ann_folder
        self.ann_file = ann_file
        self.transforms = transforms
        self.return_masks = return_masks
        self.num_classes = num_classes
        self.panoptic = data
        self.is_thing_map = {c["id"]: bool(c["isthing"]) for c in data["categories"]}
        self.box_ground_truth = detection_dict(data)
        self.images = images
        self.annotations = {ann["image_id"]: ann for ann in data["annotations"]}
        self.ids = sorted(self.annotations)

    def load_segment_ids(self, image_id: int, height: int, width: int) -> np.ndarray:
        """The ``(height, width)`` segment id map of ``image_id``'s PNG, checked against its json."""
        ann = self.annotations[image_id]
        path = os.path.join(self.ann_folder, ann["file_name"])
        try:
            with Image.open(path) as png:
                ids = rgb_to_ids(np.asarray(png.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot read panoptic PNG {path}: {' '.join(str(err).split())}") from None
        if ids.shape != (height, width):
            raise UserError(f"{path}: the PNG is {ids.shape[1]}x{ids.shape[0]}, its image {width}x{height}")
        present = set(np.unique(ids).tolist())
        absent = [s["id"] for s in ann["segments_info"] if s["id"] not in present]
        if absent:
            raise UserError(f"{path}: segment id {absent[0]} of {self.ann_file} does not occur in the PNG")
        return ids

    def make_target(self, image_id: int, height: int, width: int) -> dict[str, Tensor]:
        """The raw target of ``image_id`` for an image of ``height x width`` pixels."""
        segments = [s for s in self.annotations[image_id]["segments_info"] if not s["iscrowd"]]
        target = box_target(image_id, segments, height, width)
        if self.return_masks:
            ids = torch.from_numpy(self.load_segment_ids(image_id, height, width).astype(np.int64))
            seg_ids = torch.tensor([s["id"] for s in segments], dtype=torch.int64)
            target["masks"] = ids[None] == seg_ids[:, None, None]
        return clip_boxes(target, height, width)


def png_folder(root: str, image_set: str) -> str:
    """``root/annotations/panoptic_{set}2017`` (COCO's zip unpacked), else ``root/panoptic_{set}2017`` (DETR)."""
    inside = os.path.join(root, "annotations", f"panoptic_{image_set}2017")
    beside = os.path.join(root, f"panoptic_{image_set}2017")
    if os.path.isdir(inside) or not os.path.isdir(beside):
        return inside
    return beside


def build(image_set: str, args: Any) -> CocoPanoptic:
    """The ``train`` or ``val`` split: images under ``--coco_path``, panoptic annotations under
    ``--coco_panoptic_path``; masks are loaded with ``--masks``."""
    if image_set not in ("train", "val"):
        raise ValueError(f"coco_panoptic.build: image_set must be 'train' or 'val', got {image_set!r}")
    for flag, root in (("--coco_path", args.coco_path), ("--coco_panoptic_path", args.coco_panoptic_path)):
        if not root:
            raise UserError(f"{flag} is required with --dataset_file coco_panoptic")
        if not os.path.isdir(root):
            raise UserError(f"{flag} {root} is not a folder")
    img_folder = os.path.join(args.coco_path, f"{image_set}2017")
    ann_file = os.path.join(args.coco_panoptic_path, "annotations", f"panoptic_{image_set}2017.json")
    ann_folder = png_folder(args.coco_panoptic_path, image_set)
    if not os.path.isfile(ann_file):
        raise UserError(f"annotation file not found: {ann_file} (from --coco_panoptic_path)")
    for folder, flag in ((img_folder, "--coco_path"), (ann_folder, "--coco_panoptic_path")):
        if not os.path.isdir(folder):
            raise UserError(f"folder not found: {folder} (from {flag})")
    transforms = make_coco_transforms(image_set, args.eval_size, args.augment)
    return CocoPanoptic(img_folder, ann_folder, ann_file, transforms, return_masks=args.masks,
                        num_classes=args.num_classes)
