"""--compile: torch.compile in place (slow: compiling takes minutes on CPU)."""
import json
import math

import pytest

import main


@pytest.mark.slow
def test_compiled_evaluation_reports_finite_figures(tiny_flags, tmp_path):
    flags = tiny_flags + ["--compile", "--output_dir", str(tmp_path), "--eval", "--eval_ratios", "0.5",
                          "--flops_images", "1"]
    assert main.run(flags) == 0
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert math.isfinite(row["AP"]) and row["gflops"] > 0 and row["images_per_s"] > 0
