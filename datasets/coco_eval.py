"""COCO box AP of detections gathered over a whole evaluation run.

Detections are stored per image id; after ``synchronize_between_processes`` every process
holds all of them, and ``accumulate`` runs one COCOeval over exactly the images seen, so the
result does not depend on batching, ordering or the number of processes.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from util.misc import all_gather

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def to_coco_results(image_id: int, prediction: dict[str, Tensor]) -> list[dict[str, Any]]:
    """COCO result dicts (``bbox`` = xywh) of one image's ``scores (K,)``, ``labels (K,)``
    and ``boxes (K, 4)`` xyxy in original-image pixels."""
    boxes = prediction["boxes"].detach().float().cpu()
    xywh = boxes.clone()
    xywh[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            for label, box, score in zip(prediction["labels"].tolist(), xywh.tolist(),
                                         prediction["scores"].tolist())]


def load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """A ``COCO`` index of box results, like ``coco_gt.loadRes`` but also for an empty list."""
    annotations = [{**r, "id": i + 1, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
                   for i, r in enumerate(results)]
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset["images"],
                       "categories": coco_gt.dataset["categories"],
                       "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


class CocoEvaluator:
    """Collects detections and computes the 12 COCO box statistics.

    Usage: ``update`` per batch, then ``synchronize_between_processes``, ``accumulate`` and
    ``summarize``; the result is ``stats`` (12 floats, ``STAT_NAMES`` order; -1 where
    COCOeval has nothing to measure). ``verbose=False`` silences pycocotools' printing.
    """

    def __init__(self, coco_gt: COCO, verbose: bool = True):
        self.coco_gt = coco_gt
        self.verbose = verbose
        self.results: dict[int, list[dict[str, Any]]] = {}
        self.coco_eval: COCOeval | None = None
        self.stats: list[float] = []

    def update(self, predictions: dict[int, dict[str, Tensor]]) -> None:
        """Store detections: image id -> ``{'scores', 'labels', 'boxes' (xyxy, original pixels)}``.

        An image seen again replaces its earlier detections.
        """
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"CocoEvaluator.update: image id {image_id} is not in the ground truth")
            self.results[image_id] = to_coco_results(image_id, prediction)

    def synchronize_between_processes(self) -> None:
        """Merge the detections of every process (an image seen twice is kept once)."""
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in all_gather(self.results):
            merged.update(part)
        self.results = merged

    def _printing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def accumulate(self) -> None:
        """Run COCOeval once over the images seen (evaluate + accumulate)."""
        image_ids = sorted(self.results)
        flat = [r for image_id in image_ids for r in self.results[image_id]]
        with self._printing():
            coco_eval = COCOeval(self.coco_gt, load_results(self.coco_gt, flat), iouType="bbox")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.coco_eval = coco_eval

    def summarize(self) -> list[float]:
        """Print the standard summary (if verbose) and return/store the 12 stats."""
        if self.coco_eval is None:
            raise RuntimeError("CocoEvaluator.summarize called before accumulate")
        with self._printing():
            self.coco_eval.summarize()
        self.stats = [float(s) for s in self.coco_eval.stats]
        return self.stats
