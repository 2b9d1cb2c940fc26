"""A deterministic synthetic detection dataset in the COCO 2017 layout.

Each image has a cluttered background (a colour gradient, smooth colour blobs, pixel noise,
thin lines and small specks that are not objects) and 0 to 4 filled shapes of 6 classes
(``--max_objects``), 15% to 60% of the shorter side (``--min_size``, ``--max_size``): at the
default 96 pixels most are COCO-small (area under 32 x 32).
Shapes keep at least 60% of their pixels visible when they overlap; boxes are tight around
the visible pixels and ``area`` is their count. The same seed gives byte-identical files.

With ``--panoptic`` the background also holds stuff regions (a flat-coloured band across the
image, a checkered patch; the rest is the gradient) from a random stream of their own, so the
shapes, their placement and the boxes are the same as without; the COCO panoptic annotations
(things = the shapes, stuff = gradient, band, checker) are written beside the detection ones.

With ``--classification`` it writes an image classification set in the ImageFolder layout
(``train/<shape>/*.png``, ``val/<shape>/*.png``) instead: square images (64 pixels by default)
on the same cluttered background, with the panoptic stuff regions (a band, a checkered patch) as
distractors and one shape of 25% to 37.5% of the side, so most of each image is redundant. The
clutter is dimmed and the shape is light, so the shape stands out by brightness as well as by its
outline (with random contrasting colours a small ViT trained from scratch for minutes stayed at
chance; see docs/pnp_vit.md).

    python -m datasets.synthetic --out data/shapes --num_train 5000 --num_val 200
    python -m datasets.synthetic --out data/shapes_panoptic --panoptic
    python -m datasets.synthetic --classification --out data/synthetic_cls --num_train 3000 --num_val 600
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from util.errors import UserError
from util.files import write_json
from util.panoptic_png import ids_to_rgb

CATEGORIES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
STUFF_CATEGORIES = ["gradient", "band", "checker"]  # ids 7, 8, 9 with --panoptic
GRADIENT, BAND, CHECKER = (len(CATEGORIES) + 1 + i for i in range(len(STUFF_CATEGORIES)))
BAND_PROBABILITY, CHECKER_PROBABILITY = 0.7, 0.6
BAND_HALF_WIDTH = (0.08, 0.2)  # / shorter image side
CHECKER_SIDE = (0.25, 0.6)  # / image side
CHECKER_CELL = (3, 7)  # pixels
MAX_OBJECTS = 4
MIN_REL_SIZE, MAX_REL_SIZE = 0.15, 0.6  # object size / shorter image side (uniform)
IMAGE_SIZE = 96
# --classification: one shape of 25% to 37.5% of a 64-pixel square image (16 to 24 pixels), so it
# covers about 2% to 14% of the pixels and 9 to 16 of the 64 patches of 8 x 8: the rest is clutter.
CLASSIFICATION_IMAGE_SIZE = 64
CLASSIFICATION_MIN_REL_SIZE, CLASSIFICATION_MAX_REL_SIZE = 0.25, 0.375
CLUTTER_DIMMING = 0.55  # --classification: the clutter's intensities are scaled into 0..140
LIGHT_SHAPE = (190.0, 255.0)  # --classification: each channel of the shape's colour (uniform)
MIN_VISIBLE = 0.6  # fraction of an object's pixels that later objects must leave visible
PLACEMENT_TRIES = 20
MIN_COLOUR_DISTANCE = 90.0  # RGB distance between a shape and the background under it
NOISE_STD = 6.0

_T = 1 / 3
# Outlines in units of half the object size, before rotation (circle and ring are ellipses).
POLYGONS = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (0.95, 0.75), (-0.95, 0.75)],
    "cross": [(-_T, -1), (_T, -1), (_T, -_T), (1, -_T), (1, _T), (_T, _T), (_T, 1), (-_T, 1),
              (-_T, _T), (-1, _T), (-1, -_T), (-_T, -_T)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
}
RING_HOLE = 0.55


@dataclass(frozen=True)
class Layout:
    """How many shapes an image holds (uniform in ``0..max_objects``) and how big they are
    (uniform in ``[min_size, max_size]`` x the shorter image side)."""
    max_objects: int = MAX_OBJECTS
    min_size: float = MIN_REL_SIZE
    max_size: float = MAX_REL_SIZE

    def check(self) -> None:
        if self.max_objects < 0:
            raise UserError(f"--max_objects must be >= 0, got {self.max_objects}")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise UserError("--min_size/--max_size must satisfy 0 < min_size <= max_size <= 1, "
                            f"got {self.min_size}/{self.max_size}")


def shape_mask(name: str, height: int, width: int, cx: float, cy: float, size: float,
               angle: float) -> np.ndarray:
    """Bool ``(height, width)`` mask of one filled shape of ``size`` pixels centred at ``cx, cy``."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    half = size / 2
    if name in ("circle", "ring"):
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
        if name == "ring":
            hole = half * RING_HOLE
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + half * (x * cos - y * sin), cy + half * (x * sin + y * cos))
                  for x, y in POLYGONS[name]]
        draw.polygon(points, fill=255)
    return np.asarray(mask) > 0


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float ``(height, width, 3)`` gradient + smooth blobs, with thin lines and specks."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = start + ramp[..., None] * (end - start)
    blobs = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    blobs = np.asarray(blobs.resize((width, height), Image.BILINEAR), dtype=np.float64)
    image = np.clip(image + 0.25 * (blobs - 128), 0, 255)

    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(rng.integers(0, 256, size=3).tolist()), width=1)
    for _ in range(rng.integers(5, 25)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.5, 1.5)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                     fill=tuple(rng.integers(0, 256, size=3).tolist()))
    return np.asarray(canvas, dtype=np.float64)


def render_stuff(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Paint stuff regions over ``image`` (float ``(H, W, 3)``, in place); returns their category map.

    The map ``(H, W)`` holds ``GRADIENT`` where the background shows, ``BAND`` under a
    flat-coloured band at a random angle (probability 0.7) and ``CHECKER`` under a
    two-colour checkerboard rectangle (probability 0.6, painted last).
    """
    height, width = image.shape[:2]
    stuff = np.full((height, width), GRADIENT, dtype=np.int64)
    ys, xs = np.mgrid[0:height, 0:width]
    if rng.uniform() < BAND_PROBABILITY:
        angle = rng.uniform(0, math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        centre = rng.uniform(along.min(), along.max())
        half_width = rng.uniform(*BAND_HALF_WIDTH) * min(height, width)
        band = np.abs(along - centre) < half_width
        image[band] = rng.uniform(0, 255, size=3)
        stuff[band] = BAND
    if rng.uniform() < CHECKER_PROBABILITY:
        patch_h, patch_w = (int(rng.uniform(*CHECKER_SIDE) * side) for side in (height, width))
        top, left = int(rng.integers(0, height - patch_h + 1)), int(rng.integers(0, width - patch_w + 1))
        cell = int(rng.integers(*CHECKER_CELL))
        colours = rng.uniform(0, 255, size=(2, 3))
        region = (slice(top, top + patch_h), slice(left, left + patch_w))
        parity = (ys[region] // cell + xs[region] // cell) % 2
        image[region] = colours[parity]
        stuff[region] = CHECKER
    return stuff


def contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour far (if found in a few draws) from the mean colour ``under`` it."""
    colours = rng.integers(0, 256, size=(10, 3)).astype(np.float64)
    distances = np.linalg.norm(colours - under, axis=1)
    far = np.nonzero(distances >= MIN_COLOUR_DISTANCE)[0]
    return colours[far[0]] if len(far) else colours[np.argmax(distances)]


def place_shape(rng: np.random.Generator, category: int, owner: np.ndarray,
                full_areas: list[int], layout: Layout = Layout()) -> Optional[np.ndarray]:
    """Mask of a new shape that leaves every earlier object ``MIN_VISIBLE`` visible, or None.

    ``owner`` is the ``(H, W)`` index of the object visible at each pixel (-1: background);
    ``full_areas`` the unoccluded pixel count of each earlier object.
    """
    height, width = owner.shape
    visible = np.bincount(owner[owner >= 0], minlength=len(full_areas))
    must_stay = MIN_VISIBLE * np.asarray(full_areas, dtype=np.float64)
    for _ in range(PLACEMENT_TRIES):
        size = max(4.0, rng.uniform(layout.min_size, layout.max_size) * min(height, width))
        reach = size / math.sqrt(2)  # every outline fits in this radius around its centre
        cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
        angle = math.radians(rng.uniform(-20, 20))
        mask = shape_mask(CATEGORIES[category - 1], height, width, cx, cy, size, angle)
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(full_areas))
        if mask.any() and np.all(visible - covered >= must_stay):
            return mask
    return None


def render_image(rng: np.random.Generator, image_size: int, layout: Layout = Layout()
                 ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One uint8 ``(H, W, 3)`` image and its objects as ``(category_id, visible mask)``."""
    pixels, objects, _ = render_panoptic_image(rng, None, image_size, layout)
    return pixels, objects


def render_panoptic_image(rng: np.random.Generator, stuff_rng: Optional[np.random.Generator], image_size: int,
                          layout: Layout = Layout()) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], Optional[np.ndarray]]:
    """``render_image`` plus, with a ``stuff_rng``, stuff regions and their ``(H, W)`` category map
    (see ``render_stuff``; 0 where a shape covers the background), else None.

    ``rng`` draws exactly what it draws without stuff, so the shapes are the same either way
    (their colours contrast with what lies under them, so they may differ).
    """
    width, height = (int(round(s * image_size)) for s in rng.uniform(0.75, 1.0, size=2))
    image = background(rng, height, width)
    stuff = None if stuff_rng is None else render_stuff(stuff_rng, image)
    owner = np.full((height, width), -1, dtype=np.int64)
    categories: list[int] = []
    full_areas: list[int] = []
    for _ in range(rng.integers(0, layout.max_objects + 1)):
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = place_shape(rng, category, owner, full_areas, layout)
        if mask is None:
            continue
        image[mask] = contrasting_colour(rng, image[mask].mean(axis=0))
        owner[mask] = len(categories)
        categories.append(category)
        full_areas.append(int(mask.sum()))
    objects = [(category, owner == index) for index, category in enumerate(categories)]
    if stuff is not None:
        stuff[owner >= 0] = 0
    return add_noise(rng, image), objects, stuff


def add_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``image`` (float ``(H, W, 3)``) plus pixel noise, as uint8."""
    image = np.clip(image + rng.normal(0, NOISE_STD, size=image.shape), 0, 255)
    return np.round(image).astype(np.uint8)


def render_classification_image(rng: np.random.Generator, stuff_rng: np.random.Generator, category: int,
                                image_size: int, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 ``(image_size, image_size, 3)`` image holding one light shape of ``category``
    (1-based, size drawn from ``layout``) on the detection set's cluttered background, its stuff
    regions painted over it (a band, a checkered patch: distractors, see ``render_stuff``), all
    dimmed by ``CLUTTER_DIMMING``; and the shape's bool ``(image_size, image_size)`` mask."""
    image = background(rng, image_size, image_size)
    render_stuff(stuff_rng, image)
    image *= CLUTTER_DIMMING
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    mask = place_shape(rng, category, owner, [], layout)  # alone in the image, its first try fits
    image[mask] = rng.uniform(*LIGHT_SHAPE, size=3)
    return add_noise(rng, image), mask


def annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO annotation of a visible mask: tight xywh box, pixel area, box polygon."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def panoptic_segments(objects: list[tuple[int, np.ndarray]], stuff: np.ndarray
                      ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Segment id map ``(H, W)`` and ``segments_info`` of one image, COCO panoptic style.

    Shapes get ids 1..K in drawing order, then each stuff class present one more id.
    """
    ids = np.zeros(stuff.shape, dtype=np.uint32)
    segments = []
    regions = list(objects) + [(category_id, stuff == category_id) for category_id in (GRADIENT, BAND, CHECKER)]
    for category_id, mask in regions:
        if not mask.any():
            continue
        segment_id = len(segments) + 1
        ids[mask] = segment_id
        box = annotation(mask, segment_id, 0, category_id)["bbox"]
        segments.append({"id": segment_id, "category_id": category_id, "bbox": box,
                         "area": int(mask.sum()), "iscrowd": 0})
    return ids, segments


def write_panoptic_json(out: str, name: str, images: list[dict], annotations: list[dict]) -> None:
    """``out/annotations/panoptic_{name}2017.json`` with things (the shapes) and stuff categories."""
    things = [{"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1} for i, n in enumerate(CATEGORIES)]
    stuff = [{"id": GRADIENT + i, "name": n, "supercategory": "background", "isthing": 0}
             for i, n in enumerate(STUFF_CATEGORIES)]
    data = {"info": {"description": "synthetic shapes, panoptic (python -m datasets.synthetic --panoptic)"},
            "images": images, "annotations": annotations, "categories": things + stuff}
    write_json(data, os.path.join(out, "annotations", f"panoptic_{name}2017.json"))


def parallel_map(fn: Callable[[int], Any], count: int, jobs: int) -> list[Any]:
    """``[fn(0), ..., fn(count - 1)]``, computed by ``jobs`` processes when ``jobs > 1``.

    Every image draws from its own generator (seeded by its split and index), so the result
    does not depend on ``jobs``.
    """
    if jobs == 1 or count < 2:
        return [fn(index) for index in range(count)]
    with ProcessPoolExecutor(min(jobs, count)) as pool:
        return list(pool.map(fn, range(count), chunksize=max(1, count // (8 * jobs))))


def save_png(pixels: np.ndarray, path: str) -> None:
    """Write ``pixels`` losslessly with fast compression (the noise does not compress anyway)."""
    Image.fromarray(pixels).save(path, compress_level=1)


def write_image(out: str, split: int, name: str, image_size: int, seed: int, panoptic: bool, layout: Layout,
                index: int) -> tuple[dict[str, Any], list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Render image ``index`` of a split, write its PNG (and its panoptic PNG), and return its
    ``images`` entry, its instance annotations (ids still 0) and its panoptic annotation."""
    rng = np.random.default_rng([seed, split, index])
    stuff_rng = np.random.default_rng([seed, split, index, 1]) if panoptic else None
    pixels, objects, stuff = render_panoptic_image(rng, stuff_rng, image_size, layout)
    image_id = index + 1
    file_name = f"{image_id:012d}.png"
    save_png(pixels, os.path.join(out, f"{name}2017", file_name))
    image = {"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]}
    annotations = [annotation(mask, 0, image_id, category_id) for category_id, mask in objects]
    panoptic_annotation = None
    if panoptic:
        ids, segments = panoptic_segments(objects, stuff)
        save_png(ids_to_rgb(ids), os.path.join(out, "annotations", f"panoptic_{name}2017", file_name))
        panoptic_annotation = {"image_id": image_id, "file_name": file_name, "segments_info": segments}
    return image, annotations, panoptic_annotation


def write_split(out: str, split: int, name: str, num_images: int, image_size: int, seed: int,
                panoptic: bool = False, layout: Layout = Layout(), jobs: int = 1) -> int:
    """Write ``out/{name}2017/*.png`` and its json with ``jobs`` processes; returns the number of objects.

    ``panoptic`` renders stuff too and writes ``out/annotations/panoptic_{name}2017.json`` and
    its PNGs in ``out/annotations/panoptic_{name}2017/``.
    """
    os.makedirs(os.path.join(out, f"{name}2017"), exist_ok=True)
    if panoptic:
        os.makedirs(os.path.join(out, "annotations", f"panoptic_{name}2017"), exist_ok=True)
    written = parallel_map(partial(write_image, out, split, name, image_size, seed, panoptic, layout), num_images, jobs)
    images, annotations, panoptic_annotations = [], [], []
    for image, image_annotations, panoptic_annotation in written:
        images.append(image)
        for ann in image_annotations:
            ann["id"] = len(annotations) + 1
            annotations.append(ann)
        if panoptic:
            panoptic_annotations.append(panoptic_annotation)
    if panoptic:
        write_panoptic_json(out, name, images, panoptic_annotations)
    data = {
        "info": {"description": "synthetic shapes (python -m datasets.synthetic)",
                 "seed": seed, "image_size": image_size, "max_objects": layout.max_objects,
                 "min_size": layout.min_size, "max_size": layout.max_size},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CATEGORIES)],
    }
    write_json(data, os.path.join(out, "annotations", f"instances_{name}2017.json"))
    return len(annotations)


def check_flags(num_train: int, num_val: int, image_size: int, layout: Layout, least_images: int = 0,
                jobs: int = 1) -> None:
    """``UserError`` naming the flag if an image count is under ``least_images``, the images are
    too small, the layout is impossible or ``jobs`` is not positive."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if num_train < least_images or num_val < least_images:
        raise UserError(f"--num_train/--num_val must be >= {least_images}, got {num_train}/{num_val}")
    if image_size < 32:
        raise UserError(f"--image_size must be at least 32 pixels, got {image_size}")
    layout.check()


def generate(out: str, num_train: int, num_val: int, image_size: int, seed: int, panoptic: bool = False,
             layout: Layout = Layout(), jobs: int = 1) -> None:
    """Write the dataset under ``out`` (COCO layout; ``panoptic``: also COCO panoptic) with ``jobs``
    processes and print a one-line summary."""
    check_flags(num_train, num_val, image_size, layout, jobs=jobs)
    start = time.time()
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    objects = [write_split(out, split, name, count, image_size, seed, panoptic, layout, jobs)
               for split, (name, count) in enumerate([("train", num_train), ("val", num_val)])]
    classes = f"{len(CATEGORIES)} classes (num_classes {len(CATEGORIES) + 1})"
    if panoptic:
        classes = (f"{len(CATEGORIES)} thing + {len(STUFF_CATEGORIES)} stuff classes, panoptic "
                   f"(num_classes {CHECKER + 1})")
    print(f"synthetic shapes: {num_train} train / {num_val} val images, {objects[0]} / {objects[1]} "
          f"objects, {classes}, written to {out} in {time.time() - start:.1f}s")


def write_classification_image(out: str, split: int, name: str, image_size: int, seed: int, layout: Layout,
                               index: int) -> None:
    """Write ``out/{name}/<class name>/{index:06d}.png``; image ``index`` shows class ``index % 6``,
    so the classes are balanced."""
    category = index % len(CATEGORIES) + 1
    rng = np.random.default_rng([seed, split, index])
    stuff_rng = np.random.default_rng([seed, split, index, 1])
    pixels, _ = render_classification_image(rng, stuff_rng, category, image_size, layout)
    save_png(pixels, os.path.join(out, name, CATEGORIES[category - 1], f"{index:06d}.png"))


def generate_classification(out: str, num_train: int, num_val: int, image_size: int = CLASSIFICATION_IMAGE_SIZE,
                            seed: int = 0, layout: Layout = Layout(1, CLASSIFICATION_MIN_REL_SIZE,
                                                                   CLASSIFICATION_MAX_REL_SIZE),
                            jobs: int = 1) -> None:
    """Write the classification dataset under ``out`` (ImageFolder layout: ``train/<class>/``,
    ``val/<class>/``; every class in both, so at least one image of each per split) with ``jobs``
    processes and print a one-line summary. ``layout.max_objects`` is not used: every image holds
    one shape."""
    check_flags(num_train, num_val, image_size, layout, least_images=len(CATEGORIES), jobs=jobs)
    start = time.time()
    for split, (name, count) in enumerate([("train", num_train), ("val", num_val)]):
        for class_name in CATEGORIES:
            os.makedirs(os.path.join(out, name, class_name), exist_ok=True)
        parallel_map(partial(write_classification_image, out, split, name, image_size, seed, layout), count, jobs)
    print(f"synthetic shapes classification: {num_train} train / {num_val} val images of "
          f"{image_size}x{image_size}, {len(CATEGORIES)} classes, written to {out} in {time.time() - start:.1f}s")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.synthetic",
        description="Write a deterministic synthetic COCO-format detection dataset of coloured "
                    "shapes (circle, square, triangle, cross, ring, diamond; category ids 1-6) on "
                    "cluttered backgrounds: OUT/annotations/instances_{train,val}2017.json and "
                    "OUT/{train,val}2017/*.png. Use it with --coco_path OUT. Image sides are drawn "
                    "in [0.75, 1] x --image_size; 0 to --max_objects objects per image, their size "
                    "uniform in [--min_size, --max_size] x the shorter side. Labels are the category "
                    "ids, so num_classes is 7. With --classification: an ImageFolder image "
                    "classification set instead (see that flag). The same flags give byte-identical files.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--num_train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--num_val", type=int, default=200, help="validation images (default 200)")
    parser.add_argument("--image_size", type=int,
                        help=f"largest image side in pixels (default {IMAGE_SIZE}; with --classification "
                             f"the side of the square images, default {CLASSIFICATION_IMAGE_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--jobs", type=int, default=usable_cpus,
                        help="processes writing images (default: the CPUs this process may use); "
                             "the files do not depend on it")
    parser.add_argument("--max_objects", type=int,
                        help=f"most objects in one image (default {MAX_OBJECTS}; not with --classification)")
    parser.add_argument("--min_size", type=float,
                        help=f"smallest object size / shorter image side (default {MIN_REL_SIZE}; "
                             f"with --classification {CLASSIFICATION_MIN_REL_SIZE})")
    parser.add_argument("--max_size", type=float,
                        help=f"largest object size / shorter image side (default {MAX_REL_SIZE}; "
                             f"with --classification {CLASSIFICATION_MAX_REL_SIZE})")
    parser.add_argument("--panoptic", action="store_true",
                        help="also paint stuff regions (a band, a checkered patch; the rest is the "
                             "gradient: category ids 7-9, isthing 0) and write COCO panoptic annotations: "
                             "OUT/annotations/panoptic_{train,val}2017.json and PNGs in "
                             "OUT/annotations/panoptic_{train,val}2017/ (num_classes 10). Use it with "
                             "--dataset_file coco_panoptic --coco_path OUT --coco_panoptic_path OUT")
    parser.add_argument("--classification", action="store_true",
                        help="write an image classification set instead: square images holding one "
                             "light shape each on the same cluttered background (dimmed), with a band and "
                             "a checkered patch as distractors, in the ImageFolder layout OUT/{train,val}/<shape>/*.png "
                             "(6 balanced classes). Use it with the ViT's --data_path OUT")
    args = parser.parse_args(argv)
    defaults = {"image_size": IMAGE_SIZE, "max_objects": MAX_OBJECTS,
                "min_size": MIN_REL_SIZE, "max_size": MAX_REL_SIZE}
    if args.classification:
        for flag in ("max_objects", "panoptic"):
            if getattr(args, flag) not in (None, False):
                parser.error(f"--{flag} does not apply to --classification (one shape per image)")
        defaults = {"image_size": CLASSIFICATION_IMAGE_SIZE, "max_objects": 1,
                    "min_size": CLASSIFICATION_MIN_REL_SIZE, "max_size": CLASSIFICATION_MAX_REL_SIZE}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    layout = Layout(args.max_objects, args.min_size, args.max_size)
    try:
        if args.classification:
            generate_classification(args.out, args.num_train, args.num_val, args.image_size, args.seed, layout,
                                    args.jobs)
        else:
            generate(args.out, args.num_train, args.num_val, args.image_size, args.seed, args.panoptic, layout,
                     args.jobs)
    except UserError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
