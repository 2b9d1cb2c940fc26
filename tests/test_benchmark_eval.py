"""A smoke run of tools/benchmark_eval.py on a tiny set (seconds), and its synthetic inputs."""
import json

import pytest

from tools import benchmark_eval
from util.errors import UserError


def test_synthetic_set_has_the_requested_sizes():
    gt, rows = benchmark_eval.synthetic_eval_set(200, 7.3, 100, seed=0)
    assert len(gt["images"]) == 200 and 1200 < len(gt["annotations"]) < 1720
    assert rows.shape[1] == 7 and len(rows) % 100 == 0 and 0.9 * 200 * 100 < len(rows) < 200 * 100
    assert {c["id"] for c in gt["categories"]} == set(benchmark_eval.COCO_CATEGORY_IDS)
    assert set(rows[:, 6].astype(int).tolist()) <= set(benchmark_eval.COCO_CATEGORY_IDS)
    assert (rows[:, 3:5] >= 1).all() and ((0 <= rows[:, 5]) & (rows[:, 5] <= 1)).all()
    again, same_rows = benchmark_eval.synthetic_eval_set(200, 7.3, 100, seed=0)
    assert again == gt and (same_rows == rows).all()
    _, any_category = benchmark_eval.synthetic_eval_set(200, 7.3, 100, seed=0, other_categories=None)
    pairs = {tuple(pair) for pair in rows[:, [0, 6]].astype(int).tolist()}
    assert len({tuple(pair) for pair in any_category[:, [0, 6]].astype(int).tolist()}) > 3 * len(pairs)


def test_tiny_benchmark_prints_a_speed_up_and_equal_stats(tmp_path, capsys):
    libraries = [name for name in benchmark_eval.LIBRARIES if name == "hotcoco" or _installed(name)]
    output = tmp_path / "eval.json"
    report = benchmark_eval.run(["--images", "20", "--detections", "10", "--libraries", *libraries,
                                 "--output", str(output)])
    out = capsys.readouterr().out
    assert "speed-up over" in out and f"| {libraries[0]} |" in out and "1.00x" in out
    assert json.loads(output.read_text()) == report
    assert report["images"] == 20 and [row["library"] for row in report["rows"]] == libraries
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["max_abs_difference"] <= 1e-9 and len(row["stats"]) == 12
        assert row["speedup"] == pytest.approx(report["rows"][0]["seconds"] / row["seconds"])


def test_a_missing_library_is_named(monkeypatch):
    monkeypatch.setattr(benchmark_eval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--libraries pycocotools: the package is not installed"):
        benchmark_eval.run(["--images", "2"])


def _installed(name: str) -> bool:
    return benchmark_eval.importlib.util.find_spec(name) is not None
