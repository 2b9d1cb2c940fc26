"""The least time the CPU demo's training can take on this machine, against the time it takes.

    python tools/demo_floor.py --config configs/demo.yaml --coco_path data/synthetic --threads 2

For both training steps of ``tools/demo.sh``, the backbone pretraining (``pretrain_backbone.py``)
and the detector (``main.py``; every other flag is main.py's, ``--config`` included), it counts
the FLOPs of one training image, forward and backward (multiply-adds of the convolutions,
matrix products and attention, as ``util.flops`` counts them), on real batches of the
training set, and times training steps on the same batches (data loading not included). This
machine's fp32 rate is that of a 2048 x 2048 matrix product, measured in the same run. The
floor of a recipe is its training images times their FLOPs at that rate: a large matrix product
is about the fastest fp32 arithmetic a CPU runs, so no layout or fusion gets much under the
floor, and the rest of a step (normalisation, the optimizer, Python) only adds to it.

With ``--states CHECKPOINT ...`` it also times the detector's training steps from each
checkpoint's model and AdamW state against the untrained start, taking turns on the same
batches in ``--rounds`` rounds: whether a trained state by itself steps slower, when a demo's
later epochs run slower than its first.

    python tools/demo_floor.py --config configs/demo.yaml --coco_path data/synthetic --threads 2 \
        --states outputs/demo/checkpoint0004.pth outputs/demo/checkpoint.pth
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS)]

import main as training  # noqa: E402
import pretrain_backbone  # noqa: E402
from engine import train_one_epoch  # noqa: E402
from models import build_model, fast_path  # noqa: E402
from util.checkpoint import load_model_weights, read_checkpoint  # noqa: E402
from util.errors import UserError, exit_status  # noqa: E402
from util.flops import flop_counter, gflops  # noqa: E402

PRODUCT_SIZE = 2048


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This tool's flags and main.py's (``--config`` included)."""
    p = argparse.ArgumentParser("tools/demo_floor.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Every other flag is main.py's (see python main.py --help).")
    p.add_argument("--pretrain_batch_size", type=int, default=8, help="pretraining batch (tools/demo.sh's)")
    p.add_argument("--pretrain_steps", type=int, default=1800, help="pretraining steps (tools/demo.sh's)")
    p.add_argument("--pretrain_lr", type=float, default=1e-3, help="pretraining lr (pretrain_backbone.py's)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps of each kind")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--states", nargs="+", default=[], metavar="CHECKPOINT",
                   help="also time the detector's steps from these checkpoints' model and optimizer state")
    p.add_argument("--rounds", type=int, default=3, help="turns of every state with --states")
    p.add_argument("--output", default=None, help="also write the result here (JSON)")
    args, rest = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.pretrain_steps < 1 or args.pretrain_batch_size < 1:
        raise UserError("--steps, --pretrain_steps and --pretrain_batch_size must be at least 1 and --warmup at "
                        f"least 0, got {args.steps}, {args.pretrain_steps}, {args.pretrain_batch_size}, {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    for path in args.states:
        if not os.path.isfile(path):
            raise UserError(f"--states: {path} does not exist")
    train = training.parse_args(rest)
    train.distributed = False
    return args, train


def product_rate(size: int = PRODUCT_SIZE, repeats: int = 10) -> float:
    """Multiply-adds per second of the fastest of ``repeats`` fp32 ``size x size`` matrix products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return size ** 3 / best


def first_batches(loader: Any, args: argparse.Namespace, flag: str) -> list:
    """The ``--warmup + --steps`` first batches of ``loader``; ``UserError`` if it has fewer."""
    batches = list(itertools.islice(loader, args.warmup + args.steps))
    if len(batches) < args.warmup + args.steps:
        raise UserError(f"--warmup {args.warmup} + --steps {args.steps} asks for more batches than the training set "
                        f"gives at {flag} {loader.batch_size or loader.batch_sampler.batch_size} ({len(batches)})")
    return batches


def measure(run: Callable[[list], int], batches: list) -> tuple[float, float]:
    """GFLOPs (multiply-adds) per image and images per second of training steps on ``batches``:
    ``run(batches)`` takes the steps and returns their image count; the count is taken on a
    second run over the same batches (weights change, FLOPs do not)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the training loop's own progress lines
        start = time.perf_counter()
        images = run(batches)
        seconds = time.perf_counter() - start
        with flop_counter() as counter:
            run(batches)
    return gflops(counter.get_total_flops()) / images, images / seconds


def pretraining_row(args: argparse.Namespace, train: argparse.Namespace, batches: list,
                    num_classes: int) -> dict[str, Any]:
    device = torch.device(train.device)
    model, optimizer = pretrain_backbone.build_pretraining(train, num_classes, args.pretrain_lr, device)

    def run(chosen: list) -> int:
        for samples, targets in chosen:
            pretrain_backbone.train_step(model, optimizer, samples, targets, num_classes, device)
        return sum(len(targets) for _, targets in chosen)

    run(batches[: args.warmup])
    per_image, rate = measure(run, batches[args.warmup:])
    return {"step": "pretraining", "batch_size": args.pretrain_batch_size,
            "images": args.pretrain_steps * args.pretrain_batch_size, "gflops_per_image": per_image, "images_per_s": rate}


def build_detector(train: argparse.Namespace, steps_per_epoch: int,
                   checkpoint: Optional[str] = None) -> Callable[[list], int]:
    """main.py's detector, criterion and AdamW, from ``checkpoint``'s model and optimizer state
    if given (else as built); returns ``run(batches)``: its training steps on ``batches``, which
    returns their image count. Every run draws the same poll ratios (one seed)."""
    device = torch.device(train.device)
    model, criterion, _ = build_model(train)
    fast_path(model.to(device), channels_last=not train.no_channels_last)
    criterion.to(device)
    optimizer, _ = training.build_optimizer(train, model, steps_per_epoch)
    if checkpoint is not None:
        state = read_checkpoint(checkpoint, "--states")
        load_model_weights(model, state["model"], checkpoint)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    bounds = (train.sample_ratio_lower_bound, train.sample_ratio_higher_bound) if model.uses_pnp else None

    def run(chosen: list) -> int:
        train_one_epoch(model, criterion, chosen, optimizer, device, 0, train.clip_max_norm, bounds,
                        train.amp, print_freq=len(chosen) + 1, rng=random.Random(train.seed))
        return sum(samples.tensors.shape[0] for samples, _ in chosen)

    return run


def detector_row(args: argparse.Namespace, train: argparse.Namespace, steps_per_epoch: int,
                 batches: list) -> dict[str, Any]:
    run = build_detector(train, steps_per_epoch)
    with contextlib.redirect_stdout(io.StringIO()):
        run(batches[: args.warmup])
    per_image, rate = measure(run, batches[args.warmup:])
    images = train.epochs * steps_per_epoch * train.batch_size
    return {"step": "detector", "batch_size": train.batch_size, "images": images, "gflops_per_image": per_image,
            "images_per_s": rate}


def state_rows(args: argparse.Namespace, train: argparse.Namespace, steps_per_epoch: int,
               batches: list) -> list[dict[str, Any]]:
    """img/s of the detector's steps from the untrained start and from each of ``--states``,
    taking turns on the same batches; the median of the rounds and its ratio to the start's."""
    runs = {"start": build_detector(train, steps_per_epoch)}
    runs.update({path: build_detector(train, steps_per_epoch, path) for path in args.states})
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with contextlib.redirect_stdout(io.StringIO()):
        for run in runs.values():
            run(batches[: args.warmup])
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                images = run(batches[args.warmup:])
                rates[name].append(images / (time.perf_counter() - start))
    start_rate = statistics.median(rates["start"])
    return [{"state": name, "images_per_s": values, "median": statistics.median(values),
             "vs_start": statistics.median(values) / start_rate} for name, values in rates.items()]


def report(args: argparse.Namespace, train: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    training.check_args(train)
    training.seed_everything(train.seed)
    dataset, _ = training.build_datasets(train)
    train.num_classes = train.num_classes or dataset.num_classes
    # every batch first (too few ends the run in one line), then the states (a checkpoint that
    # does not fit ends it too), both before minutes of measurement
    device = torch.device(train.device)
    pretraining_loader = pretrain_backbone.pretraining_loader(dataset, train, args.pretrain_batch_size, device)
    pretraining_batches = first_batches(pretraining_loader, args, "--pretrain_batch_size")
    loader = training.build_loaders(train, dataset, dataset)[0]  # the detector's (its validation loader unused)
    batches = first_batches(loader, args, "--batch_size")
    states = state_rows(args, train, len(loader), batches) if args.states else []
    rate = product_rate() / 1e9
    rows = [pretraining_row(args, train, pretraining_batches, train.num_classes),
            detector_row(args, train, len(loader), batches)]
    for row in rows:
        row["gflops_per_s"] = row["gflops_per_image"] * row["images_per_s"]
        row["of_product_rate"] = row["gflops_per_s"] / rate
        row["floor_s"] = row["images"] * row["gflops_per_image"] / rate
        row["measured_s"] = row["images"] / row["images_per_s"]
    return {"threads": torch.get_num_threads(), "product_gflops_per_s": rate, "rows": rows,
            "floor_s": sum(r["floor_s"] for r in rows), "measured_s": sum(r["measured_s"] for r in rows),
            "states": states}


def format_report(result: dict[str, Any]) -> str:
    lines = [f"fp32 {PRODUCT_SIZE} x {PRODUCT_SIZE} matrix product, {result['threads']} threads: "
             f"{result['product_gflops_per_s']:.1f} GFLOP/s (multiply-adds)",
             "| step | batch | GFLOPs / image | img/s | GFLOP/s | of the product rate | images | floor s | at the measured rate s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['batch_size']} | {r['gflops_per_image']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['gflops_per_s']:.1f} | {r['of_product_rate']:.2f} | {r['images']} | {r['floor_s']:.0f} | "
                     f"{r['measured_s']:.0f} |")
    lines.append(f"training: floor {result['floor_s']:.0f} s, at the measured rates {result['measured_s']:.0f} s "
                 f"({result['measured_s'] / result['floor_s']:.2f}x the floor)")
    if result["states"]:
        lines += ["", "| detector state | img/s by round | median | vs the start |", "|---|---|---|---|"]
        lines += [f"| {r['state']} | {', '.join(f'{v:.1f}' for v in r['images_per_s'])} | {r['median']:.1f} | "
                  f"{r['vs_start']:.2f}x |" for r in result["states"]]
    return "\n".join(lines)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args, train = parse_args(argv)
    result = report(args, train)
    print(format_report(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(exit_status(run))
