"""tools/demo_floor.py on the tiny model (seconds): FLOPs per training image, rates and the floor."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import demo_floor  # noqa: E402
from conftest import TINY_FLAGS, assert_one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def result(synthetic_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("floor") / "floor.json"
    flags = ["--coco_path", synthetic_root, "--steps", "2", "--warmup", "1", "--epochs", "3",
             "--pretrain_steps", "10", "--pretrain_batch_size", "2", "--output", str(output)]
    return demo_floor.run(TINY_FLAGS + flags), output


def test_rows_add_up_to_the_floor_and_the_measured_time(result):
    report, output = result
    assert json.loads(output.read_text()) == report
    pretraining, detector = report["rows"]
    assert (pretraining["step"], pretraining["images"], detector["step"]) == ("pretraining", 20, "detector")
    rate = report["product_gflops_per_s"]
    for row in report["rows"]:
        assert row["gflops_per_image"] > 0 and row["images_per_s"] > 0
        assert row["floor_s"] == pytest.approx(row["images"] * row["gflops_per_image"] / rate)
        assert row["measured_s"] == pytest.approx(row["images"] / row["images_per_s"])
    assert report["floor_s"] == pytest.approx(pretraining["floor_s"] + detector["floor_s"])


def test_measure_counts_forward_and_backward_per_image():
    # A linear layer whose input needs a gradient: forward, input gradient and weight gradient
    # each take batch x in x out multiply-adds.
    layer = torch.nn.Linear(8, 5, bias=False)
    batches = [torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)]

    def run(chosen: list) -> int:
        for x in chosen:
            layer(x).sum().backward()
        return sum(len(x) for x in chosen)

    per_image, images_per_s = demo_floor.measure(run, batches)
    assert per_image == pytest.approx(3 * 8 * 5 / 1e9)
    assert images_per_s > 0


def test_product_rate_is_positive_and_finite():
    rate = demo_floor.product_rate(size=64, repeats=2)
    assert 0 < rate < float("inf")


@pytest.mark.parametrize("flags,needle", [(["--steps", "0"], "--steps"), (["--threads", "0"], "--threads"),
                                          (["--steps", "50"], "--pretrain_batch_size 8"),
                                          (["--steps", "5", "--pretrain_batch_size", "1"], "--batch_size 4"),
                                          (["--rounds", "0"], "--rounds"),
                                          (["--states", "missing.pth"], "--states")])
def test_bad_flags_end_in_one_line(tiny_flags, capsys, flags, needle):
    code = demo_floor.exit_status(lambda: demo_floor.run(tiny_flags + flags))
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_states_take_turns_against_the_start(trained, synthetic_root):
    out, _ = trained
    checkpoint = str(out / "checkpoint.pth")
    report = demo_floor.run(TINY_FLAGS + ["--coco_path", synthetic_root, "--steps", "1", "--warmup", "1",
                                          "--pretrain_steps", "2", "--states", checkpoint, "--rounds", "2"])
    start, state = report["states"]
    assert (start["state"], state["state"]) == ("start", checkpoint)
    assert start["vs_start"] == 1.0 and len(start["images_per_s"]) == len(state["images_per_s"]) == 2
    assert state["vs_start"] == pytest.approx(state["median"] / start["median"]) and state["median"] > 0


def test_state_checkpoint_of_another_model_is_named(trained, synthetic_root, capsys):
    out, _ = trained
    flags = TINY_FLAGS + ["--coco_path", synthetic_root, "--hidden_dim", "16", "--steps", "1", "--warmup", "0",
                          "--states", str(out / "checkpoint.pth")]
    code = demo_floor.exit_status(lambda: demo_floor.run(flags))
    assert_one_line_error(code, capsys.readouterr().err, "checkpoint.pth")
