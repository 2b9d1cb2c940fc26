"""--amp: bf16 autocast around the model; matcher, losses and post-processing stay float32."""
import json
import math

import torch

import main
from engine import _autocast
from models.detr import build
from util.misc import slow_bf16_warning

TARGETS = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
           {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.1]])}]


def test_model_runs_in_bf16_while_losses_and_boxes_stay_float32():
    torch.manual_seed(0)
    model, criterion, postprocessors = build(main.parse_args([
        "--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3", "--num_classes", "5",
        "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--num_queries", "6", "--unsample_abstract_number", "4", "--device", "cpu"]))
    with _autocast(torch.device("cpu"), enabled=True):
        outputs = model(torch.rand(2, 3, 64, 64), 0.5)
    assert outputs["pred_logits"].dtype == torch.bfloat16  # autocast is on
    losses = criterion(outputs, TARGETS)
    assert all(v.dtype == torch.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    results = postprocessors["bbox"](outputs, torch.tensor([[64, 64], [64, 64]]))
    assert results[0]["boxes"].dtype == results[0]["scores"].dtype == torch.float32


def test_amp_trains_and_evaluates_on_cpu(tiny_flags, tmp_path, capsys):
    flags = tiny_flags + ["--amp", "--output_dir", str(tmp_path)]
    assert main.run(flags + ["--epochs", "1", "--eval_every", "0", "--eval_ratios", "0.5"]) == 0
    warning = slow_bf16_warning(torch.device("cpu"))
    assert warning is None or warning in capsys.readouterr().out  # said on a CPU without native bf16
    log = json.loads((tmp_path / "log.txt").read_text())
    assert math.isfinite(log["train_loss"])
    assert main.run(flags + ["--eval", "--eval_ratios", "0.5", "--flops_images", "1"]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert math.isfinite(row["AP"]) and row["gflops"] > 0
