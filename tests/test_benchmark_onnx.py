"""A smoke run of tools/benchmark_onnx.py on a tiny model: eager and ONNX Runtime timed, outputs compared."""
import json

import pytest

from tools import benchmark_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY_MODEL = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "2",
              "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
              "--dim_feedforward", "64", "--num_queries", "6", "--unsample_abstract_number", "4"]


def test_tiny_benchmark_times_both_runtimes_and_compares_their_outputs(tmp_path, capsys):
    output = tmp_path / "bench.json"
    benchmark_onnx.run(["--size", "64", "96", "--variants", "r50", "--ratios", "0.5", "--detr", "--repeats", "2",
                        "--warmup", "0", "--threads", "1", "--output", str(output), "--", *TINY_MODEL])
    out = capsys.readouterr().out
    assert "| R18 DETR | - |" in out and "| R18 PnP-DETR | 0.5 |" in out and "ONNX Runtime / eager" in out

    report = json.loads(output.read_text())
    rows = report["results"]
    assert [(r["model"], r["ratio"]) for r in rows] == [("DETR", None), ("PnP-DETR", 0.5)]
    for row in rows:
        assert row["eager"]["runs"] == row["onnxruntime"]["runs"] == 2
        assert 0 < row["eager"]["low"] <= row["eager"]["median"] and 0 < row["onnxruntime"]["median"]
        assert row["max_abs_difference"] < 1e-4
