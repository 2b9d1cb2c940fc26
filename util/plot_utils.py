"""Plots of training logs and evaluation results, and the scalars they share with TensorBoard.

    python -m util.plot_utils outputs/demo/log.txt --out outputs/demo/curves.png
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from matplotlib.ticker import MaxNLocator

from datasets.coco_eval import STAT_NAMES
from util.errors import UserError, exit_status

AP_KEY = re.compile(r"test_(?:ratio_(?P<ratio>[^_]+)_)?AP")
# eval.json accuracy column -> (axis label, factor to percent); the detector's AP is a fraction.
TRADEOFF_METRICS = {"AP": ("box AP (%)", 100.0), "top1": ("top-1 accuracy (%)", 1.0)}


def _label(row: dict[str, Any], reference: str = "DETR") -> str:
    return reference if row["ratio"] is None else f"r={row['ratio']:g}"


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path,
                  baseline: Optional[list[dict[str, Any]]] = None, metric: str = "AP",
                  reference: str = "DETR") -> None:
    """Save accuracy (%) against whole-model GFLOPs: one point per evaluated ratio.

    ``rows`` and ``baseline`` are ``eval.json`` rows with ``metric`` (``AP`` for the detector,
    ``top1`` for the ViT) and ``gflops``; the baseline (the model without sampler, named
    ``reference``) is drawn as separate reference points.
    """
    ylabel, scale = TRADEOFF_METRICS[metric]
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    points = sorted(rows, key=lambda row: row["gflops"])
    ax.plot([r["gflops"] for r in points], [scale * r[metric] for r in points], "o-", label="this model")
    for row in points:
        ax.annotate(_label(row, reference), (row["gflops"], scale * row[metric]), textcoords="offset points",
                    xytext=(4, -10))
    for row in baseline or []:
        ax.plot(row["gflops"], scale * row[metric], "r*", markersize=12, label=f"baseline {_label(row, reference)}")
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel(ylabel)
    ax.set_title("Accuracy against compute")
    ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def log_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``log.txt`` line by name, as plotted and sent to TensorBoard.

    Numbers keep their key (``epoch`` and ``n_parameters`` are left out); the 12 COCO stats
    ``{prefix}coco_eval_bbox`` become ``{prefix}AP``, ``{prefix}AP50``, ...; dicts of numbers
    (panoptic ``PQ_all`` ...) become ``{key}_{field}``.
    """
    scalars: dict[str, float] = {}
    for key, value in entry.items():
        if key in ("epoch", "n_parameters") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            scalars[key] = float(value)
        elif key.endswith("coco_eval_bbox") and isinstance(value, list):
            prefix = key.removesuffix("coco_eval_bbox")
            scalars.update({f"{prefix}{name}": float(v) for name, v in zip(STAT_NAMES, value)})
        elif isinstance(value, dict):
            scalars.update({f"{key}_{field}": float(v) for field, v in value.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return scalars


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ``log.txt`` (one JSON object per line, each with ``epoch``)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {number} is not JSON (expected a main.py log.txt)") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int):
            raise UserError(f"{path}: line {number} is not a log entry with an 'epoch' (expected a main.py log.txt)")
        entries.append(entry)
    if not entries:
        raise UserError(f"{path}: no log entry")
    return entries


def plot_training_curves(entries: list[dict[str, Any]], path: str | Path) -> Figure:
    """Save the training curves of ``log.txt`` entries to ``path``; returns the figure.

    Left: the training loss and its weighted terms per epoch (log scale). Right: box AP (%)
    per evaluated poll ratio (or plain DETR) at the epochs that were evaluated.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in entries:
        for name, value in log_scalars(entry).items():
            epochs, values = series.setdefault(name, ([], []))
            epochs.append(entry["epoch"])
            values.append(value)
    fig = Figure(figsize=(10, 4))
    losses, ap = fig.subplots(1, 2)
    for name, (epochs, values) in series.items():
        if name.startswith(("train_loss", "train_sample_reg_loss")) and all(v > 0 for v in values):
            losses.plot(epochs, values, ".-", label=name.removeprefix("train_"))
        match = AP_KEY.fullmatch(name)
        if match:
            label = "DETR" if match["ratio"] is None else f"r={match['ratio']}"
            ap.plot(epochs, [100 * v for v in values], "o-", label=label)
    losses.set_yscale("log")
    losses.set_title("training losses (weighted)")
    ap.set_title("box AP at each poll ratio" if ap.get_lines() else "box AP: no evaluation in this log")
    ap.set_ylabel("box AP (%)")
    for ax in (losses, ap):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m util.plot_utils LOG [--out PNG]``: bad input ends in one line and exit status 2."""
    parser = argparse.ArgumentParser("python -m util.plot_utils", description="Training curves of a main.py log.txt.")
    parser.add_argument("log", help="log.txt of a main.py run")
    parser.add_argument("--out", default=None, help="PNG to write (default: curves.png beside the log)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.log).with_name("curves.png")

    def command() -> None:
        entries = read_log(args.log)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_training_curves(entries, out)
        print(out)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
