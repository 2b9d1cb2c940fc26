"""COCO box evaluation (datasets/coco_eval.py): by hand, and against pycocotools (the reference
implementation, a dev requirement: that test skips without it)."""
import contextlib
import io
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch

from datasets.coco import build
from datasets.coco_eval import STAT_NAMES, CocoEvaluator, coco_from_dict, detection_rows, to_coco_results
from tools.benchmark_eval import synthetic_eval_set


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    args = Namespace(coco_path=synthetic_root, eval_size=800, augment="detr", num_classes=None)
    return build("val", args)


@pytest.fixture(scope="module")
def coco_gt(dataset):
    return dataset.coco


def perfect_predictions(dataset):
    """Every ground-truth box as a detection (xyxy), with distinct descending scores."""
    predictions = {}
    for image_id in dataset.ids:
        anns = dataset.annotations_by_image[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        predictions[image_id] = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "scores": torch.linspace(0.9, 0.5, len(anns)),
        }
    return predictions


def evaluate(coco_gt, batches):
    evaluator = CocoEvaluator(coco_gt, verbose=False)
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator.summarize()


def noisy_predictions(dataset):
    """Perfect boxes jittered, plus one spurious low-score detection per image."""
    generator = torch.Generator().manual_seed(0)
    predictions = perfect_predictions(dataset)
    for image_id, prediction in predictions.items():
        boxes = prediction["boxes"] + torch.randn(prediction["boxes"].shape, generator=generator) * 2
        prediction["boxes"] = torch.cat([boxes, torch.tensor([[1.0, 1, 20, 20]])])
        prediction["labels"] = torch.cat([prediction["labels"], torch.tensor([2])])
        spurious_score = torch.tensor([0.3 + image_id / 100])
        prediction["scores"] = torch.cat([prediction["scores"] * 0.9 + 0.05, spurious_score])
    return predictions


def test_stat_names():
    assert STAT_NAMES == ["AP", "AP50", "AP75", "APs", "APm", "APl",
                          "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def test_perfect_predictions_give_ap_one(dataset, coco_gt):
    stats = evaluate(coco_gt, [perfect_predictions(dataset)])
    assert len(stats) == 12 and all(isinstance(s, float) for s in stats)
    assert stats[0] == pytest.approx(1.0)
    assert stats[1] == pytest.approx(1.0)
    assert stats[8] == pytest.approx(1.0)


def test_no_detections_give_zero(dataset, coco_gt):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0)}
    stats = evaluate(coco_gt, [{image_id: empty for image_id in dataset.ids}])
    assert stats[0] == 0.0 and stats[1] == 0.0 and stats[8] == 0.0


def test_result_is_independent_of_batching_and_order(dataset, coco_gt):
    predictions = noisy_predictions(dataset)
    items = list(predictions.items())
    together = evaluate(coco_gt, [predictions])
    one_per_batch = evaluate(coco_gt, [dict([item]) for item in reversed(items)])
    uneven = evaluate(coco_gt, [dict(items[5:]), dict(items[:2]), dict(items[2:5])])
    assert 0.0 < together[0] < 1.0
    assert one_per_batch == together
    assert uneven == together


def test_only_images_seen_are_evaluated(dataset, coco_gt):
    predictions = perfect_predictions(dataset)
    first_half = dict(list(predictions.items())[:6])
    stats = evaluate(coco_gt, [first_half])
    assert stats[0] == pytest.approx(1.0), "unseen images must not count as missed objects"


def test_image_seen_twice_keeps_one_copy(dataset, coco_gt):
    predictions = perfect_predictions(dataset)
    stats = evaluate(coco_gt, [predictions, predictions])
    assert stats[0] == pytest.approx(1.0), "duplicated detections would be false positives"


def test_hand_made_ap50_and_ap75():
    """Two objects; one detection exact, one with IoU 0.62 (a hit only for IoU <= 0.6).

    At IoU 0.50/0.55/0.60 both are found: AP 1. At 0.65 ... 0.95 (7 thresholds) only the
    higher-scored one is: precision 1 up to recall 0.5, so AP = 51/101 on the 101-point grid.
    """
    coco_gt = coco_from_dict({
        "images": [{"id": 1, "file_name": "x.png", "width": 300, "height": 300}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50],
             "area": 2500.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 100, 100],
             "area": 10000.0, "iscrowd": 0},
        ],
    })
    predictions = {1: {
        "boxes": torch.tensor([[10.0, 10, 60, 60], [100, 100, 162, 200]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.8]),
    }}
    stats = evaluate(coco_gt, [predictions])
    assert stats[1] == pytest.approx(1.0)
    assert stats[2] == pytest.approx(51 / 101)
    assert stats[0] == pytest.approx((3 * 1.0 + 7 * 51 / 101) / 10)


def test_summary_printing_can_be_silenced(dataset, coco_gt, capsys):
    evaluate(coco_gt, [perfect_predictions(dataset)])
    assert capsys.readouterr().out == ""
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(perfect_predictions(dataset))
    evaluator.accumulate()
    evaluator.summarize()
    out = capsys.readouterr().out
    assert "Average Precision" in out and out == evaluator.summary + "\n"


def test_unknown_image_id_is_refused(coco_gt):
    evaluator = CocoEvaluator(coco_gt, verbose=False)
    with pytest.raises(ValueError, match="image id 999"):
        evaluator.update({999: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                "scores": torch.zeros(0)}})


def test_detection_rows_and_result_dicts():
    prediction = {"boxes": torch.tensor([[1.0, 2, 11, 32], [0, 0, 5, 5]]), "labels": torch.tensor([3, 7]),
                  "scores": torch.tensor([0.5, 0.25])}
    assert detection_rows(4, prediction).tolist() == [[4, 1, 2, 10, 30, 0.5, 3], [4, 0, 0, 5, 5, 0.25, 7]]
    assert to_coco_results(4, prediction) == [
        {"image_id": 4, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 30.0], "score": 0.5},
        {"image_id": 4, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.25}]


# ----------------------------------------------------------------------------- against pycocotools
@pytest.fixture(scope="module")
def eval_set():
    """80 images: crowd boxes, images without objects, images without detections, many categories."""
    gt, rows = synthetic_eval_set(80, 3.0, 12, seed=1, crowd=0.1, no_detections=0.15)
    detected = set(rows[:, 0].astype(int).tolist())
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(crowd) >= 5 and len({a["image_id"] for a in crowd}) >= 5
    assert any(not any(a["image_id"] == image["id"] for a in gt["annotations"]) for image in gt["images"])
    assert len(detected) <= len(gt["images"]) - 5
    assert len({a["category_id"] for a in gt["annotations"]}) >= 40
    return gt, rows


def pycocotools_stats(gt: dict, rows: np.ndarray, image_ids: list[int]) -> list[float]:
    coco = pytest.importorskip("pycocotools.coco", reason="pycocotools (a dev requirement) is not installed: "
                               "the cross-check against the reference implementation is skipped")
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco.COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(rows), iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


def as_predictions(rows: np.ndarray, image_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per image (every one of ``image_ids``, with or without rows): xyxy boxes, scores, labels."""
    predictions = {}
    for image_id in image_ids:
        mine = torch.from_numpy(rows[rows[:, 0] == image_id])
        predictions[image_id] = {"boxes": torch.cat([mine[:, 1:3], mine[:, 1:3] + mine[:, 3:5]], dim=1),
                                 "scores": mine[:, 5], "labels": mine[:, 6].long()}
    return predictions


@pytest.mark.parametrize("seen", ["all", "half"])
def test_the_12_stats_equal_pycocotools(eval_set, seen):
    gt, rows = eval_set
    image_ids = [image["id"] for image in gt["images"]]
    image_ids = image_ids if seen == "all" else image_ids[::2]
    evaluator = CocoEvaluator(coco_from_dict(gt), verbose=False)
    evaluator.update(as_predictions(rows, image_ids))
    evaluator.accumulate()
    ours = evaluator.summarize()
    stored = np.concatenate([evaluator.results[i] for i in sorted(evaluator.results)])
    theirs = pycocotools_stats(gt, stored, image_ids)
    assert 0.05 < ours[0] < 0.9 and -1 not in ours
    assert ours == pytest.approx(theirs, abs=1e-9, rel=0)


def test_the_project_needs_neither_pycocotools_nor_panopticapi():
    """Training, evaluation (boxes and PQ), prediction and the tools import neither reference package."""
    code = ("import sys; import main, engine, predict, pretrain_backbone, "
            "models.segmentation, datasets.synthetic, tools.benchmark_eval; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pycocotools', 'panopticapi')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
