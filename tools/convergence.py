"""Convergence table: a metric after each epoch of several training runs, read from their log.txt.

    python -m tools.convergence faithful=outputs/conv_faithful dn=outputs/conv_dn \\
        --key test_ratio_0.5_coco_eval_bbox --output docs/benchmarks/convergence.json

Each run is ``NAME=OUTPUT_DIR`` (main.py's ``--output_dir``, trained with ``--eval_every``). The
value of an epoch is ``log[key]``, or its first element when it is a list (box AP of the COCO
statistics). Prints one markdown row per run, epochs as columns (blank where a run has no
evaluation or stopped earlier), and writes ``{name: {"epochs": [...], "values": [...]}}`` as
JSON to ``--output``.
"""
import argparse
import json
from pathlib import Path
from typing import Optional

from util.errors import UserError, exit_status
from util.files import write_json

DEFAULT_KEY = "test_ratio_0.5_coco_eval_bbox"


def read_run(output_dir: Path, key: str) -> dict[str, list]:
    """The epochs of ``output_dir/log.txt`` that hold ``key`` and the value of each."""
    log = output_dir / "log.txt"
    if not log.is_file():
        raise UserError(f"{log} does not exist: give main.py's --output_dir of a run")
    epochs, values = [], []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{log}, line {number}: not a JSON line of main.py's log") from None
        if key in entry:
            value = entry[key]
            epochs.append(entry.get("epoch", number - 1))
            values.append(value[0] if isinstance(value, list) else value)
    if not values:
        raise UserError(f"{log}: no epoch holds {key!r} (train with --eval_every, or pick another --key)")
    return {"epochs": epochs, "values": values}


def markdown(runs: dict[str, dict[str, list]], digits: int = 3) -> str:
    """One row per run, one column per epoch (numbered from 1)."""
    columns = sorted({epoch for run in runs.values() for epoch in run["epochs"]})
    lines = ["| run | " + " | ".join(f"epoch {e + 1}" if i == 0 else str(e + 1) for i, e in enumerate(columns)) + " |",
             "| --- |" + " --- |" * len(columns)]
    for name, run in runs.items():
        by_epoch = dict(zip(run["epochs"], run["values"]))
        cells = [f"{by_epoch[e]:.{digits}f}" if e in by_epoch else "" for e in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_run(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise UserError(f"run {text!r}: expected NAME=OUTPUT_DIR")
    return name, Path(folder)


def run(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser("python -m tools.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="NAME=OUTPUT_DIR of each training run")
    p.add_argument("--key", default=DEFAULT_KEY, help=f"the log.txt entry to tabulate (default: {DEFAULT_KEY})")
    p.add_argument("--output", default=None, help="JSON file to write the table to (default: print only)")
    args = p.parse_args(argv)
    runs = {}
    for text in args.runs:
        name, folder = parse_run(text)
        runs[name] = read_run(folder, args.key)
    print(markdown(runs))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json({"key": args.key, "runs": runs}, output, indent=1)


if __name__ == "__main__":
    raise SystemExit(exit_status(run))
