"""COCO box evaluation (datasets/coco_eval.py)."""
from argparse import Namespace

import pytest
import torch

from datasets.coco import build, coco_from_dict
from datasets.coco_eval import STAT_NAMES, CocoEvaluator


@pytest.fixture(scope="module")
def coco_gt(synthetic_root):
    args = Namespace(coco_path=synthetic_root, eval_size=800, augment="detr", num_classes=None)
    return build("val", args).coco


def perfect_predictions(coco_gt):
    """Every ground-truth box as a detection (xyxy), with distinct descending scores."""
    predictions = {}
    for image_id in sorted(coco_gt.imgs):
        anns = coco_gt.imgToAnns[image_id]
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


def noisy_predictions(coco_gt):
    """Perfect boxes jittered, plus one spurious low-score detection per image."""
    generator = torch.Generator().manual_seed(0)
    predictions = perfect_predictions(coco_gt)
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


def test_perfect_predictions_give_ap_one(coco_gt):
    stats = evaluate(coco_gt, [perfect_predictions(coco_gt)])
    assert len(stats) == 12 and all(isinstance(s, float) for s in stats)
    assert stats[0] == pytest.approx(1.0)
    assert stats[1] == pytest.approx(1.0)
    assert stats[8] == pytest.approx(1.0)


def test_no_detections_give_zero(coco_gt):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0)}
    stats = evaluate(coco_gt, [{image_id: empty for image_id in coco_gt.imgs}])
    assert stats[0] == 0.0 and stats[1] == 0.0 and stats[8] == 0.0


def test_result_is_independent_of_batching_and_order(coco_gt):
    predictions = noisy_predictions(coco_gt)
    items = list(predictions.items())
    together = evaluate(coco_gt, [predictions])
    one_per_batch = evaluate(coco_gt, [dict([item]) for item in reversed(items)])
    uneven = evaluate(coco_gt, [dict(items[5:]), dict(items[:2]), dict(items[2:5])])
    assert 0.0 < together[0] < 1.0
    assert one_per_batch == together
    assert uneven == together


def test_only_images_seen_are_evaluated(coco_gt):
    predictions = perfect_predictions(coco_gt)
    first_half = dict(list(predictions.items())[:6])
    stats = evaluate(coco_gt, [first_half])
    assert stats[0] == pytest.approx(1.0), "unseen images must not count as missed objects"


def test_image_seen_twice_keeps_one_copy(coco_gt):
    predictions = perfect_predictions(coco_gt)
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


def test_summary_printing_can_be_silenced(coco_gt, capsys):
    evaluate(coco_gt, [perfect_predictions(coco_gt)])
    assert capsys.readouterr().out == ""
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(perfect_predictions(coco_gt))
    evaluator.accumulate()
    evaluator.summarize()
    assert "Average Precision" in capsys.readouterr().out
