"""README "Train on your own data": its commands, run as written on a small COCO-format set laid
out as the README's paths (configs/own_data.yaml and the split flags of datasets/coco.py)."""
import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import main
import predict
from conftest import TINY_FLAGS
from datasets.synthetic import generate

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Train on your own data"
# A tiny CPU model in place of the preset's ResNet-50 DETR; appended to every main.py command.
TINY_RUN = TINY_FLAGS + ["--epochs", "1", "--flops_images", "0"]
CATEGORY_IDS = {1: 7, 2: 9, 3: 12, 4: 7, 5: 9, 6: 12}  # the generator's ids 1..6 -> 7, 9, 12
CATEGORIES = [{"id": 7, "name": "bolt"}, {"id": 9, "name": "nut"}, {"id": 12, "name": "washer"}]


def readme_commands() -> list[str]:
    """The commands of the section's bash block, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"{SECTION!r} has no bash block"
    return [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def write_split(generated: Path, split: str, out: Path, negative: bool) -> list[str]:
    """Copy the generator's ``split`` to ``out/images/<split>/`` and ``out/<split>.json`` with the
    ids of ``CATEGORY_IDS`` (``negative``: the first image loses its annotations); returns the
    image file names."""
    data = json.loads((generated / "annotations" / f"instances_{split}2017.json").read_text())
    folder = out / "images" / split
    folder.mkdir(parents=True)
    for image in data["images"]:
        shutil.copy(generated / f"{split}2017" / image["file_name"], folder / image["file_name"])
    first = data["images"][0]["id"]
    annotations = [{**a, "category_id": CATEGORY_IDS[a["category_id"]]} for a in data["annotations"]
                   if not (negative and a["image_id"] == first)]
    (out / f"{split}.json").write_text(json.dumps(
        {"images": data["images"], "annotations": annotations, "categories": CATEGORIES}))
    return [image["file_name"] for image in data["images"]]


def in_process(command: str, finetune: str) -> list[str]:
    """``command``'s arguments after ``python X.py``, the preset resolved against the repository and
    the ``--finetune`` name of the published weights replaced by ``finetune``."""
    argv = shlex.split(command)[2:]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config":
            argv[i + 1] = str(ROOT / argv[i + 1])
        if arg == "--finetune":
            argv[i + 1] = finetune
    return argv


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """Runs the README's bash block in order in a fresh working directory holding ``my_data/`` as
    the README lays it out (6 train images, the first without annotations, and 3 val images;
    categories 7, 9 and 12), each main.py command with a tiny model appended.

    A test does not download: the --finetune name of DETR-R50's published weights is replaced by a tiny DETR
    checkpoint trained here first on the generator's 6 classes (7 logits), so that fine-tuning to
    the own data's 13 replaces the class head and starts the sampler fresh, as with the published
    weights. Returns the working directory, the val file names, the command names and the
    training command's output.
    """
    work = tmp_path_factory.mktemp("own_data")
    generated = work / "generated"
    with contextlib.redirect_stdout(io.StringIO()):
        generate(str(generated), num_train=6, num_val=3, image_size=64, seed=0)
    commands = readme_commands()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as log:
        patch.chdir(work)
        names = {split: write_split(generated, split, Path("my_data"), split == "train") for split in ("train", "val")}
        assert main.run(TINY_RUN + ["--no_pnp", "--coco_path", str(generated), "--output_dir", "detr",
                                    "--eval_every", "0"]) == 0
        log.truncate(0)
        train, evaluate, draw = (in_process(c, "detr/checkpoint.pth") for c in commands)
        assert main.run(train + TINY_RUN) == 0
        train_output = log.getvalue()
        assert main.run(evaluate + TINY_RUN) == 0
        assert predict.run(draw + ["--device", "cpu"]) == 0
    return {"work": work, "out": work / "outputs" / "my_data", "val": names["val"], "train_output": train_output,
            "programs": [c.split()[:2] for c in commands]}


def test_the_block_trains_evaluates_and_predicts(readme_run):
    assert readme_run["programs"] == [["python", "main.py"], ["python", "main.py"], ["python", "predict.py"]]


def test_finetuning_replaces_the_class_head(readme_run):
    assert "class_embed starts fresh" in readme_run["train_output"]


def test_class_count_is_max_category_id_plus_one(readme_run):
    checkpoint = torch.load(readme_run["out"] / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["num_classes"] == 13


def test_eval_json_has_a_row_per_ratio(readme_run):
    rows = json.loads((readme_run["out"] / "eval.json").read_text())
    assert [row["ratio"] for row in rows] == [0.33, 0.5, 0.8]


def test_a_picture_per_val_image(readme_run):
    pictures = sorted(p.name for p in (readme_run["out"] / "pictures").iterdir())
    assert pictures == sorted(Path(name).stem + ".png" for name in readme_run["val"])


def test_predictions_name_classes_from_the_val_json(readme_run):
    report = json.loads((readme_run["out"] / "predictions.json").read_text())
    assert report["category_names"] == str(readme_run["work"] / "my_data" / "val.json")  # stored absolute
    assert len(report["images"]) == len(readme_run["val"])
