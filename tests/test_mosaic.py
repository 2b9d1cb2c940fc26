"""Mosaic augmentation (datasets/mosaic.py) and its place in the training split (--mosaic)."""
import argparse
import math
import random

import pytest
import torch

import main
from datasets import build_dataset
from datasets.coco import CocoDetection
from datasets.mosaic import Mosaic, mosaic
from models.detr import build


def _item(value: float, height: int, width: int, boxes: list[list[float]], image_id: int = 0):
    """A constant image (after normalisation) and its target of cxcywh boxes in [0, 1]."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    area = boxes[:, 2] * width * boxes[:, 3] * height
    return torch.full((3, height, width), value), {
        "boxes": boxes, "labels": torch.full((len(boxes),), int(value), dtype=torch.int64), "area": area,
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64), "image_id": torch.tensor([image_id]),
        "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}


def _hand_made_items():
    return [_item(1.0, 8, 12, [[0.5, 0.5, 0.5, 0.5]], image_id=7),
            _item(2.0, 4, 6, [[0.25, 0.75, 0.5, 0.5]]),
            _item(3.0, 16, 8, [[0.5, 0.25, 1.0, 0.5], [0.75, 0.75, 0.5, 0.5]]),
            _item(4.0, 8, 12, [])]


def test_mosaic_pastes_each_item_in_its_quadrant_with_its_boxes_there():
    image, target = mosaic(_hand_made_items())
    assert image.shape == (3, 8, 12)
    for value, rows, columns in ((1, slice(0, 4), slice(0, 6)), (2, slice(0, 4), slice(6, 12)),
                                 (3, slice(4, 8), slice(0, 6)), (4, slice(4, 8), slice(6, 12))):
        assert torch.allclose(image[:, rows, columns], torch.tensor(float(value))), value
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25],       # item 0, top left
                             [0.625, 0.375, 0.25, 0.25],     # item 1, top right: ((0.25 + 1) / 2, 0.75 / 2)
                             [0.25, 0.625, 0.5, 0.25],       # item 2, bottom left
                             [0.375, 0.875, 0.25, 0.25]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 2, 3, 3]
    # every box centre lies on its own item's pixels
    for (cx, cy, _, _), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        assert image[0, int(cy * 8), int(cx * 12)].item() == pytest.approx(label)
    torch.testing.assert_close(target["area"], expected[:, 2] * 12 * expected[:, 3] * 8)
    assert target["image_id"].item() == 7 and target["size"].tolist() == [8, 12]


def test_mosaic_of_negatives_has_no_boxes():
    image, target = mosaic([_item(float(i), 8, 8, []) for i in range(4)])
    assert image.shape == (3, 8, 8)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_mosaic_refuses_mask_targets():
    items = _hand_made_items()
    items[0][1]["masks"] = torch.zeros(1, 8, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks"):
        mosaic(items)


class _Items:
    num_classes = 5

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_mosaic_dataset_tiles_the_item_and_three_seeded_draws():
    items = [_item(float(i), 8, 8, [[0.5, 0.5, 0.2, 0.2]]) for i in range(10)]
    dataset = Mosaic(_Items(items), probability=1.0)
    assert len(dataset) == 10 and dataset.num_classes == 5
    random.seed(3)
    image, target = dataset[6]
    random.seed(3)
    random.random()  # the draw that chose the mosaic
    drawn = [random.randrange(10) for _ in range(3)]
    assert target["labels"].tolist() == [6, *drawn]
    random.seed(3)
    assert torch.equal(dataset[6][0], image), "the same seed gives the same mosaic"


def test_mosaic_dataset_keeps_the_item_as_it_is_with_the_remaining_probability():
    items = [_item(float(i), 8, 8, [[0.5, 0.5, 0.2, 0.2]]) for i in range(4)]
    dataset = Mosaic(_Items(items), probability=0.5)
    random.seed(0)
    counts = [len(dataset[i % 4][1]["labels"]) for i in range(200)]
    assert set(counts) == {1, 4}
    assert 60 < counts.count(4) < 140


def _dataset_args(root: str, mosaic_probability: float) -> argparse.Namespace:
    return argparse.Namespace(dataset_file="coco", coco_path=root, eval_size=64, augment="flip", num_classes=None,
                              masks=False, mosaic=mosaic_probability)


def test_mosaic_off_builds_the_training_split_unchanged(synthetic_root):
    dataset = build_dataset("train", _dataset_args(synthetic_root, 0.0))
    assert type(dataset) is CocoDetection


def test_mosaic_wraps_the_training_split_only(synthetic_root):
    args = _dataset_args(synthetic_root, 0.5)
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert isinstance(train, Mosaic) and type(train.dataset) is CocoDetection
    assert type(val) is CocoDetection


def test_losses_of_a_mosaic_of_negatives_are_finite():
    torch.manual_seed(0)
    model, criterion, _ = build(main.parse_args([
        "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3", "--num_classes", "5",
        "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--num_queries", "6", "--unsample_abstract_number", "4", "--query_groups", "2", "--device", "cpu"]))
    negatives = [_item(0.1 * i, 64, 64, []) for i in range(4)]
    positives = [_item(0.1 * i, 64, 64, [[0.5, 0.5, 0.4, 0.4]]) for i in range(4)]
    samples, targets = zip(mosaic(negatives), mosaic(positives[:2] + negatives[:2]))
    losses = criterion(model.train()(list(samples), 0.5), list(targets))
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert math.isfinite(total.item())
