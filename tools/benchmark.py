"""Compute and speed of PnP-DETR against DETR, measured in one process.

    python tools/benchmark.py                                 # CPU, fp32: R50 and DC5 at 800x1216
    python tools/benchmark.py --device cuda --train_batch 4   # CUDA: fp32 and bf16 autocast
    python tools/benchmark.py --parts flops latency --variants r50
    python tools/benchmark.py --size 64 96 -- --backbone resnet18 --hidden_dim 32   # main.py flags after --

For each backbone variant (``r50``: C5, stride 32; ``dc5``: dilated C5, stride 16) DETR
(``--no_pnp``) and PnP-DETR are built with the same weights (only the sampler differs) and
measured on one random image (batch 1) per poll ratio:

- ``flops``: whole-model, transformer (sampler + encoder + decoder) and sampler GFLOPs,
  one multiply-add = one FLOP;
- ``latency``: inference time of the whole model, of the transformer alone (on the backbone
  features) and of the sampler alone: median, fastest and slowest of ``--repeats`` runs
  after ``--warmup`` runs;
- ``eval``: one evaluation step at the ``--eval_ratios`` (backbone once, then one pass per
  ratio) against the same step at the first of them only;
- ``train``: one training step (forward, loss, backward, gradient clipping, AdamW) on a
  batch of ``--train_batch`` images: time and peak memory of the tensors it allocates.

Every figure is also printed as a ratio to the DETR of the same variant, measured in the
same run; the checks of docs/BENCHMARKS.md are printed at the end, and everything is
written to ``--output`` (JSON).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
from models.detr import DETR, build  # noqa: E402
from util.flops import CONVENTION, count_flops  # noqa: E402

VARIANT_FLAGS = {"r50": [], "dc5": ["--dilation"]}
PARTS = ("flops", "latency", "eval", "train")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the main.py model flags given after ``--``."""
    argv = sys.argv[1:] if argv is None else argv
    model_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser("PnP-DETR benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANT_FLAGS), choices=list(VARIANT_FLAGS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.33, 0.5, 0.65, 0.8, 1.0])
    p.add_argument("--eval_ratios", nargs="+", type=float, default=main.TRAIN_EVAL_RATIOS)
    p.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--dtypes", nargs="+", default=None, choices=("fp32", "bf16"),
                   help="fp32 and/or bf16 autocast (default: fp32 on CPU, both on CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each inference measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--train_repeats", type=int, default=2, help="timed training steps per model")
    p.add_argument("--train_batch", type=int, default=2, help="images per training step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmark.json", help="JSON result")
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"]
    return args, model_flags


# ----------------------------------------------------------------------------- measuring
@dataclass
class Timing:
    """Seconds of repeated runs: median, fastest and slowest."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    def __str__(self) -> str:
        return f"{1000 * self.median:.1f} ({1000 * self.low:.0f}-{1000 * self.high:.0f})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> Timing:
    """Time ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing.of(seconds)


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors created while active (CPU keeps no allocator statistics).

    Every new storage an operator returns counts until it is freed; storages the operator
    received (in-place results, views) are not new.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        received = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in received or key in self._counted:
                continue
            self._counted.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """MB of tensor memory ``fn`` needs at its peak, above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with TensorMemory() as memory:
        fn()
    return memory.peak / 2**20


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ----------------------------------------------------------------------------- models
def build_pair(variant: str, model_flags: list[str], device: torch.device, seed: int):
    """DETR and PnP-DETR of one variant with the same weights; returns (label, detr, pnp)."""
    built = {}
    for name, extra in (("detr", ["--no_pnp"]), ("pnp", [])):
        args = main.parse_args(["--num_classes", "91", "--device", str(device), *VARIANT_FLAGS[variant],
                                *extra, *model_flags])
        torch.manual_seed(seed)
        built[name] = build(args)
    detr, pnp = built["detr"], built["pnp"]
    pnp[0].load_state_dict(detr[0].state_dict(), strict=False)  # all but the sampler
    label = ("DC5-" if args.dilation else "") + "R" + args.backbone.removeprefix("resnet")
    return label, detr[:2], pnp[:2]


def inference_timings(model: DETR, image: Tensor, ratio: Optional[float], opts: argparse.Namespace,
                      dtype: str, device: torch.device) -> dict[str, Timing]:
    """Whole model, transformer alone and (PnP) sampler alone on one image."""
    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            with torch.no_grad(), autocast(device, dtype):
                return fn()
        return wrapped

    features = run(lambda: model.extract_features(image))()
    src, mask, pos = features.src, features.mask, features.pos
    calls = {"latency": lambda: model.predict(model.extract_features(image), ratio),
             "transformer_latency": lambda: model.transformer(src, mask, model.query_embed.weight, pos, ratio)}
    if model.uses_pnp:
        calls["sampler_latency"] = lambda: model.transformer.sampler(src, mask, pos, ratio)
    return {name: measure(run(fn), opts.repeats, opts.warmup, device) for name, fn in calls.items()}


def eval_timings(model: DETR, image: Tensor, opts: argparse.Namespace, dtype: str,
                 device: torch.device) -> dict[str, Timing]:
    """Evaluation steps as ``engine.evaluate`` runs them: one backbone pass, then each ratio."""
    def step(ratios: list[float]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, dtype):
                features = model.extract_features(image)
                for ratio in ratios:
                    model.predict(features, ratio)
        return run

    return {"one_ratio": measure(step(opts.eval_ratios[:1]), opts.repeats, opts.warmup, device),
            "all_ratios": measure(step(opts.eval_ratios), opts.repeats, opts.warmup, device)}


def train_measures(model: DETR, criterion: torch.nn.Module, ratio: Optional[float], opts: argparse.Namespace,
                   dtype: str, device: torch.device) -> dict[str, Any]:
    """Time (``Timing``) and peak memory (MB) of one training step on random images and boxes."""
    height, width = opts.size
    gen = torch.Generator().manual_seed(opts.seed)
    images = torch.rand(opts.train_batch, 3, height, width, generator=gen).to(device)
    targets = [{"labels": torch.randint(0, 91, (4,), generator=gen).to(device),
                "boxes": (0.2 + 0.6 * torch.rand(4, 4, generator=gen)).to(device)}
               for _ in range(opts.train_batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    backbone = {id(p) for p in model.backbone.parameters()}
    optimizer = torch.optim.AdamW([{"params": [p for p in params if id(p) not in backbone]},
                                   {"params": [p for p in params if id(p) in backbone], "lr": 1e-5}],
                                  lr=1e-4, weight_decay=1e-4)
    weights = criterion.weight_dict
    model.train()

    def step() -> None:
        with autocast(device, dtype):
            outputs = model(images, ratio)
        losses = criterion(outputs, targets)
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()

    timing = measure(step, opts.train_repeats, 1, device)
    memory = peak_memory_mb(step, device)
    model.eval()
    return {"train_step": timing, "train_peak_mb": memory}


# ----------------------------------------------------------------------------- report
def _ratio_to(value: float, base: Optional[float]) -> str:
    return f"{value / base:5.2f}x" if base else "-"


def _median(row: dict[str, Any], key: str) -> Optional[float]:
    value = row.get(key)
    return value.median if isinstance(value, Timing) else value


COLUMNS = [("gflops", "GFLOPs", "{:8.2f}"), ("gflops_transformer", "trf GFLOPs", "{:10.2f}"),
           ("latency", "latency ms", "{}"), ("transformer_latency", "trf ms", "{}"),
           ("sampler_latency", "sampler ms", "{}"), ("train_step", "train ms", "{}"),
           ("train_peak_mb", "train MB", "{:8.0f}")]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One line per model: each measured figure, then its ratio to the DETR row (the first)."""
    base = rows[0]
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    header = f"{'model':<9} {'r':>5}" + "".join(f"  {title:>18} {'xDETR':>6}" for _, title, _ in columns)
    lines = [header]
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:g}"
        line = f"{row['model']:<9} {ratio:>5}"
        for key, _, fmt in columns:
            if key not in row:
                line += f"  {'':>18} {'':>6}"
                continue
            value, ref = _median(row, key), _median(base, key)
            line += f"  {fmt.format(row[key]):>18} {_ratio_to(value, ref):>6}"
        lines.append(line)
    return "\n".join(lines)


@dataclass
class Check:
    """One target of the issue, evaluated on this run's figures."""

    name: str
    value: float
    limit: float
    passed: bool


def checks(results: list[dict[str, Any]], evals: list[dict[str, Any]], device: torch.device) -> list[Check]:
    found = []
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        by_key.setdefault((row["variant"], row["dtype"]), []).append(row)
    for (variant, dtype), rows in by_key.items():
        detr, pnp = rows[0], rows[1:]
        where = f"{variant} {device.type} {dtype}"
        if pnp and "transformer_latency" in detr and "gflops_transformer" in detr:
            worst = max(pnp, key=lambda r: _latency_per_flop(r, detr))
            value = _latency_per_flop(worst, detr)
            found.append(Check(f"{where}: transformer latency ratio / FLOPs ratio, worst r={worst['ratio']:g}",
                               value, 1.15, value <= 1.15))
        if pnp and "latency" in detr and variant.startswith("DC5"):
            low = min(pnp, key=lambda r: r["ratio"])
            value = low["latency"].median / detr["latency"].median
            found.append(Check(f"{where}: whole-model latency at r={low['ratio']:g} / DETR", value, 0.5, value <= 0.5))
        if pnp and "sampler_latency" in pnp[0]:
            low = min(pnp, key=lambda r: r["ratio"])
            value = low["sampler_latency"].median / low["transformer_latency"].median
            found.append(Check(f"{where}: sampler / transformer latency at r={low['ratio']:g}", value, 0.05, value < 0.05))
    for row in evals:
        value = row["all_ratios"].median / row["one_ratio"].median
        found.append(Check(f"{row['variant']} {device.type} {row['dtype']}: evaluation at {row['ratios']} / at "
                           f"{row['ratios'][:1]}", value, 1.6, value <= 1.6))
    for (variant, dtype), rows in by_key.items():
        fp32 = by_key.get((variant, "fp32"))
        if dtype == "bf16" and fp32 and "train_step" in rows[0]:
            value = fp32[0]["train_step"].median / rows[0]["train_step"].median
            found.append(Check(f"{variant} {device.type}: bf16 training step speed-up over fp32 (DETR)",
                               value, 1.7, value >= 1.7))
    return found


def _latency_per_flop(row: dict[str, Any], detr: dict[str, Any]) -> float:
    latency = row["transformer_latency"].median / detr["transformer_latency"].median
    return latency / (row["gflops_transformer"] / detr["gflops_transformer"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- main
def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    opts, model_flags = parse_args(argv)
    device = torch.device(opts.device)
    torch.set_num_threads(opts.threads)
    height, width = opts.size
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{device_name(device)}, torch {torch.__version__}, input {height}x{width}\n{CONVENTION}")

    results: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for variant in opts.variants:
        label, (detr, detr_criterion), (pnp, pnp_criterion) = build_pair(variant, model_flags, device, opts.seed)
        configs = [(detr, detr_criterion, "DETR", None)] + [(pnp, pnp_criterion, "PnP-DETR", r) for r in opts.ratios]
        for model in (detr, pnp):
            model.to(device).eval()
        flops = {}
        if "flops" in opts.parts:
            flops[id(detr)] = count_flops(detr, image[0], [None])
            flops[id(pnp)] = count_flops(pnp, image[0], opts.ratios)
        for dtype in opts.dtypes:
            rows = []
            for model, criterion, name, ratio in configs:
                row: dict[str, Any] = {"variant": label, "model": name, "ratio": ratio, "dtype": dtype}
                if flops:
                    counted = flops[id(model)][ratio]
                    row.update(gflops=counted.total, gflops_transformer=counted.transformer,
                               gflops_sampler=counted.sampler)
                if "latency" in opts.parts:
                    row.update(inference_timings(model, image, ratio, opts, dtype, device))
                rows.append(row)
            if "eval" in opts.parts:
                evals.append({"variant": label, "dtype": dtype, "ratios": opts.eval_ratios,
                              **eval_timings(pnp, image, opts, dtype, device)})
            if "train" in opts.parts:
                for row, (model, criterion, _, ratio) in zip(rows, configs):
                    row.update(train_measures(model, criterion.to(device), ratio, opts, dtype, device))
            print(f"\n{label}, {device.type} {dtype}, batch 1 (training: batch {opts.train_batch}); "
                  "ms: median (fastest-slowest)")
            print(format_rows(rows))
            results.extend(rows)
    for row in evals:
        print(f"\n{row['variant']} {row['dtype']} evaluation step: ratios {row['ratios']} {row['all_ratios']} ms, "
              f"ratio {row['ratios'][0]} alone {row['one_ratio']} ms: "
              f"{row['all_ratios'].median / row['one_ratio'].median:.2f}x")

    found = checks(results, evals, device)
    print("\nchecks:")
    for check in found:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.value:.3f} (limit {check.limit})")
    report = {"command": command, "device": device_name(device), "torch": torch.__version__,
              "input": [height, width], "convention": CONVENTION,
              "results": [_plain(row) for row in results], "eval": [_plain(row) for row in evals],
              "checks": [asdict(check) for check in found]}
    with open(opts.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwritten to {opts.output}")
    return report


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: asdict(v) if isinstance(v, Timing) else v for k, v in row.items()}


if __name__ == "__main__":
    run()
