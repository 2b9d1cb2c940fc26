"""tools/gpu_check.sh: its CPU-only answer, and (dry run) the report and the flags of every command."""
import json
import os
import shlex
import subprocess

import main
from tools import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, **env):
    return subprocess.run(["bash", "tools/gpu_check.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = _run(tmp_path / "out", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "needs a CUDA GPU" in done.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_every_step_with_flags_that_parse_and_reports_what_it_finds(tmp_path):
    out = tmp_path / "out"
    (out / "demo").mkdir(parents=True)
    (out / "demo" / "log.txt").write_text(json.dumps({"train_loss": float("nan")}) + "\n")  # as a run would leave
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text(json.dumps([{"ratio": 0.33, "AP": 0.25, "AP50": 0.5, "gflops": 1.0,
                                                         "images_per_s": 90.0}]))
    (out / "benchmark.log").write_text("R50, cuda fp32\n| model | r |\nnoise\nevaluation step at ratios\n")
    done = _run(out, GPU_CHECK_DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["sync_debug", "gpu_tests", "benchmark", "dataset", "demo_epoch", "demo_epoch_amp",
                           "eval_4_ratios", "compile"]
    assert all(s["rc"] == "dry-run" for s in steps.values())
    assert sum(s["timeout_s"] for s in steps.values()) <= 8 * 60 - 10  # 8 minutes, with the report
    assert steps["demo_epoch"]["finite_losses"] is False and report["eval"][0]["AP"] == 0.25
    table = (out / "gpu_check.md").read_text()
    assert "| demo_epoch | dry-run |" in table and "| 0.33 | 0.250 |" in table
    assert "| model | r |" in table and "evaluation step at ratios" in table and "noise" not in table

    for s in steps.values():
        argv = shlex.split(s["command"])
        if argv[1:3] == ["-m", "pytest"]:
            for node in [a for a in argv if "::" in a]:
                path, name = node.split("::")
                assert f"def {name}(" in open(os.path.join(REPO, path)).read()
        elif argv[1] == "main.py":
            args = main.parse_args(argv[2:])
            assert args.device == "cuda" and args.coco_path == str(out / "data")
        elif argv[1:3] == ["-m", "tools.benchmark"]:
            opts, model_flags = benchmark.parse_args(argv[3:])
            assert opts.device == "cuda" and opts.train_batch == 4 and model_flags == []
            assert opts.dtypes == ["fp32", "bf16"] and opts.variants == ["r50", "dc5"]
    assert shlex.split(steps["benchmark"]["command"])[1:3] == ["-m", "tools.benchmark"]
    assert "--compile" in steps["compile"]["command"] and "--amp" in steps["demo_epoch_amp"]["command"]
    assert main.parse_args(shlex.split(steps["eval_4_ratios"]["command"])[2:]).eval_ratios == [0.33, 0.5, 0.65, 0.8]
