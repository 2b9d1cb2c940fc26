"""One training epoch and the evaluation at several poll ratios, for detection and classification."""
import functools
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import GROUP_KEYS, PanopticEvaluator
from models.detr import DETR
from models.vit import PnPViT
from util.misc import MetricLogger, NestedTensor, SmoothedValue, owner_rank, reduce_dict, run_spread

# A batch of images and labels -> the batch trained on (Mixup / CutMix: mixed images, soft labels).
BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss stops being finite; the message names the bad terms."""


def _batch_size(item: tuple) -> int:
    samples = item[0]
    return (samples.tensors if isinstance(samples, NestedTensor) else samples).shape[0]


def _to_device(targets: list[dict[str, Tensor]] | Tensor, device: torch.device) -> list[dict[str, Tensor]] | Tensor:
    """Detection targets (one dict per image) or classification labels ``(B,)`` on ``device``."""
    if isinstance(targets, Tensor):
        return targets.to(device, non_blocking=True)
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


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
                    rng: Optional[random.Random] = None,
                    batch_transform: Optional[BatchTransform] = None,
                    before_step: Optional[Callable[[int], None]] = None,
                    after_step: Optional[Callable[[int], None]] = None,
                    upper_prob: float = 0.0, model_takes_targets: bool = False) -> dict[str, float]:
    """Train for one pass over ``data_loader``; returns the epoch averages of the logged values
    and ``images_per_s``, this process's training speed over the epoch (data loading included).

    Batches are ``(samples, targets)``: detection images and one target dict per image, or
    classification images ``(B, 3, H, W)`` and labels ``(B,)`` (then ``batch_transform``, e.g.
    timm's ``Mixup``, may mix them). ``criterion(outputs, targets)`` returns the loss terms, among
    them ``class_error``, and its ``weight_dict`` says how they enter the loss.
    With ``ratio_bounds = (lower, upper)`` every iteration draws its poll ratio with ``rng``
    (each process has its own draws): ``upper`` itself with probability ``upper_prob``, else
    ``Uniform(lower, upper)`` (``draw_ratio``).
    ``before_step(step)``, if given, runs before each optimiser step ``step`` of the epoch (a
    per-iteration lr schedule), ``after_step(step)`` after it (a moving average of the weights).
    With ``model_takes_targets`` the model is called as ``model(samples, ratio, targets)`` (the
    detector's denoising queries are made from them).
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
        targets = _to_device(targets, device)
        if batch_transform is not None:
            samples, targets = batch_transform(samples, targets)
        ratio = draw_ratio(rng, *ratio_bounds, upper_prob) if ratio_bounds is not None else None
        with _autocast(device, amp):
            outputs = model(samples, ratio, targets) if model_takes_targets else model(samples, ratio)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        logged = reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        weighted = {k: v * weight_dict[k] for k, v in logged.items() if k in weight_dict}
        loss_value = sum(weighted.values()).item()
        if not math.isfinite(loss_value):
            bad = [f"{k}={v.item()}" for k, v in weighted.items() if not math.isfinite(v.item())]
            raise NonFiniteLossError(f"non-finite loss {loss_value} at epoch {epoch}, iteration {step} "
                                     f"(poll ratio {ratio}): {', '.join(bad) or 'the weighted sum overflowed'}")

        if before_step is not None:
            before_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        if after_step is not None:
            after_step(step)

        logger.update(loss=loss_value, **{k: v for k, v in weighted.items() if not k[-1].isdigit()})
        logger.update(class_error=logged["class_error"], lr=optimizer.param_groups[0]["lr"])
        if ratio is not None:
            logger.update(ratio=ratio)
    logger.synchronize_between_processes()
    return {**{k: meter.global_avg for k, meter in logger.meters.items()}, "images_per_s": logger.images_per_s}


def draw_ratio(rng: random.Random, lower: float, upper: float, upper_prob: float = 0.0) -> float:
    """One training iteration's poll ratio: ``upper`` with probability ``upper_prob`` (so that
    ``upper = 1``, the empty pool, is trained at all: a uniform draw never gives it), else
    ``Uniform(lower, upper)``, the paper's draw. With ``upper_prob = 0`` it takes one number
    from ``rng``, as the paper's draw alone does."""
    if upper_prob > 0 and rng.random() < upper_prob:
        return upper
    return rng.uniform(lower, upper)


def ratio_key(ratio: Optional[float]) -> str:
    """Prefix of the log keys of one evaluated ratio: ``ratio_0.333_`` (empty for plain DETR)."""
    return "" if ratio is None else f"ratio_{ratio:g}_"


def _predictions(model: DETR | PnPViT, data_loader: Iterable, device: torch.device, ratios: Sequence[Optional[float]],
                 seconds_per_image: MetricLogger, amp: bool, print_freq: int) -> Iterator[tuple[Any, Any, Optional[float], dict]]:
    """Yield ``(samples, targets, ratio, outputs)`` for every batch and ratio, in that order.

    ``model.extract_features`` (the detector's backbone, the ViT's blocks before the sampler)
    runs once per batch; only ``model.predict`` runs per ratio. ``seconds_per_image`` gets one
    meter per ratio: the time of the shared pass plus that ratio's own pass, per image (the
    consumer's work between yields is not timed; the first batch is a warm-up and is not timed
    unless it is the only one).
    """
    num_batches = len(data_loader)
    progress = MetricLogger()
    batches = progress.log_every(data_loader, print_freq, "Test:", batch_size_of=_batch_size)
    for step, (samples, targets) in enumerate(batches):
        samples = samples.to(device, non_blocking=True)
        targets = _to_device(targets, device)
        batch = _batch_size((samples,))
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
                seconds_per_image.meters[str(ratio)].update(seconds / batch, n=batch)
            yield samples, targets, ratio, outputs


def _images_per_s(seconds_per_image: MetricLogger, ratio: Optional[float]) -> float:
    seconds = seconds_per_image.meters[str(ratio)].global_avg
    return 1 / seconds if seconds > 0 else 0.0


@torch.no_grad()
def evaluate(model: DETR, criterion: nn.Module, postprocessors: dict[str, nn.Module], data_loader: Iterable,
             base_ds: Any, device: torch.device, ratios: Sequence[Optional[float]], amp: bool = False,
             print_freq: int = 50) -> dict[str, Any]:
    """Box AP and losses at every ratio in ``ratios`` (``[None]`` for plain DETR).

    The backbone runs once per batch; only the sampler, transformer and heads run per ratio.
    Under several processes the loop has no collective (ranks may hold different numbers of
    batches); loss averages are gathered once at the end, and each ratio's detections on the
    one process that evaluates that ratio (``evaluate_spread``: the ratios are evaluated in
    parallel over the processes, and every process returns every ratio's stats).
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
    evaluators = {r: CocoEvaluator(base_ds, verbose=False) for r in ratios}
    panoptic_evaluators = {}
    if "panoptic" in postprocessors:
        dataset = data_loader.dataset
        panoptic_evaluators = {r: PanopticEvaluator(dataset.panoptic, dataset.ann_folder, verbose=False)
                               for r in ratios}
    seconds_per_image = MetricLogger()  # one meter per ratio
    for _, targets, ratio, outputs in _predictions(model, data_loader, device, ratios, seconds_per_image,
                                                   amp, print_freq):
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
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
    for ratio in ratios:
        loggers[ratio].synchronize_between_processes()
    evaluated = evaluate_spread(ratios, evaluators, panoptic_evaluators)
    stats: dict[str, Any] = {}
    for ratio, (box, panoptic) in zip(ratios, evaluated):
        print(f"Box AP at poll ratio {ratio}:" if ratio is not None else "Box AP:")
        print(box["summary"])
        prefix = ratio_key(ratio)
        stats.update({f"{prefix}{k}": m.global_avg for k, m in loggers[ratio].meters.items()})
        stats[f"{prefix}coco_eval_bbox"] = box["stats"]
        if panoptic is not None:
            print(f"Panoptic quality at poll ratio {ratio}:" if ratio is not None else "Panoptic quality:")
            print(panoptic["summary"])
            stats.update({f"{prefix}{GROUP_KEYS[group]}": result for group, result in panoptic["results"].items()})
        stats[f"{prefix}images_per_s"] = _images_per_s(seconds_per_image, ratio)
    return stats


@torch.no_grad()
def evaluate_classification(model: PnPViT, data_loader: Iterable, device: torch.device,
                            ratios: Sequence[Optional[float]], amp: bool = False,
                            print_freq: int = 50) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and cross-entropy at every ratio in ``ratios`` (``[None]``: plain ViT).

    The blocks before the sampler run once per batch. Returns ``{f"{ratio_key(r)}{name}": value}``
    with ``acc1``, ``acc5``, ``loss`` (averaged over every image of every process) and
    ``images_per_s`` (timed as in ``evaluate``).
    """
    model.eval()
    loggers = {r: MetricLogger() for r in ratios}
    seconds_per_image = MetricLogger()
    for _, labels, ratio, outputs in _predictions(model, data_loader, device, ratios, seconds_per_image,
                                                  amp, print_freq):
        logits = outputs["logits"].float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        meters = loggers[ratio].meters
        meters["loss"].update(F.cross_entropy(logits, labels).item(), n=len(labels))
        meters["acc1"].update(100 * hits[:, 0].float().mean().item(), n=len(labels))
        meters["acc5"].update(100 * hits.any(1).float().mean().item(), n=len(labels))
    seconds_per_image.synchronize_between_processes()
    stats: dict[str, Any] = {}
    for ratio in ratios:
        loggers[ratio].synchronize_between_processes()
        prefix = ratio_key(ratio)
        stats.update({f"{prefix}{k}": m.global_avg for k, m in loggers[ratio].meters.items()})
        stats[f"{prefix}images_per_s"] = _images_per_s(seconds_per_image, ratio)
    return stats


def evaluate_spread(ratios: Sequence[Optional[float]], evaluators: dict[Optional[float], CocoEvaluator],
                    panoptic_evaluators: dict[Optional[float], PanopticEvaluator]
                    ) -> list[tuple[dict[str, Any], Optional[dict[str, Any]]]]:
    """Box AP (and PQ) of every ratio, each evaluated once, on one process.

    The ratios are dealt round-robin over the processes (``owner_rank``): each ratio's
    predictions are gathered on its owner only, the owners evaluate in parallel, and every
    process gets back, per ratio, ``{"stats", "summary"}`` for the boxes and ``{"results",
    "summary"}`` for PQ (``None`` without a panoptic evaluator).
    """
    for index, ratio in enumerate(ratios):
        for evaluator in (evaluators[ratio], panoptic_evaluators.get(ratio)):
            if evaluator is not None:
                evaluator.synchronize_between_processes(dst=owner_rank(index))

    def job(ratio: Optional[float]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        box = evaluators[ratio]
        box.accumulate()
        box.summarize()
        panoptic = panoptic_evaluators.get(ratio)
        if panoptic is None:
            return {"stats": box.stats, "summary": box.summary}, None
        panoptic.accumulate()
        panoptic.summarize()
        return {"stats": box.stats, "summary": box.summary}, {"results": panoptic.results, "summary": panoptic.summary}

    return run_spread([functools.partial(job, ratio) for ratio in ratios])
