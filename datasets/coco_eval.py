"""COCO box AP of detections gathered over a whole evaluation run, computed by hotcoco.

hotcoco's ``COCOeval`` is a port of pycocotools' (same matching, same 101-point
interpolation, same 12 stats: tests/test_coco_eval.py compares them to pycocotools' on crowd
boxes, empty images and images without detections) that runs about 100x faster than it
(docs/BENCHMARKS.md, ``tools/benchmark_eval.py``).

Detections are stored per image id; ``synchronize_between_processes`` brings every process's
detections together (on one process, or on all), and ``accumulate`` runs one COCOeval over
exactly the images seen, so the result does not depend on batching, ordering or the number of
processes.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Optional

import numpy as np
from hotcoco import COCO, COCOeval
from torch import Tensor

from util.misc import all_gather, gather

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_from_dict(data: dict) -> COCO:
    """A COCO index (hotcoco) of an in-memory dataset dict: the ground truth of ``CocoEvaluator``."""
    return COCO(data)


def to_coco_results(image_id: int, prediction: dict[str, Tensor]) -> list[dict[str, Any]]:
    """COCO result dicts (``bbox`` = xywh) of one image's ``scores (K,)``, ``labels (K,)``
    and ``boxes (K, 4)`` xyxy in original-image pixels."""
    return [{"image_id": image_id, "category_id": int(row[6]), "bbox": row[1:5].tolist(), "score": float(row[5])}
            for row in detection_rows(image_id, prediction)]


def detection_rows(image_id: int, prediction: dict[str, Tensor]) -> np.ndarray:
    """One image's detections as the ``(K, 7)`` float64 rows ``[image_id, x, y, w, h, score,
    category_id]`` that ``COCO.load_res`` reads (``boxes`` xyxy in, ``bbox`` xywh out)."""
    boxes = prediction["boxes"].detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4)
    rows = np.empty((len(boxes), 7))
    rows[:, 0] = image_id
    rows[:, 1:3] = boxes[:, :2]
    rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
    rows[:, 5] = prediction["scores"].detach().float().cpu().numpy()
    rows[:, 6] = prediction["labels"].detach().cpu().numpy()
    return rows


class CocoEvaluator:
    """Collects detections and computes the 12 COCO box statistics.

    Usage: ``update`` per batch, then ``synchronize_between_processes``, ``accumulate`` and
    ``summarize``; the result is ``stats`` (12 floats, ``STAT_NAMES`` order; -1 where
    COCOeval has nothing to measure) and ``summary`` (the standard table as text).
    ``verbose=False`` leaves the table unprinted.
    """

    def __init__(self, coco_gt: COCO, verbose: bool = True):
        self.coco_gt = coco_gt
        self.verbose = verbose
        self.image_ids = set(coco_gt.get_img_ids())
        self.results: dict[int, np.ndarray] = {}
        self.coco_eval: COCOeval | None = None
        self.stats: list[float] = []
        self.summary = ""

    def update(self, predictions: dict[int, dict[str, Tensor]]) -> None:
        """Store detections: image id -> ``{'scores', 'labels', 'boxes' (xyxy, original pixels)}``.

        An image seen again replaces its earlier detections.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.image_ids:
                raise ValueError(f"CocoEvaluator.update: image id {image_id} is not in the ground truth")
            self.results[image_id] = detection_rows(image_id, prediction)

    def synchronize_between_processes(self, dst: Optional[int] = None) -> None:
        """Merge the detections of every process (an image seen twice is kept once): on every
        process, or with ``dst`` on that rank only (the others are left with none)."""
        parts = all_gather(self.results) if dst is None else gather(self.results, dst)
        merged: dict[int, np.ndarray] = {}
        for part in parts or []:
            merged.update(part)
        self.results = merged

    def accumulate(self) -> None:
        """Run COCOeval once over the images seen (evaluate + accumulate)."""
        image_ids = sorted(self.results)
        rows = np.concatenate([self.results[image_id] for image_id in image_ids]) if image_ids else np.zeros((0, 7))
        coco_eval = COCOeval(self.coco_gt, self.coco_gt.load_res(rows), "bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        self.coco_eval = coco_eval

    def summarize(self) -> list[float]:
        """Print the standard summary (if verbose) and return/store the 12 stats."""
        if self.coco_eval is None:
            raise RuntimeError("CocoEvaluator.summarize called before accumulate")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_eval.summarize()
        self.summary = "\n".join(self.coco_eval.summary_lines())
        if self.verbose:
            print(self.summary)
        self.stats = [float(s) for s in self.coco_eval.stats]
        return self.stats
