"""FLOP counting (util/flops.py) against hand formulas."""
import json

import pytest
import torch
import torch.nn.functional as F

import main
from models.detr import build
from util.flops import count_flops, flop_counter, gflops, mean_flops

HIDDEN, FFN, QUERIES, COARSE, CLASSES = 32, 64, 6, 4, 5


def _build(*extra: str):
    torch.manual_seed(0)
    args = main.parse_args(["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_stage", "3",
                            "--num_classes", str(CLASSES), "--hidden_dim", str(HIDDEN), "--nheads", "4",
                            "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", str(FFN),
                            "--num_queries", str(QUERIES), "--unsample_abstract_number", str(COARSE),
                            "--device", "cpu", *extra])
    return build(args)[0].eval()


def _transformer_macs(tokens: int, enc_layers: int = 2, dec_layers: int = 2) -> int:
    """Multiply-adds of DETR's encoder over ``tokens`` and decoder over QUERIES queries."""
    d, q = HIDDEN, QUERIES
    encoder = 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * FFN
    decoder = (4 * q * d * d + 2 * q * q * d                               # self-attention
               + 2 * q * d * d + 2 * tokens * d * d + 2 * q * tokens * d    # cross-attention
               + 2 * q * d * FFN)
    return enc_layers * encoder + dec_layers * decoder


def test_one_attention_call_is_counted_by_the_hand_formula():
    q, k, v = torch.rand(2, 4, 10, 8), torch.rand(2, 4, 14, 8), torch.rand(2, 4, 14, 8)
    mask = torch.rand(2, 1, 1, 14) > 0.2
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.get_total_flops() == 2 * (2 * 4 * 10 * 14 * 8) * 2  # Q K^T and A V, 2 per multiply-add


def test_attention_backward_is_counted():
    q, k, v = (torch.rand(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    forward = 2 * (1 * 2 * 6 * 6 * 4) * 2
    assert counter.get_total_flops() == forward + forward * 5 // 2


def test_gflops_counts_one_multiply_add_as_one_flop():
    with flop_counter() as counter:
        torch.rand(10, 20) @ torch.rand(20, 30)
    assert gflops(counter.get_total_flops()) == pytest.approx(10 * 20 * 30 / 1e9)


def test_detr_transformer_matches_the_hand_formula():
    model = _build("--no_pnp")
    image = torch.rand(3, 64, 96)  # stride 16: a 4 x 6 map
    flops = count_flops(model, image, [None])[None]
    assert flops.transformer * 1e9 == pytest.approx(_transformer_macs(4 * 6))
    assert flops.sampler == 0
    assert flops.total > flops.transformer


def test_pnp_sampler_and_transformer_match_the_hand_formula():
    model = _build()
    image = torch.rand(3, 64, 96)
    positions, ratio = 4 * 6, 0.5
    tokens = int(positions * ratio) + COARSE
    d = HIDDEN
    sampler = (positions * d * d + positions * d      # score net: 1x1 convs C->C->1
               + positions * d * COARSE              # k_proj
               + 2 * COARSE * positions * d          # pooling of the features and positions
               + COARSE * d * d)                     # v_proj on the pooled rows
    flops = count_flops(model, image, [ratio])[ratio]
    assert flops.sampler * 1e9 == pytest.approx(sampler)
    assert flops.transformer * 1e9 == pytest.approx(sampler + _transformer_macs(tokens))


def test_ratios_share_the_backbone_and_grow_with_the_ratio():
    model = _build()
    flops = count_flops(model, torch.rand(3, 64, 96), [0.25, 0.5, 1.0])
    backbone = {r: f.total - f.transformer for r, f in flops.items()}
    assert backbone[0.25] == pytest.approx(backbone[0.5]) == pytest.approx(backbone[1.0])
    assert flops[0.25].transformer < flops[0.5].transformer < flops[1.0].transformer
    assert all(p.requires_grad for p in model.parameters())


def test_mean_flops_averages_over_images():
    model = _build()
    small, large = torch.rand(3, 64, 64), torch.rand(3, 64, 128)
    each = {tuple(x.shape): count_flops(model, x, [0.5])[0.5] for x in (small, large)}
    mean = mean_flops(model, [small, large, large], [0.5])[0.5]
    expected = (each[tuple(small.shape)].total + 2 * each[tuple(large.shape)].total) / 3
    assert mean.total == pytest.approx(expected)


# ----------------------------------------------------------------------------- main.py --eval
def test_eval_reports_gflops_speed_table_and_tradeoff_plot(tiny_flags, tmp_path, capsys):
    detr_dir, pnp_dir = tmp_path / "detr", tmp_path / "pnp"
    common = tiny_flags + ["--eval", "--flops_images", "3"]
    assert main.run(common + ["--no_pnp", "--output_dir", str(detr_dir)]) == 0
    assert main.run(common + ["--output_dir", str(pnp_dir), "--eval_ratios", "0.3", "1.0",
                              "--baseline_eval", str(detr_dir / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "one multiply-add as one FLOP" in out and "mean over the first 3 val images" in out
    header = [line for line in out.splitlines() if line.startswith("ratio")][-1]
    assert header.split() == ["ratio", "AP", "AP50", "AP75", "APs", "APm", "APl", "GFLOPs", "img/s"]

    detr = json.loads((detr_dir / "eval.json").read_text())
    low, high = json.loads((pnp_dir / "eval.json").read_text())
    for row in (*detr, low, high):
        assert 0 < row["gflops_transformer"] < row["gflops"]
        assert row["images_per_s"] > 0
    assert low["gflops_transformer"] < high["gflops_transformer"]
    assert low["gflops"] - low["gflops_transformer"] == pytest.approx(high["gflops"] - high["gflops_transformer"])
    assert (pnp_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_a_baseline_without_gflops_is_named(tiny_flags, tmp_path, capsys):
    baseline = tmp_path / "eval.json"
    baseline.write_text(json.dumps([{"ratio": None, "AP": 0.4}]))
    code = main.run(tiny_flags + ["--eval", "--baseline_eval", str(baseline)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--baseline_eval" in err[0] and "gflops" in err[0]
