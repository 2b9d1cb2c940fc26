"""COCO-format dataset loading and its user errors (datasets/coco.py, datasets/__init__.py)."""
import json
import os
from argparse import Namespace

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

import datasets.transforms as T
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco import CocoDetection, build, num_classes_from_annotations
from util.errors import UserError


def write_dataset(root, images=None, annotations=None, categories=None, raw_json=None):
    """Write ``root/annotations/instances_val2017.json`` and one 40x30 PNG per image entry.

    Defaults: two images (id 1 with two objects and a crowd region, id 2 empty), categories 1
    and 3. Returns (image folder, annotation file).
    """
    img_folder = os.path.join(root, "val2017")
    os.makedirs(img_folder, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "height": 30, "width": 40},
                  {"id": 2, "file_name": "b.png", "height": 30, "width": 40}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5], "area": 40.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 10.5, 10.5], "area": 90.0, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64.0, "iscrowd": 1},
        ]
    if categories is None:
        categories = [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
    for image in images:
        if "file_name" in image:
            Image.new("RGB", (40, 30), (10, 20, 30)).save(os.path.join(img_folder, image["file_name"]))
    ann_file = os.path.join(root, "annotations", "instances_val2017.json")
    with open(ann_file, "w") as f:
        if raw_json is None:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        else:
            f.write(raw_json)
    return img_folder, ann_file


def dataset_args(coco_path, **overrides):
    args = {"dataset_file": "coco", "coco_path": coco_path, "eval_size": 800, "augment": "detr",
            "num_classes": None, "train_images": None, "train_annotations": None, "val_images": None,
            "val_annotations": None}
    args.update(overrides)
    return Namespace(**args)


def assert_one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"


def test_sample_image_and_target(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    dataset = CocoDetection(img_folder, ann_file, T.ToTensor())
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert set(target) == {"boxes", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
    assert torch.equal(target["image_id"], torch.tensor([1]))
    assert torch.equal(target["labels"], torch.tensor([3, 1]))
    # xywh -> xyxy, and the second box (0.5 px over the edges of the 40x30 image) is clipped to it
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [30, 20, 40, 30]]))
    assert torch.equal(target["area"], torch.tensor([40.0, 90.0]))
    assert torch.equal(target["iscrowd"], torch.tensor([0, 0]))
    assert torch.equal(target["orig_size"], torch.tensor([30, 40]))
    assert torch.equal(target["size"], torch.tensor([30, 40]))


def test_image_without_objects_is_a_sample(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    dataset = CocoDetection(img_folder, ann_file, T.ToTensor())
    _, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_degenerate_boxes_are_dropped(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40.5, 5, 0.5, 10]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
    ]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    _, target = CocoDetection(img_folder, ann_file, T.ToTensor())[0]
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 5, 15, 15]]))
    assert torch.equal(target["area"], torch.tensor([100.0]))  # missing area = box area


def test_pil_image_is_rgb_without_transforms(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    Image.new("L", (40, 30), 7).save(os.path.join(img_folder, "a.png"))
    image, _ = CocoDetection(img_folder, ann_file, None)[0]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (7, 7, 7)


def test_num_classes_is_max_category_id_plus_one(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    assert num_classes_from_annotations(ann_file) == 4
    assert CocoDetection(img_folder, ann_file, None).num_classes == 4
    assert CocoDetection(img_folder, ann_file, None, num_classes=10).num_classes == 10


def test_build_uses_coco_layout_and_eval_size(synthetic_root):
    dataset = build("val", dataset_args(synthetic_root, eval_size=64))
    image, target = dataset[0]
    assert len(dataset) == 12 and dataset.num_classes == 7
    assert min(image.shape[1:]) == 64
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_build_dataset_dispatches_on_dataset_file(synthetic_root):
    dataset = build_dataset("train", dataset_args(synthetic_root))
    assert isinstance(dataset, CocoDetection) and len(dataset) == 24


def test_get_coco_api_unwraps_subsets(synthetic_root):
    dataset = build("val", dataset_args(synthetic_root))
    nested = Subset(Subset(dataset, [0, 1, 2]), [0])
    assert get_coco_api_from_dataset(nested) is dataset.coco


def test_box_within_one_pixel_outside_is_clipped(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-0.8, -1.0, 10, 10]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    _, target = CocoDetection(img_folder, ann_file, T.ToTensor())[0]
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 0.0, 9.2, 9.0]]))


def test_split_flags_replace_coco_path(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path / "anywhere"))
    dataset = build("train", dataset_args(None, train_images=img_folder, train_annotations=ann_file))
    assert dataset.img_folder == img_folder and dataset.ann_file == ann_file


def test_coco_path_gives_the_split_without_flags(synthetic_root, tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    dataset = build("train", dataset_args(synthetic_root, val_images=img_folder, val_annotations=ann_file))
    assert dataset.img_folder == os.path.join(synthetic_root, "train2017")


# ----------------------------------------------------------------------------- user errors
def test_unknown_dataset_file(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build_dataset("val", dataset_args(str(tmp_path), dataset_file="voc"))
    assert_one_line_error(excinfo, "--dataset_file", "voc")


def test_coco_path_not_a_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(str(missing)))
    assert_one_line_error(excinfo, "--coco_path", missing)


def test_annotation_file_missing(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(str(tmp_path)))
    assert_one_line_error(excinfo, os.path.join(str(tmp_path), "annotations", "instances_val2017.json"))


@pytest.mark.parametrize("raw_json,needles", [
    ('{"images": [\n  {"id": 1,,}\n', ["not valid JSON", "line 2"]),  # malformed
    ("[1, 2]", ["images"]),  # not an object
    ("", ["empty (0 bytes)", "'images'"]),
    ("{}", ["no list 'images'"]),
])
def test_unusable_annotation_file_is_named_in_one_line(tmp_path, raw_json, needles):
    img_folder, ann_file = write_dataset(str(tmp_path), raw_json=raw_json)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, *needles)


def test_image_entry_missing_field(tmp_path):
    images = [{"id": 1, "height": 30, "width": 40}]
    img_folder, ann_file = write_dataset(str(tmp_path), images=images, annotations=[])
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "images[0]", "'file_name'")


def test_annotation_entry_missing_field(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "'bbox'")


def test_annotation_with_bad_bbox(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "'bbox'")


def test_annotation_of_unknown_image(tmp_path):
    annotations = [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "'image_id'")


def test_image_file_missing(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    os.remove(os.path.join(img_folder, "b.png"))
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, os.path.join(img_folder, "b.png"), ann_file)


def test_corrupt_image_fails_at_load_time(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    path = os.path.join(img_folder, "a.png")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    dataset = CocoDetection(img_folder, ann_file, None)
    with pytest.raises(UserError) as excinfo:
        dataset[0]
    assert_one_line_error(excinfo, path)


def test_category_id_too_large_for_num_classes(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None, num_classes=3)
    assert_one_line_error(excinfo, ann_file, "category id 3", "--num_classes")


def test_negative_category_id(tmp_path):
    categories = [{"id": -1}, {"id": 1}]
    img_folder, ann_file = write_dataset(str(tmp_path), categories=categories)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "category id -1", "--num_classes")


def test_coco_path_or_split_flags_required():
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(None))
    assert_one_line_error(excinfo, "--coco_path", "--val_images", "--val_annotations")


def test_half_given_split_pair(tmp_path):
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(None, train_images=str(tmp_path)))
    assert_one_line_error(excinfo, "--train_images", "needs --train_annotations")


def test_split_images_folder_missing(tmp_path):
    _, ann_file = write_dataset(str(tmp_path))
    missing = tmp_path / "no_images"
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(None, val_images=str(missing), val_annotations=ann_file))
    assert_one_line_error(excinfo, "--val_images", missing, "not a folder")


def test_split_annotations_file_missing(tmp_path):
    img_folder, _ = write_dataset(str(tmp_path))
    missing = tmp_path / "val.json"
    with pytest.raises(UserError) as excinfo:
        build("val", dataset_args(None, val_images=img_folder, val_annotations=str(missing)))
    assert_one_line_error(excinfo, "--val_annotations", missing, "not a file")


def test_split_flags_refused_for_coco_panoptic(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path))
    args = dataset_args(None, dataset_file="coco_panoptic", val_images=img_folder, val_annotations=ann_file)
    with pytest.raises(UserError) as excinfo:
        build_dataset("val", args)
    assert_one_line_error(excinfo, "--val_images", "--dataset_file coco")


def test_annotation_file_with_empty_images(tmp_path):
    img_folder, ann_file = write_dataset(str(tmp_path), images=[], annotations=[])
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "'images' is empty")


def test_category_id_given_as_string(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": "3", "bbox": [1, 2, 3, 4]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "'category_id'", "an integer", "'3'")


def test_image_id_given_as_float(tmp_path):
    annotations = [{"id": 1, "image_id": 2.5, "category_id": 1, "bbox": [1, 2, 3, 4]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "'image_id'", "an integer", "2.5")


def test_image_width_not_a_number(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 30, "width": "40"}]
    img_folder, ann_file = write_dataset(str(tmp_path), images=images, annotations=[])
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "images[0]", "'width'", "positive number")


def test_box_beyond_the_image_edge(tmp_path):
    annotations = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 3, 3]},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 12, 5]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[1]", "[30, 20, 12, 5]", "40x30")


def test_box_with_negative_corner(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, -2, 3, 3]}]
    img_folder, ann_file = write_dataset(str(tmp_path), annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "[5, -2, 3, 3]", "outside")


def test_box_checked_against_the_image_file_without_json_size(tmp_path):
    images = [{"id": 1, "file_name": "a.png"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 32]}]
    img_folder, ann_file = write_dataset(str(tmp_path), images=images, annotations=annotations)
    with pytest.raises(UserError) as excinfo:
        CocoDetection(img_folder, ann_file, None)
    assert_one_line_error(excinfo, ann_file, "annotations[0]", "40x30")
