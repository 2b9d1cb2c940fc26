"""One training epoch and the evaluation at several poll ratios."""
import math
import random
import time
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import GROUP_KEYS, PanopticEvaluator
from models.detr import DETR
from util.misc import MetricLogger, SmoothedValue, reduce_dict


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss stops being finite; the message names the bad terms."""


def _batch_size(item: tuple) -> int:
    return item[0].tensors.shape[0]


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _synchronize(device: torch.device) -> None:
    """Wait for the queued CUDA work, so that a clock read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    max_norm: float = 0.0, ratio_bounds: Optional[tuple[float, float]] = None,
                    amp: bool = False, print_freq: int = 10,
                    rng: Optional[random.Random] = None) -> dict[str, float]:
    """Train for one pass over ``data_loader``; returns the epoch averages of the logged values
    and ``images_per_s``, this process's training speed over the epoch (data loading included).

    With ``ratio_bounds = (lower, upper)`` every iteration draws its poll ratio from
    ``Uniform(lower, upper)`` with ``rng`` (each process has its own draws).
    """
    model.train()
    criterion.train()
    rng = rng or random.Random()
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    weight_dict = criterion.weight_dict
    for step, (samples, targets) in enumerate(logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]",
                                                               batch_size_of=_batch_size)):
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        ratio = rng.uniform(*ratio_bounds) if ratio_bounds is not None else None
        with _autocast(device, amp):
            outputs = model(samples, ratio)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        logged = reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        weighted = {k: v * weight_dict[k] for k, v in logged.items() if k in weight_dict}
        loss_value = sum(weighted.values()).item()
        if not math.isfinite(loss_value):
            bad = [f"{k}={v.item()}" for k, v in weighted.items() if not math.isfinite(v.item())]
            raise NonFiniteLossError(f"non-finite loss {loss_value} at epoch {epoch}, iteration {step} "
                                     f"(poll ratio {ratio}): {', '.join(bad) or 'the weighted sum overflowed'}")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()

        logger.update(loss=loss_value, **{k: v for k, v in weighted.items() if not k[-1].isdigit()})
        logger.update(class_error=logged["class_error"], lr=optimizer.param_groups[0]["lr"])
        if ratio is not None:
            logger.update(ratio=ratio)
    logger.synchronize_between_processes()
    return {**{k: meter.global_avg for k, meter in logger.meters.items()}, "images_per_s": logger.images_per_s}


def ratio_key(ratio: Optional[float]) -> str:
    """Prefix of the log keys of one evaluated ratio: ``ratio_0.333_`` (empty for plain DETR)."""
    return "" if ratio is None else f"ratio_{ratio:g}_"


@torch.no_grad()
def evaluate(model: DETR, criterion: nn.Module, postprocessors: dict[str, nn.Module], data_loader: Iterable,
             base_ds: Any, device: torch.device, ratios: Sequence[Optional[float]], amp: bool = False,
             print_freq: int = 50) -> dict[str, Any]:
    """Box AP and losses at every ratio in ``ratios`` (``[None]`` for plain DETR).

    The backbone runs once per batch; only the sampler, transformer and heads run per ratio.
    Under several processes the loop has no collective (ranks may hold different numbers of
    batches); detections and loss averages are gathered once at the end.
    Returns ``{f"{ratio_key(r)}{name}": value}`` with ``coco_eval_bbox`` the 12 COCO stats and
    ``images_per_s`` the model's speed at that ratio: images over the time of the shared
    backbone pass plus that ratio's own pass (losses, post-processing and COCO evaluation
    excluded; the first batch is a warm-up and is not timed unless it is the only one; the
    speed of one process).
    With a ``panoptic`` post-processor (``--masks``) the stats also hold ``PQ_all``, ``PQ_th`` and
    ``PQ_st`` (``{"pq", "sq", "rq", "n"}`` each) against ``data_loader.dataset``'s panoptic
    ground truth (a ``CocoPanoptic``).
    """
    model.eval()
    criterion.eval()
    loggers = {r: MetricLogger() for r in ratios}
    evaluators = {r: CocoEvaluator(base_ds) for r in ratios}
    panoptic_evaluators = {}
    if "panoptic" in postprocessors:
        dataset = data_loader.dataset
        panoptic_evaluators = {r: PanopticEvaluator(dataset.panoptic, dataset.ann_folder) for r in ratios}
    progress = MetricLogger()
    seconds_per_image = MetricLogger()  # one meter per ratio
    num_batches = len(data_loader)
    batches = progress.log_every(data_loader, print_freq, "Test:", batch_size_of=_batch_size)
    for step, (samples, targets) in enumerate(batches):
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        timed = step > 0 or num_batches == 1  # the first batch warms up (allocator, kernels, compilation)
        _synchronize(device)
        start = time.perf_counter()
        with _autocast(device, amp):
            features = model.extract_features(samples)
        _synchronize(device)
        shared_seconds = time.perf_counter() - start
        for ratio in ratios:
            start = time.perf_counter()
            with _autocast(device, amp):
                outputs = model.predict(features, ratio)
            _synchronize(device)
            if timed:
                seconds = shared_seconds + time.perf_counter() - start
                seconds_per_image.meters[str(ratio)].update(seconds / len(targets), n=len(targets))
            loss_dict = criterion(outputs, targets, sync_num_boxes=False)
            weighted = {k: v * criterion.weight_dict[k] for k, v in loss_dict.items() if k in criterion.weight_dict}
            loggers[ratio].update(loss=sum(weighted.values()), class_error=loss_dict["class_error"],
                                  **{k: v for k, v in weighted.items() if not k[-1].isdigit()})
            results = postprocessors["bbox"](outputs, orig_sizes)
            evaluators[ratio].update({int(t["image_id"]): r for t, r in zip(targets, results)})
            if panoptic_evaluators:
                sizes = torch.stack([t["size"] for t in targets])
                panoptic = postprocessors["panoptic"](outputs, sizes, orig_sizes)
                panoptic_evaluators[ratio].update({int(t["image_id"]): p for t, p in zip(targets, panoptic)})

    seconds_per_image.synchronize_between_processes()
    stats: dict[str, Any] = {}
    for ratio in ratios:
        loggers[ratio].synchronize_between_processes()
        evaluator = evaluators[ratio]
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        print(f"Box AP at poll ratio {ratio}:" if ratio is not None else "Box AP:")
        evaluator.summarize()
        prefix = ratio_key(ratio)
        stats.update({f"{prefix}{k}": m.global_avg for k, m in loggers[ratio].meters.items()})
        stats[f"{prefix}coco_eval_bbox"] = list(evaluator.stats)
        if panoptic_evaluators:
            panoptic_evaluator = panoptic_evaluators[ratio]
            panoptic_evaluator.synchronize_between_processes()
            panoptic_evaluator.accumulate()
            print(f"Panoptic quality at poll ratio {ratio}:" if ratio is not None else "Panoptic quality:")
            panoptic_evaluator.summarize()
            stats.update({f"{prefix}{GROUP_KEYS[group]}": result for group, result in panoptic_evaluator.results.items()})
        seconds = seconds_per_image.meters[str(ratio)].global_avg
        stats[f"{prefix}images_per_s"] = 1 / seconds if seconds > 0 else 0.0
    return stats
