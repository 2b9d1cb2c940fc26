"""--compile: torch.compile in place (slow: compiling takes minutes on CPU)."""
import json
import math

import pytest
import torch

import main


@pytest.mark.slow
def test_compiled_evaluation_reports_finite_figures(tiny_flags, tmp_path):
    flags = tiny_flags + ["--compile", "--output_dir", str(tmp_path), "--eval", "--eval_ratios", "0.5",
                          "--flops_images", "1"]
    assert main.run(flags) == 0
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert math.isfinite(row["AP"]) and row["gflops"] > 0 and row["images_per_s"] > 0


@pytest.mark.slow
def test_compiled_training_logs_finite_losses_and_saves_eager_keys(tiny_flags, tmp_path):
    flags = tiny_flags + ["--compile", "--output_dir", str(tmp_path), "--epochs", "1", "--eval_every", "0"]
    assert main.run(flags) == 0
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(log["train_loss"]) and log["train_loss"] > 0
    keys = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"].keys()
    assert not any("_orig_mod" in key for key in keys)
    assert any(key.startswith("transformer.sampler.") for key in keys)
