"""NEON tree-crown converter (datasets/neon_trees.py), on a fake deepforest wheel: nothing is downloaded."""
import contextlib
import io
import json
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import main
from conftest import assert_one_line_error
from datasets import build_dataset, neon_trees
from datasets.neon_trees import TRAIN_SOURCE, VAL_SOURCE, run
from util import files

TILE, STRIDE = 32, 16
TRAIN_SIZE = (100, 80)  # tile columns at 0, 16, ..., 64 and 68 (flush with the edge); rows at 0, 16, 32, 48
# A 6 x 6 box every 10 pixels: every training tile holds some.
TRAIN_BOXES = [(x, y, x + 6, y + 6) for x in range(2, 94, 10) for y in range(2, 74, 10)]
VAL_SIZE = (100, 64)  # tiles at x 0, 32, 64 (the last 4 columns left out) and y 0, 32
VAL_BOXES = [
    (24, 4, 40, 12),   # exactly half in tile (0, 0), half in tile (32, 0): kept in both, clipped
    (22, 40, 40, 48),  # 10 of 18 columns in tile (0, 32): kept, clipped; 8 of 18 in tile (32, 32): dropped
    (50, 50, 58, 58),  # inside tile (32, 32)
    (96, 20, 100, 28),  # in the 4 columns left out: in no tile
]  # tiles (64, 0) and (64, 32) hold no box
# The val json's boxes ([x, y, w, h] in tile pixels) by tile origin.
VAL_EXPECTED = {(0, 0): [[24, 4, 8, 8]], (32, 0): [[0, 4, 8, 8]], (0, 32): [[22, 8, 10, 8]],
                (32, 32): [[18, 18, 8, 8]]}


def voc_xml(name: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> str:
    """A Pascal-VOC annotation as the deepforest wheel writes it, every object a "Tree"."""
    objects = "".join(
        f"<object><name>Tree</name><pose>Unspecified</pose><truncated>0</truncated><occluded>0</occluded>"
        f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        f"</bndbox></object>" for x0, y0, x1, y1 in boxes)
    return (f"<annotation><folder>data</folder><filename>{name}.png</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>")


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def sources() -> dict[str, tuple[Image.Image, list]]:
    """The fake wheel's two source images and boxes, by stem."""
    return {TRAIN_SOURCE: (noise(TRAIN_SIZE, 0), TRAIN_BOXES), VAL_SOURCE: (noise(VAL_SIZE, 1), VAL_BOXES)}


def write_wheel(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def fake_wheel(path) -> str:
    """A zip with the two deepforest/data images (PNG) and their VOC xml, plus an unrelated member."""
    members = {"deepforest/__init__.py": b""}
    for stem, (image, boxes) in sources().items():
        png = path.parent / f"{stem}.png"
        image.save(png)
        members[f"deepforest/data/{stem}.png"] = png.read_bytes()
        members[f"deepforest/data/{stem}.xml"] = voc_xml(stem, image.size, boxes).encode()
    return write_wheel(path, members)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fake wheel converted with 32-px tiles every 16 px: its output folder and printed summary."""
    folder = tmp_path_factory.mktemp("neon")
    wheel = fake_wheel(folder / "deepforest-2.1.0-py3-none-any.whl")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(["--out", str(folder / "out"), "--wheel", wheel, "--tile", str(TILE),
                    "--stride", str(STRIDE)]) == 0
    return folder / "out", printed.getvalue().splitlines()


def load(root, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def origin(file_name: str) -> tuple[str, int, int]:
    """Source stem and tile corner from ``<stem>_<x>_<y>.png``."""
    stem, x, y = file_name.removesuffix(".png").rsplit("_", 2)
    return stem, int(x), int(y)


def boxes_by_origin(data: dict) -> dict[tuple[int, int], list]:
    by_id = {image["id"]: origin(image["file_name"])[1:] for image in data["images"]}
    found: dict[tuple[int, int], list] = {corner: [] for corner in by_id.values()}
    for ann in data["annotations"]:
        found[by_id[ann["image_id"]]].append(ann["bbox"])
    return found


def test_train_tiles_overlap_by_the_stride_and_reach_the_far_edges(converted):
    root, _ = converted
    data = load(root, "train")
    corners = sorted(origin(image["file_name"])[1:] for image in data["images"])
    assert corners == sorted((x, y) for x in (0, 16, 32, 48, 64, 68) for y in (0, 16, 32, 48))
    for image in data["images"]:
        with Image.open(root / "train2017" / image["file_name"]) as tile:
            assert tile.size == (TILE, TILE) == (image["width"], image["height"])


def test_val_tiles_do_not_overlap_and_tiles_without_boxes_are_left_out(converted):
    root, _ = converted
    assert set(boxes_by_origin(load(root, "val"))) == set(VAL_EXPECTED)


def test_half_inside_box_is_kept_clipped_and_mostly_outside_box_is_dropped(converted):
    root, _ = converted
    assert boxes_by_origin(load(root, "val")) == VAL_EXPECTED


def test_train_and_val_tiles_are_crops_of_different_source_images(converted):
    root, _ = converted
    images = {stem: np.asarray(image) for stem, (image, _) in sources().items()}
    for split, stem in (("train", TRAIN_SOURCE), ("val", VAL_SOURCE)):
        for entry in load(root, split)["images"]:
            source, x, y = origin(entry["file_name"])
            assert source == stem
            tile = np.asarray(Image.open(root / f"{split}2017" / entry["file_name"]))
            assert np.array_equal(tile, images[stem][y:y + TILE, x:x + TILE])


def test_json_loads_through_the_training_loader_with_the_right_boxes(converted):
    root, _ = converted
    args = main.parse_args(["--coco_path", str(root), "--eval_size", str(TILE)])
    dataset = build_dataset("val", args)
    assert dataset.num_classes == 2 and len(dataset) == len(VAL_EXPECTED)
    for index, image_id in enumerate(dataset.ids):
        corner = origin(dataset.images[image_id]["file_name"])[1:]
        _, target = dataset[index]
        x, y, w, h = np.asarray(VAL_EXPECTED[corner], dtype=np.float32).T
        expected = np.stack([x + w / 2, y + h / 2, w, h], axis=1) / TILE  # normalised cx, cy, w, h
        assert np.allclose(target["boxes"].numpy(), expected)
        assert target["labels"].tolist() == [1] * len(expected)


def test_summary_line_gives_the_counts_and_the_most_boxes_per_tile(converted):
    _, printed = converted
    assert len(printed) == 1
    assert "24 train / 4 val tiles of 32x32 px" in printed[0]
    # 3 rows of boxes in every training tile, 4 columns (x 62 to 92) in the one at x 64.
    assert "at most 12 per tile" in printed[0]


def test_interrupted_json_write_leaves_no_annotation_file(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "deepforest.whl")

    def interrupted(data, f, **options):
        f.write('{"images": [')
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "json", SimpleNamespace(dump=interrupted))
    with pytest.raises(KeyboardInterrupt):
        run(["--out", str(tmp_path / "out"), "--wheel", wheel, "--tile", str(TILE), "--stride", str(STRIDE)])
    assert not (tmp_path / "out" / "annotations" / "instances_train2017.json").exists()


def test_missing_wheel_is_one_line_naming_the_flag_and_file(tmp_path, capsys):
    code = run(["--out", str(tmp_path / "out"), "--wheel", str(tmp_path / "nowhere.whl")])
    assert_one_line_error(code, capsys.readouterr().err, "--wheel", "nowhere.whl")


@pytest.mark.parametrize("members", [None, {"deepforest/data/SOAP_031.png": b"png"}])
def test_wheel_without_the_annotations_is_one_line_naming_the_flag_and_file(tmp_path, capsys, members):
    wheel = tmp_path / "broken.whl"
    if members is None:
        wheel.write_bytes(b"not a zip")
    else:
        write_wheel(wheel, members)
    code = run(["--out", str(tmp_path / "out"), "--wheel", str(wheel)])
    assert_one_line_error(code, capsys.readouterr().err, "--wheel", "broken.whl")


def test_failed_download_is_one_line_naming_the_wheel_flag(tmp_path, capsys, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for deepforest==2.1.0\n")

    monkeypatch.setattr(neon_trees.subprocess, "run", offline)
    code = run(["--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "download", "No matching distribution", "--wheel")


def test_without_wheel_pip_downloads_the_pinned_version(tmp_path, capsys, monkeypatch):
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        fake_wheel(Path(command[command.index("-d") + 1]) / "deepforest-2.1.0-py3-none-any.whl")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(neon_trees.subprocess, "run", pip)
    assert run(["--out", str(tmp_path / "out"), "--tile", str(TILE), "--stride", str(STRIDE)]) == 0
    assert commands[0][1:] == ["-m", "pip", "download", "--no-deps", "deepforest==2.1.0", "-d", commands[0][-1]]
    assert (tmp_path / "out" / "annotations" / "instances_val2017.json").exists()


@pytest.mark.parametrize("flags,needle", [(["--tile", "16"], "--tile"), (["--stride", "0"], "--stride"),
                                          (["--tile", "64", "--stride", "65"], "--stride")])
def test_bad_tile_or_stride_is_one_line_naming_the_flag(tmp_path, capsys, flags, needle):
    code = run(["--out", str(tmp_path / "out"), "--wheel", str(tmp_path / "unused.whl")] + flags)
    assert_one_line_error(code, capsys.readouterr().err, needle)
