"""A smoke run of tools/benchmark_train.py on the tiny detector (seconds)."""
import json

import pytest

from conftest import TINY_FLAGS
from tools import benchmark_train
from util.errors import UserError


def test_every_variant_trains_the_same_images_and_is_reported_against_the_first(synthetic_root, tmp_path, capsys):
    output = tmp_path / "train.json"
    report = benchmark_train.run(["--variants", "faithful=", "dn2=--dn_groups 2", "g2=--query_groups 2",
                                  "ema=--ema_decay 0.9", "batch2=--batch_size 2", "--images", "8", "--repeats", "2",
                                  "--threads", "1", "--output", str(output),
                                  "--", *TINY_FLAGS, "--coco_path", synthetic_root])
    out = capsys.readouterr().out
    assert "one training pass over 8 images, fastest of 2; (x) = ratio to faithful" in out
    assert "| dn2 | `--dn_groups 2` |" in out and "(1.00x)" in out
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    assert [row["variant"] for row in rows] == ["faithful", "dn2", "g2", "ema", "batch2"]
    assert rows[0]["ratio"] == 1.0
    for row in rows:
        assert len(row["runs"]) == 2 and row["seconds"] == min(row["runs"]) > 0
        assert row["images_per_s"] == pytest.approx(8 / row["seconds"])


def test_each_variant_trains_at_its_own_batch_size(synthetic_root, monkeypatch):
    batches = []
    train_one_epoch = benchmark_train.train_one_epoch

    def count_batches(model, criterion, loader, *args, **kwargs):
        batches.append(len(loader))
        return train_one_epoch(model, criterion, loader, *args, **kwargs)

    monkeypatch.setattr(benchmark_train, "train_one_epoch", count_batches)
    benchmark_train.run(["--variants", "batch4=", "batch2=--batch_size 2", "--images", "8", "--repeats", "1",
                         "--threads", "1", "--", *TINY_FLAGS, "--coco_path", synthetic_root])
    assert batches == [2, 4]  # TINY_FLAGS train at batch 4


def test_a_variant_without_a_name_is_a_user_error():
    with pytest.raises(UserError, match="NAME=FLAGS"):
        benchmark_train.parse_variant("--dn_groups 5")


def test_more_images_than_the_split_holds_is_a_user_error(synthetic_root):
    with pytest.raises(UserError, match="--images"):
        benchmark_train.run(["--images", "100000", "--", *TINY_FLAGS, "--coco_path", synthetic_root])
