"""Panoptic quality (PQ, SQ, RQ; all, things, stuff) with the panopticapi package.

Predictions (a PNG and its ``segments_info`` per image) are stored per image id; after
``synchronize_between_processes`` every process holds all of them, and ``accumulate`` writes
them into a temporary folder and runs panopticapi's per-image matching on exactly the images
seen, in this process (no worker pool), so the result does not depend on batching or on the
number of processes.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any

from panopticapi.evaluation import PQStat, pq_compute_single_core

from util.misc import all_gather

# eval.json names of the panopticapi results: (row name, result group, metric).
PQ_NAMES = [(f"{metric.upper()}{suffix}", group, metric)
            for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
            for metric in ("pq", "sq", "rq")]
# evaluate()'s stat key of each result group (DETR's names).
GROUP_KEYS = {"All": "PQ_all", "Things": "PQ_th", "Stuff": "PQ_st"}


def pq_average(stat: PQStat, categories: dict[int, dict], isthing: bool | None) -> dict[str, float]:
    """panopticapi's class-averaged ``pq``, ``sq``, ``rq`` and class count ``n``; -1 where ``n = 0``."""
    try:
        result, _ = stat.pq_average(categories, isthing=isthing)
    except ZeroDivisionError:  # no category of this kind occurs in the ground truth or the predictions
        return {"pq": -1.0, "sq": -1.0, "rq": -1.0, "n": 0}
    return {k: float(v) if k != "n" else int(v) for k, v in result.items()}


def panoptic_row(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"PQ": ..., "SQ": ..., "RQ_st": ...}`` from ``evaluate``'s stats (keys ``{prefix}PQ_all`` ...)."""
    return {name: stats[f"{prefix}{GROUP_KEYS[group]}"][metric] for name, group, metric in PQ_NAMES}


class PanopticEvaluator:
    """Collects panoptic predictions and computes PQ against a COCO panoptic ground truth.

    ``panoptic``: the ground-truth json (``annotations`` with ``file_name`` and
    ``segments_info``, ``categories`` with ``isthing``); ``gt_folder``: its PNGs. Usage:
    ``update`` per batch with ``{image_id: {"png_string", "segments_info"}}``, then
    ``synchronize_between_processes``, ``accumulate`` and ``summarize``; the result is
    ``results = {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}}`` (fractions, -1 where
    no category of that kind occurs).
    """

    def __init__(self, panoptic: dict, gt_folder: str, verbose: bool = True):
        self.gt = {ann["image_id"]: ann for ann in panoptic["annotations"]}
        self.categories = {category["id"]: category for category in panoptic["categories"]}
        self.gt_folder = gt_folder
        self.verbose = verbose
        self.predictions: dict[int, dict[str, Any]] = {}
        self.results: dict[str, dict[str, float]] = {}

    def update(self, predictions: dict[int, dict[str, Any]]) -> None:
        self.predictions.update(predictions)

    def synchronize_between_processes(self) -> None:
        merged: dict[int, dict[str, Any]] = {}
        for part in all_gather(self.predictions):
            merged.update(part)
        self.predictions = merged

    def accumulate(self) -> None:
        pairs = []
        with tempfile.TemporaryDirectory(prefix="panoptic_pred_") as pred_folder:
            for image_id in sorted(self.predictions):
                prediction, gt = self.predictions[image_id], self.gt[image_id]
                with open(os.path.join(pred_folder, gt["file_name"]), "wb") as f:
                    f.write(prediction["png_string"])
                segments = [dict(segment) for segment in prediction["segments_info"]]
                pairs.append((gt, {"image_id": image_id, "file_name": gt["file_name"], "segments_info": segments}))
            with contextlib.redirect_stdout(io.StringIO()):
                stat = pq_compute_single_core(0, pairs, self.gt_folder, pred_folder, self.categories)
        self.results = {group: pq_average(stat, self.categories, isthing)
                        for group, isthing in (("All", None), ("Things", True), ("Stuff", False))}

    def summarize(self) -> None:
        if not self.verbose:
            return
        print(f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}  {'N':>4s}")
        for group, result in self.results.items():
            print(f"{group:10s}| {100 * result['pq']:5.1f}  {100 * result['sq']:5.1f}  "
                  f"{100 * result['rq']:5.1f}  {result['n']:4d}")
