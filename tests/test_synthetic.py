"""Synthetic shapes dataset generator (datasets/synthetic.py)."""
import contextlib
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets.coco_eval import COCO
from datasets.synthetic import (BAND, CATEGORIES, CHECKER, CLASSIFICATION_MAX_REL_SIZE, CLASSIFICATION_MIN_REL_SIZE,
                                GRADIENT, STUFF_CATEGORIES, Layout, annotation, generate, generate_classification,
                                main, render_classification_image, render_image, render_stuff)


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
    return COCO(os.path.join(root, "annotations", f"instances_{split}2017.json"))


def image_annotations(coco, image_id):
    return coco.loadAnns(coco.getAnnIds(imgIds=image_id))


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
    assert any(not image_annotations(coco, image_id) for image_id in coco.imgs)


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


def test_layout_flags_bound_object_counts_and_sizes(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num_train", "30", "--num_val", "0", "--image_size", "64",
          "--max_objects", "2", "--min_size", "0.4", "--max_size", "0.5"])
    with open(tmp_path / "annotations" / "instances_train2017.json") as f:
        data = json.load(f)
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=31)[1:]
    assert counts.max() == 2 and (counts == 0).any()
    assert data["info"]["max_objects"] == 2 and data["info"]["min_size"] == 0.4
    sizes = {i["id"]: min(i["width"], i["height"]) for i in data["images"]}
    # A visible box is at most the rotated outline (size x sqrt(2)); an unoccluded one is at
    # least the ring's or cross's full extent along one axis (size x cos(20 deg)).
    longest = [max(a["bbox"][2:]) / sizes[a["image_id"]] for a in data["annotations"]]
    assert max(longest) <= 0.5 * 2 ** 0.5 + 0.05
    assert np.median(longest) >= 0.4 * 0.9


@pytest.mark.parametrize("flags, name", [(["--max_objects", "-1"], "--max_objects"),
                                         (["--min_size", "0.5", "--max_size", "0.4"], "--min_size/--max_size"),
                                         (["--max_size", "1.5"], "--min_size/--max_size")])
def test_bad_layout_is_rejected(tmp_path, capsys, flags, name):
    with pytest.raises(SystemExit) as excinfo:
        main(["--out", str(tmp_path)] + flags)
    assert excinfo.value.code == 2
    assert name in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "annotations")


# ----------------------------------------------------------------------------- panoptic
def _pixels_and_json_digest(root):
    """sha256 over the decoded pixels of every PNG and the bytes of every other file."""
    digest = hashlib.sha256()
    for name, data in sorted(all_files(root).items()):
        digest.update(name.encode())
        digest.update(np.asarray(Image.open(io.BytesIO(data))).tobytes() if name.endswith(".png") else data)
    return digest.hexdigest()


def test_detection_output_is_unchanged_by_the_panoptic_extension(tmp_path):
    # Digest of the detection output at these flags, recorded when the defaults became 0-4 shapes
    # of 15-60% of the side: later changes (stuff, panoptic) must leave it byte for byte.
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path), num_train=3, num_val=1, image_size=40, seed=5)
    assert _pixels_and_json_digest(str(tmp_path)) == "a0c8753a12a4a47bbc591526ddcef3416e9d4017b586cd69f9a7e59dd8f5cd26"


def test_files_do_not_depend_on_the_number_of_processes(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path / "one"), num_train=5, num_val=2, image_size=40, seed=7, panoptic=True, jobs=1)
        generate(str(tmp_path / "two"), num_train=5, num_val=2, image_size=40, seed=7, panoptic=True, jobs=2)
        generate_classification(str(tmp_path / "cls_one"), num_train=7, num_val=6, image_size=40, jobs=1)
        generate_classification(str(tmp_path / "cls_two"), num_train=7, num_val=6, image_size=40, jobs=2)
    assert all_files(str(tmp_path / "one")) == all_files(str(tmp_path / "two"))
    assert all_files(str(tmp_path / "cls_one")) == all_files(str(tmp_path / "cls_two"))
    with open(tmp_path / "two" / "annotations" / "instances_train2017.json") as f:
        ids = [ann["id"] for ann in json.load(f)["annotations"]]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 1


def test_bad_jobs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--out", str(tmp_path), "--jobs", "0"])
    assert excinfo.value.code == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "annotations")


def _panoptic(root, split):
    with open(os.path.join(root, "annotations", f"panoptic_{split}2017.json")) as f:
        return json.load(f)


def _ids(root, split, file_name):
    with Image.open(os.path.join(root, "annotations", f"panoptic_{split}2017", file_name)) as png:
        assert png.mode == "RGB"
        rgb = np.asarray(png, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_panoptic_pngs_match_their_segments(synthetic_panoptic_root):
    for split in ("train", "val"):
        data = _panoptic(synthetic_panoptic_root, split)
        images = {image["id"]: image for image in data["images"]}
        for ann in data["annotations"]:
            ids = _ids(synthetic_panoptic_root, split, ann["file_name"])
            image = images[ann["image_id"]]
            assert ids.shape == (image["height"], image["width"])
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert set(np.unique(ids).tolist()) == set(segments), "no void pixel, no unlisted id"
            for segment_id, segment in segments.items():
                mask = ids == segment_id
                assert segment["area"] == mask.sum() and segment["iscrowd"] == 0
                assert segment["bbox"] == annotation(mask, 0, 0, 0)["bbox"]


def test_panoptic_things_are_the_detection_objects(synthetic_panoptic_root):
    coco = load(synthetic_panoptic_root, "train")
    data = _panoptic(synthetic_panoptic_root, "train")
    categories = {c["id"]: c for c in data["categories"]}
    assert [c["name"] for c in data["categories"]] == CATEGORIES + STUFF_CATEGORIES
    assert [c["isthing"] for c in data["categories"]] == [1] * 6 + [0] * 3
    used_stuff = set()
    for ann in data["annotations"]:
        things = [s for s in ann["segments_info"] if categories[s["category_id"]]["isthing"]]
        objects = image_annotations(coco, ann["image_id"])
        assert [(s["category_id"], s["bbox"], s["area"]) for s in things] == \
            [(o["category_id"], o["bbox"], o["area"]) for o in objects]
        used_stuff |= {s["category_id"] for s in ann["segments_info"]} - set(range(1, 7))
    assert used_stuff == {7, 8, 9}


def test_panoptic_keeps_the_shapes_and_is_deterministic(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(tmp_path / "plain"), num_train=4, num_val=1, image_size=48, seed=3)
        generate(str(tmp_path / "a"), num_train=4, num_val=1, image_size=48, seed=3, panoptic=True)
        generate(str(tmp_path / "b"), num_train=4, num_val=1, image_size=48, seed=3, panoptic=True)
    plain, a = all_files(str(tmp_path / "plain")), all_files(str(tmp_path / "a"))
    assert all_files(str(tmp_path / "b")) == a
    assert a["annotations/instances_train2017.json"] == plain["annotations/instances_train2017.json"]
    assert a["train2017/000000000001.png"] != plain["train2017/000000000001.png"]  # stuff is painted


def test_render_stuff_paints_a_band_and_a_checkered_patch():
    for seed in range(20):
        image = np.zeros((40, 50, 3))
        stuff = render_stuff(np.random.default_rng(seed), image)
        for category_id in np.unique(stuff):
            assert category_id in (GRADIENT, BAND, CHECKER)
        assert ((stuff == GRADIENT) == (image == 0).all(-1)).all()
        if (stuff == BAND).any():
            band_colours = np.unique(image[stuff == BAND], axis=0)
            assert len(band_colours) == 1, "a band is one flat colour"
        if (stuff == CHECKER).any():
            assert len(np.unique(image[stuff == CHECKER], axis=0)) == 2, "a checker has two colours"


def test_command_line_panoptic(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num_train", "1", "--num_val", "1", "--image_size", "32", "--panoptic"])
    assert "3 stuff classes" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "annotations" / "panoptic_val2017.json")
    assert os.path.isfile(tmp_path / "annotations" / "panoptic_val2017" / "000000000001.png")


# ----------------------------------------------------------------------------- classification
def test_classification_layout_is_an_image_folder_of_balanced_square_images(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        generate_classification(str(tmp_path), num_train=13, num_val=6, image_size=40, seed=0)
    for split, count in (("train", 13), ("val", 6)):
        assert sorted(os.listdir(tmp_path / split)) == sorted(CATEGORIES)
        per_class = [len(os.listdir(tmp_path / split / name)) for name in CATEGORIES]
        assert sum(per_class) == count and max(per_class) - min(per_class) <= 1
        for name in CATEGORIES:
            for file_name in os.listdir(tmp_path / split / name):
                with Image.open(tmp_path / split / name / file_name) as png:
                    assert png.mode == "RGB" and png.size == (40, 40)
    assert sorted(os.listdir(tmp_path)) == ["train", "val"]


def test_classification_output_is_deterministic(tmp_path):
    # Digest recorded when the shapes became light on dimmed clutter: the same flags must keep giving
    # these files, byte for byte in their pixels.
    with contextlib.redirect_stdout(io.StringIO()):
        generate_classification(str(tmp_path / "a"), num_train=6, num_val=6, image_size=40, seed=5)
        generate_classification(str(tmp_path / "b"), num_train=6, num_val=6, image_size=40, seed=5)
        generate_classification(str(tmp_path / "c"), num_train=6, num_val=6, image_size=40, seed=6)
    assert all_files(str(tmp_path / "a")) == all_files(str(tmp_path / "b"))
    assert all_files(str(tmp_path / "a")) != all_files(str(tmp_path / "c"))
    assert _pixels_and_json_digest(str(tmp_path / "a")) == "12e5c59a6c257c9b084c72991e23c0e57fd65e6955abf4d6a75bdb8d3312cb96"


def test_classification_shape_is_small_light_and_one_colour_among_dimmed_clutter():
    layout = Layout(1, CLASSIFICATION_MIN_REL_SIZE, CLASSIFICATION_MAX_REL_SIZE)
    fractions = []
    for index in range(30):
        category = index % len(CATEGORIES) + 1
        pixels, mask = render_classification_image(np.random.default_rng(index), np.random.default_rng([index, 1]),
                                                   category, 64, layout)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8 and mask.shape == (64, 64)
        fractions.append(mask.mean())
        # the shape is one flat colour under the pixel noise; the clutter around it is not
        assert pixels[mask].std(axis=0).max() < 3 * 6.0
        assert pixels[~mask].std(axis=0).max() > 2 * 6.0
        # the shape is lighter than almost all the (dimmed) clutter, in every channel
        assert np.all(pixels[mask].mean(axis=0) > np.percentile(pixels[~mask], 99, axis=0))
    assert 0.01 < min(fractions) and max(fractions) < 0.15, "most of each image is clutter"


def test_classification_command_line(tmp_path, capsys):
    main(["--classification", "--out", str(tmp_path), "--num_train", "6", "--num_val", "6"])
    assert "6 train / 6 val images of 64x64, 6 classes" in capsys.readouterr().out
    with Image.open(tmp_path / "val" / "circle" / "000000.png") as png:
        assert png.size == (64, 64)


@pytest.mark.parametrize("flags, message", [(["--panoptic"], "--panoptic does not apply to --classification"),
                                            (["--max_objects", "2"], "--max_objects does not apply"),
                                            (["--num_train", "5"], "--num_train/--num_val must be >= 6"),
                                            (["--min_size", "0"], "--min_size/--max_size")])
def test_classification_bad_flags_are_rejected(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as excinfo:
        main(["--classification", "--out", str(tmp_path / "out")] + flags)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
