"""Train or evaluate DETR / PnP-DETR (detection) or ViT / PnP-ViT (``--task classification``).

    python main.py --config configs/demo.yaml                # train the CPU demo
    python main.py --config configs/demo.yaml --eval --eval_ratios 0.33 0.5 0.8
    torchrun --nproc_per_node=8 main.py --config configs/pnp_detr_r50.yaml --coco_path /data/coco
    torchrun --nproc_per_node=8 main.py --config configs/deit_small_pnp.yaml --data_path /data/imagenet
"""
import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset

import util.misc as utils
from datasets.samplers import ShardedBatchSampler
from engine import NonFiniteLossError, train_one_epoch
from models import fast_path
from tasks import Task, check_task_flags, get_task
from util.checkpoint import TRAINED_MODEL_KEY, plain_args, read_checkpoint
from util.errors import UserError, exit_status
from util.files import write_json
from util.flags import TRAIN_EVAL_RATIOS, get_args_parser, parse_args  # noqa: F401 (main.get_args_parser: the parser)
from util.flops import CONVENTION, mean_flops
from util.plot_utils import log_scalars, plot_tradeoff

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags with a one-line message naming them."""
    lower, upper = args.sample_ratio_lower_bound, args.sample_ratio_higher_bound
    if not (0 < lower <= 1 and 0 < upper <= 1):
        raise UserError(f"--sample_ratio_lower_bound/--sample_ratio_higher_bound must lie in (0, 1], got {lower} and {upper}")
    if lower > upper:
        raise UserError(f"--sample_ratio_lower_bound {lower} is above --sample_ratio_higher_bound {upper}")
    if not 0 <= args.sample_ratio_upper_prob <= 1:
        raise UserError(f"--sample_ratio_upper_prob must lie in [0, 1], got {args.sample_ratio_upper_prob}")
    if not 0 < args.sample_topk_ratio <= 1:
        raise UserError(f"--sample_topk_ratio must lie in (0, 1], got {args.sample_topk_ratio}")
    for r in args.eval_ratios or []:
        if not 0 < r <= 1:
            raise UserError(f"--eval_ratios: every ratio must lie in (0, 1], got {r}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.lr_base_batch < 0:
        raise UserError(f"--lr_base_batch must be 0 (off) or a batch size, got {args.lr_base_batch}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.flops_images < 0:
        raise UserError(f"--flops_images must be 0 or more, got {args.flops_images}")
    if args.baseline_eval and not args.eval:
        raise UserError("--baseline_eval is only used with --eval")
    if args.channels_last and args.no_channels_last:
        raise UserError("--channels_last and --no_channels_last contradict each other: give one")
    if args.tensorboard and not args.eval and not args.output_dir:
        raise UserError("--tensorboard logs to output_dir/tensorboard: give --output_dir")
    if args.retrofit and args.no_pnp:
        raise UserError("--retrofit sets how the sampler passes tokens on; --no_pnp builds no sampler: give one")
    if args.finetune and args.resume:
        raise UserError("--finetune starts a new run from a checkpoint's weights; --resume continues one: give one")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay must be 0 (off) or a decay in (0, 1), got {args.ema_decay}")
    check_task_flags(get_task(args.task), args)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(args: argparse.Namespace, epoch: int) -> int:
    """Each epoch's randomness depends only on (seed, epoch, rank): resuming replays it exactly."""
    return args.seed + 1000 * epoch + utils.get_rank()


def add_flops(rows: list[dict[str, Any]], model: torch.nn.Module, dataset, num_images: int,
              device: torch.device) -> None:
    """Add to each row the mean ``gflops`` (whole model) and, for a detector, ``gflops_transformer``
    per image over the first ``num_images`` images of ``dataset``, each counted alone (batch 1)."""
    images = (dataset[i][0].to(device) for i in range(min(num_images, len(dataset))))
    flops = mean_flops(model, images, [row["ratio"] for row in rows])
    for row in rows:
        row["gflops"] = flops[row["ratio"]].total
        if flops[row["ratio"]].transformer is not None:
            row["gflops_transformer"] = flops[row["ratio"]].transformer


def read_baseline(path: str, metric: str = "AP") -> list[dict[str, Any]]:
    """The rows of a (DETR / ViT) ``eval.json`` for the trade-off plot; each needs ``metric``
    (``AP`` or ``top1``) and ``gflops``."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--baseline_eval: {path} does not exist") from None
    except json.JSONDecodeError:
        raise UserError(f"--baseline_eval: {path} is not JSON") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {metric, "gflops"} <= set(r) for r in rows):
        raise UserError(f"--baseline_eval: {path} must be an eval.json whose rows have {metric} and gflops "
                        "(written by --eval with --flops_images > 0, for the same --task)")
    return rows


def tensorboard_writer(args: argparse.Namespace, output_dir: Optional[Path]) -> Optional["SummaryWriter"]:
    """A TensorBoard writer for ``output_dir/tensorboard`` on rank 0 when training with
    ``--tensorboard``, else None (``--eval`` logs no epoch).

    Every rank imports it, so a missing package stops each one with the same one-line error.
    """
    if not args.tensorboard or args.eval:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(output_dir / "tensorboard")) if utils.is_main_process() else None


def build_datasets(args: argparse.Namespace) -> tuple[Optional[Dataset], Dataset]:
    """The training split (None with ``--eval``) and the validation split of ``--task``'s data."""
    task = get_task(args.task)
    dataset_val = task.build_dataset("val", args)
    return (None if args.eval else task.build_dataset("train", args)), dataset_val


def build_loaders(args: argparse.Namespace, dataset_train: Optional[Dataset], dataset_val: Dataset
                  ) -> tuple[Optional[DataLoader], DataLoader]:
    """The training loader (None without ``dataset_train``) and the validation loader, each
    process its shard. On a GPU, batches come in page-locked memory, so that the engine's
    non-blocking copies are."""
    task = get_task(args.task)
    pin_memory = torch.device(args.device).type == "cuda"
    collate_fn = task.collate_fn(args)
    batches_val = ShardedBatchSampler(len(dataset_val), args.batch_size, utils.get_rank(), utils.get_world_size())
    loader_val = DataLoader(dataset_val, batch_sampler=batches_val, collate_fn=collate_fn,
                            num_workers=args.num_workers, pin_memory=pin_memory)
    if dataset_train is None:
        return None, loader_val
    batch_sampler = torch.utils.data.BatchSampler(task.train_sampler(args, dataset_train), args.batch_size,
                                                  drop_last=True)
    if len(batch_sampler) == 0:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(dataset_train)} training images")
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=args.num_workers, pin_memory=pin_memory)
    return loader_train, loader_val


def freeze_all_but(model: torch.nn.Module, prefixes: list[str]) -> None:
    """``--trainable``: only the parameters whose names start with one of ``prefixes`` train."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise UserError(f"--trainable {prefix}: no parameter of the model starts with it "
                            f"(e.g. {', '.join(sorted({n.split('.')[0] for n in names}))})")
    for name, param in model.named_parameters():
        if not name.startswith(tuple(prefixes)):
            param.requires_grad_(False)


def lr_scale(args: argparse.Namespace) -> float:
    """The factor ``--lr_base_batch`` applies to the lrs: the run's total batch over it (1 when 0)."""
    if args.lr_base_batch <= 0:
        return 1.0
    return args.batch_size * utils.get_world_size() / args.lr_base_batch


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module,
                    steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the task's parameter groups at their lrs (scaled by ``lr_scale``), and the lr
    schedule of ``--lr_schedule`` (cosine: updated every iteration).

    AdamW is torch's fused one: one kernel over all parameters (fewer, larger operations than its
    default), the same update up to float rounding.
    """
    param_groups = get_task(args.task).param_groups(args, model)
    scale = lr_scale(args)
    for group in param_groups:
        if "lr" in group:
            group["lr"] *= scale
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr * scale, weight_decay=args.weight_decay, fused=True)
    if args.lr_schedule == "cosine":
        return optimizer, CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr,
                                            warmup_t=args.warmup_epochs * steps_per_epoch,
                                            warmup_lr_init=args.warmup_lr, t_in_epochs=False)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def lr_steps(lr_scheduler: Any, epoch: int, steps_per_epoch: int) -> tuple[Optional[Callable[[int], None]], Callable[[], None]]:
    """The per-iteration and the end-of-epoch updates of the lr schedule: timm's cosine schedule
    sets the lr of every iteration from the update count; torch's StepLR counts epochs."""
    if isinstance(lr_scheduler, CosineLRScheduler):
        return (lambda step: lr_scheduler.step_update(epoch * steps_per_epoch + step)), (lambda: None)
    return None, lr_scheduler.step


def build_weight_average(args: argparse.Namespace, model: torch.nn.Module) -> Optional[ModelEmaV3]:
    """``--ema_decay``: a copy of ``model`` that will hold the moving average of its weights (timm's
    ``ModelEmaV3``, the decay warmed up as ``1 - n ** (-2/3)`` at the n-th optimiser step to at most
    ``--ema_decay``); None when off or only evaluating. Built before ``--compile``, so that the copy
    runs eagerly."""
    if args.ema_decay <= 0 or args.eval:
        return None
    return ModelEmaV3(model, decay=args.ema_decay, use_warmup=True)


def average_steps(average: Optional[ModelEmaV3], model: torch.nn.Module, epoch: int,
                  steps_per_epoch: int) -> Optional[Callable[[int], None]]:
    """The update of ``average`` after each optimiser step of ``epoch`` (None without an average).
    Its decay follows the optimiser steps counted from epoch 0, so a resumed run averages as an
    uninterrupted one."""
    if average is None:
        return None
    return lambda step: average.update(model, step=epoch * steps_per_epoch + step + 1)


def run_evaluation(task: Task, args: argparse.Namespace, model: torch.nn.Module, criterion: torch.nn.Module,
                   postprocessors: dict[str, torch.nn.Module], loader_val: DataLoader, device: torch.device,
                   ratios: list[Optional[float]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stats of the task's evaluation at ``ratios`` and their ``eval.json`` rows."""
    stats = task.evaluate(args, model, criterion, postprocessors, loader_val, device, ratios)
    return stats, task.eval_rows(stats, ratios)


def load_finetune_weights(task: Task, model: torch.nn.Module, source: str) -> list[str]:
    """``--finetune``: a checkpoint's model weights, its class head replaced when the class count
    differs (nothing else is taken from it: no optimiser, epoch or flags)."""
    checkpoint = read_checkpoint(source, flag="--finetune")
    return task.load_weights(model, checkpoint["model"], source)


def main(args: argparse.Namespace) -> None:
    check_args(args)
    task = get_task(args.task)
    task.complete_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    warning = utils.slow_bf16_warning(device) if args.amp else None
    if warning:
        print(warning)
    seed_everything(args.seed)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    writer = tensorboard_writer(args, output_dir)

    resume = args.resume
    if not resume and output_dir is not None and (output_dir / "checkpoint.pth").exists():
        resume = str(output_dir / "checkpoint.pth")
        print(f"resuming from {resume}")
    checkpoint = read_checkpoint(resume) if resume else None

    dataset_train, dataset_val = build_datasets(args)
    if args.num_classes is None:
        saved = checkpoint.get("args") if checkpoint is not None else None
        saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
        if isinstance(saved, dict) and saved.get("num_classes"):
            args.num_classes = saved["num_classes"]
        else:
            args.num_classes = (dataset_val if args.eval else dataset_train).num_classes
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)

    model, criterion, postprocessors = task.build_model(args, dataset_val)
    if args.trainable:
        freeze_all_but(model, args.trainable)
    fast_path(model.to(device), channels_last=not args.no_channels_last)
    criterion.to(device)
    average = build_weight_average(args, model)
    if args.compile:  # in place: the state_dict keys stay those of the eager model
        model.backbone.compile()
        model.transformer.compile()
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"{task.display_name(model_without_ddp.uses_pnp)}: {n_parameters:,} trainable parameters")
    optimizer, lr_scheduler = build_optimizer(args, model_without_ddp, len(loader_train) if loader_train else 1)

    resuming = checkpoint is not None and not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch"))
    trained = checkpoint.get(TRAINED_MODEL_KEY) if resuming else None  # with --ema_decay, "model" is the average
    if checkpoint is not None:
        for note in task.load_weights(model_without_ddp, checkpoint["model"] if trained is None else trained, resume):
            print(note)
        if resuming:
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
            except ValueError:
                raise UserError(f"--resume: the optimiser state in {resume} is of another set of parameters (e.g. "
                                "another --query_groups): resume with the flags it was trained with, or start "
                                "from its weights with --finetune") from None
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if isinstance(lr_scheduler, torch.optim.lr_scheduler.StepLR):
                lr_scheduler.step_size = args.lr_drop
            args.start_epoch = checkpoint["epoch"] + 1
    else:  # a resumed run holds its weights already
        notes = (load_finetune_weights(task, model_without_ddp, args.finetune) if args.finetune
                 else task.load_initial_weights(args, model_without_ddp))
        for note in notes:
            print(note)
    if average is not None and trained is not None:
        task.load_weights(average.module, checkpoint["model"], resume)  # its notes are those printed above
    elif average is not None:
        average.set(model_without_ddp)
        if resuming:
            print(f"{resume} holds no moving average of its weights: the average of --ema_decay starts from them")
    elif trained is not None:
        print(f"{resume} holds a moving average of its weights (--ema_decay): training goes on from its "
              "trained weights, without an average")
    evaluated = model_without_ddp if average is None else average.module

    pnp = model_without_ddp.uses_pnp
    if args.eval:
        ratios = (args.eval_ratios or [args.sample_topk_ratio]) if pnp else [None]
        baseline = read_baseline(args.baseline_eval, task.metric) if args.baseline_eval else None
        _, rows = run_evaluation(task, args, model_without_ddp, criterion, postprocessors, loader_val, device, ratios)
        if utils.is_main_process():
            if args.flops_images > 0:
                add_flops(rows, model_without_ddp, dataset_val, args.flops_images, device)
                print(f"{CONVENTION}; mean over the first {min(args.flops_images, len(dataset_val))} val images")
            print(task.format_table(rows))
            if output_dir is not None:
                write_json(rows, output_dir / "eval.json", indent=2)
                if args.flops_images > 0:
                    plot_tradeoff(rows, output_dir / "tradeoff.png", baseline, task.metric, task.model_name)
        return

    ratios = (args.eval_ratios or TRAIN_EVAL_RATIOS) if pnp else [None]
    ratio_bounds = (args.sample_ratio_lower_bound, args.sample_ratio_higher_bound) if pnp else None
    if args.start_epoch >= args.epochs:
        print(f"nothing to train: the checkpoint already holds epoch {args.start_epoch - 1} of --epochs {args.epochs}")
    else:
        print(f"training epochs {args.start_epoch}..{args.epochs - 1}")
    mix = task.batch_transform(args)
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        seed_everything(epoch_seed(args, epoch))
        if hasattr(loader_train.batch_sampler.sampler, "set_epoch"):  # distributed, or repeated augmentation
            loader_train.batch_sampler.sampler.set_epoch(epoch)
        before_step, end_epoch = lr_steps(lr_scheduler, epoch, len(loader_train))
        try:
            train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                          args.clip_max_norm, ratio_bounds, args.amp, args.print_freq,
                                          rng=random.Random(epoch_seed(args, epoch)), batch_transform=mix,
                                          before_step=before_step,
                                          after_step=average_steps(average, model_without_ddp, epoch, len(loader_train)),
                                          upper_prob=args.sample_ratio_upper_prob,
                                          model_takes_targets=task.model_takes_targets)
        except NonFiniteLossError as err:
            kept = output_dir / "checkpoint.pth" if output_dir is not None else None
            where = f"; the last good checkpoint is {kept}" if kept is not None and kept.exists() else ""
            raise NonFiniteLossError(f"training stopped: {err}{where}") from None
        end_epoch()
        if args.distributed:  # each rank's last step updated its own BatchNorm statistics: keep rank 0's
            for buffer in [*model_without_ddp.buffers(), *(average.module.buffers() if average is not None else [])]:
                torch.distributed.broadcast(buffer, src=0)
        if output_dir is not None:
            checkpoint = {"model": evaluated.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": plain_args(args)}
            if average is not None:
                checkpoint[TRAINED_MODEL_KEY] = model_without_ddp.state_dict()
            utils.save_on_master(checkpoint, output_dir / "checkpoint.pth")
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                utils.save_on_master(checkpoint, output_dir / f"checkpoint{epoch:04}.pth")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        last = epoch == args.epochs - 1
        if last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
            test_stats, rows = run_evaluation(task, args, evaluated, criterion, postprocessors, loader_val, device,
                                              ratios)
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            if utils.is_main_process():
                print(task.format_table(rows))
        if output_dir is not None and utils.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
        if writer is not None:
            for name, value in log_scalars(log_stats).items():
                writer.add_scalar(name, value, epoch)
            writer.flush()
    if writer is not None:
        writer.close()
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: bad input ends in one line on stderr and exit status 2."""
    try:
        return exit_status(lambda: main(parse_args(argv)))
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        utils.destroy_distributed_mode()


if __name__ == "__main__":
    sys.exit(run())
