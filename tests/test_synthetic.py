"""Synthetic shapes dataset generator (datasets/synthetic.py)."""
import contextlib
import io
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasets.synthetic import CATEGORIES, annotation, generate, main, render_image


def all_files(root):
    """Relative path -> bytes of every file under ``root``."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def load(root, split):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(os.path.join(root, "annotations", f"instances_{split}2017.json"))


def test_coco_layout(synthetic_root, synthetic_params):
    names = set(all_files(synthetic_root))
    assert "annotations/instances_train2017.json" in names
    assert "annotations/instances_val2017.json" in names
    for split in ("train", "val"):
        pngs = [n for n in names if n.startswith(f"{split}2017/") and n.endswith(".png")]
        assert len(pngs) == synthetic_params[f"num_{split}"]


def test_same_seed_gives_identical_files(synthetic_root, synthetic_params, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path), **synthetic_params)
    assert all_files(str(tmp_path)) == all_files(synthetic_root)


def test_other_seed_gives_other_images(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path / "a"), num_train=2, num_val=0, image_size=48, seed=1)
        generate(str(tmp_path / "b"), num_train=2, num_val=0, image_size=48, seed=2)
    first = all_files(str(tmp_path / "a"))["train2017/000000000001.png"]
    second = all_files(str(tmp_path / "b"))["train2017/000000000001.png"]
    assert first != second


def test_json_matches_png_files(synthetic_root):
    coco = load(synthetic_root, "train")
    for image in coco.imgs.values():
        with Image.open(os.path.join(synthetic_root, "train2017", image["file_name"])) as png:
            assert png.mode == "RGB"
            assert png.size == (image["width"], image["height"])


def test_image_sizes_vary_within_range(synthetic_root, synthetic_params):
    coco = load(synthetic_root, "train")
    sides = {(i["width"], i["height"]) for i in coco.imgs.values()}
    size = synthetic_params["image_size"]
    assert len(sides) > 1
    assert all(0.75 * size - 1 <= s <= size for side in sides for s in side)


def test_boxes_are_inside_images_and_areas_fit(synthetic_root):
    coco = load(synthetic_root, "train")
    assert len(coco.anns) > 0
    for ann in coco.anns.values():
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0 and len(ann["segmentation"][0]) >= 6


def test_empty_images_exist(synthetic_root):
    coco = load(synthetic_root, "train")
    assert any(not coco.imgToAnns[image_id] for image_id in coco.imgs)


def test_several_classes_present(synthetic_root):
    coco = load(synthetic_root, "train")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
    assert all(c["supercategory"] == "shape" for c in coco.cats.values())
    used = {ann["category_id"] for ann in coco.anns.values()}
    assert len(used) >= 4 and used <= set(range(1, len(CATEGORIES) + 1))


def test_annotation_box_is_tight_around_the_mask():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    mask[7, 4] = True
    ann = annotation(mask, ann_id=3, image_id=2, category_id=5)
    assert ann["bbox"] == [3, 2, 6, 6]
    assert ann["area"] == 19.0
    assert (ann["id"], ann["image_id"], ann["category_id"]) == (3, 2, 5)


def test_rendered_objects_stay_visible():
    rng = np.random.default_rng(0)
    for _ in range(40):
        pixels, objects = render_image(rng, image_size=48)
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        for _, mask in objects:
            assert mask.shape == pixels.shape[:2]
            assert mask.any(), "an object was hidden completely"


def test_command_line_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    assert "COCO" in capsys.readouterr().out
    main(["--out", str(tmp_path), "--num_train", "1", "--num_val", "1", "--image_size", "32"])
    assert "1 train / 1 val images" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "val2017" / "000000000001.png")


def test_bad_image_size_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--out", str(tmp_path), "--image_size", "8"])
    assert excinfo.value.code == 2
    assert "--image_size" in capsys.readouterr().err
