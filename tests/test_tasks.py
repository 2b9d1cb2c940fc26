"""tasks: the one interface detection and classification implement, looked up by --task."""
import argparse
import ast
import re
from pathlib import Path

import pytest

import main
from tasks import TASKS, check_task_flags, get_task
from tasks.base import Task, read_category_names
from util.errors import UserError
from conftest import TINY_CLASSIFICATION_FLAGS, assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, capsys):
    code = main.run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_task_is_a_task_registered_under_its_name():
    assert set(TASKS) == {"detection", "classification"}
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name and get_task(name) is task


def test_an_unknown_task_is_named():
    with pytest.raises(UserError, match="--task must be one of detection, classification, got 'segmentation'"):
        get_task("segmentation")


def test_no_flag_belongs_to_two_tasks_and_every_own_flag_exists():
    detection, classification = set(TASKS["detection"].own_flags), set(TASKS["classification"].own_flags)
    assert not detection & classification
    defaults = vars(main.get_args_parser().parse_args([]))
    assert detection | classification <= set(defaults)


@pytest.mark.parametrize("extra,flag", [
    (["--coco_path", "data"], "--coco_path"),
    (["--eval_size", "64"], "--eval_size"),
    (["--hidden_dim", "64"], "--hidden_dim"),
    (["--compile"], "--compile"),
    (["--query_groups", "2"], "--query_groups"),
    (["--mosaic", "0.5"], "--mosaic"),
])
def test_a_detection_flag_is_refused_by_classification_in_one_line(classification_root, capsys, extra, flag):
    code, _, err = _run(TINY_CLASSIFICATION_FLAGS + ["--data_path", classification_root, "--eval"] + extra, capsys)
    assert_one_line_error(code, err, flag, "is a detection flag", "--task classification")


@pytest.mark.parametrize("extra,flag", [
    (["--mixup", "0.5"], "--mixup"),
    (["--vit_arch", "deit_tiny"], "--vit_arch"),
    (["--data_path", "data"], "--data_path"),
    (["--repeated_aug"], "--repeated_aug"),
])
def test_a_classification_flag_is_refused_by_detection_in_one_line(tiny_flags, capsys, extra, flag):
    code, _, err = _run(tiny_flags + ["--eval"] + extra, capsys)
    assert_one_line_error(code, err, flag, "is a classification flag", "--task detection")


@pytest.mark.parametrize("extra,needle", [
    (["--query_groups", "0"], "--query_groups must be 1 (off) or more"),
    (["--query_groups", "2", "--masks", "--frozen_weights", "detr.pth"], "--frozen_weights freezes the detector"),
    (["--mosaic", "1.5"], "--mosaic is a probability"),
    (["--mosaic", "-0.1"], "--mosaic is a probability"),
    (["--mosaic", "0.5", "--masks"], "drop --mosaic with --masks"),
])
def test_bad_training_accelerator_flags_are_named(extra, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        check_task_flags(get_task("detection"), main.parse_args(extra))


def test_training_accelerator_flags_in_range_pass():
    check_task_flags(get_task("detection"), main.parse_args(["--query_groups", "3", "--mosaic", "1"]))


def test_a_flag_set_to_its_default_is_not_refused():
    args = main.parse_args(["--task", "classification", "--data_path", "data", "--eval_size", "800"])
    check_task_flags(get_task("classification"), args)  # --eval_size 800 is the default: nothing to refuse


def _task_branches(path: Path) -> list[int]:
    """Lines of ``path`` that compare ``args.task`` (or ``<x>.task``) with something."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(isinstance(n, ast.Attribute) and n.attr == "task" for n in [node.left, *node.comparators])]


@pytest.mark.parametrize("name", ["main.py", "predict.py"])
def test_entry_points_look_the_task_up_and_never_branch_on_it(name):
    assert _task_branches(ROOT / name) == []


def test_the_branch_finder_finds_a_branch(tmp_path):
    source = tmp_path / "branchy.py"
    source.write_text("def f(args):\n    if args.task == 'classification':\n        return 1\n")
    assert _task_branches(source) == [2]


@pytest.mark.parametrize("name,header,row", [
    ("detection", "ratio      AP    AP50    AP75     APs     APm     APl   GFLOPs    img/s",
     "DETR    0.500   0.750   0.250   0.125   0.625   0.875     1.23    45.60"),
    ("classification", "ratio    top1    top5   GFLOPs    img/s",
     "ViT     75.50   95.25    1.234    45.60"),
])
def test_table_of_a_row_without_sampler_is_labelled_with_the_model(name, header, row):
    values = {"AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": 0.125, "APm": 0.625, "APl": 0.875,
              "top1": 75.5, "top5": 95.25}
    task = get_task(name)
    rows = [{"ratio": None, **{k: values[k] for k in task.table_columns}, "gflops": 1.2344, "images_per_s": 45.6}]
    assert task.format_table(rows).splitlines() == [header, row]


def test_table_rows_of_ratios_are_labelled_with_the_ratio():
    rows = [{"ratio": r, "top1": 50.0, "top5": 90.0} for r in (0.333, 1.0)]
    assert [line.split()[0] for line in get_task("classification").format_table(rows).splitlines()[1:]] == ["0.333", "1"]


@pytest.mark.parametrize("name,model", [("detection", "DETR"), ("classification", "ViT")])
def test_display_name_says_whether_the_model_has_a_sampler(name, model):
    assert get_task(name).display_name(False) == model
    assert get_task(name).display_name(True) == f"PnP-{model}"


def test_classification_reads_the_checkpoints_class_count_and_sampler(tmp_path):
    import torch

    args = argparse.Namespace(vit_weights="timm")
    get_task("classification").checkpoint_args(args, {"head.bias": torch.zeros(7), "blocks.0.x": torch.zeros(1)}, "ck")
    assert (args.num_classes, args.no_pnp, args.vit_weights) == (7, True, "none")


def test_detection_checkpoint_without_class_head_is_named():
    with pytest.raises(UserError, match="ck has no class_embed.bias: not a DETR/PnP-DETR checkpoint"):
        get_task("detection").checkpoint_args(argparse.Namespace(masks=False), {}, "ck")


def test_category_names_need_int_ids_and_str_names(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"images": [], "categories": [{"id": 7, "name": "kite"}]}')
    bad.write_text('{"images": [], "categories": [{"id": "7", "name": "kite"}]}')
    assert read_category_names(str(good)) == {7: "kite"}
    with pytest.raises(UserError, match="bad.json: expected a list 'categories' of objects with an int 'id'"):
        read_category_names(str(bad))
