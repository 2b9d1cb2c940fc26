"""COCO box evaluation time: pycocotools against the maintained evaluators, on the same inputs.

    python -m tools.benchmark_eval                           # COCO val scale: 5000 images, 100 detections each
    python -m tools.benchmark_eval --images 50 --libraries pycocotools hotcoco

A synthetic ground truth the size of COCO val2017 (``--images`` images, about 7 boxes each as
in val2017, ~1% of them crowd, some images without objects, 80 categories with COCO's ids) and
``--detections`` detections per image (jittered copies of the ground truth, some with a wrong
category, and random boxes; some images without any) are evaluated by each library: loading
the detections, ``evaluate``, ``accumulate`` and ``summarize`` are timed (the ground-truth
index is built once, untimed, as a dataset builds it). Every library's 12 stats are compared
with the first library's, and its time is printed as a speed-up over it (the first library,
pycocotools by default, is the baseline), measured in the same run; the result goes to
``--output`` (JSON).
"""
import argparse
import contextlib
import importlib.util
import io
import os
import platform
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch

from tools.benchmark import Timing, measure
from util.errors import UserError, exit_status
from util.files import write_json

# COCO's 80 category ids (1..90 with ten gaps).
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("COCO box evaluation benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images in the ground truth (COCO val2017: 5000)")
    p.add_argument("--boxes", type=float, default=7.3, help="mean ground-truth boxes per image (val2017: 7.3)")
    p.add_argument("--detections", type=int, default=100, help="detections per image (DETR: num_queries)")
    p.add_argument("--detection_categories", default="few", choices=("few", "all"),
                   help="few: an image's detections name its objects' categories and 3 others; all: any of the 80")
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES),
                   help="the first one is the baseline of the speed-ups and of the stats")
    p.add_argument("--repeats", type=int, default=1, help="timed evaluations per library")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmark_eval.json", help="JSON result")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the inputs
def synthetic_eval_set(num_images: int, boxes_per_image: float, detections_per_image: int, seed: int = 0,
                       crowd: float = 0.01, no_detections: float = 0.04, other_categories: Optional[int] = 3
                       ) -> tuple[dict[str, Any], np.ndarray]:
    """A COCO ground-truth dict and its detections as an ``(N, 7)`` array of rows
    ``[image_id, x, y, w, h, score, category_id]`` (the array form ``loadRes`` reads).

    Per image: a Poisson number of objects (so some images have none), each crowd with
    probability ``crowd``; ``detections_per_image`` detections, 80% of the objects found again
    with jittered boxes (one in ten with the wrong category), the rest random boxes, except
    that an image has no detection at all with probability ``no_detections``. As a trained
    detector's, an image's detections name few categories: its objects' and
    ``other_categories`` others (``None``: any of the 80, which makes pycocotools slower).
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": f"category_{i}", "supercategory": "thing"} for i in COCO_CATEGORY_IDS]
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = (int(v) for v in rng.integers(320, 641, size=2))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = int(rng.poisson(boxes_per_image))
        sizes = np.exp(rng.uniform(np.log(4), np.log(min(width, height) * 0.8), size=(count, 2)))
        corners = rng.uniform(0, 1, size=(count, 2)) * (np.array([width, height]) - sizes)
        boxes = np.concatenate([corners, sizes], axis=1).round(2)
        labels = rng.choice(COCO_CATEGORY_IDS, size=count)
        is_crowd = rng.uniform(size=count) < crowd
        for box, label, crowd_box in zip(boxes, labels, is_crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                                "iscrowd": int(crowd_box)})
        if detections_per_image == 0 or rng.uniform() < no_detections:
            continue
        named = (COCO_CATEGORY_IDS if other_categories is None
                 else np.concatenate([labels, rng.choice(COCO_CATEGORY_IDS, size=other_categories)]))
        found = rng.uniform(size=count) < 0.8
        hits = boxes[found][:detections_per_image]
        jitter = rng.normal(scale=0.1, size=hits.shape) * np.concatenate([hits[:, 2:], hits[:, 2:]], axis=1)
        hit_labels = np.where(rng.uniform(size=len(hits)) < 0.1, rng.choice(named, size=len(hits)),
                              labels[found][:detections_per_image])
        misses = detections_per_image - len(hits)
        random_sizes = rng.uniform(2, min(width, height) / 2, size=(misses, 2))
        random_boxes = np.concatenate([rng.uniform(0, 1, size=(misses, 2)) * (np.array([width, height]) - random_sizes),
                                       random_sizes], axis=1)
        rows = np.zeros((detections_per_image, 7))
        rows[:, 0] = image_id
        rows[:, 1:5] = np.concatenate([hits + jitter, random_boxes])
        rows[:, 3:5] = np.maximum(rows[:, 3:5], 1.0)
        rows[:, 5] = np.concatenate([rng.uniform(0.3, 1.0, size=len(hits)), rng.uniform(0.0, 0.6, size=misses)])
        rows[:, 6] = np.concatenate([hit_labels, rng.choice(named, size=misses)])
        detections.append(rows)
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, np.concatenate(detections) if detections else np.zeros((0, 7))


# ----------------------------------------------------------------------------- the libraries
def _pycocotools(gt: dict[str, Any]) -> tuple[Any, type]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    return coco_gt, COCOeval


def _faster_coco_eval(gt: dict[str, Any]) -> tuple[Any, type]:
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO(gt), COCOeval_faster


def _hotcoco(gt: dict[str, Any]) -> tuple[Any, type]:
    from hotcoco import COCO, COCOeval

    return COCO(gt), COCOeval


# name -> builder: ground-truth dict -> (its index in the library, the library's COCOeval).
LIBRARIES: dict[str, Callable[[dict[str, Any]], tuple[Any, type]]] = {
    "pycocotools": _pycocotools, "faster_coco_eval": _faster_coco_eval, "hotcoco": _hotcoco}


def box_stats(coco_gt: Any, coco_eval_class: type, detections: np.ndarray) -> list[float]:
    """The 12 stats of ``detections`` (``(N, 7)`` rows), with the pycocotools calls every library offers."""
    coco_eval = coco_eval_class(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


def check_installed(names: list[str]) -> None:
    """``UserError`` naming the first library of ``names`` that is not installed."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"--libraries {name}: the package is not installed (pip install {name.replace('_', '-')})")


def library_version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("_", "-"))


# ----------------------------------------------------------------------------- the run
def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    opts = parse_args(argv)
    check_installed(opts.libraries)
    other_categories = None if opts.detection_categories == "all" else 3
    gt, detections = synthetic_eval_set(opts.images, opts.boxes, opts.detections, opts.seed,
                                        other_categories=other_categories)
    print(f"{len(gt['images'])} images, {len(gt['annotations'])} ground-truth boxes "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(detections)} detections; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    stats: dict[str, list[float]] = {}
    evaluators = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the libraries' own printing
        for name in opts.libraries:
            index = LIBRARIES[name](gt)  # built once, untimed, as a dataset builds it
            evaluators[name] = lambda index=index, name=name: stats.__setitem__(name, box_stats(*index, detections))
        timings = measure(evaluators, opts.repeats, 0, torch.device("cpu"))
    baseline = opts.libraries[0]
    rows = []
    print(f"| library | version | seconds | speed-up over {baseline} | max abs difference of the 12 stats |")
    print("|---|---|---|---|---|")
    for name in opts.libraries:
        timing: Timing = timings[name]
        speedup = timings[baseline].median / timing.median
        difference = max(abs(a - b) for a, b in zip(stats[name], stats[baseline]))
        rows.append({"library": name, "version": library_version(name), "seconds": timing.median,
                     "low": timing.low, "high": timing.high, "runs": timing.runs, "speedup": speedup,
                     "stats": stats[name], "max_abs_difference": difference})
        print(f"| {name} | {rows[-1]['version']} | {timing.median:.2f} [{timing.low:.2f}-{timing.high:.2f}] | "
              f"{speedup:.2f}x | {difference:.1e} |")
    print("stats (" + baseline + "): " + " ".join(f"{s:.4f}" for s in stats[baseline]))
    command = ["python", "-m", "tools.benchmark_eval", *(sys.argv[1:] if argv is None else argv)]
    report = {"command": " ".join(command),
              "images": len(gt["images"]), "gt_boxes": len(gt["annotations"]), "detections": len(detections),
              "cpu_count": os.cpu_count(), "rows": rows}
    write_json(report, opts.output, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(exit_status(run))
