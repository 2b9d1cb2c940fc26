"""A small real detection dataset in the COCO 2017 layout: NEON tree crowns from the deepforest wheel.

The ``deepforest`` package (MIT licence; version 2.1.0, pinned here) ships RGB orthophotos of
NEON field sites (10 cm per pixel) with their tree crowns annotated as Pascal-VOC boxes. This
cuts two of them into square tiles of ``--tile`` pixels (default 256):

- train: ``2019_YELL_2_528000_4978000_image_crop2`` (2299 x 2472 px, 574 crowns), a tile every
  ``--stride`` pixels (default 128). Overlapping tiles see each crown (at most 108 px across)
  whole in at least one tile; the last row and column lie flush with the image's far edges.
- val: ``2019_YELL_2_541000_4977000_image_crop`` (1249 x 1035 px, 279 crowns), tiles that do
  not overlap, from the top-left corner; the strips too narrow for a whole tile are left out, so
  that every tile has the same scale (evaluation resizes the shorter side).

Both show Yellowstone's conifer forest from the same flight, 13 km apart (UTM eastings 528000
and 541000): the same kind of scene on disjoint ground, so no tree is in both splits. The
wheel's other annotated images (OSBS_029 in Florida, SOAP_061 in California, 400 x 400 px) are
left out: other forests, one tile each, and SOAP_061 labels its crowns Alive/Dead.

A crown goes into a tile when at least half its box area lies inside the tile; it is clipped to
the tile. Tiles without crowns are left out: the crowns are annotated exhaustively, so those are
open meadow, and every kept tile already shows meadow beside its trees. One category,
``{"id": 1, "name": "tree"}`` (num_classes 2). Tiles are named ``<source>_<x>_<y>.png`` after
their top-left corner in the source image.

    python -m datasets.neon_trees --out data/neon_trees
    python -m datasets.neon_trees --out data/neon_trees --wheel deepforest-2.1.0-py3-none-any.whl

Without ``--wheel`` the wheel is downloaded (about 21 MB) with
``python -m pip download --no-deps deepforest==2.1.0``.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from util.errors import UserError, exit_status
from util.files import write_json

VERSION = "2.1.0"
TRAIN_SOURCE = "2019_YELL_2_528000_4978000_image_crop2"
VAL_SOURCE = "2019_YELL_2_541000_4977000_image_crop"
DATA_DIR = "deepforest/data"
TILE, STRIDE = 256, 128
MIN_INSIDE = 0.5  # fraction of a box's area that must lie inside a tile
CATEGORY = {"id": 1, "name": "tree"}


def download_wheel(folder: str) -> str:
    """The deepforest wheel, fetched into ``folder`` with pip; ``UserError`` naming ``--wheel`` if that fails."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"deepforest=={VERSION}",
                           "-d", folder], capture_output=True, text=True)
    wheels = glob.glob(os.path.join(folder, f"deepforest-{VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else "pip wrote no wheel"
        raise UserError(f"downloading deepforest=={VERSION} with pip failed ({reason}); give a copy of "
                        f"deepforest-{VERSION}-py3-none-any.whl with --wheel PATH to skip the download")
    return wheels[0]


def read_source(wheel: str, stem: str) -> tuple[Image.Image, np.ndarray]:
    """The RGB image ``deepforest/data/{stem}.png`` of ``wheel`` and its boxes, float ``(K, 4)`` xyxy
    pixels from ``{stem}.xml``; ``UserError`` naming ``--wheel`` if the file is missing, not a zip
    or lacks either member."""
    if not os.path.isfile(wheel):
        raise UserError(f"--wheel {wheel}: no such file")
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = {}
            for suffix in ("png", "xml"):
                name = f"{DATA_DIR}/{stem}.{suffix}"
                if name not in archive.namelist():
                    raise UserError(f"--wheel {wheel} lacks {name}: expected the deepforest {VERSION} wheel")
                members[suffix] = archive.read(name)
    except zipfile.BadZipFile:
        raise UserError(f"--wheel {wheel} is not a wheel (zip archive)") from None
    image = Image.open(io.BytesIO(members["png"])).convert("RGB")
    return image, voc_boxes(members["xml"])


def voc_boxes(xml: bytes) -> np.ndarray:
    """Every ``<object><bndbox>`` of a Pascal-VOC annotation, float ``(K, 4)`` xyxy pixels."""
    corners = ("xmin", "ymin", "xmax", "ymax")
    boxes = [[float(box.findtext(corner)) for corner in corners] for box in ET.fromstring(xml).iter("bndbox")]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Starts of the tiles along a side of ``length`` pixels: every ``stride`` pixels while a whole
    tile fits; when tiles overlap (``stride < tile``), one more flush with the far edge if the last
    falls short of it."""
    starts = list(range(0, length - tile + 1, stride))
    if stride < tile and starts and starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def boxes_in_tile(boxes: np.ndarray, left: int, top: int, tile: int) -> np.ndarray:
    """The xyxy ``boxes`` with at least ``MIN_INSIDE`` of their area inside the ``tile``-pixel
    square at ``left, top``, clipped to it, in its coordinates."""
    clipped = np.clip(boxes - [left, top, left, top], 0, tile)
    inside = np.prod(clipped[:, 2:] - clipped[:, :2], axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return clipped[(inside > 0) & (inside >= MIN_INSIDE * area)]


def write_split(out: str, name: str, stem: str, image: Image.Image, boxes: np.ndarray, tile: int,
                stride: int) -> dict[str, Any]:
    """Write the tiles of ``image`` holding a box to ``out/{name}2017/`` and their json to
    ``out/annotations/instances_{name}2017.json`` (last); returns that json."""
    os.makedirs(os.path.join(out, f"{name}2017"), exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for top in tile_origins(image.height, tile, stride):
        for left in tile_origins(image.width, tile, stride):
            inside = boxes_in_tile(boxes, left, top, tile)
            if len(inside) == 0:
                continue
            image_id = len(images) + 1
            file_name = f"{stem}_{left}_{top}.png"
            image.crop((left, top, left + tile, top + tile)).save(os.path.join(out, f"{name}2017", file_name))
            images.append({"id": image_id, "file_name": file_name, "width": tile, "height": tile})
            for x0, y0, x1, y1 in inside.tolist():
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
    if not images:
        raise UserError(f"--tile {tile} leaves no {name} tile with a tree: {stem} is "
                        f"{image.width}x{image.height} pixels")
    data = {"info": {"description": f"NEON tree crowns from deepforest {VERSION} (python -m datasets.neon_trees)",
                     "source": stem, "tile": tile, "stride": stride},
            "images": images, "annotations": annotations, "categories": [CATEGORY]}
    write_json(data, os.path.join(out, "annotations", f"instances_{name}2017.json"))
    return data


def check_flags(tile: int, stride: int) -> None:
    """``UserError`` naming the flag unless ``tile >= 32`` and ``1 <= stride <= tile``."""
    if tile < 32:
        raise UserError(f"--tile must be at least 32 pixels, got {tile}")
    if not 1 <= stride <= tile:
        raise UserError(f"--stride must be in [1, --tile {tile}], got {stride}")


def convert(wheel: str, out: str, tile: int = TILE, stride: int = STRIDE) -> str:
    """Write the dataset under ``out`` from the deepforest ``wheel`` (flags as ``check_flags`` wants
    them); returns the one-line summary."""
    sources = {"train": (TRAIN_SOURCE, stride), "val": (VAL_SOURCE, tile)}
    read = {name: read_source(wheel, stem) for name, (stem, _) in sources.items()}
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    written = {name: write_split(out, name, stem, *read[name], tile, split_stride)
               for name, (stem, split_stride) in sources.items()}
    counts = {name: (len(data["images"]), len(data["annotations"])) for name, data in written.items()}
    most = max(int(np.bincount([a["image_id"] for a in data["annotations"]]).max()) for data in written.values())
    return (f"NEON trees (deepforest {VERSION}): {counts['train'][0]} train / {counts['val'][0]} val tiles of "
            f"{tile}x{tile} px, {counts['train'][1]} / {counts['val'][1]} boxes, at most {most} per tile "
            f"(--num_queries >= {most}), 1 class (num_classes 2), written to {out}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.neon_trees",
        description="Write a small real COCO-format detection dataset of tree crowns (one category, id 1: "
                    "num_classes 2) from the NEON images and annotations inside the deepforest "
                    f"{VERSION} wheel (MIT licence): OUT/annotations/instances_{{train,val}}2017.json and "
                    "OUT/{train,val}2017/*.png. Use it with --coco_path OUT. Training tiles come from "
                    f"{TRAIN_SOURCE}, validation tiles from {VAL_SOURCE} (the same forest 13 km away, so "
                    "the splits share no tree). A box goes into a tile when at least half of it lies "
                    "inside (clipped to the tile); tiles without boxes are left out.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--wheel", help=f"a local deepforest-{VERSION}-py3-none-any.whl (default: download it "
                                        f"with python -m pip download --no-deps deepforest=={VERSION})")
    parser.add_argument("--tile", type=int, default=TILE,
                        help=f"side of the square tiles in pixels of 10 cm (default {TILE})")
    parser.add_argument("--stride", type=int, default=STRIDE,
                        help=f"pixels between training tiles (default {STRIDE}: overlapping, so that each "
                             "crown is whole in some tile); validation tiles never overlap")
    return parser


def main(args: argparse.Namespace) -> None:
    """Convert ``args.wheel`` (downloaded when None) into ``args.out`` and print the summary line."""
    check_flags(args.tile, args.stride)
    start = time.time()
    if args.wheel is not None:
        summary = convert(args.wheel, args.out, args.tile, args.stride)
    else:
        with tempfile.TemporaryDirectory() as folder:
            summary = convert(download_wheel(folder), args.out, args.tile, args.stride)
    print(f"{summary} in {time.time() - start:.1f}s")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input or a failed download ends in one line on stderr and exit status 2."""
    return exit_status(lambda: main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
