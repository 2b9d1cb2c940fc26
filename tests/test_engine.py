"""engine: the training ratio draw, and evaluation at several ratios in one pass."""
import random

import pytest
import torch
from torch import nn

import main
from engine import draw_ratio, evaluate_classification
from tasks import get_task
from util.checkpoint import read_checkpoint
from conftest import TINY_CLASSIFICATION_FLAGS


def test_uniform_draw_stays_in_the_bounds_and_never_gives_the_upper_bound():
    rng = random.Random(0)
    draws = [draw_ratio(rng, 0.3, 1.0) for _ in range(2000)]
    assert min(draws) >= 0.3 and max(draws) < 1.0


def test_upper_prob_draws_the_upper_bound_that_often():
    rng = random.Random(0)
    draws = [draw_ratio(rng, 0.3, 1.0, upper_prob=0.25) for _ in range(4000)]
    share = sum(d == 1.0 for d in draws) / len(draws)
    assert 0.22 < share < 0.28
    assert all(0.3 <= d <= 1.0 for d in draws)


def test_upper_prob_zero_is_the_papers_draw_number_for_number():
    plain, paper = random.Random(5), random.Random(5)
    assert [draw_ratio(plain, 1 / 3, 0.8) for _ in range(50)] == [paper.uniform(1 / 3, 0.8) for _ in range(50)]


class _FixedLogits(nn.Module):
    """A classifier whose 'images' are indices into hand-made logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def extract_features(self, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def predict(self, features: torch.Tensor, ratio):
        return {"logits": self.logits[features.view(-1).long()]}


def test_top1_and_top5_are_exact_on_hand_made_logits():
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 6],   # label 0: top-1
        [9.0, 8, 7, 6, 5, 4, 3],   # label 4: 5th best, in the top 5
        [9.0, 8, 7, 6, 5, 4, 3],   # label 6: 7th best, missed
        [1.0, 2, 3, 4, 5, 6, 9],   # label 5: 2nd best
    ])
    labels = torch.tensor([0, 4, 6, 5])
    batches = [(torch.tensor([[0.0], [1.0]]), labels[:2]), (torch.tensor([[2.0], [3.0]]), labels[2:])]
    stats = evaluate_classification(_FixedLogits(logits), batches, torch.device("cpu"), [0.5])
    assert stats["ratio_0.5_acc1"] == pytest.approx(25.0, abs=1e-9)
    assert stats["ratio_0.5_acc5"] == pytest.approx(75.0, abs=1e-9)
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert stats["ratio_0.5_loss"] == pytest.approx(expected_loss, abs=1e-6)


def _evaluator(args, state=None):
    """``ratios -> stats`` of the task's evaluation of one model (built from ``args``, with ``state``)."""
    args.distributed = False
    task = get_task(args.task)
    _, dataset_val = main.build_datasets(args)
    _, loader_val = main.build_loaders(args, None, dataset_val)
    model, criterion, postprocessors = task.build_model(args, dataset_val)
    if state is not None:
        model.load_state_dict(state)
    return lambda ratios: task.evaluate(args, model, criterion, postprocessors, loader_val, torch.device("cpu"), ratios)


def _same_stats(together: dict, alone: dict, ratio: float) -> None:
    prefix = f"ratio_{ratio:g}_"
    keys = [k for k in alone if k.startswith(prefix) and not k.endswith("images_per_s")]
    assert keys
    for key in keys:
        assert torch.allclose(torch.as_tensor(together[key], dtype=torch.float64),
                              torch.as_tensor(alone[key], dtype=torch.float64), rtol=0, atol=1e-9), key


def test_detection_at_several_ratios_in_one_pass_equals_each_ratio_alone(trained):
    out, flags = trained
    checkpoint = read_checkpoint(str(out / "checkpoint.pth"))
    args = main.parse_args(flags + ["--eval", "--num_classes", str(checkpoint["args"]["num_classes"])])
    evaluate = _evaluator(args, checkpoint["model"])
    together = evaluate([0.4, 0.9])
    assert together["ratio_0.4_loss"] != together["ratio_0.9_loss"]  # each ratio's own outputs are compared
    for ratio in (0.4, 0.9):
        _same_stats(together, evaluate([ratio]), ratio)


def test_classification_at_several_ratios_in_one_pass_equals_each_ratio_alone(classification_root):
    torch.manual_seed(0)
    args = main.parse_args(TINY_CLASSIFICATION_FLAGS + ["--data_path", classification_root, "--eval",
                                                        "--num_classes", "6"])
    evaluate = _evaluator(args)
    together = evaluate([0.25, 1.0])
    assert together["ratio_0.25_loss"] != together["ratio_1_loss"]
    for ratio in (0.25, 1.0):
        _same_stats(together, evaluate([ratio]), ratio)
