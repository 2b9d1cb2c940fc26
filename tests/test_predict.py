"""predict.py: detections (or a ViT's classes) as JSON, pictures, the poll grid and one-line errors."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import main
import predict
from datasets import build_dataset
from datasets.classification import build_classification_dataset
from datasets.coco import box_target, read_image
from datasets.synthetic import CATEGORIES
from datasets.transforms import make_coco_transforms
from models import build_model
from models.detr import PostProcess
from models.pnp import poll_counts
from tasks.classification import classify
from tasks.detection import detect
from util.checkpoint import plain_args
from util.draw import PALETTE, PANEL_GAP
from util.misc import collate_fn
from conftest import TINY_CLASSIFICATION_FLAGS, assert_one_line_error

RATIO, BATCH = 0.5, 3


@pytest.fixture(scope="module")
def checkpoint(trained) -> Path:
    out, _ = trained
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def val_folder(synthetic_root) -> Path:
    return Path(synthetic_root) / "val2017"


def _run(argv, capsys):
    code = predict.run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(checkpoint, trained, synthetic_root):
    """Per val file name, the post-processed output of the model evaluation builds from the
    training flags, batched as predict.py batches (``BATCH`` images in file order)."""
    _, flags = trained
    state = torch.load(checkpoint, weights_only=True)
    args = main.parse_args(flags + ["--num_classes", str(state["args"]["num_classes"])])
    model = build_model(args)[0]
    model.load_state_dict(state["model"])
    model.eval()
    dataset = build_dataset("val", args)
    results = {}
    with torch.no_grad():
        for samples, targets in DataLoader(dataset, batch_size=BATCH, collate_fn=collate_fn):
            outputs = model(samples, RATIO)
            sizes = torch.stack([t["orig_size"] for t in targets])
            for target, result in zip(targets, PostProcess()(outputs, sizes)):
                results[dataset.coco.imgs[int(target["image_id"])]["file_name"]] = result
    return results


def test_json_holds_the_models_post_processed_detections_above_the_threshold(checkpoint, val_folder, reference,
                                                                              tmp_path, capsys):
    scores = sorted(float(s) for r in reference.values() for s in r["scores"])
    middle = len(scores) // 2
    threshold = (scores[middle] + scores[middle + 1]) / 2
    out = tmp_path / "predictions.json"
    code, _, err = _run(["--checkpoint", str(checkpoint), str(val_folder), "--threshold", str(threshold),
                         "--sample_topk_ratio", str(RATIO), "--batch_size", str(BATCH), "--device", "cpu",
                         "--output", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["sample_topk_ratio"] == RATIO and "pixels" in report["box_format"]
    assert [Path(e["file"]).name for e in report["images"]] == sorted(reference)
    kept = 0
    for entry in report["images"]:
        result = reference[Path(entry["file"]).name]
        keep = (result["scores"] > threshold).nonzero().flatten().tolist()
        keep.sort(key=lambda i: -float(result["scores"][i]))
        assert [d["category_id"] for d in entry["detections"]] == [int(result["labels"][i]) for i in keep]
        for det, i in zip(entry["detections"], keep):
            assert det["score"] == pytest.approx(float(result["scores"][i]), abs=1e-4)
            x0, y0, x1, y1 = result["boxes"][i].tolist()
            assert det["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
        kept += len(keep)
    assert 0 < kept < len(scores)


def test_boxes_are_clipped_to_the_image(checkpoint, val_folder):
    model, postprocess, trained = predict.load_model(str(checkpoint), torch.device("cpu"))

    def outgrown(outputs, sizes):  # every box 1000 px past each side of its image
        results = postprocess(outputs, sizes)
        for result in results:
            result["boxes"] = result["boxes"] + torch.tensor([-1000.0, -1000.0, 1000.0, 1000.0])
        return results

    paths = predict.list_images([str(val_folder)])[:BATCH + 1]
    seen = 0
    for _, image, result, _ in detect(model, outgrown, paths, trained.eval_size, RATIO,
                                      torch.device("cpu"), BATCH, with_poll=False):
        whole = torch.tensor([0.0, 0.0, image.width, image.height])
        assert torch.equal(result["boxes"], whole.expand_as(result["boxes"]))
        seen += 1
    assert seen == len(paths)


def test_json_goes_to_stdout_without_output(checkpoint, val_folder, capsys):
    image = sorted(val_folder.iterdir())[0]
    code, out, _ = _run(["--checkpoint", str(checkpoint), str(image), "--device", "cpu"], capsys)
    assert code == 0
    report = json.loads(out)
    assert [e["file"] for e in report["images"]] == [str(image)]
    with Image.open(image) as im:
        assert (report["images"][0]["width"], report["images"][0]["height"]) == im.size


@pytest.mark.parametrize("extra,panels,scale", [([], 1, 1.0), (["--show_poll", "--draw_scale", "2"], 2, 2.0)])
def test_pictures_have_the_image_size_per_panel(checkpoint, val_folder, tmp_path, capsys, extra, panels, scale):
    code, _, err = _run(["--checkpoint", str(checkpoint), str(val_folder), "--device", "cpu", "--threshold", "0",
                         "--draw", str(tmp_path / "pictures"), "--output", str(tmp_path / "p.json")] + extra, capsys)
    assert code == 0, err
    images = sorted(val_folder.iterdir())
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [f"{i.stem}.png" for i in images]
    for image in images:
        with Image.open(image) as source, Image.open(tmp_path / "pictures" / f"{image.stem}.png") as picture:
            width, height = round(source.width * scale), round(source.height * scale)
            assert picture.format == "PNG"
            assert picture.size == (panels * width + (panels - 1) * PANEL_GAP, height)


def test_poll_grid_marks_each_images_polled_positions_and_pool_weights(checkpoint, val_folder, tmp_path):
    model, postprocess, args = predict.load_model(str(checkpoint), torch.device("cpu"))
    first, second = sorted(val_folder.iterdir())[:2]
    with Image.open(second) as image:  # a narrow image: a smaller feature grid, padded in the batch
        image.crop((0, 0, image.width // 2, image.height)).save(tmp_path / "narrow.png")
    paths = [first, tmp_path / "narrow.png", first]
    outputs = list(detect(model, postprocess, paths, args.eval_size, RATIO, torch.device("cpu"),
                          batch_size=3, with_poll=True))
    assert outputs[0][3].polled.shape != outputs[1][3].polled.shape
    for _, image, _, grid in outputs:
        width, height = image.size
        rows, cols = grid.polled.shape
        assert int(grid.polled.sum()) == int(poll_counts(torch.tensor([rows * cols]), RATIO))
        assert float(grid.pool_mass[grid.polled].sum()) == 0.0
        assert float(grid.pool_mass.sum()) == pytest.approx(1.0, abs=1e-5)
        cell_h, cell_w = grid.cell
        assert (rows - 1) * cell_h < height <= rows * cell_h + 1e-6
        assert (cols - 1) * cell_w < width <= cols * cell_w + 1e-6


def _names(synthetic_root):
    data = json.loads((Path(synthetic_root) / "annotations" / "instances_val2017.json").read_text())
    return {c["id"]: c["name"] for c in data["categories"]}


def _categories_of(argv, capsys):
    code, out, err = _run(argv + ["--threshold", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(out)
    return report["category_names"], {(d["category_id"], d["category"]) for e in report["images"]
                                      for d in e["detections"]}


def test_category_names_come_from_the_checkpoints_training_annotations(checkpoint, val_folder, synthetic_root,
                                                                       capsys):
    source, pairs = _categories_of(["--checkpoint", str(checkpoint), str(val_folder)], capsys)
    assert source.startswith(synthetic_root)
    names = _names(synthetic_root)
    assert pairs and all(name == names[i] for i, name in pairs)


def test_categories_flag_overrides_the_names(checkpoint, val_folder, tmp_path, capsys):
    custom = tmp_path / "names.json"
    custom.write_text(json.dumps({"categories": [{"id": i, "name": f"thing{i}"} for i in range(7)]}))
    source, pairs = _categories_of(["--checkpoint", str(checkpoint), str(val_folder), "--categories", str(custom)],
                                   capsys)
    assert source == str(custom)
    assert pairs and all(name == f"thing{i}" for i, name in pairs)


def test_category_names_fall_back_to_class_ids(checkpoint, val_folder, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["args"]["coco_path"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pth"
    torch.save(state, moved)
    source, pairs = _categories_of(["--checkpoint", str(moved), str(val_folder)], capsys)
    assert source is None
    assert pairs and all(name == f"class_{i}" for i, name in pairs)


def test_unreadable_image_is_named(checkpoint, val_folder, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(val_folder, folder)
    victim = sorted(folder.iterdir())[1]
    victim.write_bytes(b"not a png")
    code, _, err = _run(["--checkpoint", str(checkpoint), str(folder), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(victim))


@pytest.mark.parametrize("make,needles", [
    (lambda tmp: tmp.mkdir() or tmp, ["holds no image"]),
    (lambda tmp: tmp / "nowhere.png", ["does not exist"]),
])
def test_empty_folder_or_missing_file_is_named(checkpoint, tmp_path, capsys, make, needles):
    path = make(tmp_path / "input")
    code, _, err = _run(["--checkpoint", str(checkpoint), str(path), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(path), *needles)


def _other_architecture(state):
    state["args"]["hidden_dim"] = 64
    return state


def _foreign_weights(state):
    state["model"] = {"head.weight": torch.zeros(3, 3)}
    return state


@pytest.mark.parametrize("change,needles", [
    (_other_architecture, ["does not fit", "another architecture"]),
    (_foreign_weights, ["class_embed.bias", "not a DETR/PnP-DETR checkpoint"]),
])
def test_checkpoint_of_another_architecture_is_named(checkpoint, val_folder, tmp_path, capsys, change, needles):
    other = tmp_path / "other.pth"
    torch.save(change(torch.load(checkpoint, weights_only=True)), other)
    code, _, err = _run(["--checkpoint", str(other), str(val_folder), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(other), *needles)


def test_detr_checkpoint_with_namespace_args_is_rebuilt_from_its_weights(trained, val_folder, tmp_path, capsys):
    """As official DETR checkpoints: ``args`` an argparse.Namespace without ``no_pnp`` or ``num_classes``."""
    _, flags = trained
    args = main.parse_args(flags + ["--no_pnp", "--num_classes", "7"])
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    saved = {k: v for k, v in vars(args).items() if k not in ("no_pnp", "num_classes", "backbone_last_stage")}
    saved["backbone_last_stage"] = 3  # an option of this project, stored by its checkpoints
    official = tmp_path / "detr.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(**saved)}, official)
    image = sorted(val_folder.iterdir())[0]
    code, out, err = _run(["--checkpoint", str(official), str(image), "--device", "cpu", "--threshold", "0"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["sample_topk_ratio"] is None
    transformed = make_coco_transforms("val", args.eval_size)(read_image(str(image)), box_target(0, [], 1, 1))[0]
    with torch.no_grad():
        expected = model([transformed])["pred_logits"].softmax(-1)[0, :, :-1].max(-1).values
    got = sorted(d["score"] for d in report["images"][0]["detections"])
    assert got == pytest.approx(sorted(expected.tolist()), abs=1e-4)


def test_show_poll_on_a_detr_checkpoint_is_named(trained, val_folder, tmp_path, capsys):
    _, flags = trained
    args = main.parse_args(flags + ["--no_pnp", "--num_classes", "7"])
    detr = tmp_path / "detr.pth"
    torch.save({"model": build_model(args)[0].state_dict(), "args": plain_args(args)}, detr)
    code, _, err = _run(["--checkpoint", str(detr), str(val_folder), "--device", "cpu", "--show_poll",
                         "--draw", str(tmp_path / "pictures")], capsys)
    assert_one_line_error(code, err, str(detr), "--show_poll")


@pytest.mark.parametrize("extra,needles", [
    (["--show_poll"], ["--show_poll", "--draw"]),
    (["--sample_topk_ratio", "1.5"], ["--sample_topk_ratio"]),
    (["--batch_size", "0"], ["--batch_size"]),
])
def test_bad_flags_end_in_one_line(checkpoint, val_folder, capsys, extra, needles):
    code, _, err = _run(["--checkpoint", str(checkpoint), str(val_folder), "--device", "cpu"] + extra, capsys)
    assert_one_line_error(code, err, *needles)


def test_two_images_of_one_name_drawn_to_one_file_are_named(checkpoint, val_folder, tmp_path, capsys):
    image = sorted(val_folder.iterdir())[0]
    twin = tmp_path / "other" / image.name
    twin.parent.mkdir()
    shutil.copy(image, twin)
    code, _, err = _run(["--checkpoint", str(checkpoint), str(image), str(twin), "--device", "cpu",
                         "--draw", str(tmp_path / "pictures")], capsys)
    assert_one_line_error(code, err, "--draw", str(image), str(twin))


# ----------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def vit(tmp_path_factory, classification_root) -> tuple[Path, Path, list[str]]:
    """A tiny PnP-ViT trained one epoch on the tiny synthetic classification set: its checkpoint,
    the data root and the training flags."""
    out = tmp_path_factory.mktemp("vit_run")
    flags = TINY_CLASSIFICATION_FLAGS + ["--data_path", classification_root]
    assert main.run(flags + ["--epochs", "1", "--eval_every", "0", "--output_dir", str(out)]) == 0
    return out / "checkpoint.pth", Path(classification_root), flags


def _val_images(root: Path) -> list[str]:
    return [str(root / "val" / name) for name in sorted(CATEGORIES)]


def test_classification_json_holds_the_models_most_probable_classes(vit, tmp_path, capsys):
    checkpoint, root, flags = vit
    out = tmp_path / "classes.json"
    code, _, err = _run(["--checkpoint", str(checkpoint), *_val_images(root), "--sample_topk_ratio", str(RATIO),
                         "--batch_size", "4", "--device", "cpu", "--output", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["task"] == "classification" and report["sample_topk_ratio"] == RATIO
    assert report["class_names"] == str(root / "train")

    state = torch.load(checkpoint, weights_only=True)
    args = main.parse_args(flags + ["--num_classes", "6"])
    model = build_model(args)[0].eval()
    model.load_state_dict(state["model"])
    dataset = build_classification_dataset("val", args)
    assert [e["file"] for e in report["images"]] == [path for path, _ in dataset.samples]
    with torch.no_grad():
        probabilities = model(torch.stack([image for image, _ in dataset]), RATIO)["logits"].softmax(-1)
    for entry, expected in zip(report["images"], probabilities):
        assert (entry["width"], entry["height"]) == (40, 40)
        classes = entry["classes"]
        scores = [c["score"] for c in classes]
        assert len(classes) == 5 and scores == sorted(scores, reverse=True)
        for c in classes:
            assert c["class"] == dataset.classes[c["class_id"]]
            assert c["score"] == pytest.approx(float(expected[c["class_id"]]), abs=1e-4)
        assert classes[0]["class_id"] == int(expected.argmax())


def test_classification_pictures_show_the_class_and_the_poll(vit, tmp_path, capsys):
    checkpoint, root, _ = vit
    pictures = tmp_path / "pictures"
    code, out, err = _run(["--checkpoint", str(checkpoint), str(root / "val" / "ring"), "--device", "cpu",
                           "--draw", str(pictures), "--show_poll", "--draw_scale", "2"], capsys)
    assert code == 0, err
    best = json.loads(out)["images"][0]["classes"][0]
    with Image.open(pictures / "000004.png") as picture:
        assert picture.size == (2 * 64 + PANEL_GAP, 64)  # the 32-pixel input, twice, in two panels
        # the first panel is framed in the colour of the most probable class
        assert picture.getpixel((0, 40)) == PALETTE[best["class_id"] % len(PALETTE)]


@pytest.mark.parametrize("ratio", [RATIO, 1.0])
def test_classification_poll_grid_is_the_samplers_poll(vit, ratio):
    checkpoint, root, _ = vit
    model, postprocess, args = predict.load_model(str(checkpoint), torch.device("cpu"))
    assert postprocess is None and model.uses_pnp
    paths = predict.list_images(_val_images(root)[:3])
    outputs = list(classify(model, paths, args, ratio, torch.device("cpu"), batch_size=2, with_poll=True))
    assert len(outputs) == 3
    transform = build_classification_dataset("val", args).transform
    for path, image, view, probabilities, grid in outputs:
        assert view.size == (32, 32) and image.size == (40, 40)
        assert probabilities.shape == (6,) and float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
        assert grid.polled.shape == grid.pool_mass.shape == (4, 4) and grid.cell == (8, 8)
        with torch.no_grad():
            sampled = model(transform(read_image(str(path)))[None], ratio)["sampled"]
        expected = torch.zeros(16, dtype=torch.bool)
        expected[sampled.poll_index[0]] = True
        assert torch.equal(grid.polled.flatten(), expected)
        assert int(grid.polled.sum()) == int(poll_counts(torch.tensor([16]), ratio))
        assert float(grid.pool_mass[grid.polled].sum()) == 0.0
        assert float(grid.pool_mass.sum()) == pytest.approx(0.0 if ratio == 1.0 else 1.0, abs=1e-5)


def test_classification_class_names_fall_back_and_can_be_given(vit, tmp_path, capsys):
    checkpoint, root, _ = vit
    state = torch.load(checkpoint, weights_only=True)
    state["args"]["data_path"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pth"
    torch.save(state, moved)
    image = _val_images(root)[0]
    code, out, err = _run(["--checkpoint", str(moved), image, "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["class_names"] is None
    assert all(c["class"] == f"class_{c['class_id']}" for c in report["images"][0]["classes"])
    custom = tmp_path / "names.json"
    custom.write_text(json.dumps({"categories": [{"id": i, "name": f"shape{i}"} for i in range(6)]}))
    code, out, err = _run(["--checkpoint", str(moved), image, "--device", "cpu", "--categories", str(custom)], capsys)
    assert code == 0, err
    assert all(c["class"] == f"shape{c['class_id']}" for c in json.loads(out)["images"][0]["classes"])


def test_plain_vit_checkpoint_is_rebuilt_from_its_weights(vit, tmp_path, capsys):
    checkpoint, root, _ = vit
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("sampler.")}
    state["args"]["no_pnp"] = False  # the weights decide
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    image = _val_images(root)[0]
    code, out, err = _run(["--checkpoint", str(plain), image, "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["sample_topk_ratio"] is None
    code, _, err = _run(["--checkpoint", str(plain), image, "--device", "cpu", "--show_poll",
                         "--draw", str(tmp_path / "pictures")], capsys)
    assert_one_line_error(code, err, str(plain), "--show_poll", "ViT checkpoint", "no poll-and-pool sampler")


def test_classification_checkpoint_without_a_head_is_named(vit, tmp_path, capsys):
    checkpoint, root, _ = vit
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]["head.bias"]
    headless = tmp_path / "headless.pth"
    torch.save(state, headless)
    code, _, err = _run(["--checkpoint", str(headless), _val_images(root)[0], "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(headless), "head.bias", "not a ViT/PnP-ViT checkpoint")
