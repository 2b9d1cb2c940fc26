"""Compute and speed of PnP-DETR against DETR, measured in one process.

    python -m tools.benchmark                                 # CPU, fp32: R50 and DC5 at 800x1216
    python -m tools.benchmark --device cuda --train_batch 4   # CUDA: fp32 and bf16 autocast
    python -m tools.benchmark --parts flops latency --variants r50
    python -m tools.benchmark --size 64 96 -- --backbone resnet18 --hidden_dim 32   # main.py flags after --

For each backbone variant (``r50``: C5, stride 32; ``dc5``: dilated C5, stride 16) DETR
(``--no_pnp``) and PnP-DETR are built with the same weights (only the sampler differs) and
measured on one random image (batch 1) per poll ratio, on the fast path every entry point takes
(``models.fast_path``; ``-- --no_channels_last`` keeps the contiguous layout):

- ``flops``: whole-model, transformer (sampler + encoder + decoder) and sampler GFLOPs,
  one multiply-add = one FLOP;
- ``latency``: inference time of the whole model, of the transformer alone (on the backbone
  features), of its encoder and its decoder alone, and of the sampler alone (under
  ``--compile`` each of these is compiled too, so every column compares compiled code):
  median, fastest and slowest of ``--repeats`` runs after ``--warmup`` runs;
- ``eval``: one evaluation step at the ``--eval_ratios`` (backbone once, then one pass per
  ratio) against the same step at the first of them only;
- ``train``: one training step (forward, loss, backward, gradient clipping, AdamW) on a
  batch of ``--train_batch`` images: time and peak memory of the tensors it allocates.

Every figure is also printed as a ratio to the DETR of the same variant, measured in the
same run, and everything is written to ``--output`` (JSON).
"""
import argparse
import platform
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import main
from models import fast_path
from models.detr import DETR, build
from util.files import write_json
from util.misc import slow_bf16_warning
from util.flops import CONVENTION, count_flops

VARIANT_FLAGS = {"r50": [], "dc5": ["--dilation"]}
PARTS = ("flops", "latency", "eval", "train")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def split_model_flags(argv: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """A benchmark's command line (``sys.argv[1:]`` when None) as its own options and the main.py
    flags given after ``--``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options, and the main.py model flags given after ``--``."""
    argv, model_flags = split_model_flags(argv)
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbones and transformers as main.py --compile does (in the warm-up)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall: elapsed time; cpu: CPU time of this process (CPU only: with --threads 1, the "
                        "latency a quiet machine would show, even on a busy one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmark.json", help="JSON result")
    args = p.parse_args(argv)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        p.error("--clock cpu measures CPU time: use it with --device cpu")
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
        return f"{1000 * self.median:.1f} [{1000 * self.low:.1f}-{1000 * self.high:.1f}]"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(calls: dict[Hashable, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
            clock: Callable[[], float] = time.perf_counter) -> dict[Hashable, Timing]:
    """Time each call ``repeats`` times after ``warmup`` untimed rounds (CUDA synchronised).

    The calls take turns (round-robin), so a slow spell of a shared machine hits them alike.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    seconds: dict[Hashable, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            seconds[key].append(clock() - start)
    return {key: Timing.of(values) for key, values in seconds.items()}


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
        fast_path(built[name][0], channels_last=not args.no_channels_last)
    detr, pnp = built["detr"], built["pnp"]
    pnp[0].load_state_dict(detr[0].state_dict(), strict=False)  # all but the sampler
    label = ("DC5-" if args.dilation else "") + "R" + args.backbone.removeprefix("resnet")
    return label, detr[:2], pnp[:2]


def inference_calls(model: DETR, image: Tensor, ratio: Optional[float], dtype: str,
                    device: torch.device, compile_parts: bool = False) -> dict[str, Callable[[], Any]]:
    """Whole model, transformer alone, its encoder and decoder alone, and (PnP) the sampler alone,
    on one image; with ``compile_parts`` the last three run through ``torch.compile``."""
    def run(fn: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            with torch.no_grad(), autocast(device, dtype):
                return fn()
        return wrapped

    transformer = model.transformer
    features = run(lambda: model.extract_features(image))()
    src, mask, pos, num_valid = features.src, features.mask, features.pos, features.num_valid
    tokens, token_pos, padding, _ = run(lambda: transformer.encoder_inputs(src, mask, pos, ratio, num_valid))()
    memory = run(lambda: transformer.encoder(tokens, padding, token_pos))()
    query_pos = model.query_embed.weight[None].expand(image.shape[0], -1, -1)
    encoder, decoder, sampler = transformer.encoder, transformer.decoder, transformer.sampler
    if compile_parts:
        encoder, decoder = torch.compile(encoder), torch.compile(decoder)
        sampler = sampler and torch.compile(sampler)
    calls = {"latency": lambda: model.predict(model.extract_features(image), ratio),
             "transformer_latency": lambda: transformer(src, mask, model.query_embed.weight, pos, ratio, num_valid),
             "encoder_latency": lambda: encoder(tokens, padding, token_pos),
             "decoder_latency": lambda: decoder(torch.zeros_like(query_pos), memory, padding, token_pos, query_pos)}
    if sampler is not None:
        calls["sampler_latency"] = lambda: sampler(src, mask, pos, ratio, num_valid)
    return {name: run(fn) for name, fn in calls.items()}


def eval_calls(model: DETR, image: Tensor, ratios: list[float], dtype: str,
               device: torch.device) -> dict[str, Callable[[], None]]:
    """Evaluation steps as ``engine.evaluate`` runs them (one backbone pass, then each ratio),
    at every ratio and at the first one alone."""
    def step(chosen: list[float]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(device, dtype):
                features = model.extract_features(image)
                for ratio in chosen:
                    model.predict(features, ratio)
        return run

    return {"one_ratio": step(ratios[:1]), "all_ratios": step(ratios)}


def training_batch(opts: argparse.Namespace, device: torch.device) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Random images of ``--size`` and four random boxes per image."""
    height, width = opts.size
    gen = torch.Generator().manual_seed(opts.seed)
    images = torch.rand(opts.train_batch, 3, height, width, generator=gen).to(device)
    targets = [{"labels": torch.randint(0, 91, (4,), generator=gen).to(device),
                "boxes": (0.2 + 0.6 * torch.rand(4, 4, generator=gen)).to(device)}
               for _ in range(opts.train_batch)]
    return images, targets


def optimizer_for(model: DETR) -> torch.optim.Optimizer:
    """AdamW as published (lr 1e-4, backbone 1e-5, weight decay 1e-4), fused as main.py's."""
    backbone = {id(p) for p in model.backbone.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if id(p) not in backbone]},
                              {"params": [p for p in params if id(p) in backbone], "lr": 1e-5}],
                             lr=1e-4, weight_decay=1e-4, fused=True)


def training_step(model: DETR, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batch: tuple[Tensor, list[dict[str, Tensor]]], ratio: Optional[float], dtype: str,
                  device: torch.device) -> Callable[[], None]:
    """One step as ``engine.train_one_epoch`` takes it: forward, loss, backward, clipping, AdamW."""
    images, targets = batch
    weights = criterion.weight_dict

    def step() -> None:
        with autocast(device, dtype):
            outputs = model(images, ratio)
        losses = criterion(outputs, targets)
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    return step


# ----------------------------------------------------------------------------- report
COLUMNS = [("gflops", "GFLOPs", "{:.2f}"), ("gflops_transformer", "transformer GFLOPs", "{:.2f}"),
           ("latency", "latency ms", "{}"), ("transformer_latency", "transformer ms", "{}"),
           ("encoder_latency", "encoder ms", "{}"), ("decoder_latency", "decoder ms", "{}"),
           ("sampler_latency", "sampler ms", "{}"), ("train_step", "train step ms", "{}"),
           ("train_peak_mb", "train peak MB", "{:.0f}")]


def _value(figure: Any) -> float:
    return figure.median if isinstance(figure, Timing) else figure


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per model: each figure and its ratio to DETR (the first row)."""
    detr = rows[0]
    columns = [column for column in COLUMNS if any(column[0] in row for row in rows)]
    lines = ["| model | r | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["model"], "-" if row["ratio"] is None else f"{row['ratio']:g}"]
        for key, _, fmt in columns:
            figure = row.get(key)
            ratio = f" ({_value(figure) / _value(detr[key]):.2f}x)" if figure is not None and detr.get(key) else ""
            cells.append("-" if figure is None else fmt.format(figure) + ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
@dataclass
class Config:
    """One measured model: DETR (ratio None) or PnP-DETR at one poll ratio."""

    name: str
    model: DETR
    criterion: torch.nn.Module
    ratio: Optional[float]


def benchmark_dtype(configs: list[Config], label: str, dtype: str, image: Tensor, opts: argparse.Namespace,
                    device: torch.device) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Timed figures of every config in one dtype: table rows, and the evaluation row (if asked)."""
    rows = [{"variant": label, "model": c.name, "ratio": c.ratio, "dtype": dtype} for c in configs]
    calls: dict[Hashable, Callable[[], Any]] = {}
    if "latency" in opts.parts:
        for i, c in enumerate(configs):
            calls.update({(i, key): fn for key, fn
                          in inference_calls(c.model, image, c.ratio, dtype, device, opts.compile).items()})
    pnp = next(c.model for c in configs if c.name == "PnP-DETR")
    if "eval" in opts.parts:
        calls.update({("eval", key): fn for key, fn in eval_calls(pnp, image, opts.eval_ratios, dtype, device).items()})
    timings = measure(calls, opts.repeats, opts.warmup, device, CLOCKS[opts.clock])
    for (i, key), timing in timings.items():
        if i != "eval":
            rows[i][key] = timing
    evaluation = None
    if "eval" in opts.parts:
        evaluation = {"variant": label, "dtype": dtype, "ratios": opts.eval_ratios,
                      "one_ratio": timings["eval", "one_ratio"], "all_ratios": timings["eval", "all_ratios"]}
    if "train" in opts.parts:
        batch = training_batch(opts, device)
        models = {id(c.model): c.model for c in configs}
        optimizers = {key: optimizer_for(model) for key, model in models.items()}
        steps = {i: training_step(c.model, c.criterion, optimizers[id(c.model)], batch, c.ratio, dtype, device)
                 for i, c in enumerate(configs)}
        for model in models.values():
            model.train()
        for i, timing in measure(steps, opts.train_repeats, 1, device, CLOCKS[opts.clock]).items():
            rows[i].update(train_step=timing, train_peak_mb=peak_memory_mb(steps[i], device))
        for model in models.values():
            model.eval()
    return rows, evaluation


def benchmark_variant(variant: str, model_flags: list[str], image: Tensor, opts: argparse.Namespace,
                      device: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """DETR and PnP-DETR of one backbone variant in every dtype: printed, and returned as rows."""
    label, (detr, detr_criterion), (pnp, pnp_criterion) = build_pair(variant, model_flags, device, opts.seed)
    for module in (detr, pnp, detr_criterion, pnp_criterion):
        module.to(device).eval()
    configs = [Config("DETR", detr, detr_criterion, None)]
    configs += [Config("PnP-DETR", pnp, pnp_criterion, r) for r in opts.ratios]
    flops = {}
    if "flops" in opts.parts:
        flops = {None: count_flops(detr, image[0], [None])[None], **count_flops(pnp, image[0], opts.ratios)}
    if opts.compile:
        for model in (detr, pnp):
            model.backbone.compile()
            model.transformer.compile()
    results, evals = [], []
    for dtype in opts.dtypes:
        rows, evaluation = benchmark_dtype(configs, label, dtype, image, opts, device)
        for row in rows:
            if flops:
                counted = flops[row["ratio"]]
                row.update(gflops=counted.total, gflops_transformer=counted.transformer, gflops_sampler=counted.sampler)
        print(f"\n{label}, {device.type} {dtype}, batch 1 (training: batch {opts.train_batch}); "
              f"{opts.clock}-clock ms: median [fastest-slowest]; (x) = ratio to DETR")
        print(format_rows(rows))
        if evaluation:
            print(f"\nevaluation step at ratios {opts.eval_ratios}: {evaluation['all_ratios']} ms, at "
                  f"{opts.eval_ratios[0]} alone: {evaluation['one_ratio']} ms "
                  f"({evaluation['all_ratios'].median / evaluation['one_ratio'].median:.2f}x)")
            evals.append(evaluation)
        results += rows
    return results, evals


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print its tables, write the JSON report and return it."""
    opts, model_flags = parse_args(argv)
    device = torch.device(opts.device)
    torch.set_num_threads(opts.threads)
    height, width = opts.size
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(opts.seed)).to(device)
    command = "python -m tools.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{command}\n{device_name(device)}, torch {torch.__version__}, input {height}x{width}\n{CONVENTION}")
    if "bf16" in opts.dtypes and slow_bf16_warning(device):
        print(slow_bf16_warning(device).replace("--amp", "bf16"))

    results: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for variant in opts.variants:
        rows, evaluations = benchmark_variant(variant, model_flags, image, opts, device)
        results += rows
        evals += evaluations
        report = {"command": command, "device": device_name(device), "torch": torch.__version__,
                  "input": [height, width], "clock": opts.clock, "convention": CONVENTION,
                  "results": [json_row(row) for row in results], "eval": [json_row(row) for row in evals]}
        write_json(report, opts.output, indent=1)  # after every variant: a run cut short keeps what it measured
    print(f"\nwritten to {opts.output}")
    return report


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as JSON takes it: every ``Timing`` as a dict."""
    return {k: asdict(v) if isinstance(v, Timing) else v for k, v in row.items()}


if __name__ == "__main__":
    run()
