"""Plots of logs and evaluations, and the scalars they share with TensorBoard (util/plot_utils.py)."""
import json

import matplotlib.image
import pytest

from datasets.coco_eval import STAT_NAMES
from util import plot_utils
from util.errors import UserError
from util.plot_utils import log_scalars, plot_tradeoff, plot_training_curves, read_log


def _rows(*points):
    return [{"ratio": ratio, "AP": ap, "gflops": gflops} for ratio, ap, gflops in points]


def _red_pixels(path) -> int:
    image = matplotlib.image.imread(path)
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    return int(((red > 0.8) & (green < 0.2) & (blue < 0.2)).sum())


def test_tradeoff_plot_draws_the_baseline_as_a_red_star(tmp_path):
    with_baseline, without = tmp_path / "a.png", tmp_path / "b.png"
    rows = _rows((0.8, 0.40, 90.0), (0.33, 0.35, 80.5))
    plot_tradeoff(rows, with_baseline, baseline=_rows((None, 0.42, 92.0)))
    plot_tradeoff(rows, without)
    assert with_baseline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _red_pixels(with_baseline) > 20
    assert _red_pixels(without) == 0


def _entry(epoch, ratios=()):
    entry = {"train_loss": 10.0 - epoch, "train_loss_ce": 1.5, "train_sample_reg_loss": 4e-5,
             "train_lr": 1e-4, "epoch": epoch, "n_parameters": 1000}
    for ratio in ratios:
        entry[f"test_ratio_{ratio}_coco_eval_bbox"] = [0.1 * epoch + ratio] + [0.0] * 11
        entry[f"test_ratio_{ratio}_loss"] = 9.0
    return entry


def test_log_scalars_name_the_coco_stats_and_panoptic_fields():
    entry = {**_entry(1, ratios=(0.5,)), "test_ratio_0.5_PQ_all": {"pq": 0.2, "sq": 0.7, "rq": 0.3, "n": 9}}
    scalars = log_scalars(entry)
    assert scalars["test_ratio_0.5_AP"] == pytest.approx(0.6)
    assert {f"test_ratio_0.5_{name}" for name in STAT_NAMES} <= set(scalars)
    assert scalars["test_ratio_0.5_PQ_all_pq"] == 0.2 and scalars["test_ratio_0.5_PQ_all_n"] == 9
    assert scalars["train_loss"] == 9.0
    assert not {"epoch", "n_parameters", "test_ratio_0.5_coco_eval_bbox"} & set(scalars)


def test_training_curves_draw_the_loss_terms_and_one_ap_line_per_ratio(tmp_path):
    entries = [_entry(0), _entry(1, ratios=(0.5, 0.8)), _entry(2, ratios=(0.5, 0.8))]
    fig = plot_training_curves(entries, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses, ap = fig.axes
    assert [line.get_label() for line in losses.get_lines()] == ["loss", "loss_ce", "sample_reg_loss"]
    assert [line.get_label() for line in ap.get_lines()] == ["r=0.5", "r=0.8"]
    assert list(ap.get_lines()[1].get_xdata()) == [1, 2]
    assert list(ap.get_lines()[1].get_ydata()) == pytest.approx([90.0, 100.0])


def test_read_log_names_the_bad_line(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(json.dumps(_entry(0)) + "\n{not json\n")
    with pytest.raises(UserError, match=r"log.txt: line 2 is not JSON"):
        read_log(log)


def test_command_line_writes_the_curves_beside_the_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("\n".join(json.dumps(_entry(e, ratios=(0.5,))) for e in range(3)) + "\n")
    assert plot_utils.main([str(log)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_names_a_missing_log_in_one_line(tmp_path, capsys):
    assert plot_utils.main([str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.txt'} does not exist"
