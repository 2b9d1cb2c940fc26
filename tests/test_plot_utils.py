"""The AP-against-GFLOPs plot (util/plot_utils.py)."""
import matplotlib.image

from util.plot_utils import plot_tradeoff


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
