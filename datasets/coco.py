"""COCO-format detection dataset (its json indexed by image + PIL images).

Layout read by ``build``::

    coco_path/annotations/instances_{train,val}2017.json
    coco_path/{train,val}2017/<file_name>

or any image folder and json per split (``--train_images``/``--train_annotations``,
``--val_images``/``--val_annotations``), each pair replacing its ``--coco_path`` paths.

Category ids are used directly as labels, so ``num_classes = max category id + 1`` (DETR
convention; label ``num_classes`` is then "no object" in the model).
"""
from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from datasets.coco_eval import COCO, coco_from_dict
from datasets.transforms import clip_boxes, make_coco_transforms
from util.errors import UserError

REQUIRED_FIELDS: dict[str, dict[str, type]] = {
    "images": {"id": int, "file_name": str},
    "annotations": {"id": int, "image_id": int, "category_id": int, "bbox": list},
    "categories": {"id": int},
}
TYPE_NAMES = {int: "an integer", str: "a string", list: "a list"}
SECTIONS = "a COCO-format detection json has the lists 'images', 'annotations' and 'categories'"
BOX_TOLERANCE = 1.0  # pixels a box may overhang its image (it is clipped), as COCO's own boxes do


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_object(ann_file: str) -> dict:
    """The JSON object in ``ann_file``; ``UserError`` naming the file if it is missing, not JSON
    or not an object."""
    if not os.path.isfile(ann_file):
        raise UserError(f"annotation file not found: {ann_file}")
    if os.path.getsize(ann_file) == 0:
        raise UserError(f"{ann_file} is empty (0 bytes): expected a JSON object with 'images', "
                        "'annotations' and 'categories'")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:
        raise UserError(f"{ann_file}: not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and "
                        f"'categories', got {type(data).__name__}")
    return data


def load_annotation_json(ann_file: str) -> dict:
    """Read a COCO detection json, checking the fields this project relies on.

    Missing ``area`` defaults to the bbox area and missing ``iscrowd`` to 0 (COCOeval needs
    both); an image's ``width`` and ``height`` are optional. Raises ``UserError`` naming the file
    (and field) for every problem found. An image without annotations is valid (a negative).
    """
    data = read_json_object(ann_file)
    for section, fields in REQUIRED_FIELDS.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise UserError(f"{ann_file}: no list '{section}' ({SECTIONS})")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise UserError(f"{ann_file}: {section}[{index}] is not a JSON object")
            for field, kind in fields.items():
                if field not in entry:
                    raise UserError(f"{ann_file}: {section}[{index}] has no field '{field}'")
                value = entry[field]
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise UserError(f"{ann_file}: {section}[{index}] field '{field}' must be "
                                    f"{TYPE_NAMES[kind]}, got {short_repr(value)}")
    if not data["images"]:
        raise UserError(f"{ann_file}: 'images' is empty, expected at least one image")
    if not data["categories"]:
        raise UserError(f"{ann_file}: 'categories' is empty, expected at least one category")
    for index, image in enumerate(data["images"]):
        for field in ("width", "height"):
            value = image.get(field, 1)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{ann_file}: images[{index}] field '{field}' must be a positive "
                                f"number of pixels, got {short_repr(value)}")
    image_ids = {image["id"] for image in data["images"]}
    for index, ann in enumerate(data["annotations"]):
        bbox = ann["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise UserError(f"{ann_file}: annotations[{index}] field 'bbox' must be 4 numbers "
                            f"[x, y, w, h], got {short_repr(bbox)}")
        if ann["image_id"] not in image_ids:
            raise UserError(f"{ann_file}: annotations[{index}] field 'image_id' = "
                            f"{ann['image_id']} is not the id of any entry of 'images'")
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        ann.setdefault("iscrowd", 0)
        for field in ("area", "iscrowd"):
            if not isinstance(ann[field], (int, float)) or isinstance(ann[field], bool):
                raise UserError(f"{ann_file}: annotations[{index}] field '{field}' must be a "
                                f"number, got {short_repr(ann[field])}")
    return data


def image_size(entry: dict, path: str) -> tuple[float, float]:
    """``(width, height)`` of an image: its json entry's, else read from the file's header."""
    if "width" in entry and "height" in entry:
        return entry["width"], entry["height"]
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {' '.join(str(err).split())}") from None


def check_box_inside(ann_file: str, index: int, ann: dict, width: float, height: float) -> None:
    """``UserError`` if annotation ``index``'s box overhangs its ``width x height`` image by more
    than ``BOX_TOLERANCE`` pixels (within it, the box is clipped when the sample is made)."""
    x, y, w, h = ann["bbox"]
    if min(x, y) < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise UserError(f"{ann_file}: annotations[{index}] bbox {short_repr(ann['bbox'])} ([x, y, w, h]) lies "
                        f"outside its image (id {ann['image_id']}, {width:g}x{height:g} pixels, width x height) "
                        f"by more than {BOX_TOLERANCE:g} pixel")


def category_ids(data: dict) -> list[int]:
    """Every category id of ``categories`` then ``annotations``, in file order."""
    return ([c["id"] for c in data["categories"]]
            + [a["category_id"] for a in data["annotations"]])


def num_classes_from_annotations(ann_file: str) -> int:
    """``max category id + 1`` of a COCO json (91 for COCO 2017)."""
    return max(category_ids(load_annotation_json(ann_file))) + 1


def box_target(image_id: int, entries: list[dict], height: int, width: int) -> dict[str, Tensor]:
    """The raw target of non-crowd COCO ``entries`` (``bbox`` xywh, ``category_id``, ``area``),
    boxes as xyxy pixels, before clipping."""
    boxes = torch.tensor([e["bbox"] for e in entries], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    size = torch.tensor([height, width], dtype=torch.int64)
    return {
        "boxes": boxes,
        "labels": torch.tensor([e["category_id"] for e in entries], dtype=torch.int64),
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": torch.tensor([e["area"] for e in entries], dtype=torch.float32),
        "iscrowd": torch.zeros(len(entries), dtype=torch.int64),
        "orig_size": size,
        "size": size.clone(),
    }


def read_image(path: str) -> Image.Image:
    """The image file at ``path`` as an RGB PIL image; ``UserError`` naming it if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {' '.join(str(err).split())}") from None


class CocoImages(Dataset):
    """Images of a COCO-format json paired with their targets.

    Subclasses set ``img_folder``, ``images`` (image id -> its json entry), ``box_ground_truth``
    (a COCO detection dict of the images' boxes), ``ids``, ``transforms`` and define
    ``make_target(image_id, height, width)``. ``coco``, the evaluation index of
    ``box_ground_truth``, is built on first use (only an evaluated split needs it) and is not
    pickled (data loader workers started by spawning rebuild it if they ever need it).
    """

    img_folder: str
    images: dict[int, dict]
    box_ground_truth: dict
    ids: list[int]
    transforms: Optional[Callable[[Any, dict], tuple[Any, dict]]]

    @functools.cached_property
    def coco(self) -> COCO:
        """The COCO index of ``box_ground_truth``, the ground truth of ``CocoEvaluator``."""
        return coco_from_dict(self.box_ground_truth)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "coco"}

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        """The RGB PIL image of ``image_id``; ``UserError`` if it cannot be decoded."""
        return read_image(os.path.join(self.img_folder, self.images[image_id]["file_name"]))

    def make_target(self, image_id: int, height: int, width: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self.make_target(image_id, image.height, image.width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class CocoDetection(CocoImages):
    """Images and detection targets of a COCO-format json.

    ``dataset[i]`` is ``(image, target)`` after ``transforms``; the raw target (before
    transforms) has ``boxes`` float ``(K, 4)`` xyxy absolute pixels (clipped to the image,
    empty boxes dropped), ``labels`` int64 ``(K,)`` = category ids, ``image_id`` int64 ``(1,)``,
    ``area`` float ``(K,)``, ``iscrowd`` int64 ``(K,)`` (crowd annotations are skipped), and
    ``orig_size`` = ``size`` int64 ``[h, w]``. ``transforms=None`` returns the PIL image.

    Attributes: ``coco`` (the COCO index, for evaluation), ``images``, ``ids`` (image ids in
    dataset order), ``num_classes``.
    """

    def __init__(self, img_folder: str, ann_file: str,
                 transforms: Optional[Callable[[Any, dict], tuple[Any, dict]]],
                 num_classes: Optional[int] = None):
        data = load_annotation_json(ann_file)
        used_ids = category_ids(data)
        if num_classes is None:
            num_classes = max(used_ids) + 1
        bad = [i for i in used_ids if not 0 <= i < num_classes]
        if bad:
            raise UserError(f"{ann_file}: category id {bad[0]} does not fit --num_classes "
                            f"{num_classes} (ids must be in [0, {num_classes - 1}]; DETR "
                            "convention: num_classes = max category id + 1)")
        sizes = {}
        for image in data["images"]:
            path = os.path.join(img_folder, image["file_name"])
            if not os.path.isfile(path):
                raise UserError(f"image file not found: {path} (listed in {ann_file})")
            sizes[image["id"]] = image_size(image, path)
        for index, ann in enumerate(data["annotations"]):
            check_box_inside(ann_file, index, ann, *sizes[ann["image_id"]])
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.transforms = transforms
        self.num_classes = num_classes
        self.box_ground_truth = data
        self.images = {image["id"]: image for image in data["images"]}
        self.annotations_by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in data["annotations"]:
            self.annotations_by_image[ann["image_id"]].append(ann)
        self.ids = sorted(self.images)

    def make_target(self, image_id: int, height: int, width: int) -> dict[str, Tensor]:
        """The raw target of ``image_id`` for an image of ``height x width`` pixels."""
        anns = [a for a in self.annotations_by_image[image_id] if not a["iscrowd"]]
        return clip_boxes(box_target(image_id, anns, height, width), height, width)


def split_files(image_set: str, args: Any) -> Optional[tuple[str, str]]:
    """The image folder and annotation json given by ``--{image_set}_images`` and
    ``--{image_set}_annotations`` (None when neither is given); ``UserError`` naming the flag
    when only one is given or its folder/file does not exist."""
    images = getattr(args, f"{image_set}_images", None)
    annotations = getattr(args, f"{image_set}_annotations", None)
    if not images and not annotations:
        return None
    if not images or not annotations:
        given, missing = ("images", "annotations") if images else ("annotations", "images")
        raise UserError(f"--{image_set}_{given} needs --{image_set}_{missing} too: the {image_set} split is an "
                        "image folder and its COCO-format json")
    if not os.path.isdir(images):
        raise UserError(f"--{image_set}_images {images} is not a folder")
    if not os.path.isfile(annotations):
        raise UserError(f"--{image_set}_annotations {annotations} is not a file")
    return images, annotations


def coco_path_files(image_set: str, args: Any) -> tuple[str, str]:
    """The image folder and annotation json of ``image_set`` in the COCO layout under ``--coco_path``."""
    root = args.coco_path
    if not root:
        raise UserError(f"--coco_path is required (a folder with annotations/, train2017/ and val2017/), or "
                        f"--{image_set}_images with --{image_set}_annotations")
    if not os.path.isdir(root):
        raise UserError(f"--coco_path {root} is not a folder")
    img_folder = os.path.join(root, f"{image_set}2017")
    ann_file = os.path.join(root, "annotations", f"instances_{image_set}2017.json")
    if not os.path.isfile(ann_file):
        raise UserError(f"annotation file not found: {ann_file} (from --coco_path)")
    if not os.path.isdir(img_folder):
        raise UserError(f"image folder not found: {img_folder} (from --coco_path)")
    return img_folder, ann_file


def build(image_set: str, args: Any) -> CocoDetection:
    """The ``train`` or ``val`` split with the published transforms.

    Its images and json come from ``--{image_set}_images`` and ``--{image_set}_annotations``,
    else from the COCO layout under ``--coco_path``; both pairs are checked whichever split is
    built. Uses ``args.eval_size`` (transform scale), ``args.augment`` and ``args.num_classes``
    (``None``: max category id + 1).
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"coco.build: image_set must be 'train' or 'val', got {image_set!r}")
    given = {split: split_files(split, args) for split in ("train", "val")}
    img_folder, ann_file = given[image_set] or coco_path_files(image_set, args)
    transforms = make_coco_transforms(image_set, args.eval_size, args.augment)
    return CocoDetection(img_folder, ann_file, transforms, num_classes=args.num_classes)
