"""Training speed of the detector with the training accelerators against the faithful recipe,
measured in one process.

    python -m tools.benchmark_train --threads 2 --output accelerators.json -- --config configs/demo.yaml \\
        --coco_path data/synthetic --backbone_weights outputs/demo/backbone.pth

Every variant is main.py's model, loss and optimiser built from the flags after ``--`` plus the
variant's own (``NAME=FLAGS``; by default the faithful recipe, ``--dn_groups`` 5 and 10,
``--query_groups 3``, ``--encoder_head 1``, ``--ema_decay`` and combinations of them: ``DEFAULT_VARIANTS``).
Each trains one pass over the same first ``--images`` training images at its own ``--batch_size``
(``engine.train_one_epoch``: data loading, forward, matching, loss, backward, the optimiser step
and the update of the moving average), the variants taking turns ``--repeats`` times, so that a
slow spell of a shared machine hits them alike; the fastest pass of each is reported with its
ratio to the first variant's. With ``--output`` the results are also written as JSON.
"""
import argparse
import random
import shlex
import time
from typing import Any, Optional

import torch
from torch.utils.data import Subset

import main
from engine import train_one_epoch
from models import build_model
from tools.benchmark import device_name, split_model_flags
from util.errors import UserError, exit_status
from util.files import write_json

DEFAULT_VARIANTS = [f"{name}=--dn_groups {dn} --query_groups {groups} --encoder_head {head} --ema_decay {ema}"
                    for name, dn, groups, head, ema in [
                        ("faithful", 0, 1, 0, 0), ("dn5", 5, 1, 0, 0), ("dn10", 10, 1, 0, 0), ("g3", 0, 3, 0, 0),
                        ("enc1", 0, 1, 1, 0), ("ema", 0, 1, 0, 0.9999), ("dn5_enc1", 5, 1, 1, 0),
                        ("dn5_enc1_ema", 5, 1, 1, 0.9999), ("dn10_g3", 10, 3, 0, 0), ("dn10_g3_enc1", 10, 3, 1, 0)]]


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the main.py flags given after ``--``."""
    argv, model_flags = split_model_flags(argv)
    p = argparse.ArgumentParser("python -m tools.benchmark_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME=FLAGS",
                   help="the variants; the first is the baseline of the ratios")
    p.add_argument("--images", type=int, default=320, help="training images per timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each variant")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--output", default=None, metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv), model_flags


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise UserError(f"--variants {text!r}: expected NAME=FLAGS, e.g. 'dn5=--dn_groups 5'")
    return name, shlex.split(flags)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    opts, model_flags = parse_args(argv)
    torch.set_num_threads(opts.threads)
    variants = dict(parse_variant(text) for text in opts.variants)
    base = main.parse_args(model_flags)
    base.distributed = False
    dataset_train, dataset_val = main.build_datasets(base)
    base.num_classes = base.num_classes or dataset_val.num_classes
    if len(dataset_train) < opts.images:
        raise UserError(f"--images {opts.images}: the training split holds only {len(dataset_train)} images")
    images = Subset(dataset_train, range(opts.images))
    device = torch.device(base.device)
    built = {}
    for name, flags in variants.items():
        args = main.parse_args(model_flags + flags)
        args.num_classes, args.distributed = base.num_classes, False
        main.check_args(args)
        torch.manual_seed(0)
        model, criterion, _ = build_model(args)
        model.to(device)
        loader, _ = main.build_loaders(args, images, dataset_val)  # at the variant's --batch_size
        optimizer, _ = main.build_optimizer(args, model, len(loader))
        average = main.build_weight_average(args, model)
        built[name] = (args, model, criterion, optimizer, loader, main.average_steps(average, model, 0, len(loader)))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(opts.repeats):
        for name, (args, model, criterion, optimizer, loader, after_step) in built.items():
            start = time.perf_counter()
            train_one_epoch(model, criterion, loader, optimizer, device, 0, args.clip_max_norm,
                            (args.sample_ratio_lower_bound, args.sample_ratio_higher_bound), print_freq=10**9,
                            rng=random.Random(0), after_step=after_step, model_takes_targets=True)
            seconds[name].append(time.perf_counter() - start)
    baseline = min(next(iter(seconds.values())))
    rows = [{"variant": name, "flags": " ".join(variants[name]), "seconds": min(times), "runs": times,
             "images_per_s": opts.images / min(times), "ratio": min(times) / baseline}
            for name, times in seconds.items()]
    print(f"{device_name(device)}; one training pass over {opts.images} images, "
          f"fastest of {opts.repeats}; (x) = ratio to {rows[0]['variant']}")
    print("| variant | flags | seconds | images/s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | `{row['flags']}` | {row['seconds']:.2f} ({row['ratio']:.2f}x) | "
              f"{row['images_per_s']:.1f} |")
    report = {"device": device_name(device), "threads": opts.threads, "images": opts.images,
              "model_flags": model_flags, "results": rows}
    if opts.output:
        write_json(report, opts.output, indent=1)
    return report


if __name__ == "__main__":
    raise SystemExit(exit_status(run))
