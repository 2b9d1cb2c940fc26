"""Batching of variable-size images, distributed helpers and progress logging."""
from __future__ import annotations

import builtins
import datetime
import os
import sys
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from util.errors import UserError


# ----------------------------------------------------------------------------- batching
class NestedTensor:
    """A batch of images padded to a common size.

    ``tensors``: ``(B, C, H, W)``; ``mask``: ``(B, H, W)`` bool, True on padding.
    ``image_sizes``: each image's ``(height, width)`` before padding, when known, as host
    integers: the mask is then False exactly on that top-left rectangle. Code that needs the
    number of unpadded positions reads it from here instead of from the mask, which on a GPU
    would wait for the device.
    """

    def __init__(self, tensors: Tensor, mask: Optional[Tensor],
                 image_sizes: Optional[list[tuple[int, int]]] = None):
        self.tensors = tensors
        self.mask = mask
        self.image_sizes = image_sizes

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask, self.image_sizes)

    def pin_memory(self) -> "NestedTensor":
        """A copy in page-locked host memory (what a DataLoader with ``pin_memory`` calls), from
        which ``to(cuda, non_blocking=True)`` copies without waiting."""
        mask = None if self.mask is None else self.mask.pin_memory()
        return NestedTensor(self.tensors.pin_memory(), mask, self.image_sizes)

    def decompose(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={None if self.mask is None else tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: list[Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pad ``(C, H_i, W_i)`` images at the bottom/right into one ``NestedTensor`` whose height
    and width are the largest ones rounded up to a multiple of ``size_divisibility``."""
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image")
    if any(t.dim() != 3 for t in tensor_list):
        raise ValueError("nested_tensor_from_tensor_list expects (C, H, W) tensors, got shapes "
                         f"{[tuple(t.shape) for t in tensor_list]}")
    channels = tensor_list[0].shape[0]
    height = -(-max(t.shape[1] for t in tensor_list) // size_divisibility) * size_divisibility
    width = -(-max(t.shape[2] for t in tensor_list) // size_divisibility) * size_divisibility
    first = tensor_list[0]
    tensor = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for image, padded, pad_mask in zip(tensor_list, tensor, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        pad_mask[: image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensor, mask, [(t.shape[1], t.shape[2]) for t in tensor_list])


def to_nested_tensor(samples: NestedTensor | Tensor | list[Tensor]) -> NestedTensor:
    """Accept a NestedTensor, a ``(B, C, H, W)`` tensor (no padding) or a list of ``(C, H, W)``."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, Tensor) and samples.dim() == 4:
        mask = torch.zeros(samples.shape[0], *samples.shape[2:], dtype=torch.bool, device=samples.device)
        return NestedTensor(samples, mask, [tuple(samples.shape[2:])] * samples.shape[0])
    if isinstance(samples, (list, tuple)) or (isinstance(samples, Tensor) and samples.dim() == 3):
        images = [samples] if isinstance(samples, Tensor) else list(samples)
        return nested_tensor_from_tensor_list(images)
    raise TypeError("expected a NestedTensor, a (B, C, H, W) tensor or a list of (C, H, W) tensors, "
                    f"got {type(samples).__name__}")


def collate_fn(batch: list[tuple[Tensor, dict]], size_divisibility: int = 1
               ) -> tuple[NestedTensor, tuple[dict, ...]]:
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images), size_divisibility), targets


def padded_targets(targets: list[dict[str, Tensor]], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's ``labels (B, P)``, ``boxes (B, P, 4)`` and ``valid (B, P)`` (False on padding),
    P = max(1, most boxes in an image); a padding slot holds label 0 and the box (0.5, 0.5, 0.5, 0.5)."""
    size = max([1] + [len(t["labels"]) for t in targets])
    labels = torch.zeros(len(targets), size, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), size, 4), 0.5, device=device)
    valid = torch.zeros(len(targets), size, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        count = len(t["labels"])
        labels[b, :count] = t["labels"]
        boxes[b, :count] = t["boxes"].float()
        valid[b, :count] = True
    return labels, boxes, valid


# ----------------------------------------------------------------------------- distributed
def slow_bf16_warning(device: torch.device) -> Optional[str]:
    """A one-line warning when bf16 autocast on ``device`` will be slower than fp32: a CPU
    without native bf16 (AMX or AVX512-BF16) emulates it; None on CUDA and on such CPUs."""
    if device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return ("warning: --amp: this CPU has no native bf16 (AMX or AVX512-BF16): bf16 autocast runs, "
            "but slower than fp32 (see docs/BENCHMARKS.md)")


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather(data: Any) -> list[Any]:
    """Gather any picklable object from every process; returns one entry per rank."""
    if get_world_size() == 1:
        return [data]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def gather(data: Any, dst: int) -> Optional[list[Any]]:
    """Gather any picklable object from every process on rank ``dst`` only: one entry per rank
    there, ``None`` on the other ranks."""
    if get_world_size() == 1:
        return [data]
    gathered: Optional[list[Any]] = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(data, gathered, dst=dst)
    return gathered


def owner_rank(index: int) -> int:
    """The rank that does job ``index`` of jobs dealt round-robin over the processes."""
    return index % get_world_size()


def run_spread(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run job ``i`` on rank ``owner_rank(i)`` only (the jobs run in parallel over the ranks)
    and return every job's (picklable) result on every rank."""
    mine = {index: job() for index, job in enumerate(jobs) if owner_rank(index) == get_rank()}
    results: dict[int, Any] = {}
    for part in all_gather(mine):
        results.update(part)
    return [results[index] for index in range(len(jobs))]


def reduce_dict(values: dict[str, Tensor], average: bool = True) -> dict[str, Tensor]:
    """All-reduce a dict of scalar tensors so every process holds the same (mean) values."""
    world_size = get_world_size()
    if world_size == 1:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


def init_distributed_mode(args: Any) -> None:
    """Set up the process group from torchrun's (or srun's) environment, if launched so.

    ``torchrun`` and ``run_with_submitit.py`` set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
    A task of a plain ``srun`` with several tasks has ``SLURM_PROCID``, ``SLURM_NTASKS`` and
    ``SLURM_LOCALID`` instead; with ``--dist_url env://`` it also needs ``MASTER_ADDR`` and
    ``MASTER_PORT``. Sets ``args.distributed``, ``args.rank``, ``args.world_size`` and
    ``args.gpu``. NCCL on CUDA, gloo on CPU. Afterwards only rank 0 prints to stdout.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        if args.dist_url == "env://" and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            raise UserError(f"--dist_url env://: this srun task (of {os.environ['SLURM_NTASKS']}) has no "
                            "MASTER_ADDR/MASTER_PORT; submit with run_with_submitit.py, or export both "
                            "(the job's first node and a free port) in the batch script")
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()
    if args.rank != 0:
        _drop_stdout_prints()


def destroy_distributed_mode() -> None:
    """End this process's process group, if any, before the interpreter exits.

    A gloo group left to the interpreter's exit can abort the process ("terminate called without
    an active exception") after its work is done, which torchrun reports as a failed run.
    """
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def _drop_stdout_prints() -> None:
    """Make ``print`` to stdout a no-op in this process (prints to stderr still show).

    Called on every rank but 0, so that progress lines and AP tables appear once.
    """
    builtin_print = builtins.print

    def print_unless_stdout(*values: Any, **kwargs: Any) -> None:
        if kwargs.get("file") not in (None, sys.stdout):
            builtin_print(*values, **kwargs)

    builtins.print = print_unless_stdout


def save_on_master(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` atomically (temp file + rename), on rank 0 only."""
    if not is_main_process():
        return
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- logging
class SmoothedValue:
    """Tracks a series of values: median/average over a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item())

    @property
    def avg(self) -> float:
        return float(torch.tensor(list(self.deque), dtype=torch.float64).mean().item())

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                                max=self.max, value=self.value)


class MetricLogger:
    """Collects named meters and prints progress lines with images/s and ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.images_per_s = 0.0  # set by log_every at the end of its pass

    def update(self, **kwargs: float | Tensor) -> None:
        for name, value in kwargs.items():
            if isinstance(value, Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        """Sum every meter's count and total over processes (windows stay local).

        Works when ranks saw different numbers of iterations, or none.
        """
        if not is_dist_avail_and_initialized():
            return
        merged: dict[str, tuple[int, float]] = {}
        for part in all_gather({name: (m.count, m.total) for name, m in self.meters.items()}):
            for name, (count, total) in part.items():
                c, t = merged.get(name, (0, 0.0))
                merged[name] = (c + count, t + total)
        for name, (count, total) in merged.items():
            self.meters[name].count, self.meters[name].total = count, total

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  batch_size_of=None) -> Iterator:
        """Yield from ``iterable``; every ``print_freq`` steps print meters, img/s and ETA.

        ``batch_size_of(item)`` gives the number of images in an item (for images/s). When the
        pass ends, ``self.images_per_s`` holds its speed: images over its wall time, data
        loading included.
        """
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        start = time.time()
        images = 0
        for i, item in enumerate(iterable):
            yield item
            images += batch_size_of(item) if batch_size_of is not None else 1
            if (i + 1) % print_freq == 0 or i + 1 == total:
                elapsed = time.time() - start
                eta = elapsed / (i + 1) * (total - i - 1)
                rate = images / max(elapsed, 1e-9)
                if is_main_process():
                    print(f"{header} [{i + 1:{width}d}/{total}]  eta: {datetime.timedelta(seconds=int(eta))}"
                          f"  {rate:.1f} img/s  {self}", flush=True)
        total_time = time.time() - start
        self.images_per_s = images / max(total_time, 1e-9)
        if is_main_process():
            print(f"{header} done in {datetime.timedelta(seconds=int(total_time))} "
                  f"({total_time / max(total, 1):.3f} s/it, {self.images_per_s:.1f} img/s)", flush=True)
