"""ONNX Runtime CPU latency against eager PyTorch, measured in one process.

    python -m tools.benchmark_onnx --threads 2                 # R50 and DC5 at 800x1216, r = 0.33 and 0.8
    python -m tools.benchmark_onnx --size 64 96 --ratios 0.5 --detr -- --backbone resnet18 --hidden_dim 32

For each backbone variant, PnP-DETR at each ``--ratios`` (and with ``--detr`` DETR: the same
weights without the sampler; ``benchmark.build_pair``, random weights) is exported as
``python -m tools.export_onnx`` exports a checkpoint (``util.onnx.export``, traced on the benchmark
image) and run on one random image (batch 1) by eager PyTorch and by ONNX Runtime's CPU
provider, both with ``--threads`` intra-op threads, taking turns (``benchmark.measure``).
Printed per model: median [fastest-slowest] ms of each, ONNX Runtime / eager, and the largest
absolute difference of their outputs; everything is written to ``--output`` (JSON).
"""
import argparse
import os
import sys
import tempfile
from typing import Any, Optional

import torch

from tools.benchmark import VARIANT_FLAGS, build_pair, device_name, json_row, measure, split_model_flags
from util.files import write_json
from util.onnx import INPUT_NAME, export, max_differences, output_names, require, session


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the main.py model flags given after ``--``."""
    argv, model_flags = split_model_flags(argv)
    p = argparse.ArgumentParser("PnP-DETR ONNX Runtime benchmark",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANT_FLAGS), choices=list(VARIANT_FLAGS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.33, 0.8])
    p.add_argument("--detr", action="store_true", help="also DETR (no sampler)")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each model and runtime")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads of PyTorch and of ONNX Runtime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmark_onnx.json", help="JSON result")
    return p.parse_args(argv), model_flags


def benchmark_variant(variant: str, model_flags: list[str], image: torch.Tensor, opts: argparse.Namespace,
                      folder: str) -> list[dict[str, Any]]:
    """Eager and ONNX Runtime latency of DETR and of PnP-DETR at every ratio, timed in turns."""
    label, (detr, _), (pnp, _) = build_pair(variant, model_flags, torch.device("cpu"), opts.seed)
    configs = [("DETR", detr.eval(), None)] if opts.detr else []
    configs += [("PnP-DETR", pnp.eval(), r) for r in opts.ratios]
    rows, calls = [], {}
    for i, (name, model, ratio) in enumerate(configs):
        path = os.path.join(folder, f"{variant}_{i}.onnx")
        detector = export(model, ratio, path, tuple(image.shape[-2:]), {"outputs": output_names(model)})
        runtime = session(path, opts.threads)
        difference = max_differences(detector, runtime, [tuple(image.shape[-2:])], opts.seed)[0]
        rows.append({"variant": label, "model": name, "ratio": ratio, "max_abs_difference": difference})

        def eager(detector=detector) -> None:
            with torch.no_grad():
                detector(image)

        def onnxruntime(runtime=runtime, pixels=image.numpy()) -> None:
            runtime.run(None, {INPUT_NAME: pixels})

        calls.update({(i, "eager"): eager, (i, "onnxruntime"): onnxruntime})
    for (i, key), timing in measure(calls, opts.repeats, opts.warmup, torch.device("cpu")).items():
        rows[i][key] = timing
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per model: eager and ONNX Runtime ms, their ratio, the difference."""
    lines = ["| model | r | eager ms | ONNX Runtime ms | ONNX Runtime / eager | max abs difference |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        speed = row["onnxruntime"].median / row["eager"].median
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:g}"
        lines.append(f"| {row['variant']} {row['model']} | {ratio} | {row['eager']} | {row['onnxruntime']} "
                     f"| {speed:.2f}x | {row['max_abs_difference']:.1e} |")
    return "\n".join(lines)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print its table, write the JSON report and return it."""
    opts, model_flags = parse_args(argv)
    torch.set_num_threads(opts.threads)
    height, width = opts.size
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(opts.seed))
    command = "python -m tools.benchmark_onnx " + " ".join(sys.argv[1:] if argv is None else argv)
    ort = require("onnxruntime", "python -m tools.benchmark_onnx")
    print(f"{command}\n{device_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, input {height}x{width}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in opts.variants:
            found = benchmark_variant(variant, model_flags, image, opts, folder)
            print(f"\n{found[0]['variant']}, batch 1, wall-clock ms: median [fastest-slowest]")
            print(format_rows(found))
            rows += found
            report = {"command": command, "device": device_name(torch.device("cpu")), "torch": torch.__version__,
                      "onnxruntime": ort.__version__, "input": [height, width],
                      "results": [json_row(row) for row in rows]}
            write_json(report, opts.output, indent=1)  # after every variant: a run cut short keeps what it measured
    print(f"\nwritten to {opts.output}")
    return report


if __name__ == "__main__":
    run()
