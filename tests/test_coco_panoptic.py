"""COCO panoptic dataset (datasets/coco_panoptic.py), mask transforms and bad panoptic input."""
import json
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import main
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_panoptic import CocoPanoptic, build
from datasets.transforms import crop, hflip, resize
from util.errors import UserError


def panoptic_args(root, **overrides) -> Namespace:
    args = {"dataset_file": "coco_panoptic", "coco_path": root, "coco_panoptic_path": root, "eval_size": 48, "augment": "detr",
            "num_classes": None, "masks": True}
    args.update(overrides)
    return Namespace(**args)


def _ids(png_path) -> np.ndarray:
    rgb = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@pytest.fixture
def raw(synthetic_panoptic_root) -> CocoPanoptic:
    """The val split without transforms (PIL images, targets in pixels)."""
    args = panoptic_args(synthetic_panoptic_root)
    dataset = build("val", args)
    dataset.transforms = None
    return dataset


def test_targets_hold_every_segment_with_its_mask(raw):
    assert raw.num_classes == 10
    assert raw.is_thing_map == {**{i: True for i in range(1, 7)}, 7: False, 8: False, 9: False}
    for index, image_id in enumerate(raw.ids):
        image, target = raw[index]
        ann = raw.annotations[image_id]
        masks, boxes = target["masks"], target["boxes"]
        assert masks.shape == (len(ann["segments_info"]), image.height, image.width)
        assert target["labels"].tolist() == [s["category_id"] for s in ann["segments_info"]]
        ids = _ids(f"{raw.ann_folder}/{ann['file_name']}")
        for mask, box, segment in zip(masks, boxes, ann["segments_info"]):
            assert torch.equal(mask, torch.from_numpy(ids == segment["id"]))
            ys, xs = mask.nonzero(as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert masks.sum(0).eq(1).all(), "every pixel belongs to exactly one segment"


def test_box_ground_truth_covers_things_and_stuff(raw):
    coco = get_coco_api_from_dataset(raw)
    assert coco is raw.coco
    assert {c["id"] for c in coco.dataset["categories"]} == set(range(1, 10))
    assert len(coco.anns) == sum(len(a["segments_info"]) for a in raw.panoptic["annotations"])
    assert {a["category_id"] for a in coco.anns.values()} & {7, 8, 9}


def test_train_transforms_keep_masks_aligned_with_the_image(synthetic_panoptic_root):
    dataset = build_dataset("train", panoptic_args(synthetic_panoptic_root))
    torch.manual_seed(0)
    for index in range(6):
        image, target = dataset[index]
        assert target["masks"].shape == (len(target["labels"]), *image.shape[-2:])
        assert target["masks"].dtype == torch.bool


def test_masks_are_loaded_only_with_masks(synthetic_panoptic_root):
    dataset = build_dataset("val", panoptic_args(synthetic_panoptic_root, masks=False))
    assert "masks" not in dataset[0][1] and len(dataset[0][1]["labels"]) > 0


def test_detr_layout_png_folder_is_accepted(synthetic_panoptic_root, tmp_path):
    root = tmp_path / "detr_layout"
    shutil.copytree(synthetic_panoptic_root, root)
    (root / "annotations" / "panoptic_val2017").rename(root / "panoptic_val2017")
    dataset = build("val", panoptic_args(str(root)))
    assert dataset.ann_folder == str(root / "panoptic_val2017")
    assert "masks" in dataset[0][1]


def test_mask_transforms_follow_the_boxes():
    image = Image.new("RGB", (6, 4))
    masks = torch.zeros(1, 4, 6, dtype=torch.bool)
    masks[0, 1:3, 0:2] = True
    target = {"boxes": torch.tensor([[0.0, 1.0, 2.0, 3.0]]), "labels": torch.tensor([1]),
              "area": torch.tensor([4.0]), "iscrowd": torch.tensor([0]), "masks": masks}
    _, flipped = hflip(image, target)
    assert flipped["masks"][0, 1:3, 4:6].all() and flipped["masks"].sum() == 4
    _, cropped = crop(image, target, top=1, left=1, height=3, width=4)
    assert cropped["masks"].shape == (1, 3, 4) and cropped["masks"][0, 0:2, 0].all() and cropped["masks"].sum() == 2
    _, dropped = crop(image, target, top=0, left=3, height=4, width=3)   # the box leaves the crop
    assert dropped["masks"].shape == (0, 4, 3) and len(dropped["labels"]) == 0
    _, resized = resize(image, target, size=8)
    assert resized["masks"].shape == (1, 8, 12) and resized["masks"][0, 2:6, 0:4].all() and resized["masks"].sum() == 16


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def copy(synthetic_panoptic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_panoptic_root, root)
    return root


def _edit_json(root, edit):
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_png_is_named(copy):
    victim = sorted((copy / "annotations" / "panoptic_val2017").iterdir())[1]
    victim.unlink()
    with pytest.raises(UserError) as excinfo:
        build("val", panoptic_args(str(copy)))
    _one_line(excinfo, str(victim), "panoptic_val2017.json")


def test_segment_id_absent_from_the_png_is_named(copy):
    def add_ghost(data):
        data["annotations"][0]["segments_info"].append(
            {"id": 77, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0})
    path = _edit_json(copy, add_ghost)
    dataset = build("val", panoptic_args(str(copy)))
    with pytest.raises(UserError) as excinfo:
        dataset[0]
    png = copy / "annotations" / "panoptic_val2017" / dataset.annotations[dataset.ids[0]]["file_name"]
    _one_line(excinfo, str(png), "segment id 77", str(path))


def test_unknown_category_is_named(copy):
    def corrupt(data):
        data["annotations"][2]["segments_info"][0]["category_id"] = 42
    path = _edit_json(copy, corrupt)
    with pytest.raises(UserError) as excinfo:
        build("val", panoptic_args(str(copy)))
    _one_line(excinfo, str(path), "annotations[2] segments_info[0]", "unknown category_id 42")


@pytest.mark.parametrize("edit,needles", [
    (lambda d: d["categories"][0].pop("isthing"), ["categories[0]", "'isthing'"]),
    (lambda d: d["annotations"][1]["segments_info"][0].update(bbox=[1, 2]), ["segments_info[0]", "'bbox'"]),
    (lambda d: d["annotations"][0].update(image_id=999), ["annotations[0]", "image_id"]),
])
def test_bad_json_fields_are_named(copy, edit, needles):
    path = _edit_json(copy, edit)
    with pytest.raises(UserError) as excinfo:
        build("val", panoptic_args(str(copy)))
    _one_line(excinfo, str(path), *needles)


def test_class_count_too_small_is_named(synthetic_panoptic_root):
    with pytest.raises(UserError) as excinfo:
        build("val", panoptic_args(synthetic_panoptic_root, num_classes=7))
    _one_line(excinfo, "--num_classes 7", "panoptic_val2017.json")


def test_main_reports_bad_panoptic_input_in_one_line(copy, tmp_path, capsys):
    from conftest import TINY_FLAGS

    victim = sorted((copy / "annotations" / "panoptic_train2017").iterdir())[0]
    victim.unlink()
    flags = TINY_FLAGS + ["--dataset_file", "coco_panoptic", "--coco_path", str(copy), "--coco_panoptic_path",
                          str(copy), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    assert main.run(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(victim) in err[0]


@pytest.mark.parametrize("overrides,needle", [
    ({"masks": True}, "--dataset_file coco_panoptic"),
    ({"dataset_file": "coco_panoptic"}, "--coco_panoptic_path"),
])
def test_panoptic_flags_are_checked(synthetic_root, overrides, needle):
    args = Namespace(**{"dataset_file": "coco", "coco_path": synthetic_root, "coco_panoptic_path": None,
                        "eval_size": 48, "augment": "detr", "num_classes": None, "masks": False, **overrides})
    with pytest.raises(UserError, match=needle):
        build_dataset("val", args)
