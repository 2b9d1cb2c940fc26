"""A smoke run of tools/benchmark_vit.py on a tiny ViT (seconds)."""
import json
import math

import pytest

from models.vit import VIT_ARCHS
from tools import benchmark_vit

TINY = ["--archs", "demo", "--size", "32", "--num_classes", "6", "--repeats", "2", "--warmup", "0",
        "--threads", "1"]


def test_tiny_benchmark_prints_and_writes_every_ratio(tmp_path, capsys):
    output = tmp_path / "vit.json"
    report = benchmark_vit.run([*TINY, "--ratios", "0.33", "0.5", "1.0", "--output", str(output),
                                "--", "--patch_size", "8"])
    out = capsys.readouterr().out
    assert "one multiply-add as one FLOP" in out and "demo/8, cpu fp32, batch 1" in out
    assert "| ViT | - | 0.02 (1.00x) |" in out and "| PnP-ViT | 0.33 |" in out and "| PnP-ViT | 1 |" in out

    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    assert [(r["model"], r["ratio"]) for r in rows] == [("ViT", None), ("PnP-ViT", 0.33), ("PnP-ViT", 0.5),
                                                         ("PnP-ViT", 1.0)]
    for row in rows:
        assert row["arch"] == "demo/8"
        assert row["latency"]["runs"] == 2 and 0 < row["latency"]["low"] <= row["latency"]["median"]
    assert rows[0]["gflops_sampler"] == 0 < rows[1]["gflops_sampler"]
    pnp = [row["gflops"] for row in rows[1:]]
    assert pnp == sorted(pnp) and pnp[0] < rows[0]["gflops"] < pnp[-1]  # r = 1 adds the sampler's work


def test_plain_vit_flops_are_the_multiply_adds_of_its_layers(capsys):
    report = benchmark_vit.run([*TINY, "--ratios", "0.5", "--", "--patch_size", "8"])
    capsys.readouterr()
    arch = VIT_ARCHS["demo"]
    width, patches, tokens = arch.embed_dim, (32 // 8) ** 2, (32 // 8) ** 2 + 1
    embed = patches * width * 3 * 8 * 8
    # per block: qkv (3 C^2), projection (C^2), MLP (2 x 4 C^2) per token; Q K^T and A V (2 T^2 C)
    blocks = arch.depth * (12 * tokens * width ** 2 + 2 * tokens ** 2 * width)
    head = width * 6
    assert math.isclose(report["results"][0]["gflops"], (embed + blocks + head) / 1e9, rel_tol=1e-9)


def test_unknown_arch_is_rejected(capsys):
    with pytest.raises(SystemExit) as excinfo:
        benchmark_vit.run(["--archs", "resnet"])
    assert excinfo.value.code == 2
    assert "--archs" in capsys.readouterr().err


def test_json_still_names_the_output_file():
    opts, _ = benchmark_vit.parse_args(["--json", "vit.json"])
    assert opts.output == "vit.json"
