"""Panoptic quality (PQ, SQ, RQ; all, things, stuff) computed by hotcoco.

hotcoco's ``PanopticEval`` follows panopticapi's protocol (matching at IoU > 0.5, void and
crowd handling, class averages); tests/test_panoptic_eval.py compares it with panopticapi where
that is installed.

Predictions (a PNG and its ``segments_info`` per image) are stored per image id;
``synchronize_between_processes`` brings every process's predictions together (on one
process, or on all), and ``accumulate`` writes them into a temporary folder and evaluates
exactly the images seen, so the result does not depend on batching or on the number of
processes.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any, Optional

from hotcoco.panoptic import PanopticEval

from util.misc import all_gather, gather

# eval.json names of the PQ results: (row name, result group, metric).
PQ_NAMES = [(f"{metric.upper()}{suffix}", group, metric)
            for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
            for metric in ("pq", "sq", "rq")]
# evaluate()'s stat key of each result group (DETR's names).
GROUP_KEYS = {"All": "PQ_all", "Things": "PQ_th", "Stuff": "PQ_st"}


def group_result(results: dict[str, Any], group: str) -> dict[str, float]:
    """The class-averaged ``pq``, ``sq``, ``rq`` and class count ``n`` of one result group
    (``All``, ``Things``, ``Stuff``); -1 where no category of the group occurs (``n = 0``)."""
    result = results[group]
    if not result["n"]:
        return {"pq": -1.0, "sq": -1.0, "rq": -1.0, "n": 0}
    return {"pq": float(result["pq"]), "sq": float(result["sq"]), "rq": float(result["rq"]), "n": int(result["n"])}


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
        self.images = {image["id"]: image for image in panoptic["images"]}
        self.categories = panoptic["categories"]
        self.gt_folder = gt_folder
        self.verbose = verbose
        self.predictions: dict[int, dict[str, Any]] = {}
        self.results: dict[str, dict[str, float]] = {}
        self.summary = ""

    def update(self, predictions: dict[int, dict[str, Any]]) -> None:
        self.predictions.update(predictions)

    def synchronize_between_processes(self, dst: Optional[int] = None) -> None:
        """Merge the predictions of every process: on every process, or with ``dst`` on that
        rank only (the others are left with none)."""
        parts = all_gather(self.predictions) if dst is None else gather(self.predictions, dst)
        merged: dict[int, dict[str, Any]] = {}
        for part in parts or []:
            merged.update(part)
        self.predictions = merged

    def accumulate(self) -> None:
        """Evaluate the images seen: their ground truth against the predictions' PNGs."""
        image_ids = sorted(self.predictions)
        gt = {"images": [self.images[i] for i in image_ids], "annotations": [self.gt[i] for i in image_ids],
              "categories": self.categories}
        annotations = []
        with tempfile.TemporaryDirectory(prefix="panoptic_pred_") as pred_folder:
            for image_id in image_ids:
                prediction, file_name = self.predictions[image_id], self.gt[image_id]["file_name"]
                with open(os.path.join(pred_folder, file_name), "wb") as f:
                    f.write(prediction["png_string"])
                annotations.append({"image_id": image_id, "file_name": file_name,
                                    "segments_info": [dict(segment) for segment in prediction["segments_info"]]})
            evaluation = PanopticEval(gt, {"annotations": annotations}, gt_folder=self.gt_folder,
                                      pred_folder=pred_folder)
            with contextlib.redirect_stdout(io.StringIO()):
                evaluation.evaluate()
        results = evaluation.results()
        self.results = {group: group_result(results, group) for group in ("All", "Things", "Stuff")}

    def summarize(self) -> None:
        """Print the PQ table (if verbose) and store it as ``summary``."""
        lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}  {'N':>4s}"]
        lines += [f"{group:10s}| {100 * result['pq']:5.1f}  {100 * result['sq']:5.1f}  "
                  f"{100 * result['rq']:5.1f}  {result['n']:4d}" for group, result in self.results.items()]
        self.summary = "\n".join(lines)
        if self.verbose:
            print(self.summary)
