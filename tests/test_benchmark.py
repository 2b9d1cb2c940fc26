"""A smoke run of tools/benchmark.py on a tiny model (seconds), and its memory meter."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

from tools import benchmark

TINY_MODEL = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3",
              "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
              "--dim_feedforward", "64", "--num_queries", "6", "--unsample_abstract_number", "4"]


def test_tiny_benchmark_writes_every_figure_with_its_ratio_to_detr(tmp_path, capsys):
    output = tmp_path / "bench.json"
    benchmark.run(["--size", "64", "96", "--variants", "r50", "--ratios", "0.5", "1.0", "--repeats", "1",
                   "--warmup", "0", "--train_repeats", "1", "--threads", "1", "--output", str(output),
                   "--", *TINY_MODEL])
    out = capsys.readouterr().out
    assert "one multiply-add as one FLOP" in out and "| DETR | - |" in out and "(1.00x)" in out

    report = json.loads(output.read_text())
    rows = report["results"]
    assert [(r["model"], r["ratio"]) for r in rows] == [("DETR", None), ("PnP-DETR", 0.5), ("PnP-DETR", 1.0)]
    for row in rows:
        assert row["variant"] == "R18" and row["dtype"] == "fp32"
        assert 0 < row["gflops_transformer"] < row["gflops"]
        assert row["latency"]["median"] > 0 and row["transformer_latency"]["median"] > 0
        assert 0 < row["encoder_latency"]["median"] and 0 < row["decoder_latency"]["median"]
        assert row["train_step"]["runs"] == 1 and row["train_peak_mb"] > 0
    assert rows[0]["gflops_sampler"] == 0 < rows[1]["gflops_sampler"]
    assert rows[1]["gflops_transformer"] < rows[2]["gflops_transformer"]
    assert "sampler_latency" in rows[1] and "sampler_latency" not in rows[0]
    assert report["eval"][0]["all_ratios"]["median"] > 0


def test_parts_clock_and_model_flags_are_honoured(tmp_path):
    output = tmp_path / "bench.json"
    benchmark.run(["--size", "64", "64", "--variants", "r50", "--ratios", "0.5", "--parts", "flops", "latency",
                   "--clock", "cpu", "--repeats", "1", "--output", str(output), "--", *TINY_MODEL, "--enc_layers", "2"])
    report = json.loads(output.read_text())
    rows = report["results"]
    assert report["clock"] == "cpu" and not report["eval"]
    assert all(row["latency"]["median"] > 0 and "train_step" not in row for row in rows)
    one_layer = tmp_path / "one.json"
    benchmark.run(["--size", "64", "64", "--variants", "r50", "--ratios", "0.5", "--parts", "flops",
                   "--output", str(one_layer), "--", *TINY_MODEL])
    assert json.loads(one_layer.read_text())["results"][0]["gflops_transformer"] < rows[0]["gflops_transformer"]


def test_tensor_memory_counts_new_storages_until_freed():
    a = torch.zeros(1000)
    with benchmark.TensorMemory() as memory:
        b = torch.ones(1000)          # 4000 bytes
        c = b + 1                     # 4000 more: peak 8000
        del b, c
        d = torch.ones(500)           # 2000, after both were freed
        a.add_(1)                     # in place: nothing new
        view = d[:10]                 # a view: nothing new
    assert memory.peak == 8000
    assert memory.live == 2000
    assert view.shape == (10,) and a[0] == 1


@pytest.mark.slow
def test_compile_also_compiles_the_encoder_decoder_and_sampler_columns():
    _, _, (pnp, _) = benchmark.build_pair("r50", TINY_MODEL, torch.device("cpu"), 0)
    pnp.eval()
    image = torch.rand(1, 3, 64, 96)
    eager = benchmark.inference_calls(pnp, image, 0.5, "fp32", torch.device("cpu"))
    compiled = benchmark.inference_calls(pnp, image, 0.5, "fp32", torch.device("cpu"), compile_parts=True)
    torch._dynamo.reset()
    for part in ("encoder_latency", "decoder_latency", "sampler_latency"):
        frames = counters["stats"]["unique_graphs"]
        got, expected = compiled[part](), eager[part]()
        assert counters["stats"]["unique_graphs"] > frames, part
        expected = expected.tokens if part == "sampler_latency" else expected
        got = got.tokens if part == "sampler_latency" else got
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
