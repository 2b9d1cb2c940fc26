"""Joint image/target transforms (datasets/transforms.py)."""
import random

import pytest
import torch
from PIL import Image

import datasets.transforms as T
from util.errors import UserError


def make_sample(width=64, height=48, boxes=((4, 6, 20, 30), (30, 10, 60, 40))):
    """A PIL image whose left half is black and right half white, and a raw target."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (width // 2, 0, width, height))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    size = torch.tensor([height, width])
    target = {
        "boxes": boxes,
        "labels": torch.arange(1, len(boxes) + 1),
        "image_id": torch.tensor([7]),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        "orig_size": size,
        "size": size.clone(),
    }
    return image, target


def test_hflip_mirrors_image_and_boxes():
    image, target = make_sample()
    flipped, out = T.RandomHorizontalFlip(p=1.0)(image, target)
    assert flipped.getpixel((0, 0)) == (255, 255, 255)
    assert flipped.getpixel((63, 0)) == (0, 0, 0)
    assert torch.equal(out["boxes"], torch.tensor([[44.0, 6, 60, 30], [4, 10, 34, 40]]))
    assert torch.equal(target["boxes"][0], torch.tensor([4.0, 6, 20, 30])), "input target was modified"


def test_resized_hw_follows_published_rule():
    assert T.resized_hw(480, 640, 800, 1333) == (800, 1066)
    assert T.resized_hw(640, 480, 800, 1333) == (1066, 800)
    assert T.resized_hw(500, 2000, 800, 1333) == (333, 1332)  # longer side capped
    assert T.resized_hw(800, 1000, 800, 1333) == (800, 1000)  # already at size


def test_resize_scales_boxes_area_and_size():
    image, target = make_sample(width=64, height=48)
    resized, out = T.RandomResize([96])(image, target)
    assert resized.size == (128, 96)
    assert torch.equal(out["size"], torch.tensor([96, 128]))
    assert torch.equal(out["orig_size"], torch.tensor([48, 64]))
    assert torch.allclose(out["boxes"], target["boxes"] * 2)
    assert torch.allclose(out["area"], target["area"] * 4)


def test_crop_shifts_clips_and_drops_boxes():
    image, target = make_sample(boxes=((4, 6, 20, 30), (30, 10, 60, 40), (0, 0, 5, 5)))
    cropped, out = T.crop(image, target, top=8, left=10, height=30, width=40)
    assert cropped.size == (40, 30)
    # box 0 -> clipped at the left/top edge, box 1 -> clipped right/bottom, box 2 -> outside
    assert torch.equal(out["boxes"], torch.tensor([[0.0, 0, 10, 22], [20, 2, 40, 30]]))
    assert torch.equal(out["labels"], torch.tensor([1, 2]))
    assert torch.equal(out["area"], torch.tensor([220.0, 560.0]))
    assert torch.equal(out["size"], torch.tensor([30, 40]))


def test_clip_boxes_drops_degenerate_boxes():
    _, target = make_sample(boxes=((10, 10, 10, 30), (5, 5, 5, 5), (-5, -5, 200, 20), (70, 0, 90, 9)))
    out = T.clip_boxes(target, height=48, width=64)
    assert torch.equal(out["boxes"], torch.tensor([[0.0, 0, 64, 20]]))
    assert torch.equal(out["labels"], torch.tensor([3]))
    assert out["area"].shape == out["iscrowd"].shape == (1,)


def test_random_size_crop_handles_images_smaller_than_min_size():
    random.seed(0)
    image, target = make_sample(width=30, height=20)
    cropped, out = T.RandomSizeCrop(384, 600)(image, target)
    assert cropped.size == (30, 20)
    assert torch.equal(out["size"], torch.tensor([20, 30]))


def test_random_size_crop_stays_in_range():
    random.seed(1)
    image, target = make_sample(width=64, height=48)
    for _ in range(20):
        cropped, out = T.RandomSizeCrop(16, 40)(image, target)
        assert 16 <= cropped.width <= 40 and 16 <= cropped.height <= 40
        assert (out["boxes"][:, 2:] <= torch.tensor([cropped.width, cropped.height])).all()


def test_random_select_uses_probability():
    def first(image, target):
        return "first", target

    def second(image, target):
        return "second", target

    assert T.RandomSelect(first, second, p=1.0)(None, {})[0] == "first"
    assert T.RandomSelect(first, second, p=0.0)(None, {})[0] == "second"


def test_to_tensor_and_normalize():
    image, target = make_sample(width=64, height=48)
    tensor, out = T.Compose([T.ToTensor(), T.Normalize()])(image, target)
    assert tensor.shape == (3, 48, 64) and tensor.dtype == torch.float32
    expected_black = -torch.tensor(T.IMAGENET_MEAN) / torch.tensor(T.IMAGENET_STD)
    assert torch.allclose(tensor[:, 0, 0], expected_black)
    # box (4, 6, 20, 30) -> centre (12, 18), size (16, 24), divided by (64, 48)
    assert torch.allclose(out["boxes"][0], torch.tensor([12 / 64, 18 / 48, 16 / 64, 24 / 48]))


def test_empty_target_passes_every_transform():
    random.seed(0)
    image, target = make_sample(width=120, height=90, boxes=())
    transform = T.make_coco_transforms("train", eval_size=160)
    for _ in range(5):
        tensor, out = transform(image, target)
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_published_recipe_at_eval_size_800():
    train = T.make_coco_transforms("train")
    flip, select, _ = train.transforms
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert select.p == 0.5
    assert select.first.sizes == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert select.first.max_size == 1333
    pre_resize, crop, multi_scale = select.second.transforms
    assert pre_resize.sizes == [400, 500, 600] and pre_resize.max_size is None
    assert (crop.min_size, crop.max_size) == (384, 600)
    assert multi_scale.sizes == select.first.sizes and multi_scale.max_size == 1333
    val_resize = T.make_coco_transforms("val").transforms[0]
    assert val_resize.sizes == [800] and val_resize.max_size == 1333


def test_recipe_scales_with_eval_size():
    select = T.make_coco_transforms("train", eval_size=160).transforms[1]
    assert select.first.sizes == [96, 102, 109, 115, 122, 128, 134, 141, 147, 154, 160]
    assert select.first.max_size == 267
    pre_resize, crop, _ = select.second.transforms
    assert pre_resize.sizes == [80, 100, 120]
    assert (crop.min_size, crop.max_size) == (77, 120)
    val_resize = T.make_coco_transforms("val", eval_size=160).transforms[0]
    assert val_resize.sizes == [160] and val_resize.max_size == 267


def test_val_transform_output():
    image, target = make_sample(width=64, height=48)
    tensor, out = T.make_coco_transforms("val", eval_size=96)(image, target)
    assert tensor.shape == (3, 96, 128)
    assert torch.equal(out["size"], torch.tensor([96, 128]))


def test_train_transform_keeps_boxes_valid():
    random.seed(3)
    image, target = make_sample(width=120, height=90, boxes=((0, 0, 120, 90), (50, 40, 52, 41)))
    transform = T.make_coco_transforms("train", eval_size=160)
    for _ in range(30):
        tensor, out = transform(image, target)
        boxes = out["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > 0).all()
        assert torch.equal(out["size"], torch.tensor(tensor.shape[1:]))
        assert max(tensor.shape[1:]) <= 267


@pytest.mark.parametrize("eval_size", [0, -800, 1.5, True])
def test_bad_eval_size_is_a_user_error(eval_size):
    with pytest.raises(UserError, match="--eval_size"):
        T.make_coco_transforms("val", eval_size=eval_size)


def test_flip_augment_trains_at_the_eval_size_without_crops():
    image, target = make_sample(width=150, height=100, boxes=((10, 10, 50, 40),))
    transform = T.make_coco_transforms("train", eval_size=80, augment="flip")
    sizes = set()
    for _ in range(10):
        tensor, out = transform(image, target)
        sizes.add(tuple(tensor.shape[-2:]))
        assert out["boxes"].shape == (1, 4)
    assert sizes == {(80, 120)}


def test_unknown_augment_is_a_user_error():
    with pytest.raises(UserError, match="--augment"):
        T.make_coco_transforms("train", eval_size=80, augment="mosaic")
