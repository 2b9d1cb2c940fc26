"""Plots of evaluation results."""
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state


def _label(row: dict[str, Any]) -> str:
    return "DETR" if row["ratio"] is None else f"r={row['ratio']:g}"


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path,
                  baseline: Optional[list[dict[str, Any]]] = None) -> None:
    """Save AP (%) against whole-model GFLOPs: one point per evaluated ratio.

    ``rows`` and ``baseline`` are ``eval.json`` rows with ``AP`` and ``gflops``; the
    baseline (a DETR evaluation) is drawn as separate reference points.
    """
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    points = sorted(rows, key=lambda row: row["gflops"])
    ax.plot([r["gflops"] for r in points], [100 * r["AP"] for r in points], "o-", label="this model")
    for row in points:
        ax.annotate(_label(row), (row["gflops"], 100 * row["AP"]), textcoords="offset points", xytext=(4, -10))
    for row in baseline or []:
        ax.plot(row["gflops"], 100 * row["AP"], "r*", markersize=12, label=f"baseline {_label(row)}")
    ax.set_xlabel("GFLOPs per image (multiply-adds)")
    ax.set_ylabel("box AP (%)")
    ax.set_title("Accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
