"""Compute and speed of PnP-ViT against the plain ViT, measured in one process.

    python -m tools.benchmark_vit --threads 2 --output vit.json   # CPU: DeiT-S and ViT-B/16 at 224
    python -m tools.benchmark_vit --archs demo --size 64 -- --patch_size 8    # main.py flags after --

For each ``--vit_arch`` the plain ViT (``--no_pnp``) and PnP-ViT are built from the same flags
with the same weights (random; only the sampler differs) and measured on one random image
(batch 1) at every poll ratio: GFLOPs of the whole model (one multiply-add = one FLOP) and
inference latency (median, fastest and slowest of ``--repeats`` runs after ``--warmup``; the
models take turns, so a slow spell of a shared machine hits them alike). Every figure is also
printed as a ratio to the plain ViT of the same run, and with ``--output`` written to that file
(JSON). The timing and the table are ``tools.benchmark``'s.
"""
import argparse
import sys
from typing import Any, Callable, Hashable, Optional

import torch
from torch import Tensor

import main
from models.vit import VIT_ARCHS, PnPViT, build_vit
from tools.benchmark import CLOCKS, device_name, format_rows, json_row, measure, split_model_flags
from util.files import write_json
from util.flops import CONVENTION, count_flops

ARCH_LABELS = {"deit_small": "DeiT-S", "vit_base": "ViT-B"}


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the main.py model flags given after ``--``."""
    argv, model_flags = split_model_flags(argv)
    p = argparse.ArgumentParser("PnP-ViT benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", nargs="+", default=["deit_small", "vit_base"], choices=list(VIT_ARCHS),
                   help="--vit_arch of each measured pair")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.33, 0.5, 0.65, 0.8, 1.0])
    p.add_argument("--size", type=int, default=224, help="image side (main.py --input_size)")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=11, help="timed runs of each model")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall: elapsed time; cpu: CPU time of this process (see python -m tools.benchmark --help)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "--json", default=None, metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv), model_flags


def build_pair(arch: str, opts: argparse.Namespace, model_flags: list[str]) -> tuple[PnPViT, PnPViT]:
    """The plain ViT and PnP-ViT of ``arch`` from main.py's flags, with the same weights."""
    built = {}
    for name, extra in (("vit", ["--no_pnp"]), ("pnp", [])):
        args = main.parse_args(["--task", "classification", "--vit_arch", arch, "--input_size", str(opts.size),
                                "--num_classes", str(opts.num_classes), *extra, *model_flags])
        torch.manual_seed(opts.seed)
        built[name] = build_vit(args).eval()
    missing, unexpected = built["pnp"].load_state_dict(built["vit"].state_dict(), strict=False)
    assert not unexpected and all(key.startswith("sampler.") for key in missing)
    return built["vit"], built["pnp"]


def benchmark_arch(arch: str, image: Tensor, opts: argparse.Namespace, model_flags: list[str],
                   device: torch.device) -> list[dict[str, Any]]:
    """Rows of the plain ViT (ratio None) and of PnP-ViT at every ratio: GFLOPs and latency."""
    vit, pnp = (model.to(device) for model in build_pair(arch, opts, model_flags))
    label = f"{ARCH_LABELS.get(arch, arch)}/{vit.patch_embed.patch_size[0]}"
    flops = {None: count_flops(vit, image[0], [None])[None], **count_flops(pnp, image[0], opts.ratios)}
    configs = [("ViT", vit, None)] + [("PnP-ViT", pnp, ratio) for ratio in opts.ratios]
    calls: dict[Hashable, Callable[[], Any]] = {}
    for index, (_, model, ratio) in enumerate(configs):
        calls[index] = torch.no_grad()(lambda model=model, ratio=ratio: model(image, ratio))
    timings = measure(calls, opts.repeats, opts.warmup, device, CLOCKS[opts.clock])
    return [{"arch": label, "model": name, "ratio": ratio, "gflops": flops[ratio].total,
             "gflops_sampler": flops[ratio].sampler, "latency": timings[index]}
            for index, (name, _, ratio) in enumerate(configs)]


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print one table per architecture, write the JSON (``--output``) and return it."""
    opts, model_flags = parse_args(argv)
    device = torch.device(opts.device)
    torch.set_num_threads(opts.threads)
    image = torch.rand(1, 3, opts.size, opts.size, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    command = "python -m tools.benchmark_vit " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{device_name(device)}, torch {torch.__version__}, input {opts.size}x{opts.size}\n{CONVENTION}")
    results: list[dict[str, Any]] = []
    for arch in opts.archs:
        rows = benchmark_arch(arch, image, opts, model_flags, device)
        print(f"\n{rows[0]['arch']}, {device.type} fp32, batch 1; {opts.clock}-clock latency ms: "
              "median [fastest-slowest]; (x) = ratio to the plain ViT")
        print(format_rows(rows))
        results += rows
    report = {"command": command, "device": device_name(device), "torch": torch.__version__,
              "input": [opts.size, opts.size], "clock": opts.clock, "convention": CONVENTION,
              "results": [json_row(row) for row in results]}
    if opts.output:
        write_json(report, opts.output, indent=1)
        print(f"\nwritten to {opts.output}")
    return report


if __name__ == "__main__":
    run()
