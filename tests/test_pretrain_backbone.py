"""Backbone pretraining on box-derived cell labels (pretrain_backbone.py)."""
import torch

from util.misc import nested_tensor_from_tensor_list
import pretrain_backbone as P
from models.backbone import Backbone, load_backbone_weights
from conftest import TINY_FLAGS, assert_one_line_error


def _target(boxes_xyxy, labels, size=(32, 32)):
    """Normalised cx, cy, w, h target of pixel xyxy boxes in an image of ``size`` (H, W)."""
    h, w = size
    b = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                          (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], -1)
    return {"boxes": cxcywh, "labels": torch.tensor(labels), "size": torch.tensor(size)}


def test_cells_take_the_smallest_box_holding_their_centre():
    # 4x4 cells of 8 px (centres at 4, 12, 20, 28): a big box over the left half (label 2) and a
    # small one inside it around the cell (row 1, col 0) (label 5); the last column is padding.
    target = _target([[0, 0, 16, 32], [0, 8, 8, 16]], [2, 5])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :, 3] = True
    labels = P.cell_labels([target], mask, stride=8, background=7)
    expected = torch.tensor([[2, 2, 7, -100],
                             [5, 2, 7, -100],
                             [2, 2, 7, -100],
                             [2, 2, 7, -100]])
    assert torch.equal(labels[0], expected)


def test_cells_of_an_image_without_boxes_are_background():
    target = _target([], [])
    labels = P.cell_labels([target], torch.zeros(1, 2, 3, dtype=torch.bool), stride=16, background=3)
    assert torch.equal(labels, torch.full((1, 2, 3), 3))


def test_cell_classifier_shapes():
    backbone = Backbone("resnet18", True, False, False, frozen_bn=False, last_stage=2)
    model = P.CellClassifier(backbone, num_classes=6)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 48, 64), torch.randn(3, 40, 40)])
    logits, mask = model(samples)
    assert logits.shape == (2, 7, 6, 8) and mask.shape == (2, 6, 8)
    assert mask[1, :, 5:].all() and not mask[0].any()


def test_pretrained_weights_load_as_backbone_weights(synthetic_root, tmp_path, capsys):
    out = tmp_path / "backbone.pth"
    flags = TINY_FLAGS + ["--coco_path", synthetic_root, "--backbone_last_stage", "2", "--seed", "3"]
    assert P.run(["--output", str(out), "--steps", "3", "--print_every", "1"] + flags) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "object-cell accuracy" in printed
    saved = torch.load(out, weights_only=True)
    assert "layer2.0.conv1.weight" in saved and "layer3.0.conv1.weight" not in saved
    assert "bn1.running_mean" in saved  # the BatchNorm statistics travel with the weights
    assert all(value.is_contiguous() for value in saved.values())  # trained channels-last, saved contiguous
    fresh = Backbone("resnet18", True, False, False, frozen_bn=True, last_stage=2)
    before = fresh.body.layer2[0].conv1.weight.clone()
    load_backbone_weights(fresh, str(out))
    assert torch.equal(fresh.body.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])
    assert not torch.equal(before, saved["layer2.0.conv1.weight"])
    assert torch.equal(fresh.body.bn1.running_var, saved["bn1.running_var"])


def test_pretraining_lowers_the_loss(synthetic_root, tmp_path, capsys):
    flags = TINY_FLAGS + ["--coco_path", synthetic_root, "--backbone_last_stage", "2", "--batch_size", "8"]
    assert P.run(["--output", str(tmp_path / "b.pth"), "--steps", "24", "--print_every", "3"] + flags) == 0
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])


def test_bad_steps_is_one_line(tmp_path, synthetic_root, capsys):
    assert P.run(["--output", str(tmp_path / "b.pth"), "--steps", "0", "--coco_path", synthetic_root] + TINY_FLAGS) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --steps and --print_every must be at least 1, got 0 and 100"
    assert not (tmp_path / "b.pth").exists()


def test_missing_dataset_is_one_line(tmp_path, capsys):
    code = P.run(["--output", str(tmp_path / "b.pth"), "--coco_path", str(tmp_path / "nowhere")] + TINY_FLAGS)
    assert_one_line_error(code, capsys.readouterr().err, "nowhere")


def test_training_flags_are_checked_as_by_main(tmp_path, synthetic_root, capsys):
    flags = TINY_FLAGS + ["--coco_path", synthetic_root, "--batch_size", "0"]
    assert P.run(["--output", str(tmp_path / "b.pth")] + flags) == 2
    assert capsys.readouterr().err.strip() == "error: --batch_size must be at least 1, got 0"


def test_out_still_names_the_output_file():
    args, rest = P.get_args_parser().parse_known_args(["--out", "b.pth", "--output_dir", "run"])
    assert args.output == "b.pth" and rest == ["--output_dir", "run"]
